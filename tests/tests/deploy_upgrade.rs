//! Upgrades and config changes as the DaemonSet performs them, on the cluster harness (node
//! namespaces on an underlay bridge, a real etcd, real twilld, pods made by the real plugin):
//!
//! - a rolling upgrade: each node's twilld is stopped (SIGTERM, as the kubelet does) and a
//!   new binary is started in its place, one node at a time, waiting for `/readyz`, while
//!   every pod pings a pod on the next node: 0 lost, every node keeps its subnet;
//! - fields that a newer version wrote into the leases and the config survive restarts;
//! - a compatible config change applied by a restart (other flags, net-conf.json with the
//!   same network written differently): 0 lost;
//! - an incompatible change (`Network` under existing leases) is refused with a clear
//!   message in the log and on `/readyz`, and the data plane keeps working meanwhile;
//! - twilld started with exactly the DaemonSet's privileges (capability bounding set =
//!   NET_ADMIN, no new privileges, `/proc/sys` read-only as in a container) on a node that
//!   meets docs/install.md's prerequisites, becomes ready and carries pod traffic.
//!
//! Root required (namespaces); everything has a `tw<pid><n>` prefix and is removed on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use twill_tests::cluster::{BackgroundPing, Cluster, ClusterOpts, ping};

const PING_INTERVAL: Duration = Duration::from_millis(100);

/// Starts node `i`'s twilld from `binary` (see [`Cluster::start_daemon_with`]).
fn start(c: &mut Cluster, i: usize, binary: &Path, extra: &[&str], wrapper: &[&str]) {
    c.start_daemon_with(i, binary, extra, wrapper)
        .expect("spawn twilld");
}

/// A "new release" of twilld: the built binary copied to a new file (the image of the new
/// pod), so that the old process runs from a binary that is no longer the one started.
fn new_release(dir: &Path, tag: &str) -> PathBuf {
    let p = dir.join(format!("twilld-{tag}"));
    std::fs::copy(twill_tests::bins::bin("twilld"), &p).expect("copy twilld");
    p
}

/// Background pings from each node's first pod to the first pod of the next node (a ring:
/// every node sends and receives cross-node traffic).
fn ring_pings(c: &Cluster) -> Vec<(String, BackgroundPing)> {
    let n = c.nodes.len();
    (0..n)
        .map(|i| {
            let dst: Ipv4Addr = c.nodes[(i + 1) % n].pods[0].ip;
            let label = format!(
                "{} -> {} ({dst})",
                c.nodes[i].name,
                c.nodes[(i + 1) % n].name
            );
            (
                label,
                BackgroundPing::start(&c.nodes[i].pods[0].ns, dst, PING_INTERVAL).unwrap(),
            )
        })
        .collect()
}

fn assert_no_loss(c: &Cluster, pings: Vec<(String, BackgroundPing)>, what: &str) {
    let mut report = Vec::new();
    let mut lost_total = 0;
    for (label, bg) in pings {
        let (tx, rx) = bg.finish().unwrap();
        assert!(tx >= 20, "{label}: only {tx} pings sent");
        eprintln!("{what}: {label}: {rx}/{tx} received");
        lost_total += tx - rx;
        report.push(format!("{label}: {} of {tx} lost", tx - rx));
    }
    assert_eq!(lost_total, 0, "{what}: {}\n{}", report.join(", "), c.logs());
}

/// Adds `"FutureField"` to every lease and to the network config in etcd, as a newer twill
/// would write them (each lease stays bound to its etcd lease).
fn write_future_fields(c: &Cluster) {
    rt().block_on(async {
        let (store, mut kv, resp) = list_subnets(c).await;
        let mut keys = vec![store.config_key()];
        keys.extend(resp.kvs().iter().map(|k| k.key_str().unwrap().to_string()));
        assert!(keys.len() > c.nodes.len(), "{keys:?}");
        for key in keys {
            let resp = kv.get(key.as_str(), None).await.unwrap();
            let item = &resp.kvs()[0];
            let mut v: serde_json::Value = serde_json::from_slice(item.value()).unwrap();
            v["FutureField"] = serde_json::json!({"since": "v9"});
            let opts = (item.lease() != 0)
                .then(|| etcd_client::PutOptions::new().with_lease(item.lease()));
            kv.put(key.as_str(), v.to_string(), opts).await.unwrap();
        }
    });
}

/// The keys (leases and config) that still carry `"FutureField"`.
fn keys_with_future_fields(c: &Cluster) -> (usize, usize) {
    rt().block_on(async {
        let (store, mut kv, resp) = list_subnets(c).await;
        let leases = resp
            .kvs()
            .iter()
            .filter(|k| k.value_str().unwrap().contains("\"FutureField\""))
            .count();
        let conf = kv.get(store.config_key(), None).await.unwrap();
        let conf = conf.kvs()[0]
            .value_str()
            .unwrap()
            .contains("\"FutureField\"") as usize;
        (leases, conf)
    })
}

