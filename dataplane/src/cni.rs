//! The kernel verbs of the CNI plugin: the node bridge, the pod's veth pair, the pod's
//! addresses and routes, and the lookups that CHECK, DEL and GC need.
//!
//! [`CniDataplane`] is the small trait of domain verbs; [`RtnlCni`] implements it over one
//! rtnetlink socket bound to one namespace (the node's or the pod's). The plugin opens one
//! for the node namespace (the one it runs in) and one inside the pod namespace.

use std::net::IpAddr;
use std::path::PathBuf;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::{Error, NetNs, Netlink, Result};

/// What the plugin needs to know about a link.
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
    /// IFLA_IFALIAS: twill tags the host veths it makes with [`veth_alias`].
    pub alias: Option<String>,
}

impl Link {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// A route as CHECK compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The bridge's fixed MAC, derived from its gateway: `0a:58` (locally administered, unicast)
/// followed by the IPv4 address, as Kubernetes' kubenet and OVN do. Stable across restarts,
/// so pods' neighbour entries for the gateway never go stale.
pub fn bridge_mac(gateway: IpAddr) -> [u8; 6] {
    let o = match gateway {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let s = a.octets();
            [s[12], s[13], s[14], s[15]]
        }
    };
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// A random MAC for a veth end: locally administered, unicast (what the kernel would pick,
/// chosen here so that ADD knows it without asking the kernel).
pub fn random_mac() -> [u8; 6] {
    twill_ipam::mac::Mac::random().0
}

/// The marker that starts the alias (IFLA_IFALIAS) of every host veth twill makes.
pub const VETH_ALIAS_PREFIX: &str = "twill:";

/// The alias twill gives the host veth of (container ID, ifname): `twill:<id>/<ifname>`.
/// Neither part can hold a `/` (both are validated by the plugin), so it parses back
/// unambiguously ([`parse_veth_alias`]).
pub fn veth_alias(container_id: &str, ifname: &str) -> String {
    format!("{VETH_ALIAS_PREFIX}{container_id}/{ifname}")
}

/// (container ID, ifname) of an alias that [`veth_alias`] made; `None` for anything else.
pub fn parse_veth_alias(alias: &str) -> Option<(&str, &str)> {
    let (cid, ifname) = alias.strip_prefix(VETH_ALIAS_PREFIX)?.split_once('/')?;
    (!cid.is_empty() && !ifname.is_empty() && !ifname.contains('/')).then_some((cid, ifname))
}

/// A pod's veth pair, as [`CniDataplane::attach_pod`] makes it.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    /// The host end: its name and MAC; it becomes a port of the bridge, up.
    pub host_name: &'a str,
    pub host_mac: [u8; 6],
    /// The host end's alias (IFLA_IFALIAS), [`veth_alias`]: what proves it twill's later.
    pub host_alias: &'a str,
    /// The pod end, created directly inside `pod_ns`, down.
    pub pod_ns: &'a NetNs,
    pub pod_ifname: &'a str,
    pub pod_mac: [u8; 6],
    /// Both ends.
    pub mtu: u32,
    /// Hairpin mode on the host end's bridge port.
    pub hairpin: bool,
}

/// What [`CniDataplane::attach_pod`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVeth {
    /// The host end, as the kernel reports it.
    pub host: Link,
    /// The index of the pod end inside the pod namespace.
    pub pod_index: u32,
}

