//! Issue 13, peer health: 3 real nodes probe each other through the overlay. UDP 8472 is
//! then blocked between node-1 and node-2 (nft in the underlay namespace, the switch
//! between them, as a cloud security group would). Within the documented time, node-1's
//! metrics, `twillctl cluster status` and `twillctl doctor` name exactly that pair, and
//! node-3 stays clean; once the block is lifted they say nothing again. The probes never
//! change the data plane: the routes stay as they were throughout.

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
}
