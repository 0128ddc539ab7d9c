//! Subnet choice: which subnet a node takes, given what is taken. Pure: no etcd, no clock,
//! no randomness from outside (the lease store calls [`choose`] once per acquisition attempt
//! with the subnets it just listed).
//!
//! The order is: this node's own key (sticky; the preferred one first), then the caller's
//! preference (the subnet it had), then the node's home subnet (a hash of its name), then a
//! pseudo-random free subnet. A node whose key expired while it was down, and whose
//! preference is gone too (/run is tmpfs), still gets its old subnet back when that was its
//! home and is free.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::netconf::NetConfig;

/// An address family's subnet type ([`Ipv4Net`], [`Ipv6Net`]) seen as numbers: what
/// [`SubnetRange`] needs to count, index and check subnets of either family in u128.
pub trait Family: Copy + Eq + Ord + Hash + Debug + std::fmt::Display {
    /// The address type (`Ipv4Addr`, `Ipv6Addr`).
    type Addr: Copy + Ord + Debug;
    /// Address width: 32 or 128.
    const BITS: u8;
    fn addr_bits(a: Self::Addr) -> u128;
    fn addr_from_bits(b: u128) -> Self::Addr;
    /// The subnet at `addr` of prefix length `len` (`len` <= BITS).
    fn make(addr: Self::Addr, len: u8) -> Self;
    /// The address as written (host bits included).
    fn addr(&self) -> Self::Addr;
    fn prefix(&self) -> u8;
}

impl Family for Ipv4Net {
    type Addr = Ipv4Addr;
    const BITS: u8 = 32;
    fn addr_bits(a: Ipv4Addr) -> u128 {
        u128::from(u32::from(a))
    }
    fn addr_from_bits(b: u128) -> Ipv4Addr {
        Ipv4Addr::from(b as u32)
    }
    fn make(addr: Ipv4Addr, len: u8) -> Self {
        Ipv4Net::new(addr, len).expect("prefix length <= 32")
    }
    fn addr(&self) -> Ipv4Addr {
        Ipv4Net::addr(self)
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
}

impl Family for Ipv6Net {
    type Addr = Ipv6Addr;
    const BITS: u8 = 128;
    fn addr_bits(a: Ipv6Addr) -> u128 {
        u128::from(a)
    }
    fn addr_from_bits(b: u128) -> Ipv6Addr {
        Ipv6Addr::from(b)
    }
    fn make(addr: Ipv6Addr, len: u8) -> Self {
        Ipv6Net::new(addr, len).expect("prefix length <= 128")
    }
    fn addr(&self) -> Ipv6Addr {
        Ipv6Net::addr(self)
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
}

/// The candidate subnets of one family: every `/len` block from `min` to `max` inclusive
/// (`SubnetMin..=SubnetMax`, `IPv6SubnetMin..=IPv6SubnetMax`), indexed from 0 at `min`. The
/// arithmetic is in u128: an IPv6 range of 2^64 subnets or more is counted and indexed, never
/// enumerated. [`NetConfig`] builds valid ranges (`min` <= `max`, both on a `/len` boundary,
/// `len` >= 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange<N: Family> {
    pub min: N::Addr,
    pub max: N::Addr,
    pub len: u8,
}

impl<N: Family> SubnetRange<N> {
    fn size(&self) -> u128 {
        1u128 << (N::BITS - self.len)
    }

    /// How many subnets the range holds (0 if `max` < `min`).
    pub fn count(&self) -> u128 {
        let (lo, hi) = (N::addr_bits(self.min), N::addr_bits(self.max));
        if hi < lo {
            0
        } else {
            (hi - lo) / self.size() + 1
        }
    }

    /// The `index`-th subnet (0-based from `min`), if inside the range.
    pub fn at(&self, index: u128) -> Option<N> {
        (index < self.count()).then(|| {
            let addr = N::addr_bits(self.min) + index * self.size();
            N::make(N::addr_from_bits(addr), self.len)
        })
    }

