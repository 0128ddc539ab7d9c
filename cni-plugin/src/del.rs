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

use twill_dataplane::cni::{Link, veth_alias};
use twill_dataplane::unlink::{Removal, get_link, remove_link_if};
use twill_ipam::alloc::Allocator;

use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::Result;
use crate::{host_veth_name, lock_allocator};

pub fn del(conf: &NetConf, env: &CniEnv) -> Result<()> {
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let host = host_veth_name(cid, ifname);
    let alias = veth_alias(cid, ifname);
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
    // The veth names the released reservation vouches for (made by this container's ADD).
    let named: Vec<String> = released
        .as_ref()
        .map(|r| {
            let mut v = vec![r.host_veth.clone().unwrap_or_else(|| host.clone())];
            if !v.contains(&host) {
                v.push(host.clone());
            }
            v
        })
        .unwrap_or_default();
    let other = released
        .as_ref()
        .and_then(|r| r.host_veth.clone())
        .filter(|h| *h != host);
    let bridge = conf.bridge.clone();
    let owned = |l: &Link| -> bool {
        if l.kind.as_deref() != Some("veth") {
            return false;
        }
        match &l.alias {
            Some(a) => *a == alias,
            // Made before aliases: the reservation names it and it is a port of the bridge.
            None => {
                named.contains(&l.name)
                    && get_link(&bridge).ok().flatten().is_some_and(|b| {
                        b.kind.as_deref() == Some("bridge") && l.controller == Some(b.index)
                    })
            }
        }
    };
    // Removing the host end is enough: the kernel takes the pod end with it, so the pod
    // netns is never entered. The kernel's answer to a deletion comes only after its
    // rcu_barrier() (netdev_run_todo: 15-35 ms here, most of a DEL), long after the pair is
    // gone from both namespaces; `remove_link_if` returns when it is gone and leaves that
    // wait to a child process.
    let removed = (|| {
        let mut names = vec![host.clone()];
        // A reservation written under another naming scheme: that veth too.
        names.extend(other.clone());
        for name in &names {
            if let Removal::Kept(l) = remove_link_if(name, owned)? {
                tracing::warn!(veth = %name, alias = ?l.alias, kind = ?l.kind, expected = %alias,
                    "a link has this container's host veth name but is not its veth: left alone");
            }
        }
        Ok::<_, twill_dataplane::Error>(())
    })();
    let committed = commit.and_then(|pending| pending.wait());
    removed?;
    committed?;
    if let Some(r) = &released {
        tracing::info!(container = cid, ifname, ip = %r.ip, "released");
    }
    Ok(())
}
