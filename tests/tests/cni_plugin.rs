//! Kernel tests of the `twill` CNI plugin: the real binary exec'd in a node namespace,
//! pods as namespaces, real packets. Root required (fails, never skips, without it).

mod cni_common;

use cni_common::{GATEWAY, Node, result_ip};
use serde_json::json;

#[test]
fn a_reboot_releases_the_previous_boots_reservations() {
    // A state written in another boot (a node that rebooted), with a pod whose DEL never came.
    let node = Node::new();
    std::fs::create_dir_all(node.state_file().parent().unwrap()).unwrap();
    std::fs::write(
        node.state_file(),
        json!({"bootId": "00000000-0000-0000-0000-000000000000",
               "lastReserved": "10.244.3.2",
               "reservations": [{"ip": "10.244.3.2", "containerId": "gone", "ifname": "eth0"}]})
        .to_string(),
    )
    .unwrap();
    let a = node.pod("rb");
    let out = node.call("ADD", &a, &node.conf("1.1.0")).expect_ok("ADD");
    assert!(out.stderr.contains("rebooted"), "{}", out.stderr);
    assert_eq!(result_ip(&out.json()).to_string(), "10.244.3.3");
    let res = node.reservations();
    assert_eq!(res.len(), 1, "{res:?}");
    assert_eq!(res[0]["containerId"], a.id.as_str());
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(node.state_file()).unwrap()).unwrap();
    assert_eq!(state["bootId"], boot.trim());
    assert_eq!(state["previousBoot"][0]["containerId"], "gone");
    // Only once: the next ADD in this boot releases nothing.
    let b = node.pod("rb2");
    let out = node.call("ADD", &b, &node.conf("1.1.0")).expect_ok("ADD");
    assert!(!out.stderr.contains("rebooted"), "{}", out.stderr);
    assert_eq!(node.reservations().len(), 2);
    node.del(&a);
    node.del(&b);
}

#[test]
fn an_existing_bridge_takes_the_pod_mtu() {
    // A bridge left with another MTU (an older FLANNEL_MTU, or made by another plugin). twill
    // sets the bridge MTU only when it creates the bridge, as an attribute of the create
    // request, which leaves the kernel's automatic bridge MTU on (the smallest of its
    // ports): with pods of an old and a new MTU side by side the node never sends a pod more
    // than its MTU.
    let node = Node::new();
    node.ns
        .ip(&["link", "add", "cni0", "mtu", "1400", "type", "bridge"])
        .unwrap();
    let a = node.pod("pa");
    node.add(&a);
    let br = node.ns.ip(&["link", "show", "dev", "cni0"]).unwrap();
    assert!(br.contains("mtu 1450") && br.contains("UP"), "{br}");
    a.ns.ping(GATEWAY.parse().unwrap(), 1, 5).unwrap();
    node.del(&a);
}

