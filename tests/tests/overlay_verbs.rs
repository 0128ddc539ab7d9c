//! Kernel tests of the overlay verbs (twill_dataplane::overlay, ::nft) in a fresh network
//! namespace: the VXLAN device, neighbour/FDB/route replace/dump/delete, the netlink
//! monitor, sysctls, the nftables table and the peer set's members over netlink
//! (twill_dataplane::nft_set). Root required.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use twill_dataplane::nft::{Nft, NftConfig, NftOutcome, render};
use twill_dataplane::nft_set::PeerSet;
use twill_dataplane::overlay::underlay::Selector;
use twill_dataplane::overlay::{
    self, EnsureOutcome, Fdb, Mac, Monitor, MonitorEvent, Neigh, Overlay, Route, RtnlOverlay,
    VxlanSpec, sysctl,
};
use twill_dataplane::{NetNs, Netlink};
use twill_tests::cluster::unique_prefix;
use twill_tests::netns::{TestNetns, require_root};

struct Env {
    ns: TestNetns,
    netns: NetNs,
    o: RtnlOverlay,
    underlay: u32,
}

/// A namespace with a veth pair as the underlay (no dummy module here), `u0` =
/// 192.168.77.1/24, up.
async fn env() -> Env {
    require_root();
    let p = unique_prefix();
    let ns = TestNetns::named(format!("{p}-ovl")).unwrap();
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"])
        .unwrap();
    ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "u0"])
        .unwrap();
    ns.ip(&["link", "set", "u0", "up"]).unwrap();
    ns.ip(&["link", "set", "u1", "up"]).unwrap();
    let netns = NetNs::open(ns.path()).unwrap();
    let nl = Netlink::open(&netns).unwrap();
    // `ip -o link` starts with "<ifindex>: " (nsenter does not remount /sys for the ns).
    let idx: u32 = ns
        .ip(&["-o", "link", "show", "u0"])
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Env {
        ns,
        netns,
        o: RtnlOverlay::new(nl),
        underlay: idx,
    }
}

fn spec(underlay: u32, mtu: u32) -> VxlanSpec {
    VxlanSpec {
        vni: 1,
        port: overlay::DEFAULT_VXLAN_PORT,
        underlay_index: underlay,
        local: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1)),
        mtu,
        mac: Mac::derive("node-a"),
        address: Ipv4Addr::new(10, 244, 1, 0),
    }
}

#[tokio::test]
async fn vxlan_is_created_adopted_and_recreated_on_mismatch() {
    let e = env().await;
    let s = spec(e.underlay, 1450);
    let (l, out) = e.o.ensure_vxlan(&s).await.unwrap();
    assert_eq!(out, EnsureOutcome::Created);
    assert_eq!(l.name, "twill.1");
    assert_eq!(l.mtu, 1450);
    assert_eq!(l.mac, s.mac);
    assert!(l.up);
    assert_eq!(l.addresses, vec!["10.244.1.0/32".parse().unwrap()]);
    let d = e.ns.ip(&["-d", "link", "show", "twill.1"]).unwrap();
    assert!(d.contains("vxlan id 1"), "{d}");
    assert!(d.contains("dstport 8472"), "{d}");
    assert!(d.contains("nolearning"), "{d}");
    assert!(d.contains("local 192.168.77.1"), "{d}");
    assert!(d.contains("dev u0"), "{d}");

    // Same spec: adopted, same device (no re-create).
    let (l2, out) = e.o.ensure_vxlan(&s).await.unwrap();
    assert_eq!(out, EnsureOutcome::Adopted);
    assert_eq!(l2.index, l.index);

    // Someone took the address away and set it down: fixed without a re-create.
    e.ns.ip(&["addr", "flush", "dev", "twill.1"]).unwrap();
    e.ns.ip(&["link", "set", "twill.1", "down"]).unwrap();
    let (l3, out) = e.o.ensure_vxlan(&s).await.unwrap();
    assert_eq!(out, EnsureOutcome::Adopted);
    assert_eq!(l3.index, l.index);
    assert!(l3.up);
    let a =
        e.ns.ip(&["-4", "-o", "addr", "show", "dev", "twill.1"])
            .unwrap();
    assert!(a.contains("10.244.1.0/32"), "{a}");

    // A larger MTU than the kernel allows to raise to later: recreated with it.
    let s2 = spec(e.underlay, 1400);
    let (l4, out) = e.o.ensure_vxlan(&s2).await.unwrap();
    assert!(matches!(out, EnsureOutcome::Recreated { .. }), "{out:?}");
    assert_eq!(l4.mtu, 1400);
    let (l5, out) = e.o.ensure_vxlan(&s).await.unwrap();
    assert!(matches!(out, EnsureOutcome::Recreated { .. }), "{out:?}");
    assert_eq!(l5.mtu, 1450);

    // A non-VXLAN device squatting the name is replaced.
    e.ns.ip(&["link", "del", "twill.1"]).unwrap();
    e.ns.ip(&[
        "link", "add", "twill.1", "type", "veth", "peer", "name", "twx",
    ])
    .unwrap();
    let (_, out) = e.o.ensure_vxlan(&s).await.unwrap();
    assert!(matches!(out, EnsureOutcome::Recreated { .. }), "{out:?}");
    let d = e.ns.ip(&["-d", "link", "show", "twill.1"]).unwrap();
    assert!(d.contains("vxlan id 1"), "{d}");
}

