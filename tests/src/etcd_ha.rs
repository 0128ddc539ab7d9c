//! A real 3-member etcd cluster for HA tests: each member is Debian's etcd in a network
//! namespace of its own, plugged into the cluster's underlay bridge (so twilld reaches every
//! member as a separate endpoint, as on a real cluster). A test can kill and restart a
//! member, partition one from its peers (nftables inside that member's namespace drops the
//! peer port, clients still reach it), and ask who leads.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cluster::{ChildGuard, in_netns, wait_for};
use crate::etcd::etcd_bin;
use crate::netns::{TestNetns, veth_on_bridge};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// One member: its namespace on the underlay, address, data dir and process.
pub struct Member {
    pub name: String,
    pub ns: TestNetns,
    pub ip: Ipv4Addr,
    data: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.ip)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// The cluster. Dropping it kills the members (by PID) and deletes their namespaces.
pub struct EtcdHa {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl EtcdHa {
    /// Starts `n` members named `<prefix>-e<i>` at `first_ip`, `first_ip + 1`, ... on the
    /// bridge `bridge` of the namespace `underlay`, and waits until the cluster has a leader.
    pub fn start(
        underlay: &TestNetns,
        bridge: &str,
        prefix: &str,
        n: usize,
        first_ip: Ipv4Addr,
    ) -> Result<EtcdHa> {
        let dir = tempfile::Builder::new().prefix("tw-etcd-ha-").tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
            let ns = TestNetns::named(format!("{prefix}-e{i}"))?;
            let ip = Ipv4Addr::from(u32::from(first_ip) + i as u32);
            let host_if = format!("e{i}");
            veth_on_bridge(underlay, bridge, &host_if, &ns, "eth0")?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            let name = format!("m{i}");
            members.push(Member {
                data: dir.path().join(&name).join("data"),
                log: dir.path().join(format!("{name}.log")),
                name,
                ns,
                ip,
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut ha = EtcdHa {
            members,
            initial_cluster,
            token: format!("tw-ha-{}-{prefix}", std::process::id()),
            _dir: dir,
        };
        for i in 0..n {
            ha.start_member(i)?;
        }
        ha.wait_leader(Duration::from_secs(30))
            .context("the etcd cluster elected no leader")?;
        Ok(ha)
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Starts member `i` (again: same data dir, so it rejoins with its state).
    pub fn start_member(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        if m.child.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&m.data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let peer = format!("http://{}:{PEER_PORT}", m.ip);
        let client = m.endpoint();
        let child =
            m.ns.command(etcd_bin())
                .args(["--name", &m.name, "--data-dir"])
                .arg(&m.data)
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &self.initial_cluster])
                .args(["--initial-cluster-token", &self.token])
                .args(["--initial-cluster-state", "new"])
                // Fast elections on a loopback-fast network (defaults: 100 ms / 1000 ms).
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start etcd member {}", m.name))?;
        m.child = Some(ChildGuard::new(child, format!("etcd {}", m.name)));
        Ok(())
    }

    /// SIGKILLs member `i` (its data dir stays).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill();
        }
    }

    /// Cuts member `i` off from the other members (peer traffic dropped both ways inside its
    /// namespace); clients still reach it, as with a real partition between etcd hosts.
    pub fn partition(&self, i: usize) -> Result<()> {
        let others: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != i)
            .map(|(_, m)| m.ip.to_string())
            .collect();
        let set = others.join(", ");
        let rules = format!(
            "table inet twpart {{\n\
             chain in {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n\
             chain out {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("part.nft");
        std::fs::write(&f, rules)?;
        self.members[i]
            .ns
            .exec("nft", &["-f", &f.display().to_string()])?;
        Ok(())
    }

    /// Undoes [`EtcdHa::partition`].
    pub fn heal(&self, i: usize) -> Result<()> {
        self.members[i]
            .ns
            .exec("nft", &["delete", "table", "inet", "twpart"])?;
        Ok(())
    }

    /// The index of the member that leads, as the running members see it (None: no leader
    /// that a majority of the answering members agree on, or none answers).
    pub fn leader(&self) -> Option<usize> {
        let mut votes: Vec<(u64, usize)> = Vec::new();
        let mut ids: Vec<(u64, usize)> = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.running() {
                continue;
            }
            if let Some((member_id, leader_id)) = status(m) {
                ids.push((member_id, i));
                if leader_id != 0 {
                    match votes.iter_mut().find(|(l, _)| *l == leader_id) {
                        Some(v) => v.1 += 1,
                        None => votes.push((leader_id, 1)),
                    }
                }
            }
        }
        let (leader_id, n) = votes.into_iter().max_by_key(|v| v.1)?;
        if n * 2 <= self.members.len() {
            return None;
        }
        ids.into_iter()
            .find(|(id, _)| *id == leader_id)
            .map(|(_, i)| i)
    }

    /// Waits until a majority agrees on a leader; returns it.
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        match wait_for(timeout, || self.leader()) {
            Some(l) => Ok(l),
            None => bail!("no etcd leader within {timeout:?}\n{}", self.logs()),
        }
    }

    /// Every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- etcd {} (last 30 lines)\n", m.name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// (member id, leader id) of one member, asked inside its namespace through etcd's JSON
/// gateway (`POST /v3/maintenance/status`), with a 1 s bound.
fn status(m: &Member) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from((m.ip, CLIENT_PORT));
    let resp = in_netns(&m.ns.path(), move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        write!(
            s,
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .ok()?
    .ok()?;
    let body = resp.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    // uint64 fields come as JSON strings from the gateway.
    let num = |v: &serde_json::Value| -> Option<u64> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v.as_u64())
    };
    Some((
        num(&v["header"]["member_id"])?,
        num(&v["leader"]).unwrap_or(0),
    ))
}
