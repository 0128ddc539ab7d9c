//! The VXLAN overlay: one `twill.<VNI>` device per node and, per peer node, a neighbour, an
//! FDB entry and an onlink route. [`Overlay`] is the small set of domain verbs that twilld
//! uses; [`RtnlOverlay`] implements it with rtnetlink (its batches through `batch`), and
//! `FakeOverlay` (only with `cfg(test)` or the `fakes` feature) records calls for unit tests.
//! [`Monitor`] turns the kernel's link/neighbour/route notifications into events;
//! [`underlay`] finds the device and address the VXLAN traffic leaves by; [`sysctl`] sets
//! the node's forwarding. Kernel messages are read by [`crate::netlink::parse`]; this module
//! only decides which of them are twill's (`rtnl`: `neigh_on`, `fdb_on`, `route_on`,
//! `direct_on`).
//!
//! A peer on the same L2 segment (`Backend.DirectRouting`) gets a [`DirectRoute`] on the
//! underlay device instead of the three VXLAN entries; [`Overlay::lookup_route`] asks the
//! kernel how it reaches the peer's public IP, and [`route_mode`] decides from the answer.

mod batch;
#[cfg(any(test, feature = "fakes"))]
mod fake;
mod monitor;
mod rtnl;
pub mod sysctl;
pub mod underlay;
pub mod v6;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

#[cfg(any(test, feature = "fakes"))]
pub use fake::{FakeCall, FakeOverlay};
pub use monitor::{Monitor, MonitorEvent};
pub use rtnl::RtnlOverlay;

use crate::Result;

/// The VXLAN UDP port of the Linux kernel (and Flannel), not IANA's 4789.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// VXLAN over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// VXLAN over IPv6: outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

/// The route protocol number (`ip route ... proto 116`) that marks twill's routes: a dump
/// counts only routes with it as twill's, and twilld never replaces or deletes a route
/// without it. Not in iproute2's rt_protos nor used by bird, FRR/zebra, babel, keepalived,
/// dhcpcd, networkd (which use 0-18, 42, 99, 186-192).
pub const TWILL_ROUTE_PROTOCOL: u8 = 0x74;

/// The device name of a VNI: `twill.<VNI>`.
pub fn vxlan_name(vni: u32) -> String {
    format!("twill.{vni}")
}

/// An Ethernet address: the one MAC type of twill, defined in twill-ipam.
pub use twill_ipam::mac::Mac;

/// What the VXLAN device must look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub vni: u32,
    /// UDP destination port (8472).
    pub port: u16,
    /// Index of the underlay device (`--iface`).
    pub underlay_index: u32,
    /// Source address of the outer packets: the node's public IP.
    pub local: IpAddr,
    pub mtu: u32,
    /// The VTEP MAC that peers put into their neighbour and FDB entries for this node.
    pub mac: Mac,
    /// The lease's network address, set on the device as /32.
    pub address: Ipv4Addr,
}

impl VxlanSpec {
    pub fn name(&self) -> String {
        vxlan_name(self.vni)
    }
}

/// The VXLAN device as the kernel has it. The default (index 0) stands for "none yet".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanLink {
    pub index: u32,
    pub name: String,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub underlay_index: Option<u32>,
    pub local: Option<IpAddr>,
    pub learning: Option<bool>,
    pub mtu: u32,
    pub mac: Mac,
    pub up: bool,
    pub addresses: Vec<Ipv4Net>,
}

impl VxlanLink {
    /// What, if anything, differs from `spec` in a way that needs the device recreated
    /// (the kernel refuses to change VNI, port, local, underlay after creation, and raising
    /// the MTU later is EINVAL): `None` when it matches.
    pub fn mismatch(&self, spec: &VxlanSpec) -> Option<String> {
        let mut why = Vec::new();
        if self.vni != Some(spec.vni) {
            why.push(format!("vni {:?} != {}", self.vni, spec.vni));
        }
        if self.port != Some(spec.port) {
            why.push(format!("port {:?} != {}", self.port, spec.port));
        }
        if self.underlay_index != Some(spec.underlay_index) {
            why.push(format!(
                "underlay index {:?} != {}",
                self.underlay_index, spec.underlay_index
            ));
        }
        if self.local != Some(spec.local) {
            why.push(format!("local {:?} != {}", self.local, spec.local));
        }
        if self.learning != Some(false) {
            why.push("learning is on".to_string());
        }
        if self.mtu != spec.mtu {
            why.push(format!("mtu {} != {}", self.mtu, spec.mtu));
        }
        if self.mac != spec.mac {
            why.push(format!("mac {} != {}", self.mac, spec.mac));
        }
        if why.is_empty() {
            None
        } else {
            Some(why.join(", "))
        }
    }
}

