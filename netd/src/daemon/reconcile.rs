//! The pure part of the reconcile: leases → desired entries, desired vs programmed → ops.
//! No I/O here: the run loop feeds it the lease set (from the etcd watch) and the programmed
//! entries (from a netlink dump kept current by netlink events), then applies the ops.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::Ipv4Net;
use twill_dataplane::overlay::{Fdb, Mac, Neigh, Op, Programmed, Route};
use twill_ipam::lease::Lease;

/// A peer node as the data plane needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: IpAddr,
    pub vtep_mac: Mac,
}

impl Peer {
    pub fn neigh(&self) -> Neigh {
        Neigh {
            ip: self.subnet.network(),
            mac: self.vtep_mac,
        }
    }

    pub fn fdb(&self) -> Fdb {
        Fdb {
            mac: self.vtep_mac,
            dst: self.public_ip,
        }
    }

    pub fn route(&self) -> Route {
        Route {
            dst: self.subnet.trunc(),
            via: self.subnet.network(),
        }
    }
}

/// A lease that gives no peer, and why (for logs and `twillctl status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub subnet: Ipv4Net,
    pub reason: String,
}

/// The peers of the node whose own subnet is `own`: every other routable VXLAN lease of
/// the same VNI. Leases that cannot be used are returned in the second list.
pub fn peers<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    own: Option<Ipv4Net>,
    vni: u32,
) -> (Vec<Peer>, Vec<Skipped>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for l in leases {
        if Some(l.subnet) == own {
            continue;
        }
        let skip = |reason: String| Skipped {
            subnet: l.subnet,
            reason,
        };
        let a = &l.attrs;
        if !a.backend_type.is_empty() && a.backend_type != "vxlan" {
            skipped.push(skip(format!(
                "backend type {:?} is not vxlan",
                a.backend_type
            )));
            continue;
        }
        if !a.is_routable() {
            skipped.push(skip("no public IP or VTEP MAC yet (reservation)".into()));
            continue;
        }
        if a.vni() != 0 && a.vni() != vni {
            skipped.push(skip(format!(
                "VNI {} is not this node's VNI {vni}",
                a.vni()
            )));
            continue;
        }
        let mac: Mac = match a.vtep_mac().parse() {
            Ok(m) => m,
            Err(e) => {
                skipped.push(skip(e.to_string()));
                continue;
            }
        };
        peers.push(Peer {
            subnet: l.subnet,
            public_ip: IpAddr::V4(a.public_ip),
            vtep_mac: mac,
        });
    }
    // Two leases with one VTEP MAC would fight over one FDB entry: keep the first subnet.
    let mut seen: HashMap<Mac, Ipv4Net> = HashMap::new();
    peers.sort();
    peers.retain(|p| match seen.get(&p.vtep_mac) {
        Some(first) => {
            skipped.push(Skipped {
                subnet: p.subnet,
                reason: format!("VTEP MAC {} already used by {first}", p.vtep_mac),
            });
            false
        }
        None => {
            seen.insert(p.vtep_mac, p.subnet);
            true
        }
    });
    (peers, skipped)
}

/// [`peers`] over the watch's lease map.
pub fn peers_of_map(
    leases: &BTreeMap<Ipv4Net, Lease>,
    own: Option<Ipv4Net>,
    vni: u32,
) -> (Vec<Peer>, Vec<Skipped>) {
    peers(leases.values(), own, vni)
}

/// The entries that `peers` need: one neighbour, FDB entry and route each.
pub fn desired(peers: &[Peer]) -> Programmed {
    let mut p = Programmed::default();
    for peer in peers {
        p.neighs.insert(peer.neigh());
        p.fdbs.insert(peer.fdb());
        p.routes.insert(peer.route());
    }
    p
}

