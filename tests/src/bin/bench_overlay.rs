//! Overlay benchmark (not a test: it prints numbers). Run with bench/overlay/run.sh, which
//! builds release binaries and points TWILL_BIN_DIR at them.
//!
//! 1. Convergence: N (1,000) peer leases written to etcd → one twilld programs all 3N
//!    entries; against `ip -batch` + `bridge -batch` applying the same 3N entries in a fresh
//!    namespace, in the same run.
//! 2. A new lease → its route on the node: p50/p99 over J (100) joins, measured with netlink
//!    events from the write of the lease.
//! 3. twilld's RSS with N peers.
//! 4. iperf3 (bounded, -t T) pod↔pod across nodes against node↔node over the underlay.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use ipnet::Ipv4Net;
use twill_dataplane::overlay::{Mac, Monitor, MonitorEvent, Overlay, RtnlOverlay};
use twill_dataplane::{NetNs, Netlink};
use twill_ipam::lease::LeaseAttrs;
use twill_ipam::store::LeaseStore;
use twill_tests::cluster::{Cluster, ClusterOpts, Ns, unique_prefix};

fn env_u32(k: &str, d: u32) -> u32 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Peer i: subnet 10.244.(i/256+100).(i%256)... as /24s from 10.244.100.0 upward would run out
/// at 155; use a /8-sized network instead: 10.(100 + i/256).(i%256).0/24.
fn peer_subnet(i: u32) -> Ipv4Net {
    Ipv4Net::new(
        Ipv4Addr::new(10, 100 + (i / 256) as u8, (i % 256) as u8, 0),
        24,
    )
    .unwrap()
}

fn peer_attrs(i: u32) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        &format!("peer-{i}"),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i),
        1,
        &Mac::derive(&format!("peer-{i}")).to_string(),
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn count_entries(o: &RtnlOverlay, idx: u32) -> usize {
    o.dump(idx).await.map(|p| p.len()).unwrap_or(0)
}