/// What [`Overlay::ensure_vxlan`] had to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnsureOutcome {
    /// The device was there and right (address and up state may have been fixed).
    Adopted,
    /// No device: created.
    Created,
    /// A device with the name but the wrong settings: deleted and created again (every
    /// neighbour, FDB entry and route on it is gone).
    Recreated { reason: String },
}

/// `<ip> lladdr <mac> permanent` on the VXLAN device: the peer's VTEP for its net address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// `<mac> dst <ip> self permanent` on the VXLAN device: where to send frames for a VTEP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: IpAddr,
}

/// `<dst> via <via> dev twill.<VNI> onlink` in the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
}

/// `<dst> via <via> dev <underlay>` in the main table, without onlink (the kernel checks
/// that the gateway is on the device) and without encapsulation: the route of a peer on the
/// same L2 segment (`Backend.DirectRouting`). `via` is the peer's public IP, `dev` the index
/// of the underlay device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct DirectRoute {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: u32,
}

/// How a peer's subnet is routed: through `twill.<VNI>` or directly on the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    Vxlan,
    Direct,
}

impl RouteMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteMode::Vxlan => "vxlan",
            RouteMode::Direct => "direct",
        }
    }
}

impl fmt::Display for RouteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kernel's answer to a route lookup (RTM_GETROUTE) for one address: the path a packet
/// to it takes now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutePath {
    /// The output device.
    pub oif: Option<u32>,
    /// The next hop; `None`: the address is on the link (no gateway).
    pub gateway: Option<IpAddr>,
    /// RTN_UNICAST (not local, blackhole, unreachable, ...).
    pub unicast: bool,
}

/// Flannel's rule for `DirectRouting`: a peer is routed directly iff the kernel reaches its
/// public IP without a gateway, by a unicast route, out of the underlay device (index
/// `underlay`). No answer (unreachable, lookup failed) keeps VXLAN.
pub fn route_mode(path: Option<&RoutePath>, underlay: u32) -> RouteMode {
    match path {
        Some(p) if p.unicast && p.gateway.is_none() && p.oif == Some(underlay) => RouteMode::Direct,
        _ => RouteMode::Vxlan,
    }
}

/// Everything programmed on the VXLAN device (only the kinds of entries twill manages:
/// permanent neighbours, FDB entries with a destination, main-table routes of twill's own
/// protocol [`TWILL_ROUTE_PROTOCOL`]), and twill's direct routes on other devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Programmed {
    pub neighs: BTreeSet<Neigh>,
    pub fdbs: BTreeSet<Fdb>,
    pub routes: BTreeSet<Route>,
    /// Routes of twill's protocol that are not on the VXLAN device: the direct peers'.
    /// A destination is in `routes` or here, never in both (one route per dst).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub direct: BTreeSet<DirectRoute>,
    /// Destinations of main-table routes that are not twill's (other protocol, other
    /// device): a peer route for one of these is a conflict, never written. Not counted
    /// in [`Programmed::len`].
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub foreign_routes: BTreeSet<Ipv4Net>,
}

impl Programmed {
    /// The neighbours of `ip` (one, unless the kernel was changed by hand).
    pub fn neighs_of(&self, ip: Ipv4Addr) -> impl Iterator<Item = &Neigh> {
        let lo = Neigh {
            ip,
            mac: Mac([0; 6]),
        };
        let hi = Neigh {
            ip,
            mac: Mac([0xff; 6]),
        };
        self.neighs.range(lo..=hi)
    }