fn peer(n: u8) -> (Neigh, Fdb, Route) {
    let mac = Mac::derive(&format!("peer-{n}"));
    let net = Ipv4Addr::new(10, 244, n, 0);
    (
        Neigh { ip: net, mac },
        Fdb {
            mac,
            dst: IpAddr::V4(Ipv4Addr::new(192, 168, 77, n)),
        },
        Route {
            dst: format!("10.244.{n}.0/24").parse().unwrap(),
            via: net,
        },
    )
}

#[tokio::test]
async fn peer_entries_replace_dump_delete() {
    let e = env().await;
    let (l, _) = e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    assert!(e.o.dump(l.index).await.unwrap().is_empty());

    let (n2, f2, r2) = peer(2);
    let (n3, f3, r3) = peer(3);
    for _ in 0..2 {
        // Twice: replace is idempotent.
        for (n, f, r) in [(n2, f2, r2), (n3, f3, r3)] {
            e.o.replace_fdb(l.index, &f).await.unwrap();
            e.o.replace_neigh(l.index, &n).await.unwrap();
            e.o.replace_route(l.index, &r).await.unwrap();
        }
    }
    let p = e.o.dump(l.index).await.unwrap();
    assert_eq!(p.neighs, [n2, n3].into());
    assert_eq!(p.fdbs, [f2, f3].into());
    assert_eq!(p.routes, [r2, r3].into());

    let neigh = e.ns.ip(&["neigh", "show", "dev", "twill.1"]).unwrap();
    assert!(
        neigh.contains(&format!("10.244.2.0 lladdr {} PERMANENT", n2.mac)),
        "{neigh}"
    );
    let fdb =
        e.ns.exec("bridge", &["fdb", "show", "dev", "twill.1"])
            .unwrap();
    assert!(
        fdb.contains(&format!("{} dst 192.168.77.2 self permanent", f2.mac)),
        "{fdb}"
    );
    let routes = e.ns.ip(&["route", "show", "dev", "twill.1"]).unwrap();
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 proto 116 onlink"),
        "{routes}"
    );

    // A peer's VTEP MAC and public IP change: replace leaves one entry of each.
    let mac = Mac::derive("peer-2-new");
    let n2b = Neigh { ip: n2.ip, mac };
    let f2b = Fdb {
        mac,
        dst: IpAddr::V4(Ipv4Addr::new(192, 168, 77, 20)),
    };
    e.o.replace_fdb(l.index, &f2b).await.unwrap();
    e.o.replace_neigh(l.index, &n2b).await.unwrap();
    e.o.delete_fdb(l.index, &f2).await.unwrap();
    let p = e.o.dump(l.index).await.unwrap();
    assert_eq!(p.neighs, [n2b, n3].into());
    assert_eq!(p.fdbs, [f2b, f3].into());

    // Deletes, twice (idempotent).
    for _ in 0..2 {
        for (n, f, r) in [(n2b, f2b, r2), (n3, f3, r3)] {
            e.o.delete_route(l.index, &r).await.unwrap();
            e.o.delete_neigh(l.index, &n).await.unwrap();
            e.o.delete_fdb(l.index, &f).await.unwrap();
        }
    }
    assert!(e.o.dump(l.index).await.unwrap().is_empty());

    // A route added by hand (proto boot) is not twill's: not in the dump, and a delete of
    // the same dst and device leaves it (the kernel matches twill's protocol).
    e.ns.ip(&[
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "10.244.9.0",
        "dev",
        "twill.1",
        "onlink",
    ])
    .unwrap();
    let p = e.o.dump(l.index).await.unwrap();
    let by_hand = Route {
        dst: "10.244.9.0/24".parse().unwrap(),
        via: "10.244.9.0".parse().unwrap(),
    };
    assert!(p.routes.is_empty(), "{p:?}");
    e.o.delete_route(l.index, &by_hand).await.unwrap();
    let routes = e.ns.ip(&["route", "show", "10.244.9.0/24"]).unwrap();
    assert!(routes.contains("dev twill.1"), "{routes}");
    // On twill's own device a route of another protocol (an older twilld's) is taken over
    // by a replace, and is twill's from then on.
    e.o.replace_route(l.index, &by_hand).await.unwrap();
    assert_eq!(e.o.dump(l.index).await.unwrap().routes, [by_hand].into());
    e.o.delete_route(l.index, &by_hand).await.unwrap();
    assert!(e.o.dump(l.index).await.unwrap().routes.is_empty());
}

