//! GC: release every reservation whose (container ID, ifname) is not in
//! `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), delete their host
//! veths, and delete veth ports of the bridge that belong to no reservation. A link is
//! deleted only when it proves itself twill's: its alias names the released (container,
//! ifname), or, for a veth made before aliases, the released reservation names it and it is
//! an untagged veth port of the bridge. An orphan port (no reservation) is deleted only when
//! its alias is twill's, names no valid attachment and no reservation, and its name is
//! the one twill gives that attachment's veth.

use std::collections::HashSet;

use twill_dataplane::pod::{
    BridgeRef, PodDataplane, RtnlPod, VethOwner, parse_veth_alias, veth_alias,
};
use twill_ipam::alloc::{Allocator, Reservation};

use crate::config::NetConf;
use crate::error::{CniError, Result, code};
use crate::{block_on, host_veth_name, lock_allocator, require_version};

pub fn gc(conf: &NetConf) -> Result<()> {
    require_version(conf, "GC", "1.1.0")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (an empty list releases everything)",
        )
    })?;
    let valid: HashSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let alloc = Allocator::new(&conf.data_dir, &conf.name);
    let mut locked = lock_allocator(&alloc)?;
    let gone =
        locked.release_unless(|r| valid.contains(&(r.container_id.as_str(), r.ifname.as_str())));
    // Host veths that are still someone's: the remaining reservations' and the valid
    // attachments' (an ADD may be under way).
    let mut keep: HashSet<String> = locked
        .reservations()
        .iter()
        .map(|r| {
            r.host_veth
                .clone()
                .unwrap_or_else(|| host_veth_name(&r.container_id, &r.ifname))
        })
        .collect();
    keep.extend(valid.iter().map(|(c, i)| host_veth_name(c, i)));
    let reserved: HashSet<(String, String)> = locked
        .reservations()
        .iter()
        .map(|r| (r.container_id.clone(), r.ifname.clone()))
        .collect();
    locked.commit()?;
    for r in &gone {
        tracing::info!(container = %r.container_id, ifname = %r.ifname, ip = %r.ip, ipv6 = ?r.ipv6, "gc: released");
    }
    let sweep = Sweep {
        bridge: &conf.bridge,
        gone: &gone,
        keep: &keep,
        valid: &valid,
        reserved: &reserved,
    };
    block_on(sweep.run(&RtnlPod::current()))??;
    Ok(())
}

/// The kernel part of GC: what was released and what is still someone's.
pub(crate) struct Sweep<'a> {
    pub bridge: &'a str,
    /// The reservations GC released.
    pub gone: &'a [Reservation],
    /// Host veth names that are still someone's.
    pub keep: &'a HashSet<String>,
    /// The valid attachments (container ID, ifname).
    pub valid: &'a HashSet<(&'a str, &'a str)>,
    /// The (container ID, ifname) that still hold a reservation.
    pub reserved: &'a HashSet<(String, String)>,
}

