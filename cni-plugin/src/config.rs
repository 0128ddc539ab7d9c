//! The plugin's network configuration (stdin), and the conflist validator used by the
//! deployment tests.
//!
//! Keys (see docs/cni.md): `subnetFile`, `bridge`, `mtu`, `hairpinMode`, `isDefaultGateway`,
//! `dataDir`, `dns`, `logFile`, `logLevel`, plus the spec's `cniVersion`, `name`, `type`,
//! `runtimeConfig.ips`, `prevResult` and GC's `cni.dev/valid-attachments` (also the older
//! `cni.dev/attachments`). Unknown keys and `capabilities` are tolerated.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::env::validate_ifname;
use crate::error::{CniError, Result, code};
use crate::types::Dns;

/// The spec versions twill speaks, oldest first. VERSION lists exactly these.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version: what VERSION answers in when it is asked in no version.
pub const LATEST: &str = "1.1.0";

pub const DEFAULT_SUBNET_FILE: &str = "/run/twill/subnet.env";
pub const DEFAULT_BRIDGE: &str = "cni0";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/twill";

/// `a >= b` for dotted versions.
pub fn version_at_least(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a) >= parse(b)
}

/// One (container ID, ifname) that GC must keep.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// One `runtimeConfig.ips` entry: `addr` or `addr/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeIp {
    pub ip: IpAddr,
    pub prefix: Option<u8>,
    /// The entry as the runtime wrote it, for error messages.
    pub text: String,
}

/// Parses `addr` or `addr/prefix` strictly: the address as std parses it, the prefix one to
/// three decimal digits within the family's maximum; nothing else (no sign, no spaces, no
/// trailing text).
pub fn parse_ip_with_prefix(s: &str) -> std::result::Result<(IpAddr, Option<u8>), String> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    let prefix = match p {
        None => None,
        Some(p) => {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let n = (!p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u8>().ok())
                .flatten()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("prefix length {p:?} is not a number from 0 to {max}"))?;
            Some(n)
        }
    };
    Ok((ip, prefix))
}

/// The parsed configuration of the `twill` plugin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub subnet_file: PathBuf,
    pub bridge: String,
    /// MTU for the pod's interface; `None`: FLANNEL_MTU from the subnet file.
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub is_default_gateway: bool,
    pub data_dir: PathBuf,
    pub dns: Dns,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<String>,
    /// `runtimeConfig.ips`: IPs the runtime asks for, each with its prefix length if one
    /// was given (ADD requires it to equal the node subnet's), and the entry as written.
    pub runtime_ips: Vec<RuntimeIp>,
    pub prev_result: Option<Value>,
    /// GC: `cni.dev/valid-attachments` (or `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn invalid(msg: String) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// Reads an optional key of type `T`; a wrong type names the key and the value.
fn field<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Option<T>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| invalid(format!("config key {key}={v}: {e}"))),
    }
}

/// Parses stdin into a JSON object (code 6 if it is not JSON, 7 if not an object) and
/// checks `cniVersion` (code 1 if it is not one twill speaks).
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!("network config on stdin is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = v else {
        return Err(invalid(format!(
            "network config must be a JSON object, got {v}"
        )));
    };
    Ok(obj)
}