/// The domain verbs of the CNI plugin, on one namespace.
#[allow(async_fn_in_trait)]
pub trait CniDataplane {
    /// The bridge `name`, created (with `mac`, `mtu`, up) if missing, brought up if down.
    async fn ensure_bridge(&self, name: &str, mac: [u8; 6], mtu: u32) -> Result<Link>;
    /// The node side of a pod, in two round trips to the kernel: `gateway` (gateway/len) on
    /// `bridge` (already there is fine), the veth pair of `spec` (the pod end born inside the
    /// pod namespace) and the host end read back; then, by the new link's index, its alias
    /// and hairpin on its bridge port. If the veth was made but a later step failed, it is
    /// deleted before the error is returned. A veth whose host name (or pod ifname) is taken
    /// fails with EEXIST, and nothing is done to the link that has the name.
    async fn attach_pod(
        &self,
        bridge: &Link,
        gateway: IpNet,
        spec: &VethSpec<'_>,
    ) -> Result<AttachedVeth>;
    /// The pod side, in one round trip: link `index` up, `addr` (ip/len) on it, and a route
    /// to each of `routes` via `gateway` (replacing one that is there).
    async fn configure_pod(
        &self,
        index: u32,
        addr: IpNet,
        routes: &[IpNet],
        gateway: IpAddr,
    ) -> Result<()>;
    /// Brings the link with index `index` up.
    async fn set_up(&self, index: u32) -> Result<()>;
    /// The link called `name`, if any.
    async fn link(&self, name: &str) -> Result<Option<Link>>;
    /// Deletes the link called `name`; `Ok(false)` if there was none.
    async fn delete_link(&self, name: &str) -> Result<bool>;
    /// Every link that is a port of the bridge with index `bridge`.
    async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>>;
    /// The addresses on the link with index `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>>;
    /// The main table's routes of the family of `family_of`.
    async fn routes(&self, family_of: IpAddr) -> Result<Vec<Route>>;
}

/// [`CniDataplane`] over an rtnetlink socket bound to one namespace.
#[derive(Clone)]
pub struct RtnlCni {
    handle: Handle,
}

impl RtnlCni {
    pub fn new(nl: Netlink) -> Self {
        RtnlCni {
            handle: nl.handle().clone(),
        }
    }

    /// Opens a socket inside `ns` (see [`Netlink::open`]).
    pub fn open(ns: &NetNs) -> Result<Self> {
        Ok(Self::new(Netlink::open(ns)?))
    }

    /// Opens a socket in the caller's own namespace.
    pub fn current() -> Result<Self> {
        Ok(Self::new(Netlink::current()?))
    }

    /// Starts opening a socket inside the namespace `ns` and returns at once: one
    /// thread enters the namespace, creates the socket (registered with the tokio runtime
    /// `rt`) and exits, while the caller goes on with other work. `rt` must still run when
    /// the result is used. `ns` is the caller's descriptor (duplicated), never the path
    /// opened again: what was checked is what is entered.
    pub fn spawn_open(
        rt: tokio::runtime::Handle,
        ns: NetNs,
    ) -> std::thread::JoinHandle<Result<Self>> {
        std::thread::spawn(move || {
            let path: PathBuf = ns.path().to_path_buf();
            // setns moves only this thread, which exits right after creating the socket.
            nix::sched::setns(ns.fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::Netns {
                    path: path.clone(),
                    source: e.into(),
                }
            })?;
            let _rt = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| Error::io(format!("open netlink socket in {}", path.display()), e))?;
            tokio::spawn(conn);
            Ok(RtnlCni { handle })
        })
    }

    fn handle(&self) -> &Handle {
        &self.handle
    }
}

