//! Network namespaces for kernel and cluster tests: [`TestNetns`] creates a uniquely named
//! namespace (`tw<pid>n<seq><tag>`, or a name made from [`crate::cluster::unique_prefix`],
//! via `ip netns add`) and deletes it on drop, also when the test fails. Commands run inside it through
//! `nsenter --net=/var/run/netns/<name>` (not `ip netns exec`, which remounts /sys and costs
//! milliseconds).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The next number of this process's one sequence of test names.
pub(crate) fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::SeqCst)
}

/// A name unique to this process and call: `tw<pid>n<seq>` + `tag`.
pub fn unique_name(tag: &str) -> String {
    format!("tw{}n{}{tag}", std::process::id(), next_seq())
}

/// Fails the test unless it runs as root (kernel tests must not silently skip).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this kernel test needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run it as root"
    );
}

/// The stdout of a finished command, or an error with `what`, its status, stderr and stdout.
pub(crate) fn checked(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command in the caller's namespace; an error carries its stderr.
pub fn run_host(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {program}"))?;
    checked(&format!("{program} {}", args.join(" ")), out)
}

/// A named network namespace, deleted on drop with every link inside it (what still runs
/// inside is killed first, so that the namespace can go). Commands run inside it through
/// nsenter.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
    deleted: bool,
}

impl TestNetns {
    /// Creates `tw<pid>n<seq><tag>`; loopback is brought up.
    pub fn new(tag: &str) -> Result<Self> {
        Self::named(unique_name(tag))
    }

    /// Creates the namespace `name` (a name the caller made unique, e.g. from
    /// [`crate::cluster::unique_prefix`]); loopback is brought up.
    pub fn named(name: impl Into<String>) -> Result<Self> {
        require_root();
        let name = name.into();
        run_host("ip", &["netns", "add", &name])?;
        let ns = TestNetns {
            name,
            deleted: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, what CNI_NETNS, `nsenter --net=` and `NetNs::open` take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside this namespace (through nsenter).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `program args` inside; an error carries the exit status and stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.exec_output(program, args)?;
        checked(
            &format!("[{}] {program} {}", self.name, args.join(" ")),
            out,
        )
    }

    /// Like [`TestNetns::exec`] but returns the raw output, failing or not.
    pub fn exec_output(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("nsenter {} {program}", self.name))
    }

    /// `ip <args>` inside.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.exec("ip", args)
    }

    /// Pings `dst` from inside: `count` packets, `timeout_s` seconds overall. Returns ping's
    /// output; fails if no reply came.
    pub fn ping(&self, dst: IpAddr, count: u32, timeout_s: u32) -> Result<String> {
        self.exec(
            "ping",
            &[
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-w",
                &timeout_s.to_string(),
                &dst.to_string(),
            ],
        )
    }

    /// Whether one ping to `dst` gets a reply within `timeout_s` seconds.
    pub fn can_ping(&self, dst: IpAddr, timeout_s: u32) -> bool {
        self.exec(
            "ping",
            &[
                "-n",
                "-c",
                "1",
                "-w",
                &timeout_s.to_string(),
                &dst.to_string(),
            ],
        )
        .is_ok()
    }

    /// The names of the links inside.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .collect())
    }

    /// Whether a link `name` exists inside.
    pub fn has_link(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).is_ok()
    }

    /// Adds `cidr` (e.g. "10.0.0.1/24") to `dev` and brings `dev` up.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Kills what still runs inside (pings, servers: by the PIDs `ip netns pids` lists)
    /// and deletes the namespace now (e.g. to test DEL after the netns is gone).
    pub fn delete(&mut self) -> Result<()> {
        if !self.deleted {
            self.deleted = true;
            let pids = run_host("ip", &["netns", "pids", &self.name]).unwrap_or_default();
            for pid in pids.split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            run_host("ip", &["netns", "del", &self.name])?;
        }
        Ok(())
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = self.delete();
    }
}

/// A veth pair between two namespaces: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth_between(a: &TestNetns, a_if: &str, b: &TestNetns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A veth pair from `host` to `ns`: `host_if` a port of `bridge` in `host`, `ns_if` in `ns`,
/// both up.
pub fn veth_on_bridge(
    host: &TestNetns,
    bridge: &str,
    host_if: &str,
    ns: &TestNetns,
    ns_if: &str,
) -> Result<()> {
    veth_between(host, host_if, ns, ns_if)?;
    host.ip(&["link", "set", host_if, "master", bridge])?;
    Ok(())
}

/// One TCP connection from inside `ns` to `to`, read to EOF (5 s timeouts). The socket is
/// created on a thread inside `ns` and stays there. Panics if `ns` cannot be entered, so
/// that an `is_err()` check means "the connection failed", nothing else.
pub fn tcp_fetch(ns: &twill_dataplane::NetNs, to: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::Read;
    let timeout = std::time::Duration::from_secs(5);
    ns.run_in(move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })
    .unwrap_or_else(|e| panic!("enter {}: {e}", ns.path().display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.starts_with("tw"));
    }
}
