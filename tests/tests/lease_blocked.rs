//! A node never moves to another subnet while its pods hold addresses of the old one
//! (issue 14), on a real cluster: real etcd (short TTL and grace period), real twilld per
//! node, pods made by the real CNI plugin.
//!
//! The scenario of both tests: node-1 (A) has a pod; A is cut off from etcd (nftables in
//! A's namespace drops its connections to its etcd proxy) until its lease and its grace key
//! have expired; node-3 (B) then takes A's subnet (through a reservation, so that it is that
//! subnet and no other) and makes a pod in it; A is reconnected. Before the fix A took a new
//! subnet at once, rewrote its subnet file and moved twill.1's address, while its pod kept its
//! old address, the one B's pod has now. With the fix A stays NotReady and says why.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use twill_tests::bins;
use twill_tests::cluster::{Cluster, ClusterOpts, Node, metric, ping, wait_for};

/// The blocked cluster: A (index 0) blocked on `old`, held by B (index 2); node-2 (index 1)
/// is a peer of both.
struct Blocked {
    c: Cluster,
    old: String,
    rt: tokio::runtime::Runtime,
    store: twill_ipam::store::LeaseStore,
}

const A: usize = 0;
const PEER: usize = 1;
const B: usize = 2;

/// Drops A's traffic to its etcd proxy (127.0.0.1:2379 in its namespace).
fn cut(n: &Node) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("cut.nft");
    std::fs::write(
        &f,
        "table inet twcut {\n chain out { type filter hook output priority 0; tcp dport 2379 drop; }\n}\n",
    )
    .unwrap();
    n.ns.exec("nft", &["-f", &f.display().to_string()]).unwrap();
}

fn restore(n: &Node) {
    n.ns.exec("nft", &["delete", "table", "inet", "twcut"])
        .unwrap();
}

fn readyz(n: &Node) -> String {
    n.http("/readyz").map(|(_, b)| b).unwrap_or_default()
}

fn cni0_routes(n: &Node) -> String {
    n.ns.ip(&["route", "show", "dev", "cni0"])
        .unwrap_or_default()
}

impl Blocked {
    fn start() -> Blocked {
        let c = Cluster::start(ClusterOpts {
            nodes: 2,
            pods_per_node: 1,
            lease_ttl: Duration::from_secs(3),
            extra_args: vec!["--lease-grace".into(), "2s".into()],
            ..Default::default()
        })
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = rt
            .block_on(twill_ipam::store::LeaseStore::connect(c.etcd_options()))
            .unwrap();
        let old = c.nodes[A].subnet().expect("A's subnet file");
        let subnet: ipnet::Ipv4Net = old.parse().unwrap();
        cut(&c.nodes[A]);
        // Until A's lease and its grace key are gone (TTL 3 s, grace 2 s).
        let gone = wait_for(Duration::from_secs(30), || {
            rt.block_on(async {
                let lease = store.get(&subnet).await.ok()?;
                let grace = store
                    .client()
                    .clone()
                    .get(store.grace_key(&subnet), None)
                    .await
                    .ok()?;
                (lease.is_none() && grace.kvs().is_empty()).then_some(())
            })
        });
        assert!(gone.is_some(), "A's lease and grace key did not expire");
        let mut b = Blocked { c, old, rt, store };
        // B takes A's subnet.
        b.c.twillctl(&["leases", "reserve", &b.old, "--node", "node-3"])
            .unwrap();
        let i = b.c.add_node().unwrap();
        assert_eq!(i, B);
        b.c.wait_ready(B, Duration::from_secs(20)).unwrap();
        assert_eq!(b.c.nodes[B].subnet().as_deref(), Some(b.old.as_str()));
        b.c.add_pod(B).unwrap();
        restore(&b.c.nodes[A]);
        b
    }

    fn a(&self) -> &Node {
        &self.c.nodes[A]
    }

    /// Leases named `node` in etcd.
    fn leases_of(&self, node: &str) -> Vec<String> {
        let (leases, _) = self.rt.block_on(self.store.list()).unwrap();
        leases
            .iter()
            .filter(|l| l.attrs.node_name == node)
            .map(|l| l.subnet.to_string())
            .collect()
    }

    /// A is blocked, says why everywhere, kept its subnet and data plane; B's pod is
    /// reachable from the peer.
    fn assert_blocked(&self) {
        let a = self.a();
        let why = wait_for(Duration::from_secs(30), || {
            let t = readyz(a);
            (t.contains("lease blocked") && t.contains(&self.old) && t.contains("node-3"))
                .then_some(t)
        });
        let why = why
            .unwrap_or_else(|| panic!("A not blocked: /readyz {:?}\n{}", readyz(a), self.c.logs()));
        eprintln!("A's /readyz: {why}");
        assert_eq!(a.http("/readyz").unwrap().0, 503);
        assert_eq!(metric(&a.metrics(), "twill_lease_blocked"), Some(1.0));
        assert!(self.leases_of("node-1").is_empty(), "A took no subnet");
        assert_eq!(
            a.subnet().as_deref(),
            Some(self.old.as_str()),
            "subnet file"
        );
        assert!(
            cni0_routes(a).contains(&self.old),
            "cni0's route: {}",
            cni0_routes(a)
        );
        assert!(!a.has_route(&self.old), "no peer route over cni0's");
        assert_eq!(
            a.log_text()
                .matches("lease blocked: this node's subnet")
                .count(),
            1,
            "one warning per change"
        );
        // B's pod from the peer's pod.
        let dst = self.c.nodes[B].pods[0].ip;
        let src = &self.c.nodes[PEER].pods[0].ns;
        assert!(
            wait_for(Duration::from_secs(15), || ping(src, dst, 1, 1)
                .then_some(()))
            .is_some(),
            "B's pod {dst} unreachable from the peer\n{}",
            self.c.logs()
        );
        // twillctl status on A names the blocked state.
        let out = Command::new("nsenter")
            .arg(format!("--net={}", a.ns.path().display()))
            .arg("--")
            .arg(bins::bin("twillctl"))
            .args([
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "status",
                "--node-name",
                "node-1",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("twilld NOT READY: lease blocked") && text.contains("node-3"),
            "status: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("is held by node \"node-3\""), "{text}");
        // Still nothing taken after all that (the holder retries every ≤ 2 s).
        assert!(self.leases_of("node-1").is_empty(), "A took no subnet");
        assert_eq!(metric(&a.metrics(), "twill_lease_blocked"), Some(1.0));
    }

