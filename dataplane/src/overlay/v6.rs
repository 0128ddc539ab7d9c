//! The IPv6 side of a dual-stack node (`EnableIPv6`): a second VXLAN device
//! `twill-v6.<VNI>` (Flannel's `flannel-v6.<VNI>`) with `local <PublicIPv6>`, and per peer
//! with a valid IPv6 side a neighbour, an FDB entry and an onlink route, as on the IPv4
//! device. These are the IPv6 twins of [`super::Neigh`], [`super::Route`] and
//! [`super::Programmed`]; the FDB entry is the IPv4 one's type ([`Fdb`], its `dst` is an
//! `IpAddr`). The verbs are inherent methods of [`super::RtnlOverlay`] (`ensure_vxlan6`,
//! `dump6`, `apply_ops6`), kept out of the [`super::Overlay`] trait so that the IPv4 fakes
//! and tests stay as they are. Ownership is the IPv4 device's: permanent neighbours and
//! FDB entries with a destination on `twill-v6.<VNI>`, routes of protocol
//! [`super::TWILL_ROUTE_PROTOCOL`]; a route of someone else to a peer's IPv6 subnet is a
//! conflict, left alone.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use super::{Fdb, Mac};

/// The device name of the IPv6 VXLAN device of a VNI: `twill-v6.<VNI>`. Linux names are at
/// most 15 bytes: VNIs up to 999999 fit (as with Flannel's `flannel-v6.<VNI>`).
pub fn vxlan6_name(vni: u32) -> String {
    format!("twill-v6.{vni}")
}

/// What the IPv6 VXLAN device must look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vxlan6Spec {
    pub vni: u32,
    pub port: u16,
    /// Index of the underlay device (the IPv4 device's).
    pub underlay_index: u32,
    /// Source address of the outer packets: the node's `PublicIPv6`.
    pub local: Ipv6Addr,
    pub mtu: u32,
    /// The VTEP MAC that peers put into their IPv6 neighbour and FDB entries for this node.
    pub mac: Mac,
    /// The first address of the node's IPv6 subnet, set on the device as /128.
    pub address: Ipv6Addr,
}

impl Vxlan6Spec {
    pub fn name(&self) -> String {
        vxlan6_name(self.vni)
    }
}

/// `<ip> lladdr <mac> permanent` on `twill-v6.<VNI>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Neigh6 {
    pub ip: Ipv6Addr,
    pub mac: Mac,
}

/// `<dst> via <via> dev twill-v6.<VNI> onlink proto 116`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Route6 {
    pub dst: Ipv6Net,
    pub via: Ipv6Addr,
}

/// Everything twill manages on the IPv6 device (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Programmed6 {
    pub neighs: BTreeSet<Neigh6>,
    pub fdbs: BTreeSet<Fdb>,
    pub routes: BTreeSet<Route6>,
    /// Destinations of IPv6 main-table routes that are not twill's and not on the device:
    /// a peer route to one of these is a conflict, never written. Not in [`Programmed6::len`].
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub foreign_routes: BTreeSet<Ipv6Net>,
}

impl Programmed6 {
    pub fn len(&self) -> usize {
        self.neighs.len() + self.fdbs.len() + self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One change to the IPv6 device's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op6 {
    ReplaceFdb(Fdb),
    ReplaceNeigh(Neigh6),
    ReplaceRoute(Route6),
    DeleteRoute(Route6),
    DeleteNeigh(Neigh6),
    DeleteFdb(Fdb),
}

impl Op6 {
    /// Whether the op adds or changes an entry (else it removes one).
    pub fn is_replace(&self) -> bool {
        matches!(
            self,
            Op6::ReplaceFdb(_) | Op6::ReplaceNeigh(_) | Op6::ReplaceRoute(_)
        )
    }

    /// The apply stage (as the IPv4 ops': neighbours and FDB, then routes, then deletes of
    /// neighbours and FDB, so a route never points at a neighbour that is not there).
    pub fn stage(&self) -> u8 {
        match self {
            Op6::ReplaceFdb(_) | Op6::ReplaceNeigh(_) => 0,
            Op6::ReplaceRoute(_) | Op6::DeleteRoute(_) => 1,
            Op6::DeleteNeigh(_) | Op6::DeleteFdb(_) => 2,
        }
    }
}

impl fmt::Display for Op6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op6::ReplaceFdb(x) => write!(f, "replace fdb {} dst {}", x.mac, x.dst),
            Op6::ReplaceNeigh(x) => write!(f, "replace neigh {} lladdr {}", x.ip, x.mac),
            Op6::ReplaceRoute(x) => write!(f, "replace route {} via {}", x.dst, x.via),
            Op6::DeleteRoute(x) => write!(f, "delete route {} via {}", x.dst, x.via),
            Op6::DeleteNeigh(x) => write!(f, "delete neigh {} lladdr {}", x.ip, x.mac),
            Op6::DeleteFdb(x) => write!(f, "delete fdb {} dst {}", x.mac, x.dst),
        }
    }
}

