//! `twillctl status`: this node's data plane, expected (from the leases in etcd) against
//! programmed (from netlink): what is missing and what is stale. Run it on the node (in its
//! network namespace). This node's subnet is the lease whose network address is on
//! `twill.<VNI>` (or `--node-name`'s lease when the device is missing).
//!
//! The PEER table: one row per valid peer lease, with what this node's twilld last
//! published about it (its report `<prefix>/health/<node>`, read as `twillctl cluster
//! status` reads them): reachable through the overlay or not, RTT, when it last answered.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use ipnet::Ipv6Net;
use serde_json::json;
use twill_dataplane::Netlink;
use twill_dataplane::overlay::v6::{Op6, Programmed6, diff6};
use twill_dataplane::overlay::{Overlay, Programmed, RtnlOverlay, VxlanLink};

use super::{Cli, EXIT_ERROR, EXIT_NOT_FOUND, Failure, Output, connect, print_json, print_table};
use crate::daemon::decide_direct;
use crate::daemon::health::{
    NodeReport, PATH_VXLAN, PeerView, PeersListed, health_prefix, read_report,
};
use crate::daemon::reconcile::{Direct, Peer, Skipped, Validation, desired_with, peers, status};
use crate::daemon::reconcile6::{Peer6, Skipped6, Validation6, desired6, peers6};
use twill_ipam::lease::Lease;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// This node's name, to find its lease when the VXLAN device is missing (default: the
    /// hostname).
    #[arg(long, env = "TWILLCTL_NODE_NAME")]
    pub node_name: Option<String>,
    /// twilld's --metrics-addr: its /readyz says whether it is ready, and why not (e.g. a
    /// blocked lease).
    #[arg(long, env = "TWILLCTL_METRICS_ADDR", default_value = "127.0.0.1:9472")]
    pub metrics_addr: std::net::SocketAddr,
}

/// twilld's readiness from its /readyz: (ready, the reason when not), `None` if it does
/// not answer.
fn twilld_ready(addr: std::net::SocketAddr) -> Option<(bool, String)> {
    let r = super::diag::http_get(addr, "/readyz").ok()?;
    let text = String::from_utf8_lossy(&r);
    let (status, body) = text.split_once("\n\n")?;
    let ready = status.split_whitespace().nth(1) == Some("200");
    let reason = body
        .trim()
        .strip_prefix("not ready: ")
        .unwrap_or(body.trim());
    Some((
        ready,
        if ready {
            String::new()
        } else {
            reason.to_string()
        },
    ))
}

