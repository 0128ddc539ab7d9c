//! Cluster tests of faults: kill -9 of a twilld while pods ping across nodes (no loss, a
//! restart adopts without re-creating anything), and etcd down for 30 s (no loss, twilld
//! recovers by itself, a node that joins afterwards is reached).

use std::time::Duration;

use twill_tests::cluster::{BackgroundPing, Cluster, ClusterOpts, metric, ping};

#[test]
fn kill_9_and_restart_lose_nothing_and_recreate_nothing() {
    let mut c = Cluster::start(ClusterOpts::default()).unwrap();
    let src = &c.nodes[0].pods[0];
    let dst = c.nodes[1].pods[0].ip;
    let bg = BackgroundPing::start(&src.ns, dst, Duration::from_millis(200)).unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let link_before = c.nodes[0]
        .ns
        .ip(&["-d", "-o", "link", "show", "twill.1"])
        .unwrap();
    let routes_before = c.nodes[0].overlay_routes();
    let nft_before = c.nodes[0]
        .ns
        .exec("nft", &["-a", "list", "table", "ip", "twill"])
        .unwrap();
    c.nodes[0].kill_daemon();
    std::thread::sleep(Duration::from_secs(2));
    c.start_daemon(0).unwrap();
    let took = c.wait_ready(0, Duration::from_secs(10)).unwrap();
    eprintln!("restart after kill -9: ready in {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "/readyz took {took:?}\n{}",
        c.nodes[0].log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (tx, rx) = bg.finish().unwrap();
    assert!(tx >= 25, "only {tx} pings sent");
    assert_eq!(
        tx,
        rx,
        "{} of {tx} pings lost across kill -9 + restart",
        tx - rx
    );

    // Nothing that was right was re-created: same device (same ifindex line), same routes,
    // no netlink writes, the nft table untouched (same rule handles).
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "twill_netlink_ops_total"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "twill_vxlan_recreated_total"), Some(0.0), "{m}");
    let link_after = c.nodes[0]
        .ns
        .ip(&["-d", "-o", "link", "show", "twill.1"])
        .unwrap();
    assert_eq!(
        link_before.split(':').next(),
        link_after.split(':').next(),
        "ifindex changed"
    );
    assert_eq!(routes_before, c.nodes[0].overlay_routes());
    let nft_after = c.nodes[0]
        .ns
        .exec("nft", &["-a", "list", "table", "ip", "twill"])
        .unwrap();
    assert_eq!(nft_before, nft_after, "the nft table was rewritten");
}

