//! Cluster test: 3 nodes (namespaces on an underlay bridge), real etcd, one real twilld per
//! node, 2 pods per node made with the real `twill` plugin. Every pod reaches every pod and
//! every node, and a pod on another node sees the client's own pod IP (no NAT in between).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use twill_tests::cluster::{Cluster, ClusterOpts, in_netns, metric, ping};

#[test]
fn pods_reach_pods_and_nodes_across_nodes_without_nat() {
    let c = Cluster::start(ClusterOpts::default()).unwrap();

    // Each node has a route, neighbour and FDB entry for each of the 2 others, none for itself.
    for n in &c.nodes {
        let own = n.subnet().expect("subnet file written");
        let routes = n.overlay_routes();
        assert_eq!(routes.len(), 2, "{}: {routes:?}\n{}", n.name, c.logs());
        assert!(!n.has_route(&own), "{}: route to its own subnet", n.name);
        let m = n.metrics();
        assert_eq!(metric(&m, "twill_peers"), Some(2.0), "{m}");
        assert_eq!(metric(&m, "twill_routes_programmed"), Some(2.0), "{m}");
        assert_eq!(metric(&m, "twill_fdb_programmed"), Some(2.0), "{m}");
        assert_eq!(metric(&m, "twill_neighbours_programmed"), Some(2.0), "{m}");
        let sub = std::fs::read_to_string(n.subnet_file()).unwrap();
        assert!(sub.contains("FLANNEL_MTU=1450"), "{sub}");
        assert!(sub.contains("FLANNEL_NETWORK=10.244.0.0/16"), "{sub}");
    }

    // The ping matrix: every pod → every other pod and every node.
    let pods = c.pods();
    assert_eq!(pods.len(), 6);
    let mut failures = Vec::new();
    for &(i, k, src) in &pods {
        let from = &c.nodes[i].pods[k].ns;
        for &(_, _, dst) in &pods {
            if dst != src && !ping(from, dst, 1, 2) {
                failures.push(format!("pod {src} -> pod {dst}"));
            }
        }
        for n in &c.nodes {
            if !ping(from, n.ip, 1, 2) {
                failures.push(format!("pod {src} -> node {} {}", n.name, n.ip));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "unreachable: {failures:#?}\n{}",
        c.logs()
    );

    // A TCP server in a pod on node 1 reports the peer address of a client in a pod on node 2.
    let server_ns = c.nodes[0].pods[0].ns.path();
    let server_ip = c.nodes[0].pods[0].ip;
    let client_ns = c.nodes[1].pods[0].ns.path();
    let client_ip = c.nodes[1].pods[0].ip;
    let listener = in_netns(&server_ns, || TcpListener::bind("0.0.0.0:7777"))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(peer.ip().to_string().as_bytes()).unwrap();
        peer
    });
    let mut stream = in_netns(&client_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::from((server_ip, 7777)), Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    let mut seen = String::new();
    stream.read_to_string(&mut seen).unwrap();
    let peer = server.join().unwrap();
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(client_ip),
        "the server saw {peer}"
    );
    assert_eq!(seen, client_ip.to_string());

    // twillctl status on a node: nothing missing, nothing stale.
    let status = c.nodes[0]
        .ns
        .command(twill_tests::bins::bin("twillctl"))
        .args([
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "status",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "twillctl status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["missing"].as_array().map(|a| a.len()), Some(0), "{v}");
    assert_eq!(v["stale"].as_array().map(|a| a.len()), Some(0), "{v}");
    assert_eq!(v["expected"], 6, "{v}");
}