    /// The FDB remotes of `mac`.
    pub fn fdbs_of(&self, mac: Mac) -> impl Iterator<Item = &Fdb> {
        let lo = Fdb {
            mac,
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let hi = Fdb {
            mac,
            dst: IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX)),
        };
        self.fdbs.range(lo..=hi)
    }

    /// The routes to `dst`.
    pub fn routes_to(&self, dst: Ipv4Net) -> impl Iterator<Item = &Route> {
        let lo = Route {
            dst,
            via: Ipv4Addr::UNSPECIFIED,
        };
        let hi = Route {
            dst,
            via: Ipv4Addr::BROADCAST,
        };
        self.routes.range(lo..=hi)
    }

    /// The direct routes to `dst`.
    pub fn direct_to(&self, dst: Ipv4Net) -> impl Iterator<Item = &DirectRoute> {
        let lo = DirectRoute {
            dst,
            via: Ipv4Addr::UNSPECIFIED,
            dev: 0,
        };
        let hi = DirectRoute {
            dst,
            via: Ipv4Addr::BROADCAST,
            dev: u32::MAX,
        };
        self.direct.range(lo..=hi)
    }

    /// Only twill's own entries.
    pub fn owned(&self) -> Programmed {
        Programmed {
            foreign_routes: BTreeSet::new(),
            ..self.clone()
        }
    }

    pub fn len(&self) -> usize {
        self.neighs.len() + self.fdbs.len() + self.routes.len() + self.direct.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The overlay's domain verbs. Every write is idempotent (replace semantics); deleting
/// something that is already gone is not an error.
pub trait Overlay: Send + Sync + 'static {
    /// Finds the VXLAN device of `vni`, if any.
    fn get_vxlan(&self, vni: u32) -> impl Future<Output = Result<Option<VxlanLink>>> + Send;
    /// Makes the device match `spec`: adopt it when right, create it when missing, delete
    /// and recreate it when a setting differs; then the /32 address and up.
    fn ensure_vxlan(
        &self,
        spec: &VxlanSpec,
    ) -> impl Future<Output = Result<(VxlanLink, EnsureOutcome)>> + Send;
    /// The entries programmed on the device with index `link`.
    fn dump(&self, link: u32) -> impl Future<Output = Result<Programmed>> + Send;
    fn replace_neigh(&self, link: u32, n: &Neigh) -> impl Future<Output = Result<()>> + Send;
    fn delete_neigh(&self, link: u32, n: &Neigh) -> impl Future<Output = Result<()>> + Send;
    fn replace_fdb(&self, link: u32, f: &Fdb) -> impl Future<Output = Result<()>> + Send;
    fn delete_fdb(&self, link: u32, f: &Fdb) -> impl Future<Output = Result<()>> + Send;
    fn replace_route(&self, link: u32, r: &Route) -> impl Future<Output = Result<()>> + Send;
    fn delete_route(&self, link: u32, r: &Route) -> impl Future<Output = Result<()>> + Send;
    /// Writes a direct route (on `r.dev`), replacing twill's route to `r.dst` whatever its
    /// device (one replace: a peer that switches between VXLAN and direct never loses its
    /// route); a route to `r.dst` that is not twill's is a conflict, left alone.
    fn replace_direct(&self, r: &DirectRoute) -> impl Future<Output = Result<()>> + Send;
    fn delete_direct(&self, r: &DirectRoute) -> impl Future<Output = Result<()>> + Send;
    /// How the kernel routes a packet to `ip` now (RTM_GETROUTE); `None`: it has no route.
    fn lookup_route(&self, ip: Ipv4Addr) -> impl Future<Output = Result<Option<RoutePath>>> + Send;
    /// Deletes the address `addr` (address and prefix length both equal) from every link in
    /// the namespace that has it; returns the indices of those links (none: nothing to do).
    fn remove_address(&self, addr: Ipv4Net) -> impl Future<Output = Result<Vec<u32>>> + Send;
}

/// One change to the programmed entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    ReplaceFdb(Fdb),
    ReplaceNeigh(Neigh),
    ReplaceRoute(Route),
    DeleteRoute(Route),
    ReplaceDirect(DirectRoute),
    DeleteDirect(DirectRoute),
    DeleteNeigh(Neigh),
    DeleteFdb(Fdb),
}

