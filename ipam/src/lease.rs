//! Subnet leases: the value under `<prefix>/subnets/<net>-<len>`, in Flannel's JSON field
//! names plus twill's own (`NodeName`). Fields written by another version are kept.
//!
//! Dual-stack, in Flannel's format: the key is [`SubnetKey`] (`10.244.3.0-24&fc00:0:0:3::-64`),
//! the value carries `PublicIPv6` and `BackendV6Data` ([`LeaseAttrs::public_ipv6`],
//! [`LeaseAttrs::backend_v6_data`]), checked by [`LeaseAttrs::ipv6_endpoint`].

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::mac::Mac;
use crate::netconf::BACKEND_VXLAN;

/// A lease value or key that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("lease key {key:?} is not of the form <net>-<len> (e.g. 10.244.3.0-24)")]
    Key { key: String },
    #[error("lease value of {key:?} is not valid lease JSON: {reason}")]
    Value { key: String, reason: String },
    #[error(
        "lease key {key:?} is not of the form <net>-<len>[&<IPv6 net>-<len>] (e.g. 10.244.3.0-24&fc00:0:0:3::-64): {reason}"
    )]
    SubnetKey { key: String, reason: String },
    /// Flannel's IPv6-only key (`0.0.0.0-0&<IPv6 net>-<len>`): twill needs an IPv4 subnet.
    #[error(
        "lease key {key:?} is IPv6-only (no IPv4 subnet): twill needs an IPv4 subnet in every lease key"
    )]
    Ipv6Only { key: String },
    /// A field of a readable lease that cannot be used ([`LeaseAttrs::ipv6_endpoint`]).
    #[error("lease field {field}: {value} is invalid: {reason}")]
    Field {
        field: &'static str,
        value: String,
        reason: String,
    },
}

fn field_error(field: &'static str, value: impl ToString, reason: &str) -> LeaseError {
    LeaseError::Field {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// `BackendData.VtepMAC`, parsed once when the lease is read. Written back as read, except
/// that a MAC is written in lower case (as Flannel writes it); a value that is not a MAC is
/// kept as written, so that the lease is still listed and can be rejected by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VtepMac {
    /// Absent or empty: a reservation whose node has not taken it yet.
    #[default]
    Unset,
    /// A MAC in the form `aa:bb:cc:dd:ee:ff` (either case).
    Mac(Mac),
    /// Anything else, as written (twilld rejects the lease as `bad_vtep_mac`).
    Invalid(String),
}

impl VtepMac {
    /// Reads the JSON string: `""` is [`VtepMac::Unset`].
    pub fn parse(s: &str) -> VtepMac {
        if s.is_empty() {
            return VtepMac::Unset;
        }
        match s.parse() {
            Ok(m) => VtepMac::Mac(m),
            Err(_) => VtepMac::Invalid(s.to_string()),
        }
    }

    /// The MAC, if the value is one.
    pub fn mac(&self) -> Option<Mac> {
        match self {
            VtepMac::Mac(m) => Some(*m),
            _ => None,
        }
    }

    pub fn is_unset(&self) -> bool {
        matches!(self, VtepMac::Unset)
    }
}

/// The JSON string: empty, the MAC in lower case, or the invalid value as written.
impl fmt::Display for VtepMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VtepMac::Unset => Ok(()),
            VtepMac::Mac(m) => fmt::Display::fmt(m, f),
            VtepMac::Invalid(s) => f.write_str(s),
        }
    }
}

impl From<Mac> for VtepMac {
    fn from(m: Mac) -> Self {
        VtepMac::Mac(m)
    }
}

impl From<&str> for VtepMac {
    fn from(s: &str) -> Self {
        VtepMac::parse(s)
    }
}

impl From<&String> for VtepMac {
    fn from(s: &String) -> Self {
        VtepMac::parse(s)
    }
}

impl From<String> for VtepMac {
    fn from(s: String) -> Self {
        VtepMac::parse(&s)
    }
}

/// Compares the JSON string ([`fmt::Display`]) with `other`.
impl PartialEq<str> for VtepMac {
    fn eq(&self, other: &str) -> bool {
        match self {
            VtepMac::Unset => other.is_empty(),
            VtepMac::Mac(m) => other.parse::<Mac>().is_ok_and(|o| o == *m),
            VtepMac::Invalid(s) => s == other,
        }
    }
}

impl PartialEq<&str> for VtepMac {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl Serialize for VtepMac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VtepMac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(VtepMac::parse(&String::deserialize(d)?))
    }
}

/// `BackendData` of a Flannel VXLAN lease.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC", default)]
    pub vtep_mac: VtepMac,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `PublicIPv6`, written back as read: absent (twill's IPv4-only leases), `null` (Flannel's
/// IPv4-only leases: Go writes its nil pointer), an address, or anything else as written (the
/// lease is still listed; [`LeaseAttrs::ipv6_endpoint`] names the field and the value).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PublicIpv6 {
    #[default]
    Absent,
    Null,
    Addr(Ipv6Addr),
    Invalid(Value),
}

impl PublicIpv6 {
    /// The address, if the field holds one.
    pub fn addr(&self) -> Option<Ipv6Addr> {
        match self {
            PublicIpv6::Addr(a) => Some(*a),
            _ => None,
        }
    }

    pub fn is_absent(&self) -> bool {
        matches!(self, PublicIpv6::Absent)
    }
}

impl From<Ipv6Addr> for PublicIpv6 {
    fn from(a: Ipv6Addr) -> Self {
        PublicIpv6::Addr(a)
    }
}

