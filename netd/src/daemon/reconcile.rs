//! The pure part of the reconcile: leases → desired entries, desired vs programmed → ops.
//! No I/O here: the run loop feeds it the lease set (from the etcd watch) and the programmed
//! entries (from a netlink dump kept current by netlink events), then applies the ops.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use twill_dataplane::overlay::{
    DirectRoute, Fdb, Mac, Neigh, Op, Programmed, Route, RouteMode, RoutePath, route_mode,
};
use twill_ipam::lease::{InvalidKind, InvalidLease, Lease, LeaseEvent, subnet_to_key};
use twill_ipam::netconf::NetConfig;

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

    /// The direct route on the underlay device `dev` (`None` for an IPv6 public IP: the
    /// subnet is IPv4, so its next hop must be too).
    pub fn direct_route(&self, dev: u32) -> Option<DirectRoute> {
        Some(DirectRoute {
            dst: self.subnet.trunc(),
            via: self.public_v4()?,
            dev,
        })
    }

    /// The public IP if it is IPv4 (nft's peer set holds IPv4 addresses).
    pub fn public_v4(&self) -> Option<Ipv4Addr> {
        ipv4(&self.public_ip)
    }
}

fn ipv4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(ip) => Some(*ip),
        IpAddr::V6(_) => None,
    }
}

/// Why a lease gives no peer: a stable machine label (metrics, `-o json`, docs/leases.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The subnet is not inside `Network`.
    OutsideNetwork,
    /// The subnet's prefix length is not `SubnetLen`.
    WrongPrefix,
    /// The subnet is not within `SubnetMin`..`SubnetMax`.
    OutsideRange,
    /// The subnet overlaps this node's own subnet.
    OverlapsOwn,
    /// The subnet overlaps an older accepted lease.
    OverlapsLease,
    /// PublicIP is not a unicast address a peer can have (loopback, link-local, multicast,
    /// broadcast, 0/8, 240/4, or inside `Network`).
    BadPublicIp,
    /// PublicIP is this node's own.
    OwnPublicIp,
    /// PublicIP is already used by an older accepted lease.
    DuplicatePublicIp,
    /// VtepMAC does not parse, is zero, or is a multicast/broadcast MAC.
    BadVtepMac,
    /// VtepMAC is already used by this node or an older accepted lease.
    DuplicateVtepMac,
    /// BackendType is not the network's `Backend.Type`.
    WrongBackend,
    /// BackendData.VNI is not the network's VNI.
    WrongVni,
    /// The key is not a canonical `<net>-<len>` (e.g. `10.244.3.0-024`).
    BadKey,
    /// The value is not lease JSON.
    BadValue,
    /// A reservation whose node has not taken it yet (no PublicIP or VtepMAC): not an error,
    /// not counted as rejected.
    NotTaken,
}

impl Reason {
    /// Every reason that is a rejection (each is a label value of `twill_leases_rejected`).
    pub const REJECTIONS: [Reason; 14] = [
        Reason::OutsideNetwork,
        Reason::WrongPrefix,
        Reason::OutsideRange,
        Reason::OverlapsOwn,
        Reason::OverlapsLease,
        Reason::BadPublicIp,
        Reason::OwnPublicIp,
        Reason::DuplicatePublicIp,
        Reason::BadVtepMac,
        Reason::DuplicateVtepMac,
        Reason::WrongBackend,
        Reason::WrongVni,
        Reason::BadKey,
        Reason::BadValue,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::OutsideNetwork => "outside_network",
            Reason::WrongPrefix => "wrong_prefix",
            Reason::OutsideRange => "outside_range",
            Reason::OverlapsOwn => "overlaps_own",
            Reason::OverlapsLease => "overlaps_lease",
            Reason::BadPublicIp => "bad_public_ip",
            Reason::OwnPublicIp => "own_public_ip",
            Reason::DuplicatePublicIp => "duplicate_public_ip",
            Reason::BadVtepMac => "bad_vtep_mac",
            Reason::DuplicateVtepMac => "duplicate_vtep_mac",
            Reason::WrongBackend => "wrong_backend",
            Reason::WrongVni => "wrong_vni",
            Reason::BadKey => "bad_key",
            Reason::BadValue => "bad_value",
            Reason::NotTaken => "not_taken",
        }
    }

    /// False only for [`Reason::NotTaken`].
    pub fn is_rejection(&self) -> bool {
        *self != Reason::NotTaken
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key under `<prefix>/subnets/` that gives no peer, and why (for logs, the metric and
/// `twillctl status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The key name under `<prefix>/subnets/`, as written (e.g. `10.244.3.0-024`).
    pub key: String,
    /// The subnet, when the key is canonical.
    pub subnet: Option<Ipv4Net>,
    pub reason: Reason,
    /// For people: what exactly is wrong, with the value.
    pub detail: String,
}

/// What a lease is checked against: the network config and this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// `Backend.Type` ("vxlan").
    pub backend_type: String,
    pub vni: u32,
    /// This node's subnet (its own lease gives no peer; others may not overlap it).
    pub own_subnet: Option<Ipv4Net>,
    /// This node's public IP (no peer may claim it).
    pub own_public_ip: Option<IpAddr>,
    /// This node's VTEP MAC (no peer may claim it).
    pub own_vtep_mac: Option<Mac>,
}

impl Validation {
    pub fn new(
        cfg: &NetConfig,
        own_subnet: Option<Ipv4Net>,
        own_public_ip: Option<IpAddr>,
        own_vtep_mac: Option<Mac>,
    ) -> Self {
        Validation {
            network: cfg.network,
            subnet_len: cfg.subnet_len,
            subnet_min: cfg.subnet_min,
            subnet_max: cfg.subnet_max,
            backend_type: cfg.backend.type_name().to_string(),
            vni: cfg.backend.vxlan().vni,
            own_subnet,
            own_public_ip,
            own_vtep_mac,
        }
    }
}

/// Whether `ip` can be a peer's underlay address: unicast and not a special range.
fn public_ip_problem(ip: Ipv4Addr, network: Ipv4Net) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.octets()[0] == 0 {
        Some("in 0.0.0.0/8 (this network)")
    } else if ip.octets()[0] >= 240 {
        Some("in 240.0.0.0/4 (reserved)")
    } else if network.contains(&ip) {
        Some("inside the cluster Network")
    } else {
        None
    }
}

