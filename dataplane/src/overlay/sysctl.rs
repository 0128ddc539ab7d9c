//! Per-namespace sysctls under /proc/sys/net. /proc/sys/net shows the network namespace of
//! the thread that opens the file, so a write for another namespace happens on a thread
//! inside it ([`NetNs::run_in`]). Only ever used for a node's own namespace, never the host's.

use std::path::PathBuf;

use crate::{Error, NetNs, Result};

/// Writes `value` to `/proc/sys/<key>` in the caller's namespace; `key` uses `/`
/// separators (`net/ipv4/ip_forward`, `net/ipv4/conf/twill.1/rp_filter`), since device
/// names may contain dots.
pub fn write(key: &str, value: &str) -> Result<()> {
    let path = PathBuf::from("/proc/sys").join(key);
    let cur = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if cur.trim() == value {
        return Ok(());
    }
    std::fs::write(&path, value)
        .map_err(|e| Error::io(format!("write {value:?} to {}", path.display()), e))
}

/// Reads `/proc/sys/<key>` in the caller's namespace.
pub fn read(key: &str) -> Result<String> {
    let path = PathBuf::from("/proc/sys").join(key);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(format!("read {}", path.display()), e))
}

/// [`write()`] from a thread inside `ns`.
pub fn write_in(ns: &NetNs, key: &str, value: &str) -> Result<()> {
    let (k, v) = (key.to_string(), value.to_string());
    ns.run_in(move || write(&k, &v))?
}

/// [`read`] from a thread inside `ns`.
pub fn read_in(ns: &NetNs, key: &str) -> Result<String> {
    let k = key.to_string();
    ns.run_in(move || read(&k))?
}

/// What a node needs for the overlay: IPv4 forwarding, and on the VXLAN device no reverse
/// path filter (replies from pods arrive on it with sources routed elsewhere only briefly).
pub fn node_settings(vxlan: &str) -> Vec<(String, &'static str)> {
    vec![
        ("net/ipv4/ip_forward".to_string(), "1"),
        (format!("net/ipv4/conf/{vxlan}/forwarding"), "1"),
        (format!("net/ipv4/conf/{vxlan}/rp_filter"), "0"),
    ]
}

/// Applies [`node_settings`] in the caller's namespace. `ip_forward` is required: without
/// it no pod traffic crosses the node, so a failure to set it is an error (unless it is
/// already 1: in a pod /proc/sys is read-only, and the node may have set it itself). The
/// per-device settings only help: a failure to write them (read-only /proc/sys) is logged
/// and the node runs on with its own defaults.
pub fn enable_forwarding(vxlan: &str) -> Result<()> {
    for (k, v) in node_settings(vxlan) {
        let Err(e) = write(&k, v) else { continue };
        if k == "net/ipv4/ip_forward" {
            return Err(Error::Invalid(format!(
                "net.ipv4.ip_forward must be 1 on the node and twilld cannot set it ({e}): \
                 set it on the node (sysctl -w net.ipv4.ip_forward=1) or let twilld write /proc/sys"
            )));
        }
        tracing::warn!(sysctl = %k, want = v, error = %e, "could not set a per-device sysctl; continuing");
    }
    // rp_filter's effective value is the higher of conf/all and conf/<dev>: 0 on the device
    // does nothing while `all` is 1 or 2.
    if let Ok(all) = read("net/ipv4/conf/all/rp_filter")
        && all != "0"
    {
        tracing::warn!(
            all_rp_filter = %all,
            "net.ipv4.conf.all.rp_filter is not 0: reverse-path filtering stays on for {vxlan}; \
             if cross-node pod traffic is dropped, see docs/troubleshooting.md (rp_filter)"
        );
    }
    Ok(())
}

/// Applies [`node_settings`] inside `ns`.
pub fn enable_forwarding_in(ns: &NetNs, vxlan: &str) -> Result<()> {
    let vx = vxlan.to_string();
    ns.run_in(move || enable_forwarding(&vx))?
}

/// The IPv6 twin of [`enable_forwarding`] for a dual-stack node: `net.ipv6.conf.all.forwarding`
/// is required (an error if it is not 1 and cannot be set). With it on, interfaces with
/// `accept_ra=1` stop taking router advertisements (the kernel's rule for routers): set
/// `accept_ra=2` on an underlay that is configured by SLAAC (docs/operations.md).
pub fn enable_forwarding6() -> Result<()> {
    let key = "net/ipv6/conf/all/forwarding";
    write(key, "1").map_err(|e| {
        Error::Invalid(format!(
            "net.ipv6.conf.all.forwarding must be 1 on a dual-stack node and twilld cannot set it \
             ({e}): set it on the node (sysctl -w net.ipv6.conf.all.forwarding=1) or let twilld \
             write /proc/sys"
        ))
    })
}