#[test]
fn etcd_outage_of_30s_loses_nothing_and_twilld_recovers() {
    let mut c = Cluster::start(ClusterOpts::default()).unwrap();
    let src = &c.nodes[0].pods[0];
    let dst = c.nodes[2].pods[1].ip;
    let bg = BackgroundPing::start(&src.ns, dst, Duration::from_millis(200)).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    c.etcd.stop().unwrap();
    std::thread::sleep(Duration::from_secs(30));
    for n in &c.nodes {
        assert!(
            n.daemon.as_ref().and_then(|d| d.pid()).is_some() && n.http("/healthz").is_ok(),
            "{} twilld died during the etcd outage\n{}",
            n.name,
            n.log_text()
        );
        assert_eq!(n.overlay_routes().len(), 2, "{} lost routes", n.name);
    }
    c.etcd.restart().unwrap();

    // Recovers by itself: still (or again) ready, errors were counted.
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(20)).unwrap();
        let m = c.nodes[i].metrics();
        assert!(
            metric(&m, "twill_etcd_errors_total").unwrap_or(0.0) > 0.0,
            "{m}"
        );
    }
    // A node that joins afterwards is reached.
    let i = c.add_node().unwrap();
    c.wait_ready(i, Duration::from_secs(20)).unwrap();
    let k = c.add_pod(i).unwrap();
    let new_pod = c.nodes[i].pods[k].ip;
    let subnet = c.nodes[i].subnet().unwrap();
    let routed = twill_tests::cluster::wait_for(Duration::from_secs(10), || {
        (0..3).all(|n| c.nodes[n].has_route(&subnet)).then_some(())
    });
    assert!(routed.is_some(), "new node's route missing\n{}", c.logs());
    for n in 0..3 {
        assert!(
            ping(&c.nodes[n].pods[0].ns, new_pod, 1, 2),
            "{} pod cannot reach the new node's pod {new_pod}\n{}",
            c.nodes[n].name,
            c.logs()
        );
    }
    let (tx, rx) = bg.finish().unwrap();
    assert!(tx >= 150, "only {tx} pings sent");
    assert_eq!(
        tx,
        rx,
        "{} of {tx} pings lost during the etcd outage",
        tx - rx
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_lease_deleted_is_reacquired_with_the_same_subnet() {
    let c = Cluster::start(ClusterOpts {
        pods_per_node: 1,
        ..ClusterOpts::default()
    })
    .unwrap();
    let store = twill_ipam::store::LeaseStore::connect(c.etcd_options())
        .await
        .unwrap();
    let subnet: ipnet::Ipv4Net = c.nodes[0].subnet().unwrap().parse().unwrap();
    let bg = BackgroundPing::start(
        &c.nodes[1].pods[0].ns,
        c.nodes[0].pods[0].ip,
        Duration::from_millis(200),
    )
    .unwrap();
    assert!(store.release(subnet).await.unwrap());
    // The holder sees its key go and takes the same subnet again.
    let mut back = None;
    for _ in 0..200 {
        if let Some(l) = store.get(&subnet).await.unwrap()
            && l.attrs.node_name == c.nodes[0].name
        {
            back = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        back.is_some(),
        "lease not re-acquired\n{}",
        c.nodes[0].log_text()
    );
    let routed = twill_tests::cluster::wait_for(Duration::from_secs(5), || {
        [1, 2]
            .iter()
            .all(|&k| c.nodes[k].has_route(&subnet.to_string()))
            .then_some(())
    });
    assert!(routed.is_some(), "peers lost the route\n{}", c.logs());
    c.wait_ready(0, Duration::from_secs(5)).unwrap();
    // Holder counters reach the metrics on twilld's 1 s stats tick.
    let counted = twill_tests::cluster::wait_for(Duration::from_secs(3), || {
        (metric(&c.nodes[0].metrics(), "twill_lease_losses_total").unwrap_or(0.0) >= 1.0)
            .then_some(())
    });
    assert!(
        counted.is_some(),
        "{}
{}",
        c.nodes[0].metrics(),
        c.nodes[0].log_text()
    );
    let (tx, rx) = bg.finish().unwrap();
    eprintln!("pings across the lease loss: {rx}/{tx}");
    assert!(rx + 2 >= tx, "{} of {tx} pings lost", tx - rx);
}

#[test]
fn restart_while_etcd_is_down_keeps_the_data_plane_and_recovers() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        ..ClusterOpts::default()
    })
    .unwrap();
    let bg = BackgroundPing::start(
        &c.nodes[0].pods[0].ns,
        c.nodes[1].pods[0].ip,
        Duration::from_millis(200),
    )
    .unwrap();
    c.etcd.stop().unwrap();
    c.nodes[0].kill_daemon();
    c.start_daemon(0).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let n = &c.nodes[0];
    assert_eq!(n.http("/healthz").unwrap().0, 200);
    let (code, body) = n.http("/readyz").unwrap();
    assert_eq!(code, 503, "ready without etcd: {body}");
    assert_eq!(n.overlay_routes().len(), 1, "the data plane must stay");
    c.etcd.restart().unwrap();
    c.wait_ready(0, Duration::from_secs(20)).unwrap();
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "twill_netlink_ops_total"), Some(0.0), "{m}");
    let (tx, rx) = bg.finish().unwrap();
    assert_eq!(tx, rx, "{} of {tx} pings lost", tx - rx);
}