/// Proves that twill writes over no route it did not make: a peer route whose dst is held
/// by the underlay's connected route, the default route or a host route on another device
/// is refused as a conflict, those routes survive twill's replaces and deletes, and they
/// show up in the dump as foreign (so the daemon skips them before any write). Positive
/// control: twill's own route for a free subnet is written, marked and deleted.
#[tokio::test]
async fn foreign_routes_are_never_replaced_or_deleted() {
    let e = env().await;
    let (l, _) = e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    e.ns.ip(&["route", "add", "default", "via", "192.168.77.254"])
        .unwrap();
    // A host route for a subnet that a lease claims, on the underlay.
    e.ns.ip(&["route", "add", "10.244.5.0/24", "via", "192.168.77.253"])
        .unwrap();
    let before = e.ns.ip(&["route", "show"]).unwrap();
    let claims = ["10.244.5.0/24", "192.168.77.0/24", "0.0.0.0/0"];
    for dst in claims {
        let net: ipnet::Ipv4Net = dst.parse().unwrap();
        // A lease's net address is the next hop; any address will do for the test.
        let r = Route {
            dst: net,
            via: Ipv4Addr::new(10, 244, 200, 0),
        };
        let err = e.o.replace_route(l.index, &r).await.unwrap_err();
        assert!(
            matches!(err, twill_dataplane::Error::Conflict(_)),
            "{dst}: {err}"
        );
        e.o.delete_route(l.index, &r).await.unwrap();
    }
    let p = e.o.dump(l.index).await.unwrap();
    assert!(p.routes.is_empty(), "{p:?}");
    for dst in claims {
        assert!(
            p.foreign_routes.contains(&dst.parse().unwrap()),
            "{dst} not reported as foreign: {:?}",
            p.foreign_routes
        );
    }
    assert_eq!(e.ns.ip(&["route", "show"]).unwrap(), before);

    // Positive control: a free subnet is twill's, marked with its protocol.
    let (_, _, r2) = peer(2);
    e.o.replace_route(l.index, &r2).await.unwrap();
    let shown = e.ns.ip(&["route", "show", "proto", "116"]).unwrap();
    assert!(
        shown.contains("10.244.2.0/24 via 10.244.2.0 dev twill.1"),
        "{shown}"
    );
    assert_eq!(e.o.dump(l.index).await.unwrap().routes, [r2].into());
    e.o.delete_route(l.index, &r2).await.unwrap();
    assert_eq!(e.ns.ip(&["route", "show"]).unwrap(), before);
}

