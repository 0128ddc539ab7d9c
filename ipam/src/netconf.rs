//! The network config stored at `<prefix>/config`, in Flannel's net-conf.json field names.
//!
//! Defaults follow Flannel (`pkg/subnet/config.go`): `SubnetLen` is /24 when `Network` is /22
//! or larger, else `Network`'s prefix + 2; `SubnetMin` skips the first subnet (its address
//! would clash with the network address), `SubnetMax` is the last one; `Backend.VNI` is 1 and `Backend.Port` 8472. One difference: an absent
//! `Backend.Type` means "vxlan" (twill's only backend) where Flannel assumes "udp".
//! Fields this version does not know are kept and written back unchanged (numbers too, with
//! every digit: serde_json's `arbitrary_precision`).
//!
//! Values that cannot work are refused, naming the field and the value: a `Network` shorter
//! than /8 or overlapping 0/8, 127/8, 169.254/16, 224/4 or 240/4; a `SubnetLen` outside
//! [prefix + 2, 30]; `SubnetMin`/`SubnetMax` outside `Network`, off the `SubnetLen` boundary or
//! in the wrong order; the same for `IPv6Network` (shorter than /8, inside ::/8, fe80::/10 or
//! ff00::/8, smaller than /124) and `IPv6SubnetLen` ([prefix + 2, 126]). The overlap with
//! the underlay's own subnet needs the node's addresses: [`NetConfig::check_underlay`].
//!
//! The backend is a [`Backend`] variant with its own typed settings. Flannel keys that twill
//! accepts without implementing them are named by [`NetConfig::unsupported_keys`]; whether
//! one config may replace another while leases exist is [`NetConfig::replacement_problems`].

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lease::Lease;
use crate::subnets::{Family, SubnetRange};

/// The only backend twill implements.
pub const BACKEND_VXLAN: &str = "vxlan";
/// Flannel's and Linux's VXLAN port.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// Flannel's default VNI.
pub const DEFAULT_VNI: u32 = 1;

/// Why a net-conf.json is rejected. Every variant names the field and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("net-conf.json is not valid JSON: {0}")]
    Json(String),
    #[error("field {field}: {value:?} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("field {field} is required")]
    Missing { field: &'static str },
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// IPv4 ranges that cannot be a pod network: packets to or from them are dropped, never
/// routed, or mean something else to the kernel.
const RESERVED_V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (RFC 791): not routable"),
    ("127.0.0.0/8", "loopback: never leaves a host"),
    ("169.254.0.0/16", "link-local: never routed"),
    ("224.0.0.0/4", "multicast: not a unicast pod address"),
    (
        "240.0.0.0/4",
        "reserved (class E) and broadcast: not routed",
    ),
];

/// The IPv6 counterparts: the IETF's reserved ::/8 (unspecified, loopback, IPv4-mapped),
/// link-local and multicast.
const RESERVED_V6: &[(&str, &str)] = &[
    (
        "::/8",
        "reserved (unspecified, loopback, IPv4-mapped): not routable",
    ),
    ("fe80::/10", "link-local: never routed"),
    ("ff00::/8", "multicast: not a unicast pod address"),
];

/// The shortest `Network` prefix accepted: a /8 already holds 65536 node subnets of /24; a
/// shorter one would take over a large part of the address space (or all of it, /0).
pub const MIN_NETWORK_PREFIX: u8 = 8;
/// The same for `IPv6Network`.
pub const MIN_IPV6_NETWORK_PREFIX: u8 = 8;

fn overlaps<N: PartialOrd + Copy>(a: (N, N), b: (N, N)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

fn check_network(value: &str, network: Ipv4Net) -> Result<(), ConfigError> {
    if network.prefix_len() < MIN_NETWORK_PREFIX {
        return Err(invalid(
            "Network",
            value,
            format!("too large: the prefix must be /{MIN_NETWORK_PREFIX} or longer"),
        ));
    }
    for (range, why) in RESERVED_V4 {
        let r: Ipv4Net = range.parse().expect("a valid constant");
        if overlaps(
            (network.network(), network.broadcast()),
            (r.network(), r.broadcast()),
        ) {
            return Err(invalid(
                "Network",
                value,
                format!("overlaps {range}, {why}"),
            ));
        }
    }
    Ok(())
}

fn check_ipv6_network(value: &str, network: Ipv6Net) -> Result<(), ConfigError> {
    if network.prefix_len() < MIN_IPV6_NETWORK_PREFIX {
        return Err(invalid(
            "IPv6Network",
            value,
            format!("too large: the prefix must be /{MIN_IPV6_NETWORK_PREFIX} or longer"),
        ));
    }
    for (range, why) in RESERVED_V6 {
        let r: Ipv6Net = range.parse().expect("a valid constant");
        if overlaps(
            (network.network(), network.broadcast()),
            (r.network(), r.broadcast()),
        ) {
            return Err(invalid(
                "IPv6Network",
                value,
                format!("overlaps {range}, {why}"),
            ));
        }
    }
    Ok(())
}

/// The field names of one family's subnet range, for [`parse_range`]'s errors.
struct Bounds {
    network: &'static str,
    len: &'static str,
    min: &'static str,
    max: &'static str,
}

/// Flannel's default range of `network` in `/len`s: the first subnet is skipped (its
/// address would clash with the network address), the last one is the maximum.
fn default_range<N: Family>(network: N, len: u8) -> SubnetRange<N> {
    let size = 1u128 << (N::BITS - len);
    let first = N::addr_bits(network.addr());
    let last = first + ((1u128 << (N::BITS - network.prefix())) - 1);
    SubnetRange {
        min: N::addr_from_bits(first + size),
        max: N::addr_from_bits(last - size + 1),
        len,
    }
}

/// Resolves and checks one family's `SubnetMin` / `SubnetMax` (absent: Flannel's defaults):
/// inside `network`, on a `/len` boundary, min <= max; errors name the field and the value.
fn parse_range<N: Family>(
    f: Bounds,
    network: N,
    len: u8,
    min: Option<String>,
    max: Option<String>,
) -> Result<SubnetRange<N>, ConfigError>
where
    N::Addr: FromStr + std::fmt::Display,
{
    let default = default_range(network, len);
    let size = 1u128 << (N::BITS - len);
    let first = N::addr_bits(network.addr());
    let last = first + ((1u128 << (N::BITS - network.prefix())) - 1);
    let family = if N::BITS == 32 { "IPv4" } else { "IPv6" };
    let bound = |field: &'static str, v: Option<String>, default: N::Addr| match v {
        None => Ok(default),
        Some(s) => {
            let ip: N::Addr = s
                .parse()
                .map_err(|_| invalid(field, &s, format!("not an {family} address")))?;
            let bits = N::addr_bits(ip);
            if !(first..=last).contains(&bits) {
                return Err(invalid(
                    field,
                    &s,
                    format!("outside {} {network}", f.network),
                ));
            }
            if !bits.is_multiple_of(size) {
                return Err(invalid(
                    field,
                    &s,
                    format!("not on a /{len} boundary ({})", f.len),
                ));
            }
            Ok(ip)
        }
    };
    let lo = bound(f.min, min, default.min)?;
    let hi = bound(f.max, max, default.max)?;
    if lo > hi {
        return Err(invalid(f.min, lo, format!("greater than {} {hi}", f.max)));
    }
    Ok(SubnetRange {
        min: lo,
        max: hi,
        len,
    })
}

/// `Backend` of net-conf.json: one variant per backend twill implements, each holding its
/// own typed settings, parsed from (and written back to) the `Backend` object here and
/// nowhere else. A new backend is a new variant ([`Backend::from_raw`], [`Backend::to_raw`],
/// [`Backend::changes_from`]); a new setting of a backend (VXLAN's `DirectRouting`) is a
/// field of its config, taken out of its `UNIMPLEMENTED` list.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// `"Type":"vxlan"`.
    Vxlan(VxlanBackend),
}