pub async fn run(cli: &Cli, args: &StatusArgs) -> Result<(), Failure> {
    let store = connect(&cli.etcd).await?;
    let cfg = store.require_config().await?;
    let vni = cfg.backend.vxlan().vni;
    let (leases, invalid, revision) = store.list_all().await?;
    let nl = Netlink::current()
        .map_err(|e| Failure::new(EXIT_ERROR, format!("open netlink socket: {e}")))?;
    let ov = RtnlOverlay::new(nl);
    let link = ov
        .get_vxlan(vni)
        .await
        .map_err(|e| Failure::new(EXIT_ERROR, format!("read the VXLAN device: {e}")))?;
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let own = link
        .as_ref()
        .and_then(|l| {
            leases
                .iter()
                .find(|lease| l.addresses.iter().any(|a| a.addr() == lease.net_addr()))
        })
        .or_else(|| leases.iter().find(|l| l.attrs.node_name == node));
    let Some(own) = own else {
        return Err(Failure::new(
            EXIT_NOT_FOUND,
            format!(
                "no lease of this node: no lease's address is on twill.{vni} and none is named {node:?} (give --node-name)"
            ),
        ));
    };
    // The same validation as twilld's, against this node's subnet, public IP and VTEP MAC.
    let own_mac = match &link {
        Some(l) if !l.mac.is_zero() => Some(l.mac),
        _ => own.attrs.vtep_mac().mac(),
    };
    let v = Validation::new(
        &cfg,
        Some(own.subnet),
        Some(IpAddr::V4(own.attrs.public_ip)).filter(|ip| !ip.is_unspecified()),
        own_mac,
    );
    let (peer_list, skipped) = peers(&leases, &invalid, &v);
    let (rejected, pending): (Vec<&Skipped>, Vec<&Skipped>) =
        skipped.iter().partition(|s| s.reason.is_rejection());
    // Backend.DirectRouting: the same lookups as twilld's, in this namespace, over the
    // VXLAN device's underlay.
    let direct = match &link {
        Some(l) if cfg.backend.vxlan().direct_routing => {
            let dev = l.underlay_index.unwrap_or(0);
            decide_direct(&ov, &peer_list, dev, &Direct::default()).await
        }
        _ => Direct::default(),
    };
    let want = desired_with(&peer_list, &direct);
    let actual = match &link {
        Some(l) => ov
            .dump(l.index)
            .await
            .map_err(|e| Failure::new(EXIT_ERROR, format!("dump twill.{vni}: {e}")))?,
        None => Programmed::default(),
    };
    let report = status(&want, &actual);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // No report is not an error: twilld may run without health, or be down.
    let key = format!("{}{}", health_prefix(store.prefix()), own.attrs.node_name);
    let health: Result<NodeReport, String> = match read_report(&store, &own.attrs.node_name).await {
        Ok(Some(r)) => r,
        Ok(None) => Err(format!(
            "no health report at {key}: twilld is not running on this node, or its report expired"
        )),
        Err(e) => Err(format!("could not read the health report {key}: {e}")),
    };
    let mut rows = peer_rows(&peer_list, &leases, health.as_ref().ok(), now);
    for r in &mut rows {
        if r.subnet.parse().is_ok_and(|s| direct.subnets.contains(&s)) {
            r.route = "direct";
        }
    }
    let route_of = |p: &Peer| direct.mode(p).as_str();
    let v6 = ipv6_status(&ov, &cfg, own, &peer_list, &leases).await?;
    let twilld = twilld_ready(args.metrics_addr);
    // A blocked node keeps its old subnet's address on twill.<VNI>, whose lease another node
    // holds now.
    let foreign_own = args.node_name.is_some() && own.attrs.node_name != node;
    match cli.output {
        Output::Json => {
            let v = json!({
                "node": own.attrs.node_name,
                "subnet": own.subnet.to_string(),
                "revision": revision,
                "vxlan": link.as_ref().map(|l| json!({
                    "name": l.name, "index": l.index, "mtu": l.mtu, "mac": l.mac.to_string(),
                    "up": l.up, "addresses": l.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                })),
                "peers": peer_list.iter().map(|p| json!({
                    "subnet": p.subnet.to_string(), "public_ip": p.public_ip.to_string(),
                    "vtep_mac": p.vtep_mac.to_string(), "route": route_of(p),
                })).collect::<Vec<_>>(),
                "rejected": rejected.iter().map(|s| skipped_json(s)).collect::<Vec<_>>(),
                "pending": pending.iter().map(|s| skipped_json(s)).collect::<Vec<_>>(),
                "expected": report.expected,
                "programmed": report.programmed,
                "missing": report.missing,
                "stale": report.stale,
                "in_sync": report.missing.is_empty() && report.stale.is_empty() && link.is_some(),
                "peer_health": peer_health_json(&health, &rows, now),
                "twilld": twilld.as_ref().map(|(ready, reason)| json!({"ready": ready, "reason": reason})),
                "ipv6": v6.as_ref().map(V6Status::json),
            });
            print_json(&v);
        }
        Output::Table => {
            match &link {
                Some(l) => println!(
                    "node {} subnet {}: {} mtu {} mac {} ({})",
                    own.attrs.node_name,
                    own.subnet,
                    l.name,
                    l.mtu,
                    l.mac,
                    if l.up { "up" } else { "DOWN" }
                ),
                None => println!(
                    "node {} subnet {}: twill.{vni} is MISSING",
                    own.attrs.node_name, own.subnet
                ),
            }
            match &twilld {
                Some((true, _)) => println!("twilld ready"),
                Some((false, why)) => println!("twilld NOT READY: {why}"),
                None => println!("twilld does not answer on {}", args.metrics_addr),
            }
            if foreign_own {
                println!(
                    "the lease of {} (on {}) is held by node {:?}, not by this node ({node:?})",
                    own.subnet,
                    link.as_ref().map(|l| l.name.as_str()).unwrap_or("-"),
                    own.attrs.node_name
                );
            }
            println!(
                "peers {}  expected entries {}  programmed {}  missing {}  stale {}",
                peer_list.len(),
                report.expected,
                report.programmed,
                report.missing.len(),
                report.stale.len()
            );
            for s in &pending {
                println!("lease {} not taken yet: {}", s.key, s.detail);
            }
            if cfg.backend.vxlan().direct_routing {
                println!(
                    "direct routing on: {} peers direct, {} over VXLAN",
                    direct.subnets.len(),
                    peer_list.len() - direct.subnets.len()
                );
            }
            if health.is_err() && !direct.subnets.is_empty() {
                // No PEERS table to show the route in: the modes on their own.
                let rows: Vec<Vec<String>> = peer_list
                    .iter()
                    .map(|p| {
                        vec![
                            p.subnet.to_string(),
                            p.public_ip.to_string(),
                            route_of(p).to_string(),
                        ]
                    })
                    .collect();
                print_table(&["SUBNET", "PUBLIC-IP", "ROUTE"], &rows);
            }
            match &health {
                Err(why) => println!("peer health: {why}"),
                Ok(r) if !rows.is_empty() => {
                    println!();
                    println!(
                        "PEERS (health report of twilld, {} s old)",
                        now.saturating_sub(r.time)
                    );
                    print_table(
                        &[
                            "NODE",
                            "SUBNET",
                            "VTEP",
                            "REACHABLE",
                            "RTT",
                            "LAST-SEEN",
                            "PATH",
                            "ROUTE",
                        ],
                        &rows.iter().map(PeerRow::cells).collect::<Vec<_>>(),
                    );
                    println!();
                }
                Ok(_) => {}
            }
            if !rejected.is_empty() {
                println!();
                println!("REJECTED ({})", rejected.len());
                let rows: Vec<Vec<String>> = rejected
                    .iter()
                    .map(|s| vec![s.key.clone(), s.reason.to_string(), s.detail.clone()])
                    .collect();
                print_table(&["KEY", "REASON", "DETAIL"], &rows);
                println!();
            }
            if let Some(v6) = &v6 {
                v6.print();
            }
            if !report.missing.is_empty() || !report.stale.is_empty() {
                let mut rows = Vec::new();
                for op in &report.missing {
                    rows.push(vec!["missing".to_string(), op.to_string()]);
                }
                for op in &report.stale {
                    rows.push(vec!["stale".to_string(), op.to_string()]);
                }
                println!();
                print_table(&["STATE", "FIX"], &rows);
            } else {
                println!("in sync");
            }
        }
    }
    Ok(())
}