impl Serialize for PublicIpv6 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PublicIpv6::Absent | PublicIpv6::Null => s.serialize_none(),
            PublicIpv6::Addr(a) => s.collect_str(a),
            PublicIpv6::Invalid(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PublicIpv6 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => PublicIpv6::Null,
            Value::String(s) => match s.parse::<Ipv6Addr>() {
                // Only the spelling that is written back: `FC00::1` or `::ffff:1.2.3.4`
                // would otherwise not round-trip as read.
                Ok(a) if a.to_string() == s => PublicIpv6::Addr(a),
                _ => PublicIpv6::Invalid(Value::String(s)),
            },
            other => PublicIpv6::Invalid(other),
        })
    }
}

/// The IPv6 side of a peer, from a lease whose `PublicIPv6` and `BackendV6Data` are usable
/// ([`LeaseAttrs::ipv6_endpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Endpoint {
    /// `PublicIPv6`: where other nodes send IPv6 VXLAN traffic.
    pub public_ip: Ipv6Addr,
    /// `BackendV6Data.VNI`.
    pub vni: u32,
    /// `BackendV6Data.VtepMAC`.
    pub vtep_mac: Mac,
}

/// The content of a lease (its JSON value).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// `PublicIP`: where other nodes send VXLAN traffic. 0.0.0.0 in a reservation whose
    /// node has not taken it yet.
    #[serde(rename = "PublicIP", default = "unspecified")]
    pub public_ip: Ipv4Addr,
    /// `PublicIPv6` (Flannel's, dual-stack): where other nodes send IPv6 VXLAN traffic.
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "PublicIpv6::is_absent"
    )]
    pub public_ipv6: PublicIpv6,
    /// `BackendType`: "vxlan".
    #[serde(rename = "BackendType", default)]
    pub backend_type: String,
    /// `BackendData`: `VNI`, `VtepMAC`.
    #[serde(rename = "BackendData", default)]
    pub backend_data: BackendData,
    /// `BackendV6Data` (Flannel's, dual-stack): `VNI`, `VtepMAC` of the IPv6 VXLAN device.
    /// Absent in IPv4-only leases (Flannel omits it, and so does twill).
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<BackendData>,
    /// twill's `NodeName`: the node that holds (or for which is reserved) the subnet; the
    /// key of stickiness. Empty in leases written by flanneld.
    #[serde(rename = "NodeName", default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    /// Other fields (newer fields...), kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

