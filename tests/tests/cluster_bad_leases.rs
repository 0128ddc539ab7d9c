//! Cluster test of the lease validation (issue 15, item 1 and the lease-key part of item 6):
//! 2 real nodes (real etcd, real twilld, real pods made by the twill plugin). A table of bad
//! lease keys is written next to the real leases. The test proves, for each of them:
//! - no new route, neighbour or FDB entry on either node (full dumps compared before/after,
//!   also after a periodic resync has run);
//! - the real peers' entries stay exactly as they were and the pods still ping each other;
//! - `twillctl status` (run on node 1) lists it as rejected with the right reason, and
//!   `twill_leases_rejected{reason}` counts it; the node still reaches etcd.
//!
//! Then every bad key is deleted (the padded alias of the real peer's key too) and the real
//! peer's entries and the nodes' own routes are all still there. A positive control proves
//! that the test can fail: a valid hand-written lease IS programmed (and removed again).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use twill_ipam::store::LeaseStore;
use twill_tests::cluster::{Cluster, ClusterOpts, ETCD_PREFIX, Node, metric, ping, wait_for};

const RESYNC: Duration = Duration::from_secs(2);

/// What the kernel of a node has that twill could touch: every IPv4 route of every table,
/// and the neighbours and FDB entries of twill.1.
fn dump(n: &Node) -> (String, String, String) {
    let routes = n.ns.ip(&["-4", "route", "show", "table", "all"]).unwrap();
    let neigh = n.ns.ip(&["neigh", "show", "dev", "twill.1"]).unwrap();
    let fdb =
        n.ns.exec("bridge", &["fdb", "show", "dev", "twill.1"])
            .unwrap();
    let sorted = |s: String| {
        let mut v: Vec<&str> = s.lines().map(str::trim).collect();
        v.sort();
        v.join("\n")
    };
    (sorted(routes), sorted(neigh), sorted(fdb))
}

