//! The CNI result, encoded in the version the runtime asked for: 0.3.x and 0.4.0 carry
//! `ips[].version`; only 1.1.0 carries `interfaces[].mtu` (and the other 1.1.0 additions).
//! Decoding accepts any supported version (for `prevResult`) and keeps fields twill does not
//! know, so a chain's earlier results pass through.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::version_at_least;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// An ADD result (also a `prevResult`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

const IFACE_1_1: &[&str] = &["mtu", "socketPath", "pciID"];
const ROUTE_1_1: &[&str] = &["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// Decodes a result (e.g. `prevResult`) of any supported version.
    pub fn from_value(v: &Value) -> Result<Self, serde_json::Error> {
        let mut r: CniResult = serde_json::from_value(v.clone())?;
        for ip in &mut r.ips {
            ip.extra.remove("version");
        }
        Ok(r)
    }

    /// The result as the JSON of spec version `version`.
    pub fn encode(&self, version: &str) -> Value {
        let mut r = self.clone();
        r.cni_version = version.to_string();
        let old = !version_at_least(version, "1.0.0");
        let pre_1_1 = !version_at_least(version, "1.1.0");
        for ip in &mut r.ips {
            ip.extra.remove("version");
            if old {
                let fam = if ip.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                };
                ip.extra.insert("version".into(), fam.into());
            }
        }
        if pre_1_1 {
            for i in &mut r.interfaces {
                i.mtu = None;
                i.extra.retain(|k, _| !IFACE_1_1.contains(&k.as_str()));
            }
            for rt in &mut r.routes {
                rt.extra.retain(|k, _| !ROUTE_1_1.contains(&k.as_str()));
            }
        }
        let mut v = serde_json::to_value(&r).expect("result serializes");
        // The spec's examples put `version` first in an IP entry; order is cosmetic only.
        if let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips {
                if let Some(o) = ip.as_object_mut()
                    && let Some(ver) = o.remove("version")
                {
                    let mut n = Map::new();
                    n.insert("version".into(), ver);
                    n.extend(std::mem::take(o));
                    *o = n;
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn example() -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: Some("00:11:22:33:44:55".into()),
                    ..Default::default()
                },
                Interface {
                    name: "veth3243".into(),
                    mac: Some("55:44:33:22:11:11".into()),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("99:88:77:66:55:44".into()),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/blue".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.1.0.5/16".parse().unwrap(),
                gateway: Some("10.1.0.1".parse().unwrap()),
                interface: Some(2),
                extra: Map::new(),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
                extra: Map::new(),
            }],
            dns: Dns {
                nameservers: vec!["10.1.0.1".into()],
                ..Default::default()
            },
        }
    }

    fn spec_example(version: &str, with_ip_version: bool, with_mtu: bool) -> Value {
        let mut eth0 =
            json!({"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"});
        if with_mtu {
            eth0["mtu"] = json!(1450);
        }
        let mut ip = json!({"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2});
        if with_ip_version {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                eth0
            ],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    #[test]
    fn encodes_each_version_like_the_spec() {
        let r = example();
        assert_eq!(r.encode("0.3.1"), spec_example("0.3.1", true, false));
        assert_eq!(r.encode("0.4.0"), spec_example("0.4.0", true, false));
        assert_eq!(r.encode("1.0.0"), spec_example("1.0.0", false, false));
        assert_eq!(r.encode("1.1.0"), spec_example("1.1.0", false, true));
        // `version` comes first in 0.3.x/0.4.0 IP entries, as in the spec's examples.
        let s = r.encode("0.3.1")["ips"][0].to_string();
        assert!(s.starts_with(r#"{"version":"4""#), "{s}");
    }

    #[test]
    fn decodes_every_version_and_keeps_unknown_fields() {
        for (v, ipv, mtu) in [
            ("0.3.1", true, false),
            ("0.4.0", true, false),
            ("1.0.0", false, false),
            ("1.1.0", false, true),
        ] {
            let d = CniResult::from_value(&spec_example(v, ipv, mtu)).unwrap();
            assert_eq!(d.ips[0].address.to_string(), "10.1.0.5/16");
            assert!(d.ips[0].extra.is_empty());
            assert_eq!(d.encode(v), spec_example(v, ipv, mtu));
        }
        let mut ex = spec_example("1.1.0", false, true);
        ex["interfaces"][0]["socketPath"] = json!("/run/x.sock");
        ex["routes"][0]["priority"] = json!(100);
        let d = CniResult::from_value(&ex).unwrap();
        assert_eq!(d.encode("1.1.0"), ex);
        let old = d.encode("1.0.0");
        assert!(old["interfaces"][0].get("socketPath").is_none());
        assert!(old["routes"][0].get("priority").is_none());
    }
}
