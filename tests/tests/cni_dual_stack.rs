//! Kernel tests of dual-stack pods: the real `twill` binary exec'd in a node namespace whose
//! subnet file carries FLANNEL_IPV6_NETWORK / FLANNEL_IPV6_SUBNET (written by hand, as
//! twilld would), pods as namespaces, real IPv4 and IPv6 packets. Root required.

mod cni_common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cni_common::{GATEWAY, Node, Pod, SUBNET_ENV};
use serde_json::{Value, json};

const DUAL_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n";
const GATEWAY6: &str = "fc00:0:0:3::1";

/// The result's addresses, as given (ip/len).
fn result_ips(r: &Value) -> Vec<String> {
    r["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .collect()
}

fn addr_of(cidr: &str) -> IpAddr {
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// The global IPv6 addresses (`ip -6 addr show scope global`) of `dev` in `ns`, with their
/// flags ("tentative" while DAD runs). The kernel's own link-local address is not twill's
/// and may still be tentative: it is not used for the pod's traffic to global addresses.
fn v6_addrs(ns: &twill_tests::netns::TestNetns, dev: &str) -> String {
    ns.ip(&["-6", "addr", "show", "dev", dev, "scope", "global"])
        .unwrap()
}

/// Proves that ADD on a dual-stack subnet file gives the pod one IPv4 and one IPv6 address
/// (result: both `ips[]` on the container interface with their gateways, both default
/// routes and both cluster routes), puts both gateways on cni0, and that neither the pod's
/// nor the gateway's IPv6 address is "tentative" when ADD returns: the pod pings the IPv6
/// gateway and another pod over IPv6 at once. Without IFA_F_NODAD the `tentative` checks
/// fail (the address waits ~1 s of DAD after carrier).
#[test]
fn add_gives_both_families_usable_at_once() {
    let node = Node::with_subnet(DUAL_ENV);
    let (a, b) = (node.pod("da"), node.pod("db"));
    let ra = node.add(&a);
    // Right after ADD returned: nothing tentative in the pod, nor on the bridge.
    let pod_v6 = v6_addrs(&a.ns, "eth0");
    let br_v6 = v6_addrs(&node.ns, "cni0");
    assert!(pod_v6.contains("fc00:0:0:3::2/64"), "{pod_v6}");
    assert!(!pod_v6.contains("tentative"), "{pod_v6}");
    assert!(br_v6.contains("fc00:0:0:3::1/64"), "{br_v6}");
    assert!(!br_v6.contains("tentative"), "{br_v6}");
    a.ns.ping(GATEWAY6.parse().unwrap(), 1, 5).unwrap();

    let rb = node.add(&b);
    assert!(!v6_addrs(&b.ns, "eth0").contains("tentative"));
    assert_eq!(result_ips(&ra), ["10.244.3.2/24", "fc00:0:0:3::2/64"]);
    assert_eq!(result_ips(&rb), ["10.244.3.3/24", "fc00:0:0:3::3/64"]);
    for ip in ra["ips"].as_array().unwrap() {
        assert_eq!(ip["interface"], 2, "{ra}");
    }
    assert_eq!(ra["ips"][0]["gateway"], GATEWAY);
    assert_eq!(ra["ips"][1]["gateway"], GATEWAY6);
    let routes: Vec<(String, String)> = ra["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap().to_string(),
                r["gw"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (dst, gw) in [
        ("0.0.0.0/0", GATEWAY),
        ("10.244.0.0/16", GATEWAY),
        ("::/0", GATEWAY6),
        ("fc00::/48", GATEWAY6),
    ] {
        assert!(
            routes.contains(&(dst.to_string(), gw.to_string())),
            "{dst} via {gw}: {routes:?}"
        );
    }
    // The kernel has them too.
    let r6 = a.ns.ip(&["-6", "route", "show"]).unwrap();
    assert!(r6.contains("default via fc00:0:0:3::1 dev eth0"), "{r6}");
    assert!(r6.contains("fc00::/48 via fc00:0:0:3::1 dev eth0"), "{r6}");
    let r4 = a.ns.ip(&["route", "show"]).unwrap();
    assert!(r4.contains("default via 10.244.3.1 dev eth0"), "{r4}");

    // Pod to pod over IPv6 and IPv4 on the same bridge, and back.
    a.ns.ping(addr_of(&result_ips(&rb)[1]), 1, 5).unwrap();
    b.ns.ping(addr_of(&result_ips(&ra)[1]), 1, 5).unwrap();
    a.ns.ping(addr_of(&result_ips(&rb)[0]), 1, 5).unwrap();

    // One reservation per pod, with both addresses.
    let res = node.reservations();
    assert_eq!(res.len(), 2, "{res:?}");
    assert_eq!(res[0]["ip"], "10.244.3.2");
    assert_eq!(res[0]["ipv6"], "fc00:0:0:3::2");
    node.del(&a);
    node.del(&b);
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
}

/// Proves that CHECK verifies the IPv6 side: it passes on a pod as ADD left it, and fails
/// (code 120, naming the address) once the IPv6 address is removed by hand, and (naming the
/// route) once the IPv6 default route is.
#[test]
fn check_passes_and_fails_on_the_ipv6_side() {
    let node = Node::with_subnet(DUAL_ENV);
    let a = node.pod("dc");
    let r = node.add(&a);
    node.check(&a, &r).expect_ok("CHECK");

    a.ns.ip(&["-6", "route", "del", "default"]).unwrap();
    let out = node.check(&a, &r);
    assert_eq!(out.error_code(), Some(120), "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("route ::/0 via fc00:0:0:3::1 missing"),
        "{msg}"
    );

    a.ns.ip(&["-6", "addr", "del", "fc00:0:0:3::2/64", "dev", "eth0"])
        .unwrap();
    let out = node.check(&a, &r);
    assert_eq!(out.error_code(), Some(120), "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("address fc00:0:0:3::2/64 missing on eth0"),
        "{msg}"
    );
    node.del(&a);
}

fn with_ips(node: &Node, ips: &[&str]) -> Value {
    let mut c = node.conf("1.1.0");
    c["runtimeConfig"] = json!({ "ips": ips });
    c
}

/// Proves static IPs per family (runtimeConfig.ips, one IPv4 and one IPv6), that DEL
/// releases both halves of the reservation (another container can then ask for exactly
/// those two IPs), and that bad IPv6 entries are code 7 naming the field and the value.
#[test]
fn static_ips_per_family_and_del_releases_both() {
    let node = Node::with_subnet(DUAL_ENV);
    let a = node.pod("ds");
    let want = ["10.244.3.50/24", "fc00:0:0:3::50/64"];
    let r = node
        .call("ADD", &a, &with_ips(&node, &want))
        .expect_ok("ADD")
        .json();
    assert_eq!(result_ips(&r), want);
    a.ns.ping(GATEWAY6.parse().unwrap(), 1, 5).unwrap();

    // Taken while a holds them: the IPv6 one alone is refused, naming the holder.
    let b = node.pod("ds2");
    let out = node.call(
        "ADD",
        &b,
        &with_ips(&node, &["10.244.3.51", "fc00:0:0:3::50"]),
    );
    assert!(!out.ok(), "{out:?}");
    assert!(out.stdout.contains("fc00:0:0:3::50"), "{}", out.stdout);
    assert!(out.stdout.contains(&a.id), "{}", out.stdout);
    // That failed ADD reserved nothing, not even its IPv4 half.
    assert_eq!(node.reservations().len(), 1);

    node.del(&a);
    assert!(node.reservations().is_empty());
    let r = node
        .call("ADD", &b, &with_ips(&node, &want))
        .expect_ok("ADD after DEL")
        .json();
    assert_eq!(result_ips(&r), want);
    node.del(&b);

    let c = node.pod("ds3");
    for (ips, fragment) in [
        (
            &["fc00:0:0:9::5"][..],
            "runtimeConfig.ips: \"fc00:0:0:9::5\": fc00:0:0:9::5 is outside the node IPv6 subnet fc00:0:0:3::/64",
        ),
        (
            &["fc00:0:0:3::5/80"][..],
            "runtimeConfig.ips: \"fc00:0:0:3::5/80\": prefix length /80 is not the node subnet's (fc00:0:0:3::/64)",
        ),
        (
            &["fc00:0:0:3::5", "fc00:0:0:3::6"][..],
            "at most one IP per family",
        ),
        (&["fc00:0:0:3::1"][..], "fc00:0:0:3::1 is not usable"),
    ] {
        let out = node.call("ADD", &c, &with_ips(&node, ips));
        assert_eq!(out.error_code(), Some(7), "{out:?}");
        let msg = out.json()["msg"].as_str().unwrap().to_string();
        assert!(msg.contains(fragment), "{ips:?}: {msg}");
        assert!(node.reservations().is_empty(), "{ips:?}");
        assert!(node.host_veths().is_empty(), "{ips:?}");
    }
}

/// One timed ADD of `pod` on `node` (the plugin exec'd through nsenter in the node
/// namespace, as the other CNI tests do), then its DEL.
fn timed_add(node: &Node, pod: &Pod) -> Duration {
    let start = Instant::now();
    node.call("ADD", pod, &node.conf("1.1.0")).expect_ok("ADD");
    let d = start.elapsed();
    node.del(pod);
    d
}

fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    t[t.len() / 2]
}

/// Measures (and logs, for docs/benchmarks.md) the ADD time of an IPv4-only and of a
/// dual-stack pod, and how long an IPv6 address without NODAD stays tentative (what an ADD
/// that waited for DAD would add). Proves the dual-stack ADD stays in the IPv4 one's range
/// (the same round trips: less than twice as long plus slack), while waiting for DAD would
/// cost far more than either.
#[test]
fn add_timing_ipv4_vs_dual_stack_and_the_cost_of_dad() {
    const N: usize = 30;
    let v4 = Node::with_subnet(SUBNET_ENV);
    let dual = Node::with_subnet(DUAL_ENV);
    let pods4: Vec<Pod> = (0..N).map(|i| v4.pod(&format!("t4{i}"))).collect();
    let pods6: Vec<Pod> = (0..N).map(|i| dual.pod(&format!("t6{i}"))).collect();
    // Warm up both (the bridge is created by the first ADD).
    timed_add(&v4, &v4.pod("t4w"));
    timed_add(&dual, &dual.pod("t6w"));
    // Interleaved, alternating which goes first, so that the load of the machine (shared
    // with other builds) weighs on both alike.
    let (mut a4, mut a6) = (Vec::new(), Vec::new());
    for (i, (p4, p6)) in pods4.iter().zip(&pods6).enumerate() {
        if i % 2 == 0 {
            a4.push(timed_add(&v4, p4));
            a6.push(timed_add(&dual, p6));
        } else {
            a6.push(timed_add(&dual, p6));
            a4.push(timed_add(&v4, p4));
        }
    }
    let (t4, t6) = (median(a4), median(a6));

    // DAD left on: a veth pair by hand, IPv6 address without nodad on one end, both up;
    // time until the kernel clears "tentative" (bounded wait, polled).
    let p = dual.pod("dad");
    twill_tests::netns::veth_between(&dual.ns, "vdad0", &p.ns, "vdad1").unwrap();
    let start = Instant::now();
    p.ns.ip(&["addr", "add", "fd99::2/64", "dev", "vdad1"])
        .unwrap();
    let dad = loop {
        let s = v6_addrs(&p.ns, "vdad1");
        if !s.contains("tentative") {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "DAD never ended: {s}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "ADD median of {N}: IPv4-only {:.2} ms, dual-stack {:.2} ms (x{:.2}); DAD of one address: {:.0} ms",
        t4.as_secs_f64() * 1e3,
        t6.as_secs_f64() * 1e3,
        t6.as_secs_f64() / t4.as_secs_f64(),
        dad.as_secs_f64() * 1e3
    );
    assert!(t6 < t4 * 2 + Duration::from_millis(5), "{t6:?} vs {t4:?}");
    assert!(dad > t6, "DAD {dad:?} vs dual-stack ADD {t6:?}");
}

/// Proves that GC releases both addresses of a dual-stack reservation that is not a valid
/// attachment (and removes its veth, taking both addresses and all four routes with the pod
/// end), keeps the valid one whole, and that the released IPv6 address can be asked for
/// again at once. Also: a 0.4.0 result marks each IP with its family ("version").
#[test]
fn gc_releases_both_families_and_old_versions_mark_them() {
    let node = Node::with_subnet(DUAL_ENV);
    let (a, b) = (node.pod("dg"), node.pod("dg2"));
    let ra = node.add(&a);
    let rb = node
        .call("ADD", &b, &node.conf("0.4.0"))
        .expect_ok("ADD 0.4.0")
        .json();
    assert_eq!(rb["ips"][0]["version"], "4", "{rb}");
    assert_eq!(rb["ips"][1]["version"], "6", "{rb}");
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": b.id, "ifname": "eth0"}]);
    node.exec(&[("CNI_COMMAND", "GC")], &conf).expect_ok("GC");
    let res = node.reservations();
    assert_eq!(res.len(), 1, "{res:?}");
    assert_eq!(res[0]["containerId"], b.id.as_str());
    assert_eq!(res[0]["ipv6"], "fc00:0:0:3::3");
    assert!(!a.ns.has_link("eth0"), "a's pod end is gone with its veth");
    b.ns.ping(GATEWAY6.parse().unwrap(), 1, 5).unwrap();
    // a's IPv6 address is free again.
    let c = node.pod("dg3");
    let ips_a = result_ips(&ra);
    let want = [ips_a[0].as_str(), ips_a[1].as_str()];
    let rc = node
        .call("ADD", &c, &with_ips(&node, &want))
        .expect_ok("ADD of a's IPs after GC")
        .json();
    assert_eq!(result_ips(&rc), want);
    node.del(&b);
    node.del(&c);
    assert!(node.reservations().is_empty());
}

/// Proves the upgrade path of a node that becomes dual-stack: a pod reserved on the
/// IPv4-only subnet file keeps its IPv4 address when the same (container, ifname) is added
/// again after twilld wrote the IPv6 keys, and gets an IPv6 address in the same reservation;
/// a pod of the IPv4-only file gets a result with IPv4 only.
#[test]
fn a_node_that_becomes_dual_stack_keeps_a_pods_ipv4() {
    let node = Node::new();
    let (a, b) = (node.pod("du"), node.pod("du2"));
    node.add(&b);
    let r = node.add(&a);
    assert_eq!(result_ips(&r), ["10.244.3.3/24"]);
    assert!(node.reservations()[1].get("ipv6").is_none());
    std::fs::write(node.subnet_file(), DUAL_ENV).unwrap();
    let r = node.add(&a);
    assert_eq!(result_ips(&r), ["10.244.3.3/24", "fc00:0:0:3::2/64"]);
    let res = node.reservations();
    assert_eq!(res.len(), 2, "{res:?}");
    a.ns.ping(GATEWAY6.parse().unwrap(), 1, 5).unwrap();
    a.ns.ping(GATEWAY.parse().unwrap(), 1, 5).unwrap();
    node.del(&a);
    node.del(&b);
    assert!(node.reservations().is_empty());
}

/// Proves that a dual-stack ADD on a node namespace where IPv6 is disabled (a node whose
/// IPv6 twilld has not set up: the plugin sets no sysctl itself) fails with a kernel error
/// naming the IPv6 gateway and the bridge, and leaves no reservation and no veth behind;
/// and that the same node serves the pod once IPv6 is enabled.
#[test]
fn ipv6_disabled_on_the_node_fails_cleanly() {
    let node = Node::with_subnet(DUAL_ENV);
    // Inside the test's own node namespace only (per-namespace sysctls).
    for k in ["all", "default"] {
        node.ns
            .exec(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=1")],
            )
            .unwrap();
    }
    let a = node.pod("dx");
    let out = node.call("ADD", &a, &node.conf("1.1.0"));
    assert!(!out.ok(), "{out:?}");
    assert_eq!(out.error_code(), Some(110), "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    eprintln!("ADD with IPv6 disabled: {msg}");
    assert!(
        msg.contains("fc00:0:0:3::1/64") && msg.contains("cni0"),
        "{msg}"
    );
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert_eq!(a.ns.links().unwrap(), vec!["lo"]);
    for k in ["all", "default", "cni0"] {
        node.ns
            .exec(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=0")],
            )
            .unwrap();
    }
    let r = node.add(&a);
    // Round-robin: the pair the failed ADD reserved and released is not handed out at once.
    assert_eq!(result_ips(&r), ["10.244.3.3/24", "fc00:0:0:3::3/64"]);
    a.ns.ping(GATEWAY6.parse().unwrap(), 1, 5).unwrap();
    node.del(&a);
}