#[tokio::test]
async fn pipelined_apply_of_many_ops() {
    let e = env().await;
    let (l, _) = e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    let mut ops = Vec::new();
    for i in 0..200u32 {
        let mac = Mac::derive(&format!("p{i}"));
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + (i << 8));
        ops.push(overlay::Op::ReplaceFdb(Fdb {
            mac,
            dst: IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(192, 168, 100, 0)) + i,
            )),
        }));
        ops.push(overlay::Op::ReplaceNeigh(Neigh { ip: net, mac }));
        ops.push(overlay::Op::ReplaceRoute(Route {
            dst: ipnet::Ipv4Net::new(net, 24).unwrap(),
            via: net,
        }));
    }
    let failed = overlay::apply_ops(&e.o, l.index, &ops, 64).await;
    assert!(failed.is_empty(), "{failed:?}");
    let p = e.o.dump(l.index).await.unwrap();
    assert_eq!(p.len(), 600);
}

#[tokio::test]
async fn monitor_reports_changes_on_the_device() {
    let e = env().await;
    let (l, _) = e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    let (n, f, r) = peer(4);
    e.o.replace_fdb(l.index, &f).await.unwrap();
    e.o.replace_neigh(l.index, &n).await.unwrap();
    e.o.replace_route(l.index, &r).await.unwrap();

    let mut m = Monitor::open(&e.netns).unwrap();
    e.ns.ip(&["route", "del", "10.244.4.0/24", "dev", "twill.1"])
        .unwrap();
    e.ns.exec(
        "bridge",
        &[
            "fdb",
            "del",
            &f.mac.to_string(),
            "dev",
            "twill.1",
            "dst",
            "192.168.77.4",
            "self",
        ],
    )
    .unwrap();
    e.ns.ip(&["neigh", "del", "10.244.4.0", "dev", "twill.1"])
        .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while seen.len() < 3 {
        let ev = tokio::time::timeout_at(deadline, m.next())
            .await
            .expect("monitor events within 3 s")
            .expect("monitor open");
        match ev {
            MonitorEvent::RouteGone { link, route } if link == l.index => {
                assert_eq!(route, r);
                seen.push("route");
            }
            MonitorEvent::FdbGone { link, fdb } if link == l.index => {
                assert_eq!(fdb, f);
                seen.push("fdb");
            }
            MonitorEvent::NeighGone { link, ip } if link == l.index => {
                assert_eq!(ip, n.ip);
                seen.push("neigh");
            }
            _ => {}
        }
    }
    e.ns.ip(&["link", "del", "twill.1"]).unwrap();
    loop {
        let ev = tokio::time::timeout_at(deadline, m.next())
            .await
            .expect("link event within 3 s")
            .unwrap();
        if let MonitorEvent::LinkGone { index, .. } = ev
            && index == l.index
        {
            break;
        }
    }
}

#[tokio::test]
async fn sysctls_are_written_inside_the_namespace_only() {
    let e = env().await;
    let host_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    assert_eq!(
        sysctl::read_in(&e.netns, "net/ipv4/ip_forward").unwrap(),
        "0"
    );
    sysctl::enable_forwarding_in(&e.netns, "twill.1").unwrap();
    assert_eq!(
        sysctl::read_in(&e.netns, "net/ipv4/ip_forward").unwrap(),
        "1"
    );
    assert_eq!(
        sysctl::read_in(&e.netns, "net/ipv4/conf/twill.1/rp_filter").unwrap(),
        "0"
    );
    let host_after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(host_before, host_after, "the host's sysctl must not change");
}

