//! Cluster test (root, real etcd, real twilld per node, real pods): `Backend.DirectRouting`.
//!
//! Two L2 segments, each a bridge in the underlay namespace (br0 192.168.50.0/24, br1
//! 192.168.60.0/24), joined by that namespace's own IP stack with forwarding on (the
//! router, .254 on each). Nodes A and B are on segment 1, C on segment 2. Traffic is
//! counted by nft counters in a table the test owns inside A's namespace (postrouting, out
//! of eth0): VXLAN (UDP 8472) to each peer, and unencapsulated pod packets to each peer's
//! subnet.

//!
//! Also a kernel test of the direct-route verbs in a fresh namespace (lookup, replace of a
//! VXLAN route in place, dump, ownership, the monitor's events).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use twill_dataplane::overlay::{
    self, DirectRoute, Mac, Monitor, MonitorEvent, Op, Overlay, Route, RouteMode, RtnlOverlay,
    VxlanSpec, route_mode,
};
use twill_dataplane::{Error, NetNs, Netlink};
use twill_tests::cluster::{Cluster, ClusterOpts, NETWORK, Node, ping, unique_prefix, wait_for};
use twill_tests::netns::{TestNetns, require_root};

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
fn status_route(st: &serde_json::Value, subnet: &str) -> String {
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
/// A's route to C to direct, with the ping still answered; a restart of A's twilld writes
/// nothing.
#[test]
fn peers_on_the_segment_are_routed_directly() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 0,
        pods_per_node: 0,
        // No resync within the test (it takes ~7 s): a switch of route mode comes from the
        // route notifications, and is waited for 15 s at most.
        resync: Duration::from_secs(60),
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
    assert_eq!(status_route(&st, &sb), "direct", "{st}");
    assert_eq!(status_route(&st, &sc), "vxlan", "{st}");
    assert_eq!(st["in_sync"], true, "{st}");
    let table = na
        .ns
        .command(twill_tests::bins::bin("twillctl"))
        .args(["--etcd-endpoints", "http://127.0.0.1:2379", "status"])
        .args(["--node-name", &na.name])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("direct routing on: 1 peers direct, 1 over VXLAN")
            && table.contains("ROUTE"),
        "{table}"
    );

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
    assert_eq!(status_route(&status(na), &sc), "direct");
    // The table with the direct-path filter was written once (the restart below shows that
    // the comparison with what it must be finds it right).
    let log = na.log_text();
    assert_eq!(log.matches("nftables table written").count(), 1, "{log}");

    // A restart adopts the direct routes, the table and its sets: no write at all (a table
    // that did not compare equal would be rewritten, its sets flushed).
    let before = log.len();
    c.nodes[a].stop_daemon().unwrap();
    c.start_daemon(a).unwrap();
    c.wait_ready(a, Duration::from_secs(20)).unwrap();
    let na = &c.nodes[a];
    let after = na.log_text()[before..].to_string();
    assert!(after.contains("data plane ready"), "{after}");
    for line in ["reconciled", "drift repaired", "nftables table written"] {
        assert!(!after.contains(line), "{line:?} after a restart:\n{after}");
    }
    assert!(route_to(na, &sb).contains(&format!("via {B_IP} dev eth0")));
    assert!(
        ping(&na.pods[0].ns, c.nodes[cc].pods[0].ip, 3, 2),
        "A→C after the restart"
    );
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
    assert_eq!(status_route(&status(na), &sb), "vxlan");
}

/// The one line of `ip route show <dst>` in `ns`.
fn routes_of(ns: &TestNetns, dst: &str) -> Vec<String> {
    ns.ip(&["route", "show", dst])
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// Waits (bounded) for a monitor event that `want` accepts.
async fn event(m: &mut Monitor, want: impl Fn(&MonitorEvent) -> bool) -> MonitorEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ev = tokio::time::timeout_at(deadline, m.next())
            .await
            .expect("the event within 5 s")
            .expect("monitor open");
        if want(&ev) {
            return ev;
        }
    }
}

