//! [`Overlay`] over rtnetlink. The only file that knows rtnetlink's request builders for
//! the overlay, so that its API churn stays here.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use std::sync::{Arc, Mutex};

use super::batch::BatchSocket;
use super::{
    EnsureOutcome, Fdb, Mac, Neigh, Op, Overlay, Programmed, Route, TWILL_ROUTE_PROTOCOL,
    VxlanLink, VxlanSpec,
};
use crate::{Error, Netlink, Result};

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;
const ENOENT: i32 = libc::ENOENT;
const ESRCH: i32 = libc::ESRCH;

/// The rtnetlink implementation of [`Overlay`], acting on the namespace that its
/// [`Netlink`] socket was opened in.
#[derive(Clone)]
pub struct RtnlOverlay {
    nl: Netlink,
    batch: Option<Arc<Mutex<BatchSocket>>>,
}

/// Above this many ops a batch is sent from a blocking thread, not the runtime's.
const INLINE_BATCH: usize = 512;

impl RtnlOverlay {
    /// Also opens a socket for [`RtnlOverlay::apply_ops`] batches, in the calling thread's
    /// namespace: call it in the namespace that `nl` was opened in.
    pub fn with_batch(mut self) -> Result<Self> {
        let sock = BatchSocket::current(self.nl.timeout())?;
        self.batch = Some(Arc::new(Mutex::new(sock)));
        Ok(self)
    }

    /// Applies `ops` like [`super::apply_ops`] (the same stages, the same errors), packed
    /// into batches when [`RtnlOverlay::with_batch`] opened a socket for them, one request
    /// at a time with up to `parallel` in flight otherwise. A route whose dst exists takes
    /// the ownership check of [`Overlay::replace_route`]; a delete of what is gone succeeds.
    pub async fn apply_ops(&self, link: u32, ops: &[Op], parallel: usize) -> Vec<(Op, Error)> {
        let Some(batch) = &self.batch else {
            return super::apply_ops(self, link, ops, parallel).await;
        };
        let mut failed = Vec::new();
        for stage in super::STAGES {
            let ops: Vec<Op> = ops.iter().filter(|op| stage(op)).copied().collect();
            if ops.is_empty() {
                continue;
            }
            let sent = if ops.len() <= INLINE_BATCH {
                batch
                    .lock()
                    .map(|mut b| super::batch::send(&mut b, link, &ops))
                    .unwrap_or_default()
            } else {
                let b = batch.clone();
                tokio::task::spawn_blocking(move || {
                    b.lock()
                        .map(|mut b| super::batch::send(&mut b, link, &ops))
                        .unwrap_or_default()
                })
                .await
                .unwrap_or_default()
            };
            for (op, e) in sent {
                match (op, e.errno()) {
                    (Op::ReplaceRoute(r), Some(EEXIST)) => {
                        if let Err(e) = self.replace_route(link, &r).await {
                            failed.push((op, e));
                        }
                    }
                    (
                        Op::DeleteRoute(_) | Op::DeleteNeigh(_) | Op::DeleteFdb(_),
                        Some(ENOENT | ESRCH | ENODEV),
                    ) => {}
                    _ => failed.push((op, e)),
                }
            }
        }
        failed
    }

