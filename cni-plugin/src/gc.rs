//! GC: release every reservation whose (container ID, ifname) is not in
//! `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), delete their host
//! veths, and delete veth ports of the bridge that belong to no reservation. A link is
//! deleted only when it proves itself twill's: its alias names the released (container,
//! ifname), or, for a veth made before aliases, the released reservation names it and it is
//! an untagged veth port of the bridge. An orphan port (no reservation) is deleted only when
//! its alias is twill's, names no valid attachment and no reservation, and its name is
//! the one twill gives that attachment's veth.

use std::collections::HashSet;

use twill_dataplane::cni::{CniDataplane, RtnlCni, parse_veth_alias, veth_alias};
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
    let reserved: HashSet<(String, String)> = locked
        .reservations()
        .iter()
        .map(|r| (r.container_id.clone(), r.ifname.clone()))
        .collect();
    locked.commit()?;
    for r in &gone {
        tracing::info!(container = %r.container_id, ifname = %r.ifname, ip = %r.ip, "gc: released");
    }
    let bridge = conf.bridge.clone();
    block_on(async move {
        let node = RtnlCni::current()?;
        let br = node
            .link(&bridge)
            .await?
            .filter(|l| l.kind.as_deref() == Some("bridge"));
        for r in &gone {
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
            let want = veth_alias(&r.container_id, &r.ifname);
            let ours = l.kind.as_deref() == Some("veth")
                && match &l.alias {
                    Some(a) => *a == want,
                    None => br.as_ref().is_some_and(|b| l.controller == Some(b.index)),
                };
            if ours {
                node.delete_link(&name).await?;
            } else {
                tracing::warn!(veth = %name, alias = ?l.alias, expected = %want,
                    "gc: a link has the released reservation's veth name but is not its veth: left alone");
            }
        }
        if let Some(br) = br {
            for port in node.bridge_ports(br.index).await? {
                if port.kind.as_deref() != Some("veth") || keep.contains(&port.name) {
                    continue;
                }
                // Only a port that proves itself twill's, and stale: its alias names a
                // (container, ifname) that is neither valid nor reserved, and its name is
                // the one twill gives that (container, ifname)'s veth.
                match port.alias.as_deref().and_then(parse_veth_alias) {
                    Some((c, i))
                        if port.name == host_veth_name(c, i)
                            && !valid.contains(&(c, i))
                            && !reserved.contains(&(c.to_string(), i.to_string())) =>
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
        }
        Ok::<_, twill_dataplane::Error>(())
    })??;
    Ok(())
}