/// Proves the kernel side of the verbs: the lookup tells an on-link address (direct) from
/// one behind a gateway and from an unreachable one; a direct route replaces twill's VXLAN
/// route to the same dst in place (one route, through the batch socket as twilld sends it)
/// and back; the dump files it under `direct`; a route to the dst that is not twill's is a
/// conflict and stays; deletes are idempotent; the monitor reports twill's direct route on
/// the underlay and other routes as `ForeignRoute`.
#[tokio::test]
async fn direct_route_verbs_in_the_kernel() {
    require_root();
    let ns = TestNetns::named(format!("{}-dr", unique_prefix())).unwrap();
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"])
        .unwrap();
    ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "u0"])
        .unwrap();
    ns.ip(&["link", "set", "u0", "up"]).unwrap();
    ns.ip(&["link", "set", "u1", "up"]).unwrap();
    ns.ip(&["route", "add", "default", "via", "192.168.77.254"])
        .unwrap();
    let netns = NetNs::open(ns.path()).unwrap();
    let o = RtnlOverlay::new(Netlink::open(&netns).unwrap());
    let o0 = o.clone();
    let batched = netns.run_in(move || o0.with_batch()).unwrap().unwrap();
    let u0: u32 = ns
        .ip(&["-o", "link", "show", "u0"])
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (vx, _) = o
        .ensure_vxlan(&VxlanSpec {
            vni: 1,
            port: overlay::DEFAULT_VXLAN_PORT,
            underlay_index: u0,
            local: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1)),
            mtu: 1450,
            mac: Mac::derive("node-a"),
            address: Ipv4Addr::new(10, 244, 1, 0),
        })
        .await
        .unwrap();
    let mut mon = Monitor::open(&netns).unwrap();

    // Lookups.
    let peer = Ipv4Addr::new(192, 168, 77, 2);
    let p = o.lookup_route(peer).await.unwrap().expect("a path");
    assert_eq!((p.oif, p.gateway, p.unicast), (Some(u0), None, true));
    assert_eq!(route_mode(Some(&p), u0), RouteMode::Direct);
    let far = o
        .lookup_route(Ipv4Addr::new(10, 9, 9, 9))
        .await
        .unwrap()
        .expect("a path");
    assert_eq!(
        far.gateway,
        Some(IpAddr::V4(Ipv4Addr::new(192, 168, 77, 254)))
    );
    assert_eq!(route_mode(Some(&far), u0), RouteMode::Vxlan);
    // Its own address: a local route, not unicast.
    let own = o
        .lookup_route(Ipv4Addr::new(192, 168, 77, 1))
        .await
        .unwrap();
    assert_eq!(route_mode(own.as_ref(), u0), RouteMode::Vxlan);

    // VXLAN route, then the direct one in its place (batched, as twilld writes), and back.
    let dst: ipnet::Ipv4Net = "10.244.2.0/24".parse().unwrap();
    let vroute = Route {
        dst,
        via: dst.network(),
    };
    let direct = DirectRoute {
        dst,
        via: peer,
        dev: u0,
    };
    o.replace_route(vx.index, &vroute).await.unwrap();
    assert!(routes_of(&ns, "10.244.2.0/24")[0].contains("dev twill.1"));
    let failed = batched
        .apply_ops(vx.index, &[Op::ReplaceDirect(direct)], 8)
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        routes_of(&ns, "10.244.2.0/24"),
        ["10.244.2.0/24 via 192.168.77.2 dev u0 proto 116"]
    );
    let ev = event(
        &mut mon,
        |e| matches!(e, MonitorEvent::RouteUp { link, .. } if *link == u0),
    )
    .await;
    assert_eq!(
        ev,
        MonitorEvent::RouteUp {
            link: u0,
            route: Route { dst, via: peer }
        }
    );
    let d = o.dump(vx.index).await.unwrap();
    assert_eq!(d.direct.iter().collect::<Vec<_>>(), [&direct]);
    assert!(d.routes.is_empty(), "{d:?}");
    // Replacing what is there changes nothing; the VXLAN route takes the place back.
    o.replace_direct(&direct).await.unwrap();
    assert_eq!(routes_of(&ns, "10.244.2.0/24").len(), 1);
    let failed = batched
        .apply_ops(vx.index, &[Op::ReplaceRoute(vroute)], 8)
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    let r = routes_of(&ns, "10.244.2.0/24");
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].contains("dev twill.1"), "{r:?}");
    // Deleting the direct route (now gone) is fine and leaves the VXLAN route.
    o.delete_direct(&direct).await.unwrap();
    assert_eq!(routes_of(&ns, "10.244.2.0/24").len(), 1);

    // Someone else's route to a peer subnet: a conflict, left as it is.
    ns.ip(&["route", "add", "10.244.3.0/24", "via", "192.168.77.3"])
        .unwrap();
    let theirs = DirectRoute {
        dst: "10.244.3.0/24".parse().unwrap(),
        via: peer,
        dev: u0,
    };
    match o.replace_direct(&theirs).await {
        Err(Error::Conflict(why)) => assert!(why.contains("10.244.3.0/24"), "{why}"),
        r => panic!("not a conflict: {r:?}"),
    }
    let failed = batched
        .apply_ops(vx.index, &[Op::ReplaceDirect(theirs)], 8)
        .await;
    assert!(
        matches!(failed[..], [(_, Error::Conflict(_))]),
        "{failed:?}"
    );
    assert_eq!(
        routes_of(&ns, "10.244.3.0/24"),
        ["10.244.3.0/24 via 192.168.77.3 dev u0"]
    );
    o.delete_direct(&theirs).await.unwrap();
    assert_eq!(
        routes_of(&ns, "10.244.3.0/24").len(),
        1,
        "deleted a foreign route"
    );
    let ev = event(&mut mon, |e| matches!(e, MonitorEvent::ForeignRoute { .. })).await;
    assert_eq!(
        ev,
        MonitorEvent::ForeignRoute {
            oif: Some(u0),
            dst: "10.244.3.0/24".parse().unwrap()
        }
    );
    // Unreachable once the default route is gone.
    ns.ip(&["route", "del", "default"]).unwrap();
    assert_eq!(
        o.lookup_route(Ipv4Addr::new(10, 9, 9, 9)).await.unwrap(),
        None
    );
}
