//! What the benchmark binaries (`src/bin/bench_*.rs`) share: knobs from the environment, the
//! simulated peers' leases, /proc readings of a process, waits on the overlay device, iperf3.

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use twill_dataplane::overlay::{Mac, Overlay, RtnlOverlay};
use twill_ipam::lease::LeaseAttrs;
use twill_ipam::store::LeaseStore;

use crate::cluster::{Cluster, ClusterOpts};

use crate::netns::TestNetns;

/// The number in environment variable `k`, `d` when unset or not a number.
pub fn env_u32(k: &str, d: u32) -> u32 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Peer i's subnet: 10.(100 + i/256).(i%256).0/24 (the benches' /8 network).
pub fn peer_subnet(i: u32) -> Ipv4Net {
    Ipv4Net::new(
        Ipv4Addr::new(10, 100 + (i / 256) as u8, (i % 256) as u8, 0),
        24,
    )
    .expect("prefix 24")
}

/// One node without pods (resync 300 s) whose network is the benches' /8 (10.0.0.0/8, /24s
/// from 10.1.0.0), so that [`peer_subnet`]s are valid leases: etcd's config and the cluster's
/// net-conf.json are rewritten, and every twilld started from now on matches them (the
/// running one still has 10.244/16). Returns the cluster and a store on its etcd.
pub async fn one_node_on_8() -> Result<(Cluster, LeaseStore)> {
    let c = Cluster::start(ClusterOpts {
        nodes: 1,
        pods_per_node: 0,
        resync: Duration::from_secs(300),
        ..ClusterOpts::default()
    })?;
    let store = LeaseStore::connect(c.etcd_options()).await?;
    let mut cfg = store.require_config().await?;
    cfg.network = "10.0.0.0/8".parse()?;
    cfg.subnet_min = Ipv4Addr::new(10, 1, 0, 0);
    cfg.subnet_max = Ipv4Addr::new(10, 255, 255, 0);
    store.put_config(&cfg, true).await?;
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        r#"{"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.1.0.0","SubnetMax":"10.255.255.0","Backend":{"Type":"vxlan","VNI":1}}"#,
    )?;
    Ok((c, store))
}

/// Peer i's lease: node `peer-<i>`, public IP 172.16.0.0 + i, VNI 1, its derived MAC.
pub fn peer_attrs(i: u32) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        &format!("peer-{i}"),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i),
        1,
        Mac::derive(&format!("peer-{i}")),
    )
}

/// A field of /proc/<pid>/status in KiB (`VmRSS:`, `VmHWM:`); `pid` may be `"self"`.
pub fn status_kib(pid: impl Display, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// utime + stime of `pid`, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/pid/stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_micros(
        (utime + stime) * 1_000_000 / hz.max(1),
    ))
}

/// The index of `twill.1`, once twilld has created it (10 s at most).
pub async fn vxlan_index(o: &RtnlOverlay) -> Result<u32> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = o.get_vxlan(1).await? {
            return Ok(l.index);
        }
        if Instant::now() > end {
            bail!("twill.1 did not appear");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When the device `idx` first holds `want` peer entries (routes + neighbours + FDB).
pub async fn wait_entries(
    o: &RtnlOverlay,
    idx: u32,
    want: usize,
    timeout: Duration,
) -> Result<Instant> {
    let end = Instant::now() + timeout;
    loop {
        let n = o.dump(idx).await.map(|p| p.len()).unwrap_or(0);
        if n >= want {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!("only {n} of {want} entries after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// TCP throughput (bits/s) of one iperf3 run of `secs` from `client` to `dst` in `server`.
pub fn iperf(client: &TestNetns, server: &TestNetns, dst: IpAddr, secs: u32) -> Result<f64> {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // The server's socket: poll for the listener (bounded), not a fixed sleep.
    let mut ok = false;
    for _ in 0..200 {
        let ss = server
            .exec("ss", &["-Hltn", "sport = :5201"])
            .unwrap_or_default();
        if !ss.trim().is_empty() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !ok {
        let _ = srv.kill();
        let _ = srv.wait();
        bail!("iperf3 server did not listen");
    }
    let out = client
        .command("timeout")
        .args([
            &(secs + 10).to_string(),
            "iperf3",
            "-c",
            &dst.to_string(),
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()?;
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in {v}"))
}