    pub fn new(nl: Netlink) -> Self {
        RtnlOverlay { nl, batch: None }
    }

    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut s = self.nl.handle().link().get().match_name(name).execute();
        match self
            .nl
            .run(|| format!("get link {name}"), s.try_next())
            .await
        {
            Ok(m) => Ok(m),
            Err(e) if e.errno() == Some(ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn v4_addresses(&self, index: u32) -> Result<Vec<(Ipv4Net, AddressMessage)>> {
        let msgs = self.nl.link_addresses(index).await?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.family != AddressFamily::Inet {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip
                && let Ok(net) = Ipv4Net::new(ip, m.header.prefix_len)
            {
                out.push((net, m));
            }
        }
        Ok(out)
    }

    async fn to_vxlan_link(&self, m: &LinkMessage) -> Result<VxlanLink> {
        let mut l = VxlanLink {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            ..VxlanLink::default()
        };
        let mut is_vxlan = false;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
                LinkAttribute::Address(a) => l.mac = Mac::from_slice(a).unwrap_or_default(),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                            LinkInfo::Data(InfoData::Vxlan(d)) => {
                                for x in d {
                                    match x {
                                        InfoVxlan::Id(v) => l.vni = Some(*v),
                                        InfoVxlan::Port(p) => l.port = Some(*p),
                                        InfoVxlan::Link(i) => l.underlay_index = Some(*i),
                                        InfoVxlan::Local(ip) => l.local = Some(IpAddr::V4(*ip)),
                                        InfoVxlan::Local6(ip) => l.local = Some(IpAddr::V6(*ip)),
                                        InfoVxlan::Learning(b) => l.learning = Some(*b),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if !is_vxlan {
            // Leave vni None: `mismatch` then asks for a recreate.
            l.vni = None;
        }
        l.addresses = self
            .v4_addresses(l.index)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        Ok(l)
    }

    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<()> {
        let name = spec.name();
        let mut b = LinkVxlan::new(&name, spec.vni)
            // `dev` is the underlay by index (LinkMessageBuilder::link() does not work for VXLAN).
            .dev(spec.underlay_index)
            .port(spec.port)
            .learning(false)
            // MTU and MAC at creation: raising the MTU later is EINVAL.
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec());
        b = match spec.local {
            IpAddr::V4(ip) => b.local(ip),
            IpAddr::V6(ip) => b.local6(ip),
        };
        self.nl
            .run(
                || format!("create vxlan {name} (vni {})", spec.vni),
                self.nl.handle().link().add(b.build()).execute(),
            )
            .await
    }

    async fn delete_link(&self, index: u32, name: &str) -> Result<()> {
        let r = self
            .nl
            .run(
                || format!("delete link {name} (index {index})"),
                self.nl.handle().link().del(index).execute(),
            )
            .await;
        match r {
            Err(e) if e.errno() == Some(ENODEV) => Ok(()),
            r => r,
        }
    }

    /// The /32 address and up; other IPv4 addresses on the device are removed.
    async fn fix_addr_and_up(&self, spec: &VxlanSpec, link: &mut VxlanLink) -> Result<()> {
        let want = Ipv4Net::new(spec.address, 32).expect("/32 is valid");
        for (net, msg) in self.v4_addresses(link.index).await? {
            if net != want {
                self.nl
                    .run(
                        || format!("delete address {net} from {}", link.name),
                        self.nl.handle().address().del(msg).execute(),
                    )
                    .await?;
            }
        }
        if !link.addresses.contains(&want) {
            self.nl
                .run(
                    || format!("add address {want} to {}", link.name),
                    self.nl
                        .handle()
                        .address()
                        .add(link.index, IpAddr::V4(spec.address), 32)
                        .replace()
                        .execute(),
                )
                .await?;
        }
        link.addresses = vec![want];
        if !link.up {
            self.nl
                .run(
                    || format!("set {} up", link.name),
                    self.nl
                        .handle()
                        .link()
                        .set(LinkUnspec::new_with_index(link.index).up().build())
                        .execute(),
                )
                .await?;
            link.up = true;
        }
        Ok(())
    }

    async fn neigh_dump(&self, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
        self.nl
            .run(
                || format!("dump neighbours ({family:?})"),
                self.nl
                    .handle()
                    .neighbours()
                    .get()
                    .set_address_family(family)
                    .execute()
                    .try_collect(),
            )
            .await
    }

    async fn route_dump(&self) -> Result<Vec<RouteMessage>> {
        self.nl
            .run(
                || "dump IPv4 routes".into(),
                self.nl
                    .handle()
                    .route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect(),
            )
            .await
    }
}

fn ignore_missing(r: Result<()>) -> Result<()> {
    match r {
        // Deleting what is already gone is success (idempotent deletes).
        Err(e) if matches!(e.errno(), Some(ENOENT) | Some(ESRCH) | Some(ENODEV)) => Ok(()),
        r => r,
    }
}

/// The neighbour (IPv4, permanent) in `m` if it is on `link`.
pub(crate) fn parse_neigh(m: &NeighbourMessage, link: u32) -> Option<Neigh> {
    if m.header.ifindex != link
        || m.header.family != AddressFamily::Inet
        || m.header.state != NeighbourState::Permanent
    {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    Some(Neigh { ip: ip?, mac: mac? })
}

/// The FDB entry (bridge family, permanent, with a destination) in `m` if it is on `link`.
pub(crate) fn parse_fdb(m: &NeighbourMessage, link: u32) -> Option<Fdb> {
    if m.header.ifindex != link
        || m.header.family != AddressFamily::Bridge
        || m.header.state != NeighbourState::Permanent
    {
        return None;
    }
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                dst = Some(IpAddr::V4(*v))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                dst = Some(IpAddr::V6(*v))
            }
            // In an AF_BRIDGE message the parser cannot tell NDA_DST's family: raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                dst = match b.len() {
                    4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    let mac = mac?;
    if mac.is_zero() {
        return None;
    }
    Some(Fdb { mac, dst: dst? })
}

/// The IPv4 main-table unicast route in `m` if it is twill's (protocol
/// [`TWILL_ROUTE_PROTOCOL`]) and its output device is `link`.
pub(crate) fn parse_route(m: &RouteMessage, link: u32) -> Option<Route> {
    if m.header.protocol != RouteProtocol::Other(TWILL_ROUTE_PROTOCOL) {
        return None;
    }
    parse_main_route(m, link)
}

/// The destination of an IPv4 main-table unicast route in `m` that is not twill's: a
/// route of someone else (kernel, boot, dhcp, a routing daemon) whatever its device.
pub(crate) fn parse_foreign_dst(m: &RouteMessage) -> Option<Ipv4Net> {
    if m.header.protocol == RouteProtocol::Other(TWILL_ROUTE_PROTOCOL)
        || m.header.address_family != AddressFamily::Inet
    {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    Ipv4Net::new(dst, m.header.destination_prefix_length).ok()
}

/// The output device of a route message.
fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn parse_main_route(m: &RouteMessage, link: u32) -> Option<Route> {
    if m.header.address_family != AddressFamily::Inet || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut oif = None;
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut via = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(link) {
        return None;
    }
    let dst = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
    // A route without a gateway on the device is not one of ours; report it with
    // via = its own network address so that the diff replaces or deletes it.
    Some(Route {
        dst,
        via: via.unwrap_or(dst.network()),
    })
}

pub(super) fn route_msg(link: u32, r: &Route) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .gateway(r.via)
        .output_interface(link)
        // onlink: the gateway (the peer's net address) is on no subnet of the device.
        .onlink()
        // twill's mark: a dump tells its routes from everyone else's by this alone.
        .protocol(RouteProtocol::Other(TWILL_ROUTE_PROTOCOL))
        .build()
}

/// `<ip> lladdr <mac> permanent` on `link` (with NLM_F_CREATE | NLM_F_REPLACE).
pub(super) fn neigh_add_msg(link: u32, n: &Neigh) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = link;
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unspec;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            n.ip,
        )));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
    m
}

