//! DEL: remove the host veth (the kernel removes its peer in the pod netns with it) and
//! release the reservation. Idempotent: the netns may be gone, the interface missing, there
//! may be no prevResult and nothing reserved; the IP is always released.

use twill_dataplane::cni::{CniDataplane, RtnlCni};
use twill_ipam::alloc::Allocator;

use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::Result;
use crate::{block_on, host_veth_name, lock_allocator};

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
            // The release is written (fsync + rename) on its own thread while the kernel
            // removes the veth.
            (released, Ok(std::thread::spawn(move || locked.commit())))
        }
        Err(e) => (None, Err(e)),
    };
    let other = released
        .as_ref()
        .and_then(|r| r.host_veth.clone())
        .filter(|h| *h != host);
    // Deleting one end is enough: the kernel's veth teardown takes both ends, so the pod
    // netns is never entered. The request returns once the kernel's rcu_barrier() after
    // unregistering the pair has run (netdev_run_todo): 15-35 ms here, most of any DEL.
    let deleted = block_on(async {
        let node = RtnlCni::current()?;
        node.delete_link(&host).await?;
        // A reservation written under another naming scheme: remove that veth too.
        if let Some(other) = &other {
            node.delete_link(other).await?;
        }
        Ok::<_, twill_dataplane::Error>(())
    });
    let committed = commit.and_then(|c| {
        c.join().unwrap_or_else(|_| {
            Err(twill_ipam::alloc::AllocError::Io {
                path: alloc.state_path(),
                source: std::io::Error::other("commit thread panicked"),
            })
        })
    });
    deleted??;
    committed?;
    if let Some(r) = &released {
        tracing::info!(container = cid, ifname, ip = %r.ip, "released");
    }
    Ok(())
}
