//! `--metrics-scrape-addr`: Prometheus on another host can scrape /metrics, and nothing else
//! is exposed there; the probes stay on loopback. 2 nodes, real etcd, real twilld: node 1
//! plays the Prometheus host and scrapes node 0 over the underlay.

use std::net::SocketAddr;

use std::time::Duration;

use twill_tests::cluster::{Cluster, ClusterOpts, http_get, metric, wait_for};

#[test]
fn metrics_are_scrapable_from_another_node_and_probes_are_not() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 0,
        extra_args: vec!["--metrics-scrape-addr".into(), "0.0.0.0:9473".into()],
        ..ClusterOpts::default()
    })
    .unwrap();
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let scrape: SocketAddr = format!("{}:9473", n0.ip).parse().unwrap();

    let (code, body) = http_get(&n1.ns.path(), scrape, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}\n{}", c.logs());
    assert_eq!(metric(&body, "twill_peers"), Some(1.0), "{body}");
    assert!(
        body.contains(&format!(
            "twill_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );

    // Expected next to programmed: one peer, one route/FDB/neighbour each, all there.
    for (want, have) in [
        ("twill_routes_expected", "twill_routes_programmed"),
        ("twill_fdb_expected", "twill_fdb_programmed"),
        ("twill_neighbours_expected", "twill_neighbours_programmed"),
    ] {
        assert_eq!(metric(&body, want), Some(1.0), "{want}: {body}");
        assert_eq!(metric(&body, have), metric(&body, want), "{have}: {body}");
    }
    // The pod IPs of this node's allocator (no pods: 0 of a /24's 253), set at the first
    // health publish, which follows readiness.
    let pods = wait_for(Duration::from_secs(10), || {
        let b = n0.metrics();
        (metric(&b, "twill_pod_ips_capacity") == Some(253.0)).then_some(b)
    });
    let pods = pods.unwrap_or_else(|| panic!("no pod IP capacity: {}", n0.metrics()));
    assert_eq!(metric(&pods, "twill_pod_ips_used"), Some(0.0), "{pods}");

    // Every metric the alert rules use is exported by a running twilld and documented.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/twill-monitoring.yml"
    ))
    .unwrap();
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/twilld.md")).unwrap();
    let mut used = Vec::new();
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("twill_") && !used.contains(&word) {
                used.push(word);
            }
        }
    }
    assert!(used.len() >= 5, "rules use only {used:?}");
    for name in used {
        let exported = body
            .lines()
            .any(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']));
        assert!(exported, "rule metric {name} not exported:\n{body}");
        // Listed as `name` or, with its labels, `name{label}`.
        assert!(
            docs.contains(&format!("`{name}`")) || docs.contains(&format!("`{name}{{")),
            "{name} not in docs/twilld.md"
        );
    }

    // Only /metrics on the scrape address: no readiness detail for strangers.
    let (code, _) = http_get(&n1.ns.path(), scrape, "/readyz").unwrap();
    assert_eq!(code, 404);
    // The probe address is loopback only: another host cannot reach it at all...
    let probes: SocketAddr = format!("{}:9472", n0.ip).parse().unwrap();
    assert!(http_get(&n1.ns.path(), probes, "/healthz").is_err());
    // ...while the node itself still can (so the check above can fail for the right reason).
    assert_eq!(n0.http("/readyz").unwrap().0, 200);
}
