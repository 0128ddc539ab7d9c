//! The underlay: the interface that carries VXLAN traffic and the node's public IP on it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;

use crate::netlink::parse;
use crate::{Error, Netlink, Result};

/// The resolved underlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The node's public IP: `--public-ip`, else the first IPv4 address of the interface.
    pub ip: IpAddr,
}

impl Underlay {
    /// The VXLAN device's MTU: underlay − 50 over IPv4, − 70 over IPv6.
    pub fn vxlan_mtu(&self) -> u32 {
        match self.ip {
            IpAddr::V4(_) => self.mtu.saturating_sub(super::VXLAN_OVERHEAD_V4),
            IpAddr::V6(_) => self.mtu.saturating_sub(super::VXLAN_OVERHEAD_V6),
        }
    }
}

/// Finds the underlay: `iface` by name, else the output interface of the main table's IPv4
/// default route; `public_ip`, else the first IPv4 address on it (then IPv6).
pub async fn resolve(
    nl: &Netlink,
    iface: Option<&str>,
    public_ip: Option<IpAddr>,
) -> Result<Underlay> {
    let h = nl.handle();
    let link = match iface {
        Some(name) => nl
            .run(
                || format!("get underlay link {name:?} (--iface)"),
                h.link().get().match_name(name).execute().try_next(),
            )
            .await?
            .ok_or_else(|| Error::LinkNotFound(name.to_string()))?,
        None => {
            let routes: Vec<_> = nl
                .run(
                    || "dump IPv4 routes for the default route".into(),
                    h.route()
                        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                        .execute()
                        .try_collect(),
                )
                .await?;
            let oif = routes
                .iter()
                .filter_map(parse::route)
                .filter(|r| r.dst.prefix_len() == 0)
                .find_map(|r| r.oif)
                .ok_or_else(|| {
                    Error::Invalid(
                        "no IPv4 default route to find the underlay interface: give --iface".into(),
                    )
                })?;
            nl.run(
                || format!("get link index {oif} (default route)"),
                h.link().get().match_index(oif).execute().try_next(),
            )
            .await?
            .ok_or_else(|| Error::LinkNotFound(format!("index {oif}")))?
        }
    };
    let link = parse::link(link);
    let ip = match public_ip {
        Some(ip) => ip,
        None => {
            let addrs: Vec<IpNet> = nl
                .link_addresses(link.index)
                .await?
                .iter()
                .filter_map(|m| parse::address(m).own())
                .collect();
            let v4 = addrs.iter().find(|a| matches!(a, IpNet::V4(_)));
            let v6 = addrs.iter().find(|a| matches!(a, IpNet::V6(_)));
            v4.or(v6).map(IpNet::addr).ok_or_else(|| {
                Error::Invalid(format!(
                    "underlay {} has no IP address: give --public-ip",
                    link.name
                ))
            })?
        }
    };
    Ok(Underlay {
        index: link.index,
        name: link.name,
        mtu: link.mtu.unwrap_or(0),
        ip,
    })
}
