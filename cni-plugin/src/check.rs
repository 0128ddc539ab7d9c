//! CHECK: the pod's interface, its IP and routes, the host veth on the bridge and the
//! reservation, against `prevResult`. Fails (code 120) with a message that names what is
//! missing.

use ipnet::IpNet;
use twill_dataplane::pod::{PodDataplane, RtnlPod};
use twill_ipam::alloc::Allocator;

use crate::add::{decode_prev_result, open_netns};
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::{CniError, Result, code};
use crate::types::Route;
use crate::{block_on, read_subnet_file, require_version};

fn failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

pub fn check(conf: &NetConf, env: &CniEnv) -> Result<()> {
    require_version(conf, "CHECK", "0.4.0")?;
    let pod = env.pod()?;
    let (cid, ifname) = (&*pod.container_id, &*pod.ifname);
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
    let ips: Vec<IpNet> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(idx))
        .map(|ip| ip.address)
        .collect();
    for want in std::iter::once(res.ip).chain(res.ipv6) {
        if !ips.iter().any(|ip| ip.addr() == want) {
            return Err(failed(format!(
                "reserved IP {want} of container {cid} is not in prevResult's ips"
            )));
        }
    }
    let ns = open_netns(netns_path)?;
    let want = Expected {
        ifname,
        netns: netns_path,
        mac: prev.interfaces[idx].mac.as_deref(),
        ips: &ips,
        routes: &prev.routes,
        host: res.host_veth.as_deref().unwrap_or(&pod.host_veth),
        bridge: &conf.bridge,
    };
    block_on(async {
        let pod_dp = RtnlPod::open(&ns)?;
        check_kernel(&pod_dp, &RtnlPod::current(), &want).await
    })?
}

/// What CHECK expects to find in the kernel.
pub(crate) struct Expected<'a> {
    pub ifname: &'a str,
    /// CNI_NETNS, for the messages.
    pub netns: &'a str,
    /// The pod interface's MAC in prevResult, if it gives one.
    pub mac: Option<&'a str>,
    /// prevResult's addresses of the pod interface.
    pub ips: &'a [IpNet],
    /// prevResult's routes (those of the families of `ips` are checked).
    pub routes: &'a [Route],
    /// The host veth and the bridge it must be a port of.
    pub host: &'a str,
    pub bridge: &'a str,
}

