//! The acquisition algorithm: which key a node takes, in named steps.
//!
//! [`LeaseStore::acquire_with`] and [`LeaseStore::acquire_only`] run an [`Acquisition`]:
//! grant the etcd lease(s) while listing the subnets, then per attempt [`Acquisition::scan`]
//! the listed keys, refuse a duplicate node name, pick with [`crate::subnets::choose`], and
//! write with one conditional write ([`Acquisition::take_own`], [`Acquisition::rekey`] or
//! [`Acquisition::create`]). A write that lost a race returns the fresh list (in the same
//! transaction) and the next attempt picks again.
//!
//! Dual-stack (the config's `EnableIPv6` with an `IPv6Network`): the node's key is Flannel's
//! `<v4>-<len>&<v6>-<len>`, both subnets chosen together and written as one key in one
//! transaction. etcd cannot compare "no key holds this IPv6 subnet" (it is the key's suffix),
//! so a dual-stack write is guarded by the listing it was chosen from: no key under
//! `<prefix>/subnets/` created or changed since that listing's revision. An IPv4-only write
//! is guarded by its key's absence and the absence of any `<v4>-<len>&...` key.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::{Ipv4Net, Ipv6Net};

use super::backend::{Cond, KeyValue, Listing, Put, Written};
use super::{LeaseStore, StoreError};
use crate::lease::{Lease, LeaseAttrs, SubnetKey, key_to_subnet};
use crate::netconf::NetConfig;
use crate::subnets::{Choice, SubnetRange, choose, choose_in};

/// Maximum number of conditional writes of one acquisition.
const MAX_ATTEMPTS: u32 = 1000;

/// What an acquisition took.
#[derive(Debug)]
struct Acquired {
    subnet: Ipv4Net,
    /// The IPv6 subnet of a dual-stack key.
    ipv6_subnet: Option<Ipv6Net>,
    /// A reservation of this node (kept without TTL).
    reserved: bool,
    /// The revision of the write.
    revision: i64,
    /// The attributes written (the caller's, with the unknown fields of an own key kept).
    attrs: LeaseAttrs,
}

/// The result of one attempt.
// One per attempt, returned and matched at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Took(Acquired),
    /// Lost a race: the keys as listed by the refused write.
    Retry(Listing),
}

/// The listed keys, as seen by one node.
#[derive(Default)]
struct Scan<'k> {
    /// Every IPv4 subnet with a key, and those in another node's grace period.
    taken: HashSet<Ipv4Net>,
    /// Every IPv6 subnet with a key (dual-stack or IPv6-only).
    taken6: HashSet<Ipv6Net>,
    /// This node's own keys (valid under the config, with its PublicIP or none).
    own: Vec<(SubnetKey, &'k KeyValue)>,
    /// A key of this node's name from another PublicIP: (subnet, that IP, reserved).
    duplicate: Option<(Ipv4Net, Ipv4Addr, bool)>,
}

/// One acquisition, with the etcd leases granted for it.
struct Acquisition<'a> {
    store: &'a LeaseStore,
    cfg: &'a NetConfig,
    attrs: &'a LeaseAttrs,
    prefer: Option<Ipv4Net>,
    /// The IPv6 subnet preferred for a new dual-stack key.
    prefer6: Option<Ipv6Net>,
    /// Take `prefer` (this node's key of it, or the subnet if free) and no other.
    only: bool,
    lease_id: i64,
    grace_lease: Option<i64>,
    /// Subnets in another node's grace period, with that node's name.
    in_grace: HashMap<Ipv4Net, String>,
    /// The IPv6 subnets handed out (dual-stack), if any.
    v6: Option<SubnetRange<Ipv6Net>>,
}