/// The cluster's store, an etcd client, and every key under its `subnets/` prefix.
async fn list_subnets(
    c: &Cluster,
) -> (
    twill_ipam::store::LeaseStore,
    etcd_client::Client,
    etcd_client::GetResponse,
) {
    let store = twill_ipam::store::LeaseStore::new(c.etcd_options())
        .await
        .unwrap();
    let mut kv = store.client().clone();
    let resp = kv
        .get(
            store.subnets_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    (store, kv, resp)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn subnets(c: &Cluster) -> Vec<Option<String>> {
    c.nodes.iter().map(|n| n.subnet()).collect()
}

#[test]
fn rolling_upgrade_node_by_node_loses_no_pod_traffic() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 3,
        pods_per_node: 1,
        ..Default::default()
    })
    .unwrap();
    let releases = tempfile::tempdir().unwrap();
    let before = subnets(&c);
    let pings = ring_pings(&c);
    std::thread::sleep(Duration::from_secs(1));

    for round in ["v2", "v3"] {
        let bin = new_release(releases.path(), round);
        for i in 0..c.nodes.len() {
            // The kubelet's SIGTERM, then the new pod's twilld (maxSurge 0: never two).
            c.nodes[i].stop_daemon().unwrap();
            start(&mut c, i, &bin, &[], &[]);
            let took = c.wait_ready(i, Duration::from_secs(20)).unwrap();
            eprintln!("{round}: {} ready after {took:?}", c.nodes[i].name);
            // minReadySeconds of the DaemonSet.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    assert_no_loss(&c, pings, "rolling upgrade");
    // Sticky leases: every node kept its subnet, so every pod kept its IP.
    assert_eq!(subnets(&c), before);
    for n in &c.nodes {
        let d = n.daemon.as_ref().unwrap();
        assert!(d.pid().is_some(), "{} runs", n.name);
    }
}

#[test]
fn leases_and_config_keep_fields_of_a_newer_version_across_restarts() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 0,
        ..Default::default()
    })
    .unwrap();
    // What a newer version wrote: a twilld must keep it when it takes its lease over on
    // restart (and renews it), so that an upgrade followed by a rollback loses nothing.
    write_future_fields(&c);
    let bin = twill_tests::bins::bin("twilld");
    for i in 0..c.nodes.len() {
        c.nodes[i].stop_daemon().unwrap();
        start(&mut c, i, &bin, &[], &[]);
        c.wait_ready(i, Duration::from_secs(20)).unwrap();
    }
    let (leases, conf) = keys_with_future_fields(&c);
    assert_eq!(
        conf, 1,
        "the network config lost the field a newer version wrote"
    );
    assert_eq!(
        leases,
        c.nodes.len(),
        "only {leases} of {} leases kept the field a newer version wrote, after twilld took \
         them over on restart\n{}",
        c.nodes.len(),
        c.logs()
    );
}

#[test]
fn compatible_config_change_is_applied_by_a_restart_without_loss() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 3,
        pods_per_node: 1,
        ..Default::default()
    })
    .unwrap();
    let before = subnets(&c);
    // The same network written out with its defaults, plus a key this version ignores: the
    // ConfigMap edited by hand. And other per-node settings (resync period, log format).
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0",
            "SubnetMax":"10.244.255.0","Backend":{"Type":"vxlan","VNI":1,"Port":8472},
            "Comment":"edited"}"#,
    )
    .unwrap();
    let pings = ring_pings(&c);
    std::thread::sleep(Duration::from_secs(1));
    let bin = twill_tests::bins::bin("twilld");
    for i in 0..c.nodes.len() {
        c.nodes[i].stop_daemon().unwrap();
        start(
            &mut c,
            i,
            &bin,
            &["--resync-period", "5s", "--log-format", "json"],
            &[],
        );
        c.wait_ready(i, Duration::from_secs(20)).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    // Long enough for a resync under the new period to run.
    std::thread::sleep(Duration::from_secs(6));
    assert_no_loss(&c, pings, "compatible config change");
    assert_eq!(subnets(&c), before);
}

