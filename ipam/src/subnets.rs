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

use ipnet::Ipv4Net;

use crate::netconf::NetConfig;

/// What [`choose`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A subnet whose key already names this node: take that key over.
    Own(Ipv4Net),
    /// A free subnet: create its key if it is still absent.
    Free(Ipv4Net),
}

impl Choice {
    /// The subnet picked.
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            Choice::Own(s) | Choice::Free(s) => *s,
        }
    }
}

/// The subnet `node` takes under `cfg`:
/// - one of `own` (its keys), `prefer` first, then the lowest;
/// - else `prefer` if it is valid and not in `taken`;
/// - else the node's home subnet ([`home_subnet`]) if it is free;
/// - else a free subnet drawn from a sequence seeded by the node's name and the number of
///   taken subnets: different nodes spread over the range, and a retry after a collision
///   (with the collided subnet now in `taken`) draws again.
///
/// `None`: every candidate subnet is in `taken` (the network is full). `taken` may hold
/// subnets outside `cfg` (stranded leases); they take nothing from the range.
pub fn choose(
    cfg: &NetConfig,
    taken: &HashSet<Ipv4Net>,
    own: &[Ipv4Net],
    prefer: Option<Ipv4Net>,
    node: &str,
) -> Option<Choice> {
    if let Some(s) = own.iter().min_by_key(|s| (Some(**s) != prefer, **s)) {
        return Some(Choice::Own(*s));
    }
    if count_free(cfg, taken) == 0 {
        return None;
    }
    let free = |s: &Ipv4Net| cfg.is_valid_subnet(s) && !taken.contains(s);
    let s = [prefer, home_subnet(cfg, node)]
        .into_iter()
        .flatten()
        .find(free)
        .unwrap_or_else(|| pick_free(cfg, taken, node));
    Some(Choice::Free(s))
}

/// Number of candidate subnets of `cfg` not in `taken`.
pub fn count_free(cfg: &NetConfig, taken: &HashSet<Ipv4Net>) -> u64 {
    let used = taken.iter().filter(|s| cfg.is_valid_subnet(s)).count() as u64;
    cfg.subnet_count().saturating_sub(used)
}

/// The subnet a node tries first when it holds none: the stable hash of its name over the
/// candidate subnets. Stable across versions and restarts, uniform across names.
pub fn home_subnet(cfg: &NetConfig, node: &str) -> Option<Ipv4Net> {
    let count = cfg.subnet_count();
    if count == 0 {
        return None;
    }
    cfg.subnet_at(crate::mac::stable_hash(node.bytes()) % count)
}

/// splitmix64: a small, well-mixed sequence from one seed.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// A free candidate: a few probes first (cheap for large ranges), then a pick among the
/// enumerated free subnets. `taken` must leave at least one free.
fn pick_free(cfg: &NetConfig, taken: &HashSet<Ipv4Net>, node: &str) -> Ipv4Net {
    let count = cfg.subnet_count();
    let mut draw =
        Draw(crate::mac::stable_hash(node.bytes()) ^ (taken.len() as u64).rotate_left(32));
    for _ in 0..16 {
        let s = cfg.subnet_at(draw.below(count)).expect("index in range");
        if !taken.contains(&s) {
            return s;
        }
    }
    let free: Vec<Ipv4Net> = cfg.subnets().filter(|s| !taken.contains(s)).collect();
    free[draw.below(free.len() as u64) as usize]
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
}
