//! Chaining: the conflist of DESIGN.md (twill, then Debian's /usr/lib/cni/portmap with
//! runtimeConfig.portMappings), invoked in chain order the way libcni does, inside a node
//! namespace. A TCP connection from a client namespace to the node's IP:hostPort reaches
//! the pod; so does one from the node itself. Root required.

mod cni_common;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use cni_common::Node;
use serde_json::{Value, json};
use twill_dataplane::NetNs;
use twill_tests::bins::exec_plugin;
use twill_tests::netns::{TestNetns, tcp_fetch, veth_between};

/// The conflist of DESIGN.md, with this node's files.
fn conflist(node: &Node) -> Value {
    json!({"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"twill","plugins":[
        {"type":"twill","subnetFile":node.subnet_file(),"dataDir":node.data_dir(),
         "bridge":"cni0","hairpinMode":true},
        {"type":"portmap","capabilities":{"portMappings":true}}]})
}

fn plugin_path(node: &Node, ty: &str) -> std::path::PathBuf {
    if ty == "twill" {
        node.plugin.clone()
    } else {
        Path::new("/usr/lib/cni").join(ty)
    }
}

/// What libcni does for one plugin: the list's cniVersion and name injected, the
/// capabilities it declares filled from the runtime config, the previous result passed in.
fn plugin_conf(list: &Value, i: usize, prev: Option<&Value>, rt: &Value) -> Value {
    let mut c = list["plugins"][i].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    c["name"] = list["name"].clone();
    if let Some(caps) = c.get("capabilities").and_then(Value::as_object).cloned() {
        let mut rc = serde_json::Map::new();
        for (cap, on) in caps {
            if on == json!(true)
                && let Some(v) = rt.get(&cap)
            {
                rc.insert(cap, v.clone());
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

fn env<'a>(cmd: &'a str, id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

#[test]
fn portmap_chained_after_twill_reaches_the_pod() {
    let node = Node::new();
    let client = TestNetns::new("cli").unwrap();
    veth_between(&node.ns, "up0", &client, "up1").unwrap();
    node.ns.add_addr("up0", "192.168.50.1/24").unwrap();
    client.add_addr("up1", "192.168.50.2/24").unwrap();
    // The node routes between its uplink and cni0 (twilld's job on a real node).
    node.ns
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();

    let pod = node.pod("pm");
    let netns = pod.netns();
    let list = conflist(&node);
    version_answers_in_the_lists_version(&list);
    let rt = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});

    // ADD in chain order.
    let mut prev: Option<Value> = None;
    for i in 0..2 {
        let ty = list["plugins"][i]["type"].as_str().unwrap();
        let conf = plugin_conf(&list, i, prev.as_ref(), &rt);
        let out = exec_plugin(
            &plugin_path(&node, ty),
            Some(&node.ns.path()),
            &env("ADD", &pod.id, &netns),
            &conf.to_string(),
        )
        .unwrap()
        .expect_ok(ty);
        prev = Some(out.json());
    }
    let result = prev.clone().unwrap();
    // portmap passed twill's result through: the sandbox interface is still there.
    assert_eq!(result["interfaces"][2]["sandbox"], netns.as_str());
    assert_eq!(result["ips"][0]["interface"], 2);

    // A TCP server in the pod on :80.
    let pod_ns = NetNs::open(pod.ns.path()).unwrap();
    let listener = pod_ns
        .run_in(|| TcpListener::bind("0.0.0.0:80"))
        .unwrap()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let Ok((mut s, peer)) = listener.accept() else {
                return;
            };
            let _ = s.write_all(b"hello from the pod\n");
            let _ = tx.send(peer);
        }
    });

    // Client namespace -> node IP:hostPort (PREROUTING DNAT, forwarded over cni0).
    let client_ns = NetNs::open(client.path()).unwrap();
    let got = tcp_fetch(&client_ns, "192.168.50.1:8080".parse().unwrap()).unwrap();
    assert_eq!(got, "hello from the pod\n");
    let peer = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        peer.ip().to_string(),
        "192.168.50.2",
        "no NAT of the client's address"
    );
    // The node itself -> its own IP:hostPort (OUTPUT DNAT).
    let node_ns = NetNs::open(node.ns.path()).unwrap();
    let got = tcp_fetch(&node_ns, "192.168.50.1:8080".parse().unwrap()).unwrap();
    assert_eq!(got, "hello from the pod\n");

    // DEL in reverse order, each with the cached result.
    for i in (0..2).rev() {
        let ty = list["plugins"][i]["type"].as_str().unwrap();
        let conf = plugin_conf(&list, i, Some(&result), &rt);
        exec_plugin(
            &plugin_path(&node, ty),
            Some(&node.ns.path()),
            &env("DEL", &pod.id, &netns),
            &conf.to_string(),
        )
        .unwrap()
        .expect_ok(ty);
    }
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty());
    let nat = node.ns.exec("iptables", &["-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("dport 8080"), "portmap rules left: {nat}");
    assert!(tcp_fetch(&client_ns, "192.168.50.1:8080".parse().unwrap()).is_err());
}

/// VERSION with the conflist on stdin answers in the list's cniVersion (what libcni asks
/// before it picks a version).
fn version_answers_in_the_lists_version(list: &Value) {
    let out = exec_plugin(
        &twill_tests::bins::bin("twill"),
        None,
        &[("CNI_COMMAND", "VERSION")],
        &list.to_string(),
    )
    .unwrap()
    .expect_ok("VERSION");
    assert_eq!(out.json()["cniVersion"], "1.0.0");
}
