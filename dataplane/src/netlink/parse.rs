//! Netlink messages read into typed values, once per kind: a link (with its VXLAN settings),
//! a route, an address, a neighbour (an ARP entry or an FDB entry). Every reader of a dump, an
//! answer or a notification in the crate goes through these (the pod code, [`crate::unlink`],
//! the overlay and its monitor, the underlay); callers only filter and convert the values.

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use twill_ipam::mac::Mac;

/// A link as the kernel reports it: what the CNI plugin and the unlinking need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// IFLA_ADDRESS, when it is an Ethernet address.
    pub mac: Option<Mac>,
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
    /// The VXLAN settings (IFLA_INFO_DATA) of a VXLAN link.
    pub vxlan: Option<Vxlan>,
}

/// A VXLAN link's settings, each as the kernel reports it (`None` when it does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vxlan {
    pub vni: Option<u32>,
    /// The UDP destination port.
    pub port: Option<u16>,
    /// IFLA_VXLAN_LINK: the index of the underlay device.
    pub underlay: Option<u32>,
    /// The source address of the outer packets.
    pub local: Option<IpAddr>,
    pub learning: Option<bool>,
}

/// A main-table route: its destination, gateway and output link, and who made it of what type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// RTM_PROTOCOL: who made it (kernel, boot, static, a routing daemon, twill's own number).
    pub protocol: RouteProtocol,
    /// RTN_*: unicast, blackhole, unreachable, ...
    pub kind: RouteType,
}

/// An address of a link, with its prefix length. IFA_LOCAL is the interface's own address;
/// IFA_ADDRESS is the same, or the peer on a point-to-point link (IPv6 sends only IFA_ADDRESS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    /// The link's index.
    pub index: u32,
    pub local: Option<IpNet>,
    pub address: Option<IpNet>,
}

impl Address {
    /// The interface's own address: IFA_LOCAL, else IFA_ADDRESS.
    pub fn own(&self) -> Option<IpNet> {
        self.local.or(self.address)
    }
}

/// A neighbour message: an ARP/NDP entry (family inet/inet6) or an FDB entry (family bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// The link's index.
    pub index: u32,
    pub family: AddressFamily,
    pub state: NeighbourState,
    /// NDA_DST: the neighbour's IP; in an FDB entry, the remote VTEP's.
    pub dst: Option<IpAddr>,
    /// NDA_LLADDR, when it is an Ethernet address.
    pub mac: Option<Mac>,
}

/// A link message (RTM_NEWLINK, an answer or a dump entry).
pub fn link(msg: LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        controller: None,
        kind: None,
        peer: None,
        alias: None,
        vxlan: None,
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Address(m) => l.mac = Mac::from_slice(&m),
            LinkAttribute::Mtu(m) => l.mtu = Some(m),
            LinkAttribute::Controller(c) if c != 0 => l.controller = Some(c),
            LinkAttribute::Link(p) if p != 0 => l.peer = Some(p),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(d)) => l.vxlan = Some(vxlan(&d)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn vxlan(data: &[InfoVxlan]) -> Vxlan {
    let mut v = Vxlan::default();
    for x in data {
        match x {
            InfoVxlan::Id(id) => v.vni = Some(*id),
            InfoVxlan::Port(p) => v.port = Some(*p),
            InfoVxlan::Link(i) => v.underlay = Some(*i),
            InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(*ip)),
            InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(*ip)),
            InfoVxlan::Learning(b) => v.learning = Some(*b),
            _ => {}
        }
    }
    v
}

/// An IPv4 or IPv6 route address; `None` for another family.
pub fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A route message of the main table (RTA_TABLE, else the header's table); `None` for another
/// table or family. A route without a destination attribute is the default route of its family.
pub fn route(msg: &RouteMessage) -> Option<Route> {
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let len = msg.header.destination_prefix_length;
    let dst = match (dst, msg.header.address_family) {
        (Some(d), _) => IpNet::new(d, len).ok()?,
        (None, AddressFamily::Inet) => IpNet::new(IpAddr::V4(0.into()), len).ok()?,
        (None, AddressFamily::Inet6) => IpNet::new(IpAddr::V6(0.into()), len).ok()?,
        _ => return None,
    };
    Some(Route {
        dst,
        gateway,
        oif,
        protocol: msg.header.protocol,
        kind: msg.header.kind,
    })
}

/// An address message.
pub fn address(msg: &AddressMessage) -> Address {
    let len = msg.header.prefix_len;
    let mut a = Address {
        index: msg.header.index,
        local: None,
        address: None,
    };
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => a.local = IpNet::new(*ip, len).ok(),
            AddressAttribute::Address(ip) => a.address = IpNet::new(*ip, len).ok(),
            _ => {}
        }
    }
    a
}

