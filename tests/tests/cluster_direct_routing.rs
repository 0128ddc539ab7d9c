//! Cluster test (root, real etcd, real twilld per node, real pods): `Backend.DirectRouting`.
//!
//! Two L2 segments, each a bridge in the underlay namespace (br0 192.168.50.0/24, br1
//! 192.168.60.0/24), joined by that namespace's own IP stack with forwarding on (the
//! router, .254 on each). Nodes A and B are on segment 1, C on segment 2. Traffic is
//! counted by nft counters in a table the test owns inside A's namespace (postrouting, out
//! of eth0): VXLAN (UDP 8472) to each peer, and unencapsulated pod packets to each peer's
//! subnet.

use std::time::Duration;

use twill_tests::cluster::{Cluster, ClusterOpts, NETWORK, Node, ping, wait_for};
use twill_tests::netns::TestNetns;

const B_IP: &str = "192.168.50.12";
const C_IP: &str = "192.168.60.13";

/// Writes the cluster's net-conf.json (read by the first twilld, which puts it into etcd).
fn net_conf(c: &Cluster, direct: bool) {
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        format!(
            r#"{{"Network":"{NETWORK}","SubnetLen":24,"Backend":{{"Type":"vxlan","VNI":1,"DirectRouting":{direct}}}}}"#
        ),
    )
    .unwrap();
}