    /// The index of `subnet` if it is one of the range's: the right length, no host bits,
    /// inside `min..=max`.
    pub fn index_of(&self, subnet: &N) -> Option<u128> {
        let a = N::addr_bits(subnet.addr());
        let (lo, hi) = (N::addr_bits(self.min), N::addr_bits(self.max));
        let ok =
            subnet.prefix() == self.len && a.is_multiple_of(self.size()) && (lo..=hi).contains(&a);
        ok.then(|| (a - lo) / self.size())
    }

    /// Whether `subnet` is one of the range's ([`SubnetRange::index_of`]).
    pub fn contains(&self, subnet: &N) -> bool {
        self.index_of(subnet).is_some()
    }
}

/// What [`choose`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice<N = Ipv4Net> {
    /// A subnet whose key already names this node: take that key over.
    Own(N),
    /// A free subnet: create its key if it is still absent.
    Free(N),
}

impl<N: Copy> Choice<N> {
    /// The subnet picked.
    pub fn subnet(&self) -> N {
        match self {
            Choice::Own(s) | Choice::Free(s) => *s,
        }
    }
}

/// The IPv4 subnet `node` takes under `cfg`: [`choose_in`] over `cfg`'s
/// `SubnetMin..=SubnetMax`.
pub fn choose(
    cfg: &NetConfig,
    taken: &HashSet<Ipv4Net>,
    own: &[Ipv4Net],
    prefer: Option<Ipv4Net>,
    node: &str,
) -> Option<Choice> {
    choose_in(&cfg.range(), taken, own, prefer, node)
}

/// The subnet `node` takes in `range` (either family; for IPv6 the range is
/// [`NetConfig::ipv6_range`]):
/// - one of `own` (its keys), `prefer` first, then the lowest;
/// - else `prefer` if it is in the range and not in `taken`;
/// - else the node's home subnet ([`home_subnet_in`]) if it is free;
/// - else a free subnet drawn from a sequence seeded by the node's name and the number of
///   taken subnets: different nodes spread over the range, and a retry after a collision
///   (with the collided subnet now in `taken`) draws again.
///
/// `None`: every candidate subnet is in `taken` (the network is full). `taken` may hold
/// subnets outside the range (stranded leases); they take nothing from it.
pub fn choose_in<N: Family>(
    range: &SubnetRange<N>,
    taken: &HashSet<N>,
    own: &[N],
    prefer: Option<N>,
    node: &str,
) -> Option<Choice<N>> {
    if let Some(s) = own.iter().min_by_key(|s| (Some(**s) != prefer, **s)) {
        return Some(Choice::Own(*s));
    }
    if count_free_in(range, taken) == 0 {
        return None;
    }
    let free = |s: &N| range.contains(s) && !taken.contains(s);
    let s = [prefer, home_subnet_in(range, node)]
        .into_iter()
        .flatten()
        .find(free)
        .unwrap_or_else(|| pick_free(range, taken, node));
    Some(Choice::Free(s))
}

/// Number of candidate IPv4 subnets of `cfg` not in `taken`.
pub fn count_free(cfg: &NetConfig, taken: &HashSet<Ipv4Net>) -> u64 {
    count_free_in(&cfg.range(), taken) as u64
}

/// Number of subnets of `range` not in `taken`.
pub fn count_free_in<N: Family>(range: &SubnetRange<N>, taken: &HashSet<N>) -> u128 {
    let used = taken.iter().filter(|s| range.contains(s)).count() as u128;
    range.count().saturating_sub(used)
}

/// The IPv4 subnet a node tries first when it holds none ([`home_subnet_in`]).
pub fn home_subnet(cfg: &NetConfig, node: &str) -> Option<Ipv4Net> {
    home_subnet_in(&cfg.range(), node)
}

/// The subnet a node tries first when it holds none: the stable hash of its name over the
/// range's subnets. Stable across versions and restarts, uniform across names. A range of
/// more than 2^64 subnets (IPv6) is indexed with the hash widened to 128 bits.
pub fn home_subnet_in<N: Family>(range: &SubnetRange<N>, node: &str) -> Option<N> {
    let count = range.count();
    if count == 0 {
        return None;
    }
    let h = crate::mac::stable_hash(node.bytes());
    let wide = if count > u128::from(u64::MAX) {
        (u128::from(h) << 64) | u128::from(Draw(h).next())
    } else {
        u128::from(h)
    };
    range.at(wide % count)
}