/// `<mac> dst <ip> self permanent` on `link` (with NLM_F_CREATE | NLM_F_REPLACE).
pub(super) fn fdb_add_msg(link: u32, f: &Fdb) -> NeighbourMessage {
    let mut m = fdb_del_msg(link, f);
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unspec;
    m
}

/// The neighbour of `n.ip` on `link`, to delete.
pub(super) fn neigh_del_msg(link: u32, n: &Neigh) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = link;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            n.ip,
        )));
    m
}

/// The FDB remote `f` on `link`, to delete: with NDA_DST only that remote goes; the entry
/// goes with its last remote.
pub(super) fn fdb_del_msg(link: u32, f: &Fdb) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = link;
    // NTF_SELF: the entry belongs to the VXLAN device's own FDB, not to a bridge.
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(match f.dst {
            IpAddr::V4(v) => NeighbourAddress::Inet(v),
            IpAddr::V6(v) => NeighbourAddress::Inet6(v),
        }));
    m
}

/// Route `r` on `link`, to delete: the kernel deletes only a route with this protocol
/// (twill's) and oif; NOWHERE = any scope.
pub(super) fn route_del_msg(link: u32, r: &Route) -> RouteMessage {
    let mut m = route_msg(link, r);
    m.header.scope = RouteScope::NoWhere;
    m.attributes
        .retain(|a| !matches!(a, RouteAttribute::Gateway(_)));
    m
}

