//! Cluster test of the dual-stack data plane (issue 12): 3 nodes on a dual-stack underlay
//! (IPv4 and an IPv6 ULA on each node's eth0), real etcd, real twilld with an `EnableIPv6`
//! config. Each node takes a v4+v6 pair lease and programs `twill-v6.1`; a "pod" per node
//! (a namespace with one IPv4 and one IPv6 address of its node's subnets, made by hand: the
//! CNI plugin's dual-stack lands separately) reaches every other pod over IPv4 and IPv6; a
//! TCP server over IPv6 sees the client pod's own address (no NAT); a Flannel-format
//! dual-stack lease written by hand, with a namespace playing the Flannel node
//! (`flannel-v6.1`), is reached over IPv6. A second test: an IPv4-only config still gets no
//! IPv6 device, key or subnet-file line.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use twill_ipam::subnet_file::SubnetFile;
use twill_tests::cluster::{
    Cluster, ClusterOpts, ETCD_PREFIX, Node, in_netns, metric, ping, ping6, wait_for,
};
use twill_tests::netns::{TestNetns, veth_between, veth_on_bridge};

const DUAL: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan","VNI":1}}"#;

/// A node's IPv4 and IPv6 subnets from its subnet file.
fn subnets(n: &Node) -> (Ipv4Net, Ipv6Net) {
    let f = SubnetFile::read(n.subnet_file()).expect("subnet file");
    let IpNet::V4(v4) = f.node_subnet() else {
        panic!("IPv4 subnet file expected")
    };
    let Some(IpNet::V6(v6)) = f.ipv6_subnet else {
        panic!("{}: no FLANNEL_IPV6_SUBNET in {f:?}", n.name)
    };
    (v4, v6.trunc())
}

fn host(net: Ipv4Net, h: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + h)
}

fn host6(net: Ipv6Net, h: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + h)
}

/// A pod made by hand on node `n`: veth `hp0` (node) / `eth0` (pod), the node side with the
/// subnets' first addresses, the pod with `.10` / `::10` and default routes to them.
fn hand_pod(c: &Cluster, n: &Node, k: usize) -> (TestNetns, Ipv4Addr, Ipv6Addr) {
    let (s4, s6) = subnets(n);
    let ns = TestNetns::named(format!("{}-hp{k}", c.prefix)).unwrap();
    veth_between(&n.ns, "hp0", &ns, "eth0").unwrap();
    let (gw4, gw6) = (host(s4, 1), host6(s6, 1));
    let (ip4, ip6) = (host(s4, 10), host6(s6, 0x10));
    n.ns.ip(&[
        "addr",
        "add",
        &format!("{gw4}/{}", s4.prefix_len()),
        "dev",
        "hp0",
    ])
    .unwrap();
    n.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{gw6}/64"),
        "dev",
        "hp0",
        "nodad",
    ])
    .unwrap();
    ns.ip(&[
        "addr",
        "add",
        &format!("{ip4}/{}", s4.prefix_len()),
        "dev",
        "eth0",
    ])
    .unwrap();
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    ns.ip(&["route", "add", "default", "via", &gw4.to_string()])
        .unwrap();
    ns.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()])
        .unwrap();
    // The new links settle (link-local DAD, first NDP) before the matrix counts a loss.
    let up = wait_for(Duration::from_secs(5), || {
        (ping(&ns, gw4, 1, 1) && ping6(&ns, gw6, 1, 1)).then_some(())
    });
    assert!(up.is_some(), "pod on {} cannot reach its gateways", n.name);
    (ns, ip4, ip6)
}

fn link_exists(ns: &TestNetns, name: &str) -> bool {
    ns.ip(&["link", "show", name]).is_ok()
}

/// What `ip -6 <args>` prints inside `ns` (empty on error).
fn ip6(ns: &TestNetns, args: &[&str]) -> String {
    let mut a = vec!["-6"];
    a.extend_from_slice(args);
    ns.ip(&a).unwrap_or_default()
}