pub(crate) fn link_from(msg: LinkMessage) -> Link {
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
                    if let NlLinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| -c.get()) == Some(errno))
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route_from(msg: &RouteMessage) -> Option<Route> {
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

/// `addr` (ip/len) on link `index`.
fn address_msg(index: u32, addr: IpNet) -> AddressMessage {
    match addr {
        IpNet::V4(n) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
        IpNet::V6(n) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
    }
}

/// A main-table route to `dst` via `gateway` out of link `index`.
fn route_msg(index: u32, dst: IpNet, gateway: IpAddr) -> Result<RouteMessage> {
    Ok(match (dst, gateway) {
        (IpNet::V4(d), IpAddr::V4(g)) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(d.network(), d.prefix_len())
            .gateway(g)
            .output_interface(index)
            .build(),
        (IpNet::V6(d), IpAddr::V6(g)) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(d.network(), d.prefix_len())
            .gateway(g)
            .output_interface(index)
            .build(),
        _ => {
            return Err(Error::Invalid(format!(
                "route to {dst} via {gateway}: address families differ"
            )));
        }
    })
}

impl RtnlCni {
    /// Sends `reqs` (message, netlink flags) in this order without waiting in between, then
    /// collects each one's answer: the messages it returned, or its error. The kernel handles
    /// one socket's requests one after the other, in the order sent, so a request may rely
    /// on the ones before it; the caller pays one round trip instead of one per request.
    async fn pipeline(
        &self,
        reqs: Vec<(RouteNetlinkMessage, u16)>,
    ) -> Vec<std::result::Result<Vec<RouteNetlinkMessage>, rtnetlink::Error>> {
        let mut handle = self.handle.clone();
        // Every request is queued before the first answer is awaited.
        let streams: Vec<_> = reqs
            .into_iter()
            .map(|(msg, flags)| {
                let mut req = NetlinkMessage::from(msg);
                req.header.flags = flags;
                handle.request(req)
            })
            .collect();
        let mut out = Vec::with_capacity(streams.len());
        for s in streams {
            out.push(match s {
                Ok(mut s) => {
                    let mut msgs = Vec::new();
                    let mut res = Ok(());
                    while let Some(m) = s.next().await {
                        match m.payload {
                            NetlinkPayload::Error(e) if e.code.is_some() => {
                                res = Err(rtnetlink::Error::NetlinkError(e))
                            }
                            NetlinkPayload::InnerMessage(m) => msgs.push(m),
                            _ => {}
                        }
                    }
                    res.map(|()| msgs)
                }
                Err(e) => Err(e),
            });
        }
        out
    }
}

const REQ_ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

impl CniDataplane for RtnlCni {
    async fn ensure_bridge(&self, name: &str, mac: [u8; 6], mtu: u32) -> Result<Link> {
        let h = self.handle();
        let br = match self.link(name).await? {
            Some(l) => l,
            None => {
                let msg = LinkMessageBuilder::<rtnetlink::LinkBridge>::new(name)
                    .address(mac.to_vec())
                    .mtu(mtu)
                    .up()
                    .build();
                match h.link().add(msg).execute().await {
                    Ok(()) => {}
                    // Another plugin process created it at the same moment.
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) => return Err(Error::netlink(format!("create bridge {name}"), e)),
                }
                self.link(name)
                    .await?
                    .ok_or_else(|| Error::LinkNotFound(name.to_string()))?
            }
        };
        if br.kind.as_deref() != Some("bridge") {
            // lo, a physical NIC (no kind), a veth, a vxlan: never made a bridge's job.
            return Err(Error::Invalid(format!(
                "a link {name:?} exists and is not a bridge (kind: {})",
                br.kind
                    .as_deref()
                    .unwrap_or("none, a device such as lo or a NIC")
            )));
        }
        if !br.up {
            self.set_up(br.index).await?;
        }
        Ok(br)
    }

    async fn attach_pod(
        &self,
        bridge: &Link,
        gateway: IpNet,
        spec: &VethSpec<'_>,
    ) -> Result<AttachedVeth> {
        let host = spec.host_name;
        let gw = address_msg(bridge.index, gateway);
        // The peer is born inside the pod netns (IFLA_NET_NS_FD in the peer's message); the
        // host end joins the bridge (IFLA_MASTER) and comes up. Kernel 6.18: IFF_UP in the
        // peer's header fails the request with ENOTCONN, so the pod end is brought up from
        // inside the pod netns (`configure_pod`). One queue each way: a veth gets one per CPU
        // by default, each with its sysfs objects to create and remove, and without XDP
        // the queues are not used to spread the load.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.pod_ifname)
            .address(spec.pod_mac.to_vec())
            .mtu(spec.mtu)
            .setns_by_fd(spec.pod_ns.raw_fd())
            .append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1))
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host)
            .address(spec.host_mac.to_vec())
            .mtu(spec.mtu)
            .controller(bridge.index)
            .up()
            .append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1))
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        let mut reqs = vec![
            (
                RouteNetlinkMessage::NewAddress(gw),
                REQ_ACK | NLM_F_CREATE | NLM_F_EXCL,
            ),
            (
                RouteNetlinkMessage::NewLink(veth),
                REQ_ACK | NLM_F_CREATE | NLM_F_EXCL,
            ),
        ];
        // What belongs to the new link but cannot be in its create request (the alias, the
        // hairpin) follows once the create has succeeded, by the new link's index: a request
        // by name queued behind a create that fails with EEXIST would act on whatever else
        // has the name (another container's veth), so none is sent in this batch.
        let get = LinkUnspec::new_with_name(host).build();
        reqs.push((RouteNetlinkMessage::GetLink(get), NLM_F_REQUEST));
        let mut res = self.pipeline(reqs).await.into_iter();
        let (addr, created) = (res.next(), res.next());
        let created = created.expect("one answer per request").map_err(|e| {
            Error::netlink(
                format!(
                    "create veth {host} with peer {} in {}",
                    spec.pod_ifname,
                    spec.pod_ns.path().display()
                ),
                e,
            )
        });
        // The read-back after a failed create saw whatever else has the name: ignored.
        created?;
        let read_back = (|| {
            match addr.expect("one answer per request") {
                // EEXIST: the gateway is there already (the usual case after the first pod).
                Err(e) if !is_errno(&e, libc::EEXIST) => {
                    return Err(Error::netlink(
                        format!("add address {gateway} to bridge {}", bridge.name),
                        e,
                    ));
                }
                _ => {}
            }
            let got = res
                .next()
                .expect("one answer per request")
                .map_err(|e| Error::netlink(format!("get link {host}"), e))?;
            got.into_iter()
                .find_map(|m| match m {
                    RouteNetlinkMessage::NewLink(m) => Some(link_from(m)),
                    _ => None,
                })
                .ok_or_else(|| Error::LinkNotFound(host.to_string()))
        })();
        let rest = match read_back {
            Err(e) => Err(e),
            Ok(mut link) => {
                // IFLA_IFALIAS is ignored in a create request (the kernel applies it in
                // do_setlink only); bridge-port options too (IFLA_INFO_SLAVE_DATA applies to
                // an existing port only).
                let alias = LinkUnspec::new_with_index(link.index)
                    .append_extra_attribute(LinkAttribute::IfAlias(spec.host_alias.to_string()))
                    .build();
                let mut reqs = vec![(RouteNetlinkMessage::SetLink(alias), REQ_ACK)];
                if spec.hairpin {
                    let port = LinkBridgePort::new(link.index).hairpin(true).build();
                    reqs.push((RouteNetlinkMessage::NewLink(port), REQ_ACK));
                }
                let mut res = self.pipeline(reqs).await.into_iter();
                (|| {
                    res.next()
                        .expect("one answer per request")
                        .map_err(|e| Error::netlink(format!("set alias of {host}"), e))?;
                    if spec.hairpin {
                        res.next()
                            .expect("one answer per request")
                            .map_err(|e| Error::netlink(format!("set hairpin on {host}"), e))?;
                    }
                    link.alias = Some(spec.host_alias.to_string());
                    let pod_index = link.peer.ok_or_else(|| {
                        Error::Invalid(format!("veth {host}: the kernel reports no peer index"))
                    })?;
                    Ok(AttachedVeth {
                        host: link,
                        pod_index,
                    })
                })()
            }
        };
        if rest.is_err() {
            // Take back the veth this call made (its peer goes with it).
            if let Err(e2) = self.delete_link(host).await {
                tracing::error!("undo: delete {host}: {e2}");
            }
        }
        rest
    }

    async fn configure_pod(
        &self,
        index: u32,
        addr: IpNet,
        routes: &[IpNet],
        gateway: IpAddr,
    ) -> Result<()> {
        // In this order on one socket: the routes need the link up and the address's
        // connected route, which the kernel has made by the time it reads them.
        let up = LinkUnspec::new_with_index(index).up().build();
        let a = address_msg(index, addr);
        let mut reqs = vec![
            (RouteNetlinkMessage::SetLink(up), REQ_ACK),
            (
                RouteNetlinkMessage::NewAddress(a),
                REQ_ACK | NLM_F_CREATE | NLM_F_EXCL,
            ),
        ];
        for dst in routes {
            reqs.push((
                RouteNetlinkMessage::NewRoute(route_msg(index, *dst, gateway)?),
                REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            ));
        }
        let res = self.pipeline(reqs).await;
        let what = |i: usize| match i {
            0 => format!("set link {index} up"),
            1 => format!("add address {addr} to link {index}"),
            i => format!("add route {} via {gateway}", routes[i - 2]),
        };
        for (i, r) in res.into_iter().enumerate() {
            r.map_err(|e| Error::netlink(what(i), e))?;
        }
        Ok(())
    }

    async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle()
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("set link {index} up"), e))
    }

    async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self.handle().link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(link_from)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(Error::netlink(format!("get link {name}"), e)),
        }
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        let msg = LinkUnspec::new_with_name(name).build();
        match self.handle.link().del_with_message(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(Error::netlink(format!("delete link {name}"), e)),
        }
    }

    async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>> {
        // Dump filters are ignored without strict checking: filter here.
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("dump links", e))?;
        Ok(links
            .into_iter()
            .map(link_from)
            .filter(|l| l.controller == Some(bridge))
            .collect())
    }

    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs = crate::netlink::link_addresses(&self.handle, index).await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let len = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(ip, len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    async fn routes(&self, family_of: IpAddr) -> Result<Vec<Route>> {
        let msg = match family_of {
            IpAddr::V4(_) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("dump routes", e))?;
        Ok(msgs.iter().filter_map(route_from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_mac_is_local_unicast_and_stable() {
        let m = bridge_mac("10.244.3.1".parse().unwrap());
        assert_eq!(format_mac(&m), "0a:58:0a:f4:03:01");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(m[0] & 0x01, 0, "unicast");
    }
}

/// A recording fake of [`CniDataplane`] for unit tests of the plugin's logic: it keeps links
/// in memory, records every call as a line (`"create_veth vethX eth0 1450"`), and fails the
/// next call of a verb with a given errno when told to.
pub mod fake {
    use std::collections::{BTreeMap, HashMap};
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex};

    use ipnet::IpNet;

    use super::{AttachedVeth, CniDataplane, Link, Route, VethSpec};
    use crate::{Error, Result};

    /// One namespace's fake kernel. Clones share it (keep one to inspect after handing one
    /// to the code under test).
    #[derive(Default, Clone)]
    pub struct Recording {
        inner: Arc<Inner>,
    }

    #[derive(Default)]
    struct Inner {
        calls: Mutex<Vec<String>>,
        fail: Mutex<HashMap<String, i32>>,
        links: Mutex<BTreeMap<String, Link>>,
        addrs: Mutex<Vec<(u32, IpNet)>>,
        routes: Mutex<Vec<Route>>,
    }

    impl Recording {
        pub fn new() -> Self {
            Self::default()
        }

        /// The next call of `verb` fails with `errno`.
        pub fn fail_next(&self, verb: &str, errno: i32) {
            self.inner.fail.lock().unwrap().insert(verb.into(), errno);
        }

        /// Every call so far, one line each.
        pub fn calls(&self) -> Vec<String> {
            self.inner.calls.lock().unwrap().clone()
        }

        /// Adds a link as if the kernel had it.
        pub fn add_link(&self, name: &str, kind: &str) -> Link {
            let mut links = self.inner.links.lock().unwrap();
            let l = Link {
                index: links.len() as u32 + 2,
                name: name.into(),
                mac: vec![2, 0, 0, 0, 0, links.len() as u8 + 2],
                mtu: Some(1500),
                up: false,
                controller: None,
                kind: Some(kind.into()),
                peer: None,
                alias: None,
            };
            links.insert(name.into(), l.clone());
            l
        }

        /// Sets a link's alias (and bridge), as if another program had.
        pub fn set_link(&self, name: &str, alias: Option<&str>, controller: Option<u32>) {
            if let Some(l) = self.inner.links.lock().unwrap().get_mut(name) {
                l.alias = alias.map(str::to_string);
                l.controller = controller;
            }
        }

        pub fn has_link(&self, name: &str) -> bool {
            self.inner.links.lock().unwrap().contains_key(name)
        }

        fn call(&self, verb: &str, line: String) -> Result<()> {
            self.inner.calls.lock().unwrap().push(line);
            match self.inner.fail.lock().unwrap().remove(verb) {
                Some(errno) => Err(Error::io(
                    format!("fake {verb}"),
                    std::io::Error::from_raw_os_error(errno),
                )),
                None => Ok(()),
            }
        }

        fn by_index(&self, index: u32) -> Option<String> {
            self.inner
                .links
                .lock()
                .unwrap()
                .values()
                .find(|l| l.index == index)
                .map(|l| l.name.clone())
        }
    }

    impl CniDataplane for Recording {
        async fn ensure_bridge(&self, name: &str, mac: [u8; 6], mtu: u32) -> Result<Link> {
            self.call("ensure_bridge", format!("ensure_bridge {name} {mtu}"))?;
            if let Some(l) = self.inner.links.lock().unwrap().get(name)
                && l.kind.as_deref() != Some("bridge")
            {
                return Err(Error::Invalid(format!(
                    "a link {name:?} exists and is not a bridge"
                )));
            }
            if !self.has_link(name) {
                let mut l = self.add_link(name, "bridge");
                l.mac = mac.to_vec();
                l.up = true;
                self.inner.links.lock().unwrap().insert(name.into(), l);
            }
            Ok(self.inner.links.lock().unwrap()[name].clone())
        }

        async fn attach_pod(
            &self,
            bridge: &Link,
            gateway: IpNet,
            spec: &VethSpec<'_>,
        ) -> Result<AttachedVeth> {
            let host = spec.host_name;
            self.call(
                "attach_pod",
                format!(
                    "attach_pod {} {gateway} {host} {} {} hairpin={}",
                    bridge.name, spec.pod_ifname, spec.mtu, spec.hairpin
                ),
            )?;
            if self.has_link(host) {
                return Err(Error::io(
                    "fake attach_pod",
                    std::io::Error::from_raw_os_error(libc::EEXIST),
                ));
            }
            let mut h = self.add_link(host, "veth");
            h.up = true;
            h.mac = spec.host_mac.to_vec();
            h.controller = Some(bridge.index);
            h.alias = Some(spec.host_alias.to_string());
            // The pod end appears in the pod namespace's fake (the test adds it there, as
            // that fake's first link: index 2).
            h.peer = Some(2);
            self.inner
                .links
                .lock()
                .unwrap()
                .insert(host.into(), h.clone());
            Ok(AttachedVeth {
                host: h,
                pod_index: 2,
            })
        }

        async fn configure_pod(
            &self,
            index: u32,
            addr: IpNet,
            routes: &[IpNet],
            gateway: IpAddr,
        ) -> Result<()> {
            let n = self.by_index(index).unwrap_or_default();
            let r: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
            self.call(
                "configure_pod",
                format!(
                    "configure_pod {n} {addr} via {gateway} routes {}",
                    r.join(",")
                ),
            )?;
            if let Some(l) = self.inner.links.lock().unwrap().get_mut(&n) {
                l.up = true;
            }
            self.inner.addrs.lock().unwrap().push((index, addr));
            for dst in routes {
                self.inner.routes.lock().unwrap().push(Route {
                    dst: *dst,
                    gateway: Some(gateway),
                    oif: Some(index),
                });
            }
            Ok(())
        }

        async fn set_up(&self, index: u32) -> Result<()> {
            let n = self.by_index(index).unwrap_or_default();
            self.call("set_up", format!("set_up {n}"))?;
            if let Some(l) = self.inner.links.lock().unwrap().get_mut(&n) {
                l.up = true;
            }
            Ok(())
        }

        async fn link(&self, name: &str) -> Result<Option<Link>> {
            self.call("link", format!("link {name}"))?;
            Ok(self.inner.links.lock().unwrap().get(name).cloned())
        }

        async fn delete_link(&self, name: &str) -> Result<bool> {
            self.call("delete_link", format!("delete_link {name}"))?;
            Ok(self.inner.links.lock().unwrap().remove(name).is_some())
        }

        async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>> {
            self.call("bridge_ports", format!("bridge_ports {bridge}"))?;
            Ok(self
                .inner
                .links
                .lock()
                .unwrap()
                .values()
                .filter(|l| l.controller == Some(bridge))
                .cloned()
                .collect())
        }

        async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
            self.call("addresses", format!("addresses {index}"))?;
            Ok(self
                .inner
                .addrs
                .lock()
                .unwrap()
                .iter()
                .filter(|(i, _)| *i == index)
                .map(|(_, a)| *a)
                .collect())
        }

        async fn routes(&self, _family_of: IpAddr) -> Result<Vec<Route>> {
            self.call("routes", "routes".into())?;
            Ok(self.inner.routes.lock().unwrap().clone())
        }
    }
}
