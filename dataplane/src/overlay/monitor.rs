//! The kernel's link, neighbour and IPv4 route notifications (rtnetlink multicast groups, on
//! the socket that [`crate::netlink::subscribe`] opens), read by [`crate::netlink::parse`]
//! and turned into typed events. A full receive buffer loses events: that comes out as
//! [`MonitorEvent::Overrun`], after which the caller must dump everything again.

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::SocketAddr;

use super::rtnl::{fdb_on, is_twills, neigh_on, route_on};
use super::{Fdb, Neigh, Route};
use crate::netlink::{self, Subscription, parse};
use crate::{NetNs, Result};

/// Receive buffer asked for (SO_RCVBUFFORCE as root, else SO_RCVBUF capped by rmem_max).
const RCVBUF: libc::c_int = 8 << 20;

/// The groups the overlay listens to.
const GROUPS: &[MulticastGroup] = &[
    MulticastGroup::Link,
    MulticastGroup::Neigh,
    MulticastGroup::Ipv4Route,
];

/// The groups of a dual-stack node: the IPv6 routes too.
const GROUPS_DUAL: &[MulticastGroup] = &[
    MulticastGroup::Link,
    MulticastGroup::Neigh,
    MulticastGroup::Ipv4Route,
    MulticastGroup::Ipv6Route,
];

/// One notification that concerns the overlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MonitorEvent {
    /// A link was added or changed (name may be empty if the kernel did not send it).
    Link {
        index: u32,
        name: String,
    },
    /// A link was deleted.
    LinkGone {
        index: u32,
        name: String,
    },
    NeighUp {
        link: u32,
        neigh: Neigh,
    },
    /// A neighbour for `ip` on `link` went (its MAC may not be known).
    NeighGone {
        link: u32,
        ip: std::net::Ipv4Addr,
    },
    FdbUp {
        link: u32,
        fdb: Fdb,
    },
    FdbGone {
        link: u32,
        fdb: Fdb,
    },
    RouteUp {
        link: u32,
        route: Route,
    },
    RouteGone {
        link: u32,
        route: Route,
    },
    /// A route that is not twill's was added or deleted (an underlay route: the way to a
    /// peer's public IP may have changed, and with it whether the peer is routed directly).
    ForeignRoute {
        oif: Option<u32>,
        dst: ipnet::Ipv4Net,
    },
    /// A permanent IPv6 neighbour, or an IPv6 route of twill's, on `link` was added or
    /// removed (the dual-stack receiver dumps its IPv6 device again).
    Changed6 {
        link: u32,
    },
    /// Events were lost (ENOBUFS): dump everything again.
    Overrun,
}

/// A subscription to the link, neighbour and IPv4 route groups.
pub struct Monitor {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    // Keeps the connection task alive (it shuts down when every handle is gone).
    _handle: rtnetlink::Handle,
    pending: std::collections::VecDeque<MonitorEvent>,
}

impl Monitor {
    /// Subscribes in the caller's own namespace. Must be called inside a tokio runtime.
    pub fn current() -> Result<Monitor> {
        Self::subscribe(None, RCVBUF)
    }

    /// [`Monitor::current`] that also listens to IPv6 routes (a dual-stack node).
    pub fn current_dual_stack() -> Result<Monitor> {
        Self::subscribe_groups(None, GROUPS_DUAL, RCVBUF)
    }

    /// Subscribes inside `ns` (the socket is created on a short-lived thread in `ns`).
    pub fn open(ns: &NetNs) -> Result<Monitor> {
        Self::open_with_rcvbuf(ns, RCVBUF)
    }

    /// [`Monitor::open`] with a given receive buffer (tests use a tiny one to provoke an
    /// overrun).
    pub fn open_with_rcvbuf(ns: &NetNs, rcvbuf: libc::c_int) -> Result<Monitor> {
        Self::subscribe(Some(ns), rcvbuf)
    }

    fn subscribe(ns: Option<&NetNs>, rcvbuf: libc::c_int) -> Result<Monitor> {
        Self::subscribe_groups(ns, GROUPS, rcvbuf)
    }

    fn subscribe_groups(
        ns: Option<&NetNs>,
        groups: &'static [MulticastGroup],
        rcvbuf: libc::c_int,
    ) -> Result<Monitor> {
        let Subscription { handle, rx } = netlink::subscribe(ns, groups, rcvbuf)?;
        Ok(Monitor {
            rx,
            _handle: handle,
            pending: Default::default(),
        })
    }