/// The settings of the VXLAN backend.
#[derive(Debug, Clone, PartialEq)]
pub struct VxlanBackend {
    /// `VNI`.
    pub vni: u32,
    /// `Port`: the VXLAN UDP port.
    pub port: u16,
    /// `DirectRouting` (Flannel's, default false): a peer whose PublicIP the kernel routes
    /// without a gateway on the underlay device gets a plain route via its PublicIP instead
    /// of the VXLAN one (twilld decides per peer; docs/operations.md "Direct routing").
    pub direct_routing: bool,
    /// `MTU` (Flannel's; absent, `null` or 0: derived from the underlay): the VXLAN
    /// device's MTU, and so the pods' (`FLANNEL_MTU`), unless twilld's `--mtu` overrides it.
    /// Validated: 576..=65535, at least 1280 when IPv6 is enabled; against each node's
    /// underlay by [`VxlanBackend::check_mtu`] at twilld's start.
    pub mtu: Option<u32>,
    /// Other backend fields (`GBP`, `Learning`, ...), kept as written.
    pub extra: Map<String, Value>,
}

impl VxlanBackend {
    /// Flannel's VXLAN settings that twill neither parses nor implements: kept as written,
    /// without effect; [`NetConfig::unsupported_keys`] names those that are set.
    pub const UNIMPLEMENTED: &[&str] = &["GBP", "Learning"];

    /// The smallest `MTU` accepted: the datagram size every IPv4 host must accept (RFC 791);
    /// below it pods could not even take a full-size DHCP or DNS-over-UDP answer.
    pub const MIN_MTU: u32 = 576;
    /// The smallest `MTU` accepted when IPv6 is enabled (RFC 8200's minimum link MTU).
    pub const MIN_MTU_IPV6: u32 = 1280;

    /// The keys of this backend that are set and not implemented, in Flannel's spelling
    /// without the `Backend.` prefix, sorted by name.
    fn unsupported_keys(&self) -> Vec<String> {
        let mut out: Vec<String> = Self::UNIMPLEMENTED
            .iter()
            .filter(|k| is_set(self.extra.get(**k)))
            .map(|k| k.to_string())
            .collect();
        out.sort();
        out
    }
}

impl VxlanBackend {
    /// `MTU` against a node's underlay: the VXLAN device cannot be larger than the underlay
    /// `iface`'s MTU less the encapsulation (`overhead`: 50 bytes over IPv4, 70 over IPv6),
    /// or every full-size packet between pods would be dropped. Unset: nothing to check.
    pub fn check_mtu(
        &self,
        iface: &str,
        underlay_mtu: u32,
        overhead: u32,
    ) -> Result<(), ConfigError> {
        let Some(m) = self.mtu else { return Ok(()) };
        let max = underlay_mtu.saturating_sub(overhead);
        if m > max {
            return Err(invalid(
                "Backend.MTU",
                m,
                format!(
                    "more than the MTU of the underlay {iface} ({underlay_mtu}) less VXLAN's {overhead} bytes: at most {max} on this node"
                ),
            ));
        }
        Ok(())
    }
}

impl Default for VxlanBackend {
    fn default() -> Self {
        VxlanBackend {
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            direct_routing: false,
            mtu: None,
            extra: Map::new(),
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend::Vxlan(VxlanBackend::default())
    }
}

impl Backend {
    /// `Backend.Type`, also the `BackendType` of the leases written under it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan(_) => BACKEND_VXLAN,
        }
    }

    /// The VXLAN settings. VXLAN is twill's only backend, so this cannot fail today; with a
    /// second backend it returns an `Option`, and the compiler lists the VXLAN-only callers.
    pub fn vxlan(&self) -> &VxlanBackend {
        match self {
            Backend::Vxlan(v) => v,
        }
    }

    /// The keys of this backend that Flannel defines, that are set, and that twill does
    /// not implement (without the `Backend.` prefix).
    fn unsupported_keys(&self) -> Vec<String> {
        match self {
            Backend::Vxlan(v) => v.unsupported_keys(),
        }
    }

    /// Parses and validates the `Backend` object (absent: VXLAN with its defaults).
    fn from_raw(rb: RawBackend) -> Result<Self, ConfigError> {
        let kind = rb.kind.unwrap_or_else(|| BACKEND_VXLAN.to_string());
        if kind != BACKEND_VXLAN {
            return Err(invalid(
                "Backend.Type",
                &kind,
                "unknown backend type (twill supports \"vxlan\")",
            ));
        }
        let vni = match rb.vni {
            None => DEFAULT_VNI,
            // The VNI is a 24-bit field in the VXLAN header.
            Some(v) if (0..=0x00ff_ffff).contains(&v) => v as u32,
            Some(v) => return Err(invalid("Backend.VNI", v, "must be 0..=16777215")),
        };
        let port = match rb.port {
            None | Some(0) => DEFAULT_VXLAN_PORT,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => return Err(invalid("Backend.Port", p, "must be 1..=65535")),
        };
        let direct_routing = match rb.direct_routing {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(v) => {
                return Err(invalid("Backend.DirectRouting", v, "must be true or false"));
            }
        };
        let range = u64::from(VxlanBackend::MIN_MTU)..=65535;
        let mtu = match rb.mtu {
            // 0 is Go's zero value: Flannel then derives the MTU, as for an absent key.
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64() == Some(0) => None,
            Some(Value::Number(n)) if n.as_u64().is_some_and(|m| range.contains(&m)) => {
                n.as_u64().map(|m| m as u32)
            }
            Some(v) => {
                return Err(invalid(
                    "Backend.MTU",
                    v,
                    "must be an integer in 576..=65535 (0 or absent: derived from the underlay)",
                ));
            }
        };
        Ok(Backend::Vxlan(VxlanBackend {
            vni,
            port,
            direct_routing,
            mtu,
            extra: rb.extra,
        }))
    }

    /// The `Backend` object, defaults written out.
    fn to_raw(&self) -> RawBackend {
        match self {
            Backend::Vxlan(v) => RawBackend {
                kind: Some(BACKEND_VXLAN.to_string()),
                vni: Some(i64::from(v.vni)),
                port: Some(i64::from(v.port)),
                direct_routing: v.direct_routing.then_some(Value::Bool(true)),
                mtu: v.mtu.map(Value::from),
                extra: v.extra.clone(),
            },
        }
    }

    /// The changes from `old` that nodes running under `old` cannot follow without a
    /// restart of the whole data plane, one message each (another type, VNI or port).
    fn changes_from(&self, old: &Backend) -> Vec<String> {
        let mut out = Vec::new();
        match (old, self) {
            (Backend::Vxlan(o), Backend::Vxlan(n)) => {
                if n.vni != o.vni {
                    out.push(format!("Backend.VNI changes from {} to {}", o.vni, n.vni));
                }
                if n.port != o.port {
                    out.push(format!(
                        "Backend.Port changes from {} to {}",
                        o.port, n.port
                    ));
                }
            }
        }
        if self.type_name() != old.type_name() {
            out.insert(
                0,
                format!(
                    "Backend.Type changes from {:?} to {:?}",
                    old.type_name(),
                    self.type_name()
                ),
            );
        }
        out
    }
}

/// Flannel's top-level keys that twill neither parses nor implements (the IPv6 keys are
/// parsed, see [`NetConfig::unsupported_keys`]): kept as written, without effect.
pub const UNIMPLEMENTED_KEYS: &[&str] = &["EnableNFTables"];

/// Whether a key that twill keeps without implementing asks for something: present, and
/// neither `null` nor `false` (the off value of Flannel's switches, which is what twill does).
fn is_set(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Null) | Some(Value::Bool(false)))
}

