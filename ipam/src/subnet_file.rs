//! The subnet file (`/run/twill/subnet.env`) that twilld writes and the CNI plugin reads,
//! with Flannel's key names so that either CNI plugin can read either daemon's file:
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.3.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//!
//! `FLANNEL_SUBNET` is the node's gateway address with the subnet's prefix length (the first
//! host address of the node subnet). A node with an IPv6 subnet (dual-stack) also has
//! `FLANNEL_IPV6_NETWORK` and `FLANNEL_IPV6_SUBNET` (its IPv6 gateway/len), written after the
//! IPv4 pair and before `FLANNEL_MTU`, as flanneld's `WriteSubnetFile` does; Flannel's CNI
//! plugin (`loadFlannelSubnetEnv`) reads the keys in any order. An IPv4-only file is what it
//! always was, byte for byte.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv6Net};

/// Errors reading, parsing or writing the subnet file; each names the path, and the key and
/// value when one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SubnetFileError {
    #[error("subnet file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("subnet file {path}: line {line}: expected KEY=VALUE, got {text:?}")]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("subnet file {path}: {key}={value:?}: {reason}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("subnet file {path}: missing key {key}")]
    Missing { path: PathBuf, key: &'static str },
    /// Not something the plugin may read: not a regular file, or larger than
    /// [`MAX_SUBNET_FILE`].
    #[error("subnet file {path}: {reason}")]
    NotAFile { path: PathBuf, reason: String },
}

/// The subnet file's permission bits: readable by everyone, as Flannel writes it.
pub const SUBNET_FILE_MODE: u32 = 0o644;

/// The largest subnet file read (a real one is about 120 bytes).
pub const MAX_SUBNET_FILE: u64 = 64 * 1024;

/// The contents of the subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetFile {
    /// The whole cluster network (FLANNEL_NETWORK), e.g. 10.244.0.0/16.
    pub network: IpNet,
    /// The node's gateway with the node subnet's prefix length (FLANNEL_SUBNET), e.g.
    /// 10.244.3.1/24. [`SubnetFile::node_subnet`] gives the network, 10.244.3.0/24.
    pub subnet: IpNet,
    /// MTU for pod interfaces (FLANNEL_MTU).
    pub mtu: u32,
    /// Whether twilld masquerades traffic leaving the cluster network (FLANNEL_IPMASQ).
    pub ip_masq: bool,
    /// FLANNEL_IPV6_NETWORK, if the node is dual-stack (always an IPv6 net; set together
    /// with `ipv6_subnet`).
    pub ipv6_network: Option<IpNet>,
    /// FLANNEL_IPV6_SUBNET (gateway/len), if the node is dual-stack (always an IPv6 net).
    pub ipv6_subnet: Option<IpNet>,
}

impl SubnetFile {
    /// Builds the file contents for a node subnet (e.g. 10.244.3.0/24): the gateway is the
    /// first host address of the subnet.
    pub fn for_node_subnet(network: IpNet, node_subnet: IpNet, mtu: u32, ip_masq: bool) -> Self {
        SubnetFile {
            network,
            subnet: gateway_of(node_subnet),
            mtu,
            ip_masq,
            ipv6_network: None,
            ipv6_subnet: None,
        }
    }

    /// These contents with the node's IPv6 subnet (e.g. fd00:10:0:3::/64, gateway
    /// fd00:10:0:3::1) in the cluster's IPv6 network: a dual-stack node.
    pub fn with_ipv6(mut self, network: Ipv6Net, node_subnet: Ipv6Net) -> Self {
        self.ipv6_network = Some(IpNet::V6(network));
        self.ipv6_subnet = Some(gateway_of(IpNet::V6(node_subnet)));
        self
    }

    /// The node's IPv6 subnet, e.g. fd00:10:0:3::/64 for FLANNEL_IPV6_SUBNET=fd00:10:0:3::1/64.
    pub fn ipv6_node_subnet(&self) -> Option<IpNet> {
        self.ipv6_subnet.map(|s| s.trunc())
    }

    /// The IPv6 gateway (the bridge's IPv6 address), e.g. fd00:10:0:3::1.
    pub fn ipv6_gateway(&self) -> Option<IpAddr> {
        self.ipv6_subnet.map(|s| s.addr())
    }

    /// The node subnet itself, e.g. 10.244.3.0/24 for FLANNEL_SUBNET=10.244.3.1/24.
    pub fn node_subnet(&self) -> IpNet {
        self.subnet.trunc()
    }

    /// The gateway (the bridge's address), e.g. 10.244.3.1.
    pub fn gateway(&self) -> IpAddr {
        self.subnet.addr()
    }