/// The ops that turn `actual` into `desired`: replaces for what is missing or different,
/// deletes for what no lease asks for. Nothing for entries that are already right.
pub fn diff(desired: &Programmed, actual: &Programmed) -> Vec<Op> {
    let mut ops = Vec::new();

    // Neighbours, keyed by IP.
    let want_ips: HashSet<_> = desired.neighs.iter().map(|n| n.ip).collect();
    for n in &desired.neighs {
        if !actual.neighs.contains(n) {
            ops.push(Op::ReplaceNeigh(*n));
        }
    }
    for n in &actual.neighs {
        // One entry per IP in the kernel: a wrong MAC is fixed by the replace above.
        if !want_ips.contains(&n.ip) {
            ops.push(Op::DeleteNeigh(*n));
        }
    }

    // FDB: a MAC may have several remotes; exactly the desired one must remain.
    for f in &desired.fdbs {
        if !actual.fdbs.contains(f) {
            ops.push(Op::ReplaceFdb(*f));
        }
    }
    for f in &actual.fdbs {
        if !desired.fdbs.contains(f) {
            ops.push(Op::DeleteFdb(*f));
        }
    }

    // Routes, keyed by destination.
    let want_dsts: HashSet<_> = desired.routes.iter().map(|r| r.dst).collect();
    for r in &desired.routes {
        if !actual.routes.contains(r) {
            ops.push(Op::ReplaceRoute(*r));
        }
    }
    for r in &actual.routes {
        if !want_dsts.contains(&r.dst) {
            ops.push(Op::DeleteRoute(*r));
        }
    }
    ops.sort();
    ops
}

/// An entry of `twillctl status`: expected (from etcd) against programmed (netlink).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusReport {
    /// Desired entries that are not programmed (or programmed differently).
    pub missing: Vec<Op>,
    /// Programmed entries that no lease asks for.
    pub stale: Vec<Op>,
    pub expected: usize,
    pub programmed: usize,
}

/// Splits [`diff`] into missing and stale for a report.
pub fn status(desired: &Programmed, actual: &Programmed) -> StatusReport {
    let ops = diff(desired, actual);
    let (missing, stale): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|o| {
        matches!(
            o,
            Op::ReplaceFdb(_) | Op::ReplaceNeigh(_) | Op::ReplaceRoute(_)
        )
    });
    StatusReport {
        missing,
        stale,
        expected: desired.len(),
        programmed: actual.len(),
    }
}