impl Sweep<'_> {
    /// Deletes, over any [`PodDataplane`], the host veths of the released reservations and
    /// the stale twill veths on the bridge, each only when it proves itself twill's.
    pub(crate) async fn run(&self, node: &impl PodDataplane) -> twill_dataplane::Result<()> {
        let br = node
            .link(self.bridge)
            .await?
            .filter(|l| l.kind.as_deref() == Some("bridge"));
        for r in self.gone {
            let name = r
                .host_veth
                .clone()
                .unwrap_or_else(|| host_veth_name(&r.container_id, &r.ifname));
            let Some(l) = node.link(&name).await? else {
                continue;
            };
            // The released reservation names the veth: its alias must say it is that
            // container's, or (made before aliases) it must be an untagged veth port of the
            // bridge.
            let owner = VethOwner {
                alias: veth_alias(&r.container_id, &r.ifname),
                untagged_port_of: br.as_ref().map(|b| BridgeRef::Index(b.index)),
            };
            if owner.owns(&l, |_| None) {
                node.delete_link(&name).await?;
            } else {
                tracing::warn!(veth = %name, alias = ?l.alias, expected = %owner.alias,
                    "gc: a link has the released reservation's veth name but is not its veth: left alone");
            }
        }
        let Some(br) = br else { return Ok(()) };
        for port in node.bridge_ports(br.index).await? {
            if port.kind.as_deref() != Some("veth") || self.keep.contains(&port.name) {
                continue;
            }
            // Only a port that proves itself twill's, and stale: its alias names a
            // (container, ifname) that is neither valid nor reserved, and its name is the
            // one twill gives that (container, ifname)'s veth.
            match port.alias.as_deref().and_then(parse_veth_alias) {
                Some((c, i))
                    if port.name == host_veth_name(c, i)
                        && !self.valid.contains(&(c, i))
                        && !self.reserved.contains(&(c.to_string(), i.to_string())) =>
                {
                    tracing::info!(veth = %port.name, container = c, ifname = i, "gc: removing stale host veth");
                    node.delete_link(&port.name).await?;
                }
                Some(_) => {}
                None if port.alias.is_none() => tracing::warn!(veth = %port.name,
                    "gc: an untagged veth port of the bridge that no reservation names: left alone"),
                None => tracing::warn!(veth = %port.name, alias = ?port.alias,
                    "gc: a veth port of the bridge that twill cannot prove its own: left alone"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use twill_dataplane::pod::fake::Recording;

    use super::*;

    fn reservation(cid: &str, host_veth: Option<&str>) -> Reservation {
        Reservation {
            ip: "10.244.3.2".parse().unwrap(),
            ipv6: None,
            container_id: cid.into(),
            ifname: "eth0".into(),
            host_veth: host_veth.map(str::to_string),
            netns: None,
            pod_namespace: None,
            pod_name: None,
        }
    }

    /// A node fake with bridge cni0 and the veth twill makes for `cid`, on the bridge, with
    /// `alias` (twill's own by default).
    fn veth_of(node: &Recording, cid: &str, alias: Option<&str>) -> String {
        if !node.has_link("cni0") {
            node.add_link("cni0", "bridge");
        }
        let name = host_veth_name(cid, "eth0");
        node.add_link(&name, "veth");
        // cni0 is the fake's first link: index 2.
        node.set_link(&name, alias, Some(2));
        name
    }

    fn run(node: &Recording, gone: &[Reservation], valid: &[(&str, &str)], reserved: &[&str]) {
        let keep: HashSet<String> = reserved
            .iter()
            .map(|c| host_veth_name(c, "eth0"))
            .chain(valid.iter().map(|(c, i)| host_veth_name(c, i)))
            .collect();
        let valid: HashSet<(&str, &str)> = valid.iter().copied().collect();
        let reserved: HashSet<(String, String)> = reserved
            .iter()
            .map(|c| (c.to_string(), "eth0".to_string()))
            .collect();
        let sweep = Sweep {
            bridge: "cni0",
            gone,
            keep: &keep,
            valid: &valid,
            reserved: &reserved,
        };
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(sweep.run(node))
            .unwrap();
    }

    #[test]
    fn a_released_reservations_veth_goes_only_if_it_is_its_own() {
        let node = Recording::new();
        let a = veth_of(&node, "a", Some("twill:a/eth0"));
        let b = veth_of(&node, "b", Some("twill:someone/eth0"));
        let c = veth_of(&node, "c", None);
        run(
            &node,
            &[
                reservation("a", None),
                reservation("b", None),
                reservation("c", Some(&c)),
            ],
            &[],
            &[],
        );
        assert!(!node.has_link(&a), "tagged as its own");
        assert!(node.has_link(&b), "another's alias: kept");
        assert!(
            !node.has_link(&c),
            "untagged, on the bridge, named by the reservation"
        );
    }

    #[test]
    fn a_stale_port_goes_and_valid_reserved_or_unproven_ones_stay() {
        let node = Recording::new();
        let stale = veth_of(&node, "s", Some("twill:s/eth0"));
        let valid = veth_of(&node, "v", Some("twill:v/eth0"));
        let reserved = veth_of(&node, "r", Some("twill:r/eth0"));
        let untagged = veth_of(&node, "u", None);
        let foreign = veth_of(&node, "f", Some("not twill's"));
        // twill's alias, but not the name twill gives that attachment.
        node.add_link("vethother", "veth");
        node.set_link("vethother", Some("twill:o/eth0"), Some(2));
        run(&node, &[], &[("v", "eth0")], &["r"]);
        assert!(!node.has_link(&stale));
        for kept in [valid, reserved, untagged, foreign, "vethother".into()] {
            assert!(node.has_link(&kept), "{kept}");
        }
    }

    #[test]
    fn without_the_bridge_only_tagged_released_veths_go() {
        let node = Recording::new();
        let name = host_veth_name("a", "eth0");
        node.add_link(&name, "veth");
        run(&node, &[reservation("a", None)], &[], &[]);
        assert!(node.has_link(&name), "untagged and no bridge: kept");
        node.set_link(&name, Some("twill:a/eth0"), None);
        run(&node, &[reservation("a", None)], &[], &[]);
        assert!(!node.has_link(&name));
        assert!(!node.calls().iter().any(|c| c.starts_with("bridge_ports")));
    }
}