/// What stands against replacing a network config with another while leases exist
/// ([`NetConfig::replacement_problems`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplacementProblems {
    /// The existing leases (by their IPv4 subnet, the lease's key today) that the new config
    /// would strand: their IPv4 subnet is not one it hands out, or their IPv6 subnet is not
    /// (another `IPv6Network`, IPv6 switched off), or they have none while the new config
    /// hands out IPv6 subnets (IPv6 switched on: the node would need a new, dual-stack lease).
    pub stranded: Vec<Ipv4Net>,
    /// Backend changes that the nodes running under the old config cannot follow, one
    /// message each; only while leases exist (without leases no node runs the old config).
    pub backend_changes: Vec<String>,
    /// Every problem as one message for people: the stranded leases (naming the new range),
    /// then the backend changes.
    pub reasons: Vec<String>,
}

impl ReplacementProblems {
    /// No problem: the new config can replace the old one.
    pub fn is_empty(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// The network config, validated and with Flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// `Network`: the cluster's pod network.
    pub network: Ipv4Net,
    /// `SubnetLen`: prefix length of one node's subnet.
    pub subnet_len: u8,
    /// `SubnetMin`: network address of the lowest subnet handed out.
    pub subnet_min: Ipv4Addr,
    /// `SubnetMax`: network address of the highest subnet handed out.
    pub subnet_max: Ipv4Addr,
    /// `Backend`.
    pub backend: Backend,
    /// `EnableIPv4` (default true).
    pub enable_ipv4: bool,
    /// `EnableIPv6` (default false).
    pub enable_ipv6: bool,
    /// `IPv6Network`.
    pub ipv6_network: Option<Ipv6Net>,
    /// `IPv6SubnetLen` (resolved when `IPv6Network` is set: /64, or prefix + 2 for a small network).
    pub ipv6_subnet_len: Option<u8>,
    /// `IPv6SubnetMin` (resolved when `IPv6Network` is set: the second subnet, as Flannel).
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// `IPv6SubnetMax` (resolved when `IPv6Network` is set: the last subnet).
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// Top-level fields this version does not know, kept as written.
    pub extra: Map<String, Value>,
}

/// The raw JSON shape, before defaults and validation.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RawConfig {
    #[serde(rename = "Network", default, skip_serializing_if = "Option::is_none")]
    network: Option<String>,
    #[serde(rename = "SubnetLen", default, skip_serializing_if = "Option::is_none")]
    subnet_len: Option<i64>,
    #[serde(rename = "SubnetMin", default, skip_serializing_if = "Option::is_none")]
    subnet_min: Option<String>,
    #[serde(rename = "SubnetMax", default, skip_serializing_if = "Option::is_none")]
    subnet_max: Option<String>,
    #[serde(
        rename = "EnableIPv4",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    enable_ipv4: Option<bool>,
    #[serde(
        rename = "EnableIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    enable_ipv6: Option<bool>,
    #[serde(
        rename = "IPv6Network",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_network: Option<String>,
    #[serde(
        rename = "IPv6SubnetLen",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_subnet_len: Option<i64>,
    #[serde(
        rename = "IPv6SubnetMin",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_subnet_min: Option<String>,
    #[serde(
        rename = "IPv6SubnetMax",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_subnet_max: Option<String>,
    #[serde(rename = "Backend", default, skip_serializing_if = "Option::is_none")]
    backend: Option<RawBackend>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RawBackend {
    #[serde(rename = "Type", default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    vni: Option<i64>,
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    port: Option<i64>,
    #[serde(
        rename = "DirectRouting",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    direct_routing: Option<Value>,
    #[serde(rename = "MTU", default, skip_serializing_if = "Option::is_none")]
    mtu: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl NetConfig {
    /// A config with Flannel's defaults for `network` (validated).
    pub fn new(network: Ipv4Net) -> Result<Self, ConfigError> {
        Self::from_raw(RawConfig {
            network: Some(network.to_string()),
            ..RawConfig::default()
        })
    }

    /// Parses and validates net-conf.json, filling in Flannel's defaults.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_raw(raw)
    }

    /// The config as net-conf.json, defaults written out, unknown fields kept.
    pub fn to_json(&self) -> String {
        let raw = RawConfig {
            network: Some(self.network.to_string()),
            subnet_len: Some(i64::from(self.subnet_len)),
            subnet_min: Some(self.subnet_min.to_string()),
            subnet_max: Some(self.subnet_max.to_string()),
            enable_ipv4: (!self.enable_ipv4).then_some(false),
            enable_ipv6: Some(self.enable_ipv6),
            ipv6_network: self.ipv6_network.map(|n| n.to_string()),
            ipv6_subnet_len: self.ipv6_subnet_len.map(i64::from),
            // Written only when not the default, so that a config without them (every
            // IPv4-only config) is written back as before.
            ipv6_subnet_min: self
                .ipv6_subnet_min
                .filter(|m| Some(*m) != self.ipv6_default_range().map(|r| r.min))
                .map(|m| m.to_string()),
            ipv6_subnet_max: self
                .ipv6_subnet_max
                .filter(|m| Some(*m) != self.ipv6_default_range().map(|r| r.max))
                .map(|m| m.to_string()),
            backend: Some(self.backend.to_raw()),
            extra: self.extra.clone(),
        };
        serde_json::to_string(&raw).expect("serializing a JSON map cannot fail")
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let enable_ipv4 = raw.enable_ipv4.unwrap_or(true);
        let enable_ipv6 = raw.enable_ipv6.unwrap_or(false);
        if !enable_ipv4 && !enable_ipv6 {
            return Err(invalid(
                "EnableIPv4",
                "false",
                "no address family is enabled (EnableIPv4 and EnableIPv6 are both false)",
            ));
        }
        if !enable_ipv4 {
            // An IPv6-only config is valid Flannel, but every user of NetConfig (lease store,
            // twilld, twillctl) is keyed by the IPv4 subnet: refused by name until they are not.
            return Err(invalid(
                "EnableIPv4",
                "false",
                "IPv6-only (EnableIPv4 false) is not supported by this twill: it needs an IPv4 pod network",
            ));
        }
        let net_str = raw
            .network
            .ok_or(ConfigError::Missing { field: "Network" })?;
        let network: Ipv4Net = net_str
            .parse()
            .map_err(|_| invalid("Network", &net_str, "not an IPv4 CIDR"))?;
        if network.trunc() != network {
            return Err(invalid(
                "Network",
                &net_str,
                format!("host bits are set (did you mean {}?)", network.trunc()),
            ));
        }
        check_network(&net_str, network)?;
        let plen = network.prefix_len();
        let subnet_len = match raw.subnet_len {
            Some(len) => {
                if len > 30 {
                    return Err(invalid(
                        "SubnetLen",
                        len,
                        "must be at most 30 (each node needs a bridge and pod addresses)",
                    ));
                }
                if len < i64::from(plen) + 2 {
                    return Err(invalid(
                        "SubnetLen",
                        len,
                        format!(
                            "must be at least {} so that Network {network} holds four subnets",
                            plen + 2
                        ),
                    ));
                }
                len as u8
            }
            None if plen > 28 => {
                return Err(invalid(
                    "Network",
                    &net_str,
                    "too small: the smallest useful Network is a /28",
                ));
            }
            None if plen <= 22 => 24,
            None => plen + 2,
        };
        let v4 = parse_range(
            Bounds {
                network: "Network",
                len: "SubnetLen",
                min: "SubnetMin",
                max: "SubnetMax",
            },
            network,
            subnet_len,
            raw.subnet_min,
            raw.subnet_max,
        )?;
        let (subnet_min, subnet_max) = (v4.min, v4.max);

        let v6_bounds_without_network = [
            ("IPv6SubnetMin", &raw.ipv6_subnet_min),
            ("IPv6SubnetMax", &raw.ipv6_subnet_max),
        ];
        if raw.ipv6_network.is_none() {
            for (field, v) in v6_bounds_without_network {
                if let Some(v) = v {
                    return Err(invalid(field, v, "set without IPv6Network"));
                }
            }
        }
        let (ipv6_network, ipv6_subnet_len) = match (raw.ipv6_network, raw.ipv6_subnet_len) {
            (None, None) => (None, None),
            (None, Some(len)) => {
                return Err(invalid("IPv6SubnetLen", len, "set without IPv6Network"));
            }
            (Some(s), len) => {
                let net: Ipv6Net = s
                    .parse()
                    .map_err(|_| invalid("IPv6Network", &s, "not an IPv6 CIDR"))?;
                if net.trunc() != net {
                    return Err(invalid("IPv6Network", &s, "host bits are set"));
                }
                check_ipv6_network(&s, net)?;
                let p = net.prefix_len();
                let len = match len {
                    Some(len) if len > 126 => {
                        return Err(invalid("IPv6SubnetLen", len, "must be at most 126"));
                    }
                    Some(len) if len < i64::from(p) + 2 => {
                        return Err(invalid(
                            "IPv6SubnetLen",
                            len,
                            format!(
                                "must be at least {} so that IPv6Network {net} holds four subnets",
                                p + 2
                            ),
                        ));
                    }
                    Some(len) => len as u8,
                    // The default, prefix + 2, must itself pass the rule above (at most 126):
                    // to_json writes it out, and the config must read back the same.
                    None if p > 124 => {
                        return Err(invalid(
                            "IPv6Network",
                            &s,
                            "too small: the smallest useful IPv6Network is a /124",
                        ));
                    }
                    None if p <= 62 => 64,
                    None => p + 2,
                };
                (Some(net), Some(len))
            }
        };
        let v6 = match (ipv6_network, ipv6_subnet_len) {
            (Some(net), Some(len)) => Some(parse_range(
                Bounds {
                    network: "IPv6Network",
                    len: "IPv6SubnetLen",
                    min: "IPv6SubnetMin",
                    max: "IPv6SubnetMax",
                },
                net,
                len,
                raw.ipv6_subnet_min,
                raw.ipv6_subnet_max,
            )?),
            _ => None,
        };
        if enable_ipv6 && ipv6_network.is_none() {
            return Err(invalid(
                "EnableIPv6",
                "true",
                "IPv6Network is required when EnableIPv6 is true",
            ));
        }

        let backend = Backend::from_raw(raw.backend.unwrap_or_default())?;
        if let Backend::Vxlan(VxlanBackend { mtu: Some(m), .. }) = backend
            && enable_ipv6
            && m < VxlanBackend::MIN_MTU_IPV6
        {
            return Err(invalid(
                "Backend.MTU",
                m,
                format!(
                    "must be at least {} when EnableIPv6 is true (IPv6's minimum link MTU)",
                    VxlanBackend::MIN_MTU_IPV6
                ),
            ));
        }

        Ok(NetConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
            enable_ipv4,
            enable_ipv6,
            ipv6_network,
            ipv6_subnet_len,
            ipv6_subnet_min: v6.map(|r| r.min),
            ipv6_subnet_max: v6.map(|r| r.max),
            extra: raw.extra,
        })
    }

