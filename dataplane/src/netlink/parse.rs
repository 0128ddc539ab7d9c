//! Netlink messages read into typed values, once: a link, a route, an address. Every reader
//! of a dump or an answer in the pod code and in [`crate::unlink`] goes through these.

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};

/// A link as the kernel reports it: what the CNI plugin and the unlinking need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// The index of the bridge (or other controller) the link is a port of.
    pub controller: Option<u32>,
    /// The link kind ("veth", "bridge", ...), when the kernel reports one.
    pub kind: Option<String>,
    /// IFLA_LINK: for a veth, the index of its peer in the peer's namespace.
    pub peer: Option<u32>,
    /// IFLA_IFALIAS: twill tags the host veths it makes with [`crate::pod::veth_alias`].
    pub alias: Option<String>,
}

impl Link {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A main-table route: its destination, gateway and output link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

/// A link message (RTM_NEWLINK, an answer or a dump entry).
pub fn link(msg: LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        controller: None,
        kind: None,
        peer: None,
        alias: None,
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Address(m) => l.mac = m,
            LinkAttribute::Mtu(m) => l.mtu = Some(m),
            LinkAttribute::Controller(c) if c != 0 => l.controller = Some(c),
            LinkAttribute::Link(p) if p != 0 => l.peer = Some(p),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// An IPv4 or IPv6 route address; `None` for another family.
pub fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A route message of the main table; `None` for another table or family. A route without a
/// destination attribute is the default route of its family.
pub fn route(msg: &RouteMessage) -> Option<Route> {
    if msg.header.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let len = msg.header.destination_prefix_length;
    let dst = match (dst, msg.header.address_family) {
        (Some(d), _) => IpNet::new(d, len).ok()?,
        (None, AddressFamily::Inet) => IpNet::new(IpAddr::V4(0.into()), 0).ok()?,
        (None, AddressFamily::Inet6) => IpNet::new(IpAddr::V6(0.into()), 0).ok()?,
        _ => return None,
    };
    Some(Route { dst, gateway, oif })
}

/// An address message as ip/len (IFA_ADDRESS); `None` without one.
pub fn address(msg: AddressMessage) -> Option<IpNet> {
    let len = msg.header.prefix_len;
    msg.attributes.into_iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => IpNet::new(ip, len).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::InfoKind;

    #[test]
    fn a_link_message_reads_into_a_link() {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.header.flags = LinkFlags::Up;
        m.attributes = vec![
            LinkAttribute::IfName("veth1".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::Mtu(1450),
            LinkAttribute::Controller(3),
            LinkAttribute::Link(0),
            LinkAttribute::IfAlias(String::new()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        let l = link(m);
        assert_eq!(l.index, 7);
        assert_eq!(l.name, "veth1");
        assert_eq!(l.mac_string(), "02:00:00:00:00:01");
        assert_eq!(l.mtu, Some(1450));
        assert!(l.up);
        assert_eq!(l.controller, Some(3));
        assert_eq!(l.peer, None, "IFLA_LINK 0 is no peer");
        assert_eq!(l.alias, None, "an empty alias is none");
        assert_eq!(l.kind.as_deref(), Some("veth"));
    }

    #[test]
    fn a_route_without_destination_is_the_default_route() {
        let mut m = RouteMessage::default();
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.address_family = AddressFamily::Inet;
        m.attributes = vec![
            RouteAttribute::Gateway(RouteAddress::Inet("10.0.0.1".parse().unwrap())),
            RouteAttribute::Oif(2),
        ];
        let r = route(&m).unwrap();
        assert_eq!(r.dst, "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(r.gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(r.oif, Some(2));
        m.header.table = 255;
        assert_eq!(route(&m), None, "not the main table");
    }
}
