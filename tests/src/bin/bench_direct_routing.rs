//! Direct routing benchmark (not a test: it prints numbers). Run with
//! bench/direct-routing/run.sh. Two clusters of the cluster-test harness side by side (each
//! its own etcd, underlay bridge and two nodes with real twilld, one pod each), the same
//! topology (both nodes on one bridge): one with `Backend.DirectRouting` (the pods' traffic
//! goes unencapsulated), one without (VXLAN). iperf3 (bounded, -t T, TCP, one stream), in
//! rounds that alternate:
//!
//! - direct cluster: node ↔ node over the underlay, then pod ↔ pod (direct), then pod ↔ pod
//!   with the direct-path filter's rule flushed on both nodes (what the filter costs);
//! - VXLAN cluster: node ↔ node over the underlay, then pod ↔ pod (VXLAN).
//!
//! Before the runs it checks that the direct cluster's route is the direct one and the other
//! cluster's the VXLAN one.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use twill_tests::bench::{env_u32, iperf};
use twill_tests::cluster::{Cluster, ClusterOpts, NETWORK, wait_for};

fn cluster(direct: bool) -> Result<Cluster> {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 0,
        pods_per_node: 0,
        resync: Duration::from_secs(3600),
        ..ClusterOpts::default()
    })?;
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        format!(
            r#"{{"Network":"{NETWORK}","SubnetLen":24,"Backend":{{"Type":"vxlan","VNI":1,"DirectRouting":{direct}}}}}"#
        ),
    )?;
    for _ in 0..2 {
        let i = c.add_node()?;
        c.wait_ready(i, Duration::from_secs(20))?;
        c.add_pod(i)?;
    }
    let sub = c.nodes[1].subnet().unwrap_or_default();
    let want = if direct {
        format!("via {} dev eth0", c.nodes[1].ip)
    } else {
        "dev twill.1".to_string()
    };
    let n0 = &c.nodes[0];
    let route = wait_for(Duration::from_secs(15), || {
        let r = n0.ns.ip(&["route", "show", &sub]).unwrap_or_default();
        r.contains(&want).then_some(r)
    });
    match route {
        Some(r) => println!("{}: {}", if direct { "direct" } else { "vxlan" }, r.trim()),
        None => bail!("route to {sub} is not {want:?}\n{}", c.logs()),
    }
    Ok(c)
}

/// The direct-path filter's rule as twilld writes it (docs/operations.md).
fn filter_rule() -> String {
    format!(
        "iifname \"eth0\" ip saddr {NETWORK} ip saddr != @direct_peers counter name \"direct_dropped\" drop"
    )
}

fn set_filter(c: &Cluster, on: bool) -> Result<()> {
    for n in &c.nodes {
        n.ns.exec("nft", &["flush", "chain", "ip", "twill", "prerouting"])?;
        if on {
            n.ns.exec(
                "nft",
                &["add", "rule", "ip", "twill", "prerouting", &filter_rule()],
            )?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    twill_tests::cluster::require_root();
    let secs = env_u32("BENCH_IPERF_SECS", 5);
    let rounds = env_u32("BENCH_ROUNDS", 3);
    let d = cluster(true)?;
    let v = cluster(false)?;
    let run = |c: &Cluster, pods: bool| -> Result<f64> {
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        if pods {
            iperf(&a.pods[0].ns, &b.pods[0].ns, IpAddr::V4(b.pods[0].ip), secs)
        } else {
            iperf(&a.ns, &b.ns, IpAddr::V4(b.ip), secs)
        }
    };
    let (mut du, mut dp, mut vu, mut vp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut dn = Vec::new();
    for _ in 0..rounds {
        du.push(run(&d, false)?);
        set_filter(&d, true)?;
        dp.push(run(&d, true)?);
        set_filter(&d, false)?;
        dn.push(run(&d, true)?);
        set_filter(&d, true)?;
        vu.push(run(&v, false)?);
        vp.push(run(&v, true)?);
    }
    let gb = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.2}", x / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2] / 1e9
    };
    println!("iperf3 -t {secs}, {rounds} alternating rounds (Gbit/s)");
    println!(
        "direct cluster, node↔node: {} median {:.2}",
        gb(&du),
        med(&du)
    );
    println!(
        "direct cluster, pod↔pod:   {} median {:.2}",
        gb(&dp),
        med(&dp)
    );
    println!(
        "direct, filter flushed:    {} median {:.2}",
        gb(&dn),
        med(&dn)
    );
    println!(
        "vxlan cluster, node↔node:  {} median {:.2}",
        gb(&vu),
        med(&vu)
    );
    println!(
        "vxlan cluster, pod↔pod:    {} median {:.2}",
        gb(&vp),
        med(&vp)
    );
    println!(
        "direct pod / node {:.3}; vxlan pod / node {:.3}; direct pod / vxlan pod {:.3}",
        med(&dp) / med(&du),
        med(&vp) / med(&vu),
        med(&dp) / med(&vp)
    );
    println!("direct with filter / without {:.3}", med(&dp) / med(&dn));
    let dropped = d.nodes[1]
        .ns
        .exec("nft", &["list", "counter", "ip", "twill", "direct_dropped"])?;
    println!(
        "direct-path drops on the receiving node (must be 0): {}",
        dropped.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