    /// Refuses a config whose `Network` (or `IPv6Network`) overlaps one of the underlay's own
    /// subnets (`underlay`: the addresses with prefix length of the interface that carries
    /// VXLAN, as `ip addr` shows them). Pod routes would then capture traffic to the other
    /// nodes, VXLAN included. Only twilld can check this, at start: it knows the underlay.
    pub fn check_underlay(&self, iface: &str, underlay: &[IpNet]) -> Result<(), ConfigError> {
        for u in underlay {
            let hit = match (u.trunc(), self.ipv6_network) {
                (IpNet::V4(u), _) => overlaps(
                    (self.network.network(), self.network.broadcast()),
                    (u.network(), u.broadcast()),
                )
                .then(|| ("Network", self.network.to_string())),
                (IpNet::V6(u), Some(n)) if self.enable_ipv6 => {
                    overlaps((n.network(), n.broadcast()), (u.network(), u.broadcast()))
                        .then(|| ("IPv6Network", n.to_string()))
                }
                (IpNet::V6(_), _) => None,
            };
            if let Some((field, value)) = hit {
                return Err(invalid(
                    field,
                    value,
                    format!(
                        "overlaps the underlay subnet {} of {iface}: pod routes would capture the traffic between nodes",
                        u.trunc()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The IPv4 subnets this config hands out: `SubnetMin..=SubnetMax` in `/SubnetLen`s.
    pub fn range(&self) -> SubnetRange<Ipv4Net> {
        SubnetRange {
            min: self.subnet_min,
            max: self.subnet_max,
            len: self.subnet_len,
        }
    }

    /// The IPv6 subnets this config hands out: `IPv6SubnetMin..=IPv6SubnetMax` in
    /// `/IPv6SubnetLen`s, when `EnableIPv6` is true (an `IPv6Network` without it hands out
    /// nothing).
    pub fn ipv6_range(&self) -> Option<SubnetRange<Ipv6Net>> {
        match (
            self.ipv6_subnet_min,
            self.ipv6_subnet_max,
            self.ipv6_subnet_len,
        ) {
            (Some(min), Some(max), Some(len)) if self.enable_ipv6 => {
                Some(SubnetRange { min, max, len })
            }
            _ => None,
        }
    }

    /// The default IPv6 range of `IPv6Network` / `IPv6SubnetLen` (what an absent
    /// `IPv6SubnetMin` / `IPv6SubnetMax` means).
    fn ipv6_default_range(&self) -> Option<SubnetRange<Ipv6Net>> {
        let (net, len) = (self.ipv6_network?, self.ipv6_subnet_len?);
        Some(default_range(net, len))
    }

    /// How many subnets SubnetMin..=SubnetMax holds.
    pub fn subnet_count(&self) -> u64 {
        // At most 2^22 (Network /8 or longer, SubnetLen 30 or shorter).
        self.range().count() as u64
    }

    /// The `index`-th candidate subnet (0-based from SubnetMin), if inside the range.
    pub fn subnet_at(&self, index: u64) -> Option<Ipv4Net> {
        self.range().at(u128::from(index))
    }

    /// All candidate subnets, SubnetMin first.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        (0..self.subnet_count()).map(|i| self.subnet_at(i).expect("index in range"))
    }

    /// Whether `subnet` is one this config hands out: the right length, aligned, inside
    /// SubnetMin..=SubnetMax.
    pub fn is_valid_subnet(&self, subnet: &Ipv4Net) -> bool {
        self.range().contains(subnet)
    }

    /// Whether `subnet` is an IPv6 subnet this config hands out ([`NetConfig::ipv6_range`]).
    pub fn is_valid_ipv6_subnet(&self, subnet: &Ipv6Net) -> bool {
        self.ipv6_range().is_some_and(|r| r.contains(subnet))
    }

    /// Whether a lease with these subnets fits this config: its IPv4 subnet is one it hands
    /// out, and it has an IPv6 subnet that this config hands out exactly when the config
    /// hands out IPv6 subnets.
    fn fits(&self, v4: &Ipv4Net, v6: Option<&Ipv6Net>) -> bool {
        self.is_valid_subnet(v4)
            && match (self.ipv6_range(), v6) {
                (None, None) => true,
                (Some(r), Some(s)) => r.contains(s),
                _ => false,
            }
    }

    /// The leases that this config would strand: their subnet is not one it hands out.
    pub fn stranded_leases<'a>(&self, leases: &'a [Lease]) -> Vec<&'a Lease> {
        leases
            .iter()
            .filter(|l| !self.fits(&l.subnet, l.ipv6_subnet.as_ref()))
            .collect()
    }

    /// What stands against replacing `old` (the config in etcd; `None` when there is none
    /// or it cannot be read) with this config while `leases` exist: the leases it would
    /// strand and, while there are leases, a backend change ([`Backend::changes_from`]).
    /// The one compatibility rule of twill: `twillctl network set` (through
    /// `LeaseStore::put_config`) refuses such a config unless forced, and twilld refuses a
    /// `--net-conf` that differs from etcd's config this way.
    pub fn replacement_problems(
        &self,
        old: Option<&NetConfig>,
        leases: &[Lease],
    ) -> ReplacementProblems {
        let stranded: Vec<Ipv4Net> = self
            .stranded_leases(leases)
            .iter()
            .map(|l| l.subnet)
            .collect();
        let backend_changes = match old {
            Some(old) if !leases.is_empty() => self.backend.changes_from(&old.backend),
            _ => Vec::new(),
        };
        let mut reasons = Vec::new();
        let (by_v4, by_v6): (Vec<&Lease>, Vec<&Lease>) = self
            .stranded_leases(leases)
            .into_iter()
            .partition(|l| !self.is_valid_subnet(&l.subnet));
        if !by_v4.is_empty() {
            let list: Vec<String> = by_v4.iter().map(|l| l.subnet.to_string()).collect();
            reasons.push(format!(
                "{} existing lease(s) would be outside the new Network {} (SubnetLen {}, SubnetMin {}, SubnetMax {}): {}",
                by_v4.len(),
                self.network,
                self.subnet_len,
                self.subnet_min,
                self.subnet_max,
                list.join(", ")
            ));
        }
        if !by_v6.is_empty() {
            let list: Vec<String> = by_v6
                .iter()
                .map(|l| match l.ipv6_subnet {
                    Some(s) => format!("{} ({s})", l.subnet),
                    None => format!("{} (no IPv6 subnet)", l.subnet),
                })
                .collect();
            let new_range = match (self.ipv6_range(), self.ipv6_network) {
                (Some(r), Some(n)) => format!(
                    "the new IPv6Network {n} (IPv6SubnetLen {}, IPv6SubnetMin {}, IPv6SubnetMax {})",
                    r.len, r.min, r.max
                ),
                _ => "the new config, which hands out no IPv6 subnets (EnableIPv6 false)".into(),
            };
            reasons.push(format!(
                "{} existing lease(s) would not have an IPv6 subnet of {new_range}: {}",
                by_v6.len(),
                list.join(", ")
            ));
        }
        reasons.extend(backend_changes.iter().cloned());
        ReplacementProblems {
            stranded,
            backend_changes,
            reasons,
        }
    }

    /// The keys of this config that Flannel defines and twill accepts but does not
    /// implement, where they ask for something (see `is_set`): without `EnableIPv6`,
    /// `IPv6Network`, `IPv6SubnetMin` / `IPv6SubnetMax` (when not the default: they hand
    /// out nothing; with it twilld runs the IPv6 data plane),
    /// [`UNIMPLEMENTED_KEYS`] and the backend's (`Backend.MTU` when set,
    /// `Backend.GBP`, ...). They are kept in etcd and have no
    /// effect: twilld warns about them once when it reads the config, `twillctl network
    /// show` lists them.
    pub fn unsupported_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        let unused6 = !self.enable_ipv6;
        if unused6 && self.ipv6_network.is_some() {
            out.push("IPv6Network".to_string());
        }
        let default = self.ipv6_default_range();
        if unused6
            && self.ipv6_subnet_min.is_some()
            && self.ipv6_subnet_min != default.map(|r| r.min)
        {
            out.push("IPv6SubnetMin".to_string());
        }
        if unused6
            && self.ipv6_subnet_max.is_some()
            && self.ipv6_subnet_max != default.map(|r| r.max)
        {
            out.push("IPv6SubnetMax".to_string());
        }
        for k in UNIMPLEMENTED_KEYS {
            if is_set(self.extra.get(*k)) {
                out.push(k.to_string());
            }
        }
        for k in self.backend.unsupported_keys() {
            out.push(format!("Backend.{k}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_field(json: &str) -> (String, String) {
        match NetConfig::from_json(json).unwrap_err() {
            ConfigError::Invalid { field, value, .. } => (field.to_string(), value),
            ConfigError::Missing { field } => (field.to_string(), String::new()),
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn flannel_defaults_for_16() {
        let c = NetConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend.vxlan().vni, 1);
        assert_eq!(c.backend.vxlan().port, 8472);
        assert_eq!(c.backend.type_name(), "vxlan");
        assert!(c.unsupported_keys().is_empty());
        assert_eq!(c.subnet_count(), 255);
        assert!(!c.enable_ipv6);
    }

    #[test]
    fn small_network_gets_prefix_plus_two() {
        let c = NetConfig::from_json(r#"{"Network":"10.1.0.0/26"}"#).unwrap();
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 1, 0, 16));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 1, 0, 48));
        assert_eq!(c.subnet_count(), 3);
        let c = NetConfig::from_json(r#"{"Network":"10.1.0.0/22"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        let c = NetConfig::from_json(r#"{"Network":"10.1.0.0/23"}"#).unwrap();
        assert_eq!(c.subnet_len, 25);
    }

    #[test]
    fn validation_names_field_and_value() {
        assert_eq!(err_field(r#"{}"#).0, "Network");
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/29"}"#),
            ("Network".into(), "10.0.0.0/29".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.1/16"}"#),
            ("Network".into(), "10.0.0.1/16".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"banana"}"#),
            ("Network".into(), "banana".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#),
            ("SubnetLen".into(), "31".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#),
            ("SubnetLen".into(), "17".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#),
            ("SubnetMin".into(), "10.1.0.0".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.3.7"}"#),
            ("SubnetMax".into(), "10.0.3.7".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.3.0"}"#)
                .0,
            "SubnetMin"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#),
            ("Backend.Type".into(), "udp".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","Backend":{"VNI":16777216}}"#),
            ("Backend.VNI".into(), "16777216".into())
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","EnableIPv6":true}"#).0,
            "EnableIPv6"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","IPv6SubnetLen":64}"#).0,
            "IPv6SubnetLen"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/127"}"#)
                .0,
            "IPv6Network"
        );
        assert_eq!(
            err_field(
                r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":49}"#
            ),
            ("IPv6SubnetLen".into(), "49".into())
        );
        let msg = NetConfig::from_json(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("SubnetLen") && msg.contains("31"), "{msg}");
        assert!(matches!(
            NetConfig::from_json("{").unwrap_err(),
            ConfigError::Json(_)
        ));
    }

    /// Item 5 of issue 15: Network values that cannot work are refused, naming the field and
    /// the value; their neighbours just outside each range are accepted (so the test can fail).
    #[test]
    fn networks_that_cannot_work_are_refused() {
        for bad in [
            "0.0.0.0/0",
            "10.0.0.0/7",
            "8.0.0.0/6",
            "0.0.0.0/8",
            "0.1.0.0/16",
            "127.0.0.0/8",
            "127.1.0.0/16",
            "169.254.0.0/16",
            "169.254.8.0/22",
            "169.0.0.0/8",
            "224.0.0.0/8",
            "239.255.0.0/16",
            "240.0.0.0/8",
            "255.255.255.0/24",
        ] {
            let json = format!(r#"{{"Network":"{bad}"}}"#);
            assert_eq!(err_field(&json), ("Network".into(), bad.into()), "{bad}");
            let msg = NetConfig::from_json(&json).unwrap_err().to_string();
            assert!(msg.contains("Network") && msg.contains(bad), "{msg}");
        }
        for good in [
            "10.0.0.0/8",
            "1.0.0.0/16",
            "126.255.0.0/16",
            "128.0.0.0/16",
            "169.253.0.0/16",
            "169.255.0.0/16",
            "223.255.0.0/16",
            "172.16.0.0/12",
        ] {
            NetConfig::from_json(&format!(r#"{{"Network":"{good}"}}"#))
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn subnet_len_bounds() {
        // (prefix + 2 ..= 30) is accepted, everything else refused with the value named.
        for (len, ok) in [
            (15, false),
            (16, false),
            (17, false),
            (18, true),
            (30, true),
            (31, false),
            (-1, false),
        ] {
            let json = format!(r#"{{"Network":"10.0.0.0/16","SubnetLen":{len}}}"#);
            match NetConfig::from_json(&json) {
                Ok(c) => {
                    assert!(ok, "SubnetLen {len} accepted");
                    assert_eq!(c.subnet_len as i64, len);
                }
                Err(_) => {
                    assert!(!ok, "SubnetLen {len} refused");
                    assert_eq!(err_field(&json), ("SubnetLen".into(), len.to_string()));
                }
            }
        }
    }

    #[test]
    fn ipv6_networks_that_cannot_work_are_refused() {
        for bad in [
            "::/0",
            "fd00::/7",
            "::/64",
            "::1/128",
            "::ffff:0:0/96",
            "fe80::/64",
            "febf::/16",
            "ff02::/16",
            "fd00::/125",
            "fd00::/126",
        ] {
            let json =
                format!(r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"{bad}"}}"#);
            assert_eq!(
                err_field(&json),
                ("IPv6Network".into(), bad.into()),
                "{bad}"
            );
        }
        for good in ["fd00::/8", "2001:db8::/32", "fec0::/16", "fd00::/124"] {
            let json =
                format!(r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"{good}"}}"#);
            let c = NetConfig::from_json(&json).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(NetConfig::from_json(&c.to_json()).unwrap(), c, "{good}");
        }
    }

    /// The known fuzz finding of issue 15: a /126 got the default IPv6SubnetLen 128, and the
    /// config that to_json wrote back was refused by its own parser. Now it is refused at once,
    /// and every accepted small IPv6Network round-trips.
    #[test]
    fn small_ipv6_network_round_trips_or_is_refused() {
        let finding = r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/126"}"#;
        assert_eq!(
            err_field(finding),
            ("IPv6Network".into(), "fd00::/126".into())
        );
        for p in 100..=128u8 {
            let json = format!(
                r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/{p}"}}"#
            );
            if let Ok(c) = NetConfig::from_json(&json) {
                let len = c.ipv6_subnet_len.unwrap();
                assert!(len <= 126 && len >= p + 2, "/{p}: {len}");
                assert_eq!(NetConfig::from_json(&c.to_json()).unwrap(), c, "/{p}");
            } else {
                assert!(p > 124, "/{p} refused");
            }
        }
    }

    #[test]
    fn underlay_overlap_is_refused() {
        let c = NetConfig::from_json(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48"}"#,
        )
        .unwrap();
        let ok: Vec<IpNet> = vec![
            "192.168.1.5/24".parse().unwrap(),
            "fd00:20::5/64".parse().unwrap(),
        ];
        c.check_underlay("eth0", &ok).unwrap();
        for (under, field) in [
            ("10.244.7.9/24", "Network"),
            ("10.0.0.1/8", "Network"),
            ("10.244.0.0/16", "Network"),
            ("fd00:10:0:5::1/64", "IPv6Network"),
        ] {
            let e = c
                .check_underlay("eth0", &[under.parse().unwrap()])
                .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(field) && msg.contains("eth0"),
                "{under}: {msg}"
            );
            match e {
                ConfigError::Invalid { field: f, .. } => assert_eq!(f, field),
                e => panic!("{e}"),
            }
        }
        // IPv6 off: an IPv6 underlay cannot clash with the unused IPv6Network.
        let v4 =
            NetConfig::from_json(r#"{"Network":"10.244.0.0/16","IPv6Network":"fd00:10::/48"}"#)
                .unwrap();
        v4.check_underlay("eth0", &["fd00:10::1/64".parse().unwrap()])
            .unwrap();
    }

    /// Item 6 of issue 15: an unknown field holding a number beyond u64 (or a float with more
    /// digits than f64 holds) is written back with every digit it was read with.
    #[test]
    fn unknown_numbers_are_kept_exactly() {
        let json = r#"{"Network":"10.244.0.0/16","Big":123456789012345678901234567890,"Neg":-99999999999999999999,"Pi":3.14159265358979323846264338327950288,"E":1E400,"Backend":{"Type":"vxlan","Huge":18446744073709551616}}"#;
        let c = NetConfig::from_json(json).unwrap();
        let out = c.to_json();
        for raw in [
            r#""Big":123456789012345678901234567890"#,
            r#""Neg":-99999999999999999999"#,
            r#""Pi":3.14159265358979323846264338327950288"#,
            // The exponent's spelling is serde_json's; the value and every digit are kept.
            r#""E":1e+400"#,
            r#""Huge":18446744073709551616"#,
        ] {
            assert!(out.contains(raw), "{raw} not in {out}");
        }
        assert_eq!(NetConfig::from_json(&out).unwrap(), c);
    }

    #[test]
    fn ipv6_defaults() {
        let c = NetConfig::from_json(
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48"}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, Some(64));
        let c = NetConfig::from_json(
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/100"}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, Some(102));
    }

    #[test]
    fn unknown_fields_round_trip() {
        let json = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableNFTables":true,"Future":{"a":1},"Backend":{"Type":"vxlan","VNI":4096,"GBP":true}}"#;
        let c = NetConfig::from_json(json).unwrap();
        assert_eq!(c.extra.get("EnableNFTables"), Some(&Value::Bool(true)));
        assert_eq!(c.backend.vxlan().extra.get("GBP"), Some(&Value::Bool(true)));
        let out = c.to_json();
        let back = NetConfig::from_json(&out).unwrap();
        assert_eq!(back, c);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Future"]["a"], 1);
        assert_eq!(v["Backend"]["VNI"], 4096);
        assert_eq!(v["Backend"]["Port"], 8472);
        assert_eq!(v["SubnetMin"], "10.244.1.0");
    }

    #[test]
    fn subnet_iteration_and_membership() {
        let c = NetConfig::from_json(
            r#"{"Network":"10.0.0.0/16","SubnetLen":24,"SubnetMin":"10.0.10.0","SubnetMax":"10.0.12.0"}"#,
        )
        .unwrap();
        let all: Vec<String> = c.subnets().map(|s| s.to_string()).collect();
        assert_eq!(all, ["10.0.10.0/24", "10.0.11.0/24", "10.0.12.0/24"]);
        assert!(c.is_valid_subnet(&"10.0.11.0/24".parse().unwrap()));
        assert!(!c.is_valid_subnet(&"10.0.13.0/24".parse().unwrap()));
        assert!(!c.is_valid_subnet(&"10.0.11.0/25".parse().unwrap()));
        assert_eq!(c.subnet_at(3), None);
    }

    fn lease_at(subnet: &str) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            ipv6_subnet: None,
            attrs: crate::lease::LeaseAttrs::vxlan(
                "n",
                Ipv4Addr::new(192, 168, 0, 1),
                1,
                crate::mac::Mac::derive("n"),
            ),
            reserved: false,
            etcd_lease: 1,
            expires: None,
            mod_revision: 1,
            create_revision: 1,
        }
    }

    #[test]
    fn replacement_problems() {
        let cfg = |json: &str| NetConfig::from_json(json).unwrap();
        let old = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let leases = [lease_at("10.0.200.0/24"), lease_at("10.0.3.0/24")];
        // Identical, or wider: nothing against it, with or without leases.
        assert!(old.replacement_problems(Some(&old), &leases).is_empty());
        let wider = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.0.1.0"}"#);
        assert_eq!(
            wider.replacement_problems(Some(&old), &leases),
            ReplacementProblems::default()
        );
        // Narrower: the lease outside is stranded, named, and so is the new range.
        let narrower = cfg(r#"{"Network":"10.0.0.0/17"}"#);
        let p = narrower.replacement_problems(Some(&old), &leases);
        assert_eq!(
            p.stranded,
            vec!["10.0.200.0/24".parse::<Ipv4Net>().unwrap()]
        );
        assert!(p.backend_changes.is_empty());
        assert_eq!(p.reasons.len(), 1);
        assert!(
            p.reasons[0].contains("10.0.200.0/24") && p.reasons[0].contains("10.0.0.0/17"),
            "{:?}",
            p.reasons
        );
        assert!(!p.reasons[0].contains("10.0.3.0/24"), "{:?}", p.reasons);
        // Without an old config (none in etcd) the leases still count.
        assert_eq!(
            narrower.replacement_problems(None, &leases).stranded,
            p.stranded
        );
        assert!(narrower.replacement_problems(None, &[]).is_empty());
        // Another VNI or port: refused while leases exist, fine without any.
        let vni = cfg(r#"{"Network":"10.0.0.0/16","Backend":{"VNI":2,"Port":4789}}"#);
        let p = vni.replacement_problems(Some(&old), &leases);
        assert_eq!(
            p.backend_changes,
            [
                "Backend.VNI changes from 1 to 2",
                "Backend.Port changes from 8472 to 4789"
            ]
        );
        assert_eq!(p.reasons, p.backend_changes);
        assert!(p.stranded.is_empty());
        assert!(vni.replacement_problems(Some(&old), &[]).is_empty());
        assert!(vni.replacement_problems(None, &leases).is_empty());
        // Both at once: the stranded leases first.
        let both = cfg(r#"{"Network":"10.0.0.0/17","Backend":{"VNI":2}}"#);
        let p = both.replacement_problems(Some(&old), &leases);
        assert_eq!(p.reasons.len(), 2);
        assert!(p.reasons[0].contains("10.0.200.0/24"), "{:?}", p.reasons);
        assert_eq!(p.reasons[1], "Backend.VNI changes from 1 to 2");
    }

    #[test]
    fn backend_is_typed_and_unknown_types_are_refused() {
        let c = NetConfig::from_json(r#"{"Network":"10.0.0.0/16"}"#).unwrap();
        assert_eq!(c.backend, Backend::default());
        assert_eq!(c.backend.type_name(), BACKEND_VXLAN);
        let Backend::Vxlan(v) = &c.backend;
        assert_eq!((v.vni, v.port), (DEFAULT_VNI, DEFAULT_VXLAN_PORT));
        for t in ["udp", "host-gw", "VXLAN", "", "wireguard"] {
            let e = NetConfig::from_json(&format!(
                r#"{{"Network":"10.0.0.0/16","Backend":{{"Type":"{t}"}}}}"#
            ))
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "field Backend.Type: {t:?} is invalid: unknown backend type (twill supports \"vxlan\")"
                )
            );
        }
        // Port 0 means the default, as before.
        let c = NetConfig::from_json(r#"{"Network":"10.0.0.0/16","Backend":{"Port":0}}"#).unwrap();
        assert_eq!(c.backend.vxlan().port, DEFAULT_VXLAN_PORT);
        let v: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(v["Backend"]["Type"], "vxlan");
    }

    #[test]
    fn unsupported_keys_are_named_when_set() {
        let keys = |json: &str| NetConfig::from_json(json).unwrap().unsupported_keys();
        assert!(keys(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#).is_empty());
        // The off values of Flannel's switches are what twill does: nothing to warn about.
        assert!(
            keys(
                r#"{"Network":"10.0.0.0/16","EnableIPv6":false,"EnableNFTables":false,"Backend":{"DirectRouting":false,"GBP":false,"Learning":false,"MTU":null}}"#
            )
            .is_empty()
        );
        assert_eq!(
            keys(
                r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:2::","IPv6SubnetMax":"fd00:0:0:ff::","EnableNFTables":true,"Future":1,"Backend":{"Type":"vxlan","DirectRouting":true,"GBP":true,"Learning":true,"MTU":1400,"Other":true}}"#
            ),
            // Backend.MTU is implemented (the VXLAN device's MTU): not named.
            ["EnableNFTables", "Backend.GBP", "Backend.Learning"]
        );
        // An IPv6Network without EnableIPv6 is unused too.
        assert_eq!(
            keys(r#"{"Network":"10.0.0.0/16","IPv6Network":"fd00::/48"}"#),
            ["IPv6Network"]
        );
        // The keys survive a round trip, so etcd's config keeps naming them.
        let c = NetConfig::from_json(
            r#"{"Network":"10.0.0.0/16","Backend":{"DirectRouting":true,"GBP":true,"MTU":1400}}"#,
        )
        .unwrap();
        let back = NetConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back.unsupported_keys(), ["Backend.GBP"]);
        // DirectRouting is implemented: never named, and it survives the round trip.
        assert!(back.backend.vxlan().direct_routing);
        assert_eq!(back.backend.vxlan().mtu, Some(1400));
    }

    /// Flannel's dual-stack example (Documentation/configuration.md): both families, the
    /// IPv6 defaults resolved as flanneld resolves them, written back and read the same.
    #[test]
    fn dual_stack_defaults_and_ranges() {
        let c = NetConfig::from_json(
            r#"{"EnableIPv6":true,"Network":"10.42.0.0/16","IPv6Network":"2001:cafe:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, Some(64));
        assert_eq!(c.ipv6_subnet_min, Some("2001:cafe:42:1::".parse().unwrap()));
        assert_eq!(
            c.ipv6_subnet_max,
            Some("2001:cafe:42:ff::".parse().unwrap())
        );
        let r = c.ipv6_range().unwrap();
        assert_eq!(r.count(), 255);
        assert!(c.is_valid_ipv6_subnet(&"2001:cafe:42:7::/64".parse().unwrap()));
        assert!(!c.is_valid_ipv6_subnet(&"2001:cafe:42::/64".parse().unwrap()));
        assert!(!c.is_valid_ipv6_subnet(&"2001:cafe:42:7::/65".parse().unwrap()));
        assert!(!c.is_valid_ipv6_subnet(&"2001:cafe:42:7::1/64".parse().unwrap()));
        // The defaults are not written out, so the config reads back the same.
        let out = c.to_json();
        assert!(!out.contains("IPv6SubnetMin"), "{out}");
        assert_eq!(NetConfig::from_json(&out).unwrap(), c);
        // Explicit bounds are kept and written; with EnableIPv6 they are in effect.
        let c = NetConfig::from_json(
            r#"{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:10::","IPv6SubnetMax":"fd00:0:0:1f::"}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_range().unwrap().count(), 16);
        assert_eq!(NetConfig::from_json(&c.to_json()).unwrap(), c);
        assert!(
            c.unsupported_keys().is_empty(),
            "{:?}",
            c.unsupported_keys()
        );
        // IPv6Network without EnableIPv6 hands out no IPv6 subnets.
        let off =
            NetConfig::from_json(r#"{"Network":"10.0.0.0/16","IPv6Network":"fd00::/48"}"#).unwrap();
        assert_eq!(off.ipv6_range(), None);
        // A huge range is counted, not enumerated: /8 in /64s.
        let big = NetConfig::from_json(
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/8"}"#,
        )
        .unwrap();
        assert_eq!(big.ipv6_range().unwrap().count(), (1u128 << 56) - 1);
    }

    #[test]
    fn ipv6_bounds_are_validated_by_name() {
        let v6 = |extra: &str| {
            format!(
                r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"{extra}}}"#
            )
        };
        for (extra, field, value) in [
            (r#","IPv6SubnetMin":"fd01::""#, "IPv6SubnetMin", "fd01::"),
            (
                r#","IPv6SubnetMin":"fd00:0:0:1::1""#,
                "IPv6SubnetMin",
                "fd00:0:0:1::1",
            ),
            (r#","IPv6SubnetMax":"banana""#, "IPv6SubnetMax", "banana"),
            (
                r#","IPv6SubnetMax":"10.0.0.0""#,
                "IPv6SubnetMax",
                "10.0.0.0",
            ),
            (
                r#","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:3::""#,
                "IPv6SubnetMin",
                "fd00:0:0:9::",
            ),
        ] {
            let json = v6(extra);
            assert_eq!(err_field(&json), (field.into(), value.into()), "{json}");
            let msg = NetConfig::from_json(&json).unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains(value), "{msg}");
        }
        for field in ["IPv6SubnetMin", "IPv6SubnetMax"] {
            let json = format!(r#"{{"Network":"10.0.0.0/16","{field}":"fd00:0:0:1::"}}"#);
            assert_eq!(err_field(&json), (field.into(), "fd00:0:0:1::".into()));
        }
    }

    #[test]
    fn families_at_least_one_and_ipv6_only_is_refused_by_name() {
        let e = NetConfig::from_json(r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("EnableIPv4") && e.contains("no address family"),
            "{e}"
        );
        let e = NetConfig::from_json(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("EnableIPv4") && e.contains("IPv6-only"), "{e}");
        // Enabled IPv6 needs its network; enabled IPv4 (the default) needs Network.
        assert_eq!(
            err_field(r#"{"EnableIPv6":true,"IPv6Network":"fd00::/48"}"#).0,
            "Network"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","EnableIPv6":true}"#).0,
            "EnableIPv6"
        );
    }

    #[test]
    fn vxlan_direct_routing_and_mtu_are_typed() {
        let c = NetConfig::from_json(
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true,"MTU":1400}}"#,
        )
        .unwrap();
        let v = c.backend.vxlan();
        assert!(v.direct_routing);
        assert_eq!(v.mtu, Some(1400));
        assert!(v.extra.is_empty());
        let out: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(out["Backend"]["DirectRouting"], true);
        assert_eq!(out["Backend"]["MTU"], 1400);
        assert_eq!(NetConfig::from_json(&c.to_json()).unwrap(), c);
        // Off values: the defaults, and not written (an IPv4-only default config is as before).
        for b in [
            r#"{}"#,
            r#"{"DirectRouting":false}"#,
            r#"{"MTU":0}"#,
            r#"{"MTU":null,"DirectRouting":null}"#,
        ] {
            let c = NetConfig::from_json(&format!(r#"{{"Network":"10.0.0.0/16","Backend":{b}}}"#))
                .unwrap();
            assert!(
                !c.backend.vxlan().direct_routing && c.backend.vxlan().mtu.is_none(),
                "{b}"
            );
            assert_eq!(
                c.to_json(),
                NetConfig::from_json(r#"{"Network":"10.0.0.0/16"}"#)
                    .unwrap()
                    .to_json()
            );
        }
        for (b, field, value) in [
            (
                r#"{"DirectRouting":"yes"}"#,
                "Backend.DirectRouting",
                "\"yes\"",
            ),
            (r#"{"DirectRouting":1}"#, "Backend.DirectRouting", "1"),
            (r#"{"MTU":67}"#, "Backend.MTU", "67"),
            (r#"{"MTU":575}"#, "Backend.MTU", "575"),
            (r#"{"MTU":65536}"#, "Backend.MTU", "65536"),
            (r#"{"MTU":-1}"#, "Backend.MTU", "-1"),
            (r#"{"MTU":1400.5}"#, "Backend.MTU", "1400.5"),
            (r#"{"MTU":"1400"}"#, "Backend.MTU", "\"1400\""),
        ] {
            let json = format!(r#"{{"Network":"10.0.0.0/16","Backend":{b}}}"#);
            assert_eq!(err_field(&json), (field.into(), value.into()), "{json}");
        }
        for m in [576, 65535] {
            NetConfig::from_json(&format!(
                r#"{{"Network":"10.0.0.0/16","Backend":{{"MTU":{m}}}}}"#
            ))
            .unwrap();
        }
        // IPv6 needs 1280.
        let v6 = |m: u32| {
            format!(
                r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{{"MTU":{m}}}}}"#
            )
        };
        assert_eq!(err_field(&v6(1279)), ("Backend.MTU".into(), "1279".into()));
        NetConfig::from_json(&v6(1280)).unwrap();
    }

    /// What this proves: `Backend.MTU` is checked against a node's underlay MTU less the
    /// VXLAN overhead, refused above it with an error naming the field, the value and the
    /// node's bound; unset, nothing is checked.
    #[test]
    fn backend_mtu_must_fit_the_underlay() {
        let b = |m: &str| {
            NetConfig::from_json(&format!(
                r#"{{"Network":"10.0.0.0/16","Backend":{{"MTU":{m}}}}}"#
            ))
            .unwrap()
            .backend
            .vxlan()
            .clone()
        };
        b("1450").check_mtu("eth0", 1500, 50).unwrap();
        b("0").check_mtu("eth0", 600, 50).unwrap();
        let e = b("1451").check_mtu("eth0", 1500, 50).unwrap_err();
        let ConfigError::Invalid { field, value, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!((*field, value.as_str()), ("Backend.MTU", "1451"));
        assert!(
            e.to_string()
                .contains("underlay eth0 (1500) less VXLAN's 50 bytes: at most 1450"),
            "{e}"
        );
        // Over IPv6 the overhead is 70.
        assert!(b("1450").check_mtu("eth0", 1500, 70).is_err());
        b("8930").check_mtu("ens5", 9000, 70).unwrap();
    }

    fn lease_v6(v4: &str, v6: Option<&str>) -> Lease {
        Lease {
            ipv6_subnet: v6.map(|s| s.parse().unwrap()),
            ..lease_at(v4)
        }
    }

    #[test]
    fn replacement_problems_count_the_ipv6_family() {
        let cfg = |json: &str| NetConfig::from_json(json).unwrap();
        let v4 = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let dual = cfg(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"}"#);
        let v4_leases = [lease_at("10.0.3.0/24")];
        let dual_leases = [lease_v6("10.0.3.0/24", Some("fd00:0:0:3::/64"))];
        // The same family set: nothing against it.
        assert!(v4.replacement_problems(Some(&v4), &v4_leases).is_empty());
        assert!(
            dual.replacement_problems(Some(&dual), &dual_leases)
                .is_empty()
        );
        // Switching IPv6 on strands the IPv4-only leases (their nodes need a dual-stack one).
        let p = dual.replacement_problems(Some(&v4), &v4_leases);
        assert_eq!(p.stranded, ["10.0.3.0/24".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(p.reasons.len(), 1);
        assert!(
            p.reasons[0].contains("no IPv6 subnet") && p.reasons[0].contains("fd00::/48"),
            "{:?}",
            p.reasons
        );
        assert!(dual.replacement_problems(Some(&v4), &[]).is_empty());
        // Switching it off strands the dual-stack leases.
        let p = v4.replacement_problems(Some(&dual), &dual_leases);
        assert_eq!(p.stranded.len(), 1);
        assert!(p.reasons[0].contains("EnableIPv6 false"), "{:?}", p.reasons);
        // Another IPv6Network strands the leases outside it, and names them.
        let other = cfg(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd01::/48"}"#);
        let p = other.replacement_problems(Some(&dual), &dual_leases);
        assert!(p.reasons[0].contains("fd00:0:0:3::/64") && p.reasons[0].contains("fd01::/48"));
        // Both families at fault: the IPv4 reason first, each lease listed once.
        let both = cfg(r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd01::/48"}"#);
        let p = both.replacement_problems(Some(&dual), &dual_leases);
        assert_eq!(p.stranded.len(), 1);
        assert_eq!(p.reasons.len(), 1);
        assert!(p.reasons[0].contains("10.1.0.0/16"), "{:?}", p.reasons);
    }
}