/// The checks of one lease on its own (not against the other leases): a peer, or why not.
fn check(l: &Lease, v: &Validation) -> Result<Peer, (Reason, String)> {
    let s = l.subnet;
    if !v.network.contains(&s) {
        return Err((
            Reason::OutsideNetwork,
            format!("subnet {s} is not inside Network {}", v.network),
        ));
    }
    if let Some(own) = v.own_subnet
        && (own.contains(&s) || s.contains(&own))
    {
        return Err((
            Reason::OverlapsOwn,
            format!("subnet {s} overlaps this node's subnet {own}"),
        ));
    }
    if s.prefix_len() != v.subnet_len {
        return Err((
            Reason::WrongPrefix,
            format!("subnet {s} is not a /{} (SubnetLen)", v.subnet_len),
        ));
    }
    if s.network() < v.subnet_min || s.network() > v.subnet_max {
        return Err((
            Reason::OutsideRange,
            format!(
                "subnet {s} is not within SubnetMin {} .. SubnetMax {}",
                v.subnet_min, v.subnet_max
            ),
        ));
    }
    let a = &l.attrs;
    if !a.is_routable() {
        return Err((
            Reason::NotTaken,
            "no PublicIP or VtepMAC yet (a reservation its node has not taken)".into(),
        ));
    }
    if a.backend_type != v.backend_type {
        return Err((
            Reason::WrongBackend,
            format!(
                "BackendType {:?} is not the network's {:?}",
                a.backend_type, v.backend_type
            ),
        ));
    }
    if a.vni() != v.vni {
        return Err((
            Reason::WrongVni,
            format!("VNI {} is not the network's VNI {}", a.vni(), v.vni),
        ));
    }
    if let Some(why) = public_ip_problem(a.public_ip, v.network) {
        return Err((
            Reason::BadPublicIp,
            format!("PublicIP {} is {why}", a.public_ip),
        ));
    }
    let public_ip = IpAddr::V4(a.public_ip);
    if v.own_public_ip == Some(public_ip) {
        return Err((
            Reason::OwnPublicIp,
            format!("PublicIP {public_ip} is this node's own"),
        ));
    }
    let mac = a.vtep_mac().mac().ok_or_else(|| {
        (
            Reason::BadVtepMac,
            format!(
                "VtepMAC {:?} is not aa:bb:cc:dd:ee:ff",
                a.vtep_mac().to_string()
            ),
        )
    })?;
    if mac.is_zero() {
        return Err((Reason::BadVtepMac, format!("VtepMAC {mac} is zero")));
    }
    if mac.is_multicast() {
        return Err((
            Reason::BadVtepMac,
            format!("VtepMAC {mac} is a multicast/broadcast MAC"),
        ));
    }
    Ok(Peer {
        subnet: s,
        public_ip,
        vtep_mac: mac,
    })
}

/// The peers of this node: every lease that passes all the checks of docs/leases.md
/// ("Validation"). Each other key (bad lease, key-value that is not a lease, reservation not
/// taken yet) is returned in the second list with its reason. This node's own lease is in
/// neither.
///
/// Conflicts (overlapping subnets, a shared PublicIP or VtepMAC) are decided by age: leases
/// are taken oldest first (etcd create revision, then key), so the older one wins, the same
/// on every node and whatever the order of the input.
pub fn peers<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    invalid: impl IntoIterator<Item = &'a InvalidLease>,
    v: &Validation,
) -> (Vec<Peer>, Vec<Skipped>) {
    let mut ordered: Vec<(i64, String, &Lease)> = leases
        .into_iter()
        .map(|l| (l.create_revision, subnet_to_key(&l.subnet), l))
        .collect();
    ordered.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));

    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    // Accepted subnets by network address, for the overlap check.
    let mut taken: BTreeMap<Ipv4Addr, (Ipv4Net, String)> = BTreeMap::new();
    let mut ips: HashMap<IpAddr, String> = HashMap::new();
    let mut macs: HashMap<Mac, String> = HashMap::new();
    if let Some(m) = v.own_vtep_mac {
        macs.insert(m, "this node".to_string());
    }
    for (_, key, l) in ordered {
        if Some(l.subnet) == v.own_subnet {
            continue;
        }
        let peer = check(l, v).and_then(|p| {
            // The nearest accepted subnet at or below this one, and the first above it:
            // any overlap is with one of them.
            let below = taken.range(..=p.subnet.network()).next_back();
            let above = taken.range(p.subnet.network()..).next();
            for (_, (other, other_key)) in below.into_iter().chain(above) {
                if other.contains(&p.subnet) || p.subnet.contains(other) {
                    return Err((
                        Reason::OverlapsLease,
                        format!("subnet {} overlaps the older lease {other_key}", p.subnet),
                    ));
                }
            }
            if let Some(k) = ips.get(&p.public_ip) {
                return Err((
                    Reason::DuplicatePublicIp,
                    format!("PublicIP {} is already used by {k}", p.public_ip),
                ));
            }
            if let Some(k) = macs.get(&p.vtep_mac) {
                return Err((
                    Reason::DuplicateVtepMac,
                    format!("VtepMAC {} is already used by {k}", p.vtep_mac),
                ));
            }
            Ok(p)
        });
        match peer {
            Ok(p) => {
                taken.insert(p.subnet.network(), (p.subnet, key.clone()));
                ips.insert(p.public_ip, key.clone());
                macs.insert(p.vtep_mac, key);
                peers.push(p);
            }
            Err((reason, detail)) => skipped.push(Skipped {
                key,
                subnet: Some(l.subnet),
                reason,
                detail,
            }),
        }
    }
    skipped.extend(invalid.into_iter().map(skipped_invalid));
    peers.sort();
    skipped.sort_by(|a, b| a.key.cmp(&b.key));
    (peers, skipped)
}

/// A key-value that is not a lease, as a [`Skipped`].
fn skipped_invalid(i: &InvalidLease) -> Skipped {
    Skipped {
        key: i.key.clone(),
        subnet: None,
        reason: match i.kind {
            InvalidKind::Key => Reason::BadKey,
            InvalidKind::Value => Reason::BadValue,
        },
        detail: i.detail.clone(),
    }
}

/// Remembers which (key, reason) pairs were already reported, so that a rejected lease is
/// logged once (when it appears, or when its reason changes), not on every reconcile.
#[derive(Debug, Default)]
pub struct RejectLog {
    seen: HashSet<(String, Reason)>,
}

