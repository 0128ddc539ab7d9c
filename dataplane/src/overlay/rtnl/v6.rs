//! The IPv6 device's verbs over rtnetlink (see [`crate::overlay::v6`]): a child of `rtnl`,
//! so that it shares its request helpers and ownership rules.

use std::net::{IpAddr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv6Net};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteType};

use super::{RtnlOverlay, fdb_add_msg, fdb_del_msg, fdb_on, is_twills, to_delete};
use crate::netlink::parse;
use crate::overlay::v6::{Neigh6, Op6, Programmed6, Route6, Vxlan6Spec, vxlan6_name};
use crate::overlay::{EnsureOutcome, TWILL_ROUTE_PROTOCOL, VxlanLink, VxlanSpec};
use crate::{Error, Result};

/// The IPv4 spec shape of `spec`, for the settings compared and created alike (the
/// address is not part of either).
fn shape(spec: &Vxlan6Spec) -> VxlanSpec {
    VxlanSpec {
        vni: spec.vni,
        port: spec.port,
        underlay_index: spec.underlay_index,
        local: IpAddr::V6(spec.local),
        mtu: spec.mtu,
        mac: spec.mac,
        address: std::net::Ipv4Addr::UNSPECIFIED,
    }
}

/// Link-local addresses are the kernel's own (fe80::/10): never removed.
fn is_link_local(ip: &Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

/// The IPv6 neighbour twill manages (permanent) in `n`, if it is on `link`.
pub(crate) fn neigh6_on(n: &parse::Neighbour, link: u32) -> Option<Neigh6> {
    if n.index != link || n.family != AddressFamily::Inet6 || n.state != NeighbourState::Permanent {
        return None;
    }
    match n.dst? {
        IpAddr::V6(ip) => Some(Neigh6 { ip, mac: n.mac? }),
        IpAddr::V4(_) => None,
    }
}

/// `r` as an IPv6 unicast route on `link`, whoever made it (no gateway: via = its own
/// network address, so that the diff replaces or deletes it).
fn on_link6(r: &parse::Route, link: u32) -> Option<Route6> {
    let IpNet::V6(dst) = r.dst else { return None };
    if r.kind != RouteType::Unicast || r.oif != Some(link) {
        return None;
    }
    let via = match r.gateway {
        Some(IpAddr::V6(g)) => g,
        _ => dst.network(),
    };
    Some(Route6 { dst, via })
}

/// `r` if it is twill's IPv6 route on `link`.
pub(crate) fn route6_on(r: &parse::Route, link: u32) -> Option<Route6> {
    if !is_twills(r) {
        return None;
    }
    on_link6(r, link)
}

fn route6_msg(link: u32, r: &Route6) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .gateway(r.via)
        .output_interface(link)
        // onlink: the gateway (the peer's IPv6 net address) is on no prefix of the device.
        .onlink()
        .protocol(RouteProtocol::Other(TWILL_ROUTE_PROTOCOL))
        .build()
}

fn route6_del_msg(link: u32, r: &Route6) -> RouteMessage {
    to_delete(route6_msg(link, r))
}

fn neigh6_msg(link: u32, n: &Neigh6, add: bool) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.ifindex = link;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(
            n.ip,
        )));
    if add {
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unspec;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
    }
    m
}

impl RtnlOverlay {
    /// The IPv6 VXLAN device of `vni` (its `addresses` are IPv4 ones: none), if any.
    pub async fn get_vxlan6(&self, vni: u32) -> Result<Option<VxlanLink>> {
        match self.link_by_name(&vxlan6_name(vni)).await? {
            Some(l) => Ok(Some(self.to_vxlan_link(l).await?)),
            None => Ok(None),
        }
    }

