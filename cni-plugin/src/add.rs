//! ADD: reserve an IP, ensure the bridge, create the veth pair with its peer directly in the
//! pod netns, give the pod its address and routes, and return the result. A failure half-way
//! undoes what this invocation did (the host veth, which takes its peer along, and a
//! reservation it made): each step that made something pushes its undo onto an [`Undo`],
//! which runs them unless ADD commits.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use twill_dataplane::pod::{
    BridgeRef, Link, Mac, Pod, PodAddr, PodDataplane, RtnlPod, Undo, VethOwner, VethSpec,
    bridge_mac, parse_veth_alias,
};
use twill_dataplane::{NetNs, Netlink};
use twill_ipam::alloc::{Allocator, Request, SecondFamily};
use twill_ipam::subnet_file::SubnetFile;

use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::{CniError, Result, code};
use crate::types::{CniResult, Interface, IpConfig, Route};
use crate::{lock_allocator, read_subnet_file, runtime};

/// Opens CNI_NETNS; a missing path, one that is not a network namespace (checked on the
/// descriptor that is then used: nsfs, and NS_GET_NSTYPE says CLONE_NEWNET), or the
/// plugin's own network namespace (the node's: wiring a "pod" there would put the pod end
/// of the veth, its address and its routes on the host) is code 4 naming the variable and
/// the path.
pub(crate) fn open_netns(path: &str) -> Result<NetNs> {
    let ns = NetNs::open(path)
        .map_err(|e| CniError::new(code::INVALID_ENV, format!("CNI_NETNS={path:?}: {e}")))?;
    let own = ns
        .is_own()
        .map_err(|e| CniError::new(code::INVALID_ENV, format!("CNI_NETNS={path:?}: {e}")))?;
    if own {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS={path:?}: is the plugin's own (the node's) network namespace"),
        )
        .with_details("a pod needs a network namespace of its own"));
    }
    Ok(ns)
}

/// Decodes `prevResult`; one that does not decode is code 7 naming the key (it is not
/// passed on: a chained result twill cannot read is one it cannot extend correctly).
pub(crate) fn decode_prev_result(v: &Value) -> Result<CniResult> {
    CniResult::from_value(v)
        .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("config key prevResult: {e}")))
}

/// The IPs the runtime asks for, one per family of the node: `runtimeConfig.ips` first,
/// then CNI_ARGS `IP=` (for the IPv6 subnet only when it is an IPv6 address). At most one
/// per family; a prefix length other than the node subnet's, an unspecified, broadcast or
/// multicast address, or one outside the node subnet of its family is code 7 naming the
/// field and the value (the allocator refuses the subnet's network, gateway and last
/// addresses). An IPv6 entry on an IPv4-only node is ignored, as before dual-stack.
fn requested_ips(
    conf: &NetConf,
    env: &CniEnv,
    subnet: &SubnetFile,
) -> Result<(Option<IpAddr>, Option<IpAddr>)> {
    let v6net = subnet.ipv6_node_subnet();
    let args_v6 = v6net.is_some() && env.args.ip.is_some_and(|ip| ip.is_ipv6());
    let v4 = requested_ip(
        conf,
        env.args.ip.filter(|_| !args_v6),
        env.args.ip_prefix,
        subnet.node_subnet(),
    )?;
    let v6 = match v6net {
        Some(net) => requested_ip(
            conf,
            env.args.ip.filter(|_| args_v6),
            env.args.ip_prefix,
            net,
        )?,
        None => None,
    };
    Ok((v4, v6))
}

