//! DEL: remove the host veth (the kernel removes its peer in the pod netns with it) and
//! release the reservation. Idempotent: the netns may be gone, the interface missing, there
//! may be no prevResult and nothing reserved; the IP is always released.

use twill_dataplane::unlink::remove_link;
use twill_ipam::alloc::Allocator;

use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::Result;
use crate::{host_veth_name, lock_allocator};

pub fn del(conf: &NetConf, env: &CniEnv) -> Result<()> {
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let host = host_veth_name(cid, ifname);
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
    let other = released
        .as_ref()
        .and_then(|r| r.host_veth.clone())
        .filter(|h| *h != host);
    // Removing the host end is enough: the kernel takes the pod end with it, so the pod
    // netns is never entered. The kernel's answer to a deletion comes only after its
    // rcu_barrier() (netdev_run_todo: 15-35 ms here, most of a DEL), long after the pair is
    // gone from both namespaces; `remove_link` returns when it is gone and leaves that wait
    // to a child process.
    let removed = (|| {
        remove_link(&host)?;
        // A reservation written under another naming scheme: remove that veth too.
        if let Some(other) = &other {
            remove_link(other)?;
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