/// The IPv6 side of a dual-stack node: `twill-v6.<VNI>` expected against programmed.
struct V6Status {
    subnet: Ipv6Net,
    link: Option<VxlanLink>,
    peers: Vec<Peer6>,
    rejected: Vec<Skipped6>,
    expected: usize,
    programmed: usize,
    missing: Vec<Op6>,
    stale: Vec<Op6>,
}

impl V6Status {
    fn json(&self) -> serde_json::Value {
        json!({
            "subnet": self.subnet.to_string(),
            "vxlan": self.link.as_ref().map(|l| json!({
                "name": l.name, "index": l.index, "mtu": l.mtu, "mac": l.mac.to_string(),
                "up": l.up, "local": l.local.map(|a| a.to_string()),
            })),
            "peers": self.peers.iter().map(|p| json!({
                "key": p.key, "subnet": p.subnet.to_string(),
                "public_ipv6": p.public_ip.to_string(), "vtep_mac": p.vtep_mac.to_string(),
            })).collect::<Vec<_>>(),
            "rejected": self.rejected.iter().map(|s| json!({"key": s.key, "detail": s.detail})).collect::<Vec<_>>(),
            "expected": self.expected,
            "programmed": self.programmed,
            "missing": self.missing,
            "stale": self.stale,
            "in_sync": self.missing.is_empty() && self.stale.is_empty() && self.link.is_some(),
        })
    }

