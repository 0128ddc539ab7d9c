//! The underlay: the interface that carries VXLAN traffic and the node's public IP on it.
//!
//! The interface is chosen by a [`Selector`] (twilld's `--iface`, `--iface-regex` and
//! `--iface-can-reach`): its criteria are tried in order, the `--iface` entries first (each a
//! name or an address), then the regexes, then the route lookup, and the first that names
//! an interface wins. Without any: the output interface of the main table's IPv4 default
//! route. [`pick`] is the matching of one criterion against a snapshot of the links and
//! their addresses (pure, unit-tested); [`resolve`] takes the snapshot from the kernel.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
// Bytes regexes without Unicode: names and addresses are ASCII, and the ASCII classes
// (\d, \w, \s, (?i)) need none of the crate's Unicode tables (a smaller twilld).
use regex::bytes::{Regex, RegexBuilder};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteType};

use crate::netlink::parse;
use crate::{Error, Netlink, Result};

/// The resolved underlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The node's public IP: `--public-ip`, else the address the criterion found (an
    /// `--iface` address, the address an `--iface-regex` matched, the source address of the
    /// route to `--iface-can-reach`), else the first IPv4 address of the interface (then IPv6).
    pub ip: IpAddr,
}

impl Underlay {
    /// The VXLAN device's MTU: underlay − 50 over IPv4, − 70 over IPv6.
    pub fn vxlan_mtu(&self) -> u32 {
        self.mtu.saturating_sub(self.vxlan_overhead())
    }

    /// The bytes VXLAN adds over this underlay: 50 over IPv4, 70 over IPv6.
    pub fn vxlan_overhead(&self) -> u32 {
        match self.ip {
            IpAddr::V4(_) => super::VXLAN_OVERHEAD_V4,
            IpAddr::V6(_) => super::VXLAN_OVERHEAD_V6,
        }
    }
}

/// One way of naming the underlay interface.
#[derive(Clone, Debug)]
pub enum Criterion {
    /// `--iface NAME`: the interface of that name.
    Name(String),
    /// `--iface ADDRESS`: the interface that has this address (also the public IP).
    Ip(IpAddr),
    /// `--iface-regex`: the first interface with an address that matches, else the first
    /// whose name matches (unanchored, as `Regex::is_match`: write `^...$` for a whole name).
    /// ASCII only: `\d`, `\w`, `\s` and `(?i)` are their ASCII forms, `\p{..}` is refused.
    Regex(Regex),
    /// `--iface-can-reach`: the interface and source address of the kernel's route to it.
    CanReach(IpAddr),
}

impl fmt::Display for Criterion {
    /// The flag and value as the operator wrote them, e.g. `--iface-regex '^ens[0-9]+$'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Criterion::Name(n) => write!(f, "--iface '{n}'"),
            Criterion::Ip(ip) => write!(f, "--iface {ip}"),
            Criterion::Regex(r) => write!(f, "--iface-regex '{}'", r.as_str()),
            Criterion::CanReach(ip) => write!(f, "--iface-can-reach {ip}"),
        }
    }
}

/// The criteria, in the order they are tried; empty: the default route's interface.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    criteria: Vec<Criterion>,
}

impl Selector {
    /// `ifaces` (`--iface`: names or addresses, in order), then `regexes` (`--iface-regex`,
    /// compiled here: a bad one is an error naming it), then `can_reach`.
    pub fn new(ifaces: &[String], regexes: &[String], can_reach: Option<IpAddr>) -> Result<Self> {
        let mut criteria = Vec::new();
        for i in ifaces {
            let i = i.trim();
            if i.is_empty() {
                return Err(Error::Invalid(
                    "--iface: an empty entry (give interface names or addresses, comma separated in TWILLD_IFACE)".into(),
                ));
            }
            criteria.push(match i.parse::<IpAddr>() {
                Ok(ip) => Criterion::Ip(ip),
                Err(_) => Criterion::Name(i.to_string()),
            });
        }
        for r in regexes {
            let re = RegexBuilder::new(r).unicode(false).build().map_err(|e| {
                Error::Invalid(format!(
                    "--iface-regex '{r}': not a valid regular expression: {e}"
                ))
            })?;
            criteria.push(Criterion::Regex(re));
        }
        criteria.extend(can_reach.map(Criterion::CanReach));
        Ok(Selector { criteria })
    }

    /// No criterion: the default route's interface.
    pub fn is_default(&self) -> bool {
        self.criteria.is_empty()
    }