#[test]
fn nft_table_is_idempotent() {
    require_root();
    let ns = TestNetns::named(format!("{}-nft", unique_prefix())).unwrap();
    let nft = Nft::in_netns(ns.path());
    let cfg = NftConfig {
        network: "10.244.0.0/16".parse().unwrap(),
        node_subnet: "10.244.3.0/24".parse().unwrap(),
        masquerade: true,
        vxlan_port: 8472,
    };
    let none = std::collections::BTreeSet::new();
    let members: std::collections::BTreeSet<Ipv4Addr> = [
        Ipv4Addr::new(192, 168, 77, 2),
        Ipv4Addr::new(192, 168, 77, 3),
    ]
    .into();
    assert_eq!(nft.list().unwrap(), None);
    assert_eq!(nft.ensure(&cfg, &none).unwrap(), NftOutcome::Applied);
    assert_eq!(nft.list().unwrap().as_deref(), Some(render(&cfg).as_str()));
    assert_eq!(nft.ensure(&cfg, &none).unwrap(), NftOutcome::Unchanged);
    // The peer set changes by element, and the table is not rewritten for it.
    nft.add_peers(&members).unwrap();
    nft.add_peers(&members).unwrap();
    assert_eq!(nft.peers().unwrap(), members);
    assert_eq!(nft.ensure(&cfg, &none).unwrap(), NftOutcome::Unchanged);
    assert_eq!(nft.peers().unwrap(), members);
    let one: std::collections::BTreeSet<Ipv4Addr> = [Ipv4Addr::new(192, 168, 77, 3)].into();
    nft.set_peers(&one).unwrap();
    assert_eq!(nft.peers().unwrap(), one);
    assert_eq!(nft.dropped_packets().unwrap(), 0);
    // Drift (a rule deleted by hand) is repaired; the rewrite carries the members given.
    ns.exec("nft", &["flush", "chain", "ip", "twill", "forward"])
        .unwrap();
    assert_eq!(nft.ensure(&cfg, &members).unwrap(), NftOutcome::Applied);
    assert_eq!(nft.peers().unwrap(), members);
    assert_eq!(nft.ensure(&cfg, &none).unwrap(), NftOutcome::Unchanged);
    // A changed config replaces the table atomically.
    let cfg2 = NftConfig {
        masquerade: false,
        ..cfg
    };
    assert_eq!(nft.ensure(&cfg2, &none).unwrap(), NftOutcome::Applied);
    let l = nft.list().unwrap().unwrap();
    assert!(!l.contains("masquerade"), "{l}");
    // A hung nft is killed at the deadline.
    let t0 = std::time::Instant::now();
    let slow = Nft::in_netns(ns.path()).with_timeout(Duration::from_millis(1));
    let _ = slow.list();
    assert!(t0.elapsed() < Duration::from_secs(5));
    nft.remove().unwrap();
    assert_eq!(nft.list().unwrap(), None);
}

