//! Overlay benchmark (not a test: it prints numbers). Run with bench/overlay/run.sh, which
//! builds release binaries and points TWILL_BIN_DIR at them.
//!
//! One real etcd, N (BENCH_PEERS, 1,000; 5,000 for the scale run) peer leases, each with
//! an etcd lease of its own kept alive by a simulated holder (one keep-alive per lease
//! every TTL/3, as twilld's holder does), one real twilld per node:
//! 1. Convergence: the N leases written → a running twilld programs all 3N entries; a
//!    fresh node (twilld exec → all 3N programmed, and its first reconcile alone) against
//!    `ip -batch` + `bridge -batch` applying the same 3N entries in a fresh namespace, in
//!    the same run.
//! 2. A new lease → its route on the node, and a deleted lease → its route gone: p50/p99
//!    over J (BENCH_JOINS, 100) joins and leaves, timed with netlink events.
//! 3. twilld's RSS with N peers; etcd's RSS and CPU time (from /proc/<etcd pid>): for the
//!    writes, and per second of steady state with the keep-alives running.
//! 4. A full re-list after a compaction: the node's etcd connections are cut (its own
//!    namespace only), a marker lease is written and etcd compacted past the watch, the
//!    connections come back: time and twilld CPU until the marker's route is there, and
//!    no other kernel entry changed.
//! 5. iperf3 (bounded, -t T; BENCH_IPERF_SECS=0 skips it) pod↔pod across nodes against
//!    node↔node over the underlay.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use ipnet::Ipv4Net;
use twill_dataplane::overlay::{Monitor, MonitorEvent, Overlay, RtnlOverlay};
use twill_dataplane::{NetNs, Netlink};
use twill_ipam::store::backend::{Guard, Put, Written};
use twill_tests::bench::{
    cpu_time, env_u32, iperf, one_node_on_8, peer_attrs, peer_subnet, status_kib, vxlan_index,
    wait_entries,
};
use twill_tests::cluster::{Cluster, ClusterOpts, unique_prefix};
use twill_tests::netns::TestNetns;

