//! The checks behind the fuzz targets of `fuzz/` (cargo-fuzz) for ipam's parsers of untrusted
//! input, and behind the regression corpus that the normal test suite replays
//! (`tests/tests/fuzz_corpus.rs`): both call these same functions, so a crash found by the
//! fuzzer and put into `fuzz/corpus/<target>/` fails the tests until it is fixed.
//!
//! Each check takes arbitrary bytes, runs the parser, and panics when an accepted value breaks
//! a documented rule or does not survive parse → serialise → parse. Refusing is always fine;
//! panicking inside the parser is a finding too.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

use crate::alloc::{AllocError, Allocator, Request};
use crate::lease::{LeaseAttrs, SubnetKey, key_to_subnet, subnet_to_key};
use crate::netconf::{ConfigError, NetConfig};
use crate::subnet_file::SubnetFile;

const NETCONF_KEYS: &[&str] = &[
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "Backend",
];
const BACKEND_KEYS: &[&str] = &["Type", "VNI", "Port", "DirectRouting", "MTU"];
const LEASE_KEYS: &[&str] = &[
    "PublicIP",
    "PublicIPv6",
    "BackendType",
    "BackendData",
    "BackendV6Data",
    "NodeName",
];
const BACKEND_DATA_KEYS: &[&str] = &["VNI", "VtepMAC"];

