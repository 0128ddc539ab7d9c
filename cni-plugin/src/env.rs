//! The CNI environment variables: CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
//! CNI_ARGS, CNI_PATH.

use std::collections::BTreeMap;
use std::net::IpAddr;

use twill_dataplane::pod::Pod;

use crate::error::{CniError, Result, code};

/// The verb the runtime asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND={s:?}: unknown command"),
                )
                .with_details("expected ADD, DEL, CHECK, GC, STATUS or VERSION"));
            }
        })
    }
}

/// The parsed CNI_ARGS (`IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;IP=..`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub ip: Option<IpAddr>,
    /// The prefix length given with `IP=` (ADD requires the node subnet's).
    pub ip_prefix: Option<u8>,
}

impl CniArgs {
    /// Unknown keys are an error (code 2) unless `IgnoreUnknown=1` (or `true`) is given.
    pub fn parse(s: &str) -> Result<Self> {
        let mut kv = BTreeMap::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                ));
            };
            kv.insert(k.trim(), v.trim());
        }
        let ignore_unknown = matches!(
            kv.get("IgnoreUnknown").map(|v| v.to_ascii_lowercase()),
            Some(v) if v == "1" || v == "true"
        );
        let mut args = CniArgs::default();
        for (k, v) in kv {
            match k {
                "IgnoreUnknown" | "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
                "K8S_POD_NAMESPACE" => args.pod_namespace = Some(v.to_string()),
                "K8S_POD_NAME" => args.pod_name = Some(v.to_string()),
                "IP" => {
                    // Strict, as runtimeConfig.ips: `addr` or `addr/prefix`, nothing else.
                    let (ip, prefix) = crate::config::parse_ip_with_prefix(v).map_err(|e| {
                        CniError::new(code::INVALID_ENV, format!("CNI_ARGS: IP={v:?}: {e}"))
                    })?;
                    args.ip = Some(ip);
                    args.ip_prefix = prefix;
                }
                _ if ignore_unknown => {}
                _ => {
                    return Err(CniError::new(
                        code::UNSUPPORTED_FIELD,
                        format!("CNI_ARGS: unknown key {k:?} (set IgnoreUnknown=1 to allow it)"),
                    ));
                }
            }
        }
        Ok(args)
    }
}

/// The longest CNI_CONTAINERID: the host veth's alias `twill:<id>/<ifname>` must fit the
/// kernel's 255 bytes (IFALIASZ - 1) with a 15-byte ifname.
pub const MAX_CONTAINER_ID: usize = 255 - 6 - 1 - 15;

/// The environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: CniArgs,
}

fn var(get: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name).filter(|v| !v.is_empty())
}

impl CniEnv {
    /// Reads the variables through `get` (`std::env::var` in the binary).
    pub fn from_fn(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        Ok(CniEnv {
            container_id: var(&get, "CNI_CONTAINERID"),
            netns: var(&get, "CNI_NETNS"),
            ifname: var(&get, "CNI_IFNAME"),
            args: CniArgs::parse(&var(&get, "CNI_ARGS").unwrap_or_default())?,
        })
    }

    /// CNI_CONTAINERID, required and valid (alphanumerics, then also `_ . -`).
    pub fn container_id(&self) -> Result<&str> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_CONTAINERID is required"))?;
        let mut chars = id.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID={id:?}: invalid characters"),
            )
            .with_details("allowed: letters, digits, and _ . - after the first character"));
        }
        if id.len() > MAX_CONTAINER_ID {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID={id:?}: longer than {MAX_CONTAINER_ID} bytes (the host veth's alias must hold it)"
                ),
            ));
        }
        Ok(id)
    }

    /// CNI_IFNAME, required and a valid Linux interface name (1–15 bytes, no `/`, `:` or
    /// whitespace, not `.` or `..`).
    pub fn ifname(&self) -> Result<&str> {
        let n = self
            .ifname
            .as_deref()
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_IFNAME is required"))?;
        validate_ifname("CNI_IFNAME", n)?;
        Ok(n)
    }

    /// The attachment this invocation is about: CNI_CONTAINERID and CNI_IFNAME (both
    /// required and valid), CNI_NETNS if given, and the host veth's name they make.
    pub fn pod(&self) -> Result<Pod> {
        let container_id = self.container_id()?;
        let ifname = self.ifname()?;
        Ok(Pod {
            container_id: container_id.into(),
            ifname: ifname.into(),
            netns: self.netns.clone(),
            host_veth: crate::host_veth_name(container_id, ifname),
        })
    }

    /// CNI_NETNS, required.
    pub fn netns(&self) -> Result<&str> {
        self.netns
            .as_deref()
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is required"))
    }
}