impl Op {
    /// Applies the op through `o` on the device `link`.
    pub async fn apply<O: Overlay>(&self, o: &O, link: u32) -> Result<()> {
        match self {
            Op::ReplaceFdb(f) => o.replace_fdb(link, f).await,
            Op::ReplaceNeigh(n) => o.replace_neigh(link, n).await,
            Op::ReplaceRoute(r) => o.replace_route(link, r).await,
            Op::DeleteRoute(r) => o.delete_route(link, r).await,
            Op::ReplaceDirect(r) => o.replace_direct(r).await,
            Op::DeleteDirect(r) => o.delete_direct(r).await,
            Op::DeleteNeigh(n) => o.delete_neigh(link, n).await,
            Op::DeleteFdb(f) => o.delete_fdb(link, f).await,
        }
    }

    /// Updates `p` as if the op had been applied.
    pub fn apply_to(&self, p: &mut Programmed) {
        match self {
            // One entry per key: the others with the same key go (a range of the ordered
            // set, not a walk over every entry).
            Op::ReplaceFdb(f) => {
                let same = p.fdbs_of(f.mac).copied().collect();
                replace_key(&mut p.fdbs, same, *f);
            }
            Op::ReplaceNeigh(n) => {
                let same = p.neighs_of(n.ip).copied().collect();
                replace_key(&mut p.neighs, same, *n);
            }
            // One route per dst, whichever kind: a replace takes the other kind's place too
            // (as the kernel's replace does).
            Op::ReplaceRoute(r) => {
                let same = p.routes_to(r.dst).copied().collect();
                replace_key(&mut p.routes, same, *r);
                let other: Vec<DirectRoute> = p.direct_to(r.dst).copied().collect();
                for o in other {
                    p.direct.remove(&o);
                }
            }
            Op::DeleteRoute(r) => {
                p.routes.remove(r);
            }
            Op::ReplaceDirect(r) => {
                let same = p.direct_to(r.dst).copied().collect();
                replace_key(&mut p.direct, same, *r);
                let other: Vec<Route> = p.routes_to(r.dst).copied().collect();
                for o in other {
                    p.routes.remove(&o);
                }
            }
            Op::DeleteDirect(r) => {
                p.direct.remove(r);
            }
            Op::DeleteNeigh(n) => {
                p.neighs.remove(n);
            }
            Op::DeleteFdb(f) => {
                p.fdbs.remove(f);
            }
        }
    }
}

/// Puts `x` into `set` in place of `same`, the entries with its key.
fn replace_key<T: Ord>(set: &mut BTreeSet<T>, same: Vec<T>, x: T) {
    for old in same {
        set.remove(&old);
    }
    set.insert(x);
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::ReplaceFdb(x) => write!(f, "replace fdb {} dst {}", x.mac, x.dst),
            Op::ReplaceNeigh(x) => write!(f, "replace neigh {} lladdr {}", x.ip, x.mac),
            Op::ReplaceRoute(x) => write!(f, "replace route {} via {}", x.dst, x.via),
            Op::DeleteRoute(x) => write!(f, "delete route {} via {}", x.dst, x.via),
            Op::ReplaceDirect(x) => write!(
                f,
                "replace direct route {} via {} dev index {}",
                x.dst, x.via, x.dev
            ),
            Op::DeleteDirect(x) => write!(
                f,
                "delete direct route {} via {} dev index {}",
                x.dst, x.via, x.dev
            ),
            Op::DeleteNeigh(x) => write!(f, "delete neigh {} lladdr {}", x.ip, x.mac),
            Op::DeleteFdb(x) => write!(f, "delete fdb {} dst {}", x.mac, x.dst),
        }
    }
}

