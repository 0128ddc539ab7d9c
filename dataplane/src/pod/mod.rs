//! The kernel verbs of a pod's network: the node bridge, the pod's veth pair, the pod's
//! addresses and routes, and the lookups and removals that CHECK, DEL and GC need. Split like
//! [`crate::overlay`]: the types and the trait here, the rtnetlink implementation in
//! [`rtnl`], a recording fake in `fake` (only with `cfg(test)` or the `fakes` feature).
//!
//! [`PodDataplane`] is the small trait of domain verbs; [`RtnlPod`] implements it over one
//! rtnetlink socket bound to one namespace (the node's or the pod's). A CNI plugin uses one
//! for the node namespace (the one it runs in) and one inside the pod namespace.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{NetNs, Result};

#[cfg(any(test, feature = "fakes"))]
pub mod fake;
pub mod rtnl;
mod undo;

pub use crate::netlink::parse::{Link, Route};
pub use crate::unlink::Removal;
pub use rtnl::RtnlPod;
pub use twill_ipam::mac::Mac;
pub use undo::Undo;

/// One pod attachment, as the runtime names it: built once per invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub container_id: String,
    /// The interface inside the pod (CNI_IFNAME).
    pub ifname: String,
    /// The pod's network namespace (a path), when the runtime gave one.
    pub netns: Option<String>,
    /// The host end of the pod's veth.
    pub host_veth: String,
}

impl Pod {
    /// The alias of the pod's host veth: [`veth_alias`].
    pub fn alias(&self) -> String {
        veth_alias(&self.container_id, &self.ifname)
    }
}

/// The bridge's fixed MAC, derived from its gateway: `0a:58` (locally administered, unicast)
/// followed by the IPv4 address, as Kubernetes' kubenet and OVN do. Stable across restarts,
/// so pods' neighbour entries for the gateway never go stale.
pub fn bridge_mac(gateway: IpAddr) -> Mac {
    let o = match gateway {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let s = a.octets();
            [s[12], s[13], s[14], s[15]]
        }
    };
    Mac([0x0a, 0x58, o[0], o[1], o[2], o[3]])
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

/// The bridge an untagged veth must be a port of to count as twill's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeRef {
    /// Known by index (already looked up).
    Index(u32),
    /// Known by name: looked up only when an untagged veth is found.
    Name(String),
}

/// When a link proves to be the host veth twill made for one attachment: a veth whose alias
/// is exactly `alias`, or, from a twill before aliases, an untagged veth that is a port of
/// `untagged_port_of` (only when the caller has other proof, a reservation naming it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethOwner {
    pub alias: String,
    pub untagged_port_of: Option<BridgeRef>,
}

impl VethOwner {
    /// Whether `l` is the veth; `lookup` finds a bridge by name (for [`BridgeRef::Name`]).
    pub fn owns(&self, l: &Link, lookup: impl FnOnce(&str) -> Option<Link>) -> bool {
        if l.kind.as_deref() != Some("veth") {
            return false;
        }
        match (&l.alias, &self.untagged_port_of) {
            (Some(a), _) => *a == self.alias,
            (None, None) => false,
            (None, Some(BridgeRef::Index(i))) => l.controller == Some(*i),
            (None, Some(BridgeRef::Name(n))) => lookup(n).is_some_and(|b| {
                b.kind.as_deref() == Some("bridge") && l.controller == Some(b.index)
            }),
        }
    }
}

/// A pod's veth pair, as [`PodDataplane::attach_pod`] makes it.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    /// The host end: its name and MAC; it becomes a port of the bridge, up.
    pub host_name: &'a str,
    pub host_mac: Mac,
    /// The host end's alias (IFLA_IFALIAS), [`veth_alias`]: what proves it twill's later.
    pub host_alias: &'a str,
    /// The pod end, created directly inside `pod_ns`, down.
    pub pod_ns: &'a NetNs,
    pub pod_ifname: &'a str,
    pub pod_mac: Mac,
    /// Both ends.
    pub mtu: u32,
    /// Hairpin mode on the host end's bridge port.
    pub hairpin: bool,
}

/// One address of a pod and the routes that go via its gateway: one per family on a
/// dual-stack pod ([`PodDataplane::configure_pod`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddr {
    /// The pod's address, ip/len.
    pub addr: IpNet,
    /// The gateway (the bridge's address of this family).
    pub gateway: IpAddr,
    /// The routes via `gateway`, of this family.
    pub routes: Vec<IpNet>,
}

/// What [`PodDataplane::attach_pod`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVeth {
    /// The host end, as the kernel reports it.
    pub host: Link,
    /// The index of the pod end inside the pod namespace.
    pub pod_index: u32,
}

