//! The checks behind the fuzz targets of `fuzz/` (cargo-fuzz) for the plugin's parsers of
//! untrusted input (stdin config, conflist, CNI_ARGS and the environment, prevResult,
//! runtimeConfig), and behind the regression corpus that the normal test suite replays
//! (`tests/tests/fuzz_corpus.rs`). Both call these same functions.
//!
//! Each check takes arbitrary bytes, runs the parser, and panics when an accepted value breaks
//! a documented rule (docs/cni.md, issue 15 item 6) or does not survive a round trip.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::config::{SUPPORTED_VERSIONS, parse_conf, validate_conflist};
use crate::env::{CniArgs, CniEnv};
use crate::types::CniResult;

/// A Linux interface name as the kernel's `dev_valid_name` takes it, minus what the kernel
/// would turn into something else (`%d` templates) and non-ASCII bytes (issue 15 item 6).
fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b'%')
}

/// `10.244.3.9`, or `10.244.3.9/24` with a prefix length the family allows.
fn strict_ip_or_cidr(s: &str) -> bool {
    match s.split_once('/') {
        None => s.parse::<IpAddr>().is_ok(),
        Some((ip, len)) => {
            let Ok(ip) = ip.parse::<IpAddr>() else {
                return false;
            };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            !len.is_empty()
                && len.bytes().all(|b| b.is_ascii_digit())
                && len.parse::<u8>().is_ok_and(|l| l <= max)
        }
    }
}

/// The plugin's stdin config: an accepted one has a supported version, a valid network name
/// and bridge name, an MTU in 68..=65535, runtimeConfig IPs written strictly (which of them
/// a pod may have is ADD's check, against the node subnet: tests/tests/cni_bad_input.rs),
/// nameservers that are IP addresses; and reads the same after a trip through
/// serde_json's writer.
pub fn conf(data: &[u8]) {
    let Ok(c) = parse_conf(data) else {
        return;
    };
    assert!(SUPPORTED_VERSIONS.contains(&c.cni_version.as_str()));
    assert!(!c.name.is_empty() && !c.name.contains('/') && c.name != "." && c.name != "..");
    assert!(valid_ifname(&c.bridge), "bridge {:?} accepted", c.bridge);
    if let Some(m) = c.mtu {
        assert!((68..=65535).contains(&m), "mtu {m}");
    }
    let v: Value = serde_json::from_slice(data).expect("accepted, so it is JSON");
    if let Some(ips) = v.pointer("/runtimeConfig/ips").and_then(Value::as_array) {
        for s in ips.iter().filter_map(Value::as_str) {
            assert!(strict_ip_or_cidr(s), "runtimeConfig.ips: {s:?} accepted");
        }
    }
    for ns in &c.dns.nameservers {
        assert!(
            ns.parse::<IpAddr>().is_ok(),
            "dns.nameservers: {ns:?} accepted"
        );
    }
    let again = parse_conf(v.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the same config re-serialised is refused: {}", e.msg));
    assert_eq!(
        format!("{again:?}"),
        format!("{c:?}"),
        "round trip changed the config"
    );
}

/// A `runtimeConfig` object (the runtime's capability args), inside an otherwise minimal
/// config: see [`conf`] for the rules.
pub fn runtime_config(data: &[u8]) {
    let Ok(rc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let c = json!({"cniVersion": "1.1.0", "name": "fuzz", "type": "twill", "runtimeConfig": rc});
    conf(c.to_string().as_bytes());
}

/// A conflist: an accepted one has supported versions, a name, plugins that each have a
/// `type` that is a plain file name (no path, not empty: CVE-2021-20206, as libcni ≥ 0.8.1),
/// and validates again when written back.
pub fn conflist(data: &[u8]) {
    let Ok(l) = validate_conflist(data) else {
        return;
    };
    assert!(SUPPORTED_VERSIONS.contains(&l.cni_version.as_str()));
    for v in &l.cni_versions {
        assert!(SUPPORTED_VERSIONS.contains(&v.as_str()), "cniVersions {v}");
    }
    assert!(!l.plugins.is_empty());
    for p in &l.plugins {
        let ty = p.get("type").and_then(Value::as_str).expect("type checked");
        assert!(
            !ty.is_empty() && !ty.contains('/') && ty != "." && ty != "..",
            "plugin type {ty:?} accepted"
        );
        assert_eq!(p["cniVersion"], Value::String(l.cni_version.clone()));
        assert_eq!(p["name"], Value::String(l.name.clone()));
    }
    let mut written = json!({"cniVersion": l.cni_version, "name": l.name, "plugins": l.plugins});
    if !l.cni_versions.is_empty() {
        written["cniVersions"] = json!(l.cni_versions);
    }
    let again = validate_conflist(written.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the conflist written back is refused: {}", e.msg));
    assert_eq!(again.plugins, l.plugins, "round trip changed the plugins");
}

/// `CNI_ARGS`: accepted args round-trip through their `K=V;...` form.
pub fn cni_args(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(a) = CniArgs::parse(s) else {
        return;
    };
    let mut parts = vec!["IgnoreUnknown=1".to_string()];
    if let Some(ns) = &a.pod_namespace {
        parts.push(format!("K8S_POD_NAMESPACE={ns}"));
    }
    if let Some(n) = &a.pod_name {
        parts.push(format!("K8S_POD_NAME={n}"));
    }
    if let Some(ip) = &a.ip {
        parts.push(format!("IP={ip}"));
    }
    let text = parts.join(";");
    let back = CniArgs::parse(&text)
        .unwrap_or_else(|e| panic!("CNI_ARGS written back are refused: {}\n{text}", e.msg));
    assert_eq!(back, a, "round trip changed CNI_ARGS\n{text}");
}

/// The environment: `NAME=value` lines. An accepted CNI_IFNAME is a valid interface name
/// (issue 15 items 4 and 6: no `/`, NUL, `%`, non-ASCII, at most 15 bytes); an accepted
/// CNI_CONTAINERID is letters, digits and `_ . -`, starting with a letter or digit.
pub fn env(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let vars: BTreeMap<&str, &str> = s.lines().filter_map(|l| l.split_once('=')).collect();
    let Ok(e) = CniEnv::from_fn(|k| vars.get(k).map(|v| v.to_string())) else {
        return;
    };
    if let Ok(n) = e.ifname() {
        assert!(valid_ifname(n), "CNI_IFNAME {n:?} accepted");
    }
    if let Ok(id) = e.container_id() {
        let mut c = id.chars();
        assert!(
            c.next().is_some_and(|c| c.is_ascii_alphanumeric()),
            "{id:?}"
        );
        assert!(
            c.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "{id:?}"
        );
    }
    if let Ok(ns) = e.netns() {
        assert!(!ns.is_empty());
    }
}

/// `prevResult`: a decoded result encodes in every supported version, and that encoding
/// decodes back to the same result (in 1.1.0, which drops nothing).
pub fn prev_result(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(r) = CniResult::from_value(&v) else {
        return;
    };
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let enc = r.encode(latest);
    let back = CniResult::from_value(&enc)
        .unwrap_or_else(|e| panic!("an encoded result does not decode: {e}\n{enc}"));
    let mut want = r.clone();
    want.cni_version = latest.to_string();
    assert_eq!(back, want, "round trip changed the result\n{enc}");
    for ver in SUPPORTED_VERSIONS {
        let enc = r.encode(ver);
        let back = CniResult::from_value(&enc)
            .unwrap_or_else(|e| panic!("a {ver} result does not decode: {e}\n{enc}"));
        assert_eq!(back.encode(ver), enc, "{ver} encoding is not stable");
    }
}
