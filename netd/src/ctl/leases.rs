//! `twillctl leases list|show|release|reserve`.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use twill_ipam::lease::{InvalidLease, Lease, LeaseAttrs, SubnetKey, lease_key, subnet_to_key};

use crate::daemon::reconcile::{Skipped, Validation, peers};

use super::{Cli, EXIT_NOT_FOUND, EXIT_REFUSED, Failure, Output, connect, print_json, print_table};

#[derive(Debug, Subcommand)]
pub enum LeasesCmd {
    /// All leases: subnet, IPv6 subnet, node, public IP, VTEP MAC, expiry or "reserved", and whether
    /// the lease passes twilld's validation (STATUS, REASON). Keys under the prefix that are
    /// not leases at all are listed too, as rejected.
    List,
    /// One lease, by subnet (10.244.3.0/24, 10.244.3.0-24, or its dual-stack key
    /// 10.244.3.0-24&fd00:0:0:3::-64) or by node name.
    Show {
        /// A subnet or a node name.
        what: String,
    },
    /// Delete a lease (its node, if running, takes a subnet again). Needs --yes.
    Release {
        /// The subnet, e.g. 10.244.3.0/24.
        subnet: String,
        /// Really release it.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Reserve a subnet for a node: a lease without TTL that only this node takes.
    Reserve {
        /// The subnet, e.g. 10.244.3.0/24.
        subnet: String,
        /// The node it is reserved for.
        #[arg(long)]
        node: String,
        /// The node's public IP, if known (else filled in when the node takes it).
        #[arg(long)]
        public_ip: Option<Ipv4Addr>,
    },
    /// Let a node that is blocked (its subnet taken while it was cut off, its pods still
    /// holding addresses of it) take another subnet. Needs --yes; drain the node's pods.
    Move(super::lease_move::MoveArgs),
}

/// Parses `10.244.3.0/24`, `10.244.3.0-24` or a dual-stack key `10.244.3.0-24&fd00:0:0:3::-64`
/// (its IPv4 subnet).
pub fn parse_subnet(s: &str) -> Option<Ipv4Net> {
    s.parse::<Ipv4Net>()
        .ok()
        .filter(|n| n.trunc() == *n)
        .or_else(|| lease_key(s).ok().and_then(|k| k.v4()))
}

/// The dual-stack key named by `s`, if it is one.
fn parse_pair_key(s: &str) -> Option<SubnetKey> {
    lease_key(s).ok().filter(|k| k.v6().is_some())
}

fn subnet_arg(s: &str) -> Result<Ipv4Net, Failure> {
    parse_subnet(s).ok_or_else(|| {
        Failure::new(
            super::EXIT_USAGE,
            format!("{s:?} is not a subnet (e.g. 10.244.3.0/24)"),
        )
    })
}

fn expires_in(l: &Lease) -> Option<u64> {
    l.expires.map(|e| {
        e.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .as_secs()
    })
}

/// The JSON of one lease (stable field names, documented in docs/leases.md).
pub fn lease_json(l: &Lease) -> Value {
    json!({
        "subnet": l.subnet.to_string(),
        "ipv6_subnet": l.ipv6_subnet.map(|s| s.to_string()),
        "key": l.key().to_string(),
        "public_ipv6": l.attrs.public_ipv6.addr().map(|a| a.to_string()),
        "node": l.attrs.node_name,
        "public_ip": l.attrs.public_ip.to_string(),
        "backend_type": l.attrs.backend_type,
        "vni": l.attrs.vni(),
        "vtep_mac": l.attrs.vtep_mac(),
        "reserved": l.reserved,
        "expires_in_seconds": expires_in(l),
        "etcd_lease_id": format!("{:x}", l.etcd_lease),
        "mod_revision": l.mod_revision,
        "value": serde_json::to_value(&l.attrs).expect("lease attrs serialize"),
    })
}

fn expiry_cell(l: &Lease) -> String {
    if l.reserved {
        return "reserved".into();
    }
    match expires_in(l) {
        Some(s) => format!("in {}", humantime::format_duration(Duration::from_secs(s))),
        None => "expired".into(),
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn row(l: &Lease) -> Vec<String> {
    vec![
        l.subnet.to_string(),
        l.ipv6_subnet.map_or_else(|| "-".into(), |s| s.to_string()),
        dash(&l.attrs.node_name),
        if l.attrs.public_ip.is_unspecified() {
            "-".into()
        } else {
            l.attrs.public_ip.to_string()
        },
        dash(&l.attrs.vtep_mac().to_string()),
        expiry_cell(l),
    ]
}

const HEADER: [&str; 6] = [
    "SUBNET",
    "IPV6-SUBNET",
    "NODE",
    "PUBLIC-IP",
    "VTEP-MAC",
    "EXPIRES",
];
const LIST_HEADER: [&str; 8] = [
    "SUBNET",
    "IPV6-SUBNET",
    "NODE",
    "PUBLIC-IP",
    "VTEP-MAC",
    "EXPIRES",
    "STATUS",
    "REASON",
];

/// The verdicts by (key name, whether it is a lease): twilld names a lease by its IPv4 key
/// `<net>-<len>` also when it is dual-stack, and an IPv4-only alias of a dual-stack lease is
/// a key-value that is not a lease under that same name.
type Verdicts = std::collections::HashMap<(String, bool), Skipped>;

/// The cluster-wide verdict of twilld's validation (no node's own subnet, public IP or
/// MAC: what every node rejects), by key. Empty when there is no network config.
fn verdicts(
    cfg: Option<&twill_ipam::netconf::NetConfig>,
    leases: &[Lease],
    invalid: &[InvalidLease],
) -> Option<Verdicts> {
    let cfg = cfg?;
    let v = Validation::new(cfg, None, None, None);
    let (_, skipped) = peers(leases, invalid, &v);
    Some(
        skipped
            .into_iter()
            .map(|s| ((s.key.clone(), s.subnet.is_some()), s))
            .collect(),
    )
}

/// `accepted` / `reason` / `detail` of one key (JSON), `null`s without a network config.
fn verdict_json(v: Option<&Verdicts>, key: &str, lease: bool) -> Value {
    match v.map(|m| m.get(&(key.to_string(), lease))) {
        None => json!({"accepted": null, "reason": null, "detail": null}),
        Some(None) => json!({"accepted": true, "reason": null, "detail": null}),
        Some(Some(s)) => json!({
            "accepted": !s.reason.is_rejection(),
            "reason": s.reason,
            "detail": s.detail,
        }),
    }
}

/// STATUS and REASON cells of one key.
fn verdict_cells(v: Option<&Verdicts>, key: &str, lease: bool) -> [String; 2] {
    match v.map(|m| m.get(&(key.to_string(), lease))) {
        None => ["-".into(), "-".into()],
        Some(None) => ["accepted".into(), "-".into()],
        Some(Some(s)) if !s.reason.is_rejection() => ["pending".into(), s.reason.to_string()],
        Some(Some(s)) => ["REJECTED".into(), s.reason.to_string()],
    }
}

pub async fn run(cli: &Cli, cmd: &LeasesCmd) -> Result<(), Failure> {
    if let LeasesCmd::Move(args) = cmd {
        return super::lease_move::run(cli, args).await;
    }
    let store = connect(&cli.etcd).await?;
    match cmd {
        LeasesCmd::List => {
            let (mut leases, invalid, rev) = store.list_all().await?;
            for l in leases.iter_mut().filter(|l| !l.reserved) {
                l.expires = store.expires(l.etcd_lease).await?;
            }
            // Without a readable network config the leases are still listed (STATUS "-").
            let cfg = store.get_config().await.ok().flatten();
            let v = verdicts(cfg.as_ref(), &leases, &invalid);
            match cli.output {
                Output::Json => print_json(&json!({
                    "revision": rev,
                    "leases": leases.iter().map(|l| {
                        let mut j = lease_json(l);
                        if let (Value::Object(o), Value::Object(x)) =
                            (&mut j, verdict_json(v.as_ref(), &subnet_to_key(&l.subnet), true))
                        {
                            o.extend(x);
                        }
                        j
                    }).collect::<Vec<_>>(),
                    // Keys under <prefix>/subnets/ that are not leases (bad key or value).
                    "invalid": invalid.iter().map(|i| {
                        let mut j = json!({"key": i.key, "mod_revision": i.mod_revision});
                        if let (Value::Object(o), Value::Object(x)) =
                            (&mut j, verdict_json(v.as_ref(), &i.key, false))
                        {
                            o.extend(x);
                        }
                        j
                    }).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    let mut rows: Vec<Vec<String>> = leases
                        .iter()
                        .map(|l| {
                            let mut r = row(l);
                            r.extend(verdict_cells(v.as_ref(), &subnet_to_key(&l.subnet), true));
                            r
                        })
                        .collect();
                    for i in &invalid {
                        let mut r = vec![i.key.clone()];
                        r.extend(std::iter::repeat_n("-".to_string(), HEADER.len() - 1));
                        r.extend(verdict_cells(v.as_ref(), &i.key, false));
                        rows.push(r);
                    }
                    print_table(&LIST_HEADER, &rows)
                }
            }
            Ok(())
        }
        LeasesCmd::Show { what } => {
            let (leases, _) = store.list_with_ttl().await?;
            let found: Vec<&Lease> = match (parse_pair_key(what), parse_subnet(what)) {
                (Some(k), _) => leases.iter().filter(|l| l.key() == k).collect(),
                (None, Some(s)) => leases.iter().filter(|l| l.subnet == s).collect(),
                (None, None) => leases
                    .iter()
                    .filter(|l| l.attrs.node_name == *what)
                    .collect(),
            };
            if found.is_empty() {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("no lease for {what:?} under {}", store.subnets_prefix()),
                ));
            }
            match cli.output {
                Output::Json if found.len() == 1 => print_json(&lease_json(found[0])),
                Output::Json => {
                    print_json(&Value::Array(found.iter().map(|l| lease_json(l)).collect()))
                }
                Output::Table => {
                    for (i, l) in found.iter().enumerate() {
                        if i > 0 {
                            println!();
                        }
                        let r = row(l);
                        for (h, v) in HEADER.iter().zip(r) {
                            println!("{:<12} {v}", format!("{h}:"));
                        }
                        println!("{:<12} {}", "KEY:", store.key_of(l));
                        println!("{:<12} {}", "VALUE:", l.attrs.to_json());
                    }
                }
            }
            Ok(())
        }
        LeasesCmd::Release { subnet, yes } => {
            let subnet = subnet_arg(subnet)?;
            let Some(lease) = store.get(&subnet).await? else {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("no lease for {subnet}"),
                ));
            };
            if !yes {
                return Err(Failure::new(
                    EXIT_REFUSED,
                    format!(
                        "not releasing {subnet} (node {:?}) without --yes",
                        lease.attrs.node_name
                    ),
                ));
            }
            if !store.release(subnet).await? {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("no lease for {subnet}"),
                ));
            }
            match cli.output {
                Output::Json => print_json(&json!({
                    "released": subnet.to_string(),
                    "node": lease.attrs.node_name,
                })),
                Output::Table => {
                    println!("released {subnet} (node {})", dash(&lease.attrs.node_name))
                }
            }
            Ok(())
        }
        LeasesCmd::Reserve {
            subnet,
            node,
            public_ip,
        } => {
            let subnet = subnet_arg(subnet)?;
            let cfg = store.require_config().await?;
            let mut attrs = LeaseAttrs::vxlan(
                node,
                public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                cfg.backend.vxlan().vni,
                "",
            );
            attrs.backend_type = cfg.backend.type_name().to_string();
            let lease = store.reserve(subnet, &attrs).await.map_err(|e| match e {
                twill_ipam::store::StoreError::Conflict { .. } => {
                    Failure::new(EXIT_REFUSED, e.to_string())
                }
                e => e.into(),
            })?;
            match cli.output {
                Output::Json => print_json(&lease_json(&lease)),
                Output::Table => println!("reserved {subnet} for node {node}"),
            }
            Ok(())
        }
        LeasesCmd::Move(_) => unreachable!("handled above"),
    }
}