impl RejectLog {
    /// The rejections of `skipped` not reported before; forgets the ones that are gone (so a
    /// lease that comes back is reported again).
    pub fn new_rejections<'a>(&mut self, skipped: &'a [Skipped]) -> Vec<&'a Skipped> {
        let now: HashSet<(String, Reason)> = skipped
            .iter()
            .filter(|s| s.reason.is_rejection())
            .map(|s| (s.key.clone(), s.reason))
            .collect();
        let fresh = skipped
            .iter()
            .filter(|s| s.reason.is_rejection() && !self.seen.contains(&(s.key.clone(), s.reason)))
            .collect();
        self.seen = now;
        fresh
    }
}

/// The number of rejected leases per reason (every rejection reason, zeros included).
pub fn rejected_counts(skipped: &[Skipped]) -> BTreeMap<Reason, usize> {
    let mut m: BTreeMap<Reason, usize> = Reason::REJECTIONS.iter().map(|r| (*r, 0)).collect();
    for s in skipped.iter().filter(|s| s.reason.is_rejection()) {
        *m.entry(s.reason).or_default() += 1;
    }
    m
}

/// [`peers`] over the watch's maps.
pub fn peers_of_map(
    leases: &BTreeMap<Ipv4Net, Lease>,
    invalid: &BTreeMap<String, InvalidLease>,
    v: &Validation,
) -> (Vec<Peer>, Vec<Skipped>) {
    peers(leases.values(), invalid.values(), v)
}

/// What changed in the lease set since the last reconcile, as the watch's events said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LeaseChanges {
    /// Subnets whose lease was added, changed or removed.
    pub subnets: BTreeSet<Ipv4Net>,
    /// Keys of key-values that are not leases, put or gone.
    pub invalid_keys: BTreeSet<String>,
    /// A full state arrived (`Synced`): everything is validated again.
    pub full: bool,
}

impl LeaseChanges {
    /// Records one event of the watch.
    pub fn note(&mut self, ev: &LeaseEvent) {
        match ev {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) => {
                self.subnets.insert(l.subnet);
            }
            LeaseEvent::Changed { old, new } => {
                self.subnets.insert(old.subnet);
                self.subnets.insert(new.subnet);
            }
            LeaseEvent::Invalid { key, .. } => {
                self.invalid_keys.insert(key.clone());
            }
            LeaseEvent::Synced { .. } => self.full = true,
        }
    }
}

/// What an update of a [`ValidPeers`] changed: the peers that went and came (a changed peer is
/// in both), or `full` when everything was validated again (the caller then recomputes
/// everything derived from the peers).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerDelta {
    pub full: bool,
    pub removed: Vec<Peer>,
    pub added: Vec<Peer>,
}

impl PeerDelta {
    pub fn is_empty(&self) -> bool {
        !self.full && self.removed.is_empty() && self.added.is_empty()
    }
}

/// The validated peers, kept between reconciles, so that a lease event costs the work of the
/// leases it touched and not of all of them. The result is always the one [`peers`] gives for
/// the same leases: a change is applied in place only when no conflict (overlap, shared
/// PublicIP or VtepMAC) is involved, because only conflicts depend on the other leases and on
/// their age; anything else validates the whole set again.
#[derive(Debug, Default)]
pub struct ValidPeers {
    validation: Option<Validation>,
    peers: BTreeMap<Ipv4Net, Peer>,
    /// Accepted subnets by network address, for the overlap check.
    taken: BTreeMap<Ipv4Addr, Ipv4Net>,
    /// The accepted peers' public IPs (one per peer: a shared one is a conflict), ordered.
    ips: BTreeSet<IpAddr>,
    macs: HashSet<Mac>,
    skipped: BTreeMap<String, Skipped>,
    /// How many skipped leases lost a conflict: while there is one, a removal may let it in
    /// and an addition may change its reason, so both validate everything again.
    conflict_skips: usize,
}

fn is_conflict(r: Reason) -> bool {
    matches!(
        r,
        Reason::OverlapsLease | Reason::DuplicatePublicIp | Reason::DuplicateVtepMac
    )
}

impl ValidPeers {
    /// The accepted peers, by subnet.
    pub fn peers(&self) -> &BTreeMap<Ipv4Net, Peer> {
        &self.peers
    }

    /// Whether an accepted peer has the public IP `ip`.
    pub fn has_public_ip(&self, ip: impl Into<IpAddr>) -> bool {
        self.ips.contains(&ip.into())
    }

    /// The accepted peers' IPv4 public IPs, in order (the members nft's peer set must have).
    pub fn public_v4s(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ips.iter().filter_map(ipv4)
    }

