//! Cluster test (root, real etcd, two real twilld nodes, real pods): twill's nftables input
//! filter accepts VXLAN only from member nodes, and twilld leaves routes it did not make.
//!
//! A VXLAN packet is crafted by hand (VXLAN header + inner Ethernet + IPv4/ICMP echo, sent
//! from a plain UDP socket to the node's underlay address, port 8472) and counted on arrival
//! by an nft counter inside the target pod, one counter per ICMP id so that every phase is
//! told apart. Each negative check ("never reaches the pod") is followed by a positive
//! control sent the same way from a member (node 2's own address): once the member's packet
//! has arrived, the earlier one would have too.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use twill_dataplane::overlay::Mac;
use twill_ipam::lease::LeaseAttrs;
use twill_ipam::store::LeaseStore;
use twill_tests::cluster::{Cluster, ClusterOpts, in_netns, metric, wait_for};
use twill_tests::netns::TestNetns;

const VXLAN_PORT: u16 = 8472;
/// The non-member on the underlay: an address on the bridge that holds no lease.
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 200);

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// VXLAN (VNI 1) carrying an Ethernet frame to `dst_mac` with an ICMP echo request from
/// `src` to `dst`, ICMP id `id`.
fn vxlan_echo(dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"twill-spoof-test");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    // VXLAN: flags (I bit), reserved, VNI 1, reserved.
    let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    p.extend_from_slice(&dst_mac.0);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&icmp);
    p
}

