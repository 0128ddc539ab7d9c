//! [`PodDataplane`] over an rtnetlink socket bound to one namespace.

use std::net::IpAddr;
use std::sync::OnceLock;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use super::{
    AttachedVeth, Link, Mac, PodAddr, PodDataplane, Removal, Route, Undo, VethOwner, VethSpec,
};
use crate::netlink::{Batch, errno, parse};
use crate::{Error, NetNs, Netlink, Result, unlink};

/// [`PodDataplane`] over an rtnetlink socket bound to one namespace. The socket of
/// [`RtnlPod::current`] is opened by the first verb that needs it, so the verbs that need none
/// ([`PodDataplane::remove_veth`], [`PodDataplane::remove_link_now`]) run without a runtime.
#[derive(Clone, Default)]
pub struct RtnlPod {
    handle: OnceLock<Handle>,
}

impl RtnlPod {
    pub fn new(nl: Netlink) -> Self {
        RtnlPod {
            handle: OnceLock::from(nl.handle().clone()),
        }
    }

    /// Opens a socket inside `ns` (see [`Netlink::open`]).
    pub fn open(ns: &NetNs) -> Result<Self> {
        Ok(Self::new(Netlink::open(ns)?))
    }

    /// The caller's own namespace; the socket is opened on first use, inside a tokio
    /// runtime.
    pub fn current() -> Self {
        Self::default()
    }

    fn handle(&self) -> Result<&Handle> {
        if let Some(h) = self.handle.get() {
            return Ok(h);
        }
        let nl = Netlink::current()?;
        Ok(self.handle.get_or_init(|| nl.handle().clone()))
    }
}