    /// The keys that give no peer, by key, with their reason.
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.values()
    }

    /// Validates every lease again (the first time, after a re-list, or when `v` changed).
    pub fn rebuild(
        &mut self,
        leases: &BTreeMap<Ipv4Net, Lease>,
        invalid: &BTreeMap<String, InvalidLease>,
        v: &Validation,
    ) -> PeerDelta {
        let (peers, skipped) = peers_of_map(leases, invalid, v);
        self.validation = Some(v.clone());
        self.taken = peers
            .iter()
            .map(|p| (p.subnet.network(), p.subnet))
            .collect();
        self.ips = peers.iter().map(|p| p.public_ip).collect();
        self.macs = peers.iter().map(|p| p.vtep_mac).collect();
        self.macs.extend(v.own_vtep_mac);
        self.peers = peers.into_iter().map(|p| (p.subnet, p)).collect();
        self.conflict_skips = skipped.iter().filter(|s| is_conflict(s.reason)).count();
        self.skipped = skipped.into_iter().map(|s| (s.key.clone(), s)).collect();
        PeerDelta {
            full: true,
            ..Default::default()
        }
    }

    /// Applies `changes` (the leases and invalid keys as they are now in `leases` and
    /// `invalid`). Validates everything again when `changes.full`, when `v` is not the last
    /// validation, or when a conflict is involved.
    pub fn update(
        &mut self,
        leases: &BTreeMap<Ipv4Net, Lease>,
        invalid: &BTreeMap<String, InvalidLease>,
        v: &Validation,
        changes: &LeaseChanges,
    ) -> PeerDelta {
        if changes.full || self.validation.as_ref() != Some(v) {
            return self.rebuild(leases, invalid, v);
        }
        match self.try_update(leases, invalid, v, changes) {
            Some(d) => d,
            None => self.rebuild(leases, invalid, v),
        }
    }

    fn remove_peer(&mut self, p: &Peer) {
        self.peers.remove(&p.subnet);
        self.taken.remove(&p.subnet.network());
        self.ips.remove(&p.public_ip);
        self.macs.remove(&p.vtep_mac);
    }

    fn conflicts(&self, p: &Peer) -> bool {
        let below = self.taken.range(..=p.subnet.network()).next_back();
        let above = self.taken.range(p.subnet.network()..).next();
        below
            .into_iter()
            .chain(above)
            .any(|(_, other)| other.contains(&p.subnet) || p.subnet.contains(other))
            || self.ips.contains(&p.public_ip)
            || self.macs.contains(&p.vtep_mac)
    }

    /// `None`: a conflict is involved; the caller validates everything (nothing was changed
    /// that `rebuild` does not reset).
    fn try_update(
        &mut self,
        leases: &BTreeMap<Ipv4Net, Lease>,
        invalid: &BTreeMap<String, InvalidLease>,
        v: &Validation,
        changes: &LeaseChanges,
    ) -> Option<PeerDelta> {
        // Removals first: with a conflict loser present, one of them may get in.
        let removed: Vec<Peer> = changes
            .subnets
            .iter()
            .filter_map(|s| self.peers.get(s).copied())
            .filter(|p| leases.get(&p.subnet).and_then(|l| check(l, v).ok()) != Some(*p))
            .collect();
        if !removed.is_empty() && self.conflict_skips > 0 {
            return None;
        }
        for p in &removed {
            self.remove_peer(p);
        }
        let mut added = Vec::new();
        for s in &changes.subnets {
            let key = subnet_to_key(s);
            if let Some(old) = self.skipped.remove(&key)
                && is_conflict(old.reason)
            {
                self.conflict_skips -= 1;
            }
            let Some(l) = leases.get(s) else {
                // A canonical key whose value is not a lease is kept with the invalid ones.
                if let Some(i) = invalid.get(&key) {
                    self.skipped.insert(key, skipped_invalid(i));
                }
                continue;
            };
            if Some(l.subnet) == v.own_subnet || self.peers.contains_key(s) {
                continue; // own lease, or a peer whose entries did not change
            }
            match check(l, v) {
                // A new peer may also change which rule a conflict loser fails, and whom it
                // names: with one present, validate everything.
                Ok(p) if self.conflict_skips > 0 || self.conflicts(&p) => return None,
                Ok(p) => {
                    self.taken.insert(p.subnet.network(), p.subnet);
                    self.ips.insert(p.public_ip);
                    self.macs.insert(p.vtep_mac);
                    self.peers.insert(p.subnet, p);
                    added.push(p);
                }
                Err((reason, detail)) => {
                    self.skipped.insert(
                        key.clone(),
                        Skipped {
                            key,
                            subnet: Some(l.subnet),
                            reason,
                            detail,
                        },
                    );
                }
            }
        }
        for key in &changes.invalid_keys {
            self.skipped.remove(key);
            if let Some(i) = invalid.get(key) {
                self.skipped.insert(key.clone(), skipped_invalid(i));
            }
        }
        Some(PeerDelta {
            full: false,
            removed,
            added,
        })
    }
}

/// Which peers are routed directly (`Backend.DirectRouting`) and over which device. The
/// default routes every peer over VXLAN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Direct {
    /// The underlay device's index.
    pub dev: u32,
    /// The subnets of the peers routed directly.
    pub subnets: BTreeSet<Ipv4Net>,
}

impl Direct {
    /// How `p` is routed.
    pub fn mode(&self, p: &Peer) -> RouteMode {
        if self.subnets.contains(&p.subnet) && p.direct_route(self.dev).is_some() {
            RouteMode::Direct
        } else {
            RouteMode::Vxlan
        }
    }

    /// The route mode of each peer from the kernel's answers for their public IPs
    /// (`paths`; a peer without one stays on VXLAN): [`route_mode`] per peer, over the
    /// underlay device `dev`.
    pub fn decide<'a>(
        peers: impl IntoIterator<Item = &'a Peer>,
        paths: &BTreeMap<Ipv4Addr, RoutePath>,
        dev: u32,
    ) -> Direct {
        let subnets = peers
            .into_iter()
            .filter(|p| {
                p.public_v4()
                    .is_some_and(|ip| route_mode(paths.get(&ip), dev) == RouteMode::Direct)
            })
            .map(|p| p.subnet)
            .collect();
        Direct { dev, subnets }
    }
}

/// The entries of one peer: a direct route, or the neighbour, FDB entry and VXLAN route.
fn add_entries(p: &mut Programmed, peer: &Peer, direct: &Direct) {
    match (direct.mode(peer), peer.direct_route(direct.dev)) {
        (RouteMode::Direct, Some(r)) => {
            p.direct.insert(r);
        }
        _ => {
            p.neighs.insert(peer.neigh());
            p.fdbs.insert(peer.fdb());
            p.routes.insert(peer.route());
        }
    }
}

/// The entries that `peers` need over VXLAN: one neighbour, FDB entry and route each.
pub fn desired(peers: &[Peer]) -> Programmed {
    desired_with(peers, &Direct::default())
}

/// The entries that `peers` need, the ones in `direct` routed directly (one route each,
/// no neighbour, no FDB entry).
pub fn desired_with(peers: &[Peer], direct: &Direct) -> Programmed {
    let mut p = Programmed::default();
    for peer in peers {
        add_entries(&mut p, peer, direct);
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

    // Routes, keyed by destination across both kinds: a peer that switches between VXLAN
    // and direct gets one replace (the kernel swaps the route in place), never a delete of
    // the old route that could run before it.
    let want_dsts: HashSet<_> = desired
        .routes
        .iter()
        .map(|r| r.dst)
        .chain(desired.direct.iter().map(|r| r.dst))
        .collect();
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
    for r in &desired.direct {
        if !actual.direct.contains(r) {
            ops.push(Op::ReplaceDirect(*r));
        }
    }
    for r in &actual.direct {
        if !want_dsts.contains(&r.dst) {
            ops.push(Op::DeleteDirect(*r));
        }
    }
    ops.sort();
    ops
}

/// [`diff`] restricted to the entries of `touched` (the peers that came or went): the same
/// ops that a full diff gives for their neighbour IPs, VTEP MACs and route destinations, at
/// the cost of those keys only. Drift elsewhere is the business of the netlink events and the
/// resync, which diff everything.
pub fn diff_touched(desired: &Programmed, actual: &Programmed, touched: &[Peer]) -> Vec<Op> {
    let restrict = |p: &Programmed| {
        let mut r = Programmed::default();
        for t in touched {
            r.neighs.extend(p.neighs_of(t.subnet.network()));
            r.fdbs.extend(p.fdbs_of(t.vtep_mac));
            r.routes.extend(p.routes_to(t.subnet.trunc()));
            r.direct.extend(p.direct_to(t.subnet.trunc()));
        }
        r
    };
    diff(&restrict(desired), &restrict(actual))
}

/// Patches `want` (the [`desired_with`] entries of the peers before `delta`) to the peers
/// after it; `direct` says how the added peers are routed.
pub fn patch_desired(want: &mut Programmed, delta: &PeerDelta, direct: &Direct) {
    for p in &delta.removed {
        want.neighs.remove(&p.neigh());
        want.fdbs.remove(&p.fdb());
        want.routes.remove(&p.route());
        let gone: Vec<DirectRoute> = want.direct_to(p.subnet.trunc()).copied().collect();
        for r in gone {
            want.direct.remove(&r);
        }
    }
    for p in &delta.added {
        add_entries(want, p, direct);
    }
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
            Op::ReplaceFdb(_) | Op::ReplaceNeigh(_) | Op::ReplaceRoute(_) | Op::ReplaceDirect(_)
        )
    });
    StatusReport {
        missing,
        stale,
        expected: desired.len(),
        programmed: actual.len(),
    }
}