/// [`requested_ips`] for the node subnet `net`, with CNI_ARGS `IP=` `arg` (and its prefix).
fn requested_ip(
    conf: &NetConf,
    arg: Option<IpAddr>,
    arg_prefix: Option<u8>,
    net: IpNet,
) -> Result<Option<IpAddr>> {
    let v4 = net.addr().is_ipv4();
    let fam: Vec<_> = conf
        .runtime_ips
        .iter()
        .filter(|r| r.ip.is_ipv4() == v4)
        .collect();
    if fam.len() > 1 {
        let all: Vec<&str> = fam.iter().map(|r| r.text.as_str()).collect();
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("runtimeConfig.ips: {all:?}: at most one IP per family"),
        ));
    }
    let bad = |field: &str, text: &str, why: String| {
        CniError::new(code::INVALID_CONFIG, format!("{field} {text:?}: {why}"))
    };
    let (ip, field, text) = match (fam.first(), arg) {
        (Some(r), _) => {
            if let Some(p) = r.prefix
                && p != net.prefix_len()
            {
                return Err(bad(
                    "runtimeConfig.ips:",
                    &r.text,
                    format!(
                        "prefix length /{p} is not the node subnet's ({net}); give /{} or none",
                        net.prefix_len()
                    ),
                ));
            }
            (r.ip, "runtimeConfig.ips:", r.text.clone())
        }
        (None, Some(ip)) => {
            let text = match arg_prefix {
                Some(p) => format!("{ip}/{p}"),
                None => ip.to_string(),
            };
            if let Some(p) = arg_prefix
                && p != net.prefix_len()
            {
                return Err(bad(
                    "CNI_ARGS IP",
                    &text,
                    format!("prefix length /{p} is not the node subnet's ({net})"),
                ));
            }
            (ip, "CNI_ARGS IP", text)
        }
        (None, None) => return Ok(None),
    };
    let kind = match ip {
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        a if a.is_unspecified() => Some("the unspecified address"),
        a if a.is_loopback() => Some("a loopback address"),
        _ => None,
    };
    if let Some(k) = kind {
        return Err(bad(field, &text, format!("{k} cannot be a pod's IP")));
    }
    if !net.contains(&ip) {
        let which = if v4 {
            "node subnet"
        } else {
            "node IPv6 subnet"
        };
        return Err(bad(
            field,
            &text,
            format!("{ip} is outside the {which} {net}"),
        ));
    }
    Ok(Some(ip))
}

