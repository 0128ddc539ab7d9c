//! The kernel's link, neighbour and IPv4 route notifications (rtnetlink multicast groups),
//! turned into typed events. A full receive buffer loses events: that comes out as
//! [`MonitorEvent::Overrun`], after which the caller must dump everything again.

use std::os::fd::AsRawFd;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup};

use super::rtnl::{parse_fdb, parse_neigh, parse_route};
use super::{Fdb, Neigh, Route};
use crate::{Error, NetNs, Result};

/// Receive buffer asked for (SO_RCVBUFFORCE as root, else SO_RCVBUF capped by rmem_max).
const RCVBUF: libc::c_int = 8 << 20;

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
    /// Events were lost (ENOBUFS): dump everything again.
    Overrun,
}

/// A subscription to the link, neighbour and IPv4 route groups.
pub struct Monitor {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    // Keeps the connection task alive (it shuts down when every handle is gone).
    _handle: Handle,
    pending: std::collections::VecDeque<MonitorEvent>,
}

impl Monitor {
    /// Subscribes in the caller's own namespace. Must be called inside a tokio runtime.
    pub fn current() -> Result<Monitor> {
        Self::connect()
    }

    /// Subscribes inside `ns` (the socket is created on a short-lived thread in `ns`).
    pub fn open(ns: &NetNs) -> Result<Monitor> {
        Self::open_with_rcvbuf(ns, RCVBUF)
    }

    /// [`Monitor::open`] with a given receive buffer (tests use a tiny one to provoke an
    /// overrun).
    pub fn open_with_rcvbuf(ns: &NetNs, rcvbuf: libc::c_int) -> Result<Monitor> {
        let rt = tokio::runtime::Handle::current();
        ns.run_in(move || {
            let _g = rt.enter();
            Self::connect_with(rcvbuf)
        })?
    }

    fn connect() -> Result<Monitor> {
        Self::connect_with(RCVBUF)
    }

    fn connect_with(rcvbuf: libc::c_int) -> Result<Monitor> {
        let (mut conn, handle, rx) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
        ])
        .map_err(|e| Error::io("open netlink multicast socket", e))?;
        let sock = conn.socket_mut().socket_mut();
        let fd = sock.as_raw_fd();
        // SO_RCVBUFFORCE ignores net.core.rmem_max (needs CAP_NET_ADMIN); fall back to SO_RCVBUF.
        // SAFETY: setsockopt on a valid fd with a c_int option value.
        let forced = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&rcvbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            let _ = sock.set_rx_buf_sz(rcvbuf as usize);
        }
        tokio::spawn(conn);
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

fn link_name(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn neigh_ip(m: &NeighbourMessage) -> Option<std::net::Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn convert(m: RouteNetlinkMessage) -> Option<MonitorEvent> {
    use rtnetlink::packet_route::AddressFamily;
    match m {
        RouteNetlinkMessage::NewLink(l) => Some(MonitorEvent::Link {
            index: l.header.index,
            name: link_name(&l),
        }),
        RouteNetlinkMessage::DelLink(l) => Some(MonitorEvent::LinkGone {
            index: l.header.index,
            name: link_name(&l),
        }),
        RouteNetlinkMessage::NewNeighbour(n) => {
            let link = n.header.ifindex;
            if n.header.family == AddressFamily::Bridge {
                parse_fdb(&n, link).map(|fdb| MonitorEvent::FdbUp { link, fdb })
            } else {
                parse_neigh(&n, link).map(|neigh| MonitorEvent::NeighUp { link, neigh })
            }
        }
        RouteNetlinkMessage::DelNeighbour(mut n) => {
            let link = n.header.ifindex;
            if n.header.family == AddressFamily::Bridge {
                // The deletion notice carries the state at removal; parse as if permanent.
                n.header.state = rtnetlink::packet_route::neighbour::NeighbourState::Permanent;
                parse_fdb(&n, link).map(|fdb| MonitorEvent::FdbGone { link, fdb })
            } else if n.header.family == AddressFamily::Inet {
                neigh_ip(&n).map(|ip| MonitorEvent::NeighGone { link, ip })
            } else {
                None
            }
        }
        RouteNetlinkMessage::NewRoute(r) => {
            let link = route_oif(&r)?;
            parse_route(&r, link).map(|route| MonitorEvent::RouteUp { link, route })
        }
        RouteNetlinkMessage::DelRoute(r) => {
            let link = route_oif(&r)?;
            parse_route(&r, link).map(|route| MonitorEvent::RouteGone { link, route })
        }
        _ => None,
    }
}
