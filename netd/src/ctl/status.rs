//! `twillctl status`: this node's data plane, expected (from the leases in etcd) against
//! programmed (from netlink): what is missing and what is stale. Run it on the node (in its
//! network namespace). This node's subnet is the lease whose network address is on
//! `twill.<VNI>` (or `--node-name`'s lease when the device is missing).

use std::net::IpAddr;

use clap::Args;
use serde_json::json;
use twill_dataplane::Netlink;
use twill_dataplane::overlay::{Overlay, Programmed, RtnlOverlay};

use super::{Cli, EXIT_ERROR, EXIT_NOT_FOUND, Failure, Output, connect, print_json, print_table};
use crate::daemon::reconcile::{Skipped, Validation, desired, peers, status};

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
    let vni = cfg.backend.vni;
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
        _ => own.attrs.vtep_mac().parse().ok(),
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
    let want = desired(&peer_list);
    let actual = match &link {
        Some(l) => ov
            .dump(l.index)
            .await
            .map_err(|e| Failure::new(EXIT_ERROR, format!("dump twill.{vni}: {e}")))?,
        None => Programmed::default(),
    };
    let report = status(&want, &actual);
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
                    "vtep_mac": p.vtep_mac.to_string(),
                })).collect::<Vec<_>>(),
                "rejected": rejected.iter().map(|s| skipped_json(s)).collect::<Vec<_>>(),
                "pending": pending.iter().map(|s| skipped_json(s)).collect::<Vec<_>>(),
                "expected": report.expected,
                "programmed": report.programmed,
                "missing": report.missing,
                "stale": report.stale,
                "in_sync": report.missing.is_empty() && report.stale.is_empty() && link.is_some(),
                "twilld": twilld.as_ref().map(|(ready, reason)| json!({"ready": ready, "reason": reason})),
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

/// One entry of the `rejected` / `pending` arrays (docs/leases.md).
fn skipped_json(s: &Skipped) -> serde_json::Value {
    json!({
        "key": s.key,
        "subnet": s.subnet.map(|n| n.to_string()),
        "reason": s.reason,
        "detail": s.detail,
    })
}