impl LeaseAttrs {
    /// These attributes, with the fields that this version does not know taken from
    /// `older` where they are not set here: a newer version's fields survive a restart of
    /// an older twilld (rolling upgrade, roll back), at the top level and in `BackendData`.
    pub fn keeping_unknown_fields_of(&self, older: &LeaseAttrs) -> LeaseAttrs {
        let mut merged = self.clone();
        for (k, v) in &older.extra {
            merged.extra.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (k, v) in &older.backend_data.extra {
            merged
                .backend_data
                .extra
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        if let (Some(new), Some(old)) = (&mut merged.backend_v6_data, &older.backend_v6_data) {
            for (k, v) in &old.extra {
                new.extra.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        merged
    }

    /// These attributes with the IPv6 side of a dual-stack node: `PublicIPv6` and
    /// `BackendV6Data` (`VNI`, `VtepMAC` of its IPv6 VXLAN device).
    pub fn with_ipv6(
        mut self,
        public_ipv6: Ipv6Addr,
        vni: u32,
        vtep_mac: impl Into<VtepMac>,
    ) -> Self {
        self.public_ipv6 = PublicIpv6::Addr(public_ipv6);
        self.backend_v6_data = Some(BackendData {
            vni,
            vtep_mac: vtep_mac.into(),
            extra: Map::new(),
        });
        self
    }

    /// The IPv6 side of this lease: `None` when it has none (no `PublicIPv6` address, no
    /// `BackendV6Data`: an IPv4-only lease), else the checked values. Untrusted input: a
    /// `PublicIPv6` that is not a unicast address another node can reach, one of the two
    /// fields without the other, a `VtepMAC` that is not a unicast MAC, or a `VNI` of more
    /// than 24 bits is an error naming the field and the value.
    pub fn ipv6_endpoint(&self) -> Result<Option<Ipv6Endpoint>, LeaseError> {
        let data = self.backend_v6_data.as_ref();
        let ip = match (&self.public_ipv6, data) {
            (PublicIpv6::Absent | PublicIpv6::Null, None) => return Ok(None),
            (PublicIpv6::Invalid(v), _) => {
                return Err(field_error("PublicIPv6", v, "not an IPv6 address"));
            }
            (PublicIpv6::Absent, Some(_)) => {
                return Err(field_error(
                    "PublicIPv6",
                    "absent",
                    "required with BackendV6Data",
                ));
            }
            (PublicIpv6::Null, Some(_)) => {
                return Err(field_error(
                    "PublicIPv6",
                    "null",
                    "required with BackendV6Data",
                ));
            }
            (PublicIpv6::Addr(a), _) => *a,
        };
        let seg0 = ip.segments()[0];
        if ip.is_unspecified()
            || ip.is_loopback()
            || ip.is_multicast()
            || (seg0 & 0xffc0) == 0xfe80
            || ip.to_ipv4_mapped().is_some()
        {
            return Err(field_error(
                "PublicIPv6",
                ip,
                "not a unicast address another node can reach (unspecified, loopback, multicast, link-local or IPv4-mapped)",
            ));
        }
        let Some(data) = data else {
            return Err(field_error(
                "BackendV6Data",
                "absent",
                "required with PublicIPv6",
            ));
        };
        if data.vni > 0x00ff_ffff {
            return Err(field_error(
                "BackendV6Data.VNI",
                data.vni,
                "more than 24 bits",
            ));
        }
        let mac = match &data.vtep_mac {
            VtepMac::Unset => {
                return Err(field_error("BackendV6Data.VtepMAC", "\"\"", "missing"));
            }
            VtepMac::Invalid(s) => {
                return Err(field_error(
                    "BackendV6Data.VtepMAC",
                    format!("{s:?}"),
                    "not a MAC",
                ));
            }
            VtepMac::Mac(m) => *m,
        };
        if mac.0 == [0; 6] || mac.0[0] & 1 == 1 {
            return Err(field_error(
                "BackendV6Data.VtepMAC",
                mac,
                "not a unicast MAC (zero, or the multicast bit is set)",
            ));
        }
        Ok(Some(Ipv6Endpoint {
            public_ip: ip,
            vni: data.vni,
            vtep_mac: mac,
        }))
    }

    /// Attributes of a VXLAN node (`vtep_mac`: a [`Mac`], or a string that is parsed; `""`
    /// for a reservation).
    pub fn vxlan(
        node_name: &str,
        public_ip: Ipv4Addr,
        vni: u32,
        vtep_mac: impl Into<VtepMac>,
    ) -> Self {
        LeaseAttrs {
            public_ip,
            backend_type: BACKEND_VXLAN.to_string(),
            backend_data: BackendData {
                vni,
                vtep_mac: vtep_mac.into(),
                extra: Map::new(),
            },
            node_name: node_name.to_string(),
            public_ipv6: PublicIpv6::Absent,
            backend_v6_data: None,
            extra: Map::new(),
        }
    }

    /// `BackendData.VNI`.
    pub fn vni(&self) -> u32 {
        self.backend_data.vni
    }

    /// `BackendData.VtepMAC`.
    pub fn vtep_mac(&self) -> &VtepMac {
        &self.backend_data.vtep_mac
    }

    /// Whether a peer can route to this node: a public IP and a VTEP MAC are set (false for
    /// a reservation that its node has not taken yet). A VTEP MAC that is set but is not a
    /// MAC counts as set: such a lease is rejected as a bad lease, not skipped as a
    /// reservation.
    pub fn is_routable(&self) -> bool {
        !self.public_ip.is_unspecified() && !self.backend_data.vtep_mac.is_unset()
    }

    /// The JSON value stored in etcd.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializing lease attrs cannot fail")
    }

    /// Parses a lease value; `key` is only used in the error.
    pub fn from_json(key: &str, json: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(json).map_err(|e| LeaseError::Value {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

/// One lease as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The IPv4 subnet (the key's `<net>-<len>`, before any `&<IPv6 net>-<len>`).
    pub subnet: Ipv4Net,
    /// The IPv6 subnet of a dual-stack key (`...&<IPv6 net>-<len>`); `None` for an IPv4-only
    /// key. The key's name is [`Lease::key`]: a dual-stack key and an IPv4-only key of the
    /// same IPv4 subnet are two leases, and of such aliases only the older one is used (see
    /// [`resolve_aliases`]).
    pub ipv6_subnet: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
    /// A reservation: the key has no etcd lease (no TTL) and never expires.
    pub reserved: bool,
    /// The etcd lease the key is bound to (0 when reserved).
    pub etcd_lease: i64,
    /// When the key expires, if known: only filled by calls that ask etcd for the remaining
    /// TTL ([`crate::store::LeaseStore::list_with_ttl`], or right after an acquire).
    pub expires: Option<SystemTime>,
    /// etcd revision of the key's last change.
    pub mod_revision: i64,
    /// etcd revision at which the key was created: the age of the lease. Of two leases that
    /// conflict (overlapping subnets, one VTEP MAC or PublicIP) the older one (lower create
    /// revision) is used. For a lease returned by an acquire or a reserve, the revision of
    /// that write.
    pub create_revision: i64,
}

impl Lease {
    /// The node's address in its subnet (the VXLAN device's /32 and the next hop of the
    /// route to it): the subnet's network address, as Flannel does.
    pub fn net_addr(&self) -> Ipv4Addr {
        self.subnet.network()
    }

    /// The lease's key: its IPv4 subnet, and its IPv6 subnet if it has one.
    pub fn key(&self) -> SubnetKey {
        SubnetKey::new(Some(self.subnet), self.ipv6_subnet).expect("an IPv4 subnet is given")
    }

    /// The same lease content (attrs, binding), whatever revision it was read at.
    pub fn same_content(&self, other: &Lease) -> bool {
        self.subnet == other.subnet
            && self.attrs == other.attrs
            && self.ipv6_subnet == other.ipv6_subnet
            && self.reserved == other.reserved
            && self.etcd_lease == other.etcd_lease
    }
}

/// A change in the set of leases, as seen by [`crate::store::LeaseWatch`].
// `Changed` holds two leases: boxing them would only make matching clumsier for a type that
// is moved through a channel a few times per lease change.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    Added(Lease),
    Changed {
        old: Lease,
        new: Lease,
    },
    Removed(Lease),
    /// A key-value under `<prefix>/subnets/` that is not a lease (bad key or value) was put
    /// (`entry` is `Some`), or is gone or became a readable lease (`None`). Such a key never
    /// touches the lease map: an alias key like `10.244.3.0-024` neither replaces nor removes
    /// the lease of `10.244.3.0-24`.
    Invalid {
        key: String,
        entry: Option<InvalidLease>,
    },
    /// The watch has delivered the complete state as of `revision` (after the first list,
    /// and again after every re-list that followed a compaction). Between `Synced` events
    /// only incremental events arrive.
    Synced {
        revision: i64,
    },
}

/// `10.244.3.0/24` -> `10.244.3.0-24` (the key name under `<prefix>/subnets/`).
pub fn subnet_to_key(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// `10.244.3.0-24` -> `10.244.3.0/24`. Only the canonical key is accepted, the exact string
/// that [`subnet_to_key`] gives: no host bits, no leading zeros in an octet or in the prefix
/// length (`10.244.3.0-024` would otherwise be a second key for the same subnet, and a put
/// or delete of that alias would replace or remove the real lease in a map keyed by subnet).
pub fn key_to_subnet(key: &str) -> Result<Ipv4Net, LeaseError> {
    let bad = || LeaseError::Key {
        key: key.to_string(),
    };
    let (addr, len) = key.split_once('-').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv4Net::new(addr, len).map_err(|_| bad())?;
    if subnet_to_key(&net) != key {
        return Err(bad());
    }
    Ok(net)
}

/// A lease key in Flannel's dual-stack format (`MakeSubnetKey` / `ParseSubnetKey` in
/// flannel's `pkg/subnet/subnet.go`): `10.244.3.0-24` (IPv4 only),
/// `10.244.3.0-24&fc00:0:0:3::-64` (dual-stack), `0.0.0.0-0&fc00:0:0:3::-64` (IPv6 only:
/// Flannel's key always starts with an IPv4 part, and writes its empty IPv4 subnet there).
///
/// Only the canonical key parses, the exact string [`fmt::Display`] writes: each part as
/// [`key_to_subnet`] wants it (no host bits, no leading zeros), the IPv6 address as RFC 5952
/// and Go's `net.IP.String()` write it (lower case, the longest run of zeros compressed; no
/// dotted IPv4 tail, which Go would write differently and Flannel's parser refuses), so that
/// no two keys name the same subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
}

impl SubnetKey {
    /// The key of these subnets (host bits dropped); `None` if neither is given. With an
    /// IPv6 subnet, an IPv4 subnet of 0.0.0.0/0 is Flannel's "none".
    pub fn new(v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Option<SubnetKey> {
        let v4 = v4.map(|n| n.trunc());
        let v6 = v6.map(|n| n.trunc());
        let v4 = v4.filter(|n| v6.is_none() || n.prefix_len() != 0);
        (v4.is_some() || v6.is_some()).then_some(SubnetKey { v4, v6 })
    }

    /// An IPv4-only key (what [`subnet_to_key`] writes).
    pub fn v4_only(subnet: Ipv4Net) -> SubnetKey {
        SubnetKey {
            v4: Some(subnet.trunc()),
            v6: None,
        }
    }

    /// The IPv4 subnet, if the key has one.
    pub fn v4(&self) -> Option<Ipv4Net> {
        self.v4
    }

    /// The IPv6 subnet, if the key has one.
    pub fn v6(&self) -> Option<Ipv6Net> {
        self.v6
    }

    /// Parses a key name (without `<prefix>/subnets/`); only the canonical spelling.
    pub fn parse(key: &str) -> Result<SubnetKey, LeaseError> {
        let bad = |reason: &str| LeaseError::SubnetKey {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let (v4_part, v6_part) = match key.split_once('&') {
            None => (key, None),
            Some((a, b)) => (a, Some(b)),
        };
        let v4 = key_to_subnet(v4_part)
            .map_err(|_| bad("the IPv4 part is not a canonical <net>-<len>"))?;
        let Some(v6_part) = v6_part else {
            return Ok(SubnetKey::v4_only(v4));
        };
        let (addr, len) = v6_part
            .split_once('-')
            .ok_or_else(|| bad("the IPv6 part has no -<len>"))?;
        if addr.contains('.') {
            return Err(bad("the IPv6 part has a dotted IPv4 tail"));
        }
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| bad("the IPv6 part is not an IPv6 address"))?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the IPv6 prefix length is not a number"));
        }
        let len: u8 = len
            .parse()
            .map_err(|_| bad("the IPv6 prefix length is not a number"))?;
        let v6 = Ipv6Net::new(addr, len).map_err(|_| bad("the IPv6 prefix length is above 128"))?;
        let k = SubnetKey::new(Some(v4), Some(v6)).expect("an IPv6 subnet is given");
        if k.to_string() != key {
            return Err(bad(
                "not the canonical spelling (host bits, leading zeros, upper case or an uncompressed address)",
            ));
        }
        Ok(k)
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.v4 {
            Some(n) => f.write_str(&subnet_to_key(&n))?,
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(n) = self.v6 {
            write!(f, "&{}-{}", n.network(), n.prefix_len())?;
        }
        Ok(())
    }
}

impl FromStr for SubnetKey {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        SubnetKey::parse(s)
    }
}

/// What is wrong with a key-value under `<prefix>/subnets/` that is not a lease at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidKind {
    /// The key is not a canonical lease key ([`lease_key`]: `<net>-<len>`, optionally
    /// `&<IPv6 net>-<len>`), is IPv6-only, or is a readable lease whose IPv4 subnet an older
    /// key holds ([`resolve_aliases`]).
    Key,
    /// The key is fine, the value is not lease JSON.
    Value,
}

/// A key-value under `<prefix>/subnets/` that cannot be read as a lease. Kept (not dropped)
/// so that the daemon and twillctl can report it as a rejected lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLease {
    /// The key name under `<prefix>/subnets/` (lossy UTF-8), e.g. `10.244.3.0-024`.
    pub key: String,
    pub kind: InvalidKind,
    /// The parser's error, for people.
    pub detail: String,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// The key name of a lease (without `<prefix>/subnets/`): `<net>-<len>` ([`key_to_subnet`],
/// its error as before) or Flannel's dual-stack `<net>-<len>&<IPv6 net>-<len>`
/// ([`SubnetKey::parse`]). The key always has an IPv4 subnet: Flannel's IPv6-only key
/// (`0.0.0.0-0&...`) is [`LeaseError::Ipv6Only`].
pub fn lease_key(name: &str) -> Result<SubnetKey, LeaseError> {
    if !name.contains('&') {
        return key_to_subnet(name).map(SubnetKey::v4_only);
    }
    let k = SubnetKey::parse(name)?;
    if k.v4().is_none() {
        return Err(LeaseError::Ipv6Only {
            key: name.to_string(),
        });
    }
    Ok(k)
}

/// The IPv4 subnet of a lease key name, if it is one ([`lease_key`]).
pub fn lease_key_subnet(name: &str) -> Option<Ipv4Net> {
    lease_key(name).ok().and_then(|k| k.v4())
}

/// Of two leases of one IPv4 subnet, whether `a` is used before `b`: the older one (lower
/// create revision), then the lower key name. The same rule as every other conflict.
fn older(a: &Lease, b: &Lease) -> bool {
    (a.create_revision, a.key().to_string()) < (b.create_revision, b.key().to_string())
}

/// `loser` as a key-value that is not used: another key of its IPv4 subnet (`winner`) is
/// older. Reported by its own key name, as a key-value that is not a lease
/// ([`InvalidKind::Key`]).
pub fn aliased(loser: &Lease, winner: &Lease) -> InvalidLease {
    InvalidLease {
        key: loser.key().to_string(),
        kind: InvalidKind::Key,
        detail: format!(
            "lease key {:?} has the IPv4 subnet {} of the older lease key {:?} (created at revision {}, this one at {}): only the older key is used",
            loser.key().to_string(),
            loser.subnet,
            winner.key().to_string(),
            winner.create_revision,
            loser.create_revision
        ),
        create_revision: loser.create_revision,
        mod_revision: loser.mod_revision,
    }
}

/// Splits readable leases into the ones used, one per IPv4 subnet (sorted by subnet), and
/// the keys that alias a used one: an IPv4-only key and a dual-stack key of the same IPv4
/// subnet (or two dual-stack keys) are two etcd keys; the older one is used, the other is
/// returned as an [`InvalidLease`] naming both keys (never dropped silently).
pub fn resolve_aliases(leases: Vec<Lease>) -> (Vec<Lease>, Vec<InvalidLease>) {
    let mut used: std::collections::BTreeMap<Ipv4Net, Lease> = Default::default();
    let mut losers: Vec<Lease> = Vec::new();
    for l in leases {
        match used.get_mut(&l.subnet) {
            None => {
                used.insert(l.subnet, l);
            }
            Some(w) if older(&l, w) => losers.push(std::mem::replace(w, l)),
            Some(_) => losers.push(l),
        }
    }
    let mut invalid: Vec<InvalidLease> = losers
        .iter()
        .map(|l| aliased(l, &used[&l.subnet]))
        .collect();
    invalid.sort_by(|a, b| a.key.cmp(&b.key));
    (used.into_values().collect(), invalid)
}

/// Reads one key-value under `<prefix>/subnets/` (`name` is the key without that prefix):
/// a lease, or why it is none. `reserved`/`etcd_lease` come from the key's etcd lease id.
pub fn parse_lease(
    name: &str,
    value: &[u8],
    etcd_lease: i64,
    create_revision: i64,
    mod_revision: i64,
) -> Result<Lease, InvalidLease> {
    let invalid = |kind, e: LeaseError| InvalidLease {
        key: name.to_string(),
        kind,
        detail: e.to_string(),
        create_revision,
        mod_revision,
    };
    let key = lease_key(name).map_err(|e| invalid(InvalidKind::Key, e))?;
    let attrs = LeaseAttrs::from_json(name, value).map_err(|e| invalid(InvalidKind::Value, e))?;
    Ok(Lease {
        subnet: key.v4().expect("lease_key gives an IPv4 subnet"),
        ipv6_subnet: key.v6(),
        attrs,
        reserved: etcd_lease == 0,
        etcd_lease,
        expires: None,
        mod_revision,
        create_revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip() {
        let net: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_to_key(&net), "10.244.3.0-24");
        assert_eq!(key_to_subnet("10.244.3.0-24").unwrap(), net);
        for bad in [
            "10.244.3.0/24",
            "10.244.3.0-",
            "10.244.3.0-33",
            "10.244.3.1-24",
            "x-24",
            "10.244.3.0-+4",
            "10.244.3.0-024",
            "10.244.3.0-00000000000000000024",
            "010.244.3.0-24",
            "10.244.03.0-24",
            "10.244.3.0-24 ",
            " 10.244.3.0-24",
            "10.244.3.0--24",
            "10.244.3.0-24-",
            "",
        ] {
            assert!(key_to_subnet(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_lease_says_what_is_wrong() {
        let ok = parse_lease("10.244.3.0-24", br#"{"PublicIP":"10.0.0.1"}"#, 5, 3, 4).unwrap();
        assert_eq!(ok.subnet, "10.244.3.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(
            (ok.create_revision, ok.mod_revision, ok.etcd_lease),
            (3, 4, 5)
        );
        assert!(!ok.reserved);
        let k = parse_lease("10.244.3.0-024", b"{}", 0, 3, 4).unwrap_err();
        assert_eq!(k.kind, InvalidKind::Key);
        assert_eq!(k.key, "10.244.3.0-024");
        let v = parse_lease("10.244.3.0-24", b"nope", 0, 3, 4).unwrap_err();
        assert_eq!(v.kind, InvalidKind::Value);
        assert!(v.detail.contains("10.244.3.0-24"), "{}", v.detail);
    }

    /// Flannel's dual-stack key is a lease with both subnets; its IPv6-only key and a broken
    /// dual-stack key are not leases, and the reason names the key.
    #[test]
    fn parse_lease_reads_dual_stack_keys() {
        let v = br#"{"PublicIP":"10.0.0.1"}"#;
        let l = parse_lease("10.244.3.0-24&fc00:0:0:3::-64", v, 5, 3, 4).unwrap();
        assert_eq!(l.subnet, "10.244.3.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(l.ipv6_subnet, Some("fc00:0:0:3::/64".parse().unwrap()));
        assert_eq!(l.key().to_string(), "10.244.3.0-24&fc00:0:0:3::-64");
        let l = parse_lease("10.244.3.0-24", v, 5, 3, 4).unwrap();
        assert_eq!(
            (l.ipv6_subnet, l.key().to_string()),
            (None, "10.244.3.0-24".into())
        );
        let e = parse_lease("0.0.0.0-0&fc00:0:0:3::-64", v, 5, 3, 4).unwrap_err();
        assert_eq!(e.kind, InvalidKind::Key);
        assert!(
            e.detail
                .contains(r#""0.0.0.0-0&fc00:0:0:3::-64" is IPv6-only"#),
            "{}",
            e.detail
        );
        for bad in [
            "10.244.3.0-24&fc00:0:0:3::1-64",
            "10.244.3.0-24&",
            "10.244.3.0-024&fc00::-64",
        ] {
            let e = parse_lease(bad, v, 5, 3, 4).unwrap_err();
            assert_eq!(e.kind, InvalidKind::Key, "{bad}");
            assert!(
                e.detail.contains(&format!("{bad:?}")),
                "{bad}: {}",
                e.detail
            );
        }
        // An IPv4-only key keeps its error text.
        let e = parse_lease("10.244.3.0-024", v, 5, 3, 4).unwrap_err();
        assert!(
            e.detail.contains("is not of the form <net>-<len> (e.g."),
            "{}",
            e.detail
        );
        assert_eq!(
            lease_key_subnet("10.244.3.0-24&fc00:0:0:3::-64"),
            Some("10.244.3.0/24".parse().unwrap())
        );
        assert_eq!(lease_key_subnet("0.0.0.0-0&fc00:0:0:3::-64"), None);
    }

    /// An IPv4-only key and a dual-stack key of one IPv4 subnet are two leases: the older one
    /// is used, the other is reported by name with both keys, whatever the input order.
    #[test]
    fn aliases_of_one_subnet_older_wins() {
        let v = br#"{"PublicIP":"10.0.0.1"}"#;
        let v4 = parse_lease("10.244.3.0-24", v, 5, 10, 10).unwrap();
        let ds = parse_lease("10.244.3.0-24&fc00:0:0:3::-64", v, 5, 7, 9).unwrap();
        let ds2 = parse_lease("10.244.3.0-24&fc00:0:0:4::-64", v, 5, 12, 12).unwrap();
        let other = parse_lease("10.244.4.0-24", v, 5, 20, 20).unwrap();
        for input in [
            vec![v4.clone(), ds.clone(), ds2.clone(), other.clone()],
            vec![other.clone(), ds2.clone(), v4.clone(), ds.clone()],
        ] {
            let (used, aliases) = resolve_aliases(input);
            assert_eq!(used, vec![ds.clone(), other.clone()]);
            let keys: Vec<&str> = aliases.iter().map(|i| i.key.as_str()).collect();
            assert_eq!(keys, ["10.244.3.0-24", "10.244.3.0-24&fc00:0:0:4::-64"]);
            assert!(aliases.iter().all(|i| i.kind == InvalidKind::Key));
            assert!(
                aliases[0]
                    .detail
                    .contains(r#"older lease key "10.244.3.0-24&fc00:0:0:3::-64""#),
                "{}",
                aliases[0].detail
            );
            assert_eq!(aliases[0].create_revision, 10);
        }
        // Same create revision: the lower key name.
        let a = parse_lease("10.244.3.0-24", v, 5, 7, 7).unwrap();
        let (used, _) = resolve_aliases(vec![ds.clone(), a.clone()]);
        assert_eq!(used, vec![a]);
    }

    #[test]
    fn reads_flannel_lease_and_keeps_unknown_fields() {
        let flannel = br#"{"PublicIP":"192.168.1.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"9a:2b:3c:4d:5e:6f","Extra":7},"Zone":"b"}"#;
        let a = LeaseAttrs::from_json("k", flannel).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 1, 5));
        assert_eq!(a.vni(), 1);
        assert_eq!(a.vtep_mac(), "9a:2b:3c:4d:5e:6f");
        assert_eq!(
            a.vtep_mac().mac(),
            Some(Mac([0x9a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f]))
        );
        assert_eq!(a.node_name, "");
        assert!(a.is_routable());
        let out: Value = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(out["Zone"], "b");
        assert_eq!(out["BackendData"]["Extra"], 7);
        assert!(out.get("PublicIPv6").is_some());
        assert!(out.get("NodeName").is_none());
    }

    #[test]
    fn twill_lease_json() {
        let a = LeaseAttrs::vxlan("node-1", Ipv4Addr::new(10, 0, 0, 1), 1, "aa:bb:cc:dd:ee:ff");
        let json = a.to_json();
        assert_eq!(
            json,
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"},"NodeName":"node-1"}"#
        );
        assert_eq!(LeaseAttrs::from_json("k", json.as_bytes()).unwrap(), a);
        let reserved = LeaseAttrs::from_json("k", br#"{"NodeName":"n"}"#).unwrap();
        assert!(!reserved.is_routable());
        assert!(LeaseAttrs::from_json("k", b"nope").is_err());
    }

    #[test]
    fn vtep_mac_is_typed_once_and_written_back_as_read() {
        let read = |v: &str| {
            let json = format!(
                r#"{{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":{v}}}}}"#
            );
            LeaseAttrs::from_json("k", json.as_bytes())
        };
        let good = read(r#""02:00:00:00:00:0a""#).unwrap();
        assert_eq!(good.vtep_mac(), &VtepMac::Mac(Mac([2, 0, 0, 0, 0, 0x0a])));
        assert!(good.is_routable());
        // Upper case is a MAC too; it is written back in Flannel's lower case.
        let upper = read(r#""0A:1B:2C:3D:4E:5F""#).unwrap();
        assert_eq!(
            upper.vtep_mac().mac().unwrap().to_string(),
            "0a:1b:2c:3d:4e:5f"
        );
        assert!(upper.to_json().contains(r#""VtepMAC":"0a:1b:2c:3d:4e:5f""#));
        // Not a MAC: still a lease (listed, rejected by twilld by name), kept as written.
        for bad in [
            "zz",
            "+a:+b:+c:dd:ee:ff",
            "0a-1b-2c-3d-4e-5f",
            " 02:00:00:00:00:0a",
        ] {
            let a = read(&serde_json::to_string(bad).unwrap()).unwrap();
            assert_eq!(a.vtep_mac(), &VtepMac::Invalid(bad.to_string()), "{bad}");
            assert_eq!(a.vtep_mac().mac(), None);
            assert!(a.is_routable(), "{bad}: a bad lease, not a reservation");
            let back = LeaseAttrs::from_json("k", a.to_json().as_bytes()).unwrap();
            assert_eq!(back, a);
            assert_eq!(a.vtep_mac().to_string(), bad);
        }
        // Absent or empty: a reservation, written back as "" as before.
        let empty = read(r#""""#).unwrap();
        assert!(empty.vtep_mac().is_unset() && !empty.is_routable());
        assert!(empty.to_json().contains(r#""VtepMAC":"""#));
        let absent = LeaseAttrs::from_json("k", br#"{"PublicIP":"10.0.0.1"}"#).unwrap();
        assert!(absent.vtep_mac().is_unset() && !absent.is_routable());
        // A VtepMAC that is not a string is not lease JSON, as before.
        assert!(read("7").is_err());
        assert!(read("null").is_err());
        // Constructors and comparisons.
        let m = Mac::derive("n");
        assert_eq!(
            LeaseAttrs::vxlan("n", Ipv4Addr::LOCALHOST, 1, m),
            LeaseAttrs::vxlan("n", Ipv4Addr::LOCALHOST, 1, m.to_string().as_str())
        );
        assert_eq!(*good.vtep_mac(), "02:00:00:00:00:0a");
        assert_eq!(*good.vtep_mac(), "02:00:00:00:00:0A");
        assert!(*good.vtep_mac() != "02:00:00:00:00:0b");
        assert_eq!(VtepMac::Unset, "");
    }

    #[test]
    fn subnet_key_three_forms() {
        let k = SubnetKey::parse("10.244.3.0-24").unwrap();
        assert_eq!(k.v4(), Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(k.v6(), None);
        assert_eq!(k, SubnetKey::v4_only("10.244.3.0/24".parse().unwrap()));
        let k = SubnetKey::parse("10.244.3.0-24&fc00:0:0:3::-64").unwrap();
        assert_eq!(k.v4(), Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(k.v6(), Some("fc00:0:0:3::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "10.244.3.0-24&fc00:0:0:3::-64");
        // Flannel's own test key.
        let k: SubnetKey = "10.12.13.0-24&fd00:12:13::-56".parse().unwrap();
        assert_eq!(k.v6().unwrap().to_string(), "fd00:12:13::/56");
        // IPv6 only: Flannel writes its empty IPv4 subnet.
        let k = SubnetKey::parse("0.0.0.0-0&fc00:0:0:3::-64").unwrap();
        assert_eq!(
            (k.v4(), k.v6()),
            (None, Some("fc00:0:0:3::/64".parse().unwrap()))
        );
        assert_eq!(k.to_string(), "0.0.0.0-0&fc00:0:0:3::-64");
        assert_eq!(
            SubnetKey::new(None, Some("fc00:0:0:3::/64".parse().unwrap())),
            Some(k)
        );
        assert_eq!(SubnetKey::new(None, None), None);
        for bad in [
            // Flannel's TestSubnetNodeInvalid.
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&:12:13:-56",
            "10.12.13.0-24&20011::-56",
            "10.12.13.0-24&2001-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-24&2001::-56hi",
            // Aliases of a canonical key.
            "10.244.3.0-024&fc00:0:0:3::-64",
            "10.244.3.0-24&fc00:0:0:3::-064",
            "10.244.3.0-24&FC00:0:0:3::-64",
            "10.244.3.0-24&fc00:0000:0:3::-64",
            "10.244.3.0-24&fc00::3:0:0:0:0-64",
            "10.244.3.0-24&fc00:0:0:3::1-64",
            "10.244.3.0-24&::ffff:10.0.0.0-104",
            "10.244.3.0-24&fc00:0:0:3::-129",
            "10.244.3.0-24&fc00:0:0:3::-64&fc00:0:0:4::-64",
            "10.244.3.0-24&",
            "10.244.3.0-24&fc00:0:0:3::-",
            "10.244.3.0-24 &fc00:0:0:3::-64",
        ] {
            let e = SubnetKey::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    /// A dual-stack lease as flanneld writes it (`LeaseAttrs` of flannel's pkg/lease: no
    /// `omitempty` on PublicIPv6, `omitempty` on BackendV6Data) reads, checks and writes back
    /// byte for byte.
    #[test]
    fn flannel_dual_stack_lease_round_trips_exactly() {
        let flannel = r#"{"PublicIP":"192.168.1.5","PublicIPv6":"2001:db8::5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"9a:2b:3c:4d:5e:6f"},"BackendV6Data":{"VNI":1,"VtepMAC":"ae:7f:01:02:03:04"}}"#;
        let a = LeaseAttrs::from_json("k", flannel.as_bytes()).unwrap();
        assert_eq!(a.public_ipv6.addr(), Some("2001:db8::5".parse().unwrap()));
        assert_eq!(
            a.ipv6_endpoint().unwrap(),
            Some(Ipv6Endpoint {
                public_ip: "2001:db8::5".parse().unwrap(),
                vni: 1,
                vtep_mac: Mac([0xae, 0x7f, 1, 2, 3, 4]),
            })
        );
        assert_eq!(a.to_json(), flannel);
        // The IPv4-only forms: Flannel's null and twill's absent field, each kept.
        let v4 = r#"{"PublicIP":"192.168.1.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"9a:2b:3c:4d:5e:6f"}}"#;
        let a = LeaseAttrs::from_json("k", v4.as_bytes()).unwrap();
        assert_eq!(a.public_ipv6, PublicIpv6::Null);
        assert_eq!(a.ipv6_endpoint(), Ok(None));
        assert_eq!(a.to_json(), v4);
        // twill's dual-stack lease: Flannel's names and order, then NodeName.
        let t = LeaseAttrs::vxlan("n1", Ipv4Addr::new(10, 0, 0, 1), 1, "02:00:00:00:00:01")
            .with_ipv6("fd00::1".parse().unwrap(), 1, "02:00:00:00:00:02");
        assert_eq!(
            t.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"},"NodeName":"n1"}"#
        );
        assert_eq!(
            LeaseAttrs::from_json("k", t.to_json().as_bytes()).unwrap(),
            t
        );
        // Unknown fields of BackendV6Data survive a rewrite by this version.
        let mut older = t.clone();
        older
            .backend_v6_data
            .as_mut()
            .unwrap()
            .extra
            .insert("New".into(), 1.into());
        let merged = t.keeping_unknown_fields_of(&older);
        assert_eq!(merged.backend_v6_data.unwrap().extra["New"], 1);
    }

    #[test]
    fn ipv6_fields_are_validated_by_name() {
        let check = |v6: &str| {
            let json = format!(
                r#"{{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}{v6}}}"#
            );
            let a = LeaseAttrs::from_json("k", json.as_bytes()).unwrap();
            // Listed, and read back the same, whatever the IPv6 side holds (an absent VtepMAC
            // is written as "", as in BackendData).
            assert_eq!(
                LeaseAttrs::from_json("k", a.to_json().as_bytes()).unwrap(),
                a
            );
            match a.ipv6_endpoint() {
                Err(LeaseError::Field { field, value, .. }) => (field, value),
                other => panic!("{v6}: {other:?}"),
            }
        };
        let data = r#","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}"#;
        for (v6, field, value) in [
            (r#","PublicIPv6":"nope""#.to_string() + data, "PublicIPv6", "\"nope\""),
            (r#","PublicIPv6":7"#.to_string() + data, "PublicIPv6", "7"),
            (r#","PublicIPv6":"FD00::1""#.to_string() + data, "PublicIPv6", "\"FD00::1\""),
            (r#","PublicIPv6":"::""#.to_string() + data, "PublicIPv6", "::"),
            (r#","PublicIPv6":"::1""#.to_string() + data, "PublicIPv6", "::1"),
            (r#","PublicIPv6":"fe80::1""#.to_string() + data, "PublicIPv6", "fe80::1"),
            (r#","PublicIPv6":"ff02::1""#.to_string() + data, "PublicIPv6", "ff02::1"),
            (r#","PublicIPv6":"fd00::1""#.to_string(), "BackendV6Data", "absent"),
            (data.to_string(), "PublicIPv6", "absent"),
            (r#","PublicIPv6":null"#.to_string() + data, "PublicIPv6", "null"),
            (
                r#","PublicIPv6":"fd00::1","BackendV6Data":{"VNI":16777216,"VtepMAC":"02:00:00:00:00:02"}"#.into(),
                "BackendV6Data.VNI",
                "16777216",
            ),
            (
                r#","PublicIPv6":"fd00::1","BackendV6Data":{"VNI":1}"#.into(),
                "BackendV6Data.VtepMAC",
                "\"\"",
            ),
            (
                r#","PublicIPv6":"fd00::1","BackendV6Data":{"VNI":1,"VtepMAC":"zz"}"#.into(),
                "BackendV6Data.VtepMAC",
                "\"zz\"",
            ),
            (
                r#","PublicIPv6":"fd00::1","BackendV6Data":{"VNI":1,"VtepMAC":"01:00:00:00:00:02"}"#.into(),
                "BackendV6Data.VtepMAC",
                "01:00:00:00:00:02",
            ),
            (
                r#","PublicIPv6":"fd00::1","BackendV6Data":{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}"#.into(),
                "BackendV6Data.VtepMAC",
                "00:00:00:00:00:00",
            ),
        ] {
            assert_eq!(check(&v6), (field, value.to_string()), "{v6}");
        }
        // Not lease JSON at all: BackendV6Data of the wrong shape.
        assert!(LeaseAttrs::from_json("k", br#"{"BackendV6Data":"x"}"#).is_err());
    }
}