    pub fn criteria(&self) -> &[Criterion] {
        &self.criteria
    }
}

/// A link with its addresses, as the selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// IPv4 addresses first, then IPv6 (not link-local), each in the kernel's order.
    pub addrs: Vec<IpAddr>,
}

/// What the kernel's route lookup for `--iface-can-reach` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// RTA_OIF.
    pub oif: Option<u32>,
    /// RTA_PREFSRC: the source address the kernel would use.
    pub src: Option<IpAddr>,
    /// The route's type (unicast, local, unreachable, ...).
    pub kind: RouteType,
}

/// The interface a criterion found, and the address it found there (if it names one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub index: u32,
    pub ip: Option<IpAddr>,
}

/// At most this many interfaces are listed in a "tried:" list (a node has a veth per pod).
const TRIED_MAX: usize = 16;

/// "lo [127.0.0.1], eth0 [10.0.0.2, fd00::2], ... (+3 more)" (`with_addrs`), or the names.
fn tried(links: &[Candidate], with_addrs: bool) -> String {
    if links.is_empty() {
        return "no interfaces".into();
    }
    let mut out: Vec<String> = links
        .iter()
        .take(TRIED_MAX)
        .map(|l| {
            if with_addrs && !l.addrs.is_empty() {
                let a: Vec<String> = l.addrs.iter().map(IpAddr::to_string).collect();
                format!("{} [{}]", l.name, a.join(", "))
            } else {
                l.name.clone()
            }
        })
        .collect();
    if links.len() > TRIED_MAX {
        out.push(format!("... (+{} more)", links.len() - TRIED_MAX));
    }
    out.join(", ")
}

/// Matches one criterion against `links` (in the kernel's order). `reach` is the route
/// lookup's answer for a [`Criterion::CanReach`] (`Err`: the lookup failed). `Err`: why
/// nothing matched, naming the criterion and what was tried.
pub fn pick(
    links: &[Candidate],
    c: &Criterion,
    reach: Option<&std::result::Result<Reach, String>>,
) -> std::result::Result<Choice, String> {
    match c {
        Criterion::Name(n) => links
            .iter()
            .find(|l| &l.name == n)
            .map(|l| Choice {
                index: l.index,
                ip: None,
            })
            .ok_or_else(|| {
                format!(
                    "no interface named '{n}' ({c}; tried: {})",
                    tried(links, false)
                )
            }),
        Criterion::Ip(ip) => links
            .iter()
            .find(|l| l.addrs.contains(ip))
            .map(|l| Choice {
                index: l.index,
                ip: Some(*ip),
            })
            .ok_or_else(|| {
                format!(
                    "no interface has the address {ip} ({c}; tried: {})",
                    tried(links, true)
                )
            }),
        Criterion::Regex(re) => {
            let by_addr = links.iter().find_map(|l| {
                l.addrs
                    .iter()
                    .find(|a| re.is_match(a.to_string().as_bytes()))
                    .map(|a| Choice {
                        index: l.index,
                        ip: Some(*a),
                    })
            });
            let by_name = || {
                links
                    .iter()
                    .find(|l| re.is_match(l.name.as_bytes()))
                    .map(|l| Choice {
                        index: l.index,
                        ip: None,
                    })
            };
            by_addr.or_else(by_name).ok_or_else(|| {
                format!(
                    "no interface matches {c} by address or name (tried: {})",
                    tried(links, true)
                )
            })
        }
        Criterion::CanReach(dst) => {
            let r = match reach {
                Some(Ok(r)) => r,
                Some(Err(e)) => return Err(format!("no route to {dst} ({c}): {e}")),
                None => return Err(format!("{c}: the route to {dst} was not looked up")),
            };
            if r.kind == RouteType::Local {
                return Err(format!(
                    "{dst} is an address of this node ({c}: give another node's address)"
                ));
            }
            if r.kind != RouteType::Unicast {
                return Err(format!("the route to {dst} is of type {:?} ({c})", r.kind));
            }
            let oif = r
                .oif
                .ok_or_else(|| format!("the route to {dst} names no output interface ({c})"))?;
            let link = links.iter().find(|l| l.index == oif).ok_or_else(|| {
                format!(
                    "the route to {dst} leaves by interface index {oif}, which is not listed ({c})"
                )
            })?;
            Ok(Choice {
                index: link.index,
                ip: r.src,
            })
        }
    }
}

