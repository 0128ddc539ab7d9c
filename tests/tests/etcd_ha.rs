//! Issue 14, etcd HA: twilld and twillctl against a real 3-member etcd cluster (three etcd
//! processes, each in its own namespace on the underlay, every member an endpoint), while
//! pods ping across nodes (both ways, every 100 ms):
//! - the leader is killed, and a node joins during the leader change: it is reached;
//! - the leader is partitioned from the other members (clients still reach it): twillctl
//!   still answers through the other endpoints;
//! - two members are down (no quorum) for 30 s.
//!
//! Proves: 0 pings lost; every lease kept with its subnet; the cluster recovers by itself
//! (all nodes ready again, all leases renewed) once etcd has a quorum.

use std::collections::BTreeMap;
use std::time::Duration;

use twill_tests::cluster::{BackgroundPing, Cluster, ClusterOpts, ETCD_PREFIX, ping, wait_for};

/// subnet → node, as twillctl lists them from inside node 0, through every endpoint.
fn leases(c: &Cluster) -> Result<BTreeMap<String, String>, String> {
    let out = c.nodes[0]
        .ns
        .command(twill_tests::bins::bin("twillctl"))
        .args(["--etcd-endpoints", &c.etcd_endpoints().join(",")])
        .args(["--etcd-prefix", ETCD_PREFIX, "--etcd-timeout", "2s"])
        .args(["leases", "list", "-o", "json"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v["leases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["subnet"].as_str().unwrap_or_default().to_string(),
                l["node"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

#[test]
fn pods_keep_talking_through_leader_loss_partition_and_no_quorum() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        etcd_members: 3,
        lease_ttl: Duration::from_secs(60),
        ..ClusterOpts::default()
    })
    .unwrap();
    let (a, b) = (c.nodes[0].pods[0].ip, c.nodes[1].pods[0].ip);
    let ab = BackgroundPing::start(&c.nodes[0].pods[0].ns, b, Duration::from_millis(100)).unwrap();
    let ba = BackgroundPing::start(&c.nodes[1].pods[0].ns, a, Duration::from_millis(100)).unwrap();
    let before = leases(&c).unwrap();
    assert_eq!(before.len(), 2, "{before:?}");

    // 1. The leader dies; a node joins while the others elect a new one.
    let ha = c.ha.as_mut().unwrap();
    let leader = ha.wait_leader(Duration::from_secs(10)).unwrap();
    ha.kill_member(leader);
    let joined = c.add_node().unwrap();
    c.wait_ready(joined, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.ha.as_ref().unwrap().logs()));
    let p = c.add_pod(joined).unwrap();
    let new_pod = c.nodes[joined].pods[p].ip;
    let reached = wait_for(Duration::from_secs(10), || {
        ping(&c.nodes[0].pods[0].ns, new_pod, 1, 1).then_some(())
    });
    assert!(
        reached.is_some(),
        "the node that joined during the leader change is not reached\n{}",
        c.logs()
    );
    let ha = c.ha.as_mut().unwrap();
    ha.start_member(leader).unwrap();
    ha.wait_leader(Duration::from_secs(20)).unwrap();

    // 2. The (new) leader is cut off from its peers; clients can still connect to it.
    let ha = c.ha.as_ref().unwrap();
    let leader = ha.wait_leader(Duration::from_secs(10)).unwrap();
    ha.partition(leader).unwrap();
    let other = wait_for(Duration::from_secs(15), || {
        ha.leader().filter(|l| *l != leader)
    });
    assert!(
        other.is_some(),
        "no new leader after the partition\n{}",
        ha.logs()
    );
    let during = wait_for(Duration::from_secs(15), || leases(&c).ok());
    let during = during.expect("twillctl fails over to a member with a quorum");
    assert_eq!(during.len(), 3, "{during:?}");
    let ha = c.ha.as_ref().unwrap();
    ha.heal(leader).unwrap();
    ha.wait_leader(Duration::from_secs(20)).unwrap();

    // 3. No quorum for 30 s: two members down. (The 30 s is the fault's length, not a wait
    // for a condition.)
    let ha = c.ha.as_mut().unwrap();
    ha.kill_member(0);
    ha.kill_member(1);
    std::thread::sleep(Duration::from_secs(30));
    ha.start_member(0).unwrap();
    ha.start_member(1).unwrap();
    ha.wait_leader(Duration::from_secs(30)).unwrap();

    // Recovered by itself: every node ready, every lease still there with its subnet.
    for i in 0..c.nodes.len() {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
    }
    let after = wait_for(Duration::from_secs(15), || leases(&c).ok()).expect("leases listed");
    for (subnet, node) in &before {
        assert_eq!(
            after.get(subnet),
            Some(node),
            "lease of {node} lost: {after:?}\n{}",
            c.logs()
        );
    }
    assert_eq!(after.len(), 3, "{after:?}");

    let (sent, got) = ab.finish().unwrap();
    assert!(sent > 300, "only {sent} pings sent");
    assert_eq!(
        sent,
        got,
        "pod a -> pod b lost {} of {sent} pings\n{}",
        sent - got,
        c.logs()
    );
    let (sent, got) = ba.finish().unwrap();
    assert_eq!(
        sent,
        got,
        "pod b -> pod a lost {} of {sent} pings\n{}",
        sent - got,
        c.logs()
    );
}