/// `addr` (ip/len) on link `index`; an IPv6 one with IFA_F_NODAD.
fn address_msg(index: u32, addr: IpNet) -> AddressMessage {
    match addr {
        IpNet::V4(n) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
        IpNet::V6(n) => {
            let mut m = AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build();
            // Without NODAD the address stays "tentative" (unusable as a source, and a
            // gateway on it unanswered) for ~1 s of DAD after the link has carrier; the
            // allocator guarantees its uniqueness on the bridge (docs/cni.md).
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            m
        }
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

impl PodDataplane for RtnlPod {
    async fn ensure_bridge(&self, name: &str, mac: Mac, mtu: u32) -> Result<Link> {
        let br = match self.link(name).await? {
            Some(l) => l,
            None => {
                let msg = LinkMessageBuilder::<rtnetlink::LinkBridge>::new(name)
                    .address(mac.0.to_vec())
                    .mtu(mtu)
                    .up()
                    .build();
                match self.handle()?.link().add(msg).execute().await {
                    Ok(()) => {}
                    // Another plugin process created it at the same moment.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
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
        gateways: &[IpNet],
        spec: &VethSpec<'_>,
    ) -> Result<AttachedVeth> {
        let host = spec.host_name;
        // The peer is born inside the pod netns (IFLA_NET_NS_FD in the peer's message); the
        // host end joins the bridge (IFLA_MASTER) and comes up. Kernel 6.18: IFF_UP in the
        // peer's header fails the request with ENOTCONN, so the pod end is brought up from
        // inside the pod netns (`configure_pod`). One queue each way: a veth gets one per CPU
        // by default, each with its sysfs objects to create and remove, and without XDP
        // the queues are not used to spread the load.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.pod_ifname)
            .address(spec.pod_mac.0.to_vec())
            .mtu(spec.mtu)
            .setns_by_fd(spec.pod_ns.raw_fd())
            .append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1))
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host)
            .address(spec.host_mac.0.to_vec())
            .mtu(spec.mtu)
            .controller(bridge.index)
            .up()
            .append_extra_attribute(LinkAttribute::NumTxQueues(1))
            .append_extra_attribute(LinkAttribute::NumRxQueues(1))
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        // What belongs to the new link but cannot be in its create request (the alias, the
        // hairpin) follows once the create has succeeded, by the new link's index: a request
        // by name queued behind a create that fails with EEXIST would act on whatever else
        // has the name (another container's veth), so none is sent in this batch.
        let mut batch = Batch::new();
        for gateway in gateways {
            batch = batch.create(
                format!("add address {gateway} to bridge {}", bridge.name),
                RouteNetlinkMessage::NewAddress(address_msg(bridge.index, *gateway)),
            );
        }
        let mut res = batch
            .create(
                format!(
                    "create veth {host} with peer {} in {}",
                    spec.pod_ifname,
                    spec.pod_ns.path().display()
                ),
                RouteNetlinkMessage::NewLink(veth),
            )
            .get(
                format!("get link {host}"),
                RouteNetlinkMessage::GetLink(LinkUnspec::new_with_name(host).build()),
            )
            .send(self.handle()?)
            .await;
        let addrs: Vec<_> = gateways.iter().map(|_| res.take()).collect();
        // The read-back after a failed create saw whatever else has the name: ignored.
        res.take()?;
        // From here on a failure takes back the veth this call made (its peer goes with it).
        let mut undo = Undo::new();
        undo.push(format!("delete {host}"), || {
            self.remove_link_now(host).map(drop)
        });
        for addr in addrs {
            match addr {
                // EEXIST: the gateway is there already (the usual case after the first pod).
                Err(e) if e.errno() != Some(libc::EEXIST) => return Err(e),
                _ => {}
            }
        }
        let mut link = res
            .take()?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(m) => Some(parse::link(m)),
                _ => None,
            })
            .ok_or_else(|| Error::LinkNotFound(host.to_string()))?;
        // IFLA_IFALIAS is ignored in a create request (the kernel applies it in do_setlink
        // only); bridge-port options too (IFLA_INFO_SLAVE_DATA applies to an existing port
        // only).
        let alias = LinkUnspec::new_with_index(link.index)
            .append_extra_attribute(LinkAttribute::IfAlias(spec.host_alias.to_string()))
            .build();
        let mut batch = Batch::new().ack(
            format!("set alias of {host}"),
            RouteNetlinkMessage::SetLink(alias),
        );
        if spec.hairpin {
            let port = LinkBridgePort::new(link.index).hairpin(true).build();
            batch = batch.ack(
                format!("set hairpin on {host}"),
                RouteNetlinkMessage::NewLink(port),
            );
        }
        batch.send(self.handle()?).await.all_ok()?;
        link.alias = Some(spec.host_alias.to_string());
        let pod_index = link.peer.ok_or_else(|| {
            Error::Invalid(format!("veth {host}: the kernel reports no peer index"))
        })?;
        undo.commit();
        Ok(AttachedVeth {
            host: link,
            pod_index,
        })
    }

    async fn configure_pod(&self, index: u32, addrs: &[PodAddr]) -> Result<()> {
        // In this order on one socket: the routes need the link up and the address's
        // connected route, which the kernel has made by the time it reads them.
        let mut batch = Batch::new().ack(
            format!("set link {index} up"),
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).up().build()),
        );
        for a in addrs {
            batch = batch.create(
                format!("add address {} to link {index}", a.addr),
                RouteNetlinkMessage::NewAddress(address_msg(index, a.addr)),
            );
        }
        for a in addrs {
            for dst in &a.routes {
                batch = batch.replace(
                    format!("add route {dst} via {}", a.gateway),
                    RouteNetlinkMessage::NewRoute(route_msg(index, *dst, a.gateway)?),
                );
            }
        }
        batch.send(self.handle()?).await.all_ok()
    }

    async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle()?
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("set link {index} up"), e))
    }

    async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self.handle()?.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(parse::link)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Error::netlink(format!("get link {name}"), e)),
        }
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        let msg = LinkUnspec::new_with_name(name).build();
        match self.handle()?.link().del_with_message(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Error::netlink(format!("delete link {name}"), e)),
        }
    }

    async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>> {
        // Dump filters are ignored without strict checking: filter here.
        let links: Vec<LinkMessage> = self
            .handle()?
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("dump links", e))?;
        Ok(links
            .into_iter()
            .map(parse::link)
            .filter(|l| l.controller == Some(bridge))
            .collect())
    }

    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs = crate::netlink::link_addresses(self.handle()?, index).await?;
        Ok(msgs
            .iter()
            .filter_map(|m| parse::address(m).address)
            .collect())
    }

    async fn routes(&self, family_of: IpAddr) -> Result<Vec<Route>> {
        let msg = match family_of {
            IpAddr::V4(_) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let msgs: Vec<_> = self
            .handle()?
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("dump routes", e))?;
        Ok(msgs.iter().filter_map(parse::route).collect())
    }

    fn remove_link_now(&self, name: &str) -> Result<bool> {
        unlink::remove_link(name)
    }

    fn remove_veth(&self, name: &str, owner: &VethOwner) -> Result<Removal> {
        unlink::remove_link_if(name, |l| {
            owner.owns(l, |bridge| unlink::get_link(bridge).ok().flatten())
        })
    }
}