/// The fields of `obj` that are not in `known` (what the parser must keep unchanged).
fn unknown(obj: &Map<String, Value>, known: &[&str]) -> Map<String, Value> {
    obj.iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn object(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

/// An IPv4 range that no pod network may touch, written independently of netconf.rs's table.
fn reserved_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 0 || o[0] == 127 || o[0] >= 224 || (o[0] == 169 && o[1] == 254)
}

fn reserved_v6(n: &Ipv6Net) -> bool {
    // Compared on the first 16 bits: ::/8, fe80::/10 and ff00::/8 all end within them.
    let (f, l) = (n.network().segments()[0], n.broadcast().segments()[0]);
    let overlaps = |a: u16, b: u16| f <= b && l >= a;
    overlaps(0x0000, 0x00ff) || overlaps(0xfe80, 0xfebf) || overlaps(0xff00, 0xffff)
}

/// net-conf.json (`<prefix>/config`, `--net-conf`, `twillctl network set`).
///
/// Accepted configs satisfy issue 15 item 5's rules, round-trip through `to_json`, and keep
/// every unknown field (top level and in `Backend`) exactly. Refusals name a field.
pub fn netconf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = match NetConfig::from_json(text) {
        Ok(c) => c,
        Err(ConfigError::Json(_)) => return,
        Err(e @ (ConfigError::Invalid { .. } | ConfigError::Missing { .. })) => {
            let field = match &e {
                ConfigError::Invalid { field, .. } | ConfigError::Missing { field } => *field,
                ConfigError::Json(_) => unreachable!(),
            };
            assert!(e.to_string().contains(field), "refusal names no field: {e}");
            return;
        }
    };
    let n = c.network;
    let plen = n.prefix_len();
    assert_eq!(n.trunc(), n, "Network has host bits: {n}");
    assert!((8..=28).contains(&plen), "Network prefix /{plen} accepted");
    assert!(
        !reserved_v4(n.network()) && !reserved_v4(n.broadcast()),
        "reserved Network {n} accepted"
    );
    // 169.254/16 inside a /8 that starts at 169: the ends are not enough.
    assert!(
        !n.contains(&Ipv4Addr::new(169, 254, 0, 0)),
        "Network {n} holds 169.254/16"
    );
    let len = c.subnet_len;
    assert!(
        len >= plen + 2 && len <= 30,
        "SubnetLen {len} accepted for {n}"
    );
    for (what, a) in [("SubnetMin", c.subnet_min), ("SubnetMax", c.subnet_max)] {
        assert!(n.contains(&a), "{what} {a} outside {n}");
        let s = Ipv4Net::new(a, len).expect("len <= 30");
        assert_eq!(s.network(), a, "{what} {a} not on a /{len} boundary");
    }
    assert!(c.subnet_min <= c.subnet_max, "SubnetMin > SubnetMax");
    let count = c.subnet_count();
    assert!(count >= 1);
    for i in [0, count - 1] {
        let s = c.subnet_at(i).expect("index in range");
        assert!(c.is_valid_subnet(&s) && n.contains(&s), "subnet {i}: {s}");
    }
    assert_eq!(c.subnet_at(count), None);
    let vx = c.backend.vxlan();
    assert!(vx.vni <= 0x00ff_ffff, "VNI {}", vx.vni);
    assert!(vx.port >= 1);
    if let Some(m) = vx.mtu {
        let min = if c.enable_ipv6 { 1280 } else { 68 };
        assert!((min..=65535).contains(&m), "MTU {m} accepted");
    }
    assert_eq!(c.backend.type_name(), "vxlan");
    assert!(c.enable_ipv4);
    if c.enable_ipv6 {
        assert!(c.ipv6_network.is_some(), "EnableIPv6 without IPv6Network");
    }
    match (c.ipv6_network, c.ipv6_subnet_len) {
        (None, None) => {}
        (Some(v6), Some(l)) => {
            let p = v6.prefix_len();
            assert_eq!(v6.trunc(), v6);
            assert!(p >= 8 && l >= p + 2 && l <= 126, "IPv6 {v6} / {l}");
            assert!(!reserved_v6(&v6), "reserved IPv6Network {v6} accepted");
            let (min, max) = (c.ipv6_subnet_min.unwrap(), c.ipv6_subnet_max.unwrap());
            for (what, a) in [("IPv6SubnetMin", min), ("IPv6SubnetMax", max)] {
                assert!(v6.contains(&a), "{what} {a} outside {v6}");
                let s = Ipv6Net::new(a, l).expect("l <= 126");
                assert_eq!(s.network(), a, "{what} {a} not on a /{l} boundary");
            }
            assert!(min <= max, "IPv6SubnetMin > IPv6SubnetMax");
            if let Some(r) = c.ipv6_range() {
                let count = r.count();
                assert!(count >= 1);
                for i in [0, count - 1] {
                    let s = r.at(i).expect("index in range");
                    assert!(c.is_valid_ipv6_subnet(&s) && v6.contains(&s), "{i}: {s}");
                    assert_eq!(r.index_of(&s), Some(i));
                }
                assert_eq!(r.at(count), None);
            }
        }
        other => panic!("IPv6Network and IPv6SubnetLen disagree: {other:?}"),
    }
    if c.ipv6_network.is_none() {
        assert!(c.ipv6_subnet_min.is_none() && c.ipv6_subnet_max.is_none());
    }

    // parse → serialise → parse.
    let out = c.to_json();
    let back = NetConfig::from_json(&out)
        .unwrap_or_else(|e| panic!("to_json of an accepted config is refused: {e}\n{out}"));
    assert_eq!(back, c, "round trip changed the config\n{out}");
    assert_eq!(back.to_json(), out, "to_json is not stable");
    assert_eq!(
        back.unsupported_keys(),
        c.unsupported_keys(),
        "the unsupported keys changed in a round trip\n{out}"
    );

    // Unknown fields survive exactly (numbers with all their digits).
    let input: Value = serde_json::from_str(text).expect("accepted, so it is JSON");
    let written: Value = serde_json::from_str(&out).expect("to_json is JSON");
    let inp = input.as_object().expect("accepted, so an object");
    let wr = written.as_object().expect("to_json writes an object");
    assert_eq!(unknown(inp, NETCONF_KEYS), unknown(wr, NETCONF_KEYS));
    assert_eq!(
        unknown(&object(inp.get("Backend")), BACKEND_KEYS),
        unknown(&object(wr.get("Backend")), BACKEND_KEYS)
    );
}