#[test]
fn add_gives_pods_ips_that_ping_the_gateway_and_each_other() {
    let node = Node::new();
    let a = node.pod("pa");
    let b = node.pod("pb");
    let ra = node.add(&a);
    let rb = node.add(&b);
    let (ipa, ipb) = (result_ip(&ra), result_ip(&rb));
    assert_eq!(ipa.to_string(), "10.244.3.2");
    assert_eq!(ipb.to_string(), "10.244.3.3");

    // The result: bridge, host veth, container interface with sandbox; ips -> container.
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["interfaces"][0]["name"], "cni0");
    assert_eq!(ra["interfaces"][0]["mac"], "0a:58:0a:f4:03:01");
    assert!(
        ra["interfaces"][1]["name"]
            .as_str()
            .unwrap()
            .starts_with("veth")
    );
    assert_eq!(ra["interfaces"][2]["name"], "eth0");
    assert_eq!(ra["interfaces"][2]["sandbox"], a.netns());
    assert_eq!(ra["interfaces"][2]["mtu"], 1450);
    assert_eq!(ra["ips"][0]["interface"], 2);
    assert_eq!(ra["ips"][0]["address"], "10.244.3.2/24");
    assert_eq!(ra["ips"][0]["gateway"], GATEWAY);
    assert_eq!(
        ra["routes"],
        json!([{"dst":"0.0.0.0/0","gw":GATEWAY},{"dst":"10.244.0.0/16","gw":GATEWAY}])
    );

    // The kernel state: pod eth0 with the IP and MTU, routes; host veth on cni0, hairpin.
    let addr = a.ns.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains("10.244.3.2/24"), "{addr}");
    let link = a.ns.ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(link.contains("mtu 1450") && link.contains("UP"), "{link}");
    let routes = a.ns.ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains("default via 10.244.3.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.0.0/16 via 10.244.3.1 dev eth0"),
        "{routes}"
    );
    let host = ra["interfaces"][1]["name"].as_str().unwrap();
    let port = node
        .ns
        .exec("bridge", &["-d", "link", "show", "dev", host])
        .unwrap();
    assert!(
        port.contains("master cni0") && port.contains("hairpin on"),
        "{port}"
    );
    let br = node.ns.ip(&["-o", "addr", "show", "dev", "cni0"]).unwrap();
    assert!(br.contains("10.244.3.1/24"), "{br}");
    // The MACs in the result are the kernel's; one queue each way on both ends.
    let host_link = node.ns.ip(&["-d", "link", "show", "dev", host]).unwrap();
    let pod_link = a.ns.ip(&["-d", "link", "show", "dev", "eth0"]).unwrap();
    for (l, mac) in [
        (&host_link, &ra["interfaces"][1]["mac"]),
        (&pod_link, &ra["interfaces"][2]["mac"]),
    ] {
        let mac = mac.as_str().unwrap();
        assert!(
            l.contains(&format!("link/ether {mac} ")),
            "{mac} not in {l}"
        );
        assert!(l.contains("numtxqueues 1 numrxqueues 1"), "{l}");
    }

    // Packets: pod -> gateway, pod -> pod, both ways.
    a.ns.ping(GATEWAY.parse().unwrap(), 2, 5).unwrap();
    let out = a.ns.ping(ipb, 2, 5).unwrap();
    println!("{out}");
    b.ns.ping(ipa, 2, 5).unwrap();

    // The reservations carry (container, ifname) and the host veth.
    let res = node.reservations();
    assert_eq!(res.len(), 2);
    assert_eq!(res[0]["containerId"], a.id.as_str());
    assert_eq!(res[0]["hostVeth"], host);

    node.del(&a);
    node.del(&b);
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
}

#[test]
fn result_is_encoded_in_the_requested_version() {
    let node = Node::new();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let p = node.pod("pv");
        let r = node.call("ADD", &p, &node.conf(v)).expect_ok(v).json();
        assert_eq!(r["cniVersion"], v);
        let old = v.starts_with("0.");
        assert_eq!(r["ips"][0].get("version").is_some(), old, "{v}: {r}");
        if old {
            assert_eq!(r["ips"][0]["version"], "4");
        }
        assert_eq!(
            r["interfaces"][2].get("mtu").is_some(),
            v == "1.1.0",
            "{v}: {r}"
        );
        node.call("DEL", &p, &node.conf(v)).expect_ok(v);
    }
    // CHECK is not in 0.3.1: code 1.
    let p = node.pod("pc");
    let r = node
        .call("ADD", &p, &node.conf("0.3.1"))
        .expect_ok("ADD")
        .json();
    let mut c = node.conf("0.3.1");
    c["prevResult"] = r;
    assert_eq!(node.call("CHECK", &p, &c).error_code(), Some(1));
    node.del(&p);
}

