//! A node whose pods are made the way Flannel's CNI plugin makes them, from twilld's subnet
//! file: the migration path where a node still runs Flannel's plugin (or its conflist) on
//! top of twilld. Flannel's plugin is not packaged here, so the test does what it does, as
//! documented by flannel-io/cni-plugin: read the subnet file's `FLANNEL_*` keys, then
//! delegate to the reference `bridge` plugin (Debian's /usr/lib/cni) with `host-local` IPAM
//! over `FLANNEL_SUBNET`'s network, a route to `FLANNEL_NETWORK`, `mtu` = `FLANNEL_MTU`,
//! `ipMasq` = !`FLANNEL_IPMASQ`, `isGateway`, plus kube-flannel.yml's delegate settings
//! (`hairpinMode`, `isDefaultGateway`). Such a pod must reach twill pods on other nodes and
//! be reached by them under its own IP.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use twill_tests::bins::exec_plugin;
use twill_tests::cluster::{Cluster, ClusterOpts, first_v4, ping};
use twill_tests::netns::TestNetns;

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The subnet file as Flannel's plugin reads it: `KEY=VALUE` lines.
fn read_flannel_env(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).expect("subnet file");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn a_pod_made_by_flannels_delegation_from_twills_subnet_file_reaches_twill_pods() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 2,
        pods_per_node: 0,
        ..Default::default()
    })
    .unwrap();
    // Node 0: a pod made by twill.
    c.add_pod(0).unwrap();
    let twill_pod = c.nodes[0].pods[0].ip;

    // Node 1: a pod made from twilld's subnet file the way Flannel's plugin does it.
    let node = &c.nodes[1];
    let env = read_flannel_env(&node.subnet_file());
    for key in [
        "FLANNEL_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
    ] {
        assert!(env.contains_key(key), "subnet file lacks {key}: {env:?}");
    }
    let mtu: u32 = env["FLANNEL_MTU"].parse().expect("FLANNEL_MTU is a number");
    let ipmasq: bool = env["FLANNEL_IPMASQ"]
        .parse()
        .expect("FLANNEL_IPMASQ is true or false");
    // Flannel's plugin parses FLANNEL_SUBNET (the gateway/len, e.g. 10.244.3.1/24) as a
    // CIDR and hands host-local its network (10.244.3.0/24).
    let subnet: ipnet::Ipv4Net = env["FLANNEL_SUBNET"].parse().unwrap();
    let delegate = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "bridge",
        "hairpinMode": true,
        "isDefaultGateway": true,
        "isGateway": true,
        "ipMasq": !ipmasq,
        "mtu": mtu,
        "ipam": {
            "type": "host-local",
            "dataDir": node.dir.join("host-local").display().to_string(),
            "ranges": [[{"subnet": subnet.trunc().to_string()}]],
            "routes": [{"dst": env["FLANNEL_NETWORK"]}],
        },
    });
    let pod = TestNetns::named(format!("{}-fp", node.ns.name())).unwrap();
    let netns = pod.path().display().to_string();
    let run = |command: &str| {
        exec_plugin(
            &Path::new(REFERENCE_PLUGINS).join("bridge"),
            Some(&node.ns.path()),
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "flannel-style-pod"),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", REFERENCE_PLUGINS),
            ],
            &delegate.to_string(),
        )
        .unwrap()
    };
    let added = run("ADD");
    assert!(added.ok(), "bridge ADD: {} {}", added.stdout, added.stderr);
    let flannel_pod: Ipv4Addr = first_v4(&pod, "eth0").unwrap();
    assert!(
        subnet.trunc().contains(&flannel_pod),
        "{flannel_pod} outside {subnet}"
    );
    let link = pod.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains(&format!("mtu {mtu} ")), "{link}");

    // Across the overlay, both ways, under their own IPs.
    assert!(
        ping(&pod, twill_pod, 3, 2),
        "flannel-style pod {flannel_pod} -> twill pod {twill_pod}\n{}",
        c.logs()
    );
    assert!(
        ping(&c.nodes[0].pods[0].ns, flannel_pod, 3, 2),
        "twill pod {twill_pod} -> flannel-style pod {flannel_pod}\n{}",
        c.logs()
    );
    // And to the other node itself.
    assert!(ping(&pod, c.nodes[0].ip, 3, 2));

    let deleted = run("DEL");
    assert!(
        deleted.ok(),
        "bridge DEL: {} {}",
        deleted.stdout,
        deleted.stderr
    );
}
