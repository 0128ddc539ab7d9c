//! `twillctl doctor` on a node of a real 2-node cluster (real etcd, real twilld, pods made
//! by the real plugin). First the healthy node passes every check (exit 0). Then the node's
//! namespace is set up wrong on purpose, one fault per check, and doctor names each one with
//! its why and fix (exit 6); once the faults are undone it passes again.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use twill_tests::cluster::{Cluster, ClusterOpts, Node};

fn doctor(n: &Node, conf_dir: &Path, extra: &[&str]) -> (Output, Value) {
    let out = n
        .doctor_command(conf_dir)
        .args(extra)
        .args(if extra.contains(&"--lease-warn") {
            &[][..]
        } else {
            &["--lease-warn", "1s"][..]
        })
        .env("TWILLCTL_ETCD_ENDPOINTS", "http://127.0.0.1:2379")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor output: {e}: {out:?}"));
    (out, v)
}

/// The findings of `check` that are not ok: their `what` texts.
fn problems(v: &Value, check: &str) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == check && c["status"] != "ok")
        .map(|c| {
            assert!(
                !c["why"].as_str().unwrap().is_empty() && !c["fix"].as_str().unwrap().is_empty(),
                "{c}"
            );
            c["what"].as_str().unwrap().to_string()
        })
        .collect()
}

fn all_problems(v: &Value) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] != "ok")
        .map(|c| c.to_string())
        .collect()
}

#[test]
fn doctor_passes_a_healthy_node_and_names_every_fault() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        ..ClusterOpts::default()
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let conf_dir = tmp.path().join("net.d");
    std::fs::create_dir(&conf_dir).unwrap();
    let n = &c.nodes[0];
    std::fs::write(
        conf_dir.join("10-twill.conflist"),
        format!(
            r#"{{"cniVersion":"1.0.0","name":"twill","plugins":[{{"type":"twill","subnetFile":"{}","bridge":"cni0"}}]}}"#,
            n.subnet_file().display()
        ),
    )
    .unwrap();

    let (out, v) = doctor(n, &conf_dir, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{:?}\n{}",
        all_problems(&v),
        c.logs()
    );
    assert_eq!(v["ok"], true);

    // A second pod whose veth then vanishes: a leaked reservation.
    c.add_pod(0).unwrap();
    let n = &c.nodes[0];
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(n.dir.join("cni/twill/state.json")).unwrap())
            .unwrap();
    let veth_of = |id: &str| -> String {
        state["reservations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["containerId"] == id)
            .and_then(|r| r["hostVeth"].as_str())
            .unwrap_or_else(|| panic!("no veth of {id}: {state}"))
            .to_string()
    };
    let leaked = veth_of(&n.pods[1].id);
    let first = veth_of(&n.pods[0].id);
    n.ns.ip(&["link", "del", &leaked]).unwrap();

    // The faults.
    n.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"])
        .unwrap();
    n.ns.exec("iptables", &["-P", "FORWARD", "DROP"]).unwrap();
    n.ns.ip(&["link", "set", &first, "mtu", "1500"]).unwrap();
    n.ns.ip(&[
        "link", "add", "twdst0", "type", "veth", "peer", "name", "twdst1",
    ])
    .unwrap();
    n.ns.ip(&["link", "set", "twdst0", "master", "cni0", "up"])
        .unwrap();
    n.ns.ip(&["link", "set", "twdst1", "up"]).unwrap();
    let peer_ip = c.nodes[1].ip.to_string();
    n.ns.exec("sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=1"])
        .unwrap();
    n.ns.ip(&["route", "add", &format!("{peer_ip}/32"), "dev", "twdst1"])
        .unwrap();
    std::fs::write(
        conf_dir.join("00-other.conflist"),
        r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();

    let (out, v) = doctor(
        n,
        &conf_dir,
        &[
            "--etcd-endpoints",
            "http://127.0.0.1:2379,http://127.0.0.1:1",
            "--lease-warn",
            "10h",
        ],
    );
    assert_eq!(out.status.code(), Some(6), "{v}");
    assert_eq!(v["ok"], false);
    let has = |check: &str, needle: &str| {
        let p = problems(&v, check);
        assert!(
            p.iter().any(|w| w.contains(needle)),
            "{check}: expected a problem with {needle:?}, got {p:?}\n{v}"
        );
    };
    has("ip-forward", "ip_forward = 0");
    has("bridge-netfilter", "FORWARD policy is DROP");
    has("mtu", &format!("pod veth {first} mtu 1500"));
    has("ipam", &format!("veth {leaked} gone"));
    has("ipam", "twdst0");
    has("rp-filter", &peer_ip);
    has("cni-config", "00-other.conflist");
    has("etcd", "127.0.0.1:1");
    has("lease", "expires in");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("problem(s) found"), "{text}");

    // twilld itself gone from its address: the version check says so.
    let (_, v2) = doctor(n, &conf_dir, &["--metrics-addr", "127.0.0.1:1"]);
    assert!(
        problems(&v2, "versions")
            .iter()
            .any(|w| w.contains("does not answer")),
        "{v2}"
    );

    // Undo every fault (the leaked reservation goes with a CNI DEL): all well again.
    std::fs::remove_file(conf_dir.join("00-other.conflist")).unwrap();
    n.ns.ip(&["route", "del", &format!("{peer_ip}/32")])
        .unwrap();
    n.ns.exec("sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=0"])
        .unwrap();
    n.ns.ip(&["link", "del", "twdst0"]).unwrap();
    n.ns.ip(&["link", "set", &first, "mtu", "1450"]).unwrap();
    n.ns.exec("iptables", &["-P", "FORWARD", "ACCEPT"]).unwrap();
    n.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let id = n.pods[1].id.clone();
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"twill","type":"twill","subnetFile":"{}","dataDir":"{}","bridge":"cni0"}}"#,
        n.subnet_file().display(),
        n.dir.join("cni").display()
    );
    let netns = n.pods[1].ns.path().display().to_string();
    let del = twill_tests::bins::exec_plugin(
        &twill_tests::bins::bin("twill"),
        Some(&n.ns.path()),
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &id),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_PATH",
                &twill_tests::bins::bin_dir().display().to_string(),
            ),
        ],
        &conf,
    )
    .unwrap();
    assert!(del.ok(), "{} {}", del.stdout, del.stderr);
    let (out, v) = doctor(n, &conf_dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", all_problems(&v));
}
