//! DEL: remove the host veth (the kernel removes its peer in the pod netns with it) and
//! release the reservation. Idempotent: the netns may be gone, the interface missing, there
//! may be no prevResult and nothing reserved; the IP is always released.
//!
//! DEL never enters CNI_NETNS (it is not even opened), so a CNI_NETNS that is the node's own
//! namespace, or no namespace at all, changes nothing on the host: the only link DEL deletes
//! is the host veth, and only when it proves to be this container's (its alias, or, for a
//! veth made before aliases, the released reservation names it and it is an untagged veth
//! port of the bridge). A link of that name that is someone else's is left alone and logged;
//! DEL still succeeds, as the spec asks of a DEL with nothing (of its own) to remove.
//! `prevResult` is not read by DEL: one that does not decode is tolerated.

use twill_dataplane::pod::{BridgeRef, Pod, PodDataplane, Removal, RtnlPod, VethOwner};
use twill_ipam::alloc::{Allocator, Reservation};

use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::Result;
use crate::lock_allocator;

pub fn del(conf: &NetConf, env: &CniEnv) -> Result<()> {
    let pod = env.pod()?;
    let (cid, ifname) = (&*pod.container_id, &*pod.ifname);
    let alloc = Allocator::new(&conf.data_dir, &conf.name);
    // An unreadable allocator must not keep the pod's veth alive: it is removed anyway, and
    // the allocator's error is reported after that.
    let (released, commit) = match lock_allocator(&alloc) {
        Ok(mut locked) => {
            let released = locked.release(cid, ifname);
            // The release is written on its own thread while the veth is removed.
            (released, Ok(locked.commit_in_background()))
        }
        Err(e) => (None, Err(e)),
    };
    // Removing the host end is enough: the kernel takes the pod end with it, so the pod
    // netns is never entered. The kernel's answer to a deletion comes only after its
    // rcu_barrier() (most of a DEL: docs/benchmarks.md), long after the pair is gone from
    // both namespaces; `remove_veth` returns when it is gone and leaves that wait to a child
    // process. No runtime and no rtnetlink socket are needed for it.
    let removed = remove_veths(&RtnlPod::current(), &pod, released.as_ref(), &conf.bridge);
    let committed = commit.and_then(|pending| pending.wait());
    removed?;
    committed?;
    if let Some(r) = &released {
        tracing::info!(container = cid, ifname, ip = %r.ip, ipv6 = ?r.ipv6, "released");
    }
    Ok(())
}

/// The kernel part of DEL, over any [`PodDataplane`]: removes `pod`'s host veth, and the one
/// the `released` reservation names if that is another, each only if it proves to be this
/// container's: its alias, or (made before aliases) an untagged veth port of `bridge` when
/// the released reservation vouches for it. Another link of the name is left alone, logged.
pub(crate) fn remove_veths(
    node: &impl PodDataplane,
    pod: &Pod,
    released: Option<&Reservation>,
    bridge: &str,
) -> twill_dataplane::Result<()> {
    let owner = VethOwner {
        alias: pod.alias(),
        untagged_port_of: released.map(|_| BridgeRef::Name(bridge.to_string())),
    };
    let mut names = vec![pod.host_veth.clone()];
    // A reservation written under another naming scheme: that veth too.
    names.extend(
        released
            .and_then(|r| r.host_veth.clone())
            .filter(|h| *h != pod.host_veth),
    );
    for name in &names {
        if let Removal::Kept(l) = node.remove_veth(name, &owner)? {
            tracing::warn!(veth = %name, alias = ?l.alias, kind = ?l.kind, expected = %owner.alias,
                "a link has this container's host veth name but is not its veth: left alone");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use twill_dataplane::pod::fake::Recording;

    use super::*;
    use crate::tests::pod;

    fn reservation(host_veth: Option<&str>) -> Reservation {
        Reservation {
            ip: "10.244.3.2".parse().unwrap(),
            ipv6: None,
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_veth: host_veth.map(str::to_string),
            netns: None,
            pod_namespace: None,
            pod_name: None,
        }
    }

    #[test]
    fn the_tagged_host_veth_goes_and_a_missing_one_is_fine() {
        let f = Recording::new();
        f.add_link("vethabc", "veth");
        f.set_link("vethabc", Some("twill:c1/eth0"), None);
        remove_veths(&f, &pod(), None, "cni0").unwrap();
        assert!(!f.has_link("vethabc"));
        // Again: nothing there, still fine (DEL is idempotent).
        remove_veths(&f, &pod(), None, "cni0").unwrap();
        assert_eq!(f.calls(), ["remove_veth vethabc", "remove_veth vethabc"]);
    }

    #[test]
    fn someone_elses_link_of_the_name_is_left_alone() {
        for (alias, kind) in [
            (Some("twill:other/eth0"), "veth"),
            (Some("someone else's"), "veth"),
            (Some("twill:c1/eth0"), "dummy"),
            (None, "veth"),
        ] {
            let f = Recording::new();
            f.add_link("vethabc", kind);
            f.set_link("vethabc", alias, None);
            remove_veths(&f, &pod(), None, "cni0").unwrap();
            assert!(f.has_link("vethabc"), "{alias:?} {kind}");
        }
    }

    /// An untagged veth (a twill before aliases) goes only when the released reservation
    /// vouches for it and it is a port of the bridge; the reservation's own veth name too.
    #[test]
    fn an_untagged_veth_goes_only_with_a_reservation_and_on_the_bridge() {
        let f = Recording::new();
        let br = f.add_link("cni0", "bridge");
        f.add_link("vethabc", "veth");
        f.set_link("vethabc", None, Some(br.index));
        remove_veths(&f, &pod(), None, "cni0").unwrap();
        assert!(f.has_link("vethabc"), "no reservation: kept");
        f.add_link("vethold", "veth");
        f.set_link("vethold", None, Some(br.index));
        let r = reservation(Some("vethold"));
        remove_veths(&f, &pod(), Some(&r), "cni0").unwrap();
        assert!(!f.has_link("vethabc"));
        assert!(!f.has_link("vethold"));

        let f = Recording::new();
        f.add_link("cni0", "bridge");
        f.add_link("vethabc", "veth");
        remove_veths(&f, &pod(), Some(&reservation(None)), "cni0").unwrap();
        assert!(f.has_link("vethabc"), "not a port of the bridge: kept");
    }

    #[test]
    fn a_kernel_error_is_returned() {
        let f = Recording::new();
        f.fail_next("remove_veth", libc::EPERM);
        let e = remove_veths(&f, &pod(), None, "cni0").unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM));
    }
}
