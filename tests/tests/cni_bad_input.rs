//! A table of bad inputs to the real `twill` binary: each fails with the expected CNI error
//! code and a message naming the field and value, and leaves nothing behind (no
//! reservation, no interface, no held lock). Root required.

mod cni_common;

use cni_common::Node;
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    conf: Value,
    code: u64,
    fragment: String,
}

#[test]
fn bad_inputs_fail_cleanly_with_the_right_code() {
    let node = Node::new();
    let pod = node.pod("bad");
    let netns = pod.netns();
    let good = node.conf("1.0.0");
    let base = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "bad1".to_string()),
            ("CNI_NETNS", netns.clone()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", "/usr/lib/cni".to_string()),
        ]
    };
    let without = |k: &str| {
        base("ADD")
            .into_iter()
            .filter(|(n, _)| *n != k)
            .collect::<Vec<_>>()
    };
    let with = |k: &'static str, v: &str| {
        let mut e = without(k);
        e.push((k, v.to_string()));
        e
    };
    let conf_with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let missing_subnet = node.dir.path().join("nope/subnet.env");
    // A FIFO with no writer: a plugin that opens it blocking hangs here (the test with it).
    let fifo = node.dir.path().join("subnet.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let gw_is_network = node.dir.path().join("gw-network.env");
    std::fs::write(
        &gw_is_network,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.0/24\nFLANNEL_MTU=1450\n",
    )
    .unwrap();
    let gw_is_broadcast = node.dir.path().join("gw-broadcast.env");
    std::fs::write(
        &gw_is_broadcast,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.255/24\nFLANNEL_MTU=1450\n",
    )
    .unwrap();
    // A dual-stack subnet file: the IPv6 half of a request is checked as strictly, and a bad
    // one leaves nothing behind either (not even the IPv4 half of the reservation).
    let dual = node.dir.path().join("dual.env");
    std::fs::write(
        &dual,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n",
    )
    .unwrap();
    let dual_ips = |ips: Value| {
        let mut c = good.clone();
        c["subnetFile"] = json!(dual);
        c["runtimeConfig"] = json!({ "ips": ips });
        c
    };
    let log_target = node.dir.path().join("real.log");
    std::fs::write(&log_target, "").unwrap();
    let log_link = node.dir.path().join("link.log");
    std::os::unix::fs::symlink(&log_target, &log_link).unwrap();
    // The plugin runs in the node namespace: that namespace is its own.
    let node_netns = node.ns.path().display().to_string();
    let ips = |ip: &str| conf_with("runtimeConfig", json!({ "ips": [ip] }));
    let check_env = {
        let mut e = base("CHECK");
        e.retain(|(k, _)| *k != "CNI_COMMAND");
        e.push(("CNI_COMMAND", "CHECK".to_string()));
        e
    };
    let garbage = node.dir.path().join("garbage.env");
    std::fs::write(&garbage, "this is not a subnet file\n").unwrap();

    let cases = vec![
        Case {
            name: "dual-stack: runtimeConfig.ips IPv6 outside the node IPv6 subnet",
            env: base("ADD"),
            conf: dual_ips(json!(["10.244.3.9", "fc00:0:0:9::5/64"])),
            code: 7,
            fragment: "runtimeConfig.ips: \"fc00:0:0:9::5/64\": fc00:0:0:9::5 is outside the node IPv6 subnet fc00:0:0:3::/64".into(),
        },
        Case {
            name: "dual-stack: runtimeConfig.ips the IPv6 gateway",
            env: base("ADD"),
            conf: dual_ips(json!(["fc00:0:0:3::1"])),
            code: 7,
            fragment: "requested IP fc00:0:0:3::1 is not usable in subnet fc00:0:0:3::/64: the gateway".into(),
        },
        Case {
            name: "dual-stack: runtimeConfig.ips two IPv6 addresses",
            env: base("ADD"),
            conf: dual_ips(json!(["fc00:0:0:3::5", "fc00:0:0:3::6"])),
            code: 7,
            fragment: "at most one IP per family".into(),
        },
        Case {
            name: "dual-stack: CNI_ARGS IP= IPv6 with another prefix",
            env: with("CNI_ARGS", "IP=fc00:0:0:3::5/80"),
            conf: conf_with("subnetFile", json!(dual)),
            code: 7,
            fragment: "CNI_ARGS IP \"fc00:0:0:3::5/80\": prefix length /80 is not the node subnet's (fc00:0:0:3::/64)".into(),
        },
        Case {
            name: "invalid JSON",
            env: base("ADD"),
            conf: Value::String("{not json".into()),
            code: 6,
            fragment: "not valid JSON".into(),
        },
        Case {
            name: "unknown cniVersion",
            env: base("ADD"),
            conf: conf_with("cniVersion", json!("9.9.9")),
            code: 1,
            fragment: "cniVersion=\"9.9.9\"".into(),
        },
        Case {
            name: "missing CNI_COMMAND",
            env: without("CNI_COMMAND"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_COMMAND is required".into(),
        },
        Case {
            name: "unknown CNI_COMMAND",
            env: with("CNI_COMMAND", "ATTACH"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_COMMAND=\"ATTACH\"".into(),
        },
        Case {
            name: "missing CNI_CONTAINERID",
            env: without("CNI_CONTAINERID"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_CONTAINERID is required".into(),
        },
        Case {
            name: "invalid CNI_CONTAINERID",
            env: with("CNI_CONTAINERID", "../etc"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_CONTAINERID=\"../etc\"".into(),
        },
        Case {
            name: "missing CNI_IFNAME",
            env: without("CNI_IFNAME"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_IFNAME is required".into(),
        },
        Case {
            name: "CNI_IFNAME over 15 bytes",
            env: with("CNI_IFNAME", "eth0123456789abc"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_IFNAME=\"eth0123456789abc\": longer than 15 bytes".into(),
        },
        Case {
            name: "netns that does not exist",
            env: with("CNI_NETNS", "/var/run/netns/tw-no-such-ns"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_NETNS=\"/var/run/netns/tw-no-such-ns\"".into(),
        },
        Case {
            name: "netns path that is not a netns",
            env: with("CNI_NETNS", "/etc/hostname"),
            conf: good.clone(),
            code: 4,
            fragment: "not a network namespace".into(),
        },
        Case {
            name: "subnet file missing",
            env: base("ADD"),
            conf: conf_with("subnetFile", json!(missing_subnet)),
            code: 11,
            fragment: missing_subnet.display().to_string(),
        },
        Case {
            name: "subnet file with garbage",
            env: base("ADD"),
            conf: conf_with("subnetFile", json!(garbage)),
            code: 7,
            fragment: "this is not a subnet file".into(),
        },
        Case {
            name: "requested IP outside the subnet (runtimeConfig)",
            env: base("ADD"),
            conf: conf_with("runtimeConfig", json!({"ips": ["10.9.9.9/24"]})),
            code: 7,
            fragment: "runtimeConfig.ips: \"10.9.9.9/24\": 10.9.9.9 is outside the node subnet 10.244.3.0/24".into(),
        },
        Case {
            name: "requested IP outside the subnet (CNI_ARGS)",
            env: with("CNI_ARGS", "IgnoreUnknown=1;IP=10.9.9.9"),
            conf: good.clone(),
            code: 7,
            fragment: "CNI_ARGS IP \"10.9.9.9\": 10.9.9.9 is outside".into(),
        },
        Case {
            name: "requested IP is the gateway",
            env: with("CNI_ARGS", "IP=10.244.3.1"),
            conf: good.clone(),
            code: 7,
            fragment: "10.244.3.1 is not usable".into(),
        },
        Case {
            name: "unknown CNI_ARGS key",
            env: with("CNI_ARGS", "FOO=bar"),
            conf: good.clone(),
            code: 2,
            fragment: "\"FOO\"".into(),
        },
        Case {
            name: "mtu of the wrong type",
            env: base("ADD"),
            conf: conf_with("mtu", json!("jumbo")),
            code: 7,
            fragment: "mtu=\"jumbo\"".into(),
        },
        Case {
            name: "bridge name too long",
            env: base("ADD"),
            conf: conf_with("bridge", json!("a-bridge-name-too-long")),
            code: 7,
            fragment: "a-bridge-name-too-long".into(),
        },
        // Issue 15 item 4: CNI_NETNS that would put the "pod" on the host, or is no netns.
        Case {
            name: "CNI_NETNS is the plugin's own netns (the node's, by its bind mount)",
            env: with("CNI_NETNS", &node_netns),
            conf: good.clone(),
            code: 4,
            fragment: "is the plugin's own (the node's) network namespace".into(),
        },
        Case {
            name: "CNI_NETNS is the plugin's own netns (/proc/self/ns/net)",
            env: with("CNI_NETNS", "/proc/self/ns/net"),
            conf: good.clone(),
            code: 4,
            fragment: "is the plugin's own (the node's) network namespace".into(),
        },
        Case {
            name: "CNI_NETNS is a mount namespace",
            env: with("CNI_NETNS", "/proc/self/ns/mnt"),
            conf: good.clone(),
            code: 4,
            fragment: "not a network namespace (a namespace of type 0x20000)".into(),
        },
        Case {
            name: "CNI_NETNS is a directory",
            env: with("CNI_NETNS", "/proc/self/ns"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_NETNS=\"/proc/self/ns\"".into(),
        },
        Case {
            name: "CNI_IFNAME with %d",
            env: with("CNI_IFNAME", "eth%d"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_IFNAME=\"eth%d\"".into(),
        },
        Case {
            name: "CNI_IFNAME with /",
            env: with("CNI_IFNAME", "eth/0"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_IFNAME=\"eth/0\"".into(),
        },
        Case {
            name: "CNI_IFNAME not ASCII",
            env: with("CNI_IFNAME", "ethé"),
            conf: good.clone(),
            code: 4,
            fragment: "non-ASCII".into(),
        },
        Case {
            name: "CNI_IFNAME with a space",
            env: with("CNI_IFNAME", "eth 0"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_IFNAME=\"eth 0\"".into(),
        },
        Case {
            name: "CNI_IFNAME ..",
            env: with("CNI_IFNAME", ".."),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_IFNAME=\"..\"".into(),
        },
        // Issue 15 item 6.
        Case {
            name: "bridge is lo (exists, not a bridge)",
            env: base("ADD"),
            conf: conf_with("bridge", json!("lo")),
            code: 7,
            fragment: "config key bridge=\"lo\": a link \"lo\" exists and is not a bridge".into(),
        },
        Case {
            name: "bridge with %d",
            env: base("ADD"),
            conf: conf_with("bridge", json!("br%d")),
            code: 7,
            fragment: "bridge=\"br%d\"".into(),
        },
        Case {
            name: "bridge with NUL",
            env: base("ADD"),
            conf: conf_with("bridge", json!("br\u{0}x")),
            code: 7,
            fragment: "bridge=\"br\\0x\"".into(),
        },
        Case {
            name: "subnet file is a FIFO",
            env: base("ADD"),
            conf: conf_with("subnetFile", json!(fifo)),
            code: 7,
            fragment: "not a regular file (a FIFO)".into(),
        },
        Case {
            name: "subnet file is a directory",
            env: base("ADD"),
            conf: conf_with("subnetFile", json!(node.dir.path())),
            code: 7,
            fragment: "not a regular file (a directory)".into(),
        },
        Case {
            name: "subnet file's gateway is the network address",
            env: base("ADD"),
            conf: conf_with("subnetFile", json!(gw_is_network)),
            code: 7,
            fragment: "FLANNEL_SUBNET=\"10.244.3.0/24\": the gateway (the address) is the subnet's network address".into(),
        },
        Case {
            name: "subnet file's gateway is the broadcast address",
            env: base("ADD"),
            conf: conf_with("subnetFile", json!(gw_is_broadcast)),
            code: 7,
            fragment: "broadcast address".into(),
        },
        Case {
            name: "runtimeConfig.ips with a garbage prefix",
            env: base("ADD"),
            conf: ips("10.244.3.9/garbage"),
            code: 7,
            fragment: "runtimeConfig.ips: \"10.244.3.9/garbage\"".into(),
        },
        Case {
            name: "runtimeConfig.ips with a prefix other than the subnet's",
            env: base("ADD"),
            conf: ips("10.244.3.9/16"),
            code: 7,
            fragment: "prefix length /16 is not the node subnet's".into(),
        },
        Case {
            name: "runtimeConfig.ips 0.0.0.0",
            env: base("ADD"),
            conf: ips("0.0.0.0"),
            code: 7,
            fragment: "\"0.0.0.0\": the unspecified address".into(),
        },
        Case {
            name: "runtimeConfig.ips 255.255.255.255",
            env: base("ADD"),
            conf: ips("255.255.255.255"),
            code: 7,
            fragment: "\"255.255.255.255\": the broadcast address".into(),
        },
        Case {
            name: "runtimeConfig.ips the subnet's network address",
            env: base("ADD"),
            conf: ips("10.244.3.0/24"),
            code: 7,
            fragment: "10.244.3.0 is not usable".into(),
        },
        Case {
            name: "runtimeConfig.ips the subnet's broadcast address",
            env: base("ADD"),
            conf: ips("10.244.3.255"),
            code: 7,
            fragment: "10.244.3.255 is not usable".into(),
        },
        Case {
            name: "runtimeConfig.ips the gateway",
            env: base("ADD"),
            conf: ips("10.244.3.1/24"),
            code: 7,
            fragment: "10.244.3.1 is not usable".into(),
        },
        Case {
            name: "CNI_ARGS IP with a garbage prefix",
            env: with("CNI_ARGS", "IP=10.244.3.9/garbage"),
            conf: good.clone(),
            code: 4,
            fragment: "CNI_ARGS: IP=\"10.244.3.9/garbage\"".into(),
        },
        Case {
            name: "CNI_ARGS IP 255.255.255.255",
            env: with("CNI_ARGS", "IP=255.255.255.255"),
            conf: good.clone(),
            code: 7,
            fragment: "CNI_ARGS IP \"255.255.255.255\": the broadcast address".into(),
        },
        Case {
            name: "dns.nameservers entry that is not an IP",
            env: base("ADD"),
            conf: conf_with("dns", json!({"nameservers": ["10.96.0.10", "ns.example"]})),
            code: 7,
            fragment: "dns.nameservers[1]=\"ns.example\": not an IP address".into(),
        },
        Case {
            name: "logFile is a symlink",
            env: base("ADD"),
            conf: conf_with("logFile", json!(log_link)),
            code: 7,
            fragment: "is a symlink (not followed)".into(),
        },
        Case {
            name: "logFile is /proc/self/mem",
            env: base("ADD"),
            conf: conf_with("logFile", json!("/proc/self/mem")),
            code: 7,
            fragment: "config key logFile=\"/proc/self/mem\"".into(),
        },
        Case {
            name: "logFile is a FIFO",
            env: base("ADD"),
            conf: conf_with("logFile", json!(fifo)),
            code: 7,
            fragment: format!("config key logFile={:?}", fifo.display().to_string()),
        },
        Case {
            name: "prevResult that does not decode (ADD)",
            env: base("ADD"),
            conf: conf_with("prevResult", json!({"interfaces": "eth0"})),
            code: 7,
            fragment: "config key prevResult".into(),
        },
        Case {
            name: "prevResult that does not decode (CHECK)",
            env: check_env.clone(),
            conf: conf_with("prevResult", json!({"ips": [{"address": "nonsense"}]})),
            code: 7,
            fragment: "config key prevResult".into(),
        },
    ];

    // The node namespace (the plugin's own, standing in for the host) as dumps: no case
    // may change a link, an address or a route there.
    let host_state = || {
        ["link", "addr", "route", "-6 route", "rule"]
            .iter()
            .map(|what| {
                let mut args: Vec<&str> = vec!["-d"];
                args.extend(what.split(' '));
                args.extend(["show"]);
                if what.ends_with("route") {
                    args.extend(["table", "all"]);
                }
                node.ns.ip(&args).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let before = host_state();
    let mut failures = Vec::new();
    for c in &cases {
        let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let stdin = match &c.conf {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let out = twill_tests::bins::exec_plugin(&node.plugin, Some(&node.ns.path()), &env, &stdin)
            .unwrap();
        let got = out.error_code();
        let msg = serde_json::from_str::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["msg"].as_str().map(String::from))
            .unwrap_or_default();
        if out.ok() || got != Some(c.code) || !msg.contains(&c.fragment) {
            failures.push(format!(
                "{}: exit {}, want code {} and {:?}; got {}",
                c.name, out.exit_code, c.code, c.fragment, out.stdout
            ));
        }
        // The error object has every field the spec asks for.
        if let Ok(v) = serde_json::from_str::<Value>(&out.stdout) {
            for k in ["cniVersion", "code", "msg", "details"] {
                assert!(v.get(k).is_some(), "{}: no {k} in {}", c.name, out.stdout);
            }
        }
        assert!(
            node.reservations().is_empty(),
            "{}: reservation left",
            c.name
        );
        assert!(node.host_veths().is_empty(), "{}: veth left", c.name);
        assert_eq!(
            pod.ns.links().unwrap(),
            vec!["lo"],
            "{}: pod link left",
            c.name
        );
        assert!(node.lock_is_free(), "{}: lock held", c.name);
        assert_eq!(
            host_state(),
            before,
            "{}: the node namespace changed",
            c.name
        );
        assert!(node.stray_files().is_empty(), "{}: temp file left", c.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_full_subnet_is_try_again_and_leaves_nothing() {
    // A /30: network, gateway, one pod, broadcast.
    let node = Node::with_subnet(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/30\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let a = node.pod("fa");
    let b = node.pod("fb");
    let r = node.add(&a);
    assert_eq!(r["ips"][0]["address"], "10.244.3.2/30");
    let out = node.call("ADD", &b, &node.conf("1.0.0"));
    assert_eq!(out.error_code(), Some(11), "{}", out.stdout);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("no free IP left in subnet 10.244.3.0/30")
    );
    assert_eq!(node.reservations().len(), 1);
    assert_eq!(b.ns.links().unwrap(), vec!["lo"]);
    assert_eq!(node.host_veths().len(), 1);
    // A full subnet is no reason for STATUS to fail (status.rs: the runtime would mark the
    // node not ready); ADD's code 11 is the answer.
    let st = node.exec(&[("CNI_COMMAND", "STATUS")], &node.conf("1.1.0"));
    assert!(st.ok(), "{}", st.stdout);
    node.del(&a);
    node.add(&b);
    node.del(&b);
    assert!(node.reservations().is_empty() && node.host_veths().is_empty());
}