/// The ops that turn `actual` into `desired` (the IPv4 [`diff`](super) rules: one
/// neighbour per IP, exactly the desired FDB remotes, one route per destination), sorted.
pub fn diff6(desired: &Programmed6, actual: &Programmed6) -> Vec<Op6> {
    let mut ops = Vec::new();
    let want_ips: HashSet<_> = desired.neighs.iter().map(|n| n.ip).collect();
    ops.extend(
        desired
            .neighs
            .iter()
            .filter(|n| !actual.neighs.contains(n))
            .map(|n| Op6::ReplaceNeigh(*n)),
    );
    ops.extend(
        actual
            .neighs
            .iter()
            .filter(|n| !want_ips.contains(&n.ip))
            .map(|n| Op6::DeleteNeigh(*n)),
    );
    ops.extend(
        desired
            .fdbs
            .iter()
            .filter(|f| !actual.fdbs.contains(f))
            .map(|f| Op6::ReplaceFdb(*f)),
    );
    ops.extend(
        actual
            .fdbs
            .iter()
            .filter(|f| !desired.fdbs.contains(f))
            .map(|f| Op6::DeleteFdb(*f)),
    );
    let want_dsts: HashSet<_> = desired.routes.iter().map(|r| r.dst).collect();
    ops.extend(
        desired
            .routes
            .iter()
            .filter(|r| !actual.routes.contains(r) && !actual.foreign_routes.contains(&r.dst))
            .map(|r| Op6::ReplaceRoute(*r)),
    );
    ops.extend(
        actual
            .routes
            .iter()
            .filter(|r| !want_dsts.contains(&r.dst))
            .map(|r| Op6::DeleteRoute(*r)),
    );
    ops.sort();
    ops
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn peer(n: u16) -> (Neigh6, Fdb, Route6) {
        let dst: Ipv6Net = format!("fd00:10:0:{n:x}::/64").parse().unwrap();
        let mac = Mac::derive(&format!("n{n}"));
        (
            Neigh6 {
                ip: dst.network(),
                mac,
            },
            Fdb {
                mac,
                dst: IpAddr::V6(format!("fd99::{n:x}").parse().unwrap()),
            },
            Route6 {
                dst,
                via: dst.network(),
            },
        )
    }

    fn want(ns: &[u16]) -> Programmed6 {
        let mut p = Programmed6::default();
        for n in ns {
            let (a, b, c) = peer(*n);
            p.neighs.insert(a);
            p.fdbs.insert(b);
            p.routes.insert(c);
        }
        p
    }

    /// The diff adds what is missing, deletes what no peer asks for, fixes a wrong MAC with
    /// one replace, and leaves a destination held by someone else's route alone.
    #[test]
    fn diff6_adds_deletes_and_respects_foreign_routes() {
        let desired = want(&[2, 3]);
        let mut actual = want(&[3, 4]);
        assert!(diff6(&desired, &desired).is_empty());
        let ops = diff6(&desired, &actual);
        let (n2, f2, r2) = peer(2);
        let (n4, f4, r4) = peer(4);
        for op in [
            Op6::ReplaceNeigh(n2),
            Op6::ReplaceFdb(f2),
            Op6::ReplaceRoute(r2),
            Op6::DeleteNeigh(n4),
            Op6::DeleteFdb(f4),
            Op6::DeleteRoute(r4),
        ] {
            assert!(ops.contains(&op), "{op} missing from {ops:?}");
        }
        assert_eq!(ops.len(), 6);
        // A neighbour with the wrong MAC: one replace, no delete of the same IP.
        let (n3, _, _) = peer(3);
        actual.neighs.remove(&n3);
        let wrong = Neigh6 {
            mac: Mac::derive("x"),
            ..n3
        };
        actual.neighs.insert(wrong);
        let ops = diff6(&want(&[3]), &actual);
        assert!(ops.contains(&Op6::ReplaceNeigh(n3)));
        assert!(!ops.contains(&Op6::DeleteNeigh(wrong)));
        // Someone else's route to a peer's subnet: not written.
        let mut foreign = Programmed6::default();
        foreign.foreign_routes.insert(r2.dst);
        let ops = diff6(&want(&[2]), &foreign);
        assert!(!ops.iter().any(|o| matches!(o, Op6::ReplaceRoute(_))));
        assert_eq!(ops.len(), 2);
    }

    #[test]
    fn the_device_name_is_flannels_with_twills_prefix() {
        assert_eq!(vxlan6_name(1), "twill-v6.1");
        assert!(vxlan6_name(999_999).len() <= 15);
    }
}