pub fn add(conf: &NetConf, env: &CniEnv) -> Result<Value> {
    let pod = env.pod()?;
    let netns_path = env.netns()?;
    let (cid, ifname, host) = (&*pod.container_id, &*pod.ifname, &*pod.host_veth);
    let prev = conf
        .prev_result
        .as_ref()
        .map(decode_prev_result)
        .transpose()?;
    let subnet = read_subnet_file(&conf.subnet_file)?;
    let mtu = conf.mtu.unwrap_or(subnet.mtu);
    let (requested, requested_v6) = requested_ips(conf, env, &subnet)?;
    let ns = open_netns(netns_path)?;

    let alloc = Allocator::new(&conf.data_dir, &conf.name);
    // The node's socket is opened by its first verb.
    let node = RtnlPod::current();
    // Dropped before the end (an error), it takes back what this ADD made, last first.
    let mut undo = Undo::new();
    let mut locked = lock_allocator(&alloc)?;
    // Held before this ADD (also when the reservation changes below: a node that became
    // dual-stack adds an IPv6 address to it).
    let held = locked.get(cid, ifname).is_some();
    let (res, new) = locked.reserve(
        subnet.node_subnet(),
        &Request {
            container_id: cid.into(),
            ifname: ifname.into(),
            host_veth: Some(host.into()),
            netns: Some(netns_path.into()),
            pod_namespace: env.args.pod_namespace.clone(),
            pod_name: env.args.pod_name.clone(),
            ip: requested,
            gateway: Some(subnet.gateway()),
            ipv6: subnet.ipv6_node_subnet().map(|net| SecondFamily {
                subnet: net,
                ip: requested_v6,
                gateway: subnet.ipv6_gateway(),
            }),
        },
    )?;
    tracing::info!(container = cid, ifname, ip = %res.ip, ipv6 = ?res.ipv6, new, "reserved");
    if new {
        // Runs once the write below is done (it holds the lock until then).
        undo.push(format!("release reservation of {}", res.ip), || {
            let mut l = alloc.lock()?;
            l.release(cid, ifname);
            l.commit()
        });
    }
    // The crash-safe write (fsync + swap: the longest single step of an ADD) runs on a
    // thread of its own, with the lock, while the kernel work goes on; success is reported
    // only once the reservation is durable.
    let pending = locked.commit_in_background();
    let rt = runtime()?;
    // The pod's socket is opened by a thread that enters the pod netns and exits, while the
    // node side is set up here; it is first needed once the veth exists.
    let pod_open = Netlink::spawn_open(rt.handle().clone(), &ns);
    let pod_dp = move || pod_open.join().map(RtnlPod::new);
    let plan = Plan {
        pod: &pod,
        ns: &ns,
        bridge: &conf.bridge,
        gateways: gateways(&subnet),
        addrs: pod_addrs(conf, &subnet, res.ip, res.ipv6),
        mtu,
        hairpin: conf.hairpin_mode,
        reclaim_untagged: held,
    };
    let wired = rt.block_on(wire(&node, pod_dp, &plan, &mut undo));
    tracing::debug!(ok = wired.is_ok(), "kernel work done");
    let committed = pending.wait();
    tracing::debug!(ok = committed.is_ok(), "reservation on disk");
    // A pod wired but whose reservation is not on disk is taken back too.
    let wired = wired?;
    committed?;
    undo.commit();

    let mut ours = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: wired.bridge.name,
                mac: wired.bridge.mac.map(|m| m.to_string()),
                ..Default::default()
            },
            Interface {
                name: wired.host.name,
                mac: wired.host.mac.map(|m| m.to_string()),
                ..Default::default()
            },
            Interface {
                name: ifname.into(),
                mac: Some(wired.pod_mac.to_string()),
                mtu: Some(mtu),
                sandbox: Some(netns_path.into()),
                ..Default::default()
            },
        ],
        ips: plan
            .addrs
            .iter()
            .map(|a| IpConfig {
                address: a.addr,
                gateway: Some(a.gateway),
                interface: Some(2),
                extra: Default::default(),
            })
            .collect(),
        routes: plan
            .addrs
            .iter()
            .flat_map(|a| {
                a.routes.iter().map(|dst| Route {
                    dst: *dst,
                    gw: Some(a.gateway),
                    extra: Default::default(),
                })
            })
            .collect(),
        dns: conf.dns.clone(),
    };
    if let Some(mut p) = prev {
        // Chained after another plugin: keep its result and add twill's.
        let off = p.interfaces.len();
        for ip in &mut ours.ips {
            ip.interface = ip.interface.map(|i| i + off);
        }
        p.interfaces.append(&mut ours.interfaces);
        p.ips.append(&mut ours.ips);
        p.routes.append(&mut ours.routes);
        if !ours.dns.is_empty() {
            p.dns = ours.dns;
        }
        ours = p;
    }
    Ok(ours.encode(&conf.cni_version))
}

/// The routes the pod gets, all via the gateway: the default route (if isDefaultGateway)
/// and the cluster network.
pub(crate) fn pod_routes(conf: &NetConf, subnet: &SubnetFile) -> Vec<IpNet> {
    family_routes(conf, subnet.network)
}

/// The default route of `network`'s family (if isDefaultGateway) and `network`.
fn family_routes(conf: &NetConf, network: IpNet) -> Vec<IpNet> {
    let mut v = Vec::new();
    if conf.is_default_gateway {
        v.push(if network.addr().is_ipv4() {
            "0.0.0.0/0".parse().expect("literal")
        } else {
            "::/0".parse().expect("literal")
        });
    }
    if !v.contains(&network) {
        v.push(network);
    }
    v
}

/// The bridge's addresses: the gateway, and on a dual-stack node the IPv6 gateway
/// (FLANNEL_IPV6_SUBNET's address and length).
pub(crate) fn gateways(subnet: &SubnetFile) -> Vec<IpNet> {
    let mut v = vec![IpNet::new(subnet.gateway(), subnet.subnet.prefix_len()).expect("prefix")];
    v.extend(subnet.ipv6_subnet);
    v
}

