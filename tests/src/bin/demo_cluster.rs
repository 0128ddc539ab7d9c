//! The multi-node demo: a real etcd, 3 "nodes" (network namespaces on an underlay bridge),
//! one real twilld per node, 2 pods per node made by the real `twill` CNI plugin; then the
//! ping matrix, `twillctl leases list` and `twillctl status`, and a cleanup of everything.
//! Needs root and the binaries (TWILL_BIN_DIR, else next to this executable).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use twill_tests::cluster::{Cluster, ClusterOpts, in_netns, ping};

fn say(title: &str) {
    println!("\n== {title}");
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    twill_tests::cluster::require_root();
    say("what this is");
    println!(
        "A small twill cluster on this machine, made of network namespaces:\n\
         - an etcd (the cluster's only shared state: network config + one subnet lease per node),\n\
         - 3 nodes, each a namespace plugged into an 'underlay' bridge (the physical network),\n\
         - on each node the real twilld: it takes a /24 lease for the node from etcd, creates the\n\
         \x20 VXLAN device twill.1 and, for every other node, a route + neighbour + FDB entry,\n\
         - 2 pods per node, each a namespace wired by the real `twill` CNI plugin (veth on cni0)."
    );
    let t0 = Instant::now();
    let c = Cluster::start(ClusterOpts::default())?;
    println!("cluster up in {:?}", t0.elapsed());

    say("nodes (underlay IP, subnet leased from etcd, VXLAN device)");
    for n in &c.nodes {
        let link = n.ns.ip(&["-d", "-br", "link", "show", "twill.1"])?;
        println!(
            "{}  ns {}  underlay {}  subnet {}",
            n.name,
            n.ns.name(),
            n.ip,
            n.subnet().unwrap_or_default()
        );
        print!("{}", indent(link.trim()));
        for p in &n.pods {
            println!("    pod {}  ip {}", p.id, p.ip);
        }
    }

    say("twillctl leases list   (what etcd holds: one lease per node)");
    print!("{}", indent(&c.twillctl(&["leases", "list"])?));

    let n0 = &c.nodes[0];
    say(&format!(
        "{}'s overlay entries: one route, neighbour and FDB entry per OTHER node",
        n0.name
    ));
    println!("  ip route show dev twill.1   (peer subnet via peer's VTEP address, onlink)");
    print!(
        "{}",
        indent(&n0.ns.ip(&["route", "show", "dev", "twill.1"])?)
    );
    println!("  ip neigh show dev twill.1   (peer VTEP address -> peer VTEP MAC)");
    print!(
        "{}",
        indent(&n0.ns.ip(&["neigh", "show", "dev", "twill.1"])?)
    );
    println!("  bridge fdb show dev twill.1 (peer VTEP MAC -> peer node's underlay IP)");
    print!(
        "{}",
        indent(&n0.ns.exec("bridge", &["fdb", "show", "dev", "twill.1"])?)
    );

    say("ping matrix: every pod -> every pod and every node (ok = reply received)");
    let pods = c.pods();
    let mut header = format!("{:<20}", "from \\ to");
    for &(_, _, ip) in &pods {
        header.push_str(&format!("{:<14}", ip.to_string()));
    }
    for n in &c.nodes {
        header.push_str(&format!("{:<15}", format!("{}", n.ip)));
    }
    println!("{header}");
    let mut all_ok = true;
    for &(i, k, src) in &pods {
        let ns = &c.nodes[i].pods[k].ns;
        let mut row = format!("{:<20}", format!("{src} (n{})", i + 1));
        for &(_, _, dst) in &pods {
            let cell = if dst == src {
                "-"
            } else if ping(ns, dst, 1, 2) {
                "ok"
            } else {
                all_ok = false;
                "FAIL"
            };
            row.push_str(&format!("{cell:<14}"));
        }
        for n in &c.nodes {
            let cell = if ping(ns, n.ip, 1, 2) {
                "ok"
            } else {
                all_ok = false;
                "FAIL"
            };
            row.push_str(&format!("{cell:<15}"));
        }
        println!("{row}");
    }

    say("no NAT between pods: a TCP server in a pod on node-1 prints who connected");
    let (srv_ns, srv_ip) = (c.nodes[0].pods[0].ns.path(), c.nodes[0].pods[0].ip);
    let (cli_ns, cli_ip) = (c.nodes[1].pods[0].ns.path(), c.nodes[1].pods[0].ip);
    let listener = in_netns(&srv_ns, || TcpListener::bind("0.0.0.0:7777"))??;
    let server = std::thread::spawn(move || -> std::io::Result<SocketAddr> {
        let (mut s, peer) = listener.accept()?;
        s.write_all(b"hello")?;
        Ok(peer)
    });
    let mut s = in_netns(&cli_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::from((srv_ip, 7777)), Duration::from_secs(3))
    })??;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let peer = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread"))??;
    println!(
        "client pod {cli_ip} (node-2) -> server pod {srv_ip}:7777 (node-1): the server saw {} {}",
        peer.ip(),
        if peer.ip() == std::net::IpAddr::V4(cli_ip) {
            "= the client's own IP"
        } else {
            all_ok = false;
            "!= the client's IP (NAT!)"
        }
    );

    say(&format!(
        "twillctl status on {} (expected from etcd vs programmed in the kernel)",
        n0.name
    ));
    let out = n0
        .ns
        .command(twill_tests::bins::bin("twillctl"))
        .args(["--etcd-endpoints", "http://127.0.0.1:2379", "status"])
        .output()?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    if !out.status.success() {
        all_ok = false;
        print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));
    }

    say("cleanup: stopping twilld and etcd, deleting every namespace");
    let names: Vec<String> = c
        .nodes
        .iter()
        .flat_map(|n| {
            std::iter::once(n.ns.name().to_string())
                .chain(n.pods.iter().map(|p| p.ns.name().to_string()))
        })
        .chain(std::iter::once(c.underlay.name().to_string()))
        .collect();
    drop(c);
    let left = twill_tests::cluster::run("ip", &["netns", "list"])?;
    let leftover: Vec<&String> = names.iter().filter(|n| left.contains(n.as_str())).collect();
    if leftover.is_empty() {
        println!("removed {} namespaces; nothing left behind", names.len());
    } else {
        all_ok = false;
        println!("left behind: {leftover:?}");
    }
    say(if all_ok { "demo: OK" } else { "demo: FAILED" });
    Ok(all_ok)
}