    /// Reads and parses the file at `path`. Only a regular file is read (a FIFO, a device,
    /// a directory is refused without blocking: the open is non-blocking and the type is
    /// checked on the open descriptor), and at most [`MAX_SUBNET_FILE`] bytes of it. A
    /// symlink is followed (installs point the path at Flannel's file, or mount it from a
    /// ConfigMap, whose files are symlinks); what it leads to must be a regular file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, SubnetFileError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let io = |source| SubnetFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_a_file = |reason: String| SubnetFileError::NotAFile {
            path: path.to_path_buf(),
            reason,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(not_a_file(format!(
                "not a regular file (a {})",
                file_kind(&meta.file_type())
            )));
        }
        let mut buf = Vec::new();
        f.take(MAX_SUBNET_FILE + 1)
            .read_to_end(&mut buf)
            .map_err(io)?;
        if buf.len() as u64 > MAX_SUBNET_FILE {
            return Err(not_a_file(format!("larger than {MAX_SUBNET_FILE} bytes")));
        }
        let text = String::from_utf8(buf).map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })?;
        Self::parse(path, &text)
    }

    /// Parses the file's text; `path` is only used in error messages. Blank lines and `#`
    /// comments are skipped, unknown keys ignored, values may be quoted.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Self, SubnetFileError> {
        let path = path.as_ref();
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut ip_masq = false;
        let mut ipv6_network = None;
        let mut ipv6_subnet = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(SubnetFileError::Syntax {
                    path: path.to_path_buf(),
                    line: i + 1,
                    text: raw.to_string(),
                });
            };
            let key = key.trim().trim_start_matches("export ").trim();
            let value = value.trim().trim_matches('"').trim_matches('\'');
            let bad = |key: &'static str, reason: String| SubnetFileError::Value {
                path: path.to_path_buf(),
                key,
                value: value.to_string(),
                reason,
            };
            match key {
                "FLANNEL_NETWORK" => {
                    network = Some(
                        value
                            .parse::<IpNet>()
                            .map_err(|e| bad("FLANNEL_NETWORK", e.to_string()))?,
                    )
                }
                "FLANNEL_SUBNET" => {
                    subnet = Some(
                        value
                            .parse::<IpNet>()
                            .map_err(|e| bad("FLANNEL_SUBNET", e.to_string()))?,
                    )
                }
                "FLANNEL_MTU" => {
                    let v: u32 = value
                        .parse()
                        .map_err(|e: std::num::ParseIntError| bad("FLANNEL_MTU", e.to_string()))?;
                    if !(68..=65535).contains(&v) {
                        return Err(bad("FLANNEL_MTU", "must be between 68 and 65535".into()));
                    }
                    mtu = Some(v)
                }
                "FLANNEL_IPMASQ" => {
                    ip_masq = match value {
                        "true" | "1" => true,
                        "false" | "0" | "" => false,
                        _ => return Err(bad("FLANNEL_IPMASQ", "expected true or false".into())),
                    }
                }
                "FLANNEL_IPV6_NETWORK" => {
                    ipv6_network = Some(
                        value
                            .parse::<IpNet>()
                            .map_err(|e| bad("FLANNEL_IPV6_NETWORK", e.to_string()))?,
                    )
                }
                "FLANNEL_IPV6_SUBNET" => {
                    ipv6_subnet = Some(
                        value
                            .parse::<IpNet>()
                            .map_err(|e| bad("FLANNEL_IPV6_SUBNET", e.to_string()))?,
                    )
                }
                _ => {}
            }
        }
        let missing = |key| SubnetFileError::Missing {
            path: path.to_path_buf(),
            key,
        };
        let network = network.ok_or_else(|| missing("FLANNEL_NETWORK"))?;
        let subnet = subnet.ok_or_else(|| missing("FLANNEL_SUBNET"))?;
        let mtu = mtu.ok_or_else(|| missing("FLANNEL_MTU"))?;
        let check = |key: &'static str, net: IpNet, within: IpNet| {
            if within.contains(&net) {
                Ok(())
            } else {
                Err(SubnetFileError::Value {
                    path: path.to_path_buf(),
                    key,
                    value: net.to_string(),
                    reason: format!("not inside the cluster network {within}"),
                })
            }
        };
        check("FLANNEL_SUBNET", subnet, network)?;
        let check_room = |key: &'static str, s: IpNet| {
            if s.max_prefix_len() - s.prefix_len() < 2 {
                return Err(SubnetFileError::Value {
                    path: path.to_path_buf(),
                    key,
                    value: s.to_string(),
                    reason: "the node subnet has no room for pods".into(),
                });
            }
            Ok(())
        };
        check_room("FLANNEL_SUBNET", subnet)?;
        for (key, v) in [
            ("FLANNEL_IPV6_NETWORK", ipv6_network),
            ("FLANNEL_IPV6_SUBNET", ipv6_subnet),
        ] {
            if let Some(n @ IpNet::V4(_)) = v {
                return Err(SubnetFileError::Value {
                    path: path.to_path_buf(),
                    key,
                    value: n.to_string(),
                    reason: "not an IPv6 net".into(),
                });
            }
        }
        match (ipv6_network, ipv6_subnet) {
            (Some(_), None) => return Err(missing("FLANNEL_IPV6_SUBNET")),
            (None, Some(_)) => return Err(missing("FLANNEL_IPV6_NETWORK")),
            _ => {}
        }
        // The address in FLANNEL_SUBNET is the bridge's, the pods' gateway: any host of
        // the subnet (the allocator skips it), never the network or broadcast address.
        let check_gateway = |key: &'static str, s: IpNet| {
            let reason = if s.addr() == s.network() {
                Some("the gateway (the address) is the subnet's network address")
            } else if s.addr().is_ipv4() && s.addr() == s.broadcast() {
                Some("the gateway (the address) is the subnet's broadcast address")
            } else {
                None
            };
            match reason {
                Some(r) => Err(SubnetFileError::Value {
                    path: path.to_path_buf(),
                    key,
                    value: s.to_string(),
                    reason: r.into(),
                }),
                None => Ok(()),
            }
        };
        check_gateway("FLANNEL_SUBNET", subnet)?;
        if let (Some(n), Some(s)) = (ipv6_network, ipv6_subnet) {
            check("FLANNEL_IPV6_SUBNET", s, n)?;
            check_room("FLANNEL_IPV6_SUBNET", s)?;
            check_gateway("FLANNEL_IPV6_SUBNET", s)?;
        }
        Ok(SubnetFile {
            network,
            subnet,
            mtu,
            ip_masq,
            ipv6_network,
            ipv6_subnet,
        })
    }

    /// The file's text, in Flannel's order.
    pub fn render(&self) -> String {
        let mut s = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\n",
            self.network, self.subnet
        );
        if let Some(n) = self.ipv6_network {
            s += &format!("FLANNEL_IPV6_NETWORK={n}\n");
        }
        if let Some(n) = self.ipv6_subnet {
            s += &format!("FLANNEL_IPV6_SUBNET={n}\n");
        }
        s += &format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ip_masq
        );
        s
    }

    /// Writes the file atomically ([`crate::fsutil::replace_file`]), mode 0644 as Flannel's:
    /// readers see the old or the new file, never a part. Creates the parent directory if
    /// needed.
    pub fn write_atomic(&self, path: impl AsRef<Path>) -> Result<(), SubnetFileError> {
        let path = path.as_ref();
        crate::fsutil::replace_file(path, self.render().as_bytes(), SUBNET_FILE_MODE).map_err(
            |source| SubnetFileError::Io {
                path: path.to_path_buf(),
                source,
            },
        )
    }
}

