//! The underlay: the interface that carries VXLAN traffic and the node's public IP on it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader};

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

fn parse_link(m: &LinkMessage) -> (String, u32) {
    let mut name = String::new();
    let mut mtu = 0;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(v) => mtu = *v,
            _ => {}
        }
    }
    (name, mtu)
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
                .filter(|r| {
                    r.header.destination_prefix_length == 0
                        && r.header.table == RouteHeader::RT_TABLE_MAIN
                })
                .find_map(|r| {
                    r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    })
                })
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
    let index = link.header.index;
    let (name, mtu) = parse_link(&link);
    let ip = match public_ip {
        Some(ip) => ip,
        None => {
            let addrs = nl.link_addresses(index).await?;
            let pick = |fam: AddressFamily| {
                addrs
                    .iter()
                    .filter(|m| m.header.family == fam)
                    .find_map(|m| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Local(ip) => Some(*ip),
                            AddressAttribute::Address(ip) if fam == AddressFamily::Inet6 => {
                                Some(*ip)
                            }
                            _ => None,
                        })
                    })
            };
            pick(AddressFamily::Inet)
                .or_else(|| pick(AddressFamily::Inet6))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "underlay {name} has no IP address: give --public-ip"
                    ))
                })?
        }
    };
    Ok(Underlay {
        index,
        name,
        mtu,
        ip,
    })
}