/// The pod's addresses with their gateways and routes: `ip` in the node subnet, and `ipv6`
/// (reserved only on a dual-stack node) in the IPv6 one, routed like IPv4: `::/0` and the
/// cluster's IPv6 network (FLANNEL_IPV6_NETWORK).
pub(crate) fn pod_addrs(
    conf: &NetConf,
    subnet: &SubnetFile,
    ip: IpAddr,
    ipv6: Option<IpAddr>,
) -> Vec<PodAddr> {
    let mut v = vec![PodAddr {
        addr: IpNet::new(ip, subnet.subnet.prefix_len()).expect("prefix"),
        gateway: subnet.gateway(),
        routes: pod_routes(conf, subnet),
    }];
    if let (Some(ip6), Some(sub6)) = (ipv6, subnet.ipv6_subnet) {
        let network = subnet.ipv6_network.unwrap_or(sub6.trunc());
        v.push(PodAddr {
            addr: IpNet::new(ip6, sub6.prefix_len()).expect("prefix"),
            gateway: sub6.addr(),
            routes: family_routes(conf, network),
        });
    }
    v
}

/// What ADD makes in the kernel for one pod.
pub(crate) struct Plan<'a> {
    pub pod: &'a Pod,
    /// The pod's namespace (CNI_NETNS, opened and checked).
    pub ns: &'a NetNs,
    /// The bridge's name (config key `bridge`).
    pub bridge: &'a str,
    /// The gateways on the bridge, gateway/len, one per family ([`gateways`]).
    pub gateways: Vec<IpNet>,
    /// The pod's addresses, one per family, each with its gateway and routes
    /// ([`pod_addrs`]).
    pub addrs: Vec<PodAddr>,
    pub mtu: u32,
    pub hairpin: bool,
    /// The (container ID, ifname) held a reservation before this ADD: a leftover host veth
    /// without an alias (made by a twill before aliases) that is a port of the bridge is its.
    pub reclaim_untagged: bool,
}

/// A link of the result: its name and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named {
    pub name: String,
    /// `None` only if the kernel reported no Ethernet address for the link.
    pub mac: Option<Mac>,
}

/// What [`wire`] made: the bridge, the host veth, and the MAC of the pod end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wired {
    pub bridge: Named,
    pub host: Named,
    pub pod_mac: Mac,
}

/// Whether the existing link `l` is the host veth twill made for `plan`'s pod (so ADD may
/// replace it): a veth whose alias is exactly this (container, ifname)'s, or, from a twill
/// before aliases, an untagged veth on `bridge` when the container already held a
/// reservation naming it.
pub(crate) fn leftover_is_ours(l: &Link, plan: &Plan<'_>, bridge: u32) -> bool {
    VethOwner {
        alias: plan.pod.alias(),
        untagged_port_of: plan.reclaim_untagged.then_some(BridgeRef::Index(bridge)),
    }
    .owns(l, |_| None)
}