async fn wait_entries(
    o: &RtnlOverlay,
    idx: u32,
    want: usize,
    timeout: Duration,
) -> Result<Instant> {
    let end = Instant::now() + timeout;
    loop {
        if count_entries(o, idx).await >= want {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!(
                "only {} of {want} entries after {timeout:?}",
                count_entries(o, idx).await
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn vxlan_index(o: &RtnlOverlay) -> Result<u32> {
    for _ in 0..500 {
        if let Some(l) = o.get_vxlan(1).await? {
            return Ok(l.index);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("twill.1 did not appear")
}

/// The `elapsed_us` of twilld's first "reconciled" log line with ≥ `ops` ops.
fn reconcile_us_from_log(log: &str, ops: usize) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("reconciled"))
        .find_map(|l| {
            let n: usize = l
                .split("ops=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            if n < ops {
                return None;
            }
            l.split("elapsed_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// `ip -batch` (neighbours, routes) + `bridge -batch` (FDB) of the same entries in a fresh
/// namespace with a VXLAN device like twilld's: wall time of the two processes.
fn ip_batch(n: u32) -> Result<Duration> {
    let ns = Ns::new(format!("{}-ipb", unique_prefix()))?;
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"])?;
    ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "u0"])?;
    ns.ip(&["link", "set", "u0", "up"])?;
    ns.ip(&[
        "link",
        "add",
        "twill.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "u0",
        "dstport",
        "8472",
        "nolearning",
        "local",
        "192.168.77.1",
    ])?;
    ns.ip(&["addr", "add", "10.244.1.0/32", "dev", "twill.1"])?;
    ns.ip(&["link", "set", "twill.1", "up"])?;
    let dir = tempfile::tempdir()?;
    let mut ipb = String::new();
    let mut brb = String::new();
    for i in 0..n {
        let s = peer_subnet(i);
        let a = peer_attrs(i);
        let mac = a.vtep_mac();
        brb.push_str(&format!(
            "fdb replace {mac} dev twill.1 dst {} self permanent\n",
            a.public_ip
        ));
        ipb.push_str(&format!(
            "neigh replace {} lladdr {mac} dev twill.1 nud permanent\n",
            s.network()
        ));
        ipb.push_str(&format!(
            "route replace {s} via {} dev twill.1 onlink\n",
            s.network()
        ));
    }
    let ipf = dir.path().join("ip.batch");
    let brf = dir.path().join("bridge.batch");
    std::fs::write(&ipf, ipb)?;
    std::fs::write(&brf, brb)?;
    let t0 = Instant::now();
    let st = ns
        .command("bridge")
        .args(["-batch", &brf.display().to_string()])
        .stdout(Stdio::null())
        .status()?;
    let st2 = ns
        .command("ip")
        .args(["-batch", &ipf.display().to_string()])
        .stdout(Stdio::null())
        .status()?;
    let took = t0.elapsed();
    if !st.success() || !st2.success() {
        bail!("ip/bridge -batch failed");
    }
    let routes = ns.ip(&["route", "show", "dev", "twill.1"])?.lines().count();
    if routes != n as usize {
        bail!("ip -batch left {routes} routes, want {n}");
    }
    Ok(took)
}

fn iperf(client: &Ns, server: &Ns, dst: IpAddr, secs: u32) -> Result<f64> {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .command("iperf3")
        .args([
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    twill_tests::cluster::require_root();
    let n = env_u32("BENCH_PEERS", 1000);
    let joins = env_u32("BENCH_JOINS", 100);
    let iperf_secs = env_u32("BENCH_IPERF_SECS", 5);
    println!("overlay benchmark: {n} peers, {joins} joins, iperf3 -t {iperf_secs}");

    // ---------- 1. convergence ----------
    let mut c = Cluster::start(ClusterOpts {
        nodes: 1,
        pods_per_node: 0,
        resync: Duration::from_secs(300),
        ..ClusterOpts::default()
    })?;
    // The peers' subnets are outside 10.244/16: the config must allow them. Use a /8 network
    // only for the bench: rewrite etcd's config before writing the peers.
    let store = LeaseStore::connect(c.etcd_options()).await?;
    let mut cfg = store.require_config().await?;
    cfg.network = "10.0.0.0/8".parse()?;
    cfg.subnet_min = Ipv4Addr::new(10, 1, 0, 0);
    cfg.subnet_max = Ipv4Addr::new(10, 255, 255, 0);
    store.put_config(&cfg, true).await?;

    let netns = NetNs::open(c.nodes[0].ns.path())?;
    let o = RtnlOverlay::new(Netlink::open(&netns)?);
    let idx = vxlan_index(&o).await?;

    let t_write0 = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move { store.reserve(peer_subnet(i), &peer_attrs(i)).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let t_written = Instant::now();
    let t_done = wait_entries(&o, idx, 3 * n as usize, Duration::from_secs(60)).await?;
    let write = t_written - t_write0;
    let total = t_done - t_write0;
    let lag = t_done.saturating_duration_since(t_written);

    let pid = c.nodes[0].daemon.as_ref().and_then(|d| d.pid()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rss_running = rss_kib(pid);

    // A fresh node joining a cluster of N: twilld start → all 3N entries programmed. Its
    // --net-conf must match the (bench-only) /8 config now in etcd.
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        r#"{"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.1.0.0","SubnetMax":"10.255.255.0","Backend":{"Type":"vxlan","VNI":1}}"#,
    )?;
    let t_start = Instant::now();
    let j = c.add_node()?;
    let netns2 = NetNs::open(c.nodes[j].ns.path())?;
    let o2 = RtnlOverlay::new(Netlink::open(&netns2)?);
    let idx2 = vxlan_index(&o2).await?;
    let t_done2 = wait_entries(&o2, idx2, 3 * n as usize, Duration::from_secs(60)).await?;
    let fresh_total = t_done2 - t_start;
    std::thread::sleep(Duration::from_millis(300));
    let fresh_reconcile = reconcile_us_from_log(&c.nodes[j].log_text(), 3 * n as usize);
    let pid2 = c.nodes[j].daemon.as_ref().and_then(|d| d.pid()).unwrap();
    let rss_fresh = rss_kib(pid2);

    let mut batch = Vec::new();
    for _ in 0..3 {
        batch.push(ip_batch(n)?);
    }
    batch.sort();
    let batch_med = batch[1];

    println!("\n## 1. convergence ({n} peer leases = {} entries)", 3 * n);
    println!("lease writes ({n} txns, 64 in flight): {write:?}");
    println!(
        "running twilld: first write → all entries programmed: {total:?} (after the last write: {lag:?})"
    );
    println!("fresh node: twilld start → all entries programmed: {fresh_total:?}");
    match fresh_reconcile {
        Some(us) => println!(
            "fresh node: the reconcile itself (dump + diff + {} netlink writes): {:.1} ms",
            3 * n,
            us as f64 / 1000.0
        ),
        None => println!("fresh node: reconcile time not found in the log"),
    }
    println!("ip -batch + bridge -batch of the same entries: {batch:?} (median {batch_med:?})");
    if let Some(us) = fresh_reconcile {
        println!(
            "ratio twilld reconcile / ip -batch: {:.2} (target <= 1.5)",
            Duration::from_micros(us).as_secs_f64() / batch_med.as_secs_f64()
        );
    }
    println!(
        "ratio twilld start→programmed / ip -batch: {:.2}",
        fresh_total.as_secs_f64() / batch_med.as_secs_f64()
    );

    // ---------- 3. RSS ----------
    println!("\n## 3. twilld RSS with {n} peers");
    println!(
        "running node: {:.1} MiB; fresh node: {:.1} MiB (target <= 15 MiB)",
        rss_running as f64 / 1024.0,
        rss_fresh as f64 / 1024.0
    );

    // ---------- 2. join latency ----------
    let mut mon = Monitor::open(&netns)?;
    let mut lat = Vec::new();
    let mut i = n;
    for _ in 0..joins {
        i += 1;
        let subnet = peer_subnet(i);
        if store.get(&subnet).await?.is_some() {
            continue; // the fresh node's random subnet
        }
        let t0 = Instant::now();
        store.reserve(subnet, &peer_attrs(i)).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ev = tokio::time::timeout_at(deadline, mon.next())
                .await
                .context("route event within 5 s")?
                .context("monitor closed")?;
            if let MonitorEvent::RouteUp { link, route } = ev
                && link == idx
                && route.dst == subnet
            {
                lat.push(t0.elapsed());
                break;
            }
        }
    }
    lat.sort();
    println!(
        "\n## 2. new lease → route on the node ({joins} joins, {} peers present)",
        n
    );
    println!(
        "p50 {:?}  p90 {:?}  p99 {:?}  max {:?} (target p99 <= 200 ms)",
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        lat[lat.len() - 1]
    );
    drop(mon);
    drop(c);

    // ---------- 4. iperf3 ----------
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        ..ClusterOpts::default()
    })?;
    let _ = &mut c;
    let mut pod = Vec::new();
    let mut node = Vec::new();
    for _ in 0..3 {
        node.push(iperf(
            &c.nodes[0].ns,
            &c.nodes[1].ns,
            IpAddr::V4(c.nodes[1].ip),
            iperf_secs,
        )?);
        pod.push(iperf(
            &c.nodes[0].pods[0].ns,
            &c.nodes[1].pods[0].ns,
            IpAddr::V4(c.nodes[1].pods[0].ip),
            iperf_secs,
        )?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let gb = |x: f64| x / 1e9;
    println!("\n## 4. iperf3 -t {iperf_secs}, 3 alternating runs each");
    println!(
        "node↔node underlay: {:?} Gbit/s",
        node.iter()
            .map(|x| format!("{:.2}", gb(*x)))
            .collect::<Vec<_>>()
    );
    println!(
        "pod↔pod via VXLAN:  {:?} Gbit/s",
        pod.iter()
            .map(|x| format!("{:.2}", gb(*x)))
            .collect::<Vec<_>>()
    );
    let (mn, mp) = (med(&mut node), med(&mut pod));
    println!(
        "median node {:.2} Gbit/s, pod {:.2} Gbit/s, ratio {:.2} (target >= 0.85)",
        gb(mn),
        gb(mp),
        mp / mn
    );
    Ok(())
}