/// What a file type is, for an error message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// The gateway address (first host) of a subnet, with the subnet's prefix length.
pub fn gateway_of(subnet: IpNet) -> IpNet {
    let net = subnet.trunc();
    let gw = match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    };
    IpNet::new(gw, net.prefix_len()).expect("prefix length of an existing net")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn parses_flannels_file() {
        let f = SubnetFile::parse("x", FLANNEL).unwrap();
        assert_eq!(f.network.to_string(), "10.244.0.0/16");
        assert_eq!(f.subnet.to_string(), "10.244.3.1/24");
        assert_eq!(f.node_subnet().to_string(), "10.244.3.0/24");
        assert_eq!(f.gateway().to_string(), "10.244.3.1");
        assert_eq!(f.mtu, 1450);
        assert!(f.ip_masq);
        assert_eq!(f.render(), FLANNEL);
    }

    #[test]
    fn round_trips_through_disk_with_ipv6() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/twill/subnet.env");
        let mut f = SubnetFile::for_node_subnet(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.7.0/24".parse().unwrap(),
            1450,
            false,
        );
        f.ipv6_network = Some("fd00:10::/56".parse().unwrap());
        f.ipv6_subnet = Some("fd00:10:0:3::1/64".parse().unwrap());
        f.write_atomic(&path).unwrap();
        assert_eq!(SubnetFile::read(&path).unwrap(), f);
        assert_eq!(f.subnet.to_string(), "10.244.7.1/24");
        // No temp file is left next to it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = SubnetFile::parse(
            "/p",
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=bogus\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("FLANNEL_SUBNET") && e.contains("bogus"), "{e}");
        let e = SubnetFile::parse("/p", "garbage\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("garbage"), "{e}");
        let e = SubnetFile::parse("/p", "FLANNEL_NETWORK=10.244.0.0/16\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing key FLANNEL_SUBNET"), "{e}");
        let e = SubnetFile::parse(
            "/p",
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.3.1/24\nFLANNEL_MTU=1450\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not inside"), "{e}");
        let e = SubnetFile::read("/nonexistent/twill/subnet.env")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/twill/subnet.env"), "{e}");
    }

    #[test]
    fn gateway_may_be_any_host_but_not_network_or_broadcast() {
        let f = |sub: &str| {
            SubnetFile::parse(
                "/p",
                &format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={sub}\nFLANNEL_MTU=1450\n"),
            )
        };
        assert_eq!(
            f("10.244.3.2/24").unwrap().gateway().to_string(),
            "10.244.3.2"
        );
        for bad in ["10.244.3.0/24", "10.244.3.255/24"] {
            let e = f(bad).unwrap_err().to_string();
            assert!(e.contains("FLANNEL_SUBNET") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn only_a_bounded_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO with no writer: a blocking open would hang here forever.
        let fifo = dir.path().join("fifo");
        nix_mkfifo(&fifo);
        let e = SubnetFile::read(&fifo).unwrap_err();
        assert!(matches!(e, SubnetFileError::NotAFile { .. }), "{e}");
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = SubnetFile::read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let big = dir.path().join("big");
        let mut text = FLANNEL.to_string();
        text.push_str(&"#".repeat(MAX_SUBNET_FILE as usize));
        std::fs::write(&big, text).unwrap();
        let e = SubnetFile::read(&big).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // A symlink to a regular file is read (positive control).
        let real = dir.path().join("real");
        std::fs::write(&real, FLANNEL).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(
            SubnetFile::read(&link).unwrap().gateway().to_string(),
            "10.244.3.1"
        );
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// A dual-stack node's file in flanneld's order (`WriteSubnetFile`: the IPv4 pair, the
    /// IPv6 pair, MTU, IPMASQ); the IPv4-only file of the same node is the old one.
    #[test]
    fn dual_stack_file_in_flannels_order() {
        let v4 = SubnetFile::for_node_subnet(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
            1450,
            true,
        );
        assert_eq!(v4.render(), FLANNEL);
        let dual = v4.with_ipv6(
            "fc00::/48".parse().unwrap(),
            "fc00:0:0:3::/64".parse().unwrap(),
        );
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        assert_eq!(dual.render(), text);
        let back = SubnetFile::parse("x", text).unwrap();
        assert_eq!(back, dual);
        assert_eq!(
            back.ipv6_node_subnet(),
            Some("fc00:0:0:3::/64".parse().unwrap())
        );
        assert_eq!(back.ipv6_gateway(), Some("fc00:0:0:3::1".parse().unwrap()));
        assert_eq!(
            SubnetFile::parse("x", FLANNEL).unwrap().ipv6_gateway(),
            None
        );
    }

    #[test]
    fn ipv6_keys_are_validated_by_name() {
        let base = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        for (extra, key, value) in [
            (
                "FLANNEL_IPV6_NETWORK=10.0.0.0/8\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n",
                "FLANNEL_IPV6_NETWORK",
                "10.0.0.0/8",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=10.1.0.1/24\n",
                "FLANNEL_IPV6_SUBNET",
                "10.1.0.1/24",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:3::1/64\n",
                "FLANNEL_IPV6_SUBNET",
                "fd00:0:0:3::1/64",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/127\n",
                "FLANNEL_IPV6_SUBNET",
                "fc00:0:0:3::1/127",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::/64\n",
                "FLANNEL_IPV6_SUBNET",
                "fc00:0:0:3::/64",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=banana\n",
                "FLANNEL_IPV6_SUBNET",
                "banana",
            ),
        ] {
            let e = SubnetFile::parse("/p", &format!("{base}{extra}")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(key) && msg.contains(value), "{extra}: {msg}");
        }
        for (extra, key) in [
            ("FLANNEL_IPV6_NETWORK=fc00::/48\n", "FLANNEL_IPV6_SUBNET"),
            (
                "FLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n",
                "FLANNEL_IPV6_NETWORK",
            ),
        ] {
            let e = SubnetFile::parse("/p", &format!("{base}{extra}")).unwrap_err();
            assert!(
                matches!(e, SubnetFileError::Missing { key: k, .. } if k == key),
                "{e}"
            );
        }
    }
}