/// `ip route show <subnet>` on `n` (one line, trimmed; empty if there is none).
fn route_to(n: &Node, subnet: &str) -> String {
    n.ns.ip(&["route", "show", subnet])
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Waits until `n`'s route to `subnet` contains `want`.
fn wait_route(c: &Cluster, n: &Node, subnet: &str, want: &str) {
    let ok = wait_for(Duration::from_secs(15), || {
        route_to(n, subnet).contains(want).then_some(())
    });
    assert!(
        ok.is_some(),
        "{}: route to {subnet} is {:?}, want {want:?}\n{}",
        n.name,
        route_to(n, subnet),
        c.logs()
    );
}

/// The test's own counters in `ns` (table `ip probe`): per peer (name, underlay IP, pod
/// subnet), VXLAN packets to it and unencapsulated pod packets to its subnet, out of eth0.
fn add_probe(ns: &TestNetns, peers: &[(&str, &str, &str)]) {
    let mut t = String::from(
        "table ip probe {\n chain post { type filter hook postrouting priority 300; policy accept; }\n}\n",
    );
    for (name, ip, subnet) in peers {
        t.push_str(&format!(
            "add counter ip probe vx_{name}\nadd counter ip probe plain_{name}\n\
             add rule ip probe post oifname \"eth0\" ip daddr {ip} udp dport 8472 counter name \"vx_{name}\"\n\
             add rule ip probe post oifname \"eth0\" ip saddr {NETWORK} ip daddr {subnet} counter name \"plain_{name}\"\n"
        ));
    }
    let path = std::env::temp_dir().join(format!("twill-direct-probe-{}.nft", std::process::id()));
    std::fs::write(&path, t).unwrap();
    ns.exec("nft", &["-f", &path.display().to_string()])
        .unwrap();
    let _ = std::fs::remove_file(&path);
}

/// The packets of the named counter in `table` of `ns`.
fn counter(ns: &TestNetns, table: &str, name: &str) -> u64 {
    let out = ns
        .exec("nft", &["list", "counter", "ip", table, name])
        .unwrap();
    let mut w = out.split_whitespace();
    while let Some(x) = w.next() {
        if x == "packets" {
            return w.next().unwrap().parse().unwrap();
        }
    }
    panic!("no packets in {out}");
}

/// `twillctl status -o json` inside node `n`.
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

/// The `route` of the peer with `subnet` in a status report.
fn route_mode(st: &serde_json::Value, subnet: &str) -> String {
    st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["subnet"] == subnet)
        .map(|p| p["route"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// Proves, with DirectRouting on: A↔B (same segment) goes direct: A's route to B's subnet is
/// via B's public IP on eth0, proto 116, and a pod ping A→B puts unencapsulated pod packets
/// on eth0 and not one VXLAN packet to B; A↔C (behind the router) stays VXLAN (VXLAN
/// packets to C, no plain ones: the counters work both ways); twillctl status says which; a direct route deleted by hand comes back;
/// the direct-path filter drops spoofed cluster sources from the underlay (counted); and
/// moving C onto segment 1 (its port onto br0, on-link routes instead of the router) switches
/// A's route to C to direct, with the ping still answered.
#[test]
fn peers_on_the_segment_are_routed_directly() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 0,
        pods_per_node: 0,
        // Resyncs during the test: each compares the nft table (with the filter) and must
        // find it right.
        resync: Duration::from_secs(1),
        ..ClusterOpts::default()
    })
    .unwrap();
    net_conf(&c, true);
    // Segment 2 and the router between the two.
    {
        let u = &c.underlay;
        u.ip(&["link", "add", "br1", "type", "bridge"]).unwrap();
        u.ip(&["addr", "add", "192.168.60.254/24", "dev", "br1"])
            .unwrap();
        u.ip(&["link", "set", "br1", "up"]).unwrap();
        u.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    }
    let a = c.add_node().unwrap();
    let b = c.add_node().unwrap();
    let cc = c
        .add_node_on(
            "br1",
            C_IP.parse().unwrap(),
            24,
            "192.168.60.254".parse().unwrap(),
        )
        .unwrap();
    for i in [a, b, cc] {
        c.wait_ready(i, Duration::from_secs(20)).unwrap();
        c.add_pod(i).unwrap();
    }
    let (na, nb, nc) = (&c.nodes[a], &c.nodes[b], &c.nodes[cc]);
    let u = &c.underlay;
    let (sa, sb, sc) = (
        na.subnet().unwrap(),
        nb.subnet().unwrap(),
        nc.subnet().unwrap(),
    );

    // Routes: A→B and B→A direct on eth0, A→C and C→A on twill.1.
    wait_route(&c, na, &sb, &format!("via {B_IP} dev eth0 proto 116"));
    wait_route(&c, nb, &sa, &format!("via {} dev eth0 proto 116", na.ip));
    wait_route(&c, na, &sc, "dev twill.1 proto 116");
    wait_route(&c, nc, &sa, "dev twill.1 proto 116");
    // A direct peer has no neighbour or FDB entry on twill.1.
    let b_vtep = sb.trim_end_matches("/24");
    let neighs = na.ns.ip(&["neigh", "show", "dev", "twill.1"]).unwrap();
    assert!(!neighs.contains(b_vtep), "{neighs}");
    let fdb = na
        .ns
        .exec("bridge", &["fdb", "show", "dev", "twill.1"])
        .unwrap();
    assert!(!fdb.contains(B_IP), "{fdb}");
    assert!(fdb.contains(C_IP), "{fdb}");
    // The filter's set holds the direct peers' subnets only.
    let set = na
        .ns
        .exec("nft", &["list", "set", "ip", "twill", "direct_peers"])
        .unwrap();
    assert!(set.contains(&sb) && !set.contains(&sc), "{set}");

    add_probe(&na.ns, &[("b", B_IP, &sb), ("c", C_IP, &sc)]);
    let (pa, pb, pc) = (&na.pods[0], &nb.pods[0], &nc.pods[0]);
    assert!(ping(&pa.ns, pb.ip, 5, 2), "A→B ping\n{}", c.logs());
    assert!(ping(&pa.ns, pc.ip, 5, 2), "A→C ping\n{}", c.logs());
    assert_eq!(counter(&na.ns, "probe", "vx_b"), 0, "VXLAN to B");
    assert!(counter(&na.ns, "probe", "plain_b") >= 5);
    assert!(counter(&na.ns, "probe", "vx_c") >= 5, "VXLAN to C");
    assert_eq!(counter(&na.ns, "probe", "plain_c"), 0, "plain packets to C");

    // twillctl status says how each peer goes.
    let st = status(na);
    assert_eq!(route_mode(&st, &sb), "direct", "{st}");
    assert_eq!(route_mode(&st, &sc), "vxlan", "{st}");
    assert_eq!(st["in_sync"], true, "{st}");

    // Drift: a direct route deleted by hand is written again (from the netlink event).
    na.ns.ip(&["route", "del", &sb]).unwrap();
    wait_route(&c, na, &sb, &format!("via {B_IP} dev eth0 proto 116"));

    // Spoofed: a cluster source that is no direct peer's, from the underlay (the router
    // sends it to A's subnet via A): dropped on A and counted.
    let dropped_before = counter(&na.ns, "twill", "direct_dropped");
    u.ip(&["addr", "add", "10.244.250.1/32", "dev", "lo"])
        .unwrap();
    u.ip(&["route", "add", &sa, "via", &na.ip.to_string()])
        .unwrap();
    // Control: a source outside the cluster network is not the filter's business.
    assert!(ping(u, pa.ip, 2, 2), "router→A pod ping\n{}", c.logs());
    let spoofed = u.exec_output(
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.244.250.1",
            &pa.ip.to_string(),
        ],
    );
    assert!(
        !spoofed.map(|o| o.status.success()).unwrap_or(false),
        "a spoofed cluster source reached A's pod"
    );
    assert!(
        counter(&na.ns, "twill", "direct_dropped") >= dropped_before + 3,
        "drops not counted"
    );
    // B's pods still get through (their subnet is in the set).
    assert!(ping(&pb.ns, pa.ip, 3, 2), "B→A ping after the spoof");

    // C moves onto segment 1: its port onto br0, and on-link routes both ways (no router).
    u.ip(&["link", "set", &format!("n{}", cc + 1), "master", "br0"])
        .unwrap();
    nc.ns
        .ip(&["route", "add", "192.168.50.0/24", "dev", "eth0"])
        .unwrap();
    na.ns
        .ip(&["route", "add", &format!("{C_IP}/32"), "dev", "eth0"])
        .unwrap();
    nb.ns
        .ip(&["route", "add", &format!("{C_IP}/32"), "dev", "eth0"])
        .unwrap();
    wait_route(&c, na, &sc, &format!("via {C_IP} dev eth0 proto 116"));
    wait_route(&c, nc, &sa, &format!("via {} dev eth0 proto 116", na.ip));
    let vx_c = counter(&na.ns, "probe", "vx_c");
    let plain_c = counter(&na.ns, "probe", "plain_c");
    assert!(
        ping(&pa.ns, pc.ip, 5, 2),
        "A→C ping after the move\n{}",
        c.logs()
    );
    assert_eq!(
        counter(&na.ns, "probe", "vx_c"),
        vx_c,
        "VXLAN to C after the move"
    );
    assert!(counter(&na.ns, "probe", "plain_c") >= plain_c + 5);
    // The switch left one route, no neighbour or FDB entry for C.
    let fdb = na
        .ns
        .exec("bridge", &["fdb", "show", "dev", "twill.1"])
        .unwrap();
    assert!(!fdb.contains(C_IP), "{fdb}");
    assert_eq!(route_to(na, &sc).lines().count(), 1);
    assert_eq!(route_mode(&status(na), &sc), "direct");
    // The table with the direct-path filter was written once: every resync's comparison
    // found it as expected (a mismatch would rewrite it, and flush its sets, each time).
    let log = na.log_text();
    assert_eq!(log.matches("nftables table written").count(), 1, "{log}");
}

