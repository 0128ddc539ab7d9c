//! 100 ADDs in parallel (separate processes) on one node: 100 distinct IPs, every pod
//! reachable; then 100 parallel DELs: no reservation, veth, lock or temp file left.
//! Root required.

mod cni_common;

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};

use cni_common::{Node, Pod, result_ip};

const PODS: usize = 100;

fn spawn(node: &Node, cmd: &str, pod: &Pod) -> Child {
    let mut c = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .arg("--")
        .arg(&node.plugin)
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", pod.netns())
        .env("CNI_IFNAME", &pod.ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn twill");
    c.stdin
        .take()
        .unwrap()
        .write_all(node.conf("1.1.0").to_string().as_bytes())
        .unwrap();
    c
}

fn wait_all(children: Vec<Child>, what: &str) -> Vec<serde_json::Value> {
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{what}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if stdout.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&stdout).unwrap()
            }
        })
        .collect()
}

#[test]
fn hundred_parallel_adds_then_dels() {
    let node = Node::new();
    let pods: Vec<Pod> = (0..PODS).map(|i| node.pod(&format!("q{i}"))).collect();

    let children: Vec<Child> = pods.iter().map(|p| spawn(&node, "ADD", p)).collect();
    let results = wait_all(children, "parallel ADD");
    let ips: Vec<IpAddr> = results.iter().map(result_ip).collect();
    let distinct: HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), PODS, "IPs handed out twice: {ips:?}");
    assert_eq!(node.reservations().len(), PODS);
    assert_eq!(node.host_veths().len(), PODS);

    // Every pod answers: from the node (its gateway address on cni0), all pings at once.
    let pings: Vec<(IpAddr, Child)> = ips
        .iter()
        .map(|ip| {
            let c = node
                .ns
                .command("ping")
                .args(["-n", "-c", "1", "-w", "5", &ip.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (*ip, c)
        })
        .collect();
    let unreachable: Vec<IpAddr> = pings
        .into_iter()
        .filter_map(|(ip, mut c)| (!c.wait().unwrap().success()).then_some(ip))
        .collect();
    assert!(
        unreachable.is_empty(),
        "pods not answering: {unreachable:?}"
    );
    // And pod to pod across the bridge: first to last.
    pods[0].ns.ping(ips[PODS - 1], 1, 5).unwrap();

    let children: Vec<Child> = pods.iter().map(|p| spawn(&node, "DEL", p)).collect();
    wait_all(children, "parallel DEL");
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.lock_is_free());
    assert!(node.stray_files().is_empty(), "{:?}", node.stray_files());
    for p in &pods {
        assert_eq!(p.ns.links().unwrap(), vec!["lo"], "{}", p.ns.name());
    }
}