/// `cniVersion` of a config object, checked against [`SUPPORTED_VERSIONS`].
pub fn cni_version(obj: &Map<String, Value>) -> Result<String> {
    let v: String = field(obj, "cniVersion")?
        .ok_or_else(|| invalid("config key cniVersion is required".into()))?;
    if !SUPPORTED_VERSIONS.contains(&v.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion={v:?} is not supported"),
        )
        .with_details(format!(
            "supported versions: {}",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    Ok(v)
}

/// Parses the plugin's configuration from stdin.
pub fn parse_conf(bytes: &[u8]) -> Result<NetConf> {
    let obj = parse_object(bytes)?;
    let cni_version = cni_version(&obj)?;
    let name: String =
        field(&obj, "name")?.ok_or_else(|| invalid("config key name is required".into()))?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(invalid(format!(
            "config key name={name:?}: not a valid network name"
        )));
    }
    let bridge: String = field(&obj, "bridge")?.unwrap_or_else(|| DEFAULT_BRIDGE.into());
    validate_ifname("bridge", &bridge).map_err(|e| invalid(format!("config key {}", e.msg)))?;
    let mtu: Option<u32> = field(&obj, "mtu")?;
    if let Some(m) = mtu
        && !(68..=65535).contains(&m)
    {
        return Err(invalid(format!(
            "config key mtu={m}: must be between 68 and 65535"
        )));
    }
    let runtime: Option<Map<String, Value>> = field(&obj, "runtimeConfig")?;
    let mut runtime_ips = Vec::new();
    if let Some(rc) = &runtime {
        let ips: Vec<String> = field(rc, "ips")
            .map_err(|e| {
                invalid(format!(
                    "runtimeConfig.{}",
                    e.msg.trim_start_matches("config key ")
                ))
            })?
            .unwrap_or_default();
        for s in ips {
            let (ip, prefix) = parse_ip_with_prefix(&s)
                .map_err(|e| invalid(format!("runtimeConfig.ips: {s:?}: {e}")))?;
            runtime_ips.push(RuntimeIp {
                ip,
                prefix,
                text: s,
            });
        }
    }
    let dns: Dns = field(&obj, "dns")?.unwrap_or_default();
    for (i, ns) in dns.nameservers.iter().enumerate() {
        if ns.parse::<IpAddr>().is_err() {
            return Err(invalid(format!(
                "config key dns.nameservers[{i}]={ns:?}: not an IP address"
            )));
        }
    }
    let log_file: Option<PathBuf> = field(&obj, "logFile")?;
    let valid_attachments = match field(&obj, "cni.dev/valid-attachments")? {
        Some(v) => Some(v),
        None => field(&obj, "cni.dev/attachments")?,
    };
    Ok(NetConf {
        cni_version,
        name,
        plugin_type: field(&obj, "type")?.unwrap_or_else(|| "twill".into()),
        subnet_file: field(&obj, "subnetFile")?.unwrap_or_else(|| DEFAULT_SUBNET_FILE.into()),
        bridge,
        mtu,
        hairpin_mode: field(&obj, "hairpinMode")?.unwrap_or(true),
        is_default_gateway: field(&obj, "isDefaultGateway")?.unwrap_or(true),
        data_dir: field(&obj, "dataDir")?.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        dns,
        log_file,
        log_level: field(&obj, "logLevel")?,
        runtime_ips,
        prev_result: obj.get("prevResult").filter(|v| !v.is_null()).cloned(),
        valid_attachments,
    })
}

/// A validated conflist (`/etc/cni/net.d/10-twill.conflist`).
#[derive(Debug, Clone)]
pub struct ConfList {
    pub cni_version: String,
    pub cni_versions: Vec<String>,
    pub name: String,
    /// Each plugin's config as libcni hands it to the plugin: with the list's `cniVersion`
    /// and `name` injected.
    pub plugins: Vec<Value>,
}

/// Validates a conflist the way libcni reads it, and each `twill` entry with
/// [`parse_conf`]: `cniVersion` (and every `cniVersions` entry) supported, a `name`, a
/// non-empty `plugins` array whose entries each have a `type`.
pub fn validate_conflist(bytes: &[u8]) -> Result<ConfList> {
    let obj = parse_object(bytes)?;
    let cni_version = cni_version(&obj)?;
    let cni_versions: Vec<String> = field(&obj, "cniVersions")?.unwrap_or_default();
    for v in &cni_versions {
        if !SUPPORTED_VERSIONS.contains(&v.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersions: {v:?} is not supported"),
            ));
        }
    }
    let name: String =
        field(&obj, "name")?.ok_or_else(|| invalid("conflist key name is required".into()))?;
    let plugins: Vec<Map<String, Value>> = field(&obj, "plugins")?
        .ok_or_else(|| invalid("conflist key plugins is required".into()))?;
    if plugins.is_empty() {
        return Err(invalid("conflist key plugins is empty".into()));
    }
    let mut out = Vec::new();
    for (i, mut p) in plugins.into_iter().enumerate() {
        let ty: String = field(&p, "type")?
            .ok_or_else(|| invalid(format!("plugins[{i}]: key type is required")))?;
        // libcni (since 0.8.1, CVE-2021-20206) refuses a type that is not a bare file
        // name: it is looked up in CNI_PATH, and a path would run any binary.
        if ty.is_empty() || ty == "." || ty == ".." || ty.contains('/') || ty.contains('\\') {
            return Err(invalid(format!(
                "plugins[{i}]: key type={ty:?}: not a plugin name (empty, . or .., or contains / or \\)"
            )));
        }
        p.insert("cniVersion".into(), Value::String(cni_version.clone()));
        p.insert("name".into(), Value::String(name.clone()));
        let v = Value::Object(p);
        if ty == "twill" {
            parse_conf(v.to_string().as_bytes()).map_err(|e| CniError {
                msg: format!("plugins[{i}] (twill): {}", e.msg),
                ..e
            })?;
        }
        out.push(v);
    }
    Ok(ConfList {
        cni_version,
        cni_versions,
        name,
        plugins: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = parse_conf(br#"{"cniVersion":"1.0.0","name":"twill","type":"twill"}"#).unwrap();
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(c.is_default_gateway && c.hairpin_mode);
        assert_eq!(c.mtu, None);
    }

    #[test]
    fn all_keys_unknown_tolerated() {
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"twill","subnetFile":"/x/s.env",
            "bridge":"br9","mtu":1400,"hairpinMode":false,"isDefaultGateway":false,
            "dataDir":"/d","dns":{"nameservers":["10.96.0.10"],"search":["svc.cluster.local"]},
            "capabilities":{"portMappings":true},"somethingNew":{"a":1},
            "runtimeConfig":{"ips":["10.244.3.9/24"],"portMappings":[]},
            "cni.dev/attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.bridge, "br9");
        assert_eq!(c.mtu, Some(1400));
        assert!(!c.hairpin_mode && !c.is_default_gateway);
        assert_eq!(c.dns.nameservers, vec!["10.96.0.10".to_string()]);
        assert_eq!(c.runtime_ips[0].ip.to_string(), "10.244.3.9");
        assert_eq!(c.runtime_ips[0].prefix, Some(24));
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "c1");
    }

    #[test]
    fn errors_name_field_and_value() {
        let e = parse_conf(b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let e = parse_conf(br#"{"cniVersion":"0.2.0","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("0.2.0"));
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("mtu") && e.msg.contains("big"), "{e}");
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","bridge":"a-very-long-bridge"}"#)
            .unwrap_err();
        assert!(
            e.msg.contains("bridge") && e.msg.contains("a-very-long-bridge"),
            "{e}"
        );
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"ips":["x"]}}"#)
            .unwrap_err();
        assert!(
            e.msg.contains("runtimeConfig.ips") && e.msg.contains("\"x\""),
            "{e}"
        );
        for bad in [
            "10.244.3.9/garbage",
            "10.244.3.9/",
            "10.244.3.9/33",
            "10.244.3.9/+24",
            "10.244.3.9/24/1",
            "10.244.3.9/ 24",
            "10.244.3.9 ",
            "fd00::1/129",
        ] {
            let c = format!(
                r#"{{"cniVersion":"1.0.0","name":"n","runtimeConfig":{{"ips":["{bad}"]}}}}"#
            );
            let e = parse_conf(c.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
            assert!(
                e.msg.contains("runtimeConfig.ips") && e.msg.contains(bad),
                "{e}"
            );
        }
        let e = parse_conf(
            br#"{"cniVersion":"1.0.0","name":"n","dns":{"nameservers":["10.96.0.10","dns.example"]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(
            e.msg.contains("dns.nameservers[1]") && e.msg.contains("dns.example"),
            "{e}"
        );
        for bad in ["eth0%d", "lo\\u0000", "br\\u00e9", "a b"] {
            let c = format!(r#"{{"cniVersion":"1.0.0","name":"n","bridge":"{bad}"}}"#);
            let e = parse_conf(c.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
            assert!(e.msg.contains("bridge"), "{e}");
        }
        let e = parse_conf(br#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert!(e.msg.contains("name"), "{e}");
    }

    #[test]
    fn conflist_of_design_md() {
        let l = validate_conflist(
            br#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"twill","plugins":[
  {"type":"twill","subnetFile":"/run/twill/subnet.env","bridge":"cni0","hairpinMode":true},
  {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        assert_eq!(l.plugins.len(), 2);
        assert_eq!(l.plugins[1]["cniVersion"], "1.0.0");
        assert_eq!(l.plugins[1]["name"], "twill");
        let e = validate_conflist(
            br#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"twill","mtu":1}]}"#,
        )
        .unwrap_err();
        assert!(
            e.msg.contains("plugins[0]") && e.msg.contains("mtu=1"),
            "{e}"
        );
        assert!(validate_conflist(br#"{"cniVersion":"1.0.0","name":"t","plugins":[]}"#).is_err());
        assert!(validate_conflist(br#"{"cniVersion":"1.0.0","name":"t","plugins":[{}]}"#).is_err());
        for bad in [
            "",
            ".",
            "..",
            "/bin/sh",
            "../../bin/sh",
            "a\\\\b",
            "sub/dir",
        ] {
            let c =
                format!(r#"{{"cniVersion":"1.0.0","name":"t","plugins":[{{"type":"{bad}"}}]}}"#);
            let e = validate_conflist(c.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
            assert!(
                e.msg.contains("plugins[0]") && e.msg.contains("type"),
                "{e}"
            );
        }
    }

    #[test]
    fn versions() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }
}