/// What this proves: NEWSETELEM/DELSETELEM batches sent by twilld's own socket change the
/// kernel's set exactly as `nft list set` then shows it (adding twice is no error, deleting
/// what is not there is no error, 5,000 elements go in several messages and batches), the
/// rest of the table is untouched, and with no table the add fails with an error that
/// names the op, the set and the values. It fails if any message is malformed (the kernel
/// answers EINVAL and the call errs) or an element lands wrong.
#[tokio::test]
async fn nft_peer_set_changes_over_netlink() {
    use std::collections::BTreeSet;
    require_root();
    let ns = TestNetns::named(format!("{}-nfs", unique_prefix())).unwrap();
    let netns = NetNs::open(ns.path()).unwrap();
    let nft = Nft::in_netns(ns.path());
    let set = PeerSet::open(&netns).unwrap();
    let ip = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i);
    let two: BTreeSet<Ipv4Addr> = [ip(1), ip(2)].into();

    // No table: a clear error, nothing else happens.
    let e = set.add(&two).await.unwrap_err().to_string();
    assert!(
        e.contains("add 2 elements (172.16.0.1, 172.16.0.2) to set ip twill peers")
            && e.contains("does not exist"),
        "{e}"
    );
    // Deleting from a missing set: the elements are not there, which is what was asked.
    set.delete(&two).await.unwrap();

    let cfg = NftConfig {
        network: "10.244.0.0/16".parse().unwrap(),
        node_subnet: "10.244.3.0/24".parse().unwrap(),
        masquerade: true,
        vxlan_port: 8472,
    };
    assert_eq!(
        nft.ensure(&cfg, &BTreeSet::new()).unwrap(),
        NftOutcome::Applied
    );
    set.add(&two).await.unwrap();
    set.add(&two).await.unwrap();
    assert_eq!(nft.peers().unwrap(), two);
    let three: BTreeSet<Ipv4Addr> = [ip(3)].into();
    set.add(&three).await.unwrap();
    assert_eq!(nft.peers().unwrap(), [ip(1), ip(2), ip(3)].into());
    // One present, one absent: the present one goes, the absent one is no error.
    set.delete(&[ip(2), ip(9)].into()).await.unwrap();
    assert_eq!(nft.peers().unwrap(), [ip(1), ip(3)].into());
    // The table itself is as written (no rewrite needed).
    assert_eq!(
        nft.ensure(&cfg, &BTreeSet::new()).unwrap(),
        NftOutcome::Unchanged
    );

    // 5,000 members: several messages per batch and several batches.
    let many: BTreeSet<Ipv4Addr> = (0..5000).map(ip).collect();
    let t0 = std::time::Instant::now();
    set.add(&many).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(nft.peers().unwrap(), many, "after adding 5,000 in {took:?}");
    let half: BTreeSet<Ipv4Addr> = (0..2500).map(ip).collect();
    set.delete(&half).await.unwrap();
    let rest: BTreeSet<Ipv4Addr> = (2500..5000).map(ip).collect();
    assert_eq!(nft.peers().unwrap(), rest);
    nft.remove().unwrap();
}

#[tokio::test]
async fn underlay_is_found_from_the_default_route() {
    let e = env().await;
    e.ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.77.254",
        "dev",
        "u0",
    ])
    .unwrap();
    let nl = Netlink::open(&e.netns).unwrap();
    let u = overlay::underlay::resolve(&nl, &Selector::default(), None)
        .await
        .unwrap();
    assert_eq!(u.name, "u0");
    assert_eq!(u.index, e.underlay);
    assert_eq!(u.mtu, 1500);
    assert_eq!(u.ip, IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1)));
    assert_eq!(u.vxlan_mtu(), 1450);
    // --iface and --public-ip win.
    let pinned: IpAddr = "192.168.77.9".parse().unwrap();
    let u = overlay::underlay::resolve(&nl, &select(&["u1"], &[], None), Some(pinned))
        .await
        .unwrap();
    assert_eq!(u.name, "u1");
    assert_eq!(u.ip, pinned);
    // A missing interface is an error that names it.
    let err = overlay::underlay::resolve(&nl, &select(&["nope0"], &[], None), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope0"), "{err}");
}

fn select(ifaces: &[&str], regexes: &[&str], reach: Option<&str>) -> Selector {
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Selector::new(&s(ifaces), &s(regexes), reach.map(|r| r.parse().unwrap())).unwrap()
}

