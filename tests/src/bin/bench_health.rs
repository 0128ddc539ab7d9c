//! Peer-health benchmark (not a test: it prints numbers). Run with bench/health/run.sh, which
//! builds release binaries and points TWILL_BIN_DIR at them.
//!
//! One real twilld in a node namespace of the cluster harness, a real etcd holding N (1,000)
//! peer leases of simulated nodes (no process behind them: their VTEPs never answer, so
//! every probe is sent, times out and counts as lost — the prober's full work without the
//! answer path). Phases, each a fresh twilld with the N leases present at start, the order
//! on → off → on → cap:
//! - **on**: twilld's defaults (`--health-interval 5s`, `--health-max-rate 200`);
//! - **off**: `--health-interval 0` (peer health disabled), the reference;
//! - then **cap**: `--health-interval 1s`, which asks for N probes/s: the rate must stay at
//!   `--health-max-rate`.
//!
//! After a warm-up (every peer probed three times, so all are declared unreachable), over a
//! fixed window: twilld's CPU time (`/proc/<pid>/stat` utime + stime), its RSS (`VmRSS`
//! sampled every second: mean and max; `VmHWM` at the end) and the probes it sent
//! (`twill_health_probes_total` from /metrics, against `--health-max-rate`). The VXLAN
//! packets go to the simulated peers' PublicIPs (172.16.x.x), which nothing routes: the
//! underlay namespace, which does not forward, drops them. Namespaces and etcd go away when
//! the benchmark ends, also on an error (no panics: every failure is an `Err` out of main).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use twill_dataplane::overlay::RtnlOverlay;
use twill_dataplane::{NetNs, Netlink};
use twill_tests::bench::{
    cpu_time, env_u32, one_node_on_8, peer_attrs, peer_subnet, status_kib, vxlan_index,
    wait_entries,
};
use twill_tests::cluster::{Cluster, metric};

struct Phase {
    name: &'static str,
    cpu_pct: f64,
    rss_mean_mib: f64,
    rss_max_mib: f64,
    hwm_mib: f64,
    probes_per_s: f64,
    lost_per_s: f64,
    unreachable: f64,
}