/// A lease key under `<prefix>/subnets/`: an accepted key is the canonical spelling of its
/// subnet (issue 15 item 6: `10.244.3.0-024` must not alias `10.244.3.0-24`), as an IPv4 key
/// ([`key_to_subnet`]) and as a dual-stack key ([`SubnetKey`]): every accepted key is
/// written back as read, so no two keys name the same subnets.
pub fn lease_key(data: &[u8]) {
    let Ok(key) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(k) = SubnetKey::parse(key) {
        assert_eq!(
            k.to_string(),
            key,
            "dual-stack key {key:?} is not canonical"
        );
        assert!(k.v4().is_some() || k.v6().is_some());
        if let Some(n) = k.v4() {
            assert_eq!(n.trunc(), n, "key {key:?} has IPv4 host bits");
        }
        if let Some(n) = k.v6() {
            assert_eq!(n.trunc(), n, "key {key:?} has IPv6 host bits");
        }
        assert_eq!(SubnetKey::new(k.v4(), k.v6()), Some(k));
        // An IPv4-only key is the same key to both parsers.
        if k.v6().is_none() {
            assert_eq!(key_to_subnet(key).ok(), k.v4(), "{key:?}");
        }
    } else {
        assert!(
            key_to_subnet(key).is_err(),
            "{key:?}: IPv4 key, not a SubnetKey"
        );
    }
    if let Ok(net) = key_to_subnet(key) {
        assert_eq!(net.trunc(), net, "key {key:?} has host bits");
        assert_eq!(
            subnet_to_key(&net),
            key,
            "key {key:?} is not canonical: an alias of {net}"
        );
        assert_eq!(key_to_subnet(&subnet_to_key(&net)), Ok(net));
    }
}

/// A lease value (JSON): accepted values round-trip through `to_json` and keep unknown
/// fields (top level and `BackendData`) exactly.
pub fn lease_value(data: &[u8]) {
    let Ok(a) = LeaseAttrs::from_json("fuzz", data) else {
        return;
    };
    let out = a.to_json();
    let back = LeaseAttrs::from_json("fuzz", out.as_bytes())
        .unwrap_or_else(|e| panic!("to_json of an accepted lease is refused: {e}\n{out}"));
    assert_eq!(back, a, "round trip changed the lease\n{out}");
    assert_eq!(back.to_json(), out, "to_json is not stable");
    let input: Value = serde_json::from_slice(data).expect("accepted, so it is JSON");
    let written: Value = serde_json::from_str(&out).expect("to_json is JSON");
    let inp = object(Some(&input));
    let wr = object(Some(&written));
    assert_eq!(unknown(&inp, LEASE_KEYS), unknown(&wr, LEASE_KEYS));
    assert_eq!(
        unknown(&object(inp.get("BackendData")), BACKEND_DATA_KEYS),
        unknown(&object(wr.get("BackendData")), BACKEND_DATA_KEYS)
    );
    // PublicIPv6 is written back exactly as read (absent, null, an address or anything
    // else); BackendV6Data's unknown fields are kept (a null one is written as absent).
    assert_eq!(inp.get("PublicIPv6"), wr.get("PublicIPv6"), "PublicIPv6");
    assert_eq!(
        unknown(&object(inp.get("BackendV6Data")), BACKEND_DATA_KEYS),
        unknown(&object(wr.get("BackendV6Data")), BACKEND_DATA_KEYS)
    );
    if let Ok(Some(e)) = a.ipv6_endpoint() {
        assert_eq!(a.public_ipv6.addr(), Some(e.public_ip));
        assert!(!e.public_ip.is_unspecified() && !e.public_ip.is_multicast());
    }
    // The VTEP MAC is written back as read: a MAC in lower case, anything else exactly.
    let mac_in = object(inp.get("BackendData"))
        .get("VtepMAC")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mac_out = a.vtep_mac().to_string();
    match a.vtep_mac().mac() {
        Some(m) => assert_eq!(mac_out, mac_in.to_ascii_lowercase(), "VtepMAC {m}"),
        None => assert_eq!(mac_out, mac_in, "VtepMAC not kept as written"),
    }
}