/// What this proves: against the kernel's own links and addresses (a namespace with u0
/// 192.168.77.1/24, u1 with 10.9.0.1/24 and a route to 172.31.0.0/16 via u1), `--iface`
/// entries are tried in order by name or address, `--iface-regex` matches an address before
/// a name, `--iface-can-reach` follows the kernel's route lookup (interface and source
/// address), and a failure names every criterion and the interfaces tried.
#[tokio::test]
async fn underlay_is_selected_by_name_address_regex_and_route() {
    let e = env().await;
    e.ns.ip(&["link", "set", "u1", "mtu", "1400"]).unwrap();
    e.ns.ip(&["addr", "add", "10.9.0.1/24", "dev", "u1"])
        .unwrap();
    e.ns.ip(&["addr", "add", "10.9.0.7/24", "dev", "u1"])
        .unwrap();
    e.ns.ip(&[
        "route",
        "add",
        "172.31.0.0/16",
        "via",
        "10.9.0.254",
        "dev",
        "u1",
        "src",
        "10.9.0.7",
    ])
    .unwrap();
    let nl = Netlink::open(&e.netns).unwrap();
    let get = |s: Selector| {
        let nl = nl.clone();
        async move { overlay::underlay::resolve(&nl, &s, None).await }
    };
    let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };

    // A name that does not exist is skipped; the next entry, an address, wins.
    let u = get(select(&["eth9", "10.9.0.7", "u0"], &[], None))
        .await
        .unwrap();
    assert_eq!((u.name.as_str(), u.ip, u.mtu), ("u1", v4("10.9.0.7"), 1400));
    assert_eq!(u.vxlan_mtu(), 1350);
    // A regex on an address: the address it matched is the public IP.
    let u = get(select(&[], &[r"^10\.9\.0\.7$"], None)).await.unwrap();
    assert_eq!((u.name.as_str(), u.ip), ("u1", v4("10.9.0.7")));
    // A regex on a name, after a regex that matches nothing.
    let u = get(select(&["nope"], &["^wlan", "^u0$"], None))
        .await
        .unwrap();
    assert_eq!((u.name.as_str(), u.ip), ("u0", v4("192.168.77.1")));
    // The route to 172.31.5.5 leaves by u1 with source 10.9.0.7.
    let u = get(select(&[], &[], Some("172.31.5.5"))).await.unwrap();
    assert_eq!((u.name.as_str(), u.ip), ("u1", v4("10.9.0.7")));
    // A connected destination: the first address of its subnet's interface.
    let u = get(select(&[], &[], Some("192.168.77.20"))).await.unwrap();
    assert_eq!((u.name.as_str(), u.ip), ("u0", v4("192.168.77.1")));

    // Nothing resolves: each criterion's reason, with the interfaces tried.
    let err = get(select(&["eth9"], &["^ens[0-9]+$"], Some("203.0.113.1")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no interface named 'eth9' (--iface 'eth9'; tried: lo, u1, u0)")
            || err.contains("no interface named 'eth9' (--iface 'eth9'; tried: lo, u0, u1)"),
        "{err}"
    );
    assert!(
        err.contains(
            "no interface matches --iface-regex '^ens[0-9]+$' by address or name (tried: lo"
        ),
        "{err}"
    );
    assert!(err.contains("10.9.0.1, 10.9.0.7]"), "{err}");
    // No default route here: the kernel answers ENETUNREACH.
    assert!(
        err.contains("no route to 203.0.113.1 (--iface-can-reach 203.0.113.1)"),
        "{err}"
    );
    // An address of this node cannot be reached over the underlay.
    let err = get(select(&[], &[], Some("10.9.0.1")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("10.9.0.1 is an address of this node"), "{err}");
}

#[tokio::test]
async fn a_full_event_buffer_reports_an_overrun() {
    let e = env().await;
    e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    // The kernel's minimum receive buffer: a few events fill it.
    let mut m = Monitor::open_with_rcvbuf(&e.netns, 1).unwrap();
    // 500 routes written while this (current-thread) runtime is blocked, so nothing reads.
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("routes");
    let mut text = String::new();
    for i in 0..500u32 {
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + (i << 8));
        text.push_str(&format!(
            "route add {net}/24 via {net} dev twill.1 onlink\n"
        ));
    }
    std::fs::write(&batch, text).unwrap();
    e.ns.ip(&["-batch", &batch.display().to_string()]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let ev = tokio::time::timeout_at(deadline, m.next())
            .await
            .expect("an overrun within 3 s")
            .expect("monitor open");
        if ev == MonitorEvent::Overrun {
            break;
        }
    }
}

