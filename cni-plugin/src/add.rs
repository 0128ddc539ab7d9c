//! ADD: reserve an IP, ensure the bridge, create the veth pair with its peer directly in the
//! pod netns, give the pod its address and routes, and return the result. A failure half-way
//! undoes what this invocation did (the host veth, which takes its peer along, and a
//! reservation it made).

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use twill_dataplane::NetNs;
use twill_dataplane::cni::{
    CniDataplane, Link, RtnlCni, VethSpec, bridge_mac, format_mac, parse_veth_alias, random_mac,
    veth_alias,
};
use twill_ipam::alloc::{Allocator, Request};
use twill_ipam::subnet_file::SubnetFile;

use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::{CniError, Result, code};
use crate::types::{CniResult, Interface, IpConfig, Route};
use crate::{host_veth_name, lock_allocator, read_subnet_file, runtime};

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

/// The IP the runtime asks for: `runtimeConfig.ips` first, then CNI_ARGS `IP=`. At most one
/// per family; a prefix length other than the node subnet's, an unspecified, broadcast or
/// multicast address, or one outside the node subnet is code 7 naming the field and the
/// value (the allocator refuses the subnet's network, gateway and broadcast addresses).
fn requested_ip(conf: &NetConf, env: &CniEnv, subnet: &SubnetFile) -> Result<Option<IpAddr>> {
    let net = subnet.node_subnet();
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
    let (ip, field, text) = match (fam.first(), env.args.ip) {
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
            let text = match env.args.ip_prefix {
                Some(p) => format!("{ip}/{p}"),
                None => ip.to_string(),
            };
            if let Some(p) = env.args.ip_prefix
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
        return Err(bad(
            field,
            &text,
            format!("{ip} is outside the node subnet {net}"),
        ));
    }
    Ok(Some(ip))
}

pub fn add(conf: &NetConf, env: &CniEnv) -> Result<Value> {
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let prev = conf
        .prev_result
        .as_ref()
        .map(decode_prev_result)
        .transpose()?;
    let subnet = read_subnet_file(&conf.subnet_file)?;
    let mtu = conf.mtu.unwrap_or(subnet.mtu);
    let requested = requested_ip(conf, env, &subnet)?;
    let ns = open_netns(netns_path)?;
    let host = host_veth_name(cid, ifname);

    let alloc = Allocator::new(&conf.data_dir, &conf.name);
    let mut locked = lock_allocator(&alloc)?;
    let (res, new) = locked.reserve(
        subnet.node_subnet(),
        &Request {
            container_id: cid.into(),
            ifname: ifname.into(),
            host_veth: Some(host.clone()),
            netns: Some(netns_path.into()),
            pod_namespace: env.args.pod_namespace.clone(),
            pod_name: env.args.pod_name.clone(),
            ip: requested,
            gateway: Some(subnet.gateway()),
        },
    )?;
    tracing::info!(container = cid, ifname, ip = %res.ip, new, "reserved");
    // The crash-safe write (fsync + swap: the longest single step of an ADD) runs on a
    // thread of its own, with the lock, while the kernel work goes on; success is reported
    // only once the reservation is durable.
    let pending = locked.commit_in_background();
    let rt = runtime()?;
    // The pod's socket is opened by a thread that enters the pod netns and exits, while the
    // node side is set up here; it is first needed once the veth exists.
    let pod_open = RtnlCni::spawn_open(rt.handle().clone(), ns.try_clone()?);
    let pod = move || {
        pod_open.join().unwrap_or_else(|_| {
            Err(twill_dataplane::Error::Invalid(
                "netns thread panicked".into(),
            ))
        })
    };
    let wired = rt.block_on(async {
        let node = RtnlCni::current()?;
        let alias = veth_alias(cid, ifname);
        let names = Names {
            ifname,
            host: &host,
            alias: &alias,
            reclaim_untagged: !new,
        };
        wire_with(&node, pod, conf, &subnet, &ns, &names, res.ip, mtu).await
    });
    tracing::debug!(ok = wired.is_ok(), "kernel work done");
    let committed = pending.wait();
    tracing::debug!(ok = committed.is_ok(), "reservation on disk");
    let wired = match (wired, committed) {
        (Ok(w), Ok(())) => Ok(w),
        (Ok(_), Err(e)) => {
            // The pod is wired but its reservation is not on disk: take the wiring back.
            if let Err(e2) = rt.block_on(async { RtnlCni::current()?.delete_link(&host).await }) {
                tracing::error!("undo: delete {host}: {e2}");
            }
            Err(e.into())
        }
        (Err(e), _) => Err(e),
    };
    let (bridge, host_link, pod) = match wired {
        Ok(x) => x,
        Err(e) => {
            if new {
                // Undo the reservation this invocation made; a failure here is logged only:
                // the error the runtime needs to see is the first one.
                match alloc.lock() {
                    Ok(mut l) => {
                        l.release(cid, ifname);
                        if let Err(e2) = l.commit() {
                            tracing::error!("undo reservation of {}: {e2}", res.ip);
                        }
                    }
                    Err(e2) => tracing::error!("undo reservation of {}: {e2}", res.ip),
                }
            }
            return Err(e);
        }
    };

    let gw = subnet.gateway();
    let mut ours = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: bridge.0,
                mac: Some(bridge.1),
                ..Default::default()
            },
            Interface {
                name: host_link.0,
                mac: Some(host_link.1),
                ..Default::default()
            },
            Interface {
                name: ifname.into(),
                mac: Some(pod),
                mtu: Some(mtu),
                sandbox: Some(netns_path.into()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: IpNet::new(res.ip, subnet.subnet.prefix_len()).expect("valid prefix"),
            gateway: Some(gw),
            interface: Some(2),
            extra: Default::default(),
        }],
        routes: pod_routes(conf, &subnet)
            .into_iter()
            .map(|dst| Route {
                dst,
                gw: Some(gw),
                extra: Default::default(),
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
    let mut v = Vec::new();
    if conf.is_default_gateway {
        v.push(if subnet.network.addr().is_ipv4() {
            "0.0.0.0/0".parse().expect("literal")
        } else {
            "::/0".parse().expect("literal")
        });
    }
    if !v.contains(&subnet.network) {
        v.push(subnet.network);
    }
    v
}

type Named = (String, String);

/// The names ADD works with, and whether an untagged leftover may be reclaimed.
pub(crate) struct Names<'a> {
    /// CNI_IFNAME, the pod end.
    pub ifname: &'a str,
    /// The host veth's name ([`crate::host_veth_name`]) and alias ([`veth_alias`]).
    pub host: &'a str,
    pub alias: &'a str,
    /// The (container ID, ifname) held a reservation before this ADD: a leftover host veth
    /// without an alias (made by a twill before aliases) that is a port of the bridge is its.
    pub reclaim_untagged: bool,
}