/// The subnets that have all three entries programmed.
pub fn complete_peers(peers: &[Peer], actual: &Programmed) -> BTreeSet<Ipv4Net> {
    peers
        .iter()
        .filter(|p| {
            actual.neighs.contains(&p.neigh())
                && actual.fdbs.contains(&p.fdb())
                && actual.routes.contains(&p.route())
        })
        .map(|p| p.subnet)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use twill_dataplane::overlay::{FakeCall, FakeOverlay, Overlay, apply_ops};
    use twill_ipam::lease::LeaseAttrs;

    use super::*;

    fn lease(n: u8, node: &str) -> Lease {
        Lease {
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            attrs: LeaseAttrs::vxlan(
                node,
                Ipv4Addr::new(192, 168, 0, n),
                1,
                &Mac::derive(node).to_string(),
            ),
            reserved: false,
            etcd_lease: 1,
            expires: None,
            mod_revision: 1,
        }
    }

    fn own() -> Option<Ipv4Net> {
        Some("10.244.1.0/24".parse().unwrap())
    }

    #[test]
    fn own_lease_gives_no_entries() {
        let ls = [lease(1, "a"), lease(2, "b"), lease(3, "c")];
        let (p, skipped) = peers(&ls, own(), 1);
        assert_eq!(p.len(), 2);
        assert!(skipped.is_empty());
        assert!(p.iter().all(|p| p.subnet != own().unwrap()));
        let d = desired(&p);
        assert_eq!(d.len(), 6);
        let r = d.routes.iter().next().unwrap();
        assert_eq!(r.dst, "10.244.2.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(r.via, Ipv4Addr::new(10, 244, 2, 0));
    }

    #[test]
    fn unusable_leases_are_skipped_with_a_reason() {
        let mut reservation = lease(4, "d");
        reservation.attrs.public_ip = Ipv4Addr::UNSPECIFIED;
        let mut other_vni = lease(5, "e");
        other_vni.attrs.backend_data.vni = 7;
        let mut bad_mac = lease(6, "f");
        bad_mac.attrs.backend_data.vtep_mac = "zz".into();
        let mut host_gw = lease(7, "g");
        host_gw.attrs.backend_type = "host-gw".into();
        let mut dup = lease(8, "h");
        dup.attrs.backend_data.vtep_mac = lease(2, "b").attrs.backend_data.vtep_mac.clone();
        let ls = [lease(2, "b"), reservation, other_vni, bad_mac, host_gw, dup];
        let (p, skipped) = peers(&ls, own(), 1);
        assert_eq!(p.len(), 1);
        assert_eq!(skipped.len(), 5, "{skipped:?}");
    }

    #[test]
    fn diff_of_equal_states_is_empty() {
        let ls = [lease(2, "b"), lease(3, "c")];
        let d = desired(&peers(&ls, own(), 1).0);
        assert!(diff(&d, &d).is_empty());
    }

    #[test]
    fn diff_adds_missing_and_deletes_stale() {
        let ls = [lease(2, "b"), lease(3, "c")];
        let d = desired(&peers(&ls, own(), 1).0);
        let stale_ls = [lease(9, "z")];
        let mut actual = desired(&peers(&stale_ls, own(), 1).0);
        // One of the desired entries is there already.
        let route2 = *d.routes.iter().next().unwrap();
        actual.routes.insert(route2);
        let ops = diff(&d, &actual);
        let replaces = ops
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Op::ReplaceFdb(_) | Op::ReplaceNeigh(_) | Op::ReplaceRoute(_)
                )
            })
            .count();
        let deletes = ops.len() - replaces;
        assert_eq!(replaces, 5, "{ops:?}");
        assert_eq!(deletes, 3, "{ops:?}");
        assert!(!ops.contains(&Op::ReplaceRoute(route2)));
    }

    #[test]
    fn changed_peer_is_replaced_not_deleted() {
        let before = [lease(2, "b")];
        let mut l = lease(2, "b");
        l.attrs.public_ip = Ipv4Addr::new(192, 168, 0, 99);
        l.attrs.backend_data.vtep_mac = Mac::derive("b-new").to_string();
        let after = [l];
        let actual = desired(&peers(&before, own(), 1).0);
        let d = desired(&peers(&after, own(), 1).0);
        let ops = diff(&d, &actual);
        // Neighbour and FDB replaced, the old FDB entry (old MAC) deleted, route untouched.
        assert!(ops.iter().any(|o| matches!(o, Op::ReplaceNeigh(_))));
        assert!(ops.iter().any(|o| matches!(o, Op::ReplaceFdb(_))));
        assert!(ops.iter().any(|o| matches!(o, Op::DeleteFdb(_))));
        assert!(!ops.iter().any(|o| matches!(o, Op::DeleteNeigh(_))));
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::ReplaceRoute(_) | Op::DeleteRoute(_)))
        );
    }

    #[test]
    fn route_with_wrong_next_hop_is_replaced() {
        let d = desired(&peers(&[lease(2, "b")], own(), 1).0);
        let mut actual = d.clone();
        let r = *actual.routes.iter().next().unwrap();
        actual.routes.clear();
        actual.routes.insert(Route {
            dst: r.dst,
            via: Ipv4Addr::new(10, 244, 2, 7),
        });
        assert_eq!(diff(&d, &actual), vec![Op::ReplaceRoute(r)]);
    }

    #[tokio::test]
    async fn applying_the_diff_converges_and_a_second_pass_does_nothing() {
        let fake = FakeOverlay::new();
        let ls: Vec<Lease> = (2..50).map(|n| lease(n, &format!("n{n}"))).collect();
        let d = desired(&peers(&ls, own(), 1).0);
        // Left by an earlier run: a peer that no longer has a lease.
        fake.set_programmed(desired(&peers(&[lease(99, "gone")], own(), 1).0));
        let ops = diff(&d, &fake.dump(0).await.unwrap());
        assert!(apply_ops(&fake, 0, &ops, 8).await.is_empty());
        assert_eq!(fake.programmed(), d);
        fake.clear_calls();
        let ops = diff(&d, &fake.dump(0).await.unwrap());
        assert!(ops.is_empty());
        assert!(fake.writes().is_empty());
        // Deletes come after replaces: the stale route goes before its neighbour.
        let calls = {
            let f2 = FakeOverlay::new();
            f2.set_programmed(desired(&peers(&[lease(99, "gone")], own(), 1).0));
            let ops = diff(&Programmed::default(), &f2.programmed());
            apply_ops(&f2, 0, &ops, 1).await;
            f2.writes()
        };
        assert!(matches!(calls[0], FakeCall::DeleteRoute(_)), "{calls:?}");
    }

    #[test]
    fn status_splits_missing_and_stale() {
        let d = desired(&peers(&[lease(2, "b")], own(), 1).0);
        let actual = desired(&peers(&[lease(3, "c")], own(), 1).0);
        let s = status(&d, &actual);
        assert_eq!(s.missing.len(), 3);
        assert_eq!(s.stale.len(), 3);
        assert_eq!(s.expected, 3);
        assert_eq!(s.programmed, 3);
    }
}