    /// The IPv6 addresses of link `index`, link-local ones left out.
    async fn v6_addresses(
        &self,
        index: u32,
    ) -> Result<Vec<(Ipv6Net, rtnetlink::packet_route::address::AddressMessage)>> {
        let msgs = self.nl.link_addresses(index).await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match parse::address(&m).own() {
                Some(IpNet::V6(net)) if !is_link_local(&net.addr()) => Some((net, m)),
                _ => None,
            })
            .collect())
    }

    /// [`crate::overlay::Overlay::ensure_vxlan`] for `twill-v6.<VNI>`: adopt, create or
    /// recreate it, then its /128 (other global IPv6 addresses removed) and up.
    pub async fn ensure_vxlan6(&self, spec: &Vxlan6Spec) -> Result<(VxlanLink, EnsureOutcome)> {
        let name = spec.name();
        let want = shape(spec);
        let (mut link, outcome) = match self.get_vxlan6(spec.vni).await? {
            Some(l) => match l.mismatch(&want) {
                None => (l, EnsureOutcome::Adopted),
                Some(reason) => {
                    self.delete_link(l.index, &name).await?;
                    self.create_vxlan_named(&name, &want).await?;
                    let l = self
                        .get_vxlan6(spec.vni)
                        .await?
                        .ok_or_else(|| Error::LinkNotFound(name.clone()))?;
                    (l, EnsureOutcome::Recreated { reason })
                }
            },
            None => {
                self.create_vxlan_named(&name, &want).await?;
                let l = self
                    .get_vxlan6(spec.vni)
                    .await?
                    .ok_or_else(|| Error::LinkNotFound(name.clone()))?;
                (l, EnsureOutcome::Created)
            }
        };
        if let Some(why) = link.mismatch(&want) {
            return Err(Error::Invalid(format!(
                "vxlan {name} created but the kernel reports different settings: {why}"
            )));
        }
        let addr = Ipv6Net::new(spec.address, 128).expect("/128 is valid");
        let mut have = false;
        for (net, msg) in self.v6_addresses(link.index).await? {
            if net == addr {
                have = true;
                continue;
            }
            self.nl
                .run(
                    || format!("delete address {net} from {name}"),
                    self.nl.handle().address().del(msg).execute(),
                )
                .await?;
        }
        if !have {
            let mut req = self
                .nl
                .handle()
                .address()
                .add(link.index, IpAddr::V6(spec.address), 128)
                .replace();
            // nodad: the address is this node's alone (its own subnet); without it the
            // address stays tentative (unusable as a source) for a second.
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            self.nl
                .run(|| format!("add address {addr} to {name}"), req.execute())
                .await?;
        }
        if !link.up {
            self.nl
                .run(
                    || format!("set {name} up"),
                    self.nl
                        .handle()
                        .link()
                        .set(
                            rtnetlink::LinkUnspec::new_with_index(link.index)
                                .up()
                                .build(),
                        )
                        .execute(),
                )
                .await?;
            link.up = true;
        }
        Ok((link, outcome))
    }

    pub(super) async fn route6_dump(&self) -> Result<Vec<RouteMessage>> {
        self.nl
            .run(
                || "dump IPv6 routes".into(),
                self.nl
                    .handle()
                    .route()
                    .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                    .execute()
                    .try_collect(),
            )
            .await
    }

    /// The entries twill manages on the IPv6 device `link`, and the IPv6 routes of others.
    pub async fn dump6(&self, link: u32) -> Result<Programmed6> {
        let mut p = Programmed6::default();
        for m in self.neigh_dump(AddressFamily::Inet6).await? {
            if let Some(n) = neigh6_on(&parse::neighbour(&m), link) {
                p.neighs.insert(n);
            }
        }
        for m in self.neigh_dump(AddressFamily::Bridge).await? {
            if let Some(f) = fdb_on(&parse::neighbour(&m), link) {
                p.fdbs.insert(f);
            }
        }
        for r in self.route6_dump().await?.iter().filter_map(parse::route) {
            if let Some(x) = route6_on(&r, link) {
                p.routes.insert(x);
            } else if let IpNet::V6(dst) = r.dst
                && !is_twills(&r)
                && r.oif != Some(link)
                // The kernel's own local and multicast routes are in other tables or types.
                && r.kind == RouteType::Unicast
            {
                p.foreign_routes.insert(dst);
            }
        }
        Ok(p)
    }

    async fn replace_route6(&self, link: u32, r: &Route6) -> Result<()> {
        // As for IPv4: twill's route, or one on twill's own device, is replaced.
        self.add_or_take_over(
            format!("replace route {} via {}", r.dst, r.via),
            IpNet::V6(r.dst),
            route6_msg(link, r),
            |m| m.dst == IpNet::V6(r.dst),
            |m| is_twills(m) || m.oif == Some(link),
        )
        .await
    }

    async fn apply6(&self, link: u32, op: &Op6) -> Result<()> {
        match op {
            Op6::ReplaceNeigh(n) => {
                self.replace_neighbour(|| op.to_string(), neigh6_msg(link, n, true))
                    .await
            }
            Op6::ReplaceFdb(f) => {
                self.replace_neighbour(|| op.to_string(), fdb_add_msg(link, f))
                    .await
            }
            Op6::ReplaceRoute(r) => self.replace_route6(link, r).await,
            Op6::DeleteRoute(r) => {
                let req = self.nl.handle().route().del(route6_del_msg(link, r));
                self.delete(|| op.to_string(), req.execute()).await
            }
            Op6::DeleteNeigh(n) => {
                let req = self
                    .nl
                    .handle()
                    .neighbours()
                    .del(neigh6_msg(link, n, false));
                self.delete(|| op.to_string(), req.execute()).await
            }
            Op6::DeleteFdb(f) => {
                let req = self.nl.handle().neighbours().del(fdb_del_msg(link, f));
                self.delete(|| op.to_string(), req.execute()).await
            }
        }
    }

    /// Applies `ops` on the IPv6 device `link`, stage by stage (see [`Op6::stage`]), one
    /// request at a time; returns the ops that failed.
    pub async fn apply_ops6(&self, link: u32, ops: &[Op6]) -> Vec<(Op6, Error)> {
        let mut failed = Vec::new();
        for stage in 0..3 {
            for op in ops.iter().filter(|o| o.stage() == stage) {
                if let Err(e) = self.apply6(link, op).await {
                    failed.push((*op, e));
                }
            }
        }
        failed
    }
}
