//! Issue 13, peer health: 3 real nodes probe each other through the overlay. UDP 8472 is
//! then blocked between node-1 and node-2 (nft in the underlay namespace, the switch
//! between them, as a cloud security group would). Within the documented time, node-1's
//! metrics, `twillctl cluster status` and `twillctl doctor` name exactly that pair, and
//! node-3 stays clean; once the block is lifted they say nothing again. The probes never
//! change the data plane: the routes stay as they were throughout.
//!
//! `twillctl status` (this node's PEER table, from its own report): while blocked, node-1
//! says node-2 is unreachable and node-3 reachable, node-2 the same of node-1; once lifted
//! every peer is reachable on every node. When node-3's twilld is gone and its report has
//! expired, its `twillctl status` says so (`peer_health.peers` null, with a reason) and
//! still exits 0. This fails if the table came from anything but the probes' verdicts
//! (the leases and the data plane are the same throughout).

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use twill_tests::cluster::{Cluster, ClusterOpts, ETCD_PREFIX, Node, metric, wait_for};

/// How long a verdict may take here: 3 lost probes (each peer probed every 500 ms, 300 ms
/// timeout) plus one publish period (1 s), with room for a loaded CI machine.
const WITHIN: Duration = Duration::from_secs(15);

fn cluster_status(n: &Node) -> (Output, Value) {
    let out =
        n.ns.command(twill_tests::bins::bin("twillctl"))
            .args(["--etcd-endpoints", "http://127.0.0.1:2379"])
            .args([
                "--etcd-prefix",
                ETCD_PREFIX,
                "-o",
                "json",
                "cluster",
                "status",
            ])
            .output()
            .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

/// `twillctl status -o json` on `n` (its netns: its twill.1, its etcd proxy).
fn node_status(n: &Node, json: bool) -> (Output, Value) {
    let mut cmd = n.ns.command(twill_tests::bins::bin("twillctl"));
    cmd.args(["--etcd-endpoints", "http://127.0.0.1:2379"])
        .args([
            "--etcd-prefix",
            ETCD_PREFIX,
            "status",
            "--node-name",
            &n.name,
        ]);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

/// node → `reachable` in `n`'s PEER table (`peer_health.peers`), empty without a report.
fn peer_verdicts(n: &Node) -> std::collections::BTreeMap<String, String> {
    let (_, v) = node_status(n, true);
    v["peer_health"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["node"].as_str().unwrap_or_default().to_string(),
                p["reachable"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn verdicts(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect()
}

fn problems_of(v: &Value, node: &str) -> String {
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node"] == node)
        .map(|n| n["problems"].to_string())
        .unwrap_or_default()
}

fn block(c: &Cluster, on: bool) {
    let (a, b) = (c.nodes[0].ip, c.nodes[1].ip);
    if on {
        let rules = format!(
            "table bridge twblock {{\n chain blockvx {{\n type filter hook forward priority 0;\n \
             ip saddr {a} ip daddr {b} udp dport 8472 drop\n \
             ip saddr {b} ip daddr {a} udp dport 8472 drop\n }}\n}}\n"
        );
        let f = c.dir.path().join("block.nft");
        std::fs::write(&f, rules).unwrap();
        c.underlay
            .exec("nft", &["-f", &f.display().to_string()])
            .unwrap();
    } else {
        c.underlay
            .exec("nft", &["delete", "table", "bridge", "twblock"])
            .unwrap();
    }
}

#[test]
fn a_blocked_vxlan_path_is_named_and_cleared() {
    let c = Cluster::start(ClusterOpts {
        nodes: 3,
        pods_per_node: 1,
        extra_args: [
            "--health-interval",
            "500ms",
            "--health-timeout",
            "300ms",
            "--health-publish",
            "1s",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOpts::default()
    })
    .unwrap();
    let mut c = c;
    let (n1, n2, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);

    // All well: every node reported, nobody unreachable, exit 0; the pods are counted.
    let ok = wait_for(WITHIN, || {
        let (out, v) = cluster_status(n1);
        let counted = v["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().all(|n| n["pods_used"] == 1));
        (out.status.code() == Some(0) && counted).then_some(v)
    });
    let v = ok.unwrap_or_else(|| {
        panic!(
            "cluster status never clean: {:?}\n{}",
            cluster_status(n1),
            c.logs()
        )
    });
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{v}");
    assert!(
        nodes
            .iter()
            .all(|n| n["ready"] == true && n["pods_used"] == 1),
        "{v}"
    );
    assert!(nodes.iter().all(|n| n["pods_capacity"] == 253), "{v}");
    let routes_before = n1.overlay_routes();

    block(&c, true);
    let named = wait_for(WITHIN, || {
        let (out, v) = cluster_status(n3);
        let p1 = problems_of(&v, &n1.name);
        let p2 = problems_of(&v, &n2.name);
        (out.status.code() == Some(6) && p1.contains(&n2.name) && p2.contains(&n1.name))
            .then_some(v)
    });
    let v = named.unwrap_or_else(|| {
        panic!(
            "the blocked pair was not named: {:?}\n{}",
            cluster_status(n3),
            c.logs()
        )
    });
    assert_eq!(problems_of(&v, &n3.name), "[]", "{v}");
    assert!(!problems_of(&v, &n1.name).contains(&n3.name), "{v}");
    assert_eq!(metric(&n1.metrics(), "twill_peers_unreachable"), Some(1.0));
    assert_eq!(metric(&n3.metrics(), "twill_peers_unreachable"), Some(0.0));

    // doctor on node-1 names node-2 as the VXLAN problem.
    let out = n1
        .ns
        .command(twill_tests::bins::bin("twillctl"))
        .args([
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--etcd-prefix",
            ETCD_PREFIX,
        ])
        .args(["doctor", "--node-name", &n1.name])
        .arg("--subnet-file")
        .arg(n1.subnet_file())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vxlan-peers")
            && text.contains(&format!("no answer through the overlay from {}", n2.name)),
        "{text}"
    );
    // The probes changed nothing in the data plane.
    assert_eq!(n1.overlay_routes(), routes_before);

    // Each blocked node's own PEER table: the other one down, node-3 up.
    for (me, other) in [(n1, n2), (n2, n1)] {
        let want = verdicts(&[(&other.name, "no"), (&n3.name, "yes")]);
        let seen = wait_for(WITHIN, || {
            let got = peer_verdicts(me);
            (got == want).then_some(got)
        });
        assert!(
            seen.is_some(),
            "{}'s PEER table never said {want:?}: {:?}",
            me.name,
            node_status(me, true)
        );
    }
    let (out, v) = node_status(n1, true);
    assert!(out.status.success(), "{out:?}");
    let row = v["peer_health"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == n2.name.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["path"], "vxlan", "{row}");
    assert!(row["lost_in_a_row"].as_u64().unwrap() >= 3, "{row}");
    assert!(v["peer_health"]["reason"].is_null(), "{v}");
    // The lease peers of the earlier JSON are still there, unchanged in form.
    assert_eq!(v["peers"].as_array().map(Vec::len), Some(2), "{v}");
    // The table for people: node-2's row says no.
    let (out, _) = node_status(n1, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PEERS")
            && text
                .lines()
                .any(|l| l.starts_with(&n2.name) && l.split_whitespace().nth(3) == Some("no")),
        "{text}"
    );

    block(&c, false);
    let cleared = wait_for(WITHIN, || {
        let (out, _) = cluster_status(n3);
        (out.status.code() == Some(0)).then_some(())
    });
    assert!(
        cleared.is_some(),
        "still named after the block was lifted: {:?}",
        cluster_status(n3)
    );
    assert_eq!(metric(&n1.metrics(), "twill_peers_unreachable"), Some(0.0));
    for me in [n1, n2, n3] {
        let want: std::collections::BTreeMap<String, String> = [n1, n2, n3]
            .iter()
            .filter(|n| n.name != me.name)
            .map(|n| (n.name.clone(), "yes".to_string()))
            .collect();
        let seen = wait_for(WITHIN, || (peer_verdicts(me) == want).then_some(()));
        assert!(
            seen.is_some(),
            "{}'s PEER table not all reachable after the block: {:?}",
            me.name,
            node_status(me, true)
        );
    }

    // No twilld, no report (it expires after 3 publish periods): one reason, not an error.
    c.nodes[2].kill_daemon();
    let n3 = &c.nodes[2];
    let gone = wait_for(WITHIN, || {
        let (out, v) = node_status(n3, true);
        (out.status.success() && v["peer_health"]["peers"].is_null()).then_some(v)
    });
    let v = gone.unwrap_or_else(|| panic!("report never expired: {:?}", node_status(n3, true)));
    let why = v["peer_health"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("no health report"), "{v}");
    let (out, _) = node_status(n3, false);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("peer health: no health report"),
        "{out:?}"
    );
}