    fn print(&self) {
        println!();
        match &self.link {
            Some(l) => println!(
                "ipv6 subnet {}: {} mtu {} mac {} local {} ({})",
                self.subnet,
                l.name,
                l.mtu,
                l.mac,
                l.local.map_or("-".to_string(), |a| a.to_string()),
                if l.up { "up" } else { "DOWN" }
            ),
            None => println!(
                "ipv6 subnet {}: the IPv6 VXLAN device is MISSING",
                self.subnet
            ),
        }
        println!(
            "ipv6 peers {}  expected entries {}  programmed {}  missing {}  stale {}",
            self.peers.len(),
            self.expected,
            self.programmed,
            self.missing.len(),
            self.stale.len()
        );
        if !self.peers.is_empty() {
            let rows: Vec<Vec<String>> = self
                .peers
                .iter()
                .map(|p| {
                    vec![
                        p.subnet.to_string(),
                        p.public_ip.to_string(),
                        p.vtep_mac.to_string(),
                    ]
                })
                .collect();
            print_table(&["IPV6-SUBNET", "PUBLIC-IPV6", "VTEP"], &rows);
        }
        if !self.rejected.is_empty() {
            println!("REJECTED FOR IPV6 ({})", self.rejected.len());
            let rows: Vec<Vec<String>> = self
                .rejected
                .iter()
                .map(|s| vec![s.key.clone(), s.detail.clone()])
                .collect();
            print_table(&["KEY", "DETAIL"], &rows);
        }
        let mut rows = Vec::new();
        for op in &self.missing {
            rows.push(vec!["missing".to_string(), op.to_string()]);
        }
        for op in &self.stale {
            rows.push(vec!["stale".to_string(), op.to_string()]);
        }
        if rows.is_empty() {
            println!("ipv6 in sync");
        } else {
            print_table(&["STATE", "FIX"], &rows);
        }
        println!();
    }
}

/// The IPv6 side as twilld computes it (`None`: an IPv4-only config, or a lease without an
/// IPv6 subnet).
async fn ipv6_status(
    ov: &RtnlOverlay,
    cfg: &twill_ipam::netconf::NetConfig,
    own: &Lease,
    peers: &[Peer],
    leases: &[Lease],
) -> Result<Option<V6Status>, Failure> {
    let (true, Some(subnet), Some(network)) = (cfg.enable_ipv6, own.ipv6_subnet, cfg.ipv6_network)
    else {
        return Ok(None);
    };
    let vni = cfg.backend.vxlan().vni;
    let link = ov
        .get_vxlan6(vni)
        .await
        .map_err(|e| Failure::new(EXIT_ERROR, format!("read the IPv6 VXLAN device: {e}")))?;
    let own_ep = own.attrs.ipv6_endpoint().ok().flatten();
    let own_mac = match &link {
        Some(l) if !l.mac.is_zero() => Some(l.mac),
        _ => own_ep.map(|e| e.vtep_mac),
    };
    let v = Validation6 {
        network,
        subnet_len: cfg.ipv6_subnet_len.unwrap_or(64),
        subnet_min: cfg
            .ipv6_subnet_min
            .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
        subnet_max: cfg
            .ipv6_subnet_max
            .unwrap_or(std::net::Ipv6Addr::from(u128::MAX)),
        vni,
        own_subnet: subnet,
        own_public_ip: own_ep.map_or(std::net::Ipv6Addr::UNSPECIFIED, |e| e.public_ip),
        own_vtep_mac: own_mac.unwrap_or_default(),
    };
    let accepted: std::collections::HashSet<_> = peers.iter().map(|p| p.subnet).collect();
    let (peers, rejected) = peers6(leases.iter().filter(|l| accepted.contains(&l.subnet)), &v);
    let want = desired6(&peers);
    let actual = match &link {
        Some(l) => ov
            .dump6(l.index)
            .await
            .map_err(|e| Failure::new(EXIT_ERROR, format!("dump {}: {e}", l.name)))?,
        None => Programmed6::default(),
    };
    let (missing, stale) = diff6(&want, &actual)
        .into_iter()
        .partition(|o| o.is_replace());
    Ok(Some(V6Status {
        subnet,
        link,
        expected: want.len(),
        programmed: actual.len(),
        peers,
        rejected,
        missing,
        stale,
    }))
}

/// One entry of the `rejected` / `pending` arrays (docs/leases.md).
fn skipped_json(s: &Skipped) -> serde_json::Value {
    json!({
        "key": s.key,
        "subnet": s.subnet.map(|n| n.to_string()),
        "reason": s.reason,
        "detail": s.detail,
    })
}

/// One row of the PEER table.
#[derive(Debug, Clone, PartialEq)]
struct PeerRow {
    node: String,
    subnet: String,
    vtep: String,
    /// `yes`, `no`, `unknown` (no report, the peer not in it yet, or never answered).
    reachable: &'static str,
    rtt_ms: Option<f64>,
    /// Unix time of the last answer, and its age in seconds.
    last_seen: Option<u64>,
    last_seen_ago: Option<u64>,
    lost_in_a_row: Option<u32>,
    path: String,
    /// `direct` or `vxlan`: how this node routes the peer's subnet.
    route: &'static str,
}

