//! The pure part of the IPv6 reconcile of a dual-stack node: the IPv4-accepted peers'
//! leases → their IPv6 sides → the entries of `twill-v6.<VNI>`. A peer whose IPv6 side is
//! bad (no or a bad `PublicIPv6` / `BackendV6Data`, an IPv6 subnet outside `IPv6Network`,
//! a conflict with an older lease) is rejected for IPv6 only, by key, with the field and the
//! value; its IPv4 side is not affected. The whole set is validated on each reconcile
//! (no incremental path as for IPv4).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use twill_dataplane::overlay::Fdb;
use twill_dataplane::overlay::v6::{Neigh6, Programmed6, Route6};
use twill_ipam::lease::Lease;
use twill_ipam::mac::Mac;

/// A peer's IPv6 side, as `twill-v6.<VNI>` needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Peer6 {
    /// The lease's key name (`<v4>-<len>&<v6>-<len>`).
    pub key: String,
    pub subnet: Ipv6Net,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: Mac,
}

impl Peer6 {
    pub fn neigh(&self) -> Neigh6 {
        Neigh6 {
            ip: self.subnet.network(),
            mac: self.vtep_mac,
        }
    }

    pub fn fdb(&self) -> Fdb {
        Fdb {
            mac: self.vtep_mac,
            dst: self.public_ip.into(),
        }
    }

    pub fn route(&self) -> Route6 {
        Route6 {
            dst: self.subnet.trunc(),
            via: self.subnet.network(),
        }
    }
}

/// A lease whose IPv6 side gives no IPv6 peer, and why (logged, shown by `twillctl status`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Skipped6 {
    pub key: String,
    pub detail: String,
}

/// What the IPv6 side of a lease is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation6 {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    /// `IPv6SubnetMin` / `IPv6SubnetMax` (resolved).
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
    pub vni: u32,
    pub own_subnet: Ipv6Net,
    pub own_public_ip: Ipv6Addr,
    pub own_vtep_mac: Mac,
}

fn check6(l: &Lease, v: &Validation6) -> Result<Option<Peer6>, String> {
    let ep = l
        .attrs
        .ipv6_endpoint()
        .map_err(|e| format!("IPv6 side: {e}"))?;
    let (s, ep) = match (l.ipv6_subnet, ep) {
        (None, None) => return Ok(None), // an IPv4-only lease (a node without IPv6)
        (Some(s), None) => {
            return Err(format!(
                "IPv6 subnet {s} without PublicIPv6 and BackendV6Data"
            ));
        }
        (None, Some(ep)) => {
            return Err(format!(
                "PublicIPv6 {} without an IPv6 subnet in the key",
                ep.public_ip
            ));
        }
        (Some(s), Some(ep)) => (s, ep),
    };
    if !v.network.contains(&s) {
        return Err(format!(
            "IPv6 subnet {s} is not inside IPv6Network {}",
            v.network
        ));
    }
    if s.prefix_len() != v.subnet_len {
        return Err(format!(
            "IPv6 subnet {s} is not a /{} (IPv6SubnetLen)",
            v.subnet_len
        ));
    }
    if s.network() < v.subnet_min || s.network() > v.subnet_max {
        return Err(format!(
            "IPv6 subnet {s} is not within IPv6SubnetMin {} .. IPv6SubnetMax {}",
            v.subnet_min, v.subnet_max
        ));
    }
    if v.own_subnet.contains(&s) || s.contains(&v.own_subnet) {
        return Err(format!(
            "IPv6 subnet {s} overlaps this node's IPv6 subnet {}",
            v.own_subnet
        ));
    }
    if ep.vni != v.vni {
        return Err(format!(
            "BackendV6Data.VNI {} is not the network's VNI {}",
            ep.vni, v.vni
        ));
    }
    if ep.public_ip == v.own_public_ip {
        return Err(format!("PublicIPv6 {} is this node's own", ep.public_ip));
    }
    if v.network.contains(&ep.public_ip) {
        return Err(format!(
            "PublicIPv6 {} is inside the cluster IPv6Network",
            ep.public_ip
        ));
    }
    if ep.vtep_mac == v.own_vtep_mac {
        return Err(format!(
            "BackendV6Data.VtepMAC {} is this node's own",
            ep.vtep_mac
        ));
    }
    Ok(Some(Peer6 {
        key: l.key().to_string(),
        subnet: s,
        public_ip: ep.public_ip,
        vtep_mac: ep.vtep_mac,
    }))
}

/// The IPv6 peers among `leases` (the leases of the IPv4-accepted peers), oldest lease
/// first on a conflict (overlapping IPv6 subnets, a shared PublicIPv6 or IPv6 VtepMAC), as
/// for IPv4; and the leases rejected for IPv6.
pub fn peers6<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    v: &Validation6,
) -> (Vec<Peer6>, Vec<Skipped6>) {
    let mut ordered: Vec<&Lease> = leases.into_iter().collect();
    ordered.sort_by_key(|l| (l.create_revision, l.key().to_string()));
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut taken: BTreeMap<Ipv6Addr, (Ipv6Net, String)> = BTreeMap::new();
    let mut ips: HashMap<Ipv6Addr, String> = HashMap::new();
    let mut macs: HashMap<Mac, String> = HashMap::new();
    for l in ordered {
        let key = l.key().to_string();
        let p = check6(l, v).and_then(|p| {
            let Some(p) = p else { return Ok(None) };
            let below = taken.range(..=p.subnet.network()).next_back();
            let above = taken.range(p.subnet.network()..).next();
            for (_, (other, k)) in below.into_iter().chain(above) {
                if other.contains(&p.subnet) || p.subnet.contains(other) {
                    return Err(format!(
                        "IPv6 subnet {} overlaps the older lease {k}",
                        p.subnet
                    ));
                }
            }
            if let Some(k) = ips.get(&p.public_ip) {
                return Err(format!("PublicIPv6 {} is already used by {k}", p.public_ip));
            }
            if let Some(k) = macs.get(&p.vtep_mac) {
                return Err(format!(
                    "BackendV6Data.VtepMAC {} is already used by {k}",
                    p.vtep_mac
                ));
            }
            Ok(Some(p))
        });
        match p {
            Ok(Some(p)) => {
                taken.insert(p.subnet.network(), (p.subnet, key.clone()));
                ips.insert(p.public_ip, key.clone());
                macs.insert(p.vtep_mac, key);
                peers.push(p);
            }
            Ok(None) => {}
            Err(detail) => skipped.push(Skipped6 { key, detail }),
        }
    }
    peers.sort();
    skipped.sort();
    (peers, skipped)
}

