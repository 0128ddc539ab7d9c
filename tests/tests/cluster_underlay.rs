//! Cluster tests of the underlay and its MTU: `Backend.MTU` sets the VXLAN device's MTU, the
//! subnet file's `FLANNEL_MTU` and so the pods' MTU; `--mtu` wins over it; a `Backend.MTU`
//! the underlay cannot carry is refused by name; `--iface`/`--iface-regex` are tried in
//! order by the real twilld, and a failure names every criterion; the Flannel keys set but
//! not implemented are named once in twilld's log.

use std::time::Duration;

use twill_tests::bins;
use twill_tests::cluster::{Cluster, ClusterOpts, read_or_empty, wait_for};

fn write_net_conf(c: &Cluster, backend: &str) {
    std::fs::write(
        c.dir.path().join("net-conf.json"),
        format!(r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{backend}}}"#),
    )
    .unwrap();
}

/// The MTU `ip -o link show <dev>` prints for `dev` in `ns`.
fn mtu(ns: &twill_tests::netns::TestNetns, dev: &str) -> Option<u32> {
    let out = ns.ip(&["-o", "link", "show", dev]).ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// What this proves: with `Backend.MTU` 1400 (the underlay eth0 has 1500), twilld makes
/// `twill.1` with MTU 1400, writes `FLANNEL_MTU=1400`, and a pod made by the CNI plugin gets
/// 1400 on its eth0; restarted with `--mtu 1300`, the flag wins: the device is recreated
/// with 1300 and the subnet file follows. (Without the change the device had 1450.) The
/// config's unimplemented keys (DirectRouting, GBP) are named in one warning at start.
#[test]
fn backend_mtu_sets_the_device_the_subnet_file_and_the_pods_and_mtu_wins() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 0,
        pods_per_node: 0,
        ..ClusterOpts::default()
    })
    .unwrap();
    write_net_conf(
        &c,
        r#"{"Type":"vxlan","VNI":1,"MTU":1400,"DirectRouting":true,"GBP":true,"Learning":false}"#,
    );
    let i = c.add_node().unwrap();
    c.wait_ready(i, Duration::from_secs(20)).unwrap();
    let n = &c.nodes[i];
    assert_eq!(mtu(&n.ns, "twill.1"), Some(1400), "{}", n.log_text());
    let file = read_or_empty(&n.subnet_file());
    assert!(file.contains("FLANNEL_MTU=1400\n"), "{file}");
    // The keys set but not implemented are warned about once, by name; MTU and
    // DirectRouting are implemented and Learning false asks for nothing: none is named.
    let log = n.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("does not implement"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("keys=Backend.GBP")
            && !warnings[0].contains("DirectRouting")
            && !warnings[0].contains("MTU")
            && !warnings[0].contains("Learning"),
        "{}",
        warnings[0]
    );
    let p = c.add_pod(i).unwrap();
    assert_eq!(mtu(&c.nodes[i].pods[p].ns, "eth0"), Some(1400));

    // --mtu wins over Backend.MTU: the device is recreated with it.
    c.nodes[i].kill_daemon();
    c.start_daemon_with(i, &bins::bin("twilld"), &["--mtu", "1300"], &[])
        .unwrap();
    let n = &c.nodes[i];
    wait_for(Duration::from_secs(20), || {
        (n.ready()
            && mtu(&n.ns, "twill.1") == Some(1300)
            && read_or_empty(&n.subnet_file()).contains("FLANNEL_MTU=1300\n"))
        .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "twill.1 mtu {:?}, subnet file {:?}\n{}",
            mtu(&n.ns, "twill.1"),
            read_or_empty(&n.subnet_file()),
            n.log_text()
        )
    });
}

/// What this proves: a `Backend.MTU` larger than the node's underlay MTU less VXLAN's 50
/// bytes (1460 > 1500 − 50) keeps twilld up but not ready, with /readyz and the log naming
/// `Backend.MTU`, the value and the bound; no device, no subnet file. The same config with
/// `--mtu` on the node is accepted (the flag wins, so the key does not apply there).
#[test]
fn a_backend_mtu_too_large_for_the_underlay_is_refused_by_name() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 0,
        pods_per_node: 0,
        ..ClusterOpts::default()
    })
    .unwrap();
    write_net_conf(&c, r#"{"Type":"vxlan","VNI":1,"MTU":1460}"#);
    let i = c.add_node().unwrap();
    let n = &c.nodes[i];
    let body = wait_for(Duration::from_secs(20), || match n.http("/readyz") {
        Ok((503, b)) if b.contains("Backend.MTU") => Some(b),
        _ => None,
    })
    .unwrap_or_else(|| panic!("no 503 naming Backend.MTU\n{}", n.log_text()));
    assert!(
        body.contains("\"1460\"") && body.contains("at most 1450"),
        "{body}"
    );
    assert!(n.log_text().contains("Backend.MTU"), "{}", n.log_text());
    assert_eq!(n.http("/healthz").unwrap().0, 200);
    assert_eq!(mtu(&n.ns, "twill.1"), None, "a device was created");
    assert!(!n.subnet_file().exists(), "subnet file written");

    c.nodes[i].kill_daemon();
    c.start_daemon_with(i, &bins::bin("twilld"), &["--mtu", "1400"], &[])
        .unwrap();
    c.wait_ready(i, Duration::from_secs(20)).unwrap();
    assert_eq!(mtu(&c.nodes[i].ns, "twill.1"), Some(1400));
}

/// What this proves: the real twilld tries `--iface` entries and then `--iface-regex` in
/// order (a missing name and a regex that matches nothing are skipped; `^eth0$` finds the
/// underlay, and the lease's PublicIP is its address), and when nothing matches it exits
/// with an error naming each criterion and the interfaces it tried.
#[test]
fn iface_criteria_are_tried_in_order_and_a_failure_names_them() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 1,
        pods_per_node: 0,
        extra_args: [
            "--iface",
            "nope0",
            "--iface-regex",
            "^wlan",
            "--iface-regex",
            "^eth0$",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOpts::default()
    })
    .unwrap();
    let leases = c.twillctl(&["leases", "list", "-o", "json"]).unwrap();
    assert!(
        leases.contains(&c.nodes[0].ip.to_string()),
        "PublicIP of eth0 expected: {leases}"
    );

    // Nothing matches: twilld exits, naming what it tried.
    c.nodes[0].kill_daemon();
    c.opts.extra_args = ["--iface", "nope0", "--iface-regex", "^wlan"]
        .map(String::from)
        .to_vec();
    c.start_daemon_with(
        0,
        &bins::bin("twilld"),
        &["--iface-regex", "^ens[0-9]+$"],
        &[],
    )
    .unwrap();
    let n = &mut c.nodes[0];
    let status = n
        .daemon
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("twilld did not exit\n{}", read_or_empty(&n.log())));
    assert!(!status.success());
    let log = read_or_empty(&n.log());
    for want in [
        "no interface named 'nope0' (--iface 'nope0'; tried: lo, eth0)",
        "no interface matches --iface-regex '^wlan' by address or name (tried: lo [127.0.0.1",
        "no interface matches --iface-regex '^ens[0-9]+$' by address or name",
    ] {
        assert!(log.contains(want), "{want:?} not in\n{log}");
    }
}