impl PeerRow {
    fn cells(&self) -> Vec<String> {
        vec![
            self.node.clone(),
            self.subnet.clone(),
            self.vtep.clone(),
            self.reachable.to_string(),
            match (self.reachable, self.rtt_ms) {
                // The RTT of an unreachable peer is the last one before it went.
                ("yes", Some(ms)) => format!("{ms:.2}ms"),
                _ => "-".into(),
            },
            match self.last_seen_ago {
                Some(s) => format!("{} ago", humantime::format_duration(Duration::from_secs(s))),
                None if self.lost_in_a_row.is_some() => "never".into(),
                None => "-".into(),
            },
            self.path.clone(),
            self.route.to_string(),
        ]
    }
}

/// The rows: every valid peer (the leases decide who is a peer), with the report's view of
/// it where the report has one (matched by subnet). The report is untrusted input: only
/// its verdict, numbers and a known path are taken from it, never the names.
fn peer_rows(
    peers: &[Peer],
    leases: &[Lease],
    report: Option<&NodeReport>,
    now: u64,
) -> Vec<PeerRow> {
    // Maps, not a search per peer: 5,000 peers must not cost 25 million comparisons.
    let names: HashMap<ipnet::Ipv4Net, &str> = leases
        .iter()
        .map(|l| (l.subnet, l.attrs.node_name.as_str()))
        .collect();
    let mut views: HashMap<ipnet::Ipv4Net, &PeerView> = HashMap::new();
    for v in report.iter().flat_map(|r| &r.peers) {
        if let Ok(subnet) = v.subnet.parse() {
            views.entry(subnet).or_insert(v); // the first row of a subnet, as before
        }
    }
    // A report that lists only unreachable peers (a node with more than
    // --health-detail-max peers) says that every peer it leaves out answers.
    let unlisted = match report.map(|r| r.peers_listed) {
        Some(PeersListed::Unreachable) => "yes",
        _ => "unknown",
    };
    let mut rows: Vec<PeerRow> = peers
        .iter()
        .map(|p| {
            let node = names
                .get(&p.subnet)
                .copied()
                .unwrap_or_default()
                .to_string();
            let view = views.get(&p.subnet).copied();
            PeerRow {
                node,
                subnet: p.subnet.to_string(),
                vtep: p.subnet.network().to_string(),
                reachable: view.map_or(unlisted, |v| v.verdict()),
                rtt_ms: view
                    .and_then(|v| v.rtt_ms)
                    .filter(|ms| ms.is_finite() && *ms >= 0.0),
                last_seen: view.and_then(|v| v.last_seen),
                last_seen_ago: view
                    .and_then(|v| v.last_seen)
                    .map(|t| now.saturating_sub(t)),
                lost_in_a_row: view.map(|v| v.lost_in_a_row),
                path: match view {
                    Some(v) if v.path != PATH_VXLAN => "unknown".into(),
                    _ => PATH_VXLAN.into(),
                },
                route: "vxlan",
            }
        })
        .collect();
    rows.sort_by(|a, b| a.node.cmp(&b.node).then(a.subnet.cmp(&b.subnet)));
    rows
}