/// The entries that `peers` need on `twill-v6.<VNI>`.
pub fn desired6(peers: &[Peer6]) -> Programmed6 {
    let mut p = Programmed6::default();
    for peer in peers {
        p.neighs.insert(peer.neigh());
        p.fdbs.insert(peer.fdb());
        p.routes.insert(peer.route());
    }
    p
}

/// The peers' PublicIPv6s: the members of nft's `peers6` set.
pub fn public_ipv6s(peers: &[Peer6]) -> BTreeSet<Ipv6Addr> {
    peers.iter().map(|p| p.public_ip).collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use twill_dataplane::overlay::v6::diff6;
    use twill_ipam::lease::LeaseAttrs;

    use super::*;

    fn lease(n: u8, v6: bool) -> Lease {
        let mut attrs = LeaseAttrs::vxlan(
            &format!("n{n}"),
            Ipv4Addr::new(192, 168, 0, n),
            1,
            Mac::derive(&format!("n{n}")),
        );
        if v6 {
            attrs = attrs.with_ipv6(
                format!("fd99::{n}").parse().unwrap(),
                1,
                Mac::derive(&format!("v6-n{n}")),
            );
        }
        Lease {
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            ipv6_subnet: v6.then(|| format!("fd00:10:0:{n}::/64").parse().unwrap()),
            attrs,
            reserved: false,
            etcd_lease: 1,
            expires: None,
            mod_revision: 1,
            create_revision: i64::from(n),
        }
    }

    fn val() -> Validation6 {
        Validation6 {
            network: "fd00:10::/48".parse().unwrap(),
            subnet_len: 64,
            subnet_min: "fd00:10:0:1::".parse().unwrap(),
            subnet_max: "fd00:10:0:ff::".parse().unwrap(),
            vni: 1,
            own_subnet: "fd00:10:0:1::/64".parse().unwrap(),
            own_public_ip: "fd99::1".parse().unwrap(),
            own_vtep_mac: Mac::derive("v6-n1"),
        }
    }

    /// Good dual-stack peers give three entries each; an IPv4-only peer gives none and is
    /// not an error; each bad IPv6 side is rejected by key with the field and the value.
    #[test]
    fn bad_ipv6_sides_are_rejected_by_key_and_field() {
        let mut bad_ip = lease(4, true);
        bad_ip.attrs.public_ipv6 = twill_ipam::lease::PublicIpv6::Invalid("nope".into());
        let mut outside = lease(5, true);
        outside.ipv6_subnet = Some("fd00:99:0:5::/64".parse().unwrap());
        let mut no_v6_side = lease(6, true);
        no_v6_side.attrs.backend_v6_data = None;
        no_v6_side.attrs.public_ipv6 = twill_ipam::lease::PublicIpv6::Absent;
        let mut dup_mac = lease(7, true);
        dup_mac.attrs =
            dup_mac
                .attrs
                .with_ipv6("fd99::7".parse().unwrap(), 1, Mac::derive("v6-n2"));
        let mut above_max = lease(8, true);
        above_max.ipv6_subnet = Some("fd00:10:0:100::/64".parse().unwrap());
        let ls = [
            above_max,
            lease(2, true),
            lease(3, false),
            bad_ip,
            outside,
            no_v6_side,
            dup_mac,
        ];
        let (p, skipped) = peers6(&ls, &val());
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].subnet, "fd00:10:0:2::/64".parse::<Ipv6Net>().unwrap());
        let details: Vec<&str> = skipped.iter().map(|s| s.detail.as_str()).collect();
        assert_eq!(skipped.len(), 5, "{details:?}");
        assert!(
            details.iter().any(|d| d.contains("IPv6SubnetMax")),
            "{details:?}"
        );
        assert!(
            details
                .iter()
                .any(|d| d.contains("PublicIPv6") && d.contains("nope")),
            "{details:?}"
        );
        assert!(details.iter().any(|d| d.contains("fd00:99:0:5::/64")));
        assert!(details.iter().any(|d| d.contains("without PublicIPv6")));
        assert!(details.iter().any(|d| d.contains("already used by")));
        assert!(skipped.iter().any(|s| s.key.starts_with("10.244.4.0-24&")));
        let d = desired6(&p);
        assert_eq!(d.len(), 3);
        let r = d.routes.iter().next().unwrap();
        assert_eq!(r.via, "fd00:10:0:2::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(diff6(&d, &Programmed6::default()).len(), 3);
        assert_eq!(public_ipv6s(&p), ["fd99::2".parse().unwrap()].into());
    }
}
