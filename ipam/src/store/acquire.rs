//! The acquisition algorithm: which key a node takes, in named steps.
//!
//! [`LeaseStore::acquire_with`] and [`LeaseStore::acquire_only`] run an [`Acquisition`]:
//! grant the etcd lease(s) while listing the subnets, then per attempt [`Acquisition::scan`]
//! the listed keys, refuse a duplicate node name, pick with [`crate::subnets::choose`], and
//! write with one conditional write ([`Acquisition::take_own`] or
//! [`Acquisition::create`]). A write that lost a race returns the fresh list (in the same
//! transaction) and the next attempt picks again.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;

use super::backend::{KeyValue, Listing, Put, Written};
use super::{LeaseStore, StoreError};
use crate::lease::{Lease, LeaseAttrs, key_to_subnet};
use crate::netconf::NetConfig;
use crate::subnets::{Choice, choose};

/// Maximum number of conditional writes of one acquisition.
const MAX_ATTEMPTS: u32 = 1000;

/// What an acquisition took.
#[derive(Debug)]
struct Acquired {
    subnet: Ipv4Net,
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
    Retry(Vec<KeyValue>),
}

/// The listed keys, as seen by one node.
#[derive(Default)]
struct Scan<'k> {
    /// Every subnet with a key, and those in another node's grace period.
    taken: HashSet<Ipv4Net>,
    /// This node's own keys (valid under the config, with its PublicIP or none).
    own: Vec<(Ipv4Net, &'k KeyValue)>,
    /// A key of this node's name from another PublicIP: (subnet, that IP, reserved).
    duplicate: Option<(Ipv4Net, Ipv4Addr, bool)>,
}

/// One acquisition, with the etcd leases granted for it.
struct Acquisition<'a> {
    store: &'a LeaseStore,
    cfg: &'a NetConfig,
    attrs: &'a LeaseAttrs,
    prefer: Option<Ipv4Net>,
    /// Take `prefer` (this node's key of it, or the subnet if free) and no other.
    only: bool,
    lease_id: i64,
    grace_lease: Option<i64>,
    /// Subnets in another node's grace period, with that node's name.
    in_grace: HashMap<Ipv4Net, String>,
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
        self.acquire_inner(cfg, attrs, ttl, prefer, false).await
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
        if !cfg.is_valid_subnet(&subnet) {
            return Err(StoreError::outside_config(
                cfg,
                subnet,
                " (the network config changed?)",
            ));
        }
        self.acquire_inner(cfg, attrs, ttl, Some(subnet), true)
            .await
    }

    async fn acquire_inner(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
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
            let Listing { kvs, .. } = listed?;
            let in_grace = self.in_grace_of_others(&attrs.node_name).await?;
            Acquisition {
                store: self,
                cfg,
                attrs,
                prefer,
                only,
                lease_id,
                grace_lease,
                in_grace,
            }
            .run(kvs)
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
            ipv6_subnet: None,
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
    async fn run(&self, mut kvs: Vec<KeyValue>) -> Result<Acquired, StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let scan = self.scan(&kvs);
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
                self.check_only_free(&kvs)?;
            }
            let own: Vec<Ipv4Net> = scan.own.iter().map(|(s, _)| *s).collect();
            let step = match choose(
                self.cfg,
                &scan.taken,
                &own,
                self.prefer,
                &self.attrs.node_name,
            ) {
                Some(Choice::Own(subnet)) => {
                    let (_, kv) = scan
                        .own
                        .iter()
                        .find(|(s, _)| *s == subnet)
                        .expect("choose picks one of `own`");
                    self.take_own(subnet, kv).await?
                }
                Some(Choice::Free(subnet)) => self.create(subnet, attempt).await?,
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
                Attempt::Retry(fresh) => kvs = fresh,
            }
        }
        Err(StoreError::Contention {
            what: "acquiring a subnet",
            attempts: MAX_ATTEMPTS,
        })
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
            let Ok(subnet) = key_to_subnet(name) else {
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
            scan.own.push((subnet, k));
        }
        scan
    }

    /// Only `prefer` may be taken, and this node has no key of it: it must be free.
    fn check_only_free(&self, kvs: &[KeyValue]) -> Result<(), StoreError> {
        let Some(p) = self.prefer else {
            return Ok(());
        };
        let key = self.store.lease_key(&p);
        if let Some(k) = kvs.iter().find(|k| k.key == key) {
            let a = LeaseAttrs::from_json(&key, &k.value).ok();
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

    /// Takes over this node's own key `kv` of `subnet` if it did not change since listed:
    /// bound to the fresh etcd lease, or kept without one if it is a reservation.
    async fn take_own(&self, subnet: Ipv4Net, kv: &KeyValue) -> Result<Attempt, StoreError> {
        let key = self.store.lease_key(&subnet);
        let reserved = kv.lease == 0;
        // Keep the fields that a newer version wrote into this key.
        let kept = match LeaseAttrs::from_json(&key, &kv.value) {
            Ok(old) => self.attrs.keeping_unknown_fields_of(&old),
            Err(_) => self.attrs.clone(),
        };
        let mut puts = vec![Put {
            key,
            value: kept.to_json(),
            lease: if reserved { 0 } else { self.lease_id },
        }];
        if !reserved {
            puts.extend(self.grace_put(&subnet));
        }
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
                tracing::info!(%subnet, node = %self.attrs.node_name, reserved, "took over this node's existing subnet");
                Ok(Attempt::Took(Acquired {
                    subnet,
                    reserved,
                    revision,
                    attrs: kept,
                }))
            }
            Written::Refused { current } => {
                tracing::debug!(%subnet, "own key changed concurrently, retrying");
                Ok(Attempt::Retry(current.unwrap_or_default().kvs))
            }
        }
    }

    /// Creates the key of the free `subnet` if it is still absent.
    async fn create(&self, subnet: Ipv4Net, attempt: u32) -> Result<Attempt, StoreError> {
        let puts = std::iter::once(Put {
            key: self.store.lease_key(&subnet),
            value: self.attrs.to_json(),
            lease: self.lease_id,
        })
        .chain(self.grace_put(&subnet))
        .collect();
        let written = self
            .store
            .backend
            .create_if_absent(puts, Some(self.store.subnets_prefix()))
            .await?;
        match written {
            Written::Done { revision } => {
                tracing::info!(%subnet, node = %self.attrs.node_name, attempt, "acquired subnet");
                Ok(Attempt::Took(Acquired {
                    subnet,
                    reserved: false,
                    revision,
                    attrs: self.attrs.clone(),
                }))
            }
            Written::Refused { current } => {
                tracing::debug!(%subnet, attempt, "subnet taken concurrently, picking another");
                Ok(Attempt::Retry(current.unwrap_or_default().kvs))
            }
        }
    }
}