/// The domain verbs of a pod's network, on one namespace.
#[allow(async_fn_in_trait)]
pub trait PodDataplane {
    /// The bridge `name`, created (with `mac`, `mtu`, up) if missing, brought up if down.
    /// A link of that name that is not a bridge is [`crate::Error::Invalid`], and is left
    /// alone.
    async fn ensure_bridge(&self, name: &str, mac: Mac, mtu: u32) -> Result<Link>;
    /// The node side of a pod, in two round trips to the kernel: each of `gateways`
    /// (gateway/len, one per family; IPv6 ones without DAD) on `bridge` (already there is
    /// fine), the veth pair of `spec` (the pod end born inside the
    /// pod namespace) and the host end read back; then, by the new link's index, its alias
    /// and hairpin on its bridge port. If the veth was made but a later step failed, it is
    /// removed before the error is returned. A veth whose host name (or pod ifname) is taken
    /// fails with EEXIST, and nothing is done to the link that has the name.
    async fn attach_pod(
        &self,
        bridge: &Link,
        gateways: &[IpNet],
        spec: &VethSpec<'_>,
    ) -> Result<AttachedVeth>;
    /// The pod side, in one round trip: link `index` up, each of `addrs`' address on it
    /// (IPv6 ones without DAD, so none is left "tentative"), and a route to each of its
    /// routes via its gateway (replacing one that is there).
    async fn configure_pod(&self, index: u32, addrs: &[PodAddr]) -> Result<()>;
    /// Brings the link with index `index` up.
    async fn set_up(&self, index: u32) -> Result<()>;
    /// The link called `name`, if any.
    async fn link(&self, name: &str) -> Result<Option<Link>>;
    /// Deletes the link called `name` and waits for the kernel's answer; `Ok(false)` if
    /// there was none.
    async fn delete_link(&self, name: &str) -> Result<bool>;
    /// Every link that is a port of the bridge with index `bridge`.
    async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>>;
    /// The addresses on the link with index `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>>;
    /// The main table's routes of the family of `family_of`.
    async fn routes(&self, family_of: IpAddr) -> Result<Vec<Route>>;
    /// Removes the link called `name` now, without a runtime, returning once the kernel has
    /// unlisted it ([`crate::unlink`]); `Ok(false)` if there was none. The undo of an ADD.
    /// [`RtnlPod`] acts here in the calling thread's namespace (the node's), whatever
    /// namespace its socket is in: a node-side verb.
    fn remove_link_now(&self, name: &str) -> Result<bool>;
    /// [`PodDataplane::remove_link_now`] of the link called `name` only if `owner` owns it
    /// (as the kernel reports it at the time); a link it does not own is left alone and
    /// returned. DEL's verb.
    fn remove_veth(&self, name: &str, owner: &VethOwner) -> Result<Removal>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_mac_is_local_unicast_and_stable() {
        let m = bridge_mac("10.244.3.1".parse().unwrap());
        assert_eq!(m.to_string(), "0a:58:0a:f4:03:01");
        assert_eq!(m.0[0] & 0x02, 0x02, "locally administered");
        assert_eq!(m.0[0] & 0x01, 0, "unicast");
    }

    fn veth(alias: Option<&str>, controller: Option<u32>) -> Link {
        Link {
            index: 9,
            name: "vethabc".into(),
            mac: Some(Mac([2, 0, 0, 0, 0, 9])),
            mtu: Some(1450),
            up: true,
            controller,
            kind: Some("veth".into()),
            peer: Some(2),
            alias: alias.map(str::to_string),
            vxlan: None,
        }
    }

    #[test]
    fn an_owner_owns_its_tagged_veth_and_an_untagged_one_only_on_its_bridge() {
        let bridge = |index| {
            let mut b = veth(None, None);
            b.kind = Some("bridge".into());
            b.index = index;
            b
        };
        let no_lookup = |_: &str| -> Option<Link> { panic!("no lookup expected") };
        let mut o = VethOwner {
            alias: "twill:c1/eth0".into(),
            untagged_port_of: None,
        };
        assert!(o.owns(&veth(Some("twill:c1/eth0"), None), no_lookup));
        assert!(!o.owns(&veth(Some("twill:c2/eth0"), Some(7)), no_lookup));
        assert!(!o.owns(&veth(None, Some(7)), no_lookup));
        let mut dummy = veth(Some("twill:c1/eth0"), None);
        dummy.kind = Some("dummy".into());
        assert!(!o.owns(&dummy, no_lookup));

        o.untagged_port_of = Some(BridgeRef::Index(7));
        assert!(o.owns(&veth(None, Some(7)), no_lookup));
        assert!(!o.owns(&veth(None, Some(8)), no_lookup));
        o.untagged_port_of = Some(BridgeRef::Name("cni0".into()));
        assert!(o.owns(&veth(None, Some(7)), |n| (n == "cni0").then(|| bridge(7))));
        assert!(!o.owns(&veth(None, Some(7)), |_| None));
        // The name is held by something that is not a bridge.
        assert!(!o.owns(&veth(None, Some(9)), |_| Some(veth(None, None))));
    }

    #[test]
    fn a_veth_alias_parses_back() {
        let a = veth_alias("c1", "eth0");
        assert_eq!(parse_veth_alias(&a), Some(("c1", "eth0")));
        assert_eq!(parse_veth_alias("twill:c1"), None);
        assert_eq!(parse_veth_alias("other:c1/eth0"), None);
    }
}