#[test]
fn incompatible_network_change_is_refused_in_log_and_readyz_and_traffic_flows() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        ..Default::default()
    })
    .unwrap();
    let good = std::fs::read_to_string(c.dir.path().join("net-conf.json")).unwrap();
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        r#"{"Network":"10.99.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#,
    )
    .unwrap();
    let pings = ring_pings(&c);
    let bin = twill_tests::bins::bin("twilld");
    c.nodes[0].stop_daemon().unwrap();
    start(&mut c, 0, &bin, &[], &[]);

    // /readyz answers 503 and says why (the process stays up: the kubelet's probe, not a
    // crash loop, holds the rollout); the log says the same.
    let node = &c.nodes[0];
    let body =
        twill_tests::cluster::wait_for(Duration::from_secs(15), || match node.http("/readyz") {
            Ok((503, body)) if body.contains("10.99.0.0/16") => Some(body),
            _ => None,
        });
    let log = node.log_text();
    let body = body.unwrap_or_else(|| {
        panic!(
            "/readyz never said why the config is refused (now: {:?}); log:\n{log}",
            node.http("/readyz")
        )
    });
    eprintln!("/readyz: {body}");
    assert!(body.contains("Network"), "{body}");
    assert!(
        log.contains("10.99.0.0/16") && log.contains("10.244.0.0/16"),
        "log:\n{log}"
    );
    assert!(!node.ready());
    // Meanwhile the data plane is untouched: traffic keeps flowing both ways.
    std::thread::sleep(Duration::from_secs(2));
    assert!(ping(&c.nodes[1].pods[0].ns, c.nodes[0].pods[0].ip, 3, 1));

    // Undo the ConfigMap change; the next pod is ready again.
    std::fs::write(c.dir.path().join("net-conf.json"), good).unwrap();
    c.nodes[0].stop_daemon().unwrap();
    start(&mut c, 0, &bin, &[], &[]);
    c.wait_ready(0, Duration::from_secs(20)).unwrap();
    assert_no_loss(&c, pings, "refused config change");
}

/// `/proc/sys` read-only (as runc mounts it in a non-privileged container), the root file
/// system read-only (`readOnlyRootFilesystem`) except `writable` (the node's directory with
/// the subnet file: the hostPath `/run/twill` of the pod), and a capability bounding set of
/// NET_ADMIN only, without new privileges: what deploy/kube-twill.yml gives the twilld
/// container. All in a private mount namespace: the host's mounts are not touched.
fn daemonset_privileges(writable: &Path) -> Vec<String> {
    let w = writable.display();
    let script = format!(
        "mount --bind {w} {w} && mount -o remount,bind,ro / && \
         mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
         exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,+net_admin -- \"$@\""
    );
    let mut v: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
    ]
    .map(String::from)
    .to_vec();
    v.push(script);
    v.push("twilld".into());
    v
}

#[test]
fn twilld_works_with_exactly_the_daemonset_privileges() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        ..Default::default()
    })
    .unwrap();
    // A third node with forwarding on (the one sysctl docs/install.md requires, since
    // twilld cannot write it from a pod) and the strict reverse-path filter of RHEL-like
    // distributions on `all` and `default`: twilld cannot write the device's rp_filter
    // (read-only /proc/sys), warns, and the overlay still works.
    let i = c.add_node().unwrap();
    c.nodes[i].kill_daemon();
    let ns = &c.nodes[i].ns;
    let _ = ns.ip(&["link", "del", "twill.1"]);
    let _ = ns.exec("nft", &["delete", "table", "ip", "twill"]);
    let _ = std::fs::remove_file(c.nodes[i].subnet_file());
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "1"),
        ("net.ipv4.conf.default.rp_filter", "1"),
    ] {
        ns.exec("sysctl", &["-q", "-w", &format!("{k}={v}")])
            .unwrap();
    }

    let wrapper = daemonset_privileges(&c.nodes[i].dir);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let bin = twill_tests::bins::bin("twilld");
    start(&mut c, i, &bin, &[], &wrapper);
    if let Err(e) = c.wait_ready(i, Duration::from_secs(20)) {
        panic!("twilld with the DaemonSet's privileges: {e:#}");
    }
    // It really ran restricted: its effective capabilities are NET_ADMIN (bit 12) only.
    let pid = c.nodes[i].daemon.as_ref().unwrap().pid().unwrap();
    let twilld_pid = child_named(pid, "twilld").unwrap_or(pid);
    let status = std::fs::read_to_string(format!("/proc/{twilld_pid}/status")).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    assert_eq!(
        u64::from_str_radix(cap_eff, 16).unwrap(),
        1 << 12,
        "CapEff {cap_eff}"
    );

    // Pods on it reach the others and back.
    c.add_pod(i).unwrap();
    let here = c.nodes[i].pods[0].ip;
    for k in 0..i {
        let there = c.nodes[k].pods[0].ip;
        assert!(
            ping(&c.nodes[i].pods[0].ns, there, 3, 2),
            "{here} -> {there}\n{}",
            c.logs()
        );
        assert!(
            ping(&c.nodes[k].pods[0].ns, here, 3, 2),
            "{there} -> {here}\n{}",
            c.logs()
        );
    }
}

/// The pid of the process named `name` among `pid` and its descendants (nsenter, unshare
/// and sh exec into each other, but nsenter forks).
fn child_named(pid: u32, name: &str) -> Option<u32> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() == name {
        return Some(pid);
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find_map(|c| child_named(c, name))
}
