//! VXLAN input filter benchmark (not a test: it prints numbers). Run with
//! bench/vxlan-filter/run.sh. Two nodes (real etcd, real twilld), one pod each; iperf3
//! (bounded, -t T, TCP, one stream) pod on node 1 → pod on node 2, in rounds that alternate:
//!
//! - `filter`: twill's table as twilld wrote it (input chain: VXLAN only from `@peers`);
//! - `no filter`: the input chain's rule flushed on both nodes (what twill did before);
//! - `filter + rp_filter`: the rule back, and strict rp_filter (1) on twill.1 of both nodes;
//!
//! and node ↔ node over the underlay as the reference. twilld's resync is set beyond the run
//! so that it does not restore the table or the sysctl in between.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use twill_tests::bench::{env_u32, iperf};
use twill_tests::cluster::{Cluster, ClusterOpts};

const RULE: &str = "udp dport 8472 ip saddr != @peers counter name \"vxlan_dropped\" drop";

fn set_filter(c: &Cluster, on: bool) -> Result<()> {
    for n in &c.nodes {
        n.ns.exec("nft", &["flush", "chain", "ip", "twill", "input"])?;
        if on {
            n.ns.exec("nft", &["add", "rule", "ip", "twill", "input", RULE])?;
        }
    }
    Ok(())
}

fn set_rp_filter(c: &Cluster, v: &str) -> Result<()> {
    for n in &c.nodes {
        n.ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.twill/1.rp_filter={v}")],
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    twill_tests::cluster::require_root();
    let secs = env_u32("BENCH_IPERF_SECS", 5);
    let rounds = env_u32("BENCH_ROUNDS", 3);
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        resync: Duration::from_secs(3600),
        ..ClusterOpts::default()
    })?;
    let (client, server) = (&c.nodes[0].pods[0].ns, &c.nodes[1].pods[0].ns);
    let dst = IpAddr::V4(c.nodes[1].pods[0].ip);
    let mut node = Vec::new();
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut rp = Vec::new();
    for _ in 0..rounds {
        node.push(iperf(
            &c.nodes[0].ns,
            &c.nodes[1].ns,
            IpAddr::V4(c.nodes[1].ip),
            secs,
        )?);
        set_filter(&c, true)?;
        set_rp_filter(&c, "0")?;
        with.push(iperf(client, server, dst, secs)?);
        set_filter(&c, false)?;
        without.push(iperf(client, server, dst, secs)?);
        set_filter(&c, true)?;
        set_rp_filter(&c, "1")?;
        rp.push(iperf(client, server, dst, secs)?);
        set_rp_filter(&c, "0")?;
    }
    let dropped = c.nodes[1]
        .ns
        .exec("nft", &["list", "counter", "ip", "twill", "vxlan_dropped"])?;
    let gb = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.2}", x / 1e9))
            .collect::<Vec<_>>()
    };
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2] / 1e9
    };
    println!("iperf3 -t {secs}, {rounds} alternating rounds (Gbit/s)");
    println!(
        "node↔node underlay:        {:?} median {:.2}",
        gb(&node),
        med(&node)
    );
    println!(
        "pod↔pod, filter:           {:?} median {:.2}",
        gb(&with),
        med(&with)
    );
    println!(
        "pod↔pod, no filter:        {:?} median {:.2}",
        gb(&without),
        med(&without)
    );
    println!(
        "pod↔pod, filter+rp_filter: {:?} median {:.2}",
        gb(&rp),
        med(&rp)
    );
    println!(
        "filter / no filter {:.3}; filter+rp_filter / filter {:.3}",
        med(&with) / med(&without),
        med(&rp) / med(&with)
    );
    println!(
        "drops on node 2 (must be 0): {}",
        dropped.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