/// Sends `n` copies of `payload` from a UDP socket made inside `ns` to `to`.
fn send_from(ns: &TestNetns, to: SocketAddr, payload: Vec<u8>, n: usize) {
    let sock = in_netns(&ns.path(), || UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    for _ in 0..n {
        sock.send_to(&payload, to).unwrap();
    }
}

/// The value of the pod's probe counter for ICMP id `id`.
fn hits(pod: &TestNetns, id: u16) -> u64 {
    let out = pod
        .exec(
            "nft",
            &["list", "counter", "ip", "probe", &format!("c{id}")],
        )
        .unwrap();
    let mut w = out.split_whitespace();
    while let Some(x) = w.next() {
        if x == "packets" {
            return w.next().unwrap().parse().unwrap();
        }
    }
    panic!("no packets in {out}");
}

fn add_probe(pod: &TestNetns, ids: &[u16]) {
    let mut rules = String::from(
        "table ip probe {\n chain input { type filter hook input priority -300; policy accept; }\n}\n",
    );
    for id in ids {
        rules.push_str(&format!(
            "add counter ip probe c{id}\nadd rule ip probe input icmp type echo-request icmp id {id} counter name \"c{id}\"\n"
        ));
    }
    let path = std::env::temp_dir().join(format!("twill-probe-{}.nft", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    pod.exec("nft", &["-f", &path.display().to_string()])
        .unwrap();
    let _ = std::fs::remove_file(&path);
}

fn vtep_mac(node: &TestNetns) -> Mac {
    let out = node.ip(&["-o", "link", "show", "twill.1"]).unwrap();
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap();
    mac.parse().unwrap()
}

fn nft_set(node: &TestNetns) -> String {
    node.exec("nft", &["list", "set", "ip", "twill", "peers"])
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_is_accepted_only_from_member_nodes() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        resync: Duration::from_secs(2),
        ..ClusterOpts::default()
    })
    .unwrap();
    let store = LeaseStore::connect(c.etcd_options()).await.unwrap();
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let pod = &n1.pods[0];
    let spoofed_src = n2.pods[0].ip;
    let to = SocketAddr::from((n1.ip, VXLAN_PORT));
    let mac1 = vtep_mac(&n1.ns);

    // A stranger on the underlay: its own namespace, a port on the bridge, no lease.
    let stranger = TestNetns::named(format!("{}-x", c.prefix)).unwrap();
    c.underlay
        .ip(&[
            "link",
            "add",
            "xs",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &stranger.path().display().to_string(),
        ])
        .unwrap();
    c.underlay
        .ip(&["link", "set", "xs", "master", "br0", "up"])
        .unwrap();
    stranger
        .ip(&["addr", "add", &format!("{STRANGER}/24"), "dev", "eth0"])
        .unwrap();
    stranger.ip(&["link", "set", "eth0", "up"]).unwrap();
    assert!(
        nft_set(&n1.ns).contains(&n2.ip.to_string()),
        "the member is in the set: {}",
        nft_set(&n1.ns)
    );

    const STRANGER_ID: u16 = 0xa1;
    const MEMBER_ID: u16 = 0xb2;
    const JOINED_ID: u16 = 0xc3;
    const LEFT_ID: u16 = 0xd4;
    const MEMBER2_ID: u16 = 0xe5;
    add_probe(
        &pod.ns,
        &[STRANGER_ID, MEMBER_ID, JOINED_ID, LEFT_ID, MEMBER2_ID],
    );

    // --- a non-member's packet with a spoofed inner source never reaches the pod ---
    send_from(
        &stranger,
        to,
        vxlan_echo(mac1, spoofed_src, pod.ip, STRANGER_ID, 1),
        20,
    );
    // Positive control: the same packet from a member's address does.
    let member_seen = wait_for(Duration::from_secs(2), || {
        send_from(
            &n2.ns,
            to,
            vxlan_echo(mac1, spoofed_src, pod.ip, MEMBER_ID, 1),
            1,
        );
        (hits(&pod.ns, MEMBER_ID) > 0).then_some(())
    });
    assert!(
        member_seen.is_some(),
        "a member's VXLAN packet did not reach the pod (the test cannot tell a drop)\n{}",
        c.logs()
    );
    assert_eq!(
        hits(&pod.ns, STRANGER_ID),
        0,
        "a non-member's VXLAN packet reached the pod"
    );
    // The stranger's packets wait for its first ARP answer (a new bridge port), so they
    // may reach the filter after the member's: wait for the counter, with a bound.
    let list = || {
        n1.ns
            .exec("nft", &["list", "counter", "ip", "twill", "vxlan_dropped"])
            .unwrap()
    };
    let counted = wait_for(Duration::from_secs(5), || {
        (!list().contains("packets 0 ")).then_some(())
    });
    assert!(counted.is_some(), "{}", list());
    // The drops are in the metric after the next resync.
    let dropped = wait_for(Duration::from_secs(5), || {
        metric(&n1.metrics(), "twill_vxlan_dropped_packets_total").filter(|v| *v >= 20.0)
    });
    assert!(dropped.is_some(), "{}", n1.metrics());

    // --- a node that joins is accepted within 1 s of its lease ---
    let joined: ipnet::Ipv4Net = "10.244.99.0/24".parse().unwrap();
    let attrs = LeaseAttrs::vxlan("stranger", STRANGER, 1, Mac::derive("stranger"));
    store.reserve(joined, &attrs).await.unwrap();
    let t0 = Instant::now();
    let inner_src = Ipv4Addr::new(10, 244, 99, 5);
    let mut seq = 0;
    let accepted = wait_for(Duration::from_secs(1), || {
        seq += 1;
        send_from(
            &stranger,
            to,
            vxlan_echo(mac1, inner_src, pod.ip, JOINED_ID, seq),
            1,
        );
        (hits(&pod.ns, JOINED_ID) > 0).then_some(())
    });
    let took = t0.elapsed();
    assert!(
        accepted.is_some(),
        "a joined node's VXLAN not accepted within 1 s; set: {}\n{}",
        nft_set(&n1.ns),
        n1.log_text()
    );
    eprintln!("join: VXLAN accepted {took:?} after the lease was written");

    // --- a node that leaves is no longer accepted ---
    assert!(store.release(joined).await.unwrap());
    let left = wait_for(Duration::from_secs(1), || {
        (!nft_set(&n1.ns).contains(&STRANGER.to_string()) && !n1.has_route(&joined.to_string()))
            .then_some(())
    });
    assert!(
        left.is_some(),
        "the left node is still in the set or routed: {}\n{}",
        nft_set(&n1.ns),
        n1.log_text()
    );
    send_from(
        &stranger,
        to,
        vxlan_echo(mac1, inner_src, pod.ip, LEFT_ID, 1),
        20,
    );
    let member_seen = wait_for(Duration::from_secs(2), || {
        send_from(
            &n2.ns,
            to,
            vxlan_echo(mac1, spoofed_src, pod.ip, MEMBER2_ID, 1),
            1,
        );
        (hits(&pod.ns, MEMBER2_ID) > 0).then_some(())
    });
    assert!(member_seen.is_some(), "{}", c.logs());
    assert_eq!(
        hits(&pod.ns, LEFT_ID),
        0,
        "a node that left is still accepted"
    );
    drop(stranger);
}

/// Proves that twilld never takes over a route it did not make: a lease whose subnet is
/// already routed elsewhere on the node (a host route via the underlay) gets its neighbour
/// and FDB entry on twill.1 but no route, the conflict is counted, and removing the lease
/// removes only twill's entries: the node's route table is exactly what it was (the host
/// route, the connected underlay route and the default route are all still there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_takes_over_a_foreign_route() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 0,
        resync: Duration::from_secs(2),
        ..ClusterOpts::default()
    })
    .unwrap();
    let store = LeaseStore::connect(c.etcd_options()).await.unwrap();
    let n1 = &c.nodes[0];
    n1.ns
        .ip(&["route", "add", "10.244.98.0/24", "via", "192.168.50.254"])
        .unwrap();
    let before = n1.ns.ip(&["route", "show"]).unwrap();
    assert!(before.contains("192.168.50.0/24 dev eth0"), "{before}");
    assert!(before.contains("default via 192.168.50.254"), "{before}");

    let claimed: ipnet::Ipv4Net = "10.244.98.0/24".parse().unwrap();
    let attrs = LeaseAttrs::vxlan(
        "claimer",
        Ipv4Addr::new(192, 168, 50, 201),
        1,
        Mac::derive("claimer"),
    );
    store.reserve(claimed, &attrs).await.unwrap();
    let neigh = || {
        n1.ns
            .ip(&["neigh", "show", "dev", "twill.1"])
            .unwrap_or_default()
            .contains("10.244.98.0 ")
    };
    let seen = wait_for(Duration::from_secs(3), || {
        (neigh() && metric(&n1.metrics(), "twill_route_conflicts") == Some(1.0)).then_some(())
    });
    assert!(
        seen.is_some(),
        "no neighbour or no conflict counted\n{}\n{}",
        n1.metrics(),
        n1.log_text()
    );
    let during = n1.ns.ip(&["route", "show", "10.244.98.0/24"]).unwrap();
    assert!(
        during.contains("via 192.168.50.254 dev eth0") && !during.contains("twill.1"),
        "{during}"
    );
    // The real peer's route is there (twill's own, with its protocol).
    let peer = c.nodes[1].subnet().unwrap();
    let ours = n1.ns.ip(&["route", "show", "proto", "116"]).unwrap();
    assert!(ours.contains(&format!("{peer} via")), "{ours}");

    assert!(store.release(claimed).await.unwrap());
    let gone = wait_for(Duration::from_secs(3), || (!neigh()).then_some(()));
    assert!(gone.is_some(), "{}", n1.log_text());
    // Let a resync pass too: it must not change anything either.
    let resynced = metric(&n1.metrics(), "twill_reconciles_total").unwrap_or(0.0);
    wait_for(Duration::from_secs(5), || {
        (metric(&n1.metrics(), "twill_reconciles_total").unwrap_or(0.0) > resynced + 1.0)
            .then_some(())
    });
    assert_eq!(n1.ns.ip(&["route", "show"]).unwrap(), before);
    assert_eq!(
        metric(&n1.metrics(), "twill_route_conflicts"),
        Some(0.0),
        "{}",
        n1.metrics()
    );
}

