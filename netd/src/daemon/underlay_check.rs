//! twilld's start-time check of the network config against this node: a `Network` (or
//! `IPv6Network`) that overlaps the underlay's own subnet is refused. `twillctl network set`
//! cannot check it (it does not know the nodes' underlays); every twilld does, at start. So
//! is a `Backend.MTU` larger than the underlay's MTU less the VXLAN overhead.

use anyhow::{Context, Result};
use ipnet::IpNet;
use twill_dataplane::Netlink;
use twill_dataplane::overlay::underlay::Underlay;
use twill_dataplane::packet_route::address::AddressAttribute;
use twill_ipam::netconf::NetConfig;

/// `Ok(Ok(cfg))` when `cfg` does not overlap any subnet on the underlay interface, else
/// `Ok(Err(reason))` (the caller stays up, not ready, like for an incompatible config).
pub async fn check(
    nl: &Netlink,
    under: &Underlay,
    cfg: NetConfig,
) -> Result<std::result::Result<NetConfig, String>> {
    let msgs = nl
        .link_addresses(under.index)
        .await
        .with_context(|| format!("list the addresses of the underlay {}", under.name))?;
    let nets: Vec<IpNet> = msgs
        .iter()
        .filter_map(|m| {
            // IFA_LOCAL is the address of a point-to-point link's own end; IFA_ADDRESS the
            // peer's there, and the same as IFA_LOCAL elsewhere.
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                    IpNet::new(*ip, m.header.prefix_len).ok()
                }
                _ => None,
            })
        })
        .collect();
    Ok(match cfg.check_underlay(&under.name, &nets) {
        Ok(()) => Ok(cfg),
        Err(e) => Err(format!("the network config is refused on this node: {e}")),
    })
}

/// `Ok(cfg)` unless `Backend.MTU` is set, `--mtu` (`flag`, which wins over it) is not, and
/// it exceeds the underlay's MTU less the VXLAN overhead: then `Err(reason)`, as [`check`].
pub fn check_mtu(
    under: &Underlay,
    flag: Option<u32>,
    cfg: NetConfig,
) -> std::result::Result<NetConfig, String> {
    if flag.is_some() {
        return Ok(cfg);
    }
    match cfg
        .backend
        .vxlan()
        .check_mtu(&under.name, under.mtu, under.vxlan_overhead())
    {
        Ok(()) => Ok(cfg),
        Err(e) => Err(format!("the network config is refused on this node: {e}")),
    }
}