/// Whether the existing link `l` is the host veth twill made for `names` (so ADD may
/// replace it): a veth whose alias is exactly [`veth_alias`] of this (container, ifname), or,
/// from a twill before aliases, an untagged veth on `bridge` when the container already held
/// a reservation naming it.
pub(crate) fn leftover_is_ours(l: &Link, names: &Names<'_>, bridge: u32) -> bool {
    if l.kind.as_deref() != Some("veth") {
        return false;
    }
    match &l.alias {
        Some(a) => a == names.alias,
        None => names.reclaim_untagged && l.controller == Some(bridge),
    }
}

/// The kernel part of ADD, over any [`CniDataplane`]. Returns (bridge name, MAC), (host
/// veth, MAC), pod MAC. `node` acts in the node namespace, `pod()` gives the
/// one for the pod namespace (called once the veth exists). Four round trips to the kernel:
/// the bridge, the node side of the pod (gateway, veth, read back; then alias and hairpin),
/// the pod side (up, address, routes). A host veth name that is taken is replaced only if
/// [`leftover_is_ours`]; otherwise code 111 and nothing is touched. A failure after the veth exists deletes the host veth (the kernel
/// removes the pod end with it).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn wire_with<N: CniDataplane, P: CniDataplane>(
    node: &N,
    pod: impl FnOnce() -> twill_dataplane::Result<P>,
    conf: &NetConf,
    subnet: &SubnetFile,
    ns: &NetNs,
    names: &Names<'_>,
    ip: IpAddr,
    mtu: u32,
) -> Result<(Named, Named, String)> {
    let (ifname, host) = (names.ifname, names.host);
    let gw = subnet.gateway();
    let br = node
        .ensure_bridge(&conf.bridge, bridge_mac(gw), mtu)
        .await
        .map_err(|e| match e {
            // The only refusal of ensure_bridge: the name is taken by a link that is not a
            // bridge (eth0, lo). Nothing was changed.
            twill_dataplane::Error::Invalid(m) => CniError::new(
                code::INVALID_CONFIG,
                format!("config key bridge={:?}: {m}", conf.bridge),
            ),
            e => e.into(),
        })?;
    let spec = VethSpec {
        host_name: host,
        host_mac: random_mac(),
        host_alias: names.alias,
        pod_ns: ns,
        pod_ifname: ifname,
        pod_mac: random_mac(),
        mtu,
        hairpin: conf.hairpin_mode,
    };
    let gw_net = IpNet::new(gw, subnet.subnet.prefix_len()).expect("prefix");
    let attached = match node.attach_pod(&br, gw_net, &spec).await {
        Err(e) if e.errno() == Some(libc::EEXIST) => match node.link(host).await? {
            // A leftover of an earlier ADD of the same (container, ifname): remove it (its
            // peer goes with it) and try once more.
            Some(l) if leftover_is_ours(&l, names, br.index) => {
                if node.delete_link(host).await? {
                    tracing::warn!(host, "removed a leftover host veth");
                }
                node.attach_pod(&br, gw_net, &spec).await
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
                .with_details(format!("expected alias {:?}", names.alias)));
            }
            None => Err(e),
        },
        r => r,
    };
    tracing::debug!("bridge ensured, veth created");
    let pod = pod();
    let attached = attached.map_err(|e| {
        let mut err = CniError::from(e);
        if err.details.contains("exists") {
            err.msg = format!("{}: is {ifname} already taken in the pod netns?", err.msg);
        }
        err
    })?;
    // From here on a failure deletes the host veth.
    let configured = match pod {
        Ok(pod) => {
            let addr = IpNet::new(ip, subnet.subnet.prefix_len()).expect("prefix");
            pod.configure_pod(attached.pod_index, addr, &pod_routes(conf, subnet), gw)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = configured {
        if let Err(e2) = node.delete_link(host).await {
            tracing::error!("undo: delete {host}: {e2}");
        }
        return Err(e.into());
    }
    Ok((
        (br.name.clone(), br.mac_string()),
        (attached.host.name.clone(), attached.host.mac_string()),
        format_mac(&spec.pod_mac),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_dataplane::cni::fake::Recording;

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

    async fn run(
        node: &Recording,
        pod: &Recording,
        pod_fails: bool,
    ) -> Result<(Named, Named, String)> {
        let ns = NetNs::current().unwrap();
        let pod = pod.clone();
        let pod = move || {
            if pod_fails {
                Err(twill_dataplane::Error::Invalid("no pod socket".into()))
            } else {
                Ok(pod)
            }
        };
        wire_with(
            node,
            pod,
            &conf(),
            &subnet(),
            &ns,
            &Names {
                ifname: "eth0",
                host: "vethabc",
                alias: "twill:c1/eth0",
                reclaim_untagged: false,
            },
            "10.244.3.2".parse().unwrap(),
            1450,
        )
        .await
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn wires_bridge_veth_pod_in_order() {
        let (f, p) = fakes();
        let (br, host, mac) = rt().block_on(run(&f, &p, false)).unwrap();
        assert_eq!(br, ("cni0".to_string(), "0a:58:0a:f4:03:01".to_string()));
        assert_eq!(host.0, "vethabc");
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
        for m in [&host.1, &mac] {
            let first = u8::from_str_radix(&m[..2], 16).unwrap();
            assert_eq!(first & 0x03, 0x02, "{m}");
        }
        assert_ne!(host.1, mac);
    }

    #[test]
    fn a_failure_after_the_veth_deletes_it() {
        let (f, p) = fakes();
        p.fail_next("configure_pod", libc::ENETUNREACH);
        let e = rt().block_on(run(&f, &p, false)).unwrap_err();
        assert_eq!(e.code, code::KERNEL);
        assert_eq!(f.calls().last().unwrap(), "delete_link vethabc");
        assert!(!f.has_link("vethabc"));

        let (f, p) = fakes();
        let e = rt().block_on(run(&f, &p, true)).unwrap_err();
        assert!(e.msg.contains("no pod socket"), "{e}");
        assert_eq!(f.calls().last().unwrap(), "delete_link vethabc");
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
            assert!(!f.calls().iter().any(|c| c.starts_with("delete_link")));
            assert!(p.calls().is_empty());
        }
    }

    #[test]
    fn an_untagged_leftover_is_ours_only_with_a_reservation_and_on_the_bridge() {
        let mut l = Recording::new().add_link("vethabc", "veth");
        let mut names = Names {
            ifname: "eth0",
            host: "vethabc",
            alias: "twill:c1/eth0",
            reclaim_untagged: true,
        };
        l.controller = Some(7);
        assert!(leftover_is_ours(&l, &names, 7));
        assert!(!leftover_is_ours(&l, &names, 8));
        names.reclaim_untagged = false;
        assert!(!leftover_is_ours(&l, &names, 7));
        l.alias = Some("twill:c1/eth0".into());
        assert!(leftover_is_ours(&l, &names, 1));
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