/// A key name under `<prefix>/subnets/` read for its subnets: `<v4>-<len>`, or Flannel's
/// `<v4>-<len>&<v6>-<len>` and `0.0.0.0-0&<v6>-<len>` (the IPv6-only key is not a lease for
/// twill, but its IPv6 subnet is taken).
fn key_subnets(name: &str) -> Option<SubnetKey> {
    if name.contains('&') {
        SubnetKey::parse(name).ok()
    } else {
        key_to_subnet(name).ok().map(SubnetKey::v4_only)
    }
}

impl LeaseStore {
    /// Takes a subnet for `attrs.node_name` with a TTL (see [`LeaseStore::acquire_with`]).
    pub async fn acquire(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        self.acquire_with(cfg, attrs, ttl, None).await
    }

    /// Takes a subnet for `attrs.node_name`:
    /// 1. a key that already names this node (still alive after a restart, or reserved) is
    ///    taken over: bound to a fresh etcd lease, or kept without TTL if it is a reservation;
    ///    but only when its PublicIP is this node's (or 0.0.0.0, a reservation not taken yet):
    ///    a key of this name from another PublicIP is another, live node with the same name,
    ///    and the result is [`StoreError::DuplicateName`] (retried by the holder: once that
    ///    lease expires, this node acquires);
    /// 2. else `prefer` (e.g. the subnet from the node's subnet file, or the one just lost) if
    ///    it is free and valid;
    /// 3. else a free subnet ([`crate::subnets::choose`]), created only if absent (one txn);
    ///    on collision the txn's else-branch returns the fresh list and the next attempt
    ///    picks again.
    ///
    /// The etcd TTL is `ttl` rounded up to whole seconds (etcd may raise very short TTLs to
    /// its minimum of about 2 s). The lease's `expires` is etcd's: the granted TTL from when
    /// the grant was sent.
    pub async fn acquire_with(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
    ) -> Result<Lease, StoreError> {
        self.acquire_inner(cfg, attrs, ttl, prefer, None, false)
            .await
    }

    /// [`LeaseStore::acquire_with`] that also prefers the IPv6 subnet `prefer6` (e.g. the one
    /// the node had, from its lease or subnet file) when the config hands out IPv6 subnets and
    /// the node has no key to take over: a node that lost its dual-stack key gets its pair
    /// back if both subnets are free.
    pub async fn acquire_with_ipv6(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
        prefer6: Option<Ipv6Net>,
    ) -> Result<Lease, StoreError> {
        self.acquire_inner(cfg, attrs, ttl, prefer, prefer6, false)
            .await
    }

    /// Takes `subnet` and no other: this node's own key of it (as [`LeaseStore::acquire_with`]
    /// step 1), or the subnet if it is free. For a node whose pods still hold addresses of
    /// `subnet`: taking another subnet would leave them unrouted, and their addresses handed
    /// out again by the node that holds `subnet` now. When another node holds it (a lease,
    /// a reservation or a grace key), the result is [`StoreError::SubnetHeld`] naming that
    /// node; an invalid `subnet` under `cfg` is [`StoreError::InvalidSubnet`]. This node's
    /// keys of other subnets are left alone.
    pub async fn acquire_only(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
        subnet: Ipv4Net,
    ) -> Result<Lease, StoreError> {
        self.acquire_only_ipv6(cfg, attrs, ttl, subnet, None).await
    }

    /// [`LeaseStore::acquire_only`] preferring the IPv6 subnet `prefer6` when it creates a
    /// dual-stack key (see [`LeaseStore::acquire_with_ipv6`]).
    pub async fn acquire_only_ipv6(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
        subnet: Ipv4Net,
        prefer6: Option<Ipv6Net>,
    ) -> Result<Lease, StoreError> {
        if !cfg.is_valid_subnet(&subnet) {
            return Err(StoreError::outside_config(
                cfg,
                subnet,
                " (the network config changed?)",
            ));
        }
        self.acquire_inner(cfg, attrs, ttl, Some(subnet), prefer6, true)
            .await
    }