/// The kernel part of ADD, over any [`PodDataplane`]. `node` acts in the node namespace,
/// `pod_dp()` gives the one for the pod namespace (called once the veth exists). Four round
/// trips to the kernel: the bridge, the node side of the pod (gateway, veth, read back; then
/// alias and hairpin), the pod side (up, address, routes). A host veth name that is taken is
/// replaced only if [`leftover_is_ours`]; otherwise code 111 and nothing is touched. Once the
/// veth exists, its removal (the kernel removes the pod end with it) is pushed onto `undo`.
pub(crate) async fn wire<'u, N: PodDataplane, P: PodDataplane>(
    node: &'u N,
    pod_dp: impl FnOnce() -> twill_dataplane::Result<P>,
    plan: &Plan<'_>,
    undo: &mut Undo<'u>,
) -> Result<Wired> {
    let (ifname, host) = (&*plan.pod.ifname, &*plan.pod.host_veth);
    let br = node
        .ensure_bridge(plan.bridge, bridge_mac(plan.gateways[0].addr()), plan.mtu)
        .await
        .map_err(|e| match e {
            // The only refusal of ensure_bridge: the name is taken by a link that is not a
            // bridge (eth0, lo). Nothing was changed.
            twill_dataplane::Error::Invalid(m) => CniError::new(
                code::INVALID_CONFIG,
                format!("config key bridge={:?}: {m}", plan.bridge),
            ),
            e => e.into(),
        })?;
    let alias = plan.pod.alias();
    let spec = VethSpec {
        host_name: host,
        host_mac: Mac::random(),
        host_alias: &alias,
        pod_ns: plan.ns,
        pod_ifname: ifname,
        pod_mac: Mac::random(),
        mtu: plan.mtu,
        hairpin: plan.hairpin,
    };
    let attached = match node.attach_pod(&br, &plan.gateways, &spec).await {
        Err(e) if e.errno() == Some(libc::EEXIST) => match node.link(host).await? {
            // A leftover of an earlier ADD of the same (container, ifname): remove it (its
            // peer goes with it) and try once more.
            Some(l) if leftover_is_ours(&l, plan, br.index) => {
                if node.delete_link(host).await? {
                    tracing::warn!(host, "removed a leftover host veth");
                }
                node.attach_pod(&br, &plan.gateways, &spec).await
            }
            // Someone else's link has the name: never deleted. The pod end was not made
            // either (the request failed as a whole).
            Some(l) => {
                let whose = match l.alias.as_deref().and_then(parse_veth_alias) {
                    Some((c, i)) => format!("twill's veth of container {c} ifname {i}"),
                    None => format!(
                        "a {} with alias {:?}",
                        l.kind.as_deref().unwrap_or("link"),
                        l.alias.as_deref().unwrap_or("")
                    ),
                };
                return Err(CniError::new(
                    code::LINK_NOT_OURS,
                    format!(
                        "host veth name {host} is taken by {whose}, not by this container's veth: left alone"
                    ),
                )
                .with_details(format!("expected alias {alias:?}")));
            }
            None => Err(e),
        },
        r => r,
    };
    tracing::debug!("bridge ensured, veth created");
    let pod_dp = pod_dp();
    let attached = attached.map_err(|e| {
        // EEXIST with the host name free: the pod end's name is the one taken.
        let pod_side = e.errno() == Some(libc::EEXIST);
        let mut err = CniError::from(e);
        if pod_side {
            err.msg = format!("{}: is {ifname} already taken in the pod netns?", err.msg);
        }
        err
    })?;
    let host_owned = host.to_string();
    undo.push(format!("delete {host}"), move || {
        node.remove_link_now(&host_owned).map(drop)
    });
    pod_dp?
        .configure_pod(attached.pod_index, &plan.addrs)
        .await?;
    Ok(Wired {
        bridge: Named {
            name: br.name.clone(),
            mac: br.mac,
        },
        host: Named {
            name: attached.host.name.clone(),
            mac: attached.host.mac,
        },
        pod_mac: spec.pod_mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pod;
    use twill_dataplane::pod::fake::Recording;

    fn conf() -> NetConf {
        crate::config::parse_conf(br#"{"cniVersion":"1.1.0","name":"t","type":"twill"}"#).unwrap()
    }

    fn subnet() -> SubnetFile {
        SubnetFile::parse(
            "s",
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\n",
        )
        .unwrap()
    }

    /// The node fake, and the pod fake, where the kernel puts the veth's pod end.
    fn fakes() -> (Recording, Recording) {
        let pod = Recording::new();
        pod.add_link("eth0", "veth");
        (Recording::new(), pod)
    }

    fn plan<'a>(pod: &'a Pod, ns: &'a NetNs, reclaim_untagged: bool) -> Plan<'a> {
        let (conf, subnet) = (conf(), subnet());
        Plan {
            pod,
            ns,
            bridge: "cni0",
            gateways: gateways(&subnet),
            addrs: pod_addrs(&conf, &subnet, "10.244.3.2".parse().unwrap(), None),
            mtu: 1450,
            hairpin: conf.hairpin_mode,
            reclaim_untagged,
        }
    }

    /// [`wire`] with the fakes; its undo runs (or not) before this returns.
    async fn run(node: &Recording, pod_fake: &Recording, pod_fails: bool) -> Result<Wired> {
        let ns = NetNs::current().unwrap();
        let pod_fake = pod_fake.clone();
        let pod_dp = move || {
            if pod_fails {
                Err(twill_dataplane::Error::Invalid("no pod socket".into()))
            } else {
                Ok(pod_fake)
            }
        };
        let p = pod();
        let mut undo = Undo::new();
        let r = wire(node, pod_dp, &plan(&p, &ns, false), &mut undo).await;
        if r.is_ok() {
            undo.commit();
        }
        r
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn wires_bridge_veth_pod_in_order() {
        let (f, p) = fakes();
        let w = rt().block_on(run(&f, &p, false)).unwrap();
        assert_eq!(w.bridge.name, "cni0");
        assert_eq!(w.bridge.mac.unwrap().to_string(), "0a:58:0a:f4:03:01");
        assert_eq!(w.host.name, "vethabc");
        assert_eq!(
            f.calls(),
            [
                "ensure_bridge cni0 1450",
                "attach_pod cni0 10.244.3.1/24 vethabc eth0 1450 hairpin=true",
            ]
        );
        assert_eq!(
            p.calls(),
            ["configure_pod eth0 10.244.3.2/24 via 10.244.3.1 routes 0.0.0.0/0,10.244.0.0/16"]
        );
        // The MACs ADD reports are the ones it chose: locally administered unicast.
        for m in [w.host.mac.unwrap(), w.pod_mac] {
            assert_eq!(m.0[0] & 0x03, 0x02, "{m}");
        }
        assert_ne!(w.host.mac, Some(w.pod_mac));
    }

    /// Proves the dual-stack plan: both gateways on the bridge in the same request, both
    /// addresses and both families' routes (default and cluster network) in the pod's one
    /// round trip, each via its own gateway.
    #[test]
    fn a_dual_stack_subnet_file_wires_both_families() {
        let subnet = SubnetFile::parse(
            "s",
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n",
        )
        .unwrap();
        let (f, p) = fakes();
        let (pd, ns) = (pod(), NetNs::current().unwrap());
        let plan = Plan {
            gateways: gateways(&subnet),
            addrs: pod_addrs(
                &conf(),
                &subnet,
                "10.244.3.2".parse().unwrap(),
                Some("fc00:0:0:3::2".parse().unwrap()),
            ),
            ..plan(&pd, &ns, false)
        };
        let mut undo = Undo::new();
        let pc = p.clone();
        rt().block_on(wire(&f, move || Ok(pc), &plan, &mut undo))
            .unwrap();
        undo.commit();
        assert_eq!(
            f.calls()[1],
            "attach_pod cni0 10.244.3.1/24,fc00:0:0:3::1/64 vethabc eth0 1450 hairpin=true"
        );
        assert_eq!(
            p.calls(),
            [
                "configure_pod eth0 10.244.3.2/24 via 10.244.3.1 routes 0.0.0.0/0,10.244.0.0/16; \
              fc00:0:0:3::2/64 via fc00:0:0:3::1 routes ::/0,fc00::/48"
            ]
        );
    }

    #[test]
    fn a_failure_after_the_veth_deletes_it() {
        let (f, p) = fakes();
        p.fail_next("configure_pod", libc::ENETUNREACH);
        let e = rt().block_on(run(&f, &p, false)).unwrap_err();
        assert_eq!(e.code, code::KERNEL);
        assert_eq!(f.calls().last().unwrap(), "remove_link_now vethabc");
        assert!(!f.has_link("vethabc"));

        let (f, p) = fakes();
        let e = rt().block_on(run(&f, &p, true)).unwrap_err();
        assert!(e.msg.contains("no pod socket"), "{e}");
        assert_eq!(f.calls().last().unwrap(), "remove_link_now vethabc");
    }

    #[test]
    fn a_leftover_host_veth_is_replaced() {
        let (f, p) = fakes();
        f.add_link("vethabc", "veth");
        f.set_link("vethabc", Some("twill:c1/eth0"), None);
        rt().block_on(run(&f, &p, false)).unwrap();
        let calls = f.calls();
        assert_eq!(
            calls[1..5],
            [
                "attach_pod cni0 10.244.3.1/24 vethabc eth0 1450 hairpin=true".to_string(),
                "link vethabc".to_string(),
                "delete_link vethabc".to_string(),
                "attach_pod cni0 10.244.3.1/24 vethabc eth0 1450 hairpin=true".to_string()
            ]
        );
    }

    /// A link with the chosen name that is not this container's veth (another container's
    /// alias, no alias, not a veth) is never deleted; ADD fails naming it.
    #[test]
    fn a_link_that_is_not_ours_is_left_alone() {
        for (alias, kind) in [
            (Some("twill:other/eth0"), "veth"),
            (Some("someone else's"), "veth"),
            (None, "veth"),
            (Some("twill:c1/eth0"), "dummy"),
        ] {
            let (f, p) = fakes();
            f.add_link("vethabc", kind);
            f.set_link("vethabc", alias, None);
            let e = rt().block_on(run(&f, &p, false)).unwrap_err();
            assert_eq!(e.code, code::LINK_NOT_OURS, "{alias:?} {kind}: {e}");
            assert!(e.msg.contains("vethabc"), "{e}");
            assert!(f.has_link("vethabc"), "{alias:?} {kind}");
            assert!(
                !f.calls()
                    .iter()
                    .any(|c| c.starts_with("delete_link") || c.starts_with("remove"))
            );
            assert!(p.calls().is_empty());
        }
    }

    #[test]
    fn an_untagged_leftover_is_ours_only_with_a_reservation_and_on_the_bridge() {
        let mut l = Recording::new().add_link("vethabc", "veth");
        let (p, ns) = (pod(), NetNs::current().unwrap());
        l.controller = Some(7);
        assert!(leftover_is_ours(&l, &plan(&p, &ns, true), 7));
        assert!(!leftover_is_ours(&l, &plan(&p, &ns, true), 8));
        assert!(!leftover_is_ours(&l, &plan(&p, &ns, false), 7));
        l.alias = Some("twill:c1/eth0".into());
        assert!(leftover_is_ours(&l, &plan(&p, &ns, false), 1));
    }

    /// EEXIST from the veth's create while the host name is free: the pod end's name is
    /// taken, and the message says so (chosen by the errno, not by the text).
    #[test]
    fn eexist_with_a_free_host_name_hints_at_the_pod_ifname() {
        let (f, p) = fakes();
        f.fail_next("attach_pod", libc::EEXIST);
        let e = rt().block_on(run(&f, &p, false)).unwrap_err();
        assert_eq!(e.code, code::KERNEL);
        assert!(
            e.msg.ends_with("is eth0 already taken in the pod netns?"),
            "{e}"
        );
        assert!(
            !f.calls().iter().any(|c| c.contains("remove")),
            "nothing made, nothing undone"
        );
        let (f, p) = fakes();
        f.fail_next("attach_pod", libc::EPERM);
        let e = rt().block_on(run(&f, &p, false)).unwrap_err();
        assert!(!e.msg.contains("already taken"), "{e}");
    }

    /// `bridge` naming an existing link that is not a bridge: code 7 naming the key and the
    /// value, and nothing else is done (no veth, nothing in the pod).
    #[test]
    fn a_bridge_name_taken_by_another_kind_is_code_7() {
        let (f, p) = fakes();
        f.add_link("cni0", "dummy");
        let e = rt().block_on(run(&f, &p, false)).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG, "{e}");
        assert!(e.msg.contains("bridge=\"cni0\""), "{e}");
        assert_eq!(f.calls(), ["ensure_bridge cni0 1450"]);
        assert!(p.calls().is_empty());
    }

    #[test]
    fn a_failed_bridge_touches_nothing_else() {
        let (f, p) = fakes();
        f.fail_next("ensure_bridge", libc::EPERM);
        let e = rt().block_on(run(&f, &p, false)).unwrap_err();
        assert_eq!(e.code, code::KERNEL);
        assert_eq!(f.calls().len(), 1);
        assert!(p.calls().is_empty());
    }
}
