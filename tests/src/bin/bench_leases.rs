//! Lease benchmark against one local etcd (started here, like the tests do). Not a test:
//! it prints numbers. Run with bench/leases/run.sh.
//!
//! 1. N concurrent acquisitions (default 200) in a /16 (255 subnets) and in a range of exactly
//!    N subnets: total time, etcd round trips per acquisition.
//! 2. List + watch of M leases (default 5000): time to the first full state, RSS.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use twill_ipam::lease::{LeaseAttrs, subnet_to_key};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::LeaseStore;
use twill_tests::bench::status_kib;
use twill_tests::etcd::EtcdServer;

fn attrs(i: u32) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        &format!("node-{i}"),
        std::net::Ipv4Addr::from(0xc0a8_0000 + i),
        1,
        format!("02:00:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff),
    )
}

async fn acquisitions(etcd: &EtcdServer, label: &str, cfg_json: &str, n: u32) -> Result<()> {
    let prefix = format!("/bench-{label}/network");
    let store = LeaseStore::connect(etcd.options(&prefix)).await?;
    let cfg = NetConfig::from_json(cfg_json)?;
    store.put_config(&cfg, true).await?;
    let rpc0 = store.rpc_count();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, cfg) = (store.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = store
                .acquire(&cfg, &attrs(i), Duration::from_secs(600))
                .await;
            (r, t.elapsed())
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        let (r, d) = t.await?;
        r.context("acquire")?;
        lat.push(d);
    }
    let total = t0.elapsed();
    let rpcs = store.rpc_count() - rpc0;
    lat.sort();
    println!(
        "acquire[{label}]: {n} concurrent acquisitions of {} subnets: total {:.0} ms, \
         {:.2} etcd round trips/acquisition, latency p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        cfg.subnet_count(),
        total.as_secs_f64() * 1e3,
        rpcs as f64 / f64::from(n),
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() * 99 / 100].as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3,
    );
    Ok(())
}

async fn list_and_watch(etcd: &EtcdServer, m: u32) -> Result<()> {
    let prefix = "/bench-watch/network";
    let store = LeaseStore::connect(etcd.options(prefix)).await?;
    let cfg = NetConfig::from_json(r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#)?;
    store.put_config(&cfg, true).await?;
    // Fill etcd with M leases (plain puts, 64 in flight; not measured).
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..m {
        let mut client = store.client().clone();
        let key = format!(
            "{}{}",
            store.subnets_prefix(),
            subnet_to_key(&cfg.subnet_at(u64::from(i)).expect("fits"))
        );
        let value = attrs(i).to_json();
        set.spawn(async move { client.put(key, value, None).await.map(|_| ()) });
        if set.len() >= 64 {
            set.join_next().await.expect("task")??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    eprintln!("filled {m} leases in {:.1} s", t0.elapsed().as_secs_f64());

    let rss0 = status_kib("self", "VmRSS:").unwrap_or(0);
    let t = Instant::now();
    let (leases, _) = store.list().await?;
    let list_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(leases.len(), m as usize);
    drop(leases);

    let t = Instant::now();
    let mut w = store.watch();
    w.wait_synced().await.context("watch")?;
    let synced_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(w.state().len(), m as usize);
    let rss1 = status_kib("self", "VmRSS:").unwrap_or(0);
    // One more change arrives through the watch.
    let t = Instant::now();
    store
        .acquire(&cfg, &attrs(m + 1), Duration::from_secs(60))
        .await?;
    loop {
        if let Some(twill_ipam::lease::LeaseEvent::Added(_)) = w.next().await {
            break;
        }
    }
    let event_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "watch: {m} leases: list {list_ms:.0} ms, watch to first full state (Synced) {synced_ms:.0} ms, \
         acquire→Added event {event_ms:.1} ms, RSS {} MiB before / {} MiB with the state (~{} bytes/lease)",
        rss0 / 1024,
        rss1 / 1024,
        (rss1.saturating_sub(rss0)) * 1024 / u64::from(m).max(1)
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let n: u32 = std::env::var("BENCH_ACQUIRERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let m: u32 = std::env::var("BENCH_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let etcd = EtcdServer::start()?;
    eprintln!(
        "etcd {} (pid {:?}, data dir {})",
        etcd.endpoint(),
        etcd.pid(),
        etcd.data_dir().display()
    );
    acquisitions(&etcd, "net16", r#"{"Network":"10.244.0.0/16"}"#, n).await?;
    let exact = format!(
        r#"{{"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.0.1.0","SubnetMax":"{}"}}"#,
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + n * 256)
    );
    acquisitions(&etcd, "exact", &exact, n).await?;
    list_and_watch(&etcd, m).await?;
    Ok(())
}
