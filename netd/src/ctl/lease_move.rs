//! `twillctl leases move <node> --yes`: lets a blocked node leave its subnet.
//!
//! A node whose subnet was taken while it was cut off from etcd stays NotReady ("lease
//! blocked") as long as its pods hold addresses of that subnet (docs/leases.md, *Blocked*).
//! This writes `<prefix>/move/<node>` (bound to an etcd lease of [`MOVE_TTL`]): at its next
//! retry the node takes another subnet and deletes the key. Its pods keep addresses that are
//! no longer routed to it: drain the node (delete and recreate its pods).

use clap::Args;
use ipnet::Ipv4Net;
use serde_json::json;
use twill_ipam::store::MOVE_TTL;

use super::leases::parse_subnet;
use super::{Cli, EXIT_REFUSED, EXIT_USAGE, Failure, Output, connect, print_json};

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The node (its NodeName, twilld's --node-name).
    pub node: String,
    /// Only let it leave this subnet (e.g. 10.244.3.0/24); default: whichever it is
    /// blocked on.
    #[arg(long)]
    pub from: Option<String>,
    /// Really let it move: its pods' addresses stop being routed to it.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

pub async fn run(cli: &Cli, args: &MoveArgs) -> Result<(), Failure> {
    if args.node.is_empty() || args.node.contains('/') {
        return Err(Failure::new(
            EXIT_USAGE,
            format!("node {:?}: a node name, not empty, without '/'", args.node),
        ));
    }
    let from: Option<Ipv4Net> = match &args.from {
        Some(s) => Some(parse_subnet(s).ok_or_else(|| {
            Failure::new(
                EXIT_USAGE,
                format!("--from {s:?} is not a subnet (e.g. 10.244.3.0/24)"),
            )
        })?),
        None => None,
    };
    let store = connect(&cli.etcd).await?;
    let (leases, _) = store.list().await?;
    let held: Vec<String> = leases
        .iter()
        .filter(|l| l.attrs.node_name == args.node)
        .map(|l| l.subnet.to_string())
        .collect();
    let what = match from {
        Some(f) => format!("subnet {f}"),
        None => "the subnet it is blocked on".to_string(),
    };
    if !args.yes {
        return Err(Failure::new(
            EXIT_REFUSED,
            format!(
                "not letting node {:?} leave {what} without --yes: its pods keep addresses that are then routed nowhere (or to the node that holds the subnet now); drain the node first",
                args.node
            ),
        ));
    }
    let req = store.request_move(&args.node, from, MOVE_TTL).await?;
    let key = store.move_key(&args.node);
    match cli.output {
        Output::Json => print_json(&json!({
            "node": req.node_name,
            "from": req.from.map(|f| f.to_string()),
            "key": key,
            "expires_in_seconds": MOVE_TTL.as_secs(),
            "holds": held,
        })),
        Output::Table => {
            println!(
                "node {} may leave {what}: it takes another subnet at its next retry (the permission {key} expires in {}).",
                args.node,
                humantime::format_duration(MOVE_TTL)
            );
            println!(
                "Its pods' addresses are no longer routed to it: delete and recreate them (drain the node)."
            );
            if !held.is_empty() {
                eprintln!(
                    "note: node {} holds {} now; a node that is not blocked ignores the permission until it expires",
                    args.node,
                    held.join(", ")
                );
            }
        }
    }
    Ok(())
}