async fn phase(
    c: &mut Cluster,
    o: &RtnlOverlay,
    name: &'static str,
    extra: &[&str],
    peers: u32,
    warmup: Duration,
    window: Duration,
) -> Result<Phase> {
    c.nodes[0].stop_daemon()?;
    c.start_daemon_with(0, &twill_tests::bins::bin("twilld"), extra, &[])?;
    c.wait_ready(0, Duration::from_secs(30))?;
    let idx = vxlan_index(o).await?;
    wait_entries(o, idx, 3 * peers as usize, Duration::from_secs(60)).await?;
    let pid = c.nodes[0]
        .daemon
        .as_ref()
        .and_then(|d| d.pid())
        .context("twilld pid")?;
    tokio::time::sleep(warmup).await;

    let m0 = c.nodes[0].metrics();
    let p0 = metric(&m0, "twill_health_probes_total").unwrap_or(0.0);
    let l0 = metric(&m0, "twill_health_probes_lost_total").unwrap_or(0.0);
    let cpu0 = cpu_time(pid)?.as_secs_f64();
    let t0 = Instant::now();
    let mut rss = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while t0.elapsed() < window {
        tick.tick().await;
        rss.push(status_kib(pid, "VmRSS:")?);
    }
    let cpu1 = cpu_time(pid)?.as_secs_f64();
    let wall = t0.elapsed().as_secs_f64();
    let m1 = c.nodes[0].metrics();
    let p1 = metric(&m1, "twill_health_probes_total").unwrap_or(0.0);
    let l1 = metric(&m1, "twill_health_probes_lost_total").unwrap_or(0.0);
    let hwm = status_kib(pid, "VmHWM:")?;
    let mib = |k: u64| k as f64 / 1024.0;
    Ok(Phase {
        name,
        cpu_pct: (cpu1 - cpu0) / wall * 100.0,
        rss_mean_mib: mib(rss.iter().sum::<u64>() / rss.len().max(1) as u64),
        rss_max_mib: mib(rss.iter().copied().max().unwrap_or(0)),
        hwm_mib: mib(hwm),
        probes_per_s: (p1 - p0) / wall,
        lost_per_s: (l1 - l0) / wall,
        unreachable: metric(&m1, "twill_peers_unreachable").unwrap_or(0.0),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    twill_tests::cluster::require_root();
    let peers = env_u32("BENCH_PEERS", 1000);
    let window = Duration::from_secs(env_u32("BENCH_WINDOW_SECS", 60).into());
    let max_rate = env_u32("BENCH_MAX_RATE", 200);
    let interval = Duration::from_secs(5);
    // Three rounds of probes to every peer (so all are unreachable), then the timeout.
    let round = interval.max(Duration::from_secs(1) * peers / max_rate.max(1));
    let warmup = Duration::from_secs(env_u32("BENCH_WARMUP_SECS", 0).into());
    let warmup = if warmup.is_zero() {
        round * 3 + Duration::from_secs(2)
    } else {
        warmup
    };
    println!(
        "peer-health benchmark: {peers} simulated peers (none answer), --health-interval 5s \
         --health-max-rate {max_rate}, warm-up {warmup:?}, window {window:?}"
    );

    // Every restarted twilld's --net-conf matches the bench-only /8 config.
    let (mut c, store) = one_node_on_8().await?;
    let results: Vec<_> = futures::stream::iter(0..peers)
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
    let netns = NetNs::open(c.nodes[0].ns.path())?;
    let o = RtnlOverlay::new(Netlink::open(&netns)?);

    let rate = max_rate.to_string();
    let on: Vec<&str> = vec!["--health-max-rate", &rate];
    let off: Vec<&str> = vec!["--health-interval", "0"];
    // The cap: an interval of 1 s asks for one probe per peer per second, far more than
    // --health-max-rate at 1,000 peers; the rate must stay at the cap.
    let cap: Vec<&str> = vec!["--health-max-rate", &rate, "--health-interval", "1s"];
    let mut phases = Vec::new();
    for (name, extra) in [("on", &on), ("off", &off), ("on", &on), ("cap", &cap)] {
        let p = phase(&mut c, &o, name, extra, peers, warmup, window).await?;
        println!(
            "{:>3}: CPU {:.2} % of one core, RSS mean {:.1} MiB max {:.1} MiB (VmHWM {:.1} MiB), \
             probes {:.1}/s, lost {:.1}/s, unreachable {}",
            p.name,
            p.cpu_pct,
            p.rss_mean_mib,
            p.rss_max_mib,
            p.hwm_mib,
            p.probes_per_s,
            p.lost_per_s,
            p.unreachable
        );
        phases.push(p);
    }
    let on_cpu = (phases[0].cpu_pct + phases[2].cpu_pct) / 2.0;
    let on_rss = phases[0].rss_max_mib.max(phases[2].rss_max_mib);
    let on_rate = (phases[0].probes_per_s + phases[2].probes_per_s) / 2.0;
    let off = &phases[1];
    println!("\n## summary ({peers} peers)");
    println!(
        "CPU: health on {on_cpu:.2} % of one core, off {:.2} %: probing costs {:.2} points \
         (ratio {:.2})",
        off.cpu_pct,
        on_cpu - off.cpu_pct,
        on_cpu / off.cpu_pct.max(0.01)
    );
    println!(
        "RSS max: on {on_rss:.1} MiB, off {:.1} MiB (ratio {:.2})",
        off.rss_max_mib,
        on_rss / off.rss_max_mib.max(0.01)
    );
    println!(
        "probes: {on_rate:.1}/s against --health-max-rate {max_rate} (ratio {:.3}); off: {:.1}/s",
        on_rate / f64::from(max_rate),
        off.probes_per_s
    );
    let cap = &phases[3];
    println!(
        "cap (--health-interval 1s asks for {peers}/s): {:.1} probes/s (ratio to the cap {:.3}), \
         CPU {:.2} % of one core, RSS max {:.1} MiB",
        cap.probes_per_s,
        cap.probes_per_s / f64::from(max_rate),
        cap.cpu_pct,
        cap.rss_max_mib
    );
    drop(c);
    Ok(())
}