/// The subnet file (`subnet.env`): accepted files have the node subnet inside the network,
/// room for pods, a gateway that is neither the subnet's network nor its broadcast address
/// (issue 15 item 6), an MTU in 68..=65535, and round-trip through `render`.
pub fn subnet_env(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(f) = SubnetFile::parse("subnet.env", text) else {
        return;
    };
    assert!(f.network.contains(&f.subnet), "subnet outside network");
    let node = f.node_subnet();
    assert!(
        node.max_prefix_len() - node.prefix_len() >= 2,
        "no room: {node}"
    );
    let gw = f.gateway();
    assert!(
        gw != node.network() && gw != node.broadcast(),
        "gateway {gw} is the network or broadcast address of {node}"
    );
    assert!((68..=65535).contains(&f.mtu), "MTU {}", f.mtu);
    match (f.ipv6_network, f.ipv6_subnet) {
        (None, None) => {}
        (Some(n @ IpNet::V6(_)), Some(s @ IpNet::V6(_))) => {
            assert!(n.contains(&s), "IPv6 subnet {s} outside {n}");
            let node6 = f.ipv6_node_subnet().expect("set");
            assert!(128 - node6.prefix_len() >= 2, "no room: {node6}");
            assert_ne!(
                f.ipv6_gateway(),
                Some(node6.network()),
                "gateway is {node6}'s network"
            );
        }
        other => panic!("IPv6 keys accepted as {other:?}"),
    }
    let out = f.render();
    let back = SubnetFile::parse("subnet.env", &out)
        .unwrap_or_else(|e| panic!("render of an accepted file is refused: {e}\n{out}"));
    assert_eq!(back, f, "round trip changed the file\n{out}");
    assert_eq!(back.render(), out);
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh directory for one allocator run: under `TWILL_FUZZ_TMP`, else /dev/shm (its fsync
/// costs nothing, which matters at thousands of runs a second), else the temp dir.
fn scratch_dir() -> PathBuf {
    let base = std::env::var_os("TWILL_FUZZ_TMP")
        .map(PathBuf::from)
        .or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            shm.is_dir().then_some(shm)
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!(
        "twill-fuzz-alloc-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The allocator's state file (`<dataDir>/<network>/state.json`), as found on disk: a state
/// that is accepted hands out an address that is inside the subnet, not its network, gateway
/// or broadcast address, and not held by another reservation; and what it writes back reads
/// back the same.
pub fn alloc_state(data: &[u8]) {
    let dir = RemoveOnDrop(scratch_dir());
    let net_dir = dir.0.join("net");
    std::fs::create_dir_all(&net_dir).expect("create the scratch dir");
    std::fs::write(net_dir.join("state.json"), data).expect("write the state");
    let alloc = Allocator::new(&dir.0, "net").with_boot_id("fuzz-boot");
    let mut locked = match alloc.lock() {
        Ok(l) => l,
        Err(AllocError::Corrupt { .. }) => return,
        Err(e) => panic!("lock failed on a readable state: {e}"),
    };
    let before: Vec<_> = locked.reservations().to_vec();
    for subnet in ["10.244.3.0/24", "10.244.3.0/30", "fd00:10:0:3::/64"] {
        let subnet: IpNet = subnet.parse().expect("a valid constant");
        let others: Vec<_> = locked.reservations().to_vec();
        // A container the input does not already hold (the input may name any ID).
        let container_id = (0u32..)
            .map(|n| format!("fuzz-{subnet}-{n}"))
            .find(|id| !others.iter().any(|o| &o.container_id == id))
            .expect("some ID is free");
        let req = Request {
            container_id,
            ifname: "eth0".into(),
            ..Request::default()
        };
        match locked.reserve(subnet, &req) {
            Ok((r, new)) => {
                assert!(new, "a fresh container got an old reservation");
                let ip = r.ip;
                assert!(subnet.contains(&ip), "{ip} outside {subnet}");
                let gw = match subnet.network() {
                    IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
                    IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
                };
                assert!(
                    ip != subnet.network() && ip != subnet.broadcast() && ip != gw,
                    "{ip} is the network, gateway or broadcast address of {subnet}"
                );
                assert!(
                    !others.iter().any(|o| o.ip == ip),
                    "{ip} is already reserved"
                );
            }
            Err(AllocError::Full { .. }) => {}
            Err(e) => panic!("reserve failed: {e}"),
        }
    }
    let held: Vec<_> = locked.reservations().to_vec();
    assert!(held.len() >= before.len(), "reservations were lost");
    locked.commit().expect("commit the state");
    let again = alloc.lock().expect("the state just written reads back");
    assert_eq!(
        again.reservations(),
        held.as_slice(),
        "round trip changed the state"
    );
}