/// `peer_health` of `-o json` (docs/twilld.md): `peers` is `null` and `reason` says why
/// when there is no report.
fn peer_health_json(
    health: &Result<NodeReport, String>,
    rows: &[PeerRow],
    now: u64,
) -> serde_json::Value {
    match health {
        Err(why) => json!({
            "report_time": null,
            "report_age_seconds": null,
            "reason": why,
            "peers_listed": null,
            "peers_total": null,
            "peers_unreachable": null,
            "peers": null,
        }),
        Ok(r) => json!({
            "report_time": r.time,
            "report_age_seconds": now.saturating_sub(r.time),
            "reason": null,
            "peers_listed": r.peers_listed,
            "peers_total": r.peer_count(),
            "peers_unreachable": r.unreachable_count(),
            "peers": rows.iter().map(|p| json!({
                "node": p.node,
                "subnet": p.subnet,
                "vtep": p.vtep,
                "reachable": p.reachable,
                "rtt_ms": p.rtt_ms,
                "last_seen": p.last_seen,
                "last_seen_seconds_ago": p.last_seen_ago,
                "lost_in_a_row": p.lost_in_a_row,
                "path": p.path,
                "route": p.route,
            })).collect::<Vec<_>>(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::health::{PeerView, parse_report};
    use twill_dataplane::overlay::Mac;
    use twill_ipam::lease::LeaseAttrs;

    fn lease(n: u8, node: &str) -> Lease {
        Lease {
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            ipv6_subnet: None,
            attrs: LeaseAttrs::vxlan(
                node,
                format!("192.0.2.{n}").parse().unwrap(),
                1,
                Mac::derive(node),
            ),
            reserved: false,
            etcd_lease: 1,
            expires: None,
            mod_revision: 1,
            create_revision: i64::from(n),
        }
    }

    fn peer(l: &Lease) -> Peer {
        Peer {
            subnet: l.subnet,
            public_ip: IpAddr::V4(l.attrs.public_ip),
            vtep_mac: Mac::derive(&l.attrs.node_name),
        }
    }

    fn view(subnet: &str, reachable: bool, last_seen: Option<u64>) -> PeerView {
        PeerView {
            subnet: subnet.into(),
            node: "whatever the report says".into(),
            reachable,
            rtt_ms: Some(0.25),
            last_seen,
            lost_in_a_row: if reachable { 0 } else { 3 },
            vtep: None,
            path: PATH_VXLAN.into(),
        }
    }

    /// One row per peer lease, sorted by node; the verdict, RTT and age come from the
    /// report by subnet; a peer the report lacks is `unknown`; names come from the leases.
    #[test]
    fn rows_join_the_leases_and_the_report() {
        let leases = vec![lease(3, "c"), lease(2, "b"), lease(4, "d")];
        let peers: Vec<Peer> = leases.iter().map(peer).collect();
        let mut r = parse_report(
            br#"{"node":"a","subnet":"10.244.1.0/24","public_ip":"192.0.2.1","version":"0.1.0","ready":true,"time":100,"peers":[]}"#,
        )
        .unwrap();
        r.peers = vec![
            view("10.244.2.0/24", false, Some(40)),
            view("10.244.3.0/24", true, Some(98)),
            view("10.244.9.0/24", true, Some(98)), // no longer a peer: no row
        ];
        let rows = peer_rows(&peers, &leases, Some(&r), 100);
        let cells: Vec<Vec<String>> = rows.iter().map(PeerRow::cells).collect();
        assert_eq!(
            cells,
            vec![
                vec![
                    "b",
                    "10.244.2.0/24",
                    "10.244.2.0",
                    "no",
                    "-",
                    "1m ago",
                    "vxlan",
                    "vxlan"
                ],
                vec![
                    "c",
                    "10.244.3.0/24",
                    "10.244.3.0",
                    "yes",
                    "0.25ms",
                    "2s ago",
                    "vxlan",
                    "vxlan"
                ],
                vec![
                    "d",
                    "10.244.4.0/24",
                    "10.244.4.0",
                    "unknown",
                    "-",
                    "-",
                    "vxlan",
                    "vxlan"
                ],
            ]
        );
        // Without a report every peer is unknown, and the JSON says why.
        let rows = peer_rows(&peers, &leases, None, 100);
        assert!(rows.iter().all(|r| r.reachable == "unknown"));
        let j = peer_health_json(&Err("no health report".into()), &rows, 100);
        assert!(j["peers"].is_null());
        assert_eq!(j["reason"], "no health report");
    }

    /// A report cannot smuggle an unknown path or a nonsense RTT into the table.
    #[test]
    fn untrusted_report_values_are_bounded() {
        let leases = vec![lease(2, "b")];
        let peers: Vec<Peer> = leases.iter().map(peer).collect();
        let mut r = parse_report(
            br#"{"node":"a","subnet":null,"public_ip":"x","version":"v","ready":true,"time":5,"peers":[]}"#,
        )
        .unwrap();
        let mut v = view("10.244.2.0/24", true, Some(10));
        v.path = "\u{1b}[31mdirect".into();
        v.rtt_ms = Some(f64::NAN);
        r.peers = vec![v];
        let rows = peer_rows(&peers, &leases, Some(&r), 5);
        assert_eq!(rows[0].path, "unknown");
        assert_eq!(rows[0].rtt_ms, None);
        // A last_seen in the future is 0 s ago, not an overflow.
        assert_eq!(rows[0].last_seen_ago, Some(0));
    }
}