    /// The next event; `None` when the socket closed.
    pub async fn next(&mut self) -> Option<MonitorEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            let (msg, _) = self.rx.next().await?;
            match msg.payload {
                NetlinkPayload::Overrun(_) => return Some(MonitorEvent::Overrun),
                NetlinkPayload::InnerMessage(m) => self.pending.extend(convert(m)),
                _ => {}
            }
        }
    }

    /// An event if one is queued already, without waiting.
    pub fn try_next(&mut self) -> Option<MonitorEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            let (msg, _) = self.rx.try_recv().ok()?;
            match msg.payload {
                NetlinkPayload::Overrun(_) => return Some(MonitorEvent::Overrun),
                NetlinkPayload::InnerMessage(m) => self.pending.extend(convert(m)),
                _ => {}
            }
        }
    }
}

/// [`MonitorEvent::ForeignRoute`] for an IPv4 main-table route that is not twill's.
fn foreign(r: &parse::Route) -> Option<MonitorEvent> {
    match r.dst {
        ipnet::IpNet::V4(dst) if !is_twills(r) => {
            Some(MonitorEvent::ForeignRoute { oif: r.oif, dst })
        }
        _ => None,
    }
}

/// [`MonitorEvent::Changed6`] for an IPv6 route of twill's; `None` for any other route.
fn changed6(r: &parse::Route) -> Option<MonitorEvent> {
    match (r.dst, r.oif) {
        (ipnet::IpNet::V6(_), Some(link)) if is_twills(r) => Some(MonitorEvent::Changed6 { link }),
        _ => None,
    }
}

/// A route notification: an IPv6 change on a dual-stack node, a route that is not twill's
/// (the underlay's), or one of twill's, added (`up`) or gone.
fn route_event(r: &RouteMessage, up: bool) -> Option<MonitorEvent> {
    let r = parse::route(r)?;
    if let Some(ev) = changed6(&r) {
        return Some(ev);
    }
    if let Some(ev) = foreign(&r) {
        return Some(ev);
    }
    let link = r.oif?;
    let route = route_on(&r, link)?;
    Some(if up {
        MonitorEvent::RouteUp { link, route }
    } else {
        MonitorEvent::RouteGone { link, route }
    })
}

fn convert(m: RouteNetlinkMessage) -> Option<MonitorEvent> {
    match m {
        RouteNetlinkMessage::NewLink(l) => {
            let l = parse::link(l);
            Some(MonitorEvent::Link {
                index: l.index,
                name: l.name,
            })
        }
        RouteNetlinkMessage::DelLink(l) => {
            let l = parse::link(l);
            Some(MonitorEvent::LinkGone {
                index: l.index,
                name: l.name,
            })
        }
        RouteNetlinkMessage::NewNeighbour(n) => {
            let n = parse::neighbour(&n);
            let link = n.index;
            if n.family == AddressFamily::Bridge {
                fdb_on(&n, link).map(|fdb| MonitorEvent::FdbUp { link, fdb })
            } else if n.family == AddressFamily::Inet6 {
                (n.state == NeighbourState::Permanent).then_some(MonitorEvent::Changed6 { link })
            } else {
                neigh_on(&n, link).map(|neigh| MonitorEvent::NeighUp { link, neigh })
            }
        }
        RouteNetlinkMessage::DelNeighbour(n) => {
            let mut n = parse::neighbour(&n);
            let link = n.index;
            match (n.family, n.dst) {
                (AddressFamily::Bridge, _) => {
                    // The deletion notice carries the state at removal; read it as permanent.
                    n.state = NeighbourState::Permanent;
                    fdb_on(&n, link).map(|fdb| MonitorEvent::FdbGone { link, fdb })
                }
                (AddressFamily::Inet, Some(std::net::IpAddr::V4(ip))) => {
                    Some(MonitorEvent::NeighGone { link, ip })
                }
                (AddressFamily::Inet6, _) => Some(MonitorEvent::Changed6 { link }),
                _ => None,
            }
        }
        // twill's routes on any device: the VXLAN device's, and the direct ones on the
        // underlay (the receiver tells them apart by `link`).
        RouteNetlinkMessage::NewRoute(r) => route_event(&r, true),
        RouteNetlinkMessage::DelRoute(r) => route_event(&r, false),
        _ => None,
    }
}
