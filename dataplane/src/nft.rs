//! twill's own nftables table, `table ip twill`: masquerade for pod traffic leaving the
//! cluster network, never NAT inside it, and forward-accept for the cluster network.
//!
//! Idempotent: the table is listed first and left alone when it already reads exactly as
//! rendered; otherwise it is replaced in one atomic `nft -f -` transaction (create-if-absent,
//! delete, create), so there is never a moment without the rules.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::{Error, Result};

/// The table's name (family `ip`).
pub const TABLE: &str = "twill";

/// What the table must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftConfig {
    /// The cluster network (`Network` of the net config).
    pub network: Ipv4Net,
    /// This node's subnet (its lease).
    pub node_subnet: Ipv4Net,
    /// Masquerade traffic leaving the cluster network (`--ip-masq`).
    pub masquerade: bool,
}

/// Whether [`Nft::ensure`] had to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftOutcome {
    Unchanged,
    Applied,
}

/// The table exactly as `nft list table ip twill` prints it (tabs, blank line between
/// chains), so that a listing can be compared with it as text.
pub fn render(cfg: &NftConfig) -> String {
    let n = cfg.network.trunc();
    let s = cfg.node_subnet.trunc();
    let mut t = String::new();
    t.push_str(&format!("table ip {TABLE} {{\n"));
    t.push_str("\tcomment \"managed by twilld\"\n");
    t.push_str("\tchain postrouting {\n");
    t.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
    if cfg.masquerade {
        // Pod to pod / pod to node inside the cluster network: never NAT.
        t.push_str(&format!("\t\tip saddr {n} ip daddr {n} return\n"));
        // Multicast stays unNATed.
        t.push_str(&format!("\t\tip saddr {n} ip daddr 224.0.0.0/4 return\n"));
        // Pod traffic leaving the cluster network.
        t.push_str(&format!("\t\tip saddr {n} masquerade fully-random\n"));
        // Outside traffic to this node's own pods keeps its source.
        t.push_str(&format!("\t\tip saddr != {n} ip daddr {s} return\n"));
        // Outside traffic forwarded to other nodes' pods: so that replies come back here.
        t.push_str(&format!(
            "\t\tip saddr != {n} ip daddr {n} masquerade fully-random\n"
        ));
    }
    t.push_str("\t}\n\n");
    t.push_str("\tchain forward {\n");
    t.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    t.push_str(&format!("\t\tip saddr {n} accept\n"));
    t.push_str(&format!("\t\tip daddr {n} accept\n"));
    t.push_str("\t}\n");
    t.push_str("}\n");
    t
}

/// Runs `nft`, in the caller's namespace or (for tests) inside the namespace at a path.
#[derive(Clone, Debug, Default)]
pub struct Nft {
    netns: Option<PathBuf>,
}

impl Nft {
    /// `nft` in the caller's own network namespace.
    pub fn new() -> Self {
        Nft { netns: None }
    }

    /// `nft` inside the namespace bound at `path` (through `nsenter --net=`).
    pub fn in_netns(path: impl AsRef<Path>) -> Self {
        Nft {
            netns: Some(path.as_ref().to_path_buf()),
        }
    }

    fn command(&self) -> Command {
        match &self.netns {
            None => Command::new("nft"),
            Some(p) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", p.display())).arg("--").arg("nft");
                c
            }
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = self.command();
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("nft {}", args.join(" "));
        let mut child = c
            .spawn()
            .map_err(|e| Error::Nft(format!("{what}: spawn: {e}")))?;
        if let Some(s) = stdin {
            let mut i = child.stdin.take().expect("piped stdin");
            i.write_all(s.as_bytes())
                .map_err(|e| Error::Nft(format!("{what}: write ruleset: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Nft(format!("{what}: wait: {e}")))?;
        if !out.status.success() {
            return Err(Error::Nft(format!(
                "{what}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The table as listed by nft, `None` if it does not exist.
    pub fn list(&self) -> Result<Option<String>> {
        match self.run(&["list", "table", "ip", TABLE], None) {
            Ok(s) => Ok(Some(s)),
            // nft says "No such file or directory" for a missing table.
            Err(Error::Nft(m)) if m.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes the table read as [`render`]`(cfg)`: nothing is written when it already does.
    pub fn ensure(&self, cfg: &NftConfig) -> Result<NftOutcome> {
        let want = render(cfg);
        if self.list()?.as_deref() == Some(want.as_str()) {
            return Ok(NftOutcome::Unchanged);
        }
        // One transaction: `table` creates it if absent so that `delete` cannot fail, then
        // the new table; nft applies all of it or nothing.
        let tx = format!("table ip {TABLE} {{ }}\ndelete table ip {TABLE}\n{want}");
        self.run(&["-f", "-"], Some(&tx))?;
        Ok(NftOutcome::Applied)
    }

    /// Deletes the table if it exists.
    pub fn remove(&self) -> Result<()> {
        let tx = format!("table ip {TABLE} {{ }}\ndelete table ip {TABLE}\n");
        self.run(&["-f", "-"], Some(&tx)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_never_nats_inside_the_network() {
        let t = render(&NftConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade: true,
        });
        let ret = t
            .find("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return")
            .unwrap();
        let masq = t.find("ip saddr 10.244.0.0/16 masquerade").unwrap();
        assert!(
            ret < masq,
            "the return must come before the masquerade:\n{t}"
        );
        assert!(t.contains("ip daddr 10.244.0.0/16 accept"));
    }

    #[test]
    fn no_masquerade_without_ip_masq() {
        let t = render(&NftConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade: false,
        });
        assert!(!t.contains("masquerade"));
        assert!(t.contains("chain forward"));
    }
}
