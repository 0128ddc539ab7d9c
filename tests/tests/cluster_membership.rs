//! Cluster test: a 4th node joins (every pod reaches its pods within 1 s of its lease), and
//! a node's lease is released (its routes are gone from every other node within 1 s).

use std::time::{Duration, Instant};

use twill_ipam::store::LeaseStore;
use twill_tests::cluster::{Cluster, ClusterOpts, ping, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_join_and_lease_release_converge_within_a_second() {
    let mut c = Cluster::start(ClusterOpts::default()).unwrap();
    let store = LeaseStore::connect(c.etcd_options()).await.unwrap();

    // --- join ---
    let i = c.add_node().unwrap();
    let name = c.nodes[i].name.clone();
    let lease = loop {
        let (ls, _) = store.list().await.unwrap();
        if let Some(l) = ls.into_iter().find(|l| l.attrs.node_name == name) {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let t_lease = Instant::now();
    let subnet = lease.subnet.to_string();
    let others: Vec<usize> = (0..3).collect();
    let converged = wait_for(Duration::from_secs(1), || {
        others
            .iter()
            .all(|&k| c.nodes[k].has_route(&subnet))
            .then_some(())
    });
    let took = t_lease.elapsed();
    assert!(
        converged.is_some(),
        "route to {subnet} not on every node within 1 s of the lease\n{}",
        c.logs()
    );
    eprintln!("join: routes on all 3 nodes {took:?} after the lease was seen");
    c.wait_ready(i, Duration::from_secs(10)).unwrap();
    c.add_pod(i).unwrap();
    c.add_pod(i).unwrap();
    let new_pods: Vec<_> = c.nodes[i].pods.iter().map(|p| p.ip).collect();
    for &(n, k, src) in &c.pods() {
        if n == i {
            continue;
        }
        for dst in &new_pods {
            assert!(
                ping(&c.nodes[n].pods[k].ns, *dst, 1, 2),
                "pod {src} cannot reach new pod {dst}\n{}",
                c.logs()
            );
        }
    }
    // And back from the new pods to the old ones.
    for p in &c.nodes[i].pods {
        for &(_, _, dst) in &c.pods() {
            if dst != p.ip {
                assert!(
                    ping(&p.ns, dst, 1, 2),
                    "new pod {} cannot reach {dst}",
                    p.ip
                );
            }
        }
    }

    // --- release ---
    // Stop node 2's twilld first (else it takes its lease again), then release its lease.
    let gone = c.nodes[1].subnet().unwrap();
    c.nodes[1].stop_daemon().unwrap();
    // SIGTERM leaves node 2's data plane in place.
    assert_eq!(
        c.nodes[1].overlay_routes().len(),
        3,
        "node 2 flushed on SIGTERM"
    );
    let released = store.release(gone.parse().unwrap()).await.unwrap();
    assert!(released);
    let t0 = Instant::now();
    let remaining = [0usize, 2, 3];
    let removed = wait_for(Duration::from_secs(1), || {
        remaining
            .iter()
            .all(|&k| !c.nodes[k].has_route(&gone))
            .then_some(())
    });
    assert!(
        removed.is_some(),
        "route to released {gone} still present after 1 s\n{}",
        c.logs()
    );
    eprintln!("release: routes gone from 3 nodes after {:?}", t0.elapsed());
    for &k in &remaining {
        let m = c.nodes[k].metrics();
        assert_eq!(
            twill_tests::cluster::metric(&m, "twill_peers"),
            Some(2.0),
            "{}",
            c.nodes[k].name
        );
        let fdb = c.nodes[k]
            .ns
            .exec("bridge", &["fdb", "show", "dev", "twill.1"])
            .unwrap();
        assert_eq!(
            fdb.lines().filter(|l| l.contains(" dst ")).count(),
            2,
            "{fdb}"
        );
    }
}
