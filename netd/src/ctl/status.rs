//! `twillctl status`: this node's data plane, expected (from the leases in etcd) against
//! programmed (from netlink): what is missing and what is stale. Run it on the node (in its
//! network namespace). This node's subnet is the lease whose network address is on
//! `twill.<VNI>` (or `--node-name`'s lease when the device is missing).

use clap::Args;
use serde_json::json;
use twill_dataplane::Netlink;
use twill_dataplane::overlay::{Overlay, Programmed, RtnlOverlay};

use super::{Cli, EXIT_ERROR, EXIT_NOT_FOUND, Failure, Output, connect, print_json, print_table};
use crate::daemon::reconcile::{desired, peers, status};

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// This node's name, to find its lease when the VXLAN device is missing (default: the
    /// hostname).
    #[arg(long, env = "TWILLCTL_NODE_NAME")]
    pub node_name: Option<String>,
}

pub async fn run(cli: &Cli, args: &StatusArgs) -> Result<(), Failure> {
    let store = connect(&cli.etcd).await?;
    let cfg = store.require_config().await?;
    let vni = cfg.backend.vni;
    let (leases, revision) = store.list().await?;
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
    let (peer_list, skipped) = peers(&leases, Some(own.subnet), vni);
    let want = desired(&peer_list);
    let actual = match &link {
        Some(l) => ov
            .dump(l.index)
            .await
            .map_err(|e| Failure::new(EXIT_ERROR, format!("dump twill.{vni}: {e}")))?,
        None => Programmed::default(),
    };
    let report = status(&want, &actual);
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
                "skipped": skipped.iter().map(|s| json!({
                    "subnet": s.subnet.to_string(), "reason": s.reason,
                })).collect::<Vec<_>>(),
                "expected": report.expected,
                "programmed": report.programmed,
                "missing": report.missing,
                "stale": report.stale,
                "in_sync": report.missing.is_empty() && report.stale.is_empty() && link.is_some(),
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
            println!(
                "peers {}  expected entries {}  programmed {}  missing {}  stale {}",
                peer_list.len(),
                report.expected,
                report.programmed,
                report.missing.len(),
                report.stale.len()
            );
            for s in &skipped {
                println!("skipped lease {}: {}", s.subnet, s.reason);
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