#[test]
fn check_passes_after_add_and_names_what_is_missing() {
    let node = Node::new();
    let a = node.pod("ca");
    let b = node.pod("cb");
    let ra = node.add(&a);
    let rb = node.add(&b);
    node.check(&a, &ra).expect_ok("CHECK after ADD");
    node.check(&b, &rb).expect_ok("CHECK after ADD");

    // The pod's IP removed.
    a.ns.ip(&["addr", "del", "10.244.3.2/24", "dev", "eth0"])
        .unwrap();
    let out = node.check(&a, &ra);
    assert_eq!(out.error_code(), Some(120), "{}", out.stdout);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("address 10.244.3.2/24 missing")
    );

    // The pod's eth0 removed.
    b.ns.ip(&["link", "del", "eth0"]).unwrap();
    let out = node.check(&b, &rb);
    assert_eq!(out.error_code(), Some(120), "{}", out.stdout);
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(msg.contains("interface eth0 not found"), "{msg}");

    // A route removed (a third pod).
    let c = node.pod("cc");
    let rc = node.add(&c);
    c.ns.ip(&["route", "del", "default"]).unwrap();
    let out = node.check(&c, &rc);
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("route 0.0.0.0/0 via 10.244.3.1 missing"),
        "{msg}"
    );
    node.del(&c);

    // No reservation: says so.
    node.del(&b);
    let out = node.check(&b, &rb);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("no IP reservation")
    );
    // A missing prevResult is a config error.
    assert_eq!(
        node.call("CHECK", &a, &node.conf("1.1.0")).error_code(),
        Some(7)
    );
    node.del(&a);
}

#[test]
fn del_then_add_again_in_the_same_netns() {
    // As `podman network reload` does: DEL, then ADD of the same container, ifname and
    // namespace at once. DEL returns once the pair is gone (the kernel's final teardown goes
    // on in a child process), so the names are free for the new ADD.
    let node = Node::new();
    let a = node.pod("ra");
    let b = node.pod("rb");
    let rb = node.add(&b);
    for round in 0..3 {
        node.add(&a);
        node.del(&a);
        assert!(!a.ns.has_link("eth0"), "round {round}");
        assert!(
            node.host_veths().len() == 1,
            "round {round}: {:?}",
            node.host_veths()
        );
    }
    node.add(&a);
    a.ns.ping(result_ip(&rb), 1, 5).unwrap();
    assert_eq!(node.reservations().len(), 2);
    node.del(&a);
    node.del(&b);
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
}

#[test]
fn del_is_idempotent() {
    let node = Node::new();
    // Twice.
    let a = node.pod("da");
    node.add(&a);
    node.del(&a);
    node.del(&a);
    assert!(!a.ns.has_link("eth0"));
    // After the netns is gone (and with CNI_NETNS empty, as runtimes send then).
    let mut b = node.pod("db");
    node.add(&b);
    b.ns.delete().unwrap();
    node.del(&b);
    node.exec(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &b.id),
            ("CNI_IFNAME", "eth0"),
        ],
        &node.conf("1.0.0"),
    )
    .expect_ok("DEL without CNI_NETNS");
    // The interface already gone, no prevResult.
    let c = node.pod("dc");
    let rc = node.add(&c);
    node.ns
        .ip(&["link", "del", rc["interfaces"][1]["name"].as_str().unwrap()])
        .unwrap();
    node.del(&c);
    // Nothing ever reserved, with a prevResult of someone else.
    let d = node.pod("dd");
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = rc.clone();
    node.call("DEL", &d, &conf)
        .expect_ok("DEL of an unknown container");
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty());
    assert!(node.lock_is_free());
    // A corrupt allocator state (both copies): DEL still removes the veth, then reports code 102.
    let e = node.pod("de");
    node.add(&e);
    node.corrupt_state("{garbage");
    let out = node.call("DEL", &e, &node.conf("1.0.0"));
    assert_eq!(out.error_code(), Some(102), "{}", out.stdout);
    assert!(node.host_veths().is_empty());
    assert!(!e.ns.has_link("eth0"));
}