    async fn acquire_inner(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
        prefer6: Option<Ipv6Net>,
        only: bool,
    ) -> Result<Lease, StoreError> {
        if attrs.node_name.is_empty() {
            return Err(StoreError::InvalidAttrs(
                "NodeName must not be empty".into(),
            ));
        }
        let ttl_secs = ttl.as_secs() as i64 + i64::from(ttl.subsec_nanos() > 0);
        let ttl_secs = ttl_secs.max(1);

        // The list and the etcd lease grant are independent: one round trip of latency.
        let sent = SystemTime::now();
        let (listed, granted) = tokio::join!(self.list_raw(), self.backend.grant(ttl_secs));
        let granted = granted?;
        let lease_id = granted.id;
        // etcd's expiry of the lease: its granted TTL, counted from when the grant was sent.
        let expires = sent + Duration::from_secs(granted.ttl.max(1) as u64);
        // The grace key's etcd lease: TTL + grace (see `with_grace`).
        let grace_lease = if self.grace.is_zero() {
            None
        } else {
            let g = ttl_secs + self.grace.as_secs().max(1) as i64;
            match self.backend.grant(g).await {
                Ok(r) => Some(r.id),
                Err(e) => {
                    self.revoke(lease_id).await;
                    return Err(e);
                }
            }
        };
        let run = async {
            let listing = listed?;
            let in_grace = self.in_grace_of_others(&attrs.node_name).await?;
            Acquisition {
                store: self,
                cfg,
                attrs,
                prefer,
                prefer6,
                only,
                lease_id,
                grace_lease,
                in_grace,
                v6: cfg.ipv6_range(),
            }
            .run(listing)
            .await
        };
        let result = run.await;
        let unused = match &result {
            Ok(a) if !a.reserved => vec![],
            _ => std::iter::once(lease_id).chain(grace_lease).collect(),
        };
        for id in unused {
            self.revoke(id).await;
        }
        let a = result?;
        Ok(Lease {
            subnet: a.subnet,
            ipv6_subnet: a.ipv6_subnet,
            attrs: a.attrs,
            reserved: a.reserved,
            etcd_lease: if a.reserved { 0 } else { lease_id },
            expires: (!a.reserved).then_some(expires),
            mod_revision: a.revision,
            create_revision: a.revision,
        })
    }
}

