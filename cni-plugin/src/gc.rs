//! GC: release every reservation whose (container ID, ifname) is not in
//! `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), delete their host
//! veths, and delete veth ports of the bridge that belong to no reservation.

use std::collections::HashSet;

use twill_dataplane::cni::{CniDataplane, RtnlCni};
use twill_ipam::alloc::Allocator;

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
    locked.commit()?;
    for r in &gone {
        tracing::info!(container = %r.container_id, ifname = %r.ifname, ip = %r.ip, "gc: released");
    }
    let bridge = conf.bridge.clone();
    block_on(async move {
        let node = RtnlCni::current()?;
        for r in &gone {
            let name = r
                .host_veth
                .clone()
                .unwrap_or_else(|| host_veth_name(&r.container_id, &r.ifname));
            node.delete_link(&name).await?;
        }
        if let Some(br) = node.link(&bridge).await? {
            for port in node.bridge_ports(br.index).await? {
                if port.kind.as_deref() == Some("veth") && !keep.contains(&port.name) {
                    tracing::info!(veth = %port.name, "gc: removing stale host veth");
                    node.delete_link(&port.name).await?;
                }
            }
        }
        Ok::<_, twill_dataplane::Error>(())
    })??;
    Ok(())
}