/// A neighbour message (RTM_NEWNEIGH, RTM_DELNEIGH, a dump entry).
pub fn neighbour(msg: &NeighbourMessage) -> Neighbour {
    let mut n = Neighbour {
        index: msg.header.ifindex,
        family: msg.header.family,
        state: msg.header.state,
        dst: None,
        mac: None,
    };
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                n.dst = Some(IpAddr::V4(*v))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                n.dst = Some(IpAddr::V6(*v))
            }
            // In an AF_BRIDGE message the parser cannot tell NDA_DST's family: raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                n.dst = match b.len() {
                    4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) => n.mac = Mac::from_slice(l),
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::InfoKind;
    use rtnetlink::packet_route::neighbour::NeighbourMessage;

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
        assert_eq!(l.mac.unwrap().to_string(), "02:00:00:00:00:01");
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

    #[test]
    fn a_vxlan_link_reads_with_its_settings() {
        let mut m = LinkMessage::default();
        m.header.index = 4;
        m.attributes = vec![
            LinkAttribute::IfName("twill.1".into()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(vec![
                    InfoVxlan::Id(1),
                    InfoVxlan::Port(8472),
                    InfoVxlan::Link(2),
                    InfoVxlan::Local("192.0.2.1".parse().unwrap()),
                    InfoVxlan::Learning(false),
                ])),
            ]),
        ];
        let l = link(m);
        assert_eq!(l.kind.as_deref(), Some("vxlan"));
        assert_eq!(
            l.vxlan,
            Some(Vxlan {
                vni: Some(1),
                port: Some(8472),
                underlay: Some(2),
                local: Some("192.0.2.1".parse().unwrap()),
                learning: Some(false),
            })
        );
        assert_eq!(link(LinkMessage::default()).vxlan, None);
    }

    #[test]
    fn a_route_reads_its_table_attribute_protocol_and_type() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 24;
        m.header.protocol = RouteProtocol::Other(0x74);
        m.header.kind = RouteType::Unicast;
        // A table above 255 is in RTA_TABLE only; the header says RT_TABLE_COMPAT.
        m.header.table = 252;
        m.attributes = vec![
            RouteAttribute::Table(u32::from(RouteHeader::RT_TABLE_MAIN)),
            RouteAttribute::Destination(RouteAddress::Inet("10.244.2.0".parse().unwrap())),
        ];
        let r = route(&m).unwrap();
        assert_eq!(r.dst, "10.244.2.0/24".parse::<IpNet>().unwrap());
        assert_eq!(r.protocol, RouteProtocol::Other(0x74));
        assert_eq!(r.kind, RouteType::Unicast);
        assert_eq!((r.gateway, r.oif), (None, None));
        m.attributes[0] = RouteAttribute::Table(1000);
        assert_eq!(route(&m), None, "table 1000");
    }

    #[test]
    fn an_address_reads_local_and_peer() {
        let mut m = AddressMessage::default();
        m.header.index = 3;
        m.header.prefix_len = 32;
        m.attributes = vec![
            AddressAttribute::Address("10.0.0.2".parse().unwrap()),
            AddressAttribute::Local("10.0.0.1".parse().unwrap()),
        ];
        let a = address(&m);
        assert_eq!(a.index, 3);
        assert_eq!(
            a.own(),
            Some("10.0.0.1/32".parse().unwrap()),
            "IFA_LOCAL first"
        );
        assert_eq!(a.address, Some("10.0.0.2/32".parse().unwrap()));
        m.attributes.truncate(1);
        assert_eq!(address(&m).own(), Some("10.0.0.2/32".parse().unwrap()));
    }

    /// What this proves: an FDB entry's NDA_DST, which the packet parser leaves as raw bytes
    /// in an AF_BRIDGE message, reads as the IPv4 or IPv6 address it is.
    #[test]
    fn a_bridge_neighbour_reads_its_raw_destination() {
        let mut m = NeighbourMessage::default();
        m.header.ifindex = 5;
        m.header.family = AddressFamily::Bridge;
        m.header.state = NeighbourState::Permanent;
        m.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(vec![0x0a, 0x58, 0, 0, 0, 1]),
            NeighbourAttribute::Destination(NeighbourAddress::Other(vec![192, 0, 2, 7])),
        ];
        let n = neighbour(&m);
        assert_eq!(n.index, 5);
        assert_eq!(n.family, AddressFamily::Bridge);
        assert_eq!(n.state, NeighbourState::Permanent);
        assert_eq!(n.dst, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(n.mac, Some(Mac([0x0a, 0x58, 0, 0, 0, 1])));
        m.attributes[1] = NeighbourAttribute::Destination(NeighbourAddress::Other(
            "fd00::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
        ));
        assert_eq!(neighbour(&m).dst, Some("fd00::7".parse().unwrap()));
        m.attributes[0] = NeighbourAttribute::LinkLayerAddress(vec![1, 2, 3]);
        assert_eq!(neighbour(&m).mac, None, "not an Ethernet address");
    }
}