#[test]
fn gc_releases_what_is_not_valid_and_removes_stray_veths() {
    let node = Node::new();
    let pods: Vec<_> = (0..3).map(|i| node.pod(&format!("g{i}"))).collect();
    let results: Vec<_> = pods.iter().map(|p| node.add(p)).collect();
    // A stray veth on the bridge that no reservation owns.
    node.ns
        .ip(&[
            "link",
            "add",
            "vethdeadbeef",
            "type",
            "veth",
            "peer",
            "name",
            "twgcpeer",
        ])
        .unwrap();
    node.ns
        .ip(&["link", "set", "vethdeadbeef", "master", "cni0"])
        .unwrap();
    // pods[2]'s reservation vanishes from the state (a lost write): its veth, tagged
    // twill:<id>/eth0, is then an orphan port that proves itself twill's and stale.
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.state_file()).unwrap()).unwrap();
    state["reservations"]
        .as_array_mut()
        .unwrap()
        .retain(|r| r["containerId"] != pods[2].id.as_str());
    std::fs::write(node.state_file(), state.to_string()).unwrap();
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": pods[1].id, "ifname": "eth0"}]);
    node.exec(&[("CNI_COMMAND", "GC")], &conf).expect_ok("GC");
    let res = node.reservations();
    assert_eq!(res.len(), 1);
    assert_eq!(res[0]["containerId"], pods[1].id.as_str());
    // pods[0]'s (released) and pods[2]'s (orphan, tagged) veths are gone; the untagged
    // stray, which twill cannot prove its own, stays (issue 15: GC never deletes a port it
    // cannot prove is twill's own stale one).
    let mut want = vec![
        results[1]["interfaces"][1]["name"]
            .as_str()
            .unwrap()
            .to_string(),
        "vethdeadbeef".to_string(),
    ];
    want.sort();
    let mut got = node.host_veths();
    got.sort();
    assert_eq!(got, want);
    node.ns.ip(&["link", "del", "vethdeadbeef"]).unwrap();
    assert!(!pods[0].ns.has_link("eth0"));
    pods[1].ns.ping(GATEWAY.parse().unwrap(), 1, 5).unwrap();
    // The older key, empty: everything goes.
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/attachments"] = json!([]);
    node.exec(&[("CNI_COMMAND", "GC")], &conf).expect_ok("GC");
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty());
    // GC is 1.1.0 only.
    let out = node.exec(&[("CNI_COMMAND", "GC")], &node.conf("1.0.0"));
    assert_eq!(out.error_code(), Some(1));
}

#[test]
fn status_needs_the_subnet_file() {
    let node = Node::new();
    node.exec(&[("CNI_COMMAND", "STATUS")], &node.conf("1.1.0"))
        .expect_ok("STATUS with the subnet file");
    std::fs::remove_file(node.subnet_file()).unwrap();
    let out = node.exec(&[("CNI_COMMAND", "STATUS")], &node.conf("1.1.0"));
    assert_eq!(out.error_code(), Some(50), "{}", out.stdout);
    assert!(out.json()["msg"].as_str().unwrap().contains("subnet.env"));
    std::fs::write(node.subnet_file(), "garbage\n").unwrap();
    let out = node.exec(&[("CNI_COMMAND", "STATUS")], &node.conf("1.1.0"));
    assert_eq!(out.error_code(), Some(50), "{}", out.stdout);
    // ADD without the subnet file: try again later.
    std::fs::remove_file(node.subnet_file()).unwrap();
    let p = node.pod("st");
    assert_eq!(
        node.call("ADD", &p, &node.conf("1.1.0")).error_code(),
        Some(11)
    );
}

