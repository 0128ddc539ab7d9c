//! Cluster test: a twilld whose --net-conf is incompatible with the config in etcd (another
//! VNI) stays up but not ready, says why on /readyz, and builds no data plane.

use std::time::Duration;

use twill_tests::cluster::{Cluster, ClusterOpts, wait_for};

#[test]
fn incompatible_net_conf_is_refused_not_ready() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 1,
        pods_per_node: 0,
        ..ClusterOpts::default()
    })
    .unwrap();
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":2}}"#,
    )
    .unwrap();
    let i = c.add_node().unwrap();
    let n = &c.nodes[i];
    let body = wait_for(Duration::from_secs(10), || match n.http("/readyz") {
        Ok((503, b)) if b.contains("incompatible") => Some(b),
        _ => None,
    })
    .unwrap_or_else(|| panic!("no 503 with the reason\n{}", n.log_text()));
    assert!(body.contains("VNI"), "{body}");
    assert_eq!(n.http("/healthz").unwrap().0, 200);
    let links = n.ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("twill."), "a device was created: {links}");
    assert!(!n.subnet_file().exists(), "subnet file written");
    // The first node is unaffected.
    assert!(c.nodes[0].ready());
}