/// The order in which ops are applied: adds before deletes of the same kind would not
/// conflict, but the stages keep a route from ever pointing at a neighbour that is not there.
pub(crate) const STAGES: [fn(&Op) -> bool; 3] = [
    |op| matches!(op, Op::ReplaceFdb(_) | Op::ReplaceNeigh(_)),
    |op| {
        matches!(
            op,
            Op::ReplaceRoute(_) | Op::DeleteRoute(_) | Op::ReplaceDirect(_) | Op::DeleteDirect(_)
        )
    },
    |op| matches!(op, Op::DeleteNeigh(_) | Op::DeleteFdb(_)),
];

/// Applies `ops` with up to `parallel` requests in flight (netlink answers each request
/// on its own sequence number, so pipelining is safe); returns the ops that failed.
pub async fn apply_ops<O: Overlay>(
    o: &O,
    link: u32,
    ops: &[Op],
    parallel: usize,
) -> Vec<(Op, crate::Error)> {
    use futures::stream::{self, StreamExt};
    let mut failed = Vec::new();
    for stage in STAGES {
        let mut results = stream::iter(ops.iter().filter(|op| stage(op)))
            .map(|op| async move { (*op, op.apply(o, link).await) })
            .buffer_unordered(parallel.max(1));
        while let Some((op, r)) = results.next().await {
            if let Err(e) = r {
                failed.push((op, e));
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_apply_to_keeps_one_entry_per_key() {
        let mut p = Programmed::default();
        let ip = Ipv4Addr::new(10, 244, 2, 0);
        Op::ReplaceNeigh(Neigh {
            ip,
            mac: Mac::derive("a"),
        })
        .apply_to(&mut p);
        Op::ReplaceNeigh(Neigh {
            ip,
            mac: Mac::derive("b"),
        })
        .apply_to(&mut p);
        assert_eq!(p.neighs.len(), 1);
        assert_eq!(p.neighs.iter().next().unwrap().mac, Mac::derive("b"));
    }

    /// One route per destination across both kinds: a direct replace takes the VXLAN
    /// route's place and the other way round, as the kernel's replace does.
    #[test]
    fn op_apply_to_keeps_one_route_per_dst_across_kinds() {
        let dst: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let vx = Route {
            dst,
            via: dst.network(),
        };
        let direct = DirectRoute {
            dst,
            via: Ipv4Addr::new(192, 168, 0, 2),
            dev: 7,
        };
        let mut p = Programmed::default();
        Op::ReplaceRoute(vx).apply_to(&mut p);
        Op::ReplaceDirect(direct).apply_to(&mut p);
        assert!(p.routes.is_empty());
        assert_eq!(p.direct.iter().collect::<Vec<_>>(), [&direct]);
        assert_eq!(p.len(), 1);
        let moved = DirectRoute { dev: 8, ..direct };
        Op::ReplaceDirect(moved).apply_to(&mut p);
        assert_eq!(p.direct_to(dst).collect::<Vec<_>>(), [&moved]);
        Op::ReplaceRoute(vx).apply_to(&mut p);
        assert!(p.direct.is_empty());
        assert_eq!(p.routes_to(dst).collect::<Vec<_>>(), [&vx]);
    }

    /// Flannel's rule: direct only without a gateway, out of the underlay, by a unicast
    /// route; anything else (or no answer) keeps VXLAN.
    #[test]
    fn route_mode_is_direct_only_on_link_out_of_the_underlay() {
        let on_link = RoutePath {
            oif: Some(3),
            gateway: None,
            unicast: true,
        };
        assert_eq!(route_mode(Some(&on_link), 3), RouteMode::Direct);
        let routed = RoutePath {
            gateway: Some(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))),
            ..on_link
        };
        assert_eq!(route_mode(Some(&routed), 3), RouteMode::Vxlan);
        // On link, but out of another device (a second NIC, a tunnel).
        assert_eq!(route_mode(Some(&on_link), 4), RouteMode::Vxlan);
        let odd = RoutePath {
            unicast: false,
            ..on_link
        };
        assert_eq!(route_mode(Some(&odd), 3), RouteMode::Vxlan);
        let no_dev = RoutePath {
            oif: None,
            ..on_link
        };
        assert_eq!(route_mode(Some(&no_dev), 3), RouteMode::Vxlan);
        assert_eq!(route_mode(None, 3), RouteMode::Vxlan);
    }
}
