//! Issue 15 item 4: the real `twill` plugin, exec'd in a test-made node namespace (which
//! stands in for the host: it is the plugin's own namespace), refuses what would harm that
//! namespace, and deletes a host veth only when it proves to be this container's. Root
//! required.

mod cni_common;

use cni_common::{Node, Pod};
use serde_json::{Value, json};

/// The node namespace as dumps of links (with aliases), addresses, routes and rules.
fn host_state(node: &Node) -> Vec<String> {
    [
        vec!["-d", "link", "show"],
        vec!["addr", "show"],
        vec!["route", "show", "table", "all"],
        vec!["-6", "route", "show", "table", "all"],
        vec!["rule", "show"],
    ]
    .iter()
    .map(|a| node.ns.ip(a).unwrap())
    .collect()
}

/// `ip -j -d link show <name>` in the node namespace: (ifindex, alias), `None` if absent.
fn link_in(node: &Node, name: &str) -> Option<(u64, Option<String>)> {
    let out = node.ns.ip(&["-j", "-d", "link", "show", name]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let l = v.get(0)?;
    Some((
        l["ifindex"].as_u64()?,
        l.get("ifalias").and_then(|a| a.as_str()).map(String::from),
    ))
}

fn call_with_netns(node: &Node, cmd: &str, pod: &Pod, netns: &str, conf: &Value) -> (bool, Value) {
    let out = node.exec(
        &[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", &pod.id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", &pod.ifname),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        conf,
    );
    let v = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    (out.ok(), v)
}

/// ADD and CHECK with CNI_NETNS = the plugin's own namespace (by its bind mount and by
/// /proc/self/ns/net) are refused with code 4 and change nothing there; DEL with it
/// succeeds (it never enters a netns) and changes nothing either. Positive control: a real
/// pod's ADD does change the dumps, so the comparison can fail.
#[test]
fn the_plugins_own_netns_is_refused_and_the_host_is_untouched() {
    let node = Node::new();
    let pod = node.pod("hs");
    let own = node.ns.path().display().to_string();
    let before = host_state(&node);
    for netns in [
        own.as_str(),
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
    ] {
        let (ok, v) = call_with_netns(&node, "ADD", &pod, netns, &node.conf("1.1.0"));
        assert!(!ok, "ADD {netns}: {v}");
        assert_eq!(v["code"], 4, "{v}");
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.contains(&format!("CNI_NETNS={netns:?}")) && msg.contains("own"),
            "{v}"
        );
        let mut c = node.conf("1.1.0");
        c["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": [], "ips": []});
        let (ok, v) = call_with_netns(&node, "CHECK", &pod, netns, &c);
        assert!(!ok, "CHECK {netns}: {v}");
        let (ok, v) = call_with_netns(&node, "DEL", &pod, netns, &node.conf("1.1.0"));
        assert!(ok, "DEL {netns}: {v}");
        assert_eq!(
            host_state(&node),
            before,
            "{netns}: the node namespace changed"
        );
        assert!(
            node.reservations().is_empty(),
            "{netns}: a reservation was left"
        );
    }
    // Another namespace type, and a regular file: refused on the descriptor.
    let file = node.dir.path().join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    let file = file.display().to_string();
    for (netns, frag) in [
        ("/proc/self/ns/mnt", "a namespace of type"),
        ("/proc/self/ns/uts", "a namespace of type"),
        (file.as_str(), "not on nsfs"),
    ] {
        let (ok, v) = call_with_netns(&node, "ADD", &pod, netns, &node.conf("1.1.0"));
        assert!(!ok && v["code"] == 4, "{netns}: {v}");
        assert!(v["msg"].as_str().unwrap().contains(frag), "{netns}: {v}");
        assert_eq!(
            host_state(&node),
            before,
            "{netns}: the node namespace changed"
        );
    }
    // Positive control.
    node.add(&pod);
    assert_ne!(
        host_state(&node),
        before,
        "a real ADD must show in the dumps"
    );
    node.del(&pod);
}

