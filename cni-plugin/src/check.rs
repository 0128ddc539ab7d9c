//! CHECK: the pod's interface, its IP and routes, the host veth on the bridge and the
//! reservation, against `prevResult`. Fails (code 120) with a message that names what is
//! missing.

use twill_dataplane::cni::{CniDataplane, RtnlCni, format_mac};
use twill_ipam::alloc::Allocator;

use crate::add::{decode_prev_result, open_netns};
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::{CniError, Result, code};
use crate::{block_on, host_veth_name, read_subnet_file, require_version};

fn failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

pub fn check(conf: &NetConf, env: &CniEnv) -> Result<()> {
    require_version(conf, "CHECK", "0.4.0")?;
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = decode_prev_result(prev)?;
    read_subnet_file(&conf.subnet_file)?;

    let res = Allocator::new(&conf.data_dir, &conf.name)
        .lock()?
        .get(cid, ifname)
        .cloned()
        .ok_or_else(|| {
            failed(format!(
                "no IP reservation for container {cid} ifname {ifname} in {}",
                conf.data_dir.display()
            ))
        })?;
    let idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            failed(format!(
                "prevResult has no interface {ifname} with a sandbox"
            ))
        })?;
    let want_if = &prev.interfaces[idx];
    let ips: Vec<_> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(idx))
        .collect();
    if !ips.iter().any(|ip| ip.address.addr() == res.ip) {
        return Err(failed(format!(
            "reserved IP {} of container {cid} is not in prevResult's ips",
            res.ip
        )));
    }
    let ns = open_netns(netns_path)?;
    let host = res
        .host_veth
        .clone()
        .unwrap_or_else(|| host_veth_name(cid, ifname));

    block_on(async {
        let pod = RtnlCni::open(&ns)?;
        let link = pod.link(ifname).await?.ok_or_else(|| {
            failed(format!(
                "interface {ifname} not found in netns {netns_path}"
            ))
        })?;
        if !link.up {
            return Err(failed(format!(
                "interface {ifname} in netns {netns_path} is down"
            )));
        }
        if let Some(mac) = &want_if.mac
            && !mac.eq_ignore_ascii_case(&format_mac(&link.mac))
        {
            return Err(failed(format!(
                "interface {ifname} has MAC {}, prevResult says {mac}",
                format_mac(&link.mac)
            )));
        }
        let addrs = pod.addresses(link.index).await?;
        for ip in &ips {
            if !addrs.contains(&ip.address) {
                return Err(failed(format!(
                    "address {} missing on {ifname} in netns {netns_path}",
                    ip.address
                )));
            }
        }
        if let Some(first) = ips.first() {
            let routes = pod.routes(first.address.addr()).await?;
            for r in &prev.routes {
                if r.dst.addr().is_ipv4() != first.address.addr().is_ipv4() {
                    continue;
                }
                let found = routes
                    .iter()
                    .any(|have| have.dst == r.dst && (r.gw.is_none() || have.gateway == r.gw));
                if !found {
                    let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
                    return Err(failed(format!(
                        "route {}{via} missing in netns {netns_path}",
                        r.dst
                    )));
                }
            }
        }
        let node = RtnlCni::current()?;
        let h = node
            .link(&host)
            .await?
            .ok_or_else(|| failed(format!("host veth {host} not found")))?;
        let br = node
            .link(&conf.bridge)
            .await?
            .ok_or_else(|| failed(format!("bridge {} not found", conf.bridge)))?;
        if h.controller != Some(br.index) {
            return Err(failed(format!(
                "host veth {host} is not a port of bridge {}",
                conf.bridge
            )));
        }
        Ok(())
    })?
}