/// A node that writes its nft table (a fresh node, or a restart after the table was lost)
/// writes it with its peers already in the peer set, in the same transaction as the drop
/// rule: a table written with an empty set and filled by a later reconcile dropped the
/// VXLAN packets of peers that reached the node's lease in between (a peer-health probe
/// in bench_vxlan_filter). Proved from `nft monitor`, which names each transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nft_table_is_written_with_the_peers_in_it() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 0,
        ..ClusterOpts::default()
    })
    .unwrap();
    let peer_ip = c.nodes[0].ip;
    c.nodes[1].stop_daemon().unwrap();
    c.nodes[1]
        .ns
        .exec("nft", &["delete", "table", "ip", "twill"])
        .unwrap();
    let out = c.dir.path().join("nft-monitor.txt");
    let mut monitor = c.nodes[1].ns.command("nft");
    monitor
        .arg("monitor")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null());
    let mut monitor =
        twill_tests::cluster::ChildGuard::new(monitor.spawn().unwrap(), "nft monitor");
    // The monitor is listening once it reports a change of our own.
    wait_for(Duration::from_secs(10), || {
        c.nodes[1]
            .ns
            .exec("nft", &["add", "table", "ip", "twmark"])
            .ok()?;
        let _ = c.nodes[1]
            .ns
            .exec("nft", &["delete", "table", "ip", "twmark"]);
        std::fs::read_to_string(&out)
            .ok()?
            .contains("twmark")
            .then_some(())
    })
    .expect("nft monitor listening");
    c.start_daemon(1).unwrap();
    c.wait_ready(1, Duration::from_secs(20)).unwrap();
    let element = format!("{peer_ip}");
    let text = wait_for(Duration::from_secs(10), || {
        let t = std::fs::read_to_string(&out).ok()?;
        let written = t.contains("add table ip twill") && t.contains(&element);
        written.then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "no table write with {element} seen:\n{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        )
    });
    monitor.kill();
    let tx: Vec<&str> = text.split("# new generation").collect();
    let table_tx = tx
        .iter()
        .find(|t| t.contains("add table ip twill"))
        .expect("the table's transaction");
    assert!(
        table_tx.contains("@peers"),
        "the filter rule is written with the table:\n{table_tx}"
    );
    assert!(
        table_tx
            .lines()
            .any(|l| l.starts_with("add element ip twill peers") && l.contains(&element)),
        "the table is written with peer {element} in its set, not empty and filled later:\n{text}"
    );
}