/// Checks a Linux interface name; `what` names the field in the error. The kernel's
/// `dev_valid_name` rules (1 to 15 bytes, not `.` or `..`, no `/`, `:` or whitespace), and
/// stricter: ASCII only, no NUL and no `%` (the kernel reads a `%d` in a new link's name as
/// "pick a number", so the link made would not have the name asked for). One validator for
/// `CNI_IFNAME` and the `bridge` key.
pub fn validate_ifname(what: &str, n: &str) -> Result<()> {
    let reason = if n.is_empty() {
        Some("empty")
    } else if n.len() > 15 {
        Some("longer than 15 bytes")
    } else if n == "." || n == ".." {
        Some("not a valid interface name")
    } else if !n.is_ascii() {
        Some("contains a non-ASCII character")
    } else if n.bytes().any(|c| {
        c == b'/'
            || c == b':'
            || c == b'%'
            || c == 0
            || c.is_ascii_whitespace()
            || c < 0x20
            || c == 0x7f
    }) {
        Some("contains '/', ':', '%', NUL, whitespace or a control character")
    } else {
        None
    };
    match reason {
        Some(r) => Err(CniError::new(
            code::INVALID_ENV,
            format!("{what}={n:?}: {r}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;FOO=bar;IP=10.1.0.9",
        )
        .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.ip.unwrap().to_string(), "10.1.0.9");
        let e = CniArgs::parse("FOO=bar").unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
        assert!(e.msg.contains("FOO"));
        assert_eq!(CniArgs::parse("junk").unwrap_err().code, code::INVALID_ENV);
        let e = CniArgs::parse("IP=10.1.0.9/garbage").unwrap_err();
        assert!(e.msg.contains("IP=\"10.1.0.9/garbage\""), "{e}");
        assert_eq!(
            CniArgs::parse("IP=10.1.0.9/24").unwrap().ip_prefix,
            Some(24)
        );
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    #[test]
    fn env_validation() {
        let env = |id: &str, ifn: &str| CniEnv {
            container_id: Some(id.into()),
            ifname: Some(ifn.into()),
            ..Default::default()
        };
        assert!(env("abc-1.2_3", "eth0").container_id().is_ok());
        assert_eq!(env("-abc", "eth0").container_id().unwrap_err().code, 4);
        assert_eq!(env("a b", "eth0").container_id().unwrap_err().code, 4);
        let e = env("a", "eth0123456789abc").ifname().unwrap_err();
        assert!(
            e.msg.contains("CNI_IFNAME") && e.msg.contains("15 bytes"),
            "{e}"
        );
        assert!(env("a", "a/b").ifname().is_err());
        for bad in [
            "",
            ".",
            "..",
            "a:b",
            "a b",
            "a\tb",
            "a\0b",
            "eth%d",
            "ethé",
            "a\nb",
            "0123456789abcdef",
        ] {
            let e = validate_ifname("CNI_IFNAME", bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
            assert!(e.msg.contains("CNI_IFNAME"), "{e}");
        }
        for good in ["eth0", "net1", "a", "0123456789abcde", "veth-x_y.z"] {
            validate_ifname("CNI_IFNAME", good).unwrap();
        }
        assert_eq!(
            CniEnv::default().ifname().unwrap_err().msg,
            "CNI_IFNAME is required"
        );
    }
}
