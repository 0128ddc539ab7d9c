//! twill under a real libcni client: rootful podman 4.3 (Debian 12; CNI network backend,
//! libcni 1.1.2) loads DESIGN.md's conflist (twill, then portmap) and execs the built `twill`
//! for ADD and DEL. Podman runs inside a node namespace with all its state in a temp dir
//! (see twill_tests::podman), so cni0 and the veths appear there and never in the root
//! namespace. Two busybox containers (`--rootfs`, no registry) get addresses from the node's
//! subnet and ping each other; `-p 8080:80` reaches a container from the node through
//! portmap; `podman rm -f` releases the addresses and removes the veths and port rules.
//! Root required; podman, runc, conmon and busybox-static come from scripts/setup.sh.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use twill_dataplane::NetNs;
use twill_tests::bins::bin;
use twill_tests::netns::{require_root, run_host, tcp_fetch};
use twill_tests::podman::{DUAL_SUBNET_ENV, GATEWAY, NETWORK, POD_SUBNET, POD_SUBNET6, Podman};

/// The links of the root namespace (read only).
fn root_links() -> BTreeSet<String> {
    run_host("ip", &["-o", "link", "show"])
        .expect("ip link show")
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

/// The root namespace has no cni0 and no veth that was not there before.
fn assert_root_untouched(before: &BTreeSet<String>, when: &str) {
    let now = root_links();
    assert!(
        !now.contains("cni0"),
        "{when}: cni0 appeared in the root namespace"
    );
    let new_veths: Vec<_> = now
        .difference(before)
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert!(
        new_veths.is_empty(),
        "{when}: new veths in the root namespace: {new_veths:?}"
    );
}

fn node_veths(pm: &Podman) -> Vec<String> {
    pm.node()
        .links()
        .expect("node links")
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect()
}

#[test]
fn podman_runs_containers_on_twill_through_libcni() {
    require_root();
    let root_before = root_links();
    let mut pm = Podman::new(&bin("twill")).expect("podman harness");
    let subnet: Ipv4Net = POD_SUBNET.parse().unwrap();

    // libcni parsed the conflist: podman lists the network by its name.
    let nets = pm
        .run(&["network", "ls", "--format", "{{.Name}}"])
        .expect("podman network ls");
    assert!(
        nets.lines().any(|l| l == NETWORK),
        "podman does not list the twill network: {nets:?}"
    );

    // ADD through libcni: twill, then portmap with runtimeConfig.portMappings for b.
    let a = pm
        .run_detached("a", &[], &["sleep", "300"])
        .expect("podman run a");
    let b = pm
        .run_detached(
            "b",
            &["-p", "8080:80"],
            &[
                "sh",
                "-c",
                "while true; do echo twill-podman | nc -l -p 80; done",
            ],
        )
        .expect("podman run b");

    // The addresses libcni got back from twill: distinct, in the node's subnet, not cni0's.
    let ip_a = pm.ip("a").expect("ip of a");
    let ip_b = pm.ip("b").expect("ip of b");
    for ip in [ip_a, ip_b] {
        assert!(subnet.contains(&ip), "{ip} is not in {subnet}");
        assert_ne!(ip, GATEWAY, "a container got the gateway address");
    }
    assert_ne!(ip_a, ip_b, "both containers got {ip_a}");
    let gw = pm.inspect_json("a").unwrap()["NetworkSettings"]["Networks"][NETWORK]["Gateway"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        gw,
        GATEWAY.to_string(),
        "gateway in podman's view of the result"
    );

    // Inside the container: eth0 carries that address with the subnet's prefix, MTU 1450.
    let eth0 = pm
        .exec("a", &["ip", "-o", "addr", "show", "dev", "eth0"])
        .expect("ip addr in a");
    assert!(
        eth0.contains(&format!("inet {ip_a}/24")),
        "eth0 of a lacks {ip_a}/24: {eth0}"
    );
    let link = pm
        .exec("a", &["ip", "-o", "link", "show", "dev", "eth0"])
        .expect("ip link in a");
    assert!(link.contains("mtu 1450"), "eth0 of a: {link}");

    // The node namespace has cni0 with the gateway and one host veth per container; the
    // root namespace has neither.
    let cni0 = pm
        .node()
        .ip(&["-o", "-4", "addr", "show", "dev", "cni0"])
        .expect("cni0 in the node namespace");
    assert!(cni0.contains(&format!("{GATEWAY}/24")), "cni0: {cni0}");
    assert_eq!(node_veths(&pm).len(), 2, "host veths in the node namespace");
    assert_root_untouched(&root_before, "with both containers up");

    // twill's reservations are keyed by podman's container IDs.
    let res = pm.reservations().expect("reservations");
    let mut got: Vec<(String, String)> = res
        .iter()
        .map(|r| {
            (
                r["containerId"].as_str().unwrap_or_default().to_string(),
                r["ip"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (a.id.clone(), ip_a.to_string()),
        (b.id.clone(), ip_b.to_string()),
    ];
    want.sort();
    assert_eq!(got, want, "twill reservations vs podman's containers");

    // Pod to pod across cni0.
    let ping = pm
        .exec("a", &["ping", "-c", "3", "-W", "5", &ip_b.to_string()])
        .expect("ping from a to b");
    // Whichever ping the container runs (busybox's or iputils'): exit status 0 (checked by
    // `exec`) and every request answered.
    assert_eq!(
        twill_tests::cluster::ping_summary(&ping).expect("ping summary"),
        (3, 3),
        "{ping}"
    );
    pm.node()
        .ping(IpAddr::V4(ip_a), 2, 5)
        .expect("ping from the node to a");

    // portmap: the node's own address, port 8080, is DNATed to b:80. The server in b
    // starts asynchronously after `podman run -d` returns, so retry until it answers.
    let node_ns = NetNs::open(pm.node().path()).expect("open node netns");
    let to = SocketAddr::new(IpAddr::V4(GATEWAY), 8080);
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match tcp_fetch(&node_ns, to) {
            Ok(s) if s.contains("twill-podman") => break s,
            r if Instant::now() > deadline => panic!("{to} via portmap: {r:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(body.trim(), "twill-podman");

    // DEL through libcni: the addresses are released, veths and port rules gone.
    pm.rm(&["a", "b"]).expect("podman rm -f a b");
    assert_eq!(
        pm.containers().expect("podman ps -a"),
        Vec::<String>::new(),
        "containers left"
    );
    let res = pm.reservations().expect("reservations after rm");
    assert!(res.is_empty(), "reservations left after DEL: {res:?}");
    assert_eq!(
        node_veths(&pm),
        Vec::<String>::new(),
        "veths left in the node"
    );
    let nat = pm
        .node()
        .exec("iptables-save", &["-t", "nat"])
        .expect("iptables-save in the node namespace");
    assert!(
        !nat.contains(&a.id) && !nat.contains(&b.id),
        "portmap rules left after DEL:\n{nat}"
    );
    for c in [&a, &b] {
        assert!(
            !c.sandbox.exists(),
            "netns {} of {} left",
            c.sandbox.display(),
            c.name
        );
        let cached = Podman::cni_cache_entries(&c.id);
        assert!(cached.is_empty(), "libcni cache entries left: {cached:?}");
    }
    assert_root_untouched(&root_before, "after rm");

    // A third container reuses the freed pool: ADD after DEL works through libcni too.
    pm.run_detached("c", &[], &["sleep", "300"])
        .expect("podman run c after rm");
    let ip_c = pm.ip("c").expect("ip of c");
    assert!(subnet.contains(&ip_c), "{ip_c} is not in {subnet}");
    pm.rm(&["c"]).expect("podman rm -f c");
    assert!(
        pm.reservations().unwrap().is_empty(),
        "c's reservation left"
    );

    let cgroup_parent = pm.cgroup_parent().to_string();
    let sandboxes = [a.sandbox.clone(), b.sandbox.clone()];
    drop(pm);
    assert_root_untouched(&root_before, "after cleanup");
    let cgroups_left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .expect("read /sys/fs/cgroup")
        .filter_map(|e| e.ok())
        .map(|h| h.path().join(&cgroup_parent))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups_left.is_empty(), "cgroups left: {cgroups_left:?}");
    assert!(
        sandboxes.iter().all(|s| !s.exists()),
        "container netns left"
    );
}

/// Proves dual-stack through a real libcni client: on a node whose subnet file carries the
/// IPv6 keys, each podman container gets one IPv4 and one IPv6 address (podman's view of the
/// result, and eth0 in the container), the two containers ping each other over IPv6 right
/// after `podman run` returned, and `podman rm` releases both addresses.
#[test]
fn podman_containers_get_both_families_on_a_dual_stack_node() {
    require_root();
    let root_before = root_links();
    let mut pm = Podman::with_subnet_env(&bin("twill"), DUAL_SUBNET_ENV).expect("podman harness");
    let (subnet, subnet6): (Ipv4Net, Ipv6Net) =
        (POD_SUBNET.parse().unwrap(), POD_SUBNET6.parse().unwrap());
    pm.run_detached("a", &[], &["sleep", "300"])
        .expect("podman run a");
    pm.run_detached("b", &[], &["sleep", "300"])
        .expect("podman run b");
    let (a4, a6) = (
        pm.ip("a").expect("ip of a"),
        pm.ipv6("a").expect("ipv6 of a"),
    );
    let b6 = pm.ipv6("b").expect("ipv6 of b");
    assert!(subnet.contains(&a4), "{a4} is not in {subnet}");
    for ip in [a6, b6] {
        assert!(subnet6.contains(&ip), "{ip} is not in {subnet6}");
    }
    assert_ne!(a6, b6);
    let eth0 = pm
        .exec("a", &["ip", "-o", "addr", "show", "dev", "eth0"])
        .expect("ip addr in a");
    assert!(eth0.contains(&format!("inet {a4}/24")), "{eth0}");
    assert!(eth0.contains(&format!("inet6 {a6}/64")), "{eth0}");
    assert!(
        !eth0.contains(&format!("{a6}/64 scope global tentative")),
        "{eth0}"
    );
    let ping = pm
        .exec("a", &["ping", "-c", "2", "-W", "5", &b6.to_string()])
        .expect("ping6 from a to b");
    assert_eq!(
        twill_tests::cluster::ping_summary(&ping).expect("ping summary"),
        (2, 2),
        "{ping}"
    );
    let res = pm.reservations().expect("reservations");
    let mut v6: Vec<String> = res
        .iter()
        .map(|r| r["ipv6"].as_str().unwrap_or_default().to_string())
        .collect();
    v6.sort();
    let mut want = vec![a6.to_string(), b6.to_string()];
    want.sort();
    assert_eq!(v6, want, "twill reservations vs podman's view");
    assert_root_untouched(&root_before, "with both containers up");

    pm.rm(&["a", "b"]).expect("podman rm -f a b");
    let res = pm.reservations().expect("reservations after rm");
    assert!(res.is_empty(), "reservations left after DEL: {res:?}");
    assert_eq!(node_veths(&pm), Vec::<String>::new(), "veths left");
    drop(pm);
    assert_root_untouched(&root_before, "after cleanup");
}