/// STATUS reports not-ready only when no ADD can work: a full subnet is ready (the next ADD
/// fails with code 11, try again later, and no running pod is evicted for it), and an
/// allocator state that cannot be read is not (code 50).
#[test]
fn status_is_ready_with_a_full_subnet_but_not_with_an_unreadable_state() {
    // A /30: network, gateway, one pod address, broadcast.
    let node = Node::with_subnet(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/30\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let a = node.pod("fa");
    node.add(&a);
    let b = node.pod("fb");
    assert_eq!(
        node.call("ADD", &b, &node.conf("1.1.0")).error_code(),
        Some(11),
        "the subnet is full"
    );
    node.exec(&[("CNI_COMMAND", "STATUS")], &node.conf("1.1.0"))
        .expect_ok("STATUS with a full subnet");
    node.del(&a);
    node.corrupt_state("{ torn");
    let out = node.exec(&[("CNI_COMMAND", "STATUS")], &node.conf("1.1.0"));
    assert_eq!(out.error_code(), Some(50), "{}", out.stdout);
}

#[test]
fn requested_ips_and_k8s_args_are_kept() {
    let node = Node::new();
    let a = node.pod("ra");
    let mut conf = node.conf("1.0.0");
    conf["runtimeConfig"] = json!({"ips": ["10.244.3.77/24"]});
    let r = node.call("ADD", &a, &conf).expect_ok("ADD").json();
    assert_eq!(result_ip(&r).to_string(), "10.244.3.77");
    let b = node.pod("rb");
    let netns = b.netns();
    let out = node
        .exec(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &b.id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=x;IP=10.244.3.88",
                ),
            ],
            &node.conf("1.0.0"),
        )
        .expect_ok("ADD with CNI_ARGS");
    assert_eq!(result_ip(&out.json()).to_string(), "10.244.3.88");
    let res = node.reservations();
    let rb = res
        .iter()
        .find(|r| r["containerId"] == b.id.as_str())
        .unwrap();
    assert_eq!(rb["podNamespace"], "default");
    assert_eq!(rb["podName"], "web-0");
    // The same IP for another pod: refused, nothing left behind.
    let c = node.pod("rc");
    let out = node.call("ADD", &c, &conf);
    assert_eq!(out.error_code(), Some(101), "{}", out.stdout);
    assert_eq!(node.reservations().len(), 2);
    assert!(!c.ns.has_link("eth0"));
    a.ns.ping("10.244.3.88".parse().unwrap(), 1, 5).unwrap();
    node.del(&a);
    node.del(&b);
}

#[test]
fn prev_result_is_passed_through() {
    let node = Node::new();
    let a = node.pod("pp");
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": a.netns()}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let r = node.call("ADD", &a, &conf).expect_ok("ADD").json();
    assert_eq!(r["interfaces"][0]["name"], "lo");
    assert_eq!(r["interfaces"][3]["name"], "eth0");
    assert_eq!(r["ips"][0]["address"], "127.0.0.1/8");
    assert_eq!(r["ips"][1]["interface"], 3);
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
    node.del(&a);
}

#[test]
fn failed_add_undoes_its_work() {
    let node = Node::new();
    let a = node.pod("fa");
    // eth0 already taken in the pod netns: the veth cannot be created there.
    a.ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "twfpeer",
    ])
    .unwrap();
    let out = node.call("ADD", &a, &node.conf("1.0.0"));
    assert!(!out.ok());
    assert_eq!(out.error_code(), Some(110), "{}", out.stdout);
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.lock_is_free());
    assert!(node.stray_files().is_empty());
}

#[test]
fn logs_go_to_the_log_file_never_to_stdout() {
    let mut node = Node::new();
    let log = node.dir.path().join("twill.log");
    node.extra = json!({"logFile": log, "logLevel": "debug"});
    let a = node.pod("lg");
    let out = node.call("ADD", &a, &node.conf("1.0.0")).expect_ok("ADD");
    // stdout is exactly the result; stderr is empty; the log file has the story.
    assert_eq!(out.json()["cniVersion"], "1.0.0");
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("reserved") && text.contains(&a.id), "{text}");
    node.del(&a);
    // Without logFile, errors are logged on stderr.
    node.extra = json!({});
    let out = node.exec(&[("CNI_COMMAND", "ADD")], &node.conf("1.0.0"));
    assert!(
        out.stderr.contains("CNI_CONTAINERID is required"),
        "{}",
        out.stderr
    );
    assert_eq!(out.error_code(), Some(4));
}