impl Overlay for RtnlOverlay {
    async fn get_vxlan(&self, vni: u32) -> Result<Option<VxlanLink>> {
        let name = super::vxlan_name(vni);
        match self.link_by_name(&name).await? {
            Some(m) => Ok(Some(self.to_vxlan_link(&m).await?)),
            None => Ok(None),
        }
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(VxlanLink, EnsureOutcome)> {
        let name = spec.name();
        let (mut link, outcome) = match self.get_vxlan(spec.vni).await? {
            Some(l) => match l.mismatch(spec) {
                None => (l, EnsureOutcome::Adopted),
                Some(reason) => {
                    self.delete_link(l.index, &name).await?;
                    self.create_vxlan(spec).await?;
                    let l = self
                        .get_vxlan(spec.vni)
                        .await?
                        .ok_or_else(|| Error::LinkNotFound(name.clone()))?;
                    (l, EnsureOutcome::Recreated { reason })
                }
            },
            None => {
                self.create_vxlan(spec).await?;
                let l = self
                    .get_vxlan(spec.vni)
                    .await?
                    .ok_or_else(|| Error::LinkNotFound(name.clone()))?;
                (l, EnsureOutcome::Created)
            }
        };
        if let Some(why) = link.mismatch(spec) {
            return Err(Error::Invalid(format!(
                "vxlan {name} created but the kernel reports different settings: {why}"
            )));
        }
        self.fix_addr_and_up(spec, &mut link).await?;
        Ok((link, outcome))
    }

    async fn dump(&self, link: u32) -> Result<Programmed> {
        let mut p = Programmed::default();
        for m in self.neigh_dump(AddressFamily::Inet).await? {
            if let Some(n) = parse_neigh(&m, link) {
                p.neighs.insert(n);
            }
        }
        for m in self.neigh_dump(AddressFamily::Bridge).await? {
            if let Some(f) = parse_fdb(&m, link) {
                p.fdbs.insert(f);
            }
        }
        for m in self.route_dump().await? {
            if let Some(r) = parse_route(&m, link) {
                p.routes.insert(r);
            } else if let Some(dst) = parse_foreign_dst(&m)
                && route_oif(&m) != Some(link)
            {
                p.foreign_routes.insert(dst);
            }
        }
        Ok(p)
    }

    async fn replace_neigh(&self, link: u32, n: &Neigh) -> Result<()> {
        let req = self
            .nl
            .handle()
            .neighbours()
            .add(link, IpAddr::V4(n.ip))
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute();
        self.nl
            .run(|| format!("replace neigh {} lladdr {}", n.ip, n.mac), req)
            .await
    }

    async fn delete_neigh(&self, link: u32, n: &Neigh) -> Result<()> {
        let req = self
            .nl
            .handle()
            .neighbours()
            .del(neigh_del_msg(link, n))
            .execute();
        ignore_missing(self.nl.run(|| format!("delete neigh {}", n.ip), req).await)
    }

    async fn replace_fdb(&self, link: u32, f: &Fdb) -> Result<()> {
        let req = self
            .nl
            .handle()
            .neighbours()
            .add_bridge(link, &f.mac.0)
            .destination(f.dst)
            // NTF_SELF: the entry belongs to the VXLAN device's own FDB, not to a bridge.
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute();
        self.nl
            .run(|| format!("replace fdb {} dst {}", f.mac, f.dst), req)
            .await
    }

    async fn delete_fdb(&self, link: u32, f: &Fdb) -> Result<()> {
        let req = self
            .nl
            .handle()
            .neighbours()
            .del(fdb_del_msg(link, f))
            .execute();
        ignore_missing(
            self.nl
                .run(|| format!("delete fdb {} dst {}", f.mac, f.dst), req)
                .await,
        )
    }

    async fn replace_route(&self, link: u32, r: &Route) -> Result<()> {
        // Create-only first: NLM_F_REPLACE would take over any route with this dst and
        // metric (connected, default, a host route), whoever made it.
        let what = format!("replace route {} via {}", r.dst, r.via);
        let req = self.nl.handle().route().add(route_msg(link, r)).execute();
        let e = match self.nl.run(|| what.clone(), req).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if e.errno() != Some(EEXIST) {
            return Err(e);
        }
        // Replace only a route that is twill's, or that is on twill's own device (an older
        // twilld's route, with another protocol): anything else is a conflict.
        let owner = self.route_dump().await?.into_iter().find(|m| {
            m.header.address_family == AddressFamily::Inet
                && parse_foreign_dst(m).or_else(|| parse_main_route(m, link).map(|x| x.dst))
                    == Some(r.dst)
        });
        if let Some(m) = owner
            && m.header.protocol != RouteProtocol::Other(TWILL_ROUTE_PROTOCOL)
            && route_oif(&m) != Some(link)
        {
            return Err(Error::Conflict(format!(
                "route {}: the main table has a route of protocol {} on device index {}: \
                 not twill's, left alone",
                r.dst,
                m.header.protocol,
                route_oif(&m).map_or("none".into(), |i| i.to_string())
            )));
        }
        let req = self
            .nl
            .handle()
            .route()
            .add(route_msg(link, r))
            .replace()
            .execute();
        self.nl.run(|| what, req).await
    }

    async fn delete_route(&self, link: u32, r: &Route) -> Result<()> {
        let req = self
            .nl
            .handle()
            .route()
            .del(route_del_msg(link, r))
            .execute();
        ignore_missing(self.nl.run(|| format!("delete route {}", r.dst), req).await)
    }

    async fn remove_address(&self, addr: Ipv4Net) -> Result<Vec<u32>> {
        let msgs: Vec<AddressMessage> = self
            .nl
            .run(
                || "dump IPv4 addresses".to_string(),
                self.nl
                    .handle()
                    .address()
                    .get()
                    .execute()
                    .try_collect::<Vec<_>>(),
            )
            .await?;
        let mut from = Vec::new();
        for m in msgs {
            if m.header.family != AddressFamily::Inet || m.header.prefix_len != addr.prefix_len() {
                continue;
            }
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if local != Some(addr.addr()) {
                continue;
            }
            let index = m.header.index;
            self.nl
                .run(
                    || format!("delete address {addr} from link {index}"),
                    self.nl.handle().address().del(m).execute(),
                )
                .await?;
            from.push(index);
        }
        Ok(from)
    }
}