fn etcd_keys(c: &Cluster) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = twill_ipam::store::LeaseStore::connect(c.etcd_options())
            .await
            .unwrap();
        let mut kv = store.client().kv_client();
        let prefix = format!("{ETCD_PREFIX}/subnets/");
        let r = kv
            .get(
                prefix.as_str(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| {
                kv.key_str()
                    .unwrap()
                    .trim_start_matches(&prefix)
                    .to_string()
            })
            .collect()
    })
}

fn etcd_delete(c: &Cluster, key: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = twill_ipam::store::LeaseStore::connect(c.etcd_options())
            .await
            .unwrap();
        let mut kv = store.client().kv_client();
        kv.delete(format!("{ETCD_PREFIX}/subnets/{key}"), None)
            .await
            .unwrap();
    })
}

fn etcd_put(c: &Cluster, key: &str, value: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = twill_ipam::store::LeaseStore::connect(c.etcd_options())
            .await
            .unwrap();
        let mut kv = store.client().kv_client();
        kv.put(format!("{ETCD_PREFIX}/subnets/{key}"), value, None)
            .await
            .unwrap();
    })
}

#[test]
fn dual_stack_pods_reach_each_other_over_ipv4_and_ipv6_and_a_flannel_node() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 3,
        pods_per_node: 0,
        net_conf: Some(DUAL.to_string()),
        underlay_ipv6: true,
        ..Default::default()
    })
    .unwrap();

    // Each node holds a pair key (`<v4>-24&<v6>-64`) and has twill-v6.1 with local = its
    // IPv6 underlay address, learning off, MTU 1500 - 70, and its IPv6 net address /128.
    let keys = etcd_keys(&c);
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| k.contains('&')), "{keys:?}");
    for n in &c.nodes {
        let (_, s6) = subnets(n);
        let d = ip6(&n.ns, &["-d", "addr", "show", "dev", "twill-v6.1"]);
        let local = n.ip6.unwrap().to_string();
        assert!(d.contains(&format!("local {local}")), "{}: {d}", n.name);
        assert!(d.contains("nolearning"), "{d}");
        assert!(d.contains("mtu 1430"), "{d}");
        assert!(d.contains(&format!("{}/128", s6.network())), "{d}");
        let sub = std::fs::read_to_string(n.subnet_file()).unwrap();
        assert!(sub.contains("FLANNEL_IPV6_NETWORK=fd00:10::/56"), "{sub}");
        // One MTU for a pod's both families: the smaller device's.
        assert!(sub.contains("FLANNEL_MTU=1430"), "{sub}");
        let fwd =
            n.ns.exec_output("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"])
                .unwrap();
        assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
    }
    // Every node has a route, permanent neighbour and FDB entry for the 2 others over IPv6.
    for n in &c.nodes {
        let ok = wait_for(Duration::from_secs(10), || {
            let r = ip6(
                &n.ns,
                &["route", "show", "dev", "twill-v6.1", "proto", "116"],
            );
            (r.lines().filter(|l| l.contains("onlink")).count() == 2).then_some(())
        });
        assert!(
            ok.is_some(),
            "{}: {}\n{}",
            n.name,
            ip6(&n.ns, &["route"]),
            c.logs()
        );
        let neigh = ip6(
            &n.ns,
            &["neigh", "show", "dev", "twill-v6.1", "nud", "permanent"],
        );
        assert_eq!(neigh.lines().count(), 2, "{neigh}");
        let fdb =
            n.ns.exec_output("bridge", &["fdb", "show", "dev", "twill-v6.1"])
                .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        for other in c.nodes.iter().filter(|o| o.name != n.name) {
            let dst = other.ip6.unwrap().to_string();
            assert!(fdb.contains(&format!("dst {dst}")), "{}: {fdb}", n.name);
        }
        let nft =
            n.ns.exec_output("nft", &["list", "set", "ip6", "twill", "peers6"])
                .unwrap();
        let nft = String::from_utf8_lossy(&nft.stdout);
        for other in c.nodes.iter().filter(|o| o.name != n.name) {
            assert!(nft.contains(&other.ip6.unwrap().to_string()), "{nft}");
        }
    }

    // A pod per node; the ping and ping6 matrix.
    let pods: Vec<_> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(k, n)| hand_pod(&c, n, k))
        .collect();
    let mut failures = Vec::new();
    for (from, src4, src6) in &pods {
        for (_, dst4, dst6) in &pods {
            if dst4 == src4 {
                continue;
            }
            if !ping(from, *dst4, 1, 2) {
                failures.push(format!("{src4} -> {dst4}"));
            }
            if !ping6(from, *dst6, 1, 2) {
                failures.push(format!("{src6} -> {dst6}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "unreachable: {failures:#?}\n{}",
        c.logs()
    );

    // TCP over IPv6: the server in node 1's pod sees node 2's pod's own IPv6 address.
    let (server_ns, _, server_ip) = (&pods[0].0, pods[0].1, pods[0].2);
    let (client_ns, client_ip) = (&pods[1].0, pods[1].2);
    let listener = in_netns(&server_ns.path(), || TcpListener::bind("[::]:7777"))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(peer.ip().to_string().as_bytes()).unwrap();
        peer
    });
    let mut stream = in_netns(&client_ns.path(), move || {
        TcpStream::connect_timeout(&SocketAddr::from((server_ip, 7777)), Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    let mut seen = String::new();
    stream.read_to_string(&mut seen).unwrap();
    let peer = server.join().unwrap();
    assert_eq!(peer.ip(), IpAddr::V6(client_ip), "the server saw {peer}");

    // A Flannel node: a Flannel-format dual-stack lease written by hand, and a namespace
    // with a `flannel-v6.1` VXLAN device (the lease's IPv6 VTEP) and a pod address.
    let fl = TestNetns::named(format!("{}-fl", c.prefix)).unwrap();
    veth_on_bridge(&c.underlay, "br0", "fl", &fl, "eth0").unwrap();
    fl.ip(&["addr", "add", "192.168.50.99/24", "dev", "eth0"])
        .unwrap();
    fl.ip(&["-6", "addr", "add", "fd50::99/64", "dev", "eth0", "nodad"])
        .unwrap();
    let mac6 = "0e:f1:00:00:00:63";
    fl.ip(&[
        "link",
        "add",
        "flannel-v6.1",
        "address",
        mac6,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "fd50::99",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])
    .unwrap();
    fl.ip(&["link", "set", "flannel-v6.1", "up"]).unwrap();
    let fl6: Ipv6Net = "fd00:10:0:c8::/64".parse().unwrap();
    fl.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:10:0:c8::/128",
        "dev",
        "flannel-v6.1",
        "nodad",
    ])
    .unwrap();
    // The Flannel node's "pod": an address of its subnet on lo (no dummy module here).
    fl.ip(&["link", "set", "lo", "up"]).unwrap();
    let fl_pod = host6(fl6, 0x10);
    fl.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{fl_pod}/128"),
        "dev",
        "lo",
        "nodad",
    ])
    .unwrap();
    // Its way back to node 1's pods, as flanneld programs it from node 1's lease.
    let n0 = &c.nodes[0];
    let (_, n0_6) = subnets(n0);
    let n0_mac = n0.ns.ip(&["-j", "link", "show", "twill-v6.1"]).unwrap();
    let n0_mac: serde_json::Value = serde_json::from_str(&n0_mac).unwrap();
    let n0_mac = n0_mac[0]["address"].as_str().unwrap().to_string();
    let via = n0_6.network().to_string();
    fl.ip(&[
        "-6",
        "route",
        "add",
        &n0_6.to_string(),
        "via",
        &via,
        "dev",
        "flannel-v6.1",
        "onlink",
    ])
    .unwrap();
    fl.ip(&[
        "-6",
        "neigh",
        "add",
        &via,
        "lladdr",
        &n0_mac,
        "dev",
        "flannel-v6.1",
        "nud",
        "permanent",
    ])
    .unwrap();
    let out = fl
        .exec_output(
            "bridge",
            &[
                "fdb",
                "append",
                &n0_mac,
                "dev",
                "flannel-v6.1",
                "dst",
                &n0.ip6.unwrap().to_string(),
                "self",
                "permanent",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The lease as flanneld writes it (no NodeName; BackendV6Data beside BackendData).
    etcd_put(
        &c,
        "10.244.200.0-24&fd00:10:0:c8::-64",
        &format!(
            r#"{{"PublicIP":"192.168.50.99","PublicIPv6":"fd50::99","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:f1:00:00:00:04"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
        ),
    );
    let reached = wait_for(Duration::from_secs(10), || {
        ping6(&pods[0].0, fl_pod, 1, 1).then_some(())
    });
    assert!(
        reached.is_some(),
        "Flannel node's pod {fl_pod} unreachable over IPv6: {}\n{}",
        ip6(&n0.ns, &["route"]),
        c.logs()
    );

    // A lease with a bad IPv6 side is rejected for IPv6 only, by key and field: its IPv4
    // route is programmed, no IPv6 route; twillctl status shows both sides in sync.
    let bad_key = "10.244.201.0-24&fd00:10:0:c9::-64";
    etcd_put(
        &c,
        bad_key,
        r#"{"PublicIP":"192.168.50.98","PublicIPv6":"not-an-ip","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:f1:00:00:00:05"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:f1:00:00:00:06"}}"#,
    );
    let v4_route = wait_for(Duration::from_secs(10), || {
        n0.has_route("10.244.201.0/24").then_some(())
    });
    assert!(v4_route.is_some(), "{}", c.logs());
    let status = wait_for(Duration::from_secs(10), || {
        let out = n0
            .ns
            .command(twill_tests::bins::bin("twillctl"))
            .args([
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "status",
                "-o",
                "json",
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["ipv6"]["in_sync"] == true && v["in_sync"] == true).then_some(v)
    });
    let v = status.unwrap_or_else(|| panic!("status not in sync\n{}", c.logs()));
    let v6 = &v["ipv6"];
    assert_eq!(v6["peers"].as_array().unwrap().len(), 3, "{v6}");
    assert_eq!(v6["expected"], 9, "{v6}");
    assert_eq!(v6["vxlan"]["name"], "twill-v6.1", "{v6}");
    let rejected = v6["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{v6}");
    assert_eq!(rejected[0]["key"], bad_key, "{v6}");
    assert!(
        rejected[0]["detail"]
            .as_str()
            .unwrap()
            .contains("not-an-ip"),
        "{v6}"
    );
    assert!(
        !ip6(&n0.ns, &["route"]).contains("fd00:10:0:c9::"),
        "an IPv6 route for the bad lease"
    );
    let m = n0.metrics();
    assert_eq!(metric(&m, "twill_ipv6_peers"), Some(3.0), "{m}");
    assert_eq!(metric(&m, "twill_ipv6_leases_rejected"), Some(1.0), "{m}");
    assert!(
        n0.log_text().contains("lease rejected for IPv6"),
        "{}",
        n0.log_text()
    );

    // Drift on twill-v6.1 comes back from the netlink events (the resync is 30 s away).
    let (_, n1_6) = subnets(&c.nodes[1]);
    let n0 = &c.nodes[0];
    n0.ns
        .ip(&["-6", "route", "del", &n1_6.to_string(), "dev", "twill-v6.1"])
        .unwrap();
    n0.ns
        .ip(&[
            "-6",
            "neigh",
            "del",
            &n1_6.network().to_string(),
            "dev",
            "twill-v6.1",
        ])
        .unwrap();
    let back = wait_for(Duration::from_secs(5), || {
        let r = ip6(&n0.ns, &["route", "show", &n1_6.to_string()]);
        let n = ip6(
            &n0.ns,
            &["neigh", "show", "dev", "twill-v6.1", "nud", "permanent"],
        );
        (r.contains("onlink") && n.contains(&n1_6.network().to_string())).then_some(())
    });
    assert!(back.is_some(), "IPv6 drift not repaired\n{}", n0.log_text());

    // A removed lease removes its IPv6 entries (stale).
    etcd_delete(&c, "10.244.200.0-24&fd00:10:0:c8::-64");
    let gone = wait_for(Duration::from_secs(5), || {
        (!ip6(&n0.ns, &["route"]).contains("fd00:10:0:c8::/64")
            && !ip6(&n0.ns, &["neigh", "show", "dev", "twill-v6.1"]).contains("fd00:10:0:c8::"))
        .then_some(())
    });
    assert!(gone.is_some(), "{}", ip6(&n0.ns, &["route"]));

    // A restart adopts twill-v6.1 (same index and MAC: peers' entries stay right).
    let show = |n: &Node| {
        let j = n.ns.ip(&["-j", "link", "show", "twill-v6.1"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        (v[0]["ifindex"].clone(), v[0]["address"].clone())
    };
    let before = show(&c.nodes[0]);
    c.nodes[0].stop_daemon().unwrap();
    c.start_daemon(0).unwrap();
    c.wait_ready(0, Duration::from_secs(20)).unwrap();
    assert_eq!(show(&c.nodes[0]), before);
    assert!(ping6(&pods[0].0, pods[2].2, 1, 2), "{}", c.logs());
}

#[test]
fn an_ipv4_only_config_gets_no_ipv6_device_key_or_subnet_file_line() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        underlay_ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let keys = etcd_keys(&c);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains('&')), "{keys:?}");
    for n in &c.nodes {
        assert!(!link_exists(&n.ns, "twill-v6.1"), "{}", n.name);
        assert!(link_exists(&n.ns, "twill.1"), "{}", n.name);
        let sub = std::fs::read_to_string(n.subnet_file()).unwrap();
        assert!(!sub.contains("IPV6"), "{sub}");
        assert!(sub.contains("FLANNEL_MTU=1450"), "{sub}");
        let nft =
            n.ns.exec_output("nft", &["list", "table", "ip6", "twill"])
                .unwrap();
        assert!(!nft.status.success(), "an ip6 table on an IPv4-only node");
    }
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    assert!(ping(&a.ns, b.ip, 1, 2), "{}", c.logs());
}

/// The pod's global IPv6 addresses on `eth0`, with whether each is still tentative.
fn pod_ipv6(ns: &TestNetns) -> Vec<(Ipv6Addr, bool)> {
    let out = ns
        .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])
        .unwrap();
    out.lines()
        .filter_map(|l| {
            let mut t = l.split_whitespace().skip_while(|t| *t != "inet6");
            let addr = t.nth(1)?.split('/').next()?.parse().ok()?;
            Some((addr, l.contains("tentative")))
        })
        .collect()
}

/// End to end, the two halves together: twilld on dual-stack nodes writes the subnet file
/// with FLANNEL_IPV6_SUBNET, the real `twill` plugin (CNI ADD, the cluster harness's pods)
/// gives each pod an address of its node's IPv6 subnet, usable at once (not tentative),
/// and the pods on different nodes reach each other over IPv6 through `twill-v6.1` (and
/// over IPv4 through `twill.1`). Fails if the plugin ignores the IPv6 subnet, if twilld
/// does not write it, or if the IPv6 overlay does not carry the pods' traffic.
#[test]
fn pods_made_by_the_plugin_reach_each_other_over_ipv6_across_nodes() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        net_conf: Some(DUAL.to_string()),
        underlay_ipv6: true,
        ..Default::default()
    })
    .unwrap();
    let mut v6 = Vec::new();
    for n in &c.nodes {
        let (_, s6) = subnets(n);
        let pod = &n.pods[0];
        let addrs = pod_ipv6(&pod.ns);
        assert_eq!(addrs.len(), 1, "{}: {addrs:?}", n.name);
        let (a, tentative) = addrs[0];
        assert!(s6.contains(&a), "{}: {a} not in {s6}", n.name);
        assert!(!tentative, "{}: {a} is tentative after ADD", n.name);
        v6.push(a);
    }
    for (i, n) in c.nodes.iter().enumerate() {
        let j = 1 - i;
        let (from, to4, to6) = (&n.pods[0].ns, c.nodes[j].pods[0].ip, v6[j]);
        assert!(
            ping6(from, to6, 3, 2),
            "pod on {} cannot ping6 {to6} on {}\n{}",
            n.name,
            c.nodes[j].name,
            c.logs()
        );
        assert!(
            ping(from, to4, 3, 2),
            "pod on {} cannot ping {to4}\n{}",
            n.name,
            c.logs()
        );
    }
}