    /// A moved: ready with another subnet, no peer route over cni0's.
    fn assert_moved(&self) -> String {
        let a = self.a();
        assert!(
            wait_for(Duration::from_secs(20), || a.ready().then_some(())).is_some(),
            "A not ready after the move: {:?}\n{}",
            readyz(a),
            a.log_text()
        );
        let new = a.subnet().unwrap();
        assert_ne!(new, self.old);
        assert_eq!(self.leases_of("node-1"), vec![new.clone()]);
        assert_eq!(metric(&a.metrics(), "twill_lease_blocked"), Some(0.0));
        // B's lease of the old subnet is a peer now. The old gateway address left A's bridge
        // with the move (its connected route would hide B's subnet), so twill's route to B
        // is programmed and nothing conflicts.
        let routed = wait_for(Duration::from_secs(10), || {
            (!cni0_routes(a).contains(&self.old)
                && a.has_route(&self.old)
                && metric(&a.metrics(), "twill_route_conflicts")? == 0.0)
                .then_some(())
        });
        assert!(
            routed.is_some(),
            "cni0: {}\noverlay: {:?}\n{}",
            cni0_routes(a),
            a.overlay_routes(),
            a.log_text()
        );
        new
    }
}

/// Proves that a blocked node moves only when the operator asks: `twillctl leases move`
/// without `--yes` is refused (exit 4) and changes nothing; with `--yes` the node takes
/// another subnet at its next retry and deletes the permission. Before the fix the node
/// moved at once on its own, with its pod still holding an address of the old subnet (the
/// one node-3's pod has too).
#[test]
fn a_node_whose_subnet_was_taken_stays_blocked_until_the_operator_lets_it_move() {
    let b = Blocked::start();
    b.assert_blocked();
    let refused = Command::new(bins::bin("twillctl"))
        .args([
            "--etcd-endpoints",
            &b.c.etcd.endpoint(),
            "leases",
            "move",
            "node-1",
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    let key = b.store.move_key("node-1");
    let mut client = b.store.client().clone();
    assert!(
        b.rt.block_on(client.get(key.as_str(), None))
            .unwrap()
            .kvs()
            .is_empty()
    );
    assert!(b.leases_of("node-1").is_empty());

    let out =
        b.c.twillctl(&["leases", "move", "node-1", "--from", &b.old, "--yes"])
            .unwrap();
    assert!(out.contains("drain"), "{out}");
    b.assert_moved();
    assert!(
        wait_for(Duration::from_secs(10), || b
            .rt
            .block_on(client.get(key.as_str(), None))
            .ok()
            .filter(|r| r.kvs().is_empty())
            .map(|_| ()))
        .is_some(),
        "the used permission is deleted"
    );
    assert!(
        b.a()
            .log_text()
            .contains("the operator allows this node to move")
    );
}

/// Proves that a blocked node moves by itself once no pod holds an address of the old subnet
/// (CNI DEL of its pod), without any permission, and says so at warn. Before the fix it moved
/// with the pod still there.
#[test]
fn a_blocked_node_moves_by_itself_once_its_pods_are_gone() {
    let b = Blocked::start();
    b.assert_blocked();
    let a = b.a();
    let pod = &a.pods[0];
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"twill","type":"twill","subnetFile":"{}","dataDir":"{}","bridge":"cni0"}}"#,
        a.subnet_file().display(),
        a.dir.join("cni").display()
    );
    let netns = pod.ns.path().display().to_string();
    let del = bins::exec_plugin(
        &bins::bin("twill"),
        Some(&a.ns.path()),
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &pod.id),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", &bins::bin_dir().display().to_string()),
        ],
        &conf,
    )
    .unwrap();
    assert!(del.ok(), "{} {}", del.stdout, del.stderr);
    let new = b.assert_moved();
    assert!(
        a.log_text()
            .contains("took another subnet than the one this node had"),
        "warned"
    );
    // A pod made now gets an address of the new subnet.
    let mut c = b.c;
    c.add_pod(A).unwrap();
    let ip: Ipv4Addr = c.nodes[A].pods[1].ip;
    let net: ipnet::Ipv4Net = new.parse().unwrap();
    assert!(net.contains(&ip), "{ip} in {new}");
    // And it reaches B's pod in A's old subnet (before the old gateway address was removed
    // on the move, A's bridge kept that subnet and the packets never left the node).
    let dst = c.nodes[B].pods[0].ip;
    assert!(
        wait_for(Duration::from_secs(15), || ping(
            &c.nodes[A].pods[1].ns,
            dst,
            1,
            1
        )
        .then_some(()))
        .is_some(),
        "B's pod {dst} unreachable from A's new pod\n{}",
        c.logs()
    );
}