/// splitmix64: a small, well-mixed sequence from one seed.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw in `0..n` (`n` > 0): one step of the sequence while `n` fits in 64 bits, two
    /// above.
    fn below(&mut self, n: u128) -> u128 {
        if n <= u128::from(u64::MAX) {
            u128::from(self.next()) % n
        } else {
            ((u128::from(self.next()) << 64) | u128::from(self.next())) % n
        }
    }
}

/// A free subnet of `range`: a few probes first, then the k-th free subnet for a drawn k,
/// found by stepping over the sorted taken indices below it (no enumeration of the range).
/// `taken` must leave at least one free.
fn pick_free<N: Family>(range: &SubnetRange<N>, taken: &HashSet<N>, node: &str) -> N {
    let count = range.count();
    let mut draw =
        Draw(crate::mac::stable_hash(node.bytes()) ^ (taken.len() as u64).rotate_left(32));
    for _ in 0..16 {
        let s = range.at(draw.below(count)).expect("index in range");
        if !taken.contains(&s) {
            return s;
        }
    }
    let mut used: Vec<u128> = taken.iter().filter_map(|s| range.index_of(s)).collect();
    used.sort_unstable();
    let mut k = draw.below(count - used.len() as u128);
    for t in used {
        if t > k {
            break;
        }
        k += 1;
    }
    range.at(k).expect("a free index is in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NetConfig {
        NetConfig::from_json(json).unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn small() -> NetConfig {
        // 10.5.0.0/16 in /24s, only 10.5.1.0..=10.5.4.0: four candidates.
        cfg(
            r#"{"Network":"10.5.0.0/16","SubnetLen":24,"SubnetMin":"10.5.1.0","SubnetMax":"10.5.4.0"}"#,
        )
    }

    #[test]
    fn own_subnet_is_sticky_and_preferred_first() {
        let c = small();
        let own = [net("10.5.3.0/24"), net("10.5.2.0/24")];
        let taken: HashSet<_> = own.iter().copied().collect();
        // The lowest of its own keys without a preference...
        assert_eq!(
            choose(&c, &taken, &own, None, "a"),
            Some(Choice::Own(net("10.5.2.0/24")))
        );
        // ...the preferred one when it is one of them...
        assert_eq!(
            choose(&c, &taken, &own, Some(net("10.5.3.0/24")), "a"),
            Some(Choice::Own(net("10.5.3.0/24")))
        );
        // ...and an own key wins over a free preferred subnet.
        assert_eq!(
            choose(&c, &taken, &own, Some(net("10.5.4.0/24")), "a"),
            Some(Choice::Own(net("10.5.2.0/24")))
        );
        // Even in a full network.
        let all: HashSet<_> = c.subnets().collect();
        assert_eq!(
            choose(&c, &all, &own[..1], None, "a"),
            Some(Choice::Own(net("10.5.3.0/24")))
        );
    }

    #[test]
    fn preferred_subnet_when_free_and_valid() {
        let c = small();
        let none = HashSet::new();
        let p = net("10.5.4.0/24");
        assert_eq!(choose(&c, &none, &[], Some(p), "a"), Some(Choice::Free(p)));
        // Taken (another node's lease, a reservation or a grace key): not it.
        let taken: HashSet<_> = [p].into();
        let got = choose(&c, &taken, &[], Some(p), "a").unwrap();
        assert_ne!(got.subnet(), p);
        assert!(matches!(got, Choice::Free(_)));
        // Outside SubnetMin..=SubnetMax, or the wrong length: ignored.
        for bad in ["10.5.9.0/24", "10.5.0.0/24", "10.5.2.0/25", "10.6.1.0/24"] {
            let got = choose(&c, &none, &[], Some(net(bad)), "a").unwrap();
            assert!(c.is_valid_subnet(&got.subnet()), "{bad} -> {got:?}");
        }
    }

    #[test]
    fn home_subnet_is_deterministic_per_node_name() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#);
        let none = HashSet::new();
        for node in ["node-1", "node-2", "worker.example.com", ""] {
            let home = home_subnet(&c, node).unwrap();
            assert!(c.is_valid_subnet(&home));
            assert_eq!(choose(&c, &none, &[], None, node), Some(Choice::Free(home)));
            assert_eq!(choose(&c, &none, &[], None, node), Some(Choice::Free(home)));
        }
        // FNV-1a of "node-1" (checked against an independent implementation): a value
        // fixed across versions, so a node finds its home again after an upgrade.
        assert_eq!(crate::mac::stable_hash(*b"node-1"), 0xe696_ecc2_2078_79c3);
        let spread: HashSet<_> = (0..100)
            .map(|i| home_subnet(&c, &format!("node-{i}")).unwrap())
            .collect();
        assert!(spread.len() > 95, "{} distinct homes", spread.len());
    }

    #[test]
    fn taken_home_draws_a_free_subnet_that_changes_after_a_collision() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#);
        let home = home_subnet(&c, "n").unwrap();
        let mut taken: HashSet<_> = [home].into();
        let first = choose(&c, &taken, &[], None, "n").unwrap().subnet();
        assert_ne!(first, home);
        assert!(c.is_valid_subnet(&first));
        // The same inputs, the same pick (nothing random from outside).
        assert_eq!(choose(&c, &taken, &[], None, "n").unwrap().subnet(), first);
        // Another node that collided on it picks again.
        taken.insert(first);
        let second = choose(&c, &taken, &[], None, "n").unwrap().subnet();
        assert!(!taken.contains(&second));
    }

    #[test]
    fn range_limits_and_the_last_free_subnet() {
        let c = small();
        let all: Vec<Ipv4Net> = c.subnets().collect();
        assert_eq!(all.len(), 4);
        // Leave exactly one free: every node gets it.
        for free in &all {
            let taken: HashSet<_> = all.iter().filter(|s| *s != free).copied().collect();
            for node in ["a", "b", "c", "d", "e"] {
                assert_eq!(
                    choose(&c, &taken, &[], None, node),
                    Some(Choice::Free(*free))
                );
            }
        }
        // Many draws stay inside SubnetMin..=SubnetMax.
        let taken = HashSet::new();
        for i in 0..200 {
            let s = choose(&c, &taken, &[], None, &format!("x{i}"))
                .unwrap()
                .subnet();
            assert!(c.is_valid_subnet(&s), "{s}");
        }
    }

    #[test]
    fn full_network_and_stranded_keys() {
        let c = small();
        let mut taken: HashSet<_> = c.subnets().collect();
        assert_eq!(count_free(&c, &taken), 0);
        assert_eq!(choose(&c, &taken, &[], None, "a"), None);
        assert_eq!(choose(&c, &taken, &[], Some(net("10.5.1.0/24")), "a"), None);
        // Keys outside the range (left by an older config) take nothing from it.
        taken.remove(&net("10.5.2.0/24"));
        taken.insert(net("10.5.9.0/24"));
        taken.insert(net("10.9.0.0/16"));
        assert_eq!(count_free(&c, &taken), 1);
        assert_eq!(
            choose(&c, &taken, &[], None, "a"),
            Some(Choice::Free(net("10.5.2.0/24")))
        );
    }

    #[test]
    fn one_candidate_range() {
        let c = cfg(
            r#"{"Network":"10.7.0.0/16","SubnetLen":24,"SubnetMin":"10.7.5.0","SubnetMax":"10.7.5.0"}"#,
        );
        assert_eq!(c.subnet_count(), 1);
        let none = HashSet::new();
        for node in ["a", "b"] {
            assert_eq!(
                choose(&c, &none, &[], None, node),
                Some(Choice::Free(net("10.7.5.0/24")))
            );
        }
        let taken: HashSet<_> = [net("10.7.5.0/24")].into();
        assert_eq!(choose(&c, &taken, &[], None, "a"), None);
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_choice_follows_the_same_rules() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/8"}"#);
        let r = c.ipv6_range().unwrap();
        assert_eq!(r.count(), (1u128 << 56) - 1);
        // More than 2^64 subnets: the home is drawn over all of them.
        let huge = cfg(
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/8","IPv6SubnetLen":120}"#,
        );
        let hr = huge.ipv6_range().unwrap();
        assert_eq!(hr.count(), (1u128 << 112) - 1);
        let homes: Vec<_> = (0..50)
            .map(|i| {
                hr.index_of(&home_subnet_in(&hr, &format!("n{i}")).unwrap())
                    .unwrap()
            })
            .collect();
        assert!(homes.iter().any(|i| *i > u128::from(u64::MAX)), "{homes:?}");
        let none = HashSet::new();
        // Home: deterministic per name, inside the range, spread.
        let home = home_subnet_in(&r, "node-1").unwrap();
        assert!(r.contains(&home));
        assert_eq!(
            choose_in(&r, &none, &[], None, "node-1"),
            Some(Choice::Free(home))
        );
        let spread: HashSet<_> = (0..100)
            .map(|i| home_subnet_in(&r, &format!("node-{i}")).unwrap())
            .collect();
        assert_eq!(spread.len(), 100);
        // Own keys first (the preferred one), then a free preferred subnet.
        let own = [net6("fd00:0:0:9::/64"), net6("fd00:0:0:5::/64")];
        assert_eq!(
            choose_in(&r, &none, &own, None, "a"),
            Some(Choice::Own(net6("fd00:0:0:5::/64")))
        );
        assert_eq!(
            choose_in(&r, &none, &own, Some(own[0]), "a"),
            Some(Choice::Own(own[0]))
        );
        let p = net6("fd00:0:0:7::/64");
        assert_eq!(
            choose_in(&r, &none, &[], Some(p), "a"),
            Some(Choice::Free(p))
        );
        // A preference outside the range or of another length is ignored.
        for bad in ["fd00::/64", "fd00:0:0:7::/65", "fe00::/64"] {
            let got = choose_in(&r, &none, &[], Some(net6(bad)), "a")
                .unwrap()
                .subnet();
            assert!(r.contains(&got), "{bad} -> {got}");
        }
        // The home taken: another free subnet, and again after a collision.
        let mut taken: HashSet<_> = [home].into();
        let first = choose_in(&r, &taken, &[], None, "node-1").unwrap().subnet();
        assert!(first != home && r.contains(&first));
        taken.insert(first);
        let second = choose_in(&r, &taken, &[], None, "node-1").unwrap().subnet();
        assert!(!taken.contains(&second));
    }

    /// The k-th-free fallback (after the probes miss) finds the one free subnet of a small
    /// IPv6 range, and says full when there is none; the range is never enumerated.
    #[test]
    fn ipv6_last_free_subnet_and_full() {
        let c = cfg(
            r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:10::","IPv6SubnetMax":"fd00:0:0:4f::"}"#,
        );
        let r = c.ipv6_range().unwrap();
        assert_eq!(r.count(), 64);
        let all: Vec<Ipv6Net> = (0..64).map(|i| r.at(i).unwrap()).collect();
        for free in [all[0], all[31], all[63]] {
            let mut taken: HashSet<_> = all.iter().filter(|s| **s != free).copied().collect();
            // Stranded keys outside the range count for nothing.
            taken.insert(net6("fd00:0:0:1::/64"));
            assert_eq!(count_free_in(&r, &taken), 1);
            for node in ["a", "b", "c"] {
                assert_eq!(
                    choose_in(&r, &taken, &[], None, node),
                    Some(Choice::Free(free))
                );
            }
        }
        let taken: HashSet<_> = all.iter().copied().collect();
        assert_eq!(choose_in(&r, &taken, &[], None, "a"), None);
    }

    #[test]
    fn range_index_arithmetic() {
        let r = SubnetRange::<Ipv6Net> {
            min: "fd00:0:0:1::".parse().unwrap(),
            max: "fd00:ff:ffff:ffff::".parse().unwrap(),
            len: 64,
        };
        let count = r.count();
        assert_eq!(count, (1u128 << 40) - 1);
        let last = r.at(count - 1).unwrap();
        assert_eq!(last, net6("fd00:ff:ffff:ffff::/64"));
        assert_eq!(r.index_of(&last), Some(count - 1));
        assert_eq!(r.at(count), None);
        assert_eq!(r.index_of(&net6("fd00::/64")), None);
        // The IPv4 range of a config is the one its old accessors describe.
        let c = small();
        assert_eq!(c.range().count(), u128::from(c.subnet_count()));
        assert_eq!(c.range().at(1), c.subnet_at(1));
    }
}