/// `twill_leases_rejected{reason="..."}` samples.
fn rejected(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("twill_leases_rejected{reason=\"")?;
            let (reason, rest) = rest.split_once("\"}")?;
            Some((reason.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

/// `twillctl status -o json` inside node `n` (its etcd proxy, its netlink).
fn status(n: &Node) -> serde_json::Value {
    let out =
        n.ns.command(twill_tests::bins::bin("twillctl"))
            .args([
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "status",
                "--node-name",
                &n.name,
                "-o",
                "json",
            ])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "twillctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(ip: &str, mac: &str, vni: u32, backend: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","BackendType":"{backend}","BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}},"NodeName":"intruder"}}"#
    )
}

fn both_pods_ping(c: &Cluster) -> bool {
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    ping(&a.ns, b.ip, 2, 2) && ping(&b.ns, a.ip, 2, 2)
}

fn reconciles(n: &Node) -> f64 {
    metric(&n.metrics(), "twill_reconciles_total").unwrap_or(0.0)
}

/// Waits until node `n` has reconciled at least twice more (a lease event or netlink event
/// and the periodic resync, which runs every RESYNC): whatever it would program is there.
fn settle(n: &Node) {
    let r0 = reconciles(n);
    assert!(
        wait_for(RESYNC * 3, || (reconciles(n) >= r0 + 2.0).then_some(())).is_some(),
        "{} did not reconcile\n{}",
        n.name,
        n.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_leases_are_rejected_and_change_nothing_else() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        resync: RESYNC,
        ..ClusterOpts::default()
    })
    .unwrap();
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let s0: Ipv4Net = n0.subnet().unwrap().parse().unwrap();
    let s1: Ipv4Net = n1.subnet().unwrap().parse().unwrap();
    assert!(both_pods_ping(&c), "pods do not ping before\n{}", c.logs());

    let store = LeaseStore::connect(c.etcd_options()).await.unwrap();
    let (leases, _) = store.list().await.unwrap();
    let peer = leases.iter().find(|l| l.subnet == s1).unwrap();
    let peer_mac = peer.attrs.vtep_mac().to_string();
    let mut kv = store.client().kv_client();
    let subnets = format!("{ETCD_PREFIX}/subnets/");

    let before0 = dump(n0);
    let before1 = dump(n1);
    assert!(n0.has_route(&s1.to_string()), "{:?}", n0.overlay_routes());

    // Free subnets of the Network for the bad leases whose subnet itself is fine.
    let mut free = (200u8..250)
        .map(|k| format!("10.244.{k}.0-24"))
        .filter(|k| *k != format!("{}-24", s0.network()) && *k != format!("{}-24", s1.network()));
    let mut next = || free.next().unwrap();
    let own_half = format!("{}-25", Ipv4Addr::from(u32::from(s0.network()) + 128));
    let alias = format!("{}-024", s1.network());
    let n0_ip = n0.ip.to_string();
    let n1_ip = n1.ip.to_string();
    // (key, value, reason seen by node 1 (n0)).
    let table: Vec<(String, String, &str)> = vec![
        (
            "10.99.1.0-24".into(),
            value("192.168.60.1", "02:aa:00:00:00:01", 1, "vxlan"),
            "outside_network",
        ),
        (
            next(),
            value("192.168.60.2", "00:00:00:00:00:00", 1, "vxlan"),
            "bad_vtep_mac",
        ),
        (
            next(),
            value("192.168.60.3", "01:00:5e:00:00:03", 1, "vxlan"),
            "bad_vtep_mac",
        ),
        (
            next(),
            value(&n0_ip, "02:aa:00:00:00:04", 1, "vxlan"),
            "own_public_ip",
        ),
        (
            next(),
            value("224.0.0.5", "02:aa:00:00:00:05", 1, "vxlan"),
            "bad_public_ip",
        ),
        (
            next(),
            value("127.0.0.1", "02:aa:00:00:00:06", 1, "vxlan"),
            "bad_public_ip",
        ),
        (
            next(),
            value("192.168.60.7", &peer_mac, 1, "vxlan"),
            "duplicate_vtep_mac",
        ),
        (
            next(),
            value(&n1_ip, "02:aa:00:00:00:08", 1, "vxlan"),
            "duplicate_public_ip",
        ),
        // A /32 for the etcd server's address (127.0.0.1 as the nodes see it).
        (
            "127.0.0.1-32".into(),
            value("192.168.60.9", "02:aa:00:00:00:09", 1, "vxlan"),
            "outside_network",
        ),
        (
            "0.0.0.0-0".into(),
            value("192.168.60.10", "02:aa:00:00:00:0a", 1, "vxlan"),
            "outside_network",
        ),
        // The underlay prefix.
        (
            "192.168.50.0-24".into(),
            value("192.168.60.11", "02:aa:00:00:00:0b", 1, "vxlan"),
            "outside_network",
        ),
        (
            own_half,
            value("192.168.60.12", "02:aa:00:00:00:0c", 1, "vxlan"),
            "overlaps_own",
        ),
        // An alias of the real peer's key, pointing elsewhere.
        (
            alias.clone(),
            value("192.168.60.13", "02:aa:00:00:00:0d", 1, "vxlan"),
            "bad_key",
        ),
        (
            next(),
            value("192.168.60.14", "02:aa:00:00:00:0e", 2, "vxlan"),
            "wrong_vni",
        ),
        (
            next(),
            value("192.168.60.15", "02:aa:00:00:00:0f", 1, "host-gw"),
            "wrong_backend",
        ),
        (next(), "{not json".into(), "bad_value"),
    ];
    for (k, v, _) in &table {
        kv.put(format!("{subnets}{k}"), v.as_str(), None)
            .await
            .unwrap();
    }

    // node 1 counts every one of them.
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for (_, _, r) in &table {
        *want.entry(r.to_string()).or_default() += 1.0;
    }
    let counted = wait_for(Duration::from_secs(10), || {
        let got = rejected(&n0.metrics());
        want.iter()
            .all(|(r, n)| got.get(r) == Some(n))
            .then_some(got)
    });
    assert!(
        counted.is_some(),
        "metric: want {want:?}, got {:?}\n{}",
        rejected(&n0.metrics()),
        n0.log_text()
    );
    settle(n0);
    settle(n1);

    // Nothing new, nothing changed, on either node.
    assert_eq!(
        dump(n0),
        before0,
        "node 1's kernel state changed\n{}",
        n0.log_text()
    );
    assert_eq!(
        dump(n1),
        before1,
        "node 2's kernel state changed\n{}",
        n1.log_text()
    );
    assert!(
        both_pods_ping(&c),
        "pods do not ping with the bad leases\n{}",
        c.logs()
    );

    // twillctl status on node 1 lists each with its reason (and still reaches etcd).
    let st = status(n0);
    let listed: BTreeMap<String, String> = st["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (k, _, r) in &table {
        assert_eq!(listed.get(k).map(String::as_str), Some(*r), "{k}: {st}");
    }
    assert_eq!(listed.len(), table.len(), "{st}");
    assert_eq!(st["missing"].as_array().unwrap().len(), 0, "{st}");
    assert_eq!(st["stale"].as_array().unwrap().len(), 0, "{st}");
    // The warn log names each key once.
    let log = n0.log_text();
    for (k, _, r) in &table {
        let lines = log
            .lines()
            .filter(|l| l.contains("lease rejected") && l.contains(&format!("key={k} ")))
            .count();
        assert_eq!(lines, 1, "{k} ({r}) logged {lines} times\n{log}");
    }
    // twillctl leases list marks them too.
    let list: serde_json::Value =
        serde_json::from_str(&c.twillctl(&["leases", "list", "-o", "json"]).unwrap()).unwrap();
    let real = list["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["subnet"] == s1.to_string())
        .unwrap();
    assert_eq!(real["accepted"], true, "{list}");
    let inv = list["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == alias)
        .unwrap();
    assert_eq!(inv["accepted"], false, "{list}");
    assert_eq!(inv["reason"], "bad_key", "{list}");

    // Delete every bad key, the alias included: the real peer stays, nothing else moves.
    for (k, _, _) in &table {
        kv.delete(format!("{subnets}{k}"), None).await.unwrap();
    }
    assert!(
        wait_for(Duration::from_secs(10), || rejected(&n0.metrics())
            .values()
            .all(|n| *n == 0.0)
            .then_some(()))
        .is_some(),
        "{:?}",
        rejected(&n0.metrics())
    );
    settle(n0);
    settle(n1);
    assert_eq!(
        dump(n0),
        before0,
        "node 1 after the deletes\n{}",
        n0.log_text()
    );
    assert_eq!(
        dump(n1),
        before1,
        "node 2 after the deletes\n{}",
        n1.log_text()
    );
    assert!(
        both_pods_ping(&c),
        "pods do not ping after the deletes\n{}",
        c.logs()
    );

    // Positive control: a valid hand-written lease is programmed, and removed again.
    let good_key = next();
    let good_net = good_key.replace('-', "/");
    kv.put(
        format!("{subnets}{good_key}"),
        value("192.168.50.99", "02:bb:00:00:00:01", 1, "vxlan"),
        None,
    )
    .await
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || n0
            .has_route(&good_net)
            .then_some(()))
        .is_some(),
        "valid lease {good_key} not programmed: {:?}\n{}",
        n0.overlay_routes(),
        n0.log_text()
    );
    let neigh = n0.ns.ip(&["neigh", "show", "dev", "twill.1"]).unwrap();
    assert!(neigh.contains("02:bb:00:00:00:01"), "{neigh}");
    kv.delete(format!("{subnets}{good_key}"), None)
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || (dump(n0) == before0)
            .then_some(()))
        .is_some(),
        "after removing the valid lease\n{}",
        n0.log_text()
    );
}