/// Proves that without DirectRouting nothing changes: peers on the same segment keep their
/// VXLAN routes on twill.1 and no direct-path filter is written.
#[test]
fn without_direct_routing_everything_stays_vxlan() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 0,
        pods_per_node: 0,
        ..ClusterOpts::default()
    })
    .unwrap();
    net_conf(&c, false);
    let a = c.add_node().unwrap();
    let b = c.add_node().unwrap();
    for i in [a, b] {
        c.wait_ready(i, Duration::from_secs(20)).unwrap();
        c.add_pod(i).unwrap();
    }
    let (na, nb) = (&c.nodes[a], &c.nodes[b]);
    let sb = nb.subnet().unwrap();
    wait_route(&c, na, &sb, "dev twill.1 proto 116");
    add_probe(&na.ns, &[("b", B_IP, &sb)]);
    assert!(ping(&na.pods[0].ns, nb.pods[0].ip, 5, 2), "A→B ping");
    assert!(counter(&na.ns, "probe", "vx_b") >= 5);
    assert_eq!(counter(&na.ns, "probe", "plain_b"), 0);
    let table = na
        .ns
        .exec("nft", &["list", "table", "ip", "twill"])
        .unwrap();
    assert!(!table.contains("direct_peers"), "{table}");
    assert_eq!(route_mode(&status(na), &sb), "vxlan");
}
