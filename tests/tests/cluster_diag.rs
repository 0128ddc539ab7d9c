//! `twillctl diag` on a node of a real 2-node cluster (real etcd, real twilld, a pod made by
//! the real plugin): the bundle unpacks with the system's `tar`, holds each part with real
//! content (status in sync, metrics, routes, the nft table, the IPAM state, the subnet file,
//! the CNI config, the plugin's version), and no key or certificate, even where a collected
//! file or the log embeds one; a part that cannot be collected is an `.error` file, not a
//! failed bundle.

use std::path::Path;
use std::process::Command;

use twill_tests::cluster::{Cluster, ClusterOpts, ETCD_PREFIX};

const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END PRIVATE KEY-----\n";

fn read(dir: &Path, part: &str) -> String {
    let p = dir.join(part);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn diag_bundle_has_every_part_and_no_secret() {
    let c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 1,
        ..ClusterOpts::default()
    })
    .unwrap();
    let n = &c.nodes[0];
    let tmp = tempfile::tempdir().unwrap();
    let conf_dir = tmp.path().join("net.d");
    std::fs::create_dir(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-twill.conflist"),
        r#"{"cniVersion":"1.0.0","name":"twill","plugins":[{"type":"twill"}]}"#,
    )
    .unwrap();
    // Someone's file in net.d that embeds a key, and a log line that does: neither may leak.
    std::fs::write(conf_dir.join("99-other.conf"), format!("key:\n{KEY}")).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(n.log())
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("oops {KEY}").as_bytes()))
        .unwrap();
    let bundle = tmp.path().join("bundle.tar.gz");

    let out =
        n.ns.command(twill_tests::bins::bin("twillctl"))
            .args(["--etcd-endpoints", "http://127.0.0.1:2379"])
            .args(["--etcd-prefix", ETCD_PREFIX, "diag", "-f"])
            .arg(&bundle)
            .arg("--subnet-file")
            .arg(n.subnet_file())
            .arg("--cni-data-dir")
            .arg(n.dir.join("cni"))
            .arg("--cni-conf-dir")
            .arg(&conf_dir)
            .arg("--cni-plugin")
            .arg(twill_tests::bins::bin("twill"))
            .arg("--log")
            .arg(n.log())
            .env("TWILLCTL_NODE_NAME", &n.name)
            .output()
            .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        bundle.display().to_string()
    );

    let x = tmp.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&bundle)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    let d = x.join("bundle");

    let status: serde_json::Value =
        serde_json::from_str(&read(&d, "twillctl/status.json")).unwrap();
    assert_eq!(status["in_sync"], true, "{status}");
    let leases: serde_json::Value =
        serde_json::from_str(&read(&d, "twillctl/leases.json")).unwrap();
    assert!(leases.to_string().contains(&n.name), "{leases}");
    assert!(read(&d, "twilld/readyz.txt").contains("ready"));
    assert!(read(&d, "twilld/metrics.txt").contains("twill_peers 1"));
    let own: ipnet::Ipv4Net = n.subnet().unwrap().parse().unwrap();
    let peer = c.nodes[1].subnet().unwrap();
    let routes = read(&d, "kernel/routes.txt");
    assert!(routes.contains(&peer), "{routes}");
    assert!(read(&d, "kernel/links.txt").contains("vxlan id 1"));
    assert!(read(&d, "kernel/nft-twill.txt").contains("table ip twill"));
    assert!(read(&d, "kernel/sysctls.txt").contains("net.ipv4.ip_forward = 1"));
    assert!(read(&d, "cni/subnet.env").contains("FLANNEL_SUBNET="));
    let state = read(&d, "cni/data/twill/state.json");
    assert!(state.contains(&n.pods[0].ip.to_string()), "{state}");
    assert!(own.contains(&n.pods[0].ip));
    assert!(read(&d, "cni/net.d/10-twill.conflist").contains("\"twill\""));
    assert!(read(&d, "versions/cni-plugin.json").contains("supportedVersions"));
    assert!(read(&d, "twilld/log.txt").contains("oops"));
    assert!(read(&d, "README.txt").contains("failed parts: none"));

    // No key or certificate anywhere in the bundle.
    let mut all = String::new();
    for e in walk(&d) {
        all.push_str(&String::from_utf8_lossy(&std::fs::read(&e).unwrap()));
    }
    assert!(!all.contains("PRIVATE KEY") && !all.contains("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"));
    assert!(read(&d, "cni/net.d/99-other.conf").contains("[PEM block removed"));

    // A part that cannot be collected (twilld's server unreachable) is an .error file.
    let out =
        n.ns.command(twill_tests::bins::bin("twillctl"))
            .args(["--etcd-endpoints", "http://127.0.0.1:2379", "diag", "-f"])
            .arg(tmp.path().join("b2.tar.gz"))
            .args(["--metrics-addr", "127.0.0.1:1"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list = Command::new("tar")
        .arg("-tzf")
        .arg(tmp.path().join("b2.tar.gz"))
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&list.stdout);
    assert!(names.contains("b2/twilld/metrics.txt.error"), "{names}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
