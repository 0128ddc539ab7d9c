//! Cluster test of the resync: a route and an FDB entry deleted by hand come back within
//! the resync period; a stale route (no lease) goes, also one left from an earlier run.

use std::time::Duration;

use twill_ipam::store::LeaseStore;
use twill_tests::cluster::{Cluster, ClusterOpts, metric, wait_for};

const RESYNC: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_and_stale_entries_removed() {
    let mut c = Cluster::start(ClusterOpts {
        pods_per_node: 1,
        resync: RESYNC,
        ..ClusterOpts::default()
    })
    .unwrap();
    let n0 = &c.nodes[0];
    let peer = c.nodes[1].subnet().unwrap();
    let peer_net = peer.trim_end_matches("/24").to_string();

    // A route deleted by hand comes back.
    n0.ns
        .ip(&["route", "del", &peer, "dev", "twill.1"])
        .unwrap();
    assert!(
        wait_for(RESYNC + Duration::from_secs(1), || n0
            .has_route(&peer)
            .then_some(()))
        .is_some(),
        "route {peer} not repaired\n{}",
        n0.log_text()
    );

    // An FDB entry deleted by hand comes back.
    let fdb = n0
        .ns
        .exec("bridge", &["fdb", "show", "dev", "twill.1"])
        .unwrap();
    let line = fdb
        .lines()
        .find(|l| l.contains(&format!("dst {}", c.nodes[1].ip)))
        .unwrap_or_else(|| panic!("no fdb entry for node 2 in {fdb}"))
        .to_string();
    let mac = line.split_whitespace().next().unwrap().to_string();
    n0.ns
        .exec(
            "bridge",
            &[
                "fdb",
                "del",
                &mac,
                "dev",
                "twill.1",
                "dst",
                &c.nodes[1].ip.to_string(),
                "self",
            ],
        )
        .unwrap();
    let back = wait_for(RESYNC + Duration::from_secs(1), || {
        let f = n0
            .ns
            .exec("bridge", &["fdb", "show", "dev", "twill.1"])
            .ok()?;
        f.contains(&line).then_some(())
    });
    assert!(
        back.is_some(),
        "fdb entry {line} not repaired\n{}",
        n0.log_text()
    );

    // A neighbour deleted by hand comes back.
    n0.ns
        .ip(&["neigh", "del", &peer_net, "dev", "twill.1"])
        .unwrap();
    let back = wait_for(RESYNC + Duration::from_secs(1), || {
        let f = n0.ns.ip(&["neigh", "show", "dev", "twill.1"]).ok()?;
        f.lines()
            .any(|l| l.starts_with(&format!("{peer_net} ")) && l.contains("PERMANENT"))
            .then_some(())
    });
    assert!(
        back.is_some(),
        "neighbour {peer_net} not repaired\n{}",
        n0.log_text()
    );

    // A stale route of twill's (its protocol, left by an earlier run) for a subnet
    // without a lease goes.
    n0.ns
        .ip(&[
            "route",
            "add",
            "10.244.250.0/24",
            "via",
            "10.244.250.0",
            "dev",
            "twill.1",
            "onlink",
            "proto",
            "116",
        ])
        .unwrap();
    let gone = wait_for(RESYNC + Duration::from_secs(1), || {
        (!n0.has_route("10.244.250.0/24")).then_some(())
    });
    assert!(gone.is_some(), "stale route not removed\n{}", n0.log_text());
    let m = n0.metrics();
    assert!(
        metric(&m, "twill_drift_repaired_total").unwrap() >= 4.0,
        "{m}"
    );

    // Left by an earlier run: node 1's twilld is down while node 3's lease goes away.
    let n3_subnet = c.nodes[2].subnet().unwrap();
    c.nodes[0].stop_daemon().unwrap();
    c.nodes[2].stop_daemon().unwrap();
    let store = LeaseStore::connect(c.etcd_options()).await.unwrap();
    assert!(store.release(n3_subnet.parse().unwrap()).await.unwrap());
    assert!(
        c.nodes[0].has_route(&n3_subnet),
        "SIGTERM must leave the routes in place"
    );
    c.start_daemon(0).unwrap();
    c.wait_ready(0, Duration::from_secs(10)).unwrap();
    assert!(
        !c.nodes[0].has_route(&n3_subnet),
        "stale route of a lease removed while twilld was down is still there\n{}",
        c.nodes[0].log_text()
    );
    assert!(c.nodes[0].has_route(&peer), "the valid route must stay");
}