/// Waits (5 s at most) for the monitor's event of the route to `subnet` on device `idx`:
/// its arrival if `up`, else its removal.
async fn wait_route(mon: &mut Monitor, idx: u32, subnet: Ipv4Net, up: bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ev = tokio::time::timeout_at(deadline, mon.next())
            .await
            .with_context(|| format!("route {subnet} (up: {up}) within 5 s"))?
            .context("monitor closed")?;
        let (link, route) = match ev {
            MonitorEvent::RouteUp { link, route } if up => (link, route),
            MonitorEvent::RouteGone { link, route } if !up => (link, route),
            _ => continue,
        };
        if link == idx && route.dst == subnet {
            return Ok(());
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The simulated holders: one etcd lease per peer key, kept alive by one keep-alive per
/// lease every `ttl / 3` (what twilld's LeaseHolder does), 64 in flight.
fn spawn_keepalives(
    client: etcd_client::Client,
    ids: Vec<i64>,
    ttl: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            futures::stream::iter(ids.iter().copied())
                .for_each_concurrent(64, |id| {
                    let mut c = client.clone();
                    let counter = counter.clone();
                    async move {
                        if let Ok((mut k, mut st)) = c.lease_keep_alive(id).await
                            && k.keep_alive().await.is_ok()
                            && st.message().await.is_ok()
                        {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
                .await;
        }
    });
    (task, sent)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// "p50 ..  p90 ..  p99 ..  max .." of sorted latencies.
fn spread(sorted: &[Duration]) -> String {
    format!(
        "p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        pct(sorted, 0.5),
        pct(sorted, 0.9),
        pct(sorted, 0.99),
        sorted[sorted.len() - 1]
    )
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
    let ns = TestNetns::named(format!("{}-ipb", unique_prefix()))?;
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    twill_tests::cluster::require_root();
    let n = env_u32("BENCH_PEERS", 1000);
    let joins = env_u32("BENCH_JOINS", 100);
    let iperf_secs = env_u32("BENCH_IPERF_SECS", 5);
    let ttl = Duration::from_secs(env_u32("BENCH_LEASE_TTL", 60).into());
    let steady = Duration::from_secs(env_u32("BENCH_STEADY_SECS", 40).into());
    if n > 19 * 256 + 255 {
        bail!("BENCH_PEERS={n}: at most {} peers fit", 19 * 256 + 255);
    }
    println!(
        "overlay benchmark: {n} peers (etcd leases, TTL {ttl:?}, kept alive every {:?}), {joins} joins, iperf3 -t {iperf_secs}",
        ttl / 3
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());

    // ---------- 1. convergence ----------
    // The peers' subnets are outside 10.244/16: the config must allow them. Use a /8 network
    // only for the bench, before writing the peers.
    let (mut c, store) = one_node_on_8().await?;
    let etcd_pid = c.etcd.pid().context("etcd pid")?;
    let client = store.client().clone();
    // twilld validates peers against the config it started with: restart node 1 on the /8
    // (its --net-conf, and every later node's, matches what etcd has now).
    c.nodes[0].stop_daemon()?;
    c.start_daemon(0)?;
    c.wait_ready(0, Duration::from_secs(20))?;

    let netns = NetNs::open(c.nodes[0].ns.path())?;
    let o = RtnlOverlay::new(Netlink::open(&netns)?);
    let idx = vxlan_index(&o).await?;

    let pid = c.nodes[0].daemon.as_ref().and_then(|d| d.pid()).unwrap();
    let rss_base = status_kib(pid, "VmRSS:").unwrap_or(0);
    let etcd_cpu0 = cpu_time(etcd_pid).unwrap_or_default();
    let etcd_rss0 = status_kib(etcd_pid, "VmRSS:").unwrap_or(0);
    let t_write0 = Instant::now();
    // Each simulated holder: an etcd lease with the TTL, the lease key put under it.
    let results: Vec<Result<i64>> = futures::stream::iter(0..n)
        .map(|i| {
            let mut cl = client.clone();
            let key = store.lease_key(&peer_subnet(i));
            async move {
                let id = cl.lease_grant(ttl.as_secs() as i64, None).await?.id();
                cl.put(
                    key,
                    peer_attrs(i).to_json(),
                    Some(etcd_client::PutOptions::new().with_lease(id)),
                )
                .await?;
                Ok(id)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut ids = Vec::with_capacity(n as usize);
    for r in results {
        ids.push(r?);
    }
    let t_written = Instant::now();
    let t_done = match wait_entries(&o, idx, 3 * n as usize, Duration::from_secs(120)).await {
        Ok(t) => t,
        Err(e) => {
            let log = c.nodes[0].log_text();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" DEBUG "))
                .rev()
                .take(30)
                .collect();
            bail!(
                "{e}; twilld's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    };
    let write = t_written - t_write0;
    let total = t_done - t_write0;
    let lag = t_done.saturating_duration_since(t_written);
    let etcd_cpu_writes = cpu_time(etcd_pid)
        .unwrap_or_default()
        .saturating_sub(etcd_cpu0);
    let (keepalive_task, keepalives) = spawn_keepalives(client.clone(), ids, ttl);

    std::thread::sleep(Duration::from_millis(500));
    let rss_running = status_kib(pid, "VmRSS:").unwrap_or(0);
    let (anon_running, hwm_running) = (
        status_kib(pid, "RssAnon:").unwrap_or(0),
        status_kib(pid, "VmHWM:").unwrap_or(0),
    );

    // A fresh node joining a cluster of N: twilld start → all 3N entries programmed.
    let t_start = Instant::now();
    let j = c.add_node()?;
    let netns2 = NetNs::open(c.nodes[j].ns.path())?;
    let o2 = RtnlOverlay::new(Netlink::open(&netns2)?);
    let idx2 = vxlan_index(&o2).await?;
    let t_done2 = wait_entries(&o2, idx2, 3 * n as usize, Duration::from_secs(120)).await?;
    let fresh_total = t_done2 - t_start;
    std::thread::sleep(Duration::from_millis(300));
    let fresh_reconcile = reconcile_us_from_log(&c.nodes[j].log_text(), 3 * n as usize);
    let pid2 = c.nodes[j].daemon.as_ref().and_then(|d| d.pid()).unwrap();
    let rss_fresh = status_kib(pid2, "VmRSS:").unwrap_or(0);
    let (anon_fresh, file_fresh) = (
        status_kib(pid2, "RssAnon:").unwrap_or(0),
        status_kib(pid2, "RssFile:").unwrap_or(0),
    );

    let mut batch = Vec::new();
    for _ in 0..3 {
        batch.push(ip_batch(n)?);
    }
    batch.sort();
    let batch_med = batch[1];

    println!("\n## 1. convergence ({n} peer leases = {} entries)", 3 * n);
    println!("lease writes ({n} × lease grant + put, 64 in flight): {write:?}");
    println!(
        "running twilld: first write → all entries programmed: {total:?} (after the last write: {lag:?})"
    );
    println!("fresh node (cold start): twilld exec → all entries programmed: {fresh_total:?}");
    match fresh_reconcile {
        Some(us) => println!(
            "fresh node: the reconcile itself (dump + diff + peer set + {} netlink writes): {:.1} ms",
            3 * n,
            us as f64 / 1000.0
        ),
        None => println!("fresh node: reconcile time not found in the log"),
    }
    println!("ip -batch + bridge -batch of the same entries: {batch:?} (median {batch_med:?})");
    if let Some(us) = fresh_reconcile {
        println!(
            "ratio twilld reconcile / ip -batch: {:.2} (goal <= 1.0)",
            Duration::from_micros(us).as_secs_f64() / batch_med.as_secs_f64()
        );
    }
    println!(
        "ratio twilld exec→programmed / ip -batch: {:.2}",
        fresh_total.as_secs_f64() / batch_med.as_secs_f64()
    );

    // ---------- 3. RSS, etcd ----------
    println!("\n## 3. memory and etcd with {n} peers");
    println!(
        "twilld RSS: {:.1} MiB with no peers; running node {:.1} MiB; fresh node {:.1} MiB (goal <= 12 MiB); {:.2} KiB per peer (fresh node over the empty one)",
        mib(rss_base),
        mib(rss_running),
        mib(rss_fresh),
        rss_fresh.saturating_sub(rss_base) as f64 / f64::from(n.max(1))
    );
    println!(
        "fresh node RSS split: {:.1} MiB anonymous (heap, stacks), {:.1} MiB file-backed (the binary's pages); peak (VmHWM) {:.1} MiB",
        mib(anon_fresh),
        mib(file_fresh),
        mib(status_kib(pid2, "VmHWM:").unwrap_or(0))
    );
    println!(
        "running node: {:.1} MiB anonymous; peak (VmHWM) {:.1} MiB",
        mib(anon_running),
        mib(hwm_running)
    );
    let ka0 = keepalives.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_s0 = cpu_time(etcd_pid).unwrap_or_default();
    let t_s0 = Instant::now();
    tokio::time::sleep(steady).await;
    let cpu_steady = cpu_time(etcd_pid)
        .unwrap_or_default()
        .saturating_sub(cpu_s0);
    let secs = t_s0.elapsed().as_secs_f64();
    println!(
        "after {:.0} s steady: running node {:.1} MiB, fresh node {:.1} MiB ({:.1} MiB anonymous)",
        secs,
        mib(status_kib(pid, "VmRSS:").unwrap_or(0)),
        mib(status_kib(pid2, "VmRSS:").unwrap_or(0)),
        mib(status_kib(pid2, "RssAnon:").unwrap_or(0))
    );
    let ka = keepalives.load(std::sync::atomic::Ordering::Relaxed) - ka0;
    let etcd_rss = status_kib(etcd_pid, "VmRSS:").unwrap_or(0);
    println!(
        "etcd RSS: {:.1} MiB before the peers, {:.1} MiB with {n} leases and their keep-alives",
        mib(etcd_rss0),
        mib(etcd_rss)
    );
    println!(
        "etcd CPU for the {n} lease writes and both twillds' lists: {:.2} s",
        etcd_cpu_writes.as_secs_f64()
    );
    println!(
        "etcd CPU in steady state: {:.1} % of one core over {secs:.0} s ({:.0} keep-alives/s)",
        100.0 * cpu_steady.as_secs_f64() / secs,
        ka as f64 / secs
    );

    // ---------- 2. join and leave latency ----------
    let mut mon = Monitor::open(&netns)?;
    let mut lat = Vec::new();
    // The etcd write alone (the transaction's answer), the floor under every join.
    let mut acks = Vec::new();
    // From the write's answer to the route: etcd's watch delivery and twilld's own work
    // (zero when the route was there before the answer reached the benchmark).
    let mut after_ack = Vec::new();
    let mut joined = Vec::new();
    let mut i = n;
    for _ in 0..joins {
        i += 1;
        let subnet = peer_subnet(i);
        if store.get(&subnet).await?.is_some() {
            continue; // the fresh node's random subnet
        }
        // A join is the one transaction that creates the lease (what a node's acquisition
        // ends with; its reads and the etcd lease grant come before and are not the join).
        let put = Put {
            key: store.lease_key(&subnet),
            value: peer_attrs(i).to_json(),
            lease: 0,
        };
        let t0 = Instant::now();
        let w = store
            .backend()
            .put_if(Guard::Absent, vec![put], None)
            .await?;
        acks.push(t0.elapsed());
        anyhow::ensure!(
            matches!(w, Written::Done { .. }),
            "{subnet} was taken meanwhile"
        );
        wait_route(&mut mon, idx, subnet, true).await?;
        let t = t0.elapsed();
        lat.push(t);
        after_ack.push(t.saturating_sub(*acks.last().expect("pushed above")));
        joined.push(subnet);
    }
    let mut leave = Vec::new();
    for subnet in &joined {
        let t0 = Instant::now();
        store.release(*subnet).await?;
        wait_route(&mut mon, idx, *subnet, false).await?;
        leave.push(t0.elapsed());
    }
    lat.sort();
    leave.sort();
    println!(
        "\n## 2. new lease written (one etcd transaction) → route on the node ({} joins, {n} peers present)",
        lat.len()
    );
    println!("{} (goal p99 <= 5 ms)", spread(&lat));
    acks.sort();
    println!(
        "of which the etcd write itself (the transaction → its answer): {}",
        spread(&acks)
    );
    after_ack.sort();
    println!(
        "after the write's answer (etcd's watch delivery + twilld): {}",
        spread(&after_ack)
    );
    println!("deleted lease → route gone ({} leaves)", leave.len());
    println!("{}", spread(&leave));

    // ---------- 4. re-list after compaction ----------
    // Cut node 1's etcd connections inside its own namespace: new connections to the proxy
    // are refused, open ones aborted (ss -K).
    let ns1 = &c.nodes[0].ns;
    ns1.exec(
        "nft",
        &[
            "add table inet twbenchcut; add chain inet twbenchcut out { type filter hook output priority 0; }; add rule inet twbenchcut out tcp dport 2379 tcp flags syn reject with tcp reset",
        ],
    )?;
    let log_before = c.nodes[0].log_text().len();
    ns1.exec("ss", &["-K", "dst", "127.0.0.1", "dport", "=", "2379"])?;
    let broke = twill_tests::cluster::wait_for(Duration::from_secs(20), || {
        c.nodes[0].log_text()[log_before..]
            .contains("lease watch stream")
            .then_some(())
    });
    if broke.is_none() {
        bail!("twilld's lease watch did not notice the cut");
    }
    // The last leave's neighbour and FDB deletions are not part of what follows.
    while mon.try_next().is_some() {}
    let before = o.dump(idx).await?;
    let marker = peer_subnet(n + joins + 50);
    let marker_mac = peer_attrs(n + joins + 50).vtep_mac().to_string();
    // Two writes: the watch resumes from the revision after the last it saw, which must
    // be below the compaction for etcd to cancel it.
    store.reserve(marker, &peer_attrs(n + joins + 50)).await?;
    store.reserve(marker, &peer_attrs(n + joins + 50)).await?;
    let (_, rev) = store.list().await?;
    client.clone().compact(rev, None).await?;
    let cpu_r0 = cpu_time(pid).unwrap_or_default();
    let t_r0 = Instant::now();
    ns1.exec("nft", &["delete table inet twbenchcut"])?;
    let mut other_changes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ev = tokio::time::timeout_at(deadline, mon.next())
            .await
            .context("the marker's route within 60 s of the re-list")?
            .context("monitor closed")?;
        match ev {
            MonitorEvent::RouteUp { link, route } if link == idx && route.dst == marker => break,
            // The marker's own neighbour and FDB entry come first.
            MonitorEvent::NeighUp { neigh, .. } if neigh.ip == marker.network() => {}
            MonitorEvent::FdbUp { fdb, .. } if fdb.mac.to_string() == marker_mac => {}
            ev @ (MonitorEvent::RouteUp { link, .. }
            | MonitorEvent::RouteGone { link, .. }
            | MonitorEvent::NeighUp { link, .. }
            | MonitorEvent::NeighGone { link, .. }
            | MonitorEvent::FdbUp { link, .. }
            | MonitorEvent::FdbGone { link, .. })
                if link == idx =>
            {
                other_changes.push(ev)
            }
            _ => {}
        }
    }
    let relist = t_r0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let relist_cpu = cpu_time(pid).unwrap_or_default().saturating_sub(cpu_r0);
    let mut after = o.dump(idx).await?;
    after.neighs.retain(|x| x.ip != marker.network());
    after.routes.retain(|x| x.dst != marker);
    after.fdbs.retain(|x| x.mac.to_string() != marker_mac);
    let log = c.nodes[0].log_text();
    let relisted = log[log_before..].contains("compacted: re-listing");
    println!("\n## 4. full re-list after a compaction ({n} peers)");
    println!(
        "watch cancelled as compacted and re-listed: {relisted}; connections back → marker route programmed: {relist:?}; twilld CPU meanwhile {:.0} ms",
        relist_cpu.as_secs_f64() * 1000.0
    );
    println!(
        "kernel entries other than the marker's: {} (must be unchanged); netlink events for other entries meanwhile: {} {:?}",
        if after.owned() == before.owned() {
            "unchanged"
        } else {
            "CHANGED"
        },
        other_changes.len(),
        other_changes.iter().take(4).collect::<Vec<_>>()
    );
    keepalive_task.abort();
    drop(mon);
    drop(c);
    if iperf_secs == 0 {
        return Ok(());
    }

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