/// Tries `sel`'s criteria in order against `links`; `reach` answers the route lookups (in
/// [`resolve`], the kernel). The first that matches wins; when none does, the error lists
/// every criterion's reason.
pub fn choose(
    links: &[Candidate],
    sel: &Selector,
    mut reach: impl FnMut(IpAddr) -> std::result::Result<Reach, String>,
) -> Result<Choice> {
    let mut why = Vec::new();
    for c in sel.criteria() {
        let r = match c {
            Criterion::CanReach(dst) => Some(reach(*dst)),
            _ => None,
        };
        match pick(links, c, r.as_ref()) {
            Ok(choice) => return Ok(choice),
            Err(e) => why.push(e),
        }
    }
    Err(Error::Invalid(match why.len() {
        0 => "no --iface, --iface-regex or --iface-can-reach given".into(),
        1 => why.remove(0),
        _ => format!("no underlay interface: {}", why.join("; ")),
    }))
}

/// The links and their addresses, in the kernel's order (IPv4 addresses first), without
/// twill's VXLAN devices (`twill.<VNI>`).
async fn candidates(nl: &Netlink) -> Result<Vec<Candidate>> {
    let h = nl.handle();
    let links: Vec<_> = nl
        .run(
            || "dump links (underlay selection)".into(),
            h.link().get().execute().try_collect(),
        )
        .await?;
    let addrs: Vec<_> = nl
        .run(
            || "dump addresses (underlay selection)".into(),
            h.address().get().execute().try_collect(),
        )
        .await?;
    // IPv6 link-local addresses are left out: no peer can reach one across the underlay.
    let addrs: Vec<(u32, IpNet)> = addrs
        .iter()
        .map(parse::address)
        .filter_map(|a| Some((a.index, a.own()?)))
        .filter(|(_, n)| !matches!(n, IpNet::V6(v) if v.addr().is_unicast_link_local()))
        .collect();
    Ok(links
        .into_iter()
        .map(parse::link)
        // twill's own VXLAN devices carry the overlay: never its underlay.
        .filter(|l| !(l.kind.as_deref() == Some("vxlan") && l.name.starts_with("twill.")))
        .map(|l| {
            let mut own: Vec<IpAddr> = addrs
                .iter()
                .filter(|(i, _)| *i == l.index)
                .map(|(_, n)| n.addr())
                .collect();
            // Stable: the kernel's order within each family.
            own.sort_by_key(IpAddr::is_ipv6);
            Candidate {
                index: l.index,
                name: l.name,
                mtu: l.mtu.unwrap_or(0),
                addrs: own,
            }
        })
        .collect())
}

/// The kernel's route to `dst` (RTM_GETROUTE without NLM_F_DUMP: a lookup, as `ip route get`).
async fn lookup(nl: &Netlink, dst: IpAddr) -> std::result::Result<Reach, String> {
    let msg = match dst {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .build(),
    };
    let answer: Vec<RouteMessage> = nl
        .run(
            || format!("look up the route to {dst} (--iface-can-reach)"),
            nl.handle().route().get(msg).execute().try_collect(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let m = answer
        .first()
        .ok_or_else(|| "the kernel answered no route".to_string())?;
    Ok(reach_of(m))
}

/// RTA_OIF, RTA_PREFSRC and the type of a route lookup's answer.
fn reach_of(m: &RouteMessage) -> Reach {
    let mut r = Reach {
        oif: None,
        src: None,
        kind: m.header.kind,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::PrefSource(s) => r.src = parse::route_addr(s),
            _ => {}
        }
    }
    r
}

/// Finds the underlay: by `sel`'s criteria (see [`Selector`]), else the output interface of
/// the main table's IPv4 default route; `public_ip`, else the address the criterion found,
/// else the first IPv4 address on it (then IPv6).
pub async fn resolve(nl: &Netlink, sel: &Selector, public_ip: Option<IpAddr>) -> Result<Underlay> {
    let links = candidates(nl).await?;
    let choice = if sel.is_default() {
        Choice {
            index: default_route_oif(nl).await?,
            ip: None,
        }
    } else {
        let mut reaches = Vec::new();
        for c in sel.criteria() {
            if let Criterion::CanReach(dst) = c {
                reaches.push((*dst, lookup(nl, *dst).await));
            }
        }
        choose(&links, sel, |dst| {
            reaches
                .iter()
                .find(|(d, _)| *d == dst)
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| Err("not looked up".into()))
        })?
    };
    let link = links
        .iter()
        .find(|l| l.index == choice.index)
        .ok_or_else(|| Error::LinkNotFound(format!("index {}", choice.index)))?;
    let ip = match public_ip
        .or(choice.ip)
        .or_else(|| link.addrs.first().copied())
    {
        Some(ip) => ip,
        None => {
            return Err(Error::Invalid(format!(
                "underlay {} has no IP address: give --public-ip",
                link.name
            )));
        }
    };
    Ok(Underlay {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        ip,
    })
}