/// A link with the host veth name twill would choose for pod A, but not A's (another
/// container's alias, or no alias), is never deleted: not by A's ADD (which fails with code
/// 111 naming it, and leaves no reservation and nothing in A's netns), not by A's DEL, not
/// by GC, also when it is a port of twill's bridge. Positive controls: A's own veth is
/// replaced by ADD, an untagged veth of an earlier twill is removed by DEL when A's
/// reservation names it, and GC removes a released pod's veth.
#[test]
fn another_containers_veth_with_our_name_is_never_deleted() {
    let node = Node::new();
    let a = node.pod("ha");
    let b = node.pod("hb");
    // Learn the name twill gives A's host veth, and make the bridge exist (pod B stays).
    node.add(&b);
    let name = node.add(&a)["interfaces"][1]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, alias) = link_in(&node, &name).unwrap();
    assert_eq!(
        alias.as_deref(),
        Some(format!("twill:{}/eth0", a.id).as_str())
    );
    node.del(&a);
    assert!(link_in(&node, &name).is_none());

    for foreign in [Some("twill:someone-else/eth0"), Some("not twill's"), None] {
        // The impostor: a veth pair in the node namespace, a port of twill's bridge.
        node.ns
            .ip(&[
                "link", "add", &name, "type", "veth", "peer", "name", "hs-peer0",
            ])
            .unwrap();
        node.ns
            .ip(&["link", "set", &name, "master", "cni0"])
            .unwrap();
        if let Some(al) = foreign {
            node.ns.ip(&["link", "set", &name, "alias", al]).unwrap();
        }
        let (idx, _) = link_in(&node, &name).unwrap();
        let still_there = |what: &str| {
            let got = link_in(&node, &name);
            assert_eq!(
                got.as_ref().map(|g| g.0),
                Some(idx),
                "{foreign:?}: {what} deleted or replaced the impostor"
            );
            assert_eq!(got.unwrap().1.as_deref(), foreign, "{foreign:?}: {what}");
        };

        let out = node.call("ADD", &a, &node.conf("1.1.0"));
        assert_eq!(out.error_code(), Some(111), "{foreign:?}: {}", out.stdout);
        assert!(
            out.json()["msg"].as_str().unwrap().contains(&name),
            "{}",
            out.stdout
        );
        still_there("ADD");
        assert_eq!(
            a.ns.links().unwrap(),
            vec!["lo"],
            "{foreign:?}: pod end made"
        );
        assert_eq!(
            node.reservations().len(),
            1,
            "{foreign:?}: A's reservation left"
        );

        node.del(&a);
        still_there("DEL");

        let mut gc = node.conf("1.1.0");
        gc["cni.dev/valid-attachments"] = json!([{"containerID": b.id, "ifname": "eth0"}]);
        node.exec(&[("CNI_COMMAND", "GC")], &gc).expect_ok("GC");
        still_there("GC");
        node.ns.ip(&["link", "del", &name]).unwrap();
    }

    // Upgrade: A's veth made by a twill before aliases (alias cleared) is A's: the
    // reservation names it and it is a port of the bridge. DEL removes it.
    node.add(&a);
    node.ns.ip(&["link", "set", &name, "alias", ""]).unwrap();
    assert_eq!(link_in(&node, &name).unwrap().1, None);
    node.del(&a);
    assert!(
        link_in(&node, &name).is_none(),
        "DEL left A's untagged veth"
    );

    // GC removes the veth of a released reservation (B is not valid any more).
    let b_veth = node.host_veths();
    assert_eq!(b_veth.len(), 1);
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    node.exec(&[("CNI_COMMAND", "GC")], &gc).expect_ok("GC");
    assert!(node.host_veths().is_empty(), "GC left B's veth");
    assert!(node.reservations().is_empty());
}

/// Issue 15 item 6: with FLANNEL_SUBNET=10.244.3.2/24 the bridge gets 10.244.3.2 and no pod
/// does (the allocator used to assume network+1); the pods reach that gateway. A requested
/// 10.244.3.2 is refused, 10.244.3.1 is an ordinary pod address then.
#[test]
fn the_actual_gateway_of_the_subnet_file_is_never_a_pods() {
    let node = Node::with_subnet(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.2/24\nFLANNEL_MTU=1450\n",
    );
    let pods: Vec<_> = (0..3).map(|i| node.pod(&format!("gw{i}"))).collect();
    let mut ips = Vec::new();
    for p in &pods {
        let r = node.add(p);
        assert_eq!(r["ips"][0]["gateway"], "10.244.3.2", "{r}");
        ips.push(cni_common::result_ip(&r).to_string());
    }
    assert!(!ips.contains(&"10.244.3.2".to_string()), "{ips:?}");
    assert_eq!(ips[0], "10.244.3.1");
    let br = node.ns.ip(&["-4", "addr", "show", "dev", "cni0"]).unwrap();
    assert!(br.contains("10.244.3.2/24"), "{br}");
    pods[1]
        .ns
        .ping("10.244.3.2".parse().unwrap(), 1, 5)
        .unwrap();
    let extra = node.pod("gwx");
    let mut c = node.conf("1.1.0");
    c["runtimeConfig"] = json!({"ips": ["10.244.3.2/24"]});
    let out = node.call("ADD", &extra, &c);
    assert_eq!(out.error_code(), Some(7), "{}", out.stdout);
    assert!(out.stdout.contains("gateway"), "{}", out.stdout);
    assert_eq!(node.reservations().len(), 3);
    for p in &pods {
        node.del(p);
    }
}