/// The subnets that have all three entries programmed (a direct peer: its route).
pub fn complete_peers(peers: &[Peer], actual: &Programmed, direct: &Direct) -> BTreeSet<Ipv4Net> {
    peers
        .iter()
        .filter(|p| match (direct.mode(p), p.direct_route(direct.dev)) {
            (RouteMode::Direct, Some(r)) => actual.direct.contains(&r),
            _ => {
                actual.neighs.contains(&p.neigh())
                    && actual.fdbs.contains(&p.fdb())
                    && actual.routes.contains(&p.route())
            }
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
            ipv6_subnet: None,
            attrs: LeaseAttrs::vxlan(node, Ipv4Addr::new(192, 168, 0, n), 1, Mac::derive(node)),
            reserved: false,
            etcd_lease: 1,
            expires: None,
            mod_revision: 1,
            create_revision: i64::from(n),
        }
    }

    fn cfg() -> NetConfig {
        NetConfig::from_json(
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#,
        )
        .unwrap()
    }

    /// This node: 10.244.1.0/24 (lease(1, "a")), public IP 192.168.0.1.
    fn val() -> Validation {
        Validation::new(
            &cfg(),
            own(),
            Some(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))),
            Some(Mac::derive("a")),
        )
    }

    fn pv(ls: &[Lease]) -> (Vec<Peer>, Vec<Skipped>) {
        peers(ls, [], &val())
    }

    fn own() -> Option<Ipv4Net> {
        Some("10.244.1.0/24".parse().unwrap())
    }

    #[test]
    fn own_lease_gives_no_entries() {
        let ls = [lease(1, "a"), lease(2, "b"), lease(3, "c")];
        let (p, skipped) = pv(&ls);
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
        let (p, skipped) = pv(&ls);
        assert_eq!(p.len(), 1);
        assert_eq!(skipped.len(), 5, "{skipped:?}");
    }

    /// One bad lease of each class next to a good one: each is rejected with its reason
    /// and the good peer is still there, unchanged.
    #[test]
    fn every_rule_rejects_with_its_reason() {
        let with = |n: u8, f: &dyn Fn(&mut Lease)| {
            let mut l = lease(n, &format!("bad{n}"));
            f(&mut l);
            l
        };
        let good = lease(2, "b");
        let cases: Vec<(Lease, Reason)> = vec![
            (
                with(10, &|l| l.subnet = "10.99.0.0/24".parse().unwrap()),
                Reason::OutsideNetwork,
            ),
            (
                with(11, &|l| l.subnet = "0.0.0.0/0".parse().unwrap()),
                Reason::OutsideNetwork,
            ),
            (
                with(12, &|l| l.subnet = "192.168.0.0/24".parse().unwrap()),
                Reason::OutsideNetwork,
            ),
            (
                with(13, &|l| l.subnet = "10.244.1.128/25".parse().unwrap()),
                Reason::OverlapsOwn,
            ),
            (
                with(14, &|l| l.subnet = "10.244.0.0/16".parse().unwrap()),
                Reason::OverlapsOwn,
            ),
            (
                with(15, &|l| l.subnet = "10.244.14.0/23".parse().unwrap()),
                Reason::WrongPrefix,
            ),
            (
                with(16, &|l| l.subnet = "10.244.16.7/32".parse().unwrap()),
                Reason::WrongPrefix,
            ),
            (
                with(17, &|l| l.subnet = "10.244.0.0/24".parse().unwrap()),
                Reason::OutsideRange,
            ),
            (
                with(18, &|l| l.attrs.public_ip = Ipv4Addr::new(127, 0, 0, 1)),
                Reason::BadPublicIp,
            ),
            (
                with(19, &|l| l.attrs.public_ip = Ipv4Addr::new(224, 0, 0, 5)),
                Reason::BadPublicIp,
            ),
            (
                with(20, &|l| l.attrs.public_ip = Ipv4Addr::new(169, 254, 1, 1)),
                Reason::BadPublicIp,
            ),
            (
                with(21, &|l| l.attrs.public_ip = Ipv4Addr::BROADCAST),
                Reason::BadPublicIp,
            ),
            (
                with(22, &|l| l.attrs.public_ip = Ipv4Addr::new(10, 244, 2, 5)),
                Reason::BadPublicIp,
            ),
            (
                with(23, &|l| l.attrs.public_ip = Ipv4Addr::new(192, 168, 0, 1)),
                Reason::OwnPublicIp,
            ),
            (
                with(24, &|l| l.attrs.public_ip = Ipv4Addr::new(192, 168, 0, 2)),
                Reason::DuplicatePublicIp,
            ),
            (
                with(25, &|l| {
                    l.attrs.backend_data.vtep_mac = "00:00:00:00:00:00".into()
                }),
                Reason::BadVtepMac,
            ),
            (
                with(26, &|l| {
                    l.attrs.backend_data.vtep_mac = "01:00:5e:00:00:01".into()
                }),
                Reason::BadVtepMac,
            ),
            (
                with(27, &|l| {
                    l.attrs.backend_data.vtep_mac = "ff:ff:ff:ff:ff:ff".into()
                }),
                Reason::BadVtepMac,
            ),
            (
                with(28, &|l| {
                    l.attrs.backend_data.vtep_mac = "+a:+b:+c:dd:ee:ff".into()
                }),
                Reason::BadVtepMac,
            ),
            (
                with(29, &|l| {
                    l.attrs.backend_data.vtep_mac = Mac::derive("b").into()
                }),
                Reason::DuplicateVtepMac,
            ),
            (
                with(30, &|l| {
                    l.attrs.backend_data.vtep_mac = Mac::derive("a").into()
                }),
                Reason::DuplicateVtepMac,
            ),
            (
                with(31, &|l| l.attrs.backend_data.vni = 2),
                Reason::WrongVni,
            ),
            (
                with(32, &|l| l.attrs.backend_data.vni = 0),
                Reason::WrongVni,
            ),
            (
                with(33, &|l| l.attrs.backend_type = "host-gw".into()),
                Reason::WrongBackend,
            ),
            (
                with(34, &|l| l.attrs.backend_type = String::new()),
                Reason::WrongBackend,
            ),
        ];
        let mut small = cfg();
        small.subnet_max = Ipv4Addr::new(10, 244, 200, 0);
        let v = Validation::new(&small, own(), val().own_public_ip, val().own_vtep_mac);
        let (alone, _) = peers(std::slice::from_ref(&good), [], &v);
        for (bad, reason) in cases {
            let (p, skipped) = peers(&[good.clone(), bad.clone()], [], &v);
            assert_eq!(p, alone, "{reason}: the good peer changed");
            assert_eq!(skipped.len(), 1, "{reason}: {skipped:?}");
            assert_eq!(skipped[0].reason, reason, "{bad:?}: {}", skipped[0].detail);
            assert_eq!(skipped[0].key, subnet_to_key(&bad.subnet));
            assert!(!skipped[0].detail.is_empty());
        }
        // Above SubnetMax.
        let high = lease(201, "hi");
        let (_, skipped) = peers(&[good, high], [], &v);
        assert_eq!(skipped[0].reason, Reason::OutsideRange);
    }

    /// Key-values that are not leases are listed with bad_key / bad_value.
    #[test]
    fn invalid_key_values_are_listed() {
        let inv = |k: &str, kind| InvalidLease {
            key: k.into(),
            kind,
            detail: "x".into(),
            create_revision: 1,
            mod_revision: 1,
        };
        let bad = [
            inv("10.244.2.0-024", InvalidKind::Key),
            inv("10.244.9.0-24", InvalidKind::Value),
        ];
        let (p, skipped) = peers(&[lease(2, "b")], &bad, &val());
        assert_eq!(p.len(), 1);
        let reasons: Vec<_> = skipped.iter().map(|s| (s.key.as_str(), s.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                ("10.244.2.0-024", Reason::BadKey),
                ("10.244.9.0-24", Reason::BadValue)
            ]
        );
        assert_eq!(rejected_counts(&skipped)[&Reason::BadKey], 1);
        assert_eq!(rejected_counts(&skipped)[&Reason::WrongVni], 0);
    }

    /// Conflicts: the older lease (lower create revision) wins whatever the input order; on
    /// equal revisions the lower key wins.
    #[test]
    fn older_lease_wins_whatever_the_order() {
        let mut old = lease(5, "old");
        old.create_revision = 10;
        let mut young_mac = lease(3, "young");
        young_mac.create_revision = 20;
        young_mac.attrs.backend_data.vtep_mac = old.attrs.backend_data.vtep_mac.clone();
        let mut young_ip = lease(4, "young2");
        young_ip.create_revision = 30;
        young_ip.attrs.public_ip = old.attrs.public_ip;
        let mut tie_a = lease(7, "tie-a");
        tie_a.create_revision = 40;
        let mut tie_b = lease(8, "tie-b");
        tie_b.create_revision = 40;
        tie_b.attrs.public_ip = tie_a.attrs.public_ip;
        let all = [old, young_mac, young_ip, tie_a, tie_b, lease(9, "c")];
        let first = pv(&all);
        let subnets: Vec<String> = first.0.iter().map(|p| p.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.244.5.0/24", "10.244.7.0/24", "10.244.9.0/24"]);
        let reasons: Vec<_> = first.1.iter().map(|s| (s.key.as_str(), s.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                ("10.244.3.0-24", Reason::DuplicateVtepMac),
                ("10.244.4.0-24", Reason::DuplicatePublicIp),
                ("10.244.8.0-24", Reason::DuplicatePublicIp),
            ]
        );
        // Every rotation and the reverse give exactly the same result.
        for k in 0..all.len() {
            let mut v = all.to_vec();
            v.rotate_left(k);
            assert_eq!(pv(&v), first, "rotation {k}");
            v.reverse();
            assert_eq!(pv(&v), first, "reversed rotation {k}");
        }
    }

    /// Overlapping accepted subnets (possible only with a SubnetLen that changed): the
    /// older one wins.
    #[test]
    fn overlapping_leases_older_wins() {
        let mut v = val();
        v.subnet_len = 24;
        let mut a = lease(2, "b");
        a.create_revision = 5;
        let mut b = lease(3, "c");
        b.subnet = "10.244.2.0/24".parse().unwrap();
        b.create_revision = 3;
        // Same subnet twice cannot come from etcd (one key), but peers() must still not
        // give two peers for it.
        let (p, skipped) = peers(&[a.clone(), b.clone()], [], &v);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].public_ip, IpAddr::V4(b.attrs.public_ip));
        assert_eq!(skipped[0].reason, Reason::OverlapsLease);
    }

    #[test]
    fn rejections_are_logged_once() {
        let mut bad = lease(3, "c");
        bad.attrs.backend_data.vni = 9;
        let (_, skipped) = pv(&[lease(2, "b"), bad.clone()]);
        let mut log = RejectLog::default();
        assert_eq!(log.new_rejections(&skipped).len(), 1);
        assert!(log.new_rejections(&skipped).is_empty());
        // A different reason for the same key is new.
        bad.attrs.backend_data.vni = 1;
        bad.attrs.backend_type = "udp".into();
        let (_, skipped2) = pv(&[lease(2, "b"), bad]);
        assert_eq!(log.new_rejections(&skipped2).len(), 1);
        // Gone, then back: reported again.
        assert!(log.new_rejections(&[]).is_empty());
        assert_eq!(log.new_rejections(&skipped2).len(), 1);
        // A reservation not taken yet is not a rejection.
        let mut r = lease(4, "d");
        r.attrs.public_ip = Ipv4Addr::UNSPECIFIED;
        let (_, s) = pv(&[r]);
        assert_eq!(s[0].reason, Reason::NotTaken);
        assert!(log.new_rejections(&s).is_empty());
        assert!(rejected_counts(&s).values().all(|n| *n == 0));
    }

    #[test]
    fn diff_of_equal_states_is_empty() {
        let ls = [lease(2, "b"), lease(3, "c")];
        let d = desired(&pv(&ls).0);
        assert!(diff(&d, &d).is_empty());
    }

    #[test]
    fn diff_adds_missing_and_deletes_stale() {
        let ls = [lease(2, "b"), lease(3, "c")];
        let d = desired(&pv(&ls).0);
        let stale_ls = [lease(9, "z")];
        let mut actual = desired(&pv(&stale_ls).0);
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
        l.attrs.backend_data.vtep_mac = Mac::derive("b-new").into();
        let after = [l];
        let actual = desired(&pv(&before).0);
        let d = desired(&pv(&after).0);
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
        let d = desired(&pv(&[lease(2, "b")]).0);
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
        let d = desired(&pv(&ls).0);
        // Left by an earlier run: a peer that no longer has a lease.
        fake.set_programmed(desired(&pv(&[lease(99, "gone")]).0));
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
            f2.set_programmed(desired(&pv(&[lease(99, "gone")]).0));
            let ops = diff(&Programmed::default(), &f2.programmed());
            apply_ops(&f2, 0, &ops, 1).await;
            f2.writes()
        };
        assert!(matches!(calls[0], FakeCall::DeleteRoute(_)), "{calls:?}");
    }

    #[test]
    fn status_splits_missing_and_stale() {
        let d = desired(&pv(&[lease(2, "b")]).0);
        let actual = desired(&pv(&[lease(3, "c")]).0);
        let s = status(&d, &actual);
        assert_eq!(s.missing.len(), 3);
        assert_eq!(s.stale.len(), 3);
        assert_eq!(s.expected, 3);
        assert_eq!(s.programmed, 3);
    }

    /// The incremental [`ValidPeers`] gives exactly what validating everything gives, after each
    /// of 3,000 random adds, changes and removes (overlapping subnets, shared PublicIPs and
    /// VtepMACs, bad values, invalid keys, this node's own lease), and the patched desired
    /// entries and touched diff match the full ones.
    #[test]
    fn peer_set_updates_match_a_full_validation() {
        let v = val();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut leases: BTreeMap<Ipv4Net, Lease> = BTreeMap::new();
        let mut invalid: BTreeMap<String, InvalidLease> = BTreeMap::new();
        let mut set = ValidPeers::default();
        set.rebuild(&leases, &invalid, &v);
        let mut want = Programmed::default();
        let mut actual = Programmed::default();
        let mut rev = 10;
        let mut incremental = 0;
        for step in 0..3000 {
            let mut ch = LeaseChanges::default();
            rev += 1;
            match rnd(10) {
                0..=5 => {
                    // Add or change: sometimes a /23 over two /24s, a shared IP or MAC.
                    let n = rnd(40) as u8;
                    let mut l = lease(n, &format!("n{}", rnd(50)));
                    if rnd(8) == 0 {
                        l.subnet = format!("10.244.{}.0/23", n & !1).parse().unwrap();
                    }
                    l.attrs.public_ip = Ipv4Addr::new(192, 168, 1, rnd(60) as u8 + 1);
                    if rnd(10) == 0 {
                        l.attrs.backend_data.vtep_mac = "zz".into();
                    }
                    l.create_revision = leases.get(&l.subnet).map_or(rev, |o| o.create_revision);
                    l.mod_revision = rev;
                    ch.subnets.insert(l.subnet);
                    leases.insert(l.subnet, l);
                }
                6..=8 => {
                    if let Some(s) = leases
                        .keys()
                        .nth(rnd(leases.len() as u64 + 1) as usize)
                        .copied()
                    {
                        leases.remove(&s);
                        ch.subnets.insert(s);
                    }
                }
                _ => {
                    let key = format!("10.244.{}.0-0{}", rnd(5), 24);
                    if invalid.remove(&key).is_none() {
                        invalid.insert(
                            key.clone(),
                            InvalidLease {
                                key: key.clone(),
                                kind: InvalidKind::Key,
                                detail: "not canonical".into(),
                                create_revision: rev,
                                mod_revision: rev,
                            },
                        );
                    }
                    ch.invalid_keys.insert(key);
                }
            }
            let delta = set.update(&leases, &invalid, &v, &ch);
            let (full_peers, full_skipped) = peers_of_map(&leases, &invalid, &v);
            let got: Vec<Peer> = set.peers().values().copied().collect();
            assert_eq!(got, full_peers, "step {step}");
            let got_skipped: Vec<Skipped> = set.skipped().cloned().collect();
            assert_eq!(got_skipped, full_skipped, "step {step}");
            let mut full_ips: Vec<Ipv4Addr> =
                full_peers.iter().filter_map(Peer::public_v4).collect();
            full_ips.sort();
            assert_eq!(
                set.public_v4s().collect::<Vec<_>>(),
                full_ips,
                "step {step}"
            );
            assert!(
                full_ips.iter().all(|ip| set.has_public_ip(*ip)),
                "step {step}"
            );
            let ops = if delta.full {
                want = desired(&full_peers);
                diff(&want, &actual)
            } else {
                incremental += 1;
                patch_desired(&mut want, &delta, &Direct::default());
                let touched: Vec<Peer> =
                    delta.removed.iter().chain(&delta.added).copied().collect();
                diff_touched(&want, &actual, &touched)
            };
            assert_eq!(want, desired(&full_peers), "step {step}");
            for op in &ops {
                op.apply_to(&mut actual);
            }
            assert_eq!(actual, want, "step {step}: {ops:?}");
        }
        assert!(
            incremental > 1000,
            "only {incremental} steps were incremental"
        );
    }

    const UNDERLAY: u32 = 7;

    fn on_link() -> RoutePath {
        RoutePath {
            oif: Some(UNDERLAY),
            gateway: None,
            unicast: true,
        }
    }

    fn routed() -> RoutePath {
        RoutePath {
            gateway: Some(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 254))),
            ..on_link()
        }
    }

    /// The fake kernel routes lease(n)'s public IP 192.168.0.n as `paths` say; the modes
    /// come from the lookups through the Overlay trait, as twilld makes them.
    async fn modes(fake: &FakeOverlay, peers: &[Peer], before: &Direct) -> Direct {
        crate::daemon::decide_direct(fake, peers, UNDERLAY, before).await
    }

    /// A peer on the segment (no gateway, out of the underlay) gets only a direct route via
    /// its public IP on the underlay; a peer behind a gateway or without a route keeps the
    /// three VXLAN entries.
    #[tokio::test]
    async fn direct_peers_get_one_route_on_the_underlay() {
        let fake = FakeOverlay::new();
        let (p, _) = pv(&[lease(2, "b"), lease(3, "c"), lease(4, "d")]);
        fake.set_path(Ipv4Addr::new(192, 168, 0, 2), Some(on_link()));
        fake.set_path(Ipv4Addr::new(192, 168, 0, 3), Some(routed()));
        let d = modes(&fake, &p, &Direct::default()).await;
        assert_eq!(
            d.subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["10.244.2.0/24"]
        );
        let want = desired_with(&p, &d);
        assert_eq!(
            want.direct.iter().collect::<Vec<_>>(),
            [&DirectRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: Ipv4Addr::new(192, 168, 0, 2),
                dev: UNDERLAY,
            }]
        );
        // b: no neighbour, FDB entry or VXLAN route; c and d: all three.
        assert_eq!(want.neighs.len(), 2);
        assert_eq!(want.fdbs.len(), 2);
        assert_eq!(want.routes.len(), 2);
        assert!(
            want.routes_to("10.244.2.0/24".parse().unwrap())
                .next()
                .is_none()
        );
        assert_eq!(complete_peers(&p, &want, &d).len(), 3);
        // DirectRouting off (the default Direct) is VXLAN for everyone.
        assert_eq!(desired_with(&p, &Direct::default()), desired(&p));
        // A failed lookup keeps the mode the peer had.
        let kept = Direct::decide(&p, &BTreeMap::new(), UNDERLAY);
        assert!(kept.subnets.is_empty());
    }

    /// A peer that switches between VXLAN and direct: one route replace (no delete of its
    /// route, which could run before the replace), and its neighbour and FDB entry go only
    /// after the route is swapped; back to VXLAN: neighbour and FDB first, then the replace.
    /// Both converge, and a second pass writes nothing.
    #[tokio::test]
    async fn switching_mode_replaces_the_route_in_place() {
        let fake = FakeOverlay::new();
        let (p, _) = pv(&[lease(2, "b"), lease(3, "c")]);
        let vx = desired(&p);
        fake.set_programmed(vx.clone());
        fake.set_path(Ipv4Addr::new(192, 168, 0, 2), Some(on_link()));
        let d = modes(&fake, &p, &Direct::default()).await;
        let want = desired_with(&p, &d);
        let ops = diff(&want, &fake.dump(0).await.unwrap());
        let dst: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::DeleteRoute(r) if r.dst == dst)),
            "{ops:?}"
        );
        fake.clear_calls();
        assert!(apply_ops(&fake, 0, &ops, 1).await.is_empty());
        let w = fake.writes();
        assert!(
            matches!(w[0], FakeCall::ReplaceDirect(r) if r.dst == dst),
            "{w:?}"
        );
        assert_eq!(
            w.len(),
            3,
            "replace direct, delete neigh, delete fdb: {w:?}"
        );
        assert_eq!(fake.programmed(), want);
        assert!(diff(&want, &fake.programmed()).is_empty());
        // The segment changes (a gateway now): back to VXLAN.
        fake.set_path(Ipv4Addr::new(192, 168, 0, 2), Some(routed()));
        let d2 = modes(&fake, &p, &d).await;
        assert!(d2.subnets.is_empty());
        let back = desired_with(&p, &d2);
        assert_eq!(back, vx);
        let ops = diff(&back, &fake.programmed());
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DeleteDirect(_))),
            "the VXLAN replace takes the direct route's place: {ops:?}"
        );
        fake.clear_calls();
        assert!(apply_ops(&fake, 0, &ops, 1).await.is_empty());
        let w = fake.writes();
        assert!(
            matches!(w.last(), Some(FakeCall::ReplaceRoute(r)) if r.dst == dst),
            "{w:?}"
        );
        assert_eq!(fake.programmed(), vx);
    }

    /// Direct routes are repaired and removed like the VXLAN ones: a wrong next hop or
    /// device is replaced, a direct route no lease asks for is deleted, an incremental
    /// patch gives what a full computation gives.
    #[tokio::test]
    async fn direct_routes_drift_stale_and_patch() {
        let (p, _) = pv(&[lease(2, "b"), lease(3, "c")]);
        let d = Direct {
            dev: UNDERLAY,
            subnets: p.iter().map(|p| p.subnet).collect(),
        };
        let want = desired_with(&p, &d);
        assert_eq!(want.len(), 2);
        let mut actual = want.clone();
        let r2 = *actual.direct.iter().next().unwrap();
        actual.direct.remove(&r2);
        actual.direct.insert(DirectRoute {
            via: Ipv4Addr::new(192, 168, 0, 99),
            ..r2
        });
        let stale = DirectRoute {
            dst: "10.244.9.0/24".parse().unwrap(),
            via: Ipv4Addr::new(192, 168, 0, 9),
            dev: UNDERLAY,
        };
        actual.direct.insert(stale);
        let ops = diff(&want, &actual);
        assert_eq!(
            ops,
            vec![Op::ReplaceDirect(r2), Op::DeleteDirect(stale)],
            "{ops:?}"
        );
        let moved = DirectRoute { dev: 8, ..r2 };
        let mut a2 = want.clone();
        a2.direct.remove(&r2);
        a2.direct.insert(moved);
        assert_eq!(diff(&want, &a2), vec![Op::ReplaceDirect(r2)]);
        // Incremental: peer b leaves, peer e joins directly.
        let (p2, _) = pv(&[lease(3, "c"), lease(5, "e")]);
        let mut d2 = d.clone();
        d2.subnets.remove(&p[0].subnet);
        d2.subnets.insert("10.244.5.0/24".parse().unwrap());
        let delta = PeerDelta {
            full: false,
            removed: vec![p[0]],
            added: vec![p2[1]],
        };
        let mut patched = want.clone();
        patch_desired(&mut patched, &delta, &d2);
        assert_eq!(patched, desired_with(&p2, &d2));
        let touched: Vec<Peer> = vec![p[0], p2[1]];
        let ops = diff_touched(&patched, &want, &touched);
        assert_eq!(ops.len(), 2, "{ops:?}");
    }
}