/// The output interface of the main table's IPv4 default route.
async fn default_route_oif(nl: &Netlink) -> Result<u32> {
    let routes: Vec<_> = nl
        .run(
            || "dump IPv4 routes for the default route".into(),
            nl.handle()
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect(),
        )
        .await?;
    routes
        .iter()
        .filter_map(parse::route)
        .filter(|r| r.dst.prefix_len() == 0)
        .find_map(|r| r.oif)
        .ok_or_else(|| {
            Error::Invalid(
                "no IPv4 default route to find the underlay interface: give --iface, --iface-regex or --iface-can-reach".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<Candidate> {
        let l = |index, name: &str, addrs: &[&str]| Candidate {
            index,
            name: name.into(),
            mtu: 1500,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        };
        vec![
            l(1, "lo", &["127.0.0.1", "::1"]),
            l(2, "eth0", &["192.168.1.10", "fd00::10"]),
            l(3, "ens4", &["10.0.0.4"]),
            l(4, "ens5", &[]),
            l(5, "cni0", &["10.244.3.1"]),
        ]
    }

    fn sel(ifaces: &[&str], regexes: &[&str], reach: Option<&str>) -> Selector {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Selector::new(&s(ifaces), &s(regexes), reach.map(|r| r.parse().unwrap())).unwrap()
    }

    fn no_route(_: IpAddr) -> std::result::Result<Reach, String> {
        Err("ENETUNREACH".into())
    }

    fn pick_of(s: &Selector) -> std::result::Result<Choice, String> {
        choose(&links(), s, no_route).map_err(|e| e.to_string())
    }

    fn at(index: u32, ip: Option<&str>) -> std::result::Result<Choice, String> {
        Ok(Choice {
            index,
            ip: ip.map(|i| i.parse().unwrap()),
        })
    }

    #[test]
    fn an_iface_entry_is_a_name_or_an_address() {
        assert_eq!(pick_of(&sel(&["ens4"], &[], None)), at(3, None));
        // An address names its interface and is the public IP.
        assert_eq!(
            pick_of(&sel(&["fd00::10"], &[], None)),
            at(2, Some("fd00::10"))
        );
        assert_eq!(
            pick_of(&sel(&[" 10.0.0.4 "], &[], None)),
            at(3, Some("10.0.0.4"))
        );
    }

    #[test]
    fn the_first_criterion_that_resolves_wins_in_order() {
        // --iface entries in the order given: a missing one is skipped.
        assert_eq!(
            pick_of(&sel(&["eth9", "ens5", "eth0"], &[], None)),
            at(4, None)
        );
        assert_eq!(pick_of(&sel(&["eth0", "ens5"], &[], None)), at(2, None));
        // --iface before --iface-regex, whatever the order of the links.
        assert_eq!(pick_of(&sel(&["ens5"], &["^eth"], None)), at(4, None));
        // A regex only when every --iface failed; regexes in order.
        assert_eq!(
            pick_of(&sel(&["eth9"], &["^nope$", "^ens"], None)),
            at(3, None)
        );
        // --iface-can-reach last.
        let reach = |_| {
            Ok(Reach {
                oif: Some(2),
                src: Some("192.168.1.10".parse().unwrap()),
                kind: RouteType::Unicast,
            })
        };
        assert_eq!(
            choose(&links(), &sel(&["ens4"], &[], Some("192.168.1.1")), reach).unwrap(),
            at(3, None).unwrap()
        );
        assert_eq!(
            choose(
                &links(),
                &sel(&["eth9"], &["^x"], Some("192.168.1.1")),
                reach
            )
            .unwrap(),
            at(2, Some("192.168.1.10")).unwrap()
        );
    }

    #[test]
    fn a_regex_matches_addresses_before_names() {
        // "10" matches ens4's address before any name: the matched address is the public IP.
        assert_eq!(
            pick_of(&sel(&[], &["^10\\.0\\."], None)),
            at(3, Some("10.0.0.4"))
        );
        // An IPv6 address matches too.
        assert_eq!(
            pick_of(&sel(&[], &["^fd00::"], None)),
            at(2, Some("fd00::10"))
        );
        // By name: the first link in the kernel's order; unanchored unless written so.
        assert_eq!(pick_of(&sel(&[], &["ens"], None)), at(3, None));
        assert_eq!(pick_of(&sel(&[], &["^ens5$"], None)), at(4, None));
        assert_eq!(pick_of(&sel(&[], &["th0"], None)), at(2, None));
    }

    #[test]
    fn each_failure_names_what_was_tried() {
        let e = pick_of(&sel(&[], &["^wlan[0-9]+$"], None)).unwrap_err();
        assert_eq!(
            e,
            "no interface matches --iface-regex '^wlan[0-9]+$' by address or name (tried: lo [127.0.0.1, ::1], eth0 [192.168.1.10, fd00::10], ens4 [10.0.0.4], ens5, cni0 [10.244.3.1])"
        );
        let e = pick_of(&sel(&["eth9"], &[], None)).unwrap_err();
        assert_eq!(
            e,
            "no interface named 'eth9' (--iface 'eth9'; tried: lo, eth0, ens4, ens5, cni0)"
        );
        let e = pick_of(&sel(&["10.9.9.9"], &[], None)).unwrap_err();
        assert!(e.starts_with("no interface has the address 10.9.9.9 (--iface 10.9.9.9; tried: lo [127.0.0.1, ::1], eth0"), "{e}");
        // Several criteria: every reason, in order.
        let e = pick_of(&sel(&["eth9", "eth8"], &["^wlan"], Some("10.1.1.1"))).unwrap_err();
        assert!(
            e.starts_with("no underlay interface: no interface named 'eth9'"),
            "{e}"
        );
        assert!(
            e.contains("no interface named 'eth8' (--iface 'eth8'"),
            "{e}"
        );
        assert!(
            e.contains("no interface matches --iface-regex '^wlan'"),
            "{e}"
        );
        assert!(
            e.ends_with("no route to 10.1.1.1 (--iface-can-reach 10.1.1.1): ENETUNREACH"),
            "{e}"
        );
    }

    #[test]
    fn the_tried_list_is_bounded() {
        let many: Vec<Candidate> = (1..=40)
            .map(|i| Candidate {
                index: i,
                name: format!("veth{i}"),
                mtu: 1500,
                addrs: vec![],
            })
            .collect();
        let e = pick(&many, &Criterion::Name("eth0".into()), None).unwrap_err();
        assert!(e.ends_with("veth16, ... (+24 more))"), "{e}");
    }

    #[test]
    fn can_reach_follows_the_route_and_refuses_what_cannot_carry_vxlan() {
        let c = Criterion::CanReach("10.0.0.1".parse().unwrap());
        let r = |oif, kind| {
            Ok(Reach {
                oif,
                src: Some("10.0.0.4".parse().unwrap()),
                kind,
            })
        };
        assert_eq!(
            pick(&links(), &c, Some(&r(Some(3), RouteType::Unicast))),
            at(3, Some("10.0.0.4"))
        );
        let e = pick(&links(), &c, Some(&r(Some(1), RouteType::Local))).unwrap_err();
        assert!(e.contains("10.0.0.1 is an address of this node"), "{e}");
        let e = pick(&links(), &c, Some(&r(None, RouteType::Unreachable))).unwrap_err();
        assert!(e.contains("of type Unreachable"), "{e}");
        let e = pick(&links(), &c, Some(&r(Some(99), RouteType::Unicast))).unwrap_err();
        assert!(e.contains("interface index 99"), "{e}");
    }

    #[test]
    fn bad_input_is_refused_by_flag_and_value() {
        let e = Selector::new(&[], &["(ens".into()], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--iface-regex '(ens': not a valid regular expression"),
            "{e}"
        );
        let e = Selector::new(&["eth0".into(), "".into()], &[], None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--iface: an empty entry"), "{e}");
        assert!(Selector::new(&[], &[], None).unwrap().is_default());
        // The Perl classes and case folding are there, in their ASCII forms.
        assert_eq!(pick_of(&sel(&[], &[r"^ens\d$"], None)), at(3, None));
        assert_eq!(pick_of(&sel(&[], &[r"(?i)^ENS\w$"], None)), at(3, None));
        assert_eq!(
            pick_of(&sel(&[], &[r"^10\.0\.0\.\d+$"], None)),
            at(3, Some("10.0.0.4"))
        );
        let e = Selector::new(&[], &[r"^\p{L}".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(r"--iface-regex '^\p{L}': not a valid"), "{e}");
    }
}