/// The kernel part of CHECK, over any [`PodDataplane`]: `pod` acts in the pod namespace,
/// `node` in the node's.
pub(crate) async fn check_kernel(
    pod: &impl PodDataplane,
    node: &impl PodDataplane,
    want: &Expected<'_>,
) -> Result<()> {
    let (ifname, netns_path) = (want.ifname, want.netns);
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
    let have = link
        .mac
        .map_or_else(|| "none".to_string(), |m| m.to_string());
    if let Some(mac) = want.mac
        && !mac.eq_ignore_ascii_case(&have)
    {
        return Err(failed(format!(
            "interface {ifname} has MAC {have}, prevResult says {mac}"
        )));
    }
    let addrs = pod.addresses(link.index).await?;
    for ip in want.ips {
        if !addrs.contains(ip) {
            return Err(failed(format!(
                "address {ip} missing on {ifname} in netns {netns_path}"
            )));
        }
    }
    // One dump per family of the pod's addresses (both on a dual-stack pod).
    for v4 in [true, false] {
        let Some(first) = want.ips.iter().find(|ip| ip.addr().is_ipv4() == v4) else {
            continue;
        };
        let routes = pod.routes(first.addr()).await?;
        for r in want.routes {
            if r.dst.addr().is_ipv4() != v4 {
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
    let host = want.host;
    let h = node
        .link(host)
        .await?
        .ok_or_else(|| failed(format!("host veth {host} not found")))?;
    let br = node
        .link(want.bridge)
        .await?
        .ok_or_else(|| failed(format!("bridge {} not found", want.bridge)))?;
    if h.controller != Some(br.index) {
        return Err(failed(format!(
            "host veth {host} is not a port of bridge {}",
            want.bridge
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use twill_dataplane::pod::PodAddr;
    use twill_dataplane::pod::fake::Recording;

    use super::*;

    /// A pod as ADD leaves it: eth0 up with its address and routes in the pod fake, the host
    /// veth a port of cni0 in the node fake.
    fn wired() -> (Recording, Recording) {
        let pod = Recording::new();
        let eth0 = pod.add_link("eth0", "veth");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(pod.configure_pod(
            eth0.index,
            &[
                PodAddr {
                    addr: "10.244.3.2/24".parse().unwrap(),
                    gateway: "10.244.3.1".parse().unwrap(),
                    routes: vec![
                        "0.0.0.0/0".parse().unwrap(),
                        "10.244.0.0/16".parse().unwrap(),
                    ],
                },
                PodAddr {
                    addr: "fc00:0:0:3::2/64".parse().unwrap(),
                    gateway: "fc00:0:0:3::1".parse().unwrap(),
                    routes: vec!["::/0".parse().unwrap(), "fc00::/48".parse().unwrap()],
                },
            ],
        ))
        .unwrap();
        let node = Recording::new();
        let br = node.add_link("cni0", "bridge");
        node.add_link("vethabc", "veth");
        node.set_link("vethabc", Some("twill:c1/eth0"), Some(br.index));
        (pod, node)
    }

    fn route(dst: &str, gw: Option<&str>) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            gw: gw.map(|g| g.parse().unwrap()),
            extra: Default::default(),
        }
    }

    /// prevResult's view of the pod of [`wired`], borrowed by [`Expected`].
    struct Prev {
        ips: Vec<IpNet>,
        routes: Vec<Route>,
    }

    fn prev() -> Prev {
        Prev {
            ips: vec!["10.244.3.2/24".parse().unwrap()],
            routes: vec![
                route("0.0.0.0/0", Some("10.244.3.1")),
                route("10.244.0.0/16", None),
                // Another family than the address's: not checked.
                route("fd00::/64", None),
            ],
        }
    }

    impl Prev {
        fn want(&self) -> Expected<'_> {
            Expected {
                ifname: "eth0",
                netns: "/run/netns/p",
                mac: Some("02:00:00:00:00:02"),
                ips: &self.ips,
                routes: &self.routes,
                host: "vethabc",
                bridge: "cni0",
            }
        }
    }

    fn check(pod: &Recording, node: &Recording, want: &Expected<'_>) -> Result<()> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(check_kernel(pod, node, want))
    }

    #[test]
    fn a_pod_as_add_left_it_passes() {
        let (pod, node) = wired();
        check(&pod, &node, &prev().want()).unwrap();
    }

    #[test]
    fn each_missing_piece_is_code_120_naming_it() {
        let (pod, node) = wired();
        let p = prev();
        let other_ip = ["10.244.3.9/24".parse().unwrap()];
        let other_route = [route("10.9.0.0/16", None)];
        let cases = [
            (
                "interface eth1 not found in netns /run/netns/p",
                Expected {
                    ifname: "eth1",
                    ..p.want()
                },
            ),
            (
                "has MAC 02:00:00:00:00:02, prevResult says 02:00:00:00:00:99",
                Expected {
                    mac: Some("02:00:00:00:00:99"),
                    ..p.want()
                },
            ),
            (
                "address 10.244.3.9/24 missing on eth0",
                Expected {
                    ips: &other_ip,
                    ..p.want()
                },
            ),
            (
                "route 10.9.0.0/16 missing in netns /run/netns/p",
                Expected {
                    routes: &other_route,
                    ..p.want()
                },
            ),
            (
                "host veth vethxyz not found",
                Expected {
                    host: "vethxyz",
                    ..p.want()
                },
            ),
            (
                "bridge br9 not found",
                Expected {
                    bridge: "br9",
                    ..p.want()
                },
            ),
        ];
        for (msg, want) in &cases {
            let e = check(&pod, &node, want).unwrap_err();
            assert_eq!(e.code, code::CHECK_FAILED, "{e}");
            assert!(e.msg.contains(msg), "{msg}: {e}");
        }
    }

    /// Proves that CHECK of a dual-stack pod checks the IPv6 address and the IPv6 routes
    /// too (not only the first address's family).
    #[test]
    fn a_dual_stack_pod_has_both_families_checked() {
        let (pod, node) = wired();
        let mut p = prev();
        p.ips.push("fc00:0:0:3::2/64".parse().unwrap());
        p.routes = vec![
            route("0.0.0.0/0", Some("10.244.3.1")),
            route("::/0", Some("fc00:0:0:3::1")),
            route("fc00::/48", None),
        ];
        check(&pod, &node, &p.want()).unwrap();
        p.routes.push(route("fc00:9::/48", None));
        let e = check(&pod, &node, &p.want()).unwrap_err();
        assert!(e.msg.contains("route fc00:9::/48 missing"), "{e}");
        p.routes.pop();
        p.routes[1] = route("::/0", Some("fc00:0:0:3::9"));
        let e = check(&pod, &node, &p.want()).unwrap_err();
        assert!(
            e.msg.contains("route ::/0 via fc00:0:0:3::9 missing"),
            "{e}"
        );
        p.ips[1] = "fc00:0:0:3::7/64".parse().unwrap();
        let e = check(&pod, &node, &p.want()).unwrap_err();
        assert!(e.msg.contains("address fc00:0:0:3::7/64 missing"), "{e}");
    }

    #[test]
    fn a_pod_interface_that_is_down_or_a_veth_off_the_bridge_fails() {
        let pod = Recording::new();
        pod.add_link("eth0", "veth");
        let (_, node) = wired();
        let e = check(&pod, &node, &prev().want()).unwrap_err();
        assert!(e.msg.ends_with("is down"), "{e}");

        let (pod, node) = wired();
        node.set_link("vethabc", Some("twill:c1/eth0"), None);
        let e = check(&pod, &node, &prev().want()).unwrap_err();
        assert!(e.msg.contains("is not a port of bridge cni0"), "{e}");
    }

    #[test]
    fn a_kernel_error_is_code_110() {
        let (pod, node) = wired();
        pod.fail_next("routes", libc::EPERM);
        let e = check(&pod, &node, &prev().want()).unwrap_err();
        assert_eq!(e.code, code::KERNEL, "{e}");
    }
}
