//! [`Overlay`] over rtnetlink. The only file that knows rtnetlink's request builders for
//! the overlay, so that its API churn stays here, and the one that builds the overlay's
//! messages (also for `batch`) and tells from parsed messages ([`crate::netlink::parse`])
//! which entries are twill's.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

mod v6;

use super::batch::BatchSocket;
use super::{
    DirectRoute, EnsureOutcome, Fdb, Neigh, Op, Overlay, Programmed, Route, RoutePath,
    TWILL_ROUTE_PROTOCOL, VxlanLink, VxlanSpec,
};
use crate::netlink::parse;
use crate::{Error, Netlink, Result};

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
                match op {
                    Op::ReplaceRoute(r) if e.errno() == Some(libc::EEXIST) => {
                        if let Err(e) = self.replace_route(link, &r).await {
                            failed.push((op, e));
                        }
                    }
                    Op::ReplaceDirect(r) if e.errno() == Some(libc::EEXIST) => {
                        if let Err(e) = self.replace_direct(&r).await {
                            failed.push((op, e));
                        }
                    }
                    Op::DeleteRoute(_)
                    | Op::DeleteDirect(_)
                    | Op::DeleteNeigh(_)
                    | Op::DeleteFdb(_)
                        if e.is_missing() => {}
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

    async fn link_by_name(&self, name: &str) -> Result<Option<parse::Link>> {
        let mut s = self.nl.handle().link().get().match_name(name).execute();
        match self
            .nl
            .run(|| format!("get link {name}"), s.try_next())
            .await
        {
            Ok(m) => Ok(m.map(parse::link)),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The IPv4 addresses of link `index` (its own: IFA_LOCAL, else IFA_ADDRESS), each with
    /// its message (to delete it by).
    async fn v4_addresses(&self, index: u32) -> Result<Vec<(Ipv4Net, AddressMessage)>> {
        let msgs = self.nl.link_addresses(index).await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match parse::address(&m).own() {
                Some(IpNet::V4(net)) => Some((net, m)),
                _ => None,
            })
            .collect())
    }

    async fn to_vxlan_link(&self, l: parse::Link) -> Result<VxlanLink> {
        let vx = l.vxlan.unwrap_or_default();
        let addresses = self
            .v4_addresses(l.index)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        Ok(VxlanLink {
            index: l.index,
            // Not a VXLAN device: vni None, and `mismatch` asks for a recreate.
            vni: vx.vni.filter(|_| l.kind.as_deref() == Some("vxlan")),
            port: vx.port,
            underlay_index: vx.underlay,
            local: vx.local,
            learning: vx.learning,
            mtu: l.mtu.unwrap_or(0),
            mac: l.mac.unwrap_or_default(),
            up: l.up,
            name: l.name,
            addresses,
        })
    }

    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<()> {
        self.create_vxlan_named(&spec.name(), spec).await
    }

    /// Creates the VXLAN device `name` with the settings of `spec` (its address aside).
    async fn create_vxlan_named(&self, name: &str, spec: &VxlanSpec) -> Result<()> {
        let mut b = LinkVxlan::new(name, spec.vni)
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
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
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

    /// Writes the neighbour or FDB entry `msg` (NLM_F_CREATE | NLM_F_REPLACE): rtnetlink's
    /// request (flags, answer) around the message that the batches send too.
    async fn replace_neighbour(
        &self,
        op: impl FnOnce() -> String,
        msg: NeighbourMessage,
    ) -> Result<()> {
        // `add_bridge` only carries the request here: its message is replaced whole.
        let mut req = self.nl.handle().neighbours().add_bridge(0, &[]).replace();
        *req.message_mut() = msg;
        self.nl.run(op, req.execute()).await
    }

    /// Runs the delete request `req` (named by `op`); deleting what is already gone is
    /// success (idempotent deletes).
    async fn delete(
        &self,
        op: impl FnOnce() -> String,
        req: impl std::future::Future<Output = std::result::Result<(), rtnetlink::Error>>,
    ) -> Result<()> {
        match self.nl.run(op, req).await {
            Err(e) if e.is_missing() => Ok(()),
            r => r,
        }
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

    /// Writes `msg`, a route to `dst`, create-only first: NLM_F_REPLACE would take over any
    /// route with this dst and metric (connected, default, a host route), whoever made it.
    /// When one exists (EEXIST), the route that `holds` the destination in a dump of
    /// `dst`'s family is replaced only if `may_take` allows it; any other is a
    /// [`Error::Conflict`], left alone.
    pub(super) async fn add_or_take_over(
        &self,
        what: String,
        dst: IpNet,
        msg: RouteMessage,
        holds: impl Fn(&parse::Route) -> bool,
        may_take: impl Fn(&parse::Route) -> bool,
    ) -> Result<()> {
        let req = self.nl.handle().route().add(msg.clone()).execute();
        let e = match self.nl.run(|| what.clone(), req).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if e.errno() != Some(libc::EEXIST) {
            return Err(e);
        }
        let dump = match dst {
            IpNet::V4(_) => self.route_dump().await?,
            IpNet::V6(_) => self.route6_dump().await?,
        };
        let owner = dump.iter().filter_map(parse::route).find(|m| holds(m));
        if let Some(m) = owner
            && !may_take(&m)
        {
            return Err(Error::Conflict(format!(
                "route {dst}: the main table has a route of protocol {} on device index {}: \
                 not twill's, left alone",
                m.protocol,
                m.oif.map_or("none".into(), |i| i.to_string())
            )));
        }
        let req = self.nl.handle().route().add(msg).replace().execute();
        self.nl.run(|| what, req).await
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

/// The neighbour that twill manages (IPv4, permanent) in `n`, if it is on `link`.
pub(crate) fn neigh_on(n: &parse::Neighbour, link: u32) -> Option<Neigh> {
    if n.index != link || n.family != AddressFamily::Inet || n.state != NeighbourState::Permanent {
        return None;
    }
    match n.dst? {
        IpAddr::V4(ip) => Some(Neigh { ip, mac: n.mac? }),
        IpAddr::V6(_) => None,
    }
}

/// The FDB entry that twill manages (bridge family, permanent, with a destination) in `n`,
/// if it is on `link`.
pub(crate) fn fdb_on(n: &parse::Neighbour, link: u32) -> Option<Fdb> {
    if n.index != link || n.family != AddressFamily::Bridge || n.state != NeighbourState::Permanent
    {
        return None;
    }
    let mac = n.mac?;
    if mac.is_zero() {
        return None;
    }
    Some(Fdb { mac, dst: n.dst? })
}

/// Whether `r` carries twill's mark, [`TWILL_ROUTE_PROTOCOL`].
pub(crate) fn is_twills(r: &parse::Route) -> bool {
    r.protocol == RouteProtocol::Other(TWILL_ROUTE_PROTOCOL)
}

/// `r` as an IPv4 unicast route on `link`, whoever made it. A route without a gateway on the
/// device is not one of ours; it comes out with via = its own network address so that the
/// diff replaces or deletes it.
fn on_link(r: &parse::Route, link: u32) -> Option<Route> {
    let IpNet::V4(dst) = r.dst else { return None };
    if r.kind != RouteType::Unicast || r.oif != Some(link) {
        return None;
    }
    let via = match r.gateway {
        Some(IpAddr::V4(g)) => g,
        _ => dst.network(),
    };
    Some(Route { dst, via })
}

/// `r` if it is twill's (protocol [`TWILL_ROUTE_PROTOCOL`]), IPv4 unicast, on `link`.
pub(crate) fn route_on(r: &parse::Route, link: u32) -> Option<Route> {
    if !is_twills(r) {
        return None;
    }
    on_link(r, link)
}

/// `r` if it is twill's, IPv4 unicast, on a device other than `link` (the VXLAN device):
/// a direct route. One without a gateway is not of the shape twill writes; it comes out
/// with via = its own network address so that the diff replaces or deletes it.
pub(crate) fn direct_on(r: &parse::Route, link: u32) -> Option<DirectRoute> {
    let IpNet::V4(dst) = r.dst else { return None };
    let dev = r.oif?;
    if !is_twills(r) || r.kind != RouteType::Unicast || dev == link {
        return None;
    }
    let via = match r.gateway {
        Some(IpAddr::V4(g)) => g,
        _ => dst.network(),
    };
    Some(DirectRoute { dst, via, dev })
}

/// The path in the kernel's answer `m` to a route lookup. The answer names the table its
/// route came from (main, local, a policy table): the decision needs only the device, the
/// gateway and the type, whatever the table, so the message is read as a main-table one.
fn path_of(m: &RouteMessage) -> Option<RoutePath> {
    let mut m = m.clone();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.attributes
        .retain(|a| !matches!(a, RouteAttribute::Table(_)));
    let r = parse::route(&m)?;
    Some(RoutePath {
        oif: r.oif,
        gateway: r.gateway,
        unicast: r.kind == RouteType::Unicast,
    })
}

/// The destination of `r` if it is an IPv4 route that is not twill's: a route of someone else
/// (kernel, boot, dhcp, a routing daemon) whatever its device.
fn foreign_dst(r: &parse::Route) -> Option<Ipv4Net> {
    match r.dst {
        IpNet::V4(dst) if !is_twills(r) => Some(dst),
        _ => None,
    }
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

/// `<dst> via <via> dev <dev> proto twill`: no onlink (the kernel refuses a gateway that is
/// not on the device, which is what the lookup said it is).
pub(super) fn direct_msg(r: &DirectRoute) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .gateway(r.via)
        .output_interface(r.dev)
        .protocol(RouteProtocol::Other(TWILL_ROUTE_PROTOCOL))
        .build()
}

/// Direct route `r`, to delete: only twill's route with this dst on `r.dev` matches (a VXLAN
/// route that took its place is on another device and stays); NOWHERE = any scope.
pub(super) fn direct_del_msg(r: &DirectRoute) -> RouteMessage {
    to_delete(direct_msg(r))
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
    to_delete(route_msg(link, r))
}

/// The route message `m` (as written) turned into the one that deletes it: any scope
/// (NOWHERE), no gateway, so that only destination, device and protocol must match.
pub(super) fn to_delete(mut m: RouteMessage) -> RouteMessage {
    m.header.scope = RouteScope::NoWhere;
    m.attributes
        .retain(|a| !matches!(a, RouteAttribute::Gateway(_)));
    m
}

impl Overlay for RtnlOverlay {
    async fn get_vxlan(&self, vni: u32) -> Result<Option<VxlanLink>> {
        let name = super::vxlan_name(vni);
        match self.link_by_name(&name).await? {
            Some(l) => Ok(Some(self.to_vxlan_link(l).await?)),
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
            if let Some(n) = neigh_on(&parse::neighbour(&m), link) {
                p.neighs.insert(n);
            }
        }
        for m in self.neigh_dump(AddressFamily::Bridge).await? {
            if let Some(f) = fdb_on(&parse::neighbour(&m), link) {
                p.fdbs.insert(f);
            }
        }
        for r in self.route_dump().await?.iter().filter_map(parse::route) {
            if let Some(x) = route_on(&r, link) {
                p.routes.insert(x);
            } else if let Some(x) = direct_on(&r, link) {
                p.direct.insert(x);
            } else if let Some(dst) = foreign_dst(&r)
                && r.oif != Some(link)
            {
                p.foreign_routes.insert(dst);
            }
        }
        Ok(p)
    }

    async fn replace_neigh(&self, link: u32, n: &Neigh) -> Result<()> {
        let op = || format!("replace neigh {} lladdr {}", n.ip, n.mac);
        self.replace_neighbour(op, neigh_add_msg(link, n)).await
    }

    async fn delete_neigh(&self, link: u32, n: &Neigh) -> Result<()> {
        let req = self.nl.handle().neighbours().del(neigh_del_msg(link, n));
        self.delete(|| format!("delete neigh {}", n.ip), req.execute())
            .await
    }

    async fn replace_fdb(&self, link: u32, f: &Fdb) -> Result<()> {
        let op = || format!("replace fdb {} dst {}", f.mac, f.dst);
        self.replace_neighbour(op, fdb_add_msg(link, f)).await
    }

    async fn delete_fdb(&self, link: u32, f: &Fdb) -> Result<()> {
        let req = self.nl.handle().neighbours().del(fdb_del_msg(link, f));
        self.delete(
            || format!("delete fdb {} dst {}", f.mac, f.dst),
            req.execute(),
        )
        .await
    }

    async fn replace_route(&self, link: u32, r: &Route) -> Result<()> {
        // Replace only a route that is twill's, or that is on twill's own device (an older
        // twilld's route, with another protocol): anything else is a conflict.
        self.add_or_take_over(
            format!("replace route {} via {}", r.dst, r.via),
            IpNet::V4(r.dst),
            route_msg(link, r),
            |m| foreign_dst(m).or_else(|| on_link(m, link).map(|x| x.dst)) == Some(r.dst),
            |m| is_twills(m) || m.oif == Some(link),
        )
        .await
    }

    async fn delete_route(&self, link: u32, r: &Route) -> Result<()> {
        let req = self.nl.handle().route().del(route_del_msg(link, r));
        self.delete(|| format!("delete route {}", r.dst), req.execute())
            .await
    }

    async fn replace_direct(&self, r: &DirectRoute) -> Result<()> {
        // Replace only twill's own route (VXLAN or direct, on any device): the switch of a
        // peer between the two is this one replace, never a delete and an add.
        self.add_or_take_over(
            format!("replace route {} via {} dev index {}", r.dst, r.via, r.dev),
            IpNet::V4(r.dst),
            direct_msg(r),
            |m| m.dst == IpNet::V4(r.dst),
            is_twills,
        )
        .await
    }

    async fn delete_direct(&self, r: &DirectRoute) -> Result<()> {
        let req = self.nl.handle().route().del(direct_del_msg(r));
        self.delete(
            || format!("delete route {} dev index {}", r.dst, r.dev),
            req.execute(),
        )
        .await
    }

    async fn lookup_route(&self, ip: Ipv4Addr) -> Result<Option<RoutePath>> {
        // With a destination, RTM_GETROUTE is a lookup (one answer), not a dump.
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .build();
        let r: Result<Vec<RouteMessage>> = self
            .nl
            .run(
                || format!("look up the route to {ip}"),
                self.nl.handle().route().get(msg).execute().try_collect(),
            )
            .await;
        match r {
            Ok(msgs) => Ok(msgs.first().and_then(path_of)),
            // No route at all: the kernel answers with an error, not a message.
            Err(e) if matches!(e.errno(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => Ok(None),
            Err(e) => Err(e),
        }
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
            if parse::address(&m).local != Some(IpNet::V4(addr)) {
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
