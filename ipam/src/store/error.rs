//! [`StoreError`]: the errors of the lease store and its backends.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::netconf::{ConfigError, NetConfig};

/// Errors of the lease store. Each names the operation and the key or value involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid etcd options: {0}")]
    Options(String),
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd {op} {key}: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        source: etcd_client::Error,
    },
    #[error("etcd {op} {key}: no answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    #[error("the network config at {key} is invalid: {source}")]
    BadConfig { key: String, source: ConfigError },
    #[error("no network config at {key} (write one with `twillctl network set`)")]
    NoConfig { key: String },
    #[error(
        "network full: all {count} subnets /{subnet_len} of {network} between {min} and {max} are leased"
    )]
    NetworkFull {
        network: Ipv4Net,
        subnet_len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
        count: u64,
    },
    #[error(
        "IPv6 network full: all {count} IPv6 subnets /{subnet_len} of {network} between {min} and {max} are leased"
    )]
    Ipv6NetworkFull {
        network: String,
        subnet_len: u8,
        min: std::net::Ipv6Addr,
        max: std::net::Ipv6Addr,
        count: u128,
    },
    #[error("refused: {}", reasons.join("; "))]
    Refused {
        reasons: Vec<String>,
        stranded: Vec<Ipv4Net>,
    },
    #[error("subnet {subnet} {reason}")]
    InvalidSubnet { subnet: Ipv4Net, reason: String },
    #[error("lease attributes invalid: {0}")]
    InvalidAttrs(String),
    #[error("{key} is held by node {holder:?}")]
    Conflict { key: String, holder: String },
    /// [`super::LeaseStore::acquire_only`]: the one subnet this node may take is not free.
    #[error("subnet {subnet} {}", held_by(holder, holder_ip, *grace))]
    SubnetHeld {
        subnet: Ipv4Net,
        /// The node holding it (its `NodeName`; empty: a lease without one, e.g. flanneld's).
        holder: String,
        /// That node's PublicIP, when the key is a lease (not a grace key).
        holder_ip: Option<Ipv4Addr>,
        /// Held by the other node's grace key (its lease expired a moment ago).
        grace: bool,
    },
    #[error("gave up on {what} after {attempts} attempts: every attempt collided")]
    Contention { what: &'static str, attempts: u32 },
    /// Another node (another PublicIP) holds a live lease, or a reservation it has taken,
    /// under this node's name: taking it over would make the two nodes take the key from each
    /// other forever (cloned VMs, hostnames). Allowed only when the PublicIP matches or the
    /// other lease has expired.
    #[error(
        "node name {node:?} is already used by the node at {other_ip}: it holds subnet {subnet}{} (this node is {our_ip}); give this node a unique --node-name, {fix}",
        if *reserved { " (a reservation)" } else { " with a live lease" }
    )]
    DuplicateName {
        node: String,
        subnet: Ipv4Net,
        other_ip: Ipv4Addr,
        our_ip: Ipv4Addr,
        reserved: bool,
        fix: String,
    },
}

/// "is held by node "b" (192.168.0.2)" / "is in the grace period of node "b"".
fn held_by(holder: &str, ip: &Option<Ipv4Addr>, grace: bool) -> String {
    let who = if holder.is_empty() {
        "a node without NodeName".to_string()
    } else {
        format!("node {holder:?}")
    };
    match (grace, ip) {
        (true, _) => format!("is in the grace period of {who} (its lease expired just now)"),
        (false, Some(ip)) if !ip.is_unspecified() => format!("is held by {who} ({ip})"),
        (false, _) => format!("is held by {who}"),
    }
}

impl StoreError {
    /// A node name held by another node: see [`StoreError::DuplicateName`].
    pub(super) fn duplicate_name(
        node: &str,
        subnet: Ipv4Net,
        other: Ipv4Addr,
        ours: Ipv4Addr,
        reserved: bool,
    ) -> Self {
        let fix = if reserved {
            format!(
                "or, if {other} is gone, reserve the subnet again (`twillctl leases reserve {subnet} --node {node}`) so that the next node of that name takes it"
            )
        } else {
            format!(
                "or, if {other} is gone, wait for its lease to expire or release it (`twillctl leases release {subnet}`)"
            )
        };
        StoreError::DuplicateName {
            node: node.to_string(),
            subnet,
            other_ip: other,
            our_ip: ours,
            reserved,
            fix,
        }
    }

    /// `subnet` is not one `cfg` hands out; `hint` follows the reason (may be empty).
    pub(super) fn outside_config(cfg: &NetConfig, subnet: Ipv4Net, hint: &str) -> Self {
        StoreError::InvalidSubnet {
            subnet,
            reason: format!(
                "is not a /{} between SubnetMin {} and SubnetMax {} of Network {}{hint}",
                cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.network
            ),
        }
    }

    /// True for errors that a retry may cure (etcd unreachable, timeouts, collisions).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable { .. }
                | StoreError::Etcd { .. }
                | StoreError::Timeout { .. }
                | StoreError::Contention { .. }
        )
    }
}