/// The batched writes (RtnlOverlay::with_batch): 2,000 peers in chunks, the same stages and
/// the same results as one request per op. A failed op in the middle of a chunk (a route
/// via a multicast gateway, refused by the kernel) is reported and the ops after it in the
/// chunk are still applied; a route whose dst is someone else's is a conflict through the
/// ownership check; deleting what is gone succeeds; replacing what is there changes it.
#[tokio::test]
async fn batched_apply_matches_one_request_per_op() {
    let e = env().await;
    let (l, _) = e.o.ensure_vxlan(&spec(e.underlay, 1450)).await.unwrap();
    let o0 = e.o.clone();
    let o = e.netns.run_in(move || o0.with_batch()).unwrap().unwrap();
    e.ns.ip(&["route", "add", "10.99.5.0/24", "via", "192.168.77.253"])
        .unwrap();
    let before = e.ns.ip(&["route", "show", "10.99.5.0/24"]).unwrap();
    let entries = |i: u32| {
        let mac = Mac::derive(&format!("b{i}"));
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + (i << 8));
        (
            Fdb {
                mac,
                dst: IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(192, 168, 100, 0)) + i,
                )),
            },
            Neigh { ip: net, mac },
            Route {
                dst: ipnet::Ipv4Net::new(net, 24).unwrap(),
                via: net,
            },
        )
    };
    let mut ops = Vec::new();
    for i in 0..2000u32 {
        let (f, n, r) = entries(i);
        ops.extend([
            overlay::Op::ReplaceFdb(f),
            overlay::Op::ReplaceNeigh(n),
            overlay::Op::ReplaceRoute(r),
        ]);
    }
    let bad = Route {
        dst: "10.98.0.0/24".parse().unwrap(),
        via: Ipv4Addr::new(224, 0, 0, 1),
    };
    let foreign = Route {
        dst: "10.99.5.0/24".parse().unwrap(),
        via: Ipv4Addr::new(10, 99, 5, 0),
    };
    ops.insert(3000, overlay::Op::ReplaceRoute(bad));
    ops.push(overlay::Op::ReplaceRoute(foreign));
    // Deletes of entries that do not exist.
    let (gf, gn, gr) = entries(5000);
    ops.extend([
        overlay::Op::DeleteFdb(gf),
        overlay::Op::DeleteNeigh(gn),
        overlay::Op::DeleteRoute(gr),
    ]);
    let failed = o.apply_ops(l.index, &ops, 64).await;
    let failed_ops: Vec<_> = failed.iter().map(|(op, _)| *op).collect();
    assert_eq!(
        failed_ops,
        [
            overlay::Op::ReplaceRoute(bad),
            overlay::Op::ReplaceRoute(foreign)
        ],
        "{failed:?}"
    );
    assert!(
        matches!(failed[1].1, twill_dataplane::Error::Conflict(_)),
        "{}",
        failed[1].1
    );
    assert_eq!(failed[0].1.errno(), Some(libc::EINVAL), "{}", failed[0].1);
    let p = o.dump(l.index).await.unwrap();
    let mut want = overlay::Programmed::default();
    for i in 0..2000u32 {
        let (f, n, r) = entries(i);
        want.fdbs.insert(f);
        want.neighs.insert(n);
        want.routes.insert(r);
    }
    assert_eq!(p.owned(), want.owned());
    assert_eq!(
        e.ns.ip(&["route", "show", "10.99.5.0/24"]).unwrap(),
        before,
        "the foreign route must stay"
    );

    // Replace (a peer's VTEP moved) and delete through the batch.
    let (f0, n0, _) = entries(0);
    let moved = Fdb {
        mac: f0.mac,
        dst: IpAddr::V4(Ipv4Addr::new(192, 168, 200, 1)),
    };
    let mut ops = vec![overlay::Op::ReplaceFdb(moved), overlay::Op::DeleteFdb(f0)];
    for i in 1..2000u32 {
        let (f, n, r) = entries(i);
        ops.extend([
            overlay::Op::DeleteRoute(r),
            overlay::Op::DeleteNeigh(n),
            overlay::Op::DeleteFdb(f),
        ]);
    }
    let failed = o.apply_ops(l.index, &ops, 64).await;
    assert!(failed.is_empty(), "{failed:?}");
    let p = o.dump(l.index).await.unwrap();
    assert_eq!(p.fdbs, [moved].into());
    assert_eq!(p.neighs, [n0].into());
    assert_eq!(p.routes, [entries(0).2].into());
}