impl Acquisition<'_> {
    async fn run(&self, mut listing: Listing) -> Result<Acquired, StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let kvs = &listing.kvs;
            let scan = self.scan(kvs);
            if scan.own.is_empty()
                && let Some((subnet, other, reserved)) = scan.duplicate
            {
                return Err(StoreError::duplicate_name(
                    &self.attrs.node_name,
                    subnet,
                    other,
                    self.attrs.public_ip,
                    reserved,
                ));
            }
            if scan.own.is_empty() && self.only {
                self.check_only_free(kvs)?;
            }
            let own: Vec<Ipv4Net> = scan.own.iter().filter_map(|(k, _)| k.v4()).collect();
            let step = match choose(
                self.cfg,
                &scan.taken,
                &own,
                self.prefer,
                &self.attrs.node_name,
            ) {
                Some(Choice::Own(subnet)) => {
                    // Of this node's keys of `subnet` (normally one), the one of the form the
                    // config wants, if any.
                    let mine = || scan.own.iter().filter(|(k, _)| k.v4() == Some(subnet));
                    let (key, kv) = mine()
                        .find(|(k, _)| self.wanted_v6(k))
                        .or_else(|| mine().next())
                        .expect("choose picks one of `own`");
                    match self.target_key(key, kvs, &scan)? {
                        None => self.take_own(key, kv).await?,
                        Some(new) => self.rekey(key, kv, new, listing.revision).await?,
                    }
                }
                Some(Choice::Free(subnet)) => {
                    let v6 = self.choose_v6(&scan)?;
                    let key = SubnetKey::new(Some(subnet), v6).expect("an IPv4 subnet");
                    self.create(key, attempt, listing.revision).await?
                }
                None => {
                    let cfg = self.cfg;
                    return Err(StoreError::NetworkFull {
                        network: cfg.network,
                        subnet_len: cfg.subnet_len,
                        min: cfg.subnet_min,
                        max: cfg.subnet_max,
                        count: cfg.subnet_count(),
                    });
                }
            };
            match step {
                Attempt::Took(a) => return Ok(a),
                Attempt::Retry(fresh) => listing = fresh,
            }
        }
        Err(StoreError::Contention {
            what: "acquiring a subnet",
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Whether `key` has the IPv6 side the config wants: a subnet of its IPv6 range when it
    /// hands out IPv6 subnets, none when it does not.
    fn wanted_v6(&self, key: &SubnetKey) -> bool {
        match (&self.v6, key.v6()) {
            (None, None) => true,
            (Some(r), Some(s)) => r.contains(&s),
            _ => false,
        }
    }

    /// A free IPv6 subnet for this node when the config hands out IPv6 subnets (`None` when
    /// it does not); the IPv6 range being full is an error.
    fn choose_v6(&self, scan: &Scan<'_>) -> Result<Option<Ipv6Net>, StoreError> {
        let Some(r) = &self.v6 else {
            return Ok(None);
        };
        match choose_in(r, &scan.taken6, &[], self.prefer6, &self.attrs.node_name) {
            Some(c) => Ok(Some(c.subnet())),
            None => Err(StoreError::Ipv6NetworkFull {
                network: self
                    .cfg
                    .ipv6_network
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                subnet_len: r.len,
                min: r.min,
                max: r.max,
                count: r.count(),
            }),
        }
    }

    /// The key this node's own `key` should become (same IPv4 subnet): `None` to keep it;
    /// `<v4>&<new v6>` for an IPv4-only key (or one whose IPv6 subnet the config does not
    /// hand out) when the config hands out IPv6 subnets; `<v4>` for a dual-stack key when it
    /// does not, unless another key `<v4>` exists (then the key is kept as it is).
    fn target_key(
        &self,
        key: &SubnetKey,
        kvs: &[KeyValue],
        scan: &Scan<'_>,
    ) -> Result<Option<SubnetKey>, StoreError> {
        if self.wanted_v6(key) {
            return Ok(None);
        }
        let v4 = key.v4().expect("own keys have an IPv4 subnet");
        let v6 = match self.choose_v6(scan) {
            Ok(v6) => v6,
            // Keep the node's IPv4 subnet rather than failing it.
            Err(e @ StoreError::Ipv6NetworkFull { .. }) => {
                tracing::warn!(key = %key, error = %e, "keeping this node's key without an IPv6 subnet");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let new = SubnetKey::new(Some(v4), v6).expect("an IPv4 subnet");
        let name = self.store.subnet_key_name(&new);
        if kvs.iter().any(|k| k.key == name) {
            return Ok(None);
        }
        Ok(Some(new))
    }

    /// Sorts the listed keys into taken subnets, this node's own keys, and a key of its
    /// name held from another PublicIP.
    fn scan<'k>(&self, kvs: &'k [KeyValue]) -> Scan<'k> {
        let prefix = self.store.subnets_prefix();
        // Subnets in another node's grace period count as taken.
        let mut scan = Scan {
            taken: self.in_grace.keys().copied().collect(),
            ..Scan::default()
        };
        for k in kvs {
            let Some(name) = k.key.strip_prefix(&prefix) else {
                continue;
            };
            let Some(key) = key_subnets(name) else {
                continue;
            };
            scan.taken6.extend(key.v6());
            let Some(subnet) = key.v4() else {
                continue;
            };
            scan.taken.insert(subnet);
            if !self.cfg.is_valid_subnet(&subnet) {
                continue;
            }
            let Ok(a) = LeaseAttrs::from_json(&k.key, &k.value) else {
                continue;
            };
            if a.node_name != self.attrs.node_name {
                continue;
            }
            if self.only && Some(subnet) != self.prefer {
                continue;
            }
            // Our name from another PublicIP: a TTL key exists only while its etcd lease
            // lives, so that node is alive; a reservation it took is its own.
            if a.public_ip != self.attrs.public_ip && !a.public_ip.is_unspecified() {
                scan.duplicate
                    .get_or_insert((subnet, a.public_ip, k.lease == 0));
                continue;
            }
            scan.own.push((key, k));
        }
        scan
    }

    /// Only `prefer` may be taken, and this node has no key of it: it must be free (no key
    /// of that IPv4 subnet, IPv4-only or dual-stack, and no grace key).
    fn check_only_free(&self, kvs: &[KeyValue]) -> Result<(), StoreError> {
        let Some(p) = self.prefer else {
            return Ok(());
        };
        let prefix = self.store.subnets_prefix();
        let holding = kvs.iter().find(|k| {
            k.key
                .strip_prefix(&prefix)
                .and_then(key_subnets)
                .is_some_and(|key| key.v4() == Some(p))
        });
        if let Some(k) = holding {
            let a = LeaseAttrs::from_json(&k.key, &k.value).ok();
            return Err(StoreError::SubnetHeld {
                subnet: p,
                holder: a.as_ref().map(|a| a.node_name.clone()).unwrap_or_default(),
                holder_ip: a.map(|a| a.public_ip),
                grace: false,
            });
        }
        if let Some(node) = self.in_grace.get(&p) {
            return Err(StoreError::SubnetHeld {
                subnet: p,
                holder: node.clone(),
                holder_ip: None,
                grace: true,
            });
        }
        Ok(())
    }

    /// The grace key's write for `subnet`, if this store writes grace keys.
    fn grace_put(&self, subnet: &Ipv4Net) -> Option<Put> {
        let g = self.grace_lease?;
        let mut a = LeaseAttrs::vxlan(&self.attrs.node_name, self.attrs.public_ip, 0, "");
        a.backend_type.clear();
        a.backend_data = Default::default();
        Some(Put {
            key: self.store.grace_key(subnet),
            value: a.to_json(),
            lease: g,
        })
    }

    /// The writes of this node's key `key` that replaces its own `kv`: the caller's
    /// attributes with the fields a newer version wrote into `kv` kept, bound to the fresh
    /// etcd lease (or kept without one if `kv` is a reservation), and the grace key.
    fn own_puts(&self, key: &SubnetKey, kv: &KeyValue) -> (Vec<Put>, LeaseAttrs, bool) {
        let reserved = kv.lease == 0;
        let kept = match LeaseAttrs::from_json(&kv.key, &kv.value) {
            Ok(old) => self.attrs.keeping_unknown_fields_of(&old),
            Err(_) => self.attrs.clone(),
        };
        let mut puts = vec![Put {
            key: self.store.subnet_key_name(key),
            value: kept.to_json(),
            lease: if reserved { 0 } else { self.lease_id },
        }];
        if !reserved {
            puts.extend(self.grace_put(&key.v4().expect("own keys have an IPv4 subnet")));
        }
        (puts, kept, reserved)
    }

    /// The acquisition of `key` by the write made at `revision`.
    fn took(&self, key: &SubnetKey, reserved: bool, revision: i64, attrs: LeaseAttrs) -> Attempt {
        Attempt::Took(Acquired {
            subnet: key.v4().expect("lease keys have an IPv4 subnet"),
            ipv6_subnet: key.v6(),
            reserved,
            revision,
            attrs,
        })
    }

    /// Takes over this node's own key `kv` (named `key`) if it did not change since listed:
    /// bound to the fresh etcd lease, or kept without one if it is a reservation.
    async fn take_own(&self, key: &SubnetKey, kv: &KeyValue) -> Result<Attempt, StoreError> {
        let (puts, kept, reserved) = self.own_puts(key, kv);
        let written = self
            .store
            .backend
            .compare_and_put(kv.mod_revision, puts, Some(self.store.subnets_prefix()))
            .await?;
        match written {
            Written::Done { revision } => {
                if !reserved && kv.lease != self.lease_id {
                    self.store.revoke(kv.lease).await;
                }
                tracing::info!(key = %key, node = %self.attrs.node_name, reserved, "took over this node's existing subnet");
                Ok(self.took(key, reserved, revision, kept))
            }
            Written::Refused { current } => {
                tracing::debug!(key = %key, "own key changed concurrently, retrying");
                Ok(Attempt::Retry(current.unwrap_or_default()))
            }
        }
    }

    /// Moves this node's own key `kv` (named `old`) to `new` (the same IPv4 subnet, another
    /// IPv6 side) in one transaction: delete `old`, create `new`, if `old` did not change,
    /// `new` is absent and nothing was added since `listed` (the IPv6 subnet chosen is free).
    async fn rekey(
        &self,
        old: &SubnetKey,
        kv: &KeyValue,
        new: SubnetKey,
        listed: i64,
    ) -> Result<Attempt, StoreError> {
        let (puts, kept, reserved) = self.own_puts(&new, kv);
        let prefix = self.store.subnets_prefix();
        let conds = vec![
            Cond::ModRevision(kv.key.clone(), kv.mod_revision),
            Cond::Absent(puts[0].key.clone()),
            Cond::UnchangedSince {
                prefix: prefix.clone(),
                revision: listed,
            },
        ];
        let written = self
            .store
            .backend
            .write_if(conds, vec![kv.key.clone()], puts, Some(prefix))
            .await?;
        match written {
            Written::Done { revision } => {
                if !reserved && kv.lease != self.lease_id {
                    self.store.revoke(kv.lease).await;
                }
                tracing::info!(old = %old, new = %new, node = %self.attrs.node_name, reserved, "moved this node's key to its dual-stack form (same IPv4 subnet)");
                Ok(self.took(&new, reserved, revision, kept))
            }
            Written::Refused { current } => {
                tracing::debug!(old = %old, new = %new, "keys changed concurrently, retrying");
                Ok(Attempt::Retry(current.unwrap_or_default()))
            }
        }
    }

    /// Creates the key of the free subnets `key` if it is still absent and no other key took
    /// either subnet (see the module doc); `listed` is the revision they were chosen at.
    async fn create(
        &self,
        key: SubnetKey,
        attempt: u32,
        listed: i64,
    ) -> Result<Attempt, StoreError> {
        let subnet = key.v4().expect("an IPv4 subnet");
        let name = self.store.subnet_key_name(&key);
        let prefix = self.store.subnets_prefix();
        let conds = vec![
            Cond::Absent(name.clone()),
            if key.v6().is_some() {
                Cond::UnchangedSince {
                    prefix: prefix.clone(),
                    revision: listed,
                }
            } else {
                Cond::NoneUnder(format!("{name}&"))
            },
        ];
        let puts = std::iter::once(Put {
            key: name,
            value: self.attrs.to_json(),
            lease: self.lease_id,
        })
        .chain(self.grace_put(&subnet))
        .collect();
        let written = self
            .store
            .backend
            .write_if(conds, vec![], puts, Some(prefix))
            .await?;
        match written {
            Written::Done { revision } => {
                tracing::info!(key = %key, node = %self.attrs.node_name, attempt, "acquired subnet");
                Ok(self.took(&key, false, revision, self.attrs.clone()))
            }
            Written::Refused { current } => {
                tracing::debug!(key = %key, attempt, "subnet taken concurrently, picking another");
                Ok(Attempt::Retry(current.unwrap_or_default()))
            }
        }
    }
}
