//! Subnet leases: the value under `<prefix>/subnets/<net>-<len>`, in Flannel's JSON field
//! names plus twill's own (`NodeName`). Fields written by another version are kept.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::SystemTime;

use ipnet::Ipv4Net;
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

/// The content of a lease (its JSON value).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// `PublicIP`: where other nodes send VXLAN traffic. 0.0.0.0 in a reservation whose
    /// node has not taken it yet.
    #[serde(rename = "PublicIP", default = "unspecified")]
    pub public_ip: Ipv4Addr,
    /// `BackendType`: "vxlan".
    #[serde(rename = "BackendType", default)]
    pub backend_type: String,
    /// `BackendData`: `VNI`, `VtepMAC`.
    #[serde(rename = "BackendData", default)]
    pub backend_data: BackendData,
    /// twill's `NodeName`: the node that holds (or for which is reserved) the subnet; the
    /// key of stickiness. Empty in leases written by flanneld.
    #[serde(rename = "NodeName", default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    /// Other fields (`PublicIPv6`, `BackendV6Data`, newer fields...), kept as written.
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
        merged
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
    pub subnet: Ipv4Net,
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

    /// The same lease content (attrs, binding), whatever revision it was read at.
    pub fn same_content(&self, other: &Lease) -> bool {
        self.subnet == other.subnet
            && self.attrs == other.attrs
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

/// What is wrong with a key-value under `<prefix>/subnets/` that is not a lease at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidKind {
    /// The key is not a canonical `<net>-<len>` ([`key_to_subnet`]).
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
    let subnet = key_to_subnet(name).map_err(|e| invalid(InvalidKind::Key, e))?;
    let attrs = LeaseAttrs::from_json(name, value).map_err(|e| invalid(InvalidKind::Value, e))?;
    Ok(Lease {
        subnet,
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
}
