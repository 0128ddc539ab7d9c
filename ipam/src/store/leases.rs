//! Lease I/O: the keys under `<prefix>/subnets/` (list, get, reserve, release), and the
//! grace and move keys beside them.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;

use super::backend::{Cond, KeyValue, Listing, Put, Written};
use super::{LeaseStore, MoveRequest, StoreError};
use crate::lease::{
    InvalidLease, Lease, LeaseAttrs, SubnetKey, key_to_subnet, lease_key, lease_key_subnet,
    parse_lease, resolve_aliases,
};

impl LeaseStore {
    /// Renews the etcd lease of `subnet`'s grace key if it names `node` (one keep-alive;
    /// best effort: a failure is retried with the next renewal of the lease).
    pub(crate) async fn renew_grace(&self, subnet: &Ipv4Net, node: &str) {
        let key = self.grace_key(subnet);
        let Ok((Some(k), _)) = self.backend.get(&key).await else {
            return;
        };
        let id = k.lease;
        if id == 0 || !LeaseAttrs::from_json(&key, &k.value).is_ok_and(|a| a.node_name == node) {
            return;
        }
        if let Err(e) = self.backend.keep_alive_once(id).await {
            tracing::debug!(%subnet, error = %e, "renewing the grace key's lease failed");
        }
    }

    /// Subnets whose grace key names another node than `node`, with that node's name.
    pub(super) async fn in_grace_of_others(
        &self,
        node: &str,
    ) -> Result<HashMap<Ipv4Net, String>, StoreError> {
        let prefix = self.grace_prefix();
        let listing = self.backend.list(&prefix).await?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(|k| {
                let subnet = key_to_subnet(k.key.strip_prefix(&prefix)?).ok()?;
                let a = LeaseAttrs::from_json(&k.key, &k.value).ok()?;
                (a.node_name != node).then_some((subnet, a.node_name))
            })
            .collect())
    }

    /// Parses one lease key-value: the lease, or why it is none (`None` only for a key
    /// outside `<prefix>/subnets/`).
    pub(super) fn parse_kv(&self, kv: &KeyValue) -> Option<Result<Lease, InvalidLease>> {
        let name = kv.key.strip_prefix(&self.subnets_prefix())?;
        Some(parse_lease(
            name,
            &kv.value,
            kv.lease,
            kv.create_revision,
            kv.mod_revision,
        ))
    }

    /// All readable leases (sorted by subnet) and the revision they were read at. The
    /// key-values that are not leases are left out: [`LeaseStore::list_all`] has them.
    pub async fn list(&self) -> Result<(Vec<Lease>, i64), StoreError> {
        let (leases, _, rev) = self.list_all().await?;
        Ok((leases, rev))
    }

    /// All key-values under `<prefix>/subnets/`: the leases used (one per IPv4 subnet, sorted
    /// by subnet), the ones that are not (bad key or value, or a key whose IPv4 subnet an
    /// older key holds: see [`resolve_aliases`]; sorted by key) and the revision.
    pub async fn list_all(&self) -> Result<(Vec<Lease>, Vec<InvalidLease>, i64), StoreError> {
        let (leases, mut invalid, rev) = self.list_keys().await?;
        let (used, aliases) = resolve_aliases(leases);
        invalid.extend(aliases);
        invalid.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((used, invalid, rev))
    }

    /// Every readable lease key (aliases of one IPv4 subnet included, in key order), the
    /// key-values that are not leases (sorted by key) and the revision.
    pub(super) async fn list_keys(
        &self,
    ) -> Result<(Vec<Lease>, Vec<InvalidLease>, i64), StoreError> {
        let listing = self.list_raw().await?;
        let (leases, invalid) = self.parse_listing(&listing.kvs);
        Ok((leases, invalid, listing.revision))
    }

    /// The key-values of a listing: readable leases and the others (each sorted by key).
    pub(super) fn parse_listing(&self, kvs: &[KeyValue]) -> (Vec<Lease>, Vec<InvalidLease>) {
        let mut leases = Vec::new();
        let mut invalid = Vec::new();
        for r in kvs.iter().filter_map(|k| self.parse_kv(k)) {
            match r {
                Ok(l) => leases.push(l),
                Err(i) => invalid.push(i),
            }
        }
        invalid.sort_by(|a, b| a.key.cmp(&b.key));
        (leases, invalid)
    }

    pub(super) async fn list_raw(&self) -> Result<Listing, StoreError> {
        self.backend.list(&self.subnets_prefix()).await
    }

    /// [`LeaseStore::list`] with `expires` filled in (one extra request per TTL lease).
    pub async fn list_with_ttl(&self) -> Result<(Vec<Lease>, i64), StoreError> {
        let (mut leases, rev) = self.list().await?;
        for l in leases.iter_mut().filter(|l| !l.reserved) {
            l.expires = self.expires(l.etcd_lease).await?;
        }
        Ok((leases, rev))
    }

    /// When etcd lease `id` expires (`None`: it is gone).
    pub async fn expires(&self, id: i64) -> Result<Option<SystemTime>, StoreError> {
        let asked = SystemTime::now();
        let ttl = self.backend.time_to_live(id).await?;
        Ok((ttl > 0).then(|| asked + Duration::from_secs(ttl as u64)))
    }

    /// The lease of `subnet`, if any: its IPv4-only or dual-stack key (of several, the one
    /// used: [`resolve_aliases`]).
    pub async fn get(&self, subnet: &Ipv4Net) -> Result<Option<Lease>, StoreError> {
        Ok(self.keys_of(subnet).await?.0.into_iter().next())
    }

    /// The key-values of IPv4 subnet `subnet`: `<net>-<len>` and `<net>-<len>&...` (readable
    /// or not), and the store's revision (one request).
    async fn subnet_kvs(&self, subnet: &Ipv4Net) -> Result<(Vec<KeyValue>, i64), StoreError> {
        // One range read: the prefix `<net>-<len>` holds both forms (and junk like
        // `<net>-<len>0`, which is not a key of `subnet` and is left out).
        let listing = self.backend.list(&self.lease_key(subnet)).await?;
        let prefix = self.subnets_prefix();
        let kvs = listing
            .kvs
            .into_iter()
            .filter(|k| {
                k.key
                    .strip_prefix(&prefix)
                    .is_some_and(|n| lease_key_subnet(n) == Some(*subnet))
            })
            .collect();
        Ok((kvs, listing.revision))
    }

    /// The readable keys of IPv4 subnet `subnet` (`<net>-<len>` and `<net>-<len>&...`): the
    /// one used first, then its aliases; and the store's revision (one request).
    pub(super) async fn keys_of(&self, subnet: &Ipv4Net) -> Result<(Vec<Lease>, i64), StoreError> {
        let (kvs, rev) = self.subnet_kvs(subnet).await?;
        let (leases, _) = self.parse_listing(&kvs);
        let (used, aliases) = resolve_aliases(leases.clone());
        let mut out = used;
        out.extend(aliases.iter().filter_map(|i| {
            leases
                .iter()
                .find(|l| l.key().to_string() == i.key)
                .cloned()
        }));
        Ok((out, rev))
    }

    /// Deletes `key` and revokes the etcd lease it was attached to, if any. False if the key
    /// did not exist.
    async fn delete_revoking(&self, key: &str) -> Result<bool, StoreError> {
        let prev = self.backend.delete(key).await?;
        if let Some(p) = &prev
            && p.lease != 0
        {
            self.revoke(p.lease).await;
        }
        Ok(prev.is_some())
    }

    /// Deletes the lease of `subnet`: every key of that IPv4 subnet, IPv4-only or dual-stack
    /// (and revokes their etcd leases). False if there was none.
    pub async fn release(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        let (kvs, _) = self.subnet_kvs(&subnet).await?;
        let mut deleted = false;
        for k in kvs {
            deleted |= self.delete_revoking(&k.key).await?;
        }
        // An explicit release frees the subnet at once: no grace period.
        self.backend.delete(&self.grace_key(&subnet)).await?;
        Ok(deleted)
    }

    /// Deletes the lease key `key` only (a holder's own key, IPv4-only or dual-stack) and
    /// revokes its etcd lease; and the grace key of its IPv4 subnet. False if it was gone.
    pub async fn release_key(&self, key: &SubnetKey) -> Result<bool, StoreError> {
        let deleted = self.delete_revoking(&self.subnet_key_name(key)).await?;
        if let Some(subnet) = key.v4() {
            self.backend.delete(&self.grace_key(&subnet)).await?;
        }
        Ok(deleted)
    }

    /// Writes the move permission of `node` (only for leaving `from`, if given), bound to an
    /// etcd lease of `ttl`: a permission nobody used does not linger.
    pub async fn request_move(
        &self,
        node: &str,
        from: Option<Ipv4Net>,
        ttl: Duration,
    ) -> Result<MoveRequest, StoreError> {
        if node.is_empty() || node.contains('/') {
            return Err(StoreError::InvalidAttrs(format!(
                "node name {node:?} must be non-empty and without '/'"
            )));
        }
        let req = MoveRequest {
            node_name: node.to_string(),
            from,
        };
        let secs = (ttl.as_secs() as i64).max(1);
        let id = self.backend.grant(secs).await?.id;
        let put = Put {
            key: self.move_key(node),
            value: serde_json::to_string(&req).expect("a move request serializes"),
            lease: id,
        };
        if let Err(e) = self.backend.put(put).await {
            self.revoke(id).await;
            return Err(e);
        }
        Ok(req)
    }

    /// The move permission of `node`, if any. A value that does not parse, or names another
    /// node, is no permission: `Ok(Err(why))`.
    pub async fn move_request(
        &self,
        node: &str,
    ) -> Result<Option<Result<MoveRequest, String>>, StoreError> {
        let key = self.move_key(node);
        let (kv, _) = self.backend.get(&key).await?;
        Ok(kv.map(|k| {
            let r: MoveRequest = serde_json::from_slice(&k.value)
                .map_err(|e| format!("{key}: value is not a move request: {e}"))?;
            if r.node_name != node {
                return Err(format!(
                    "{key}: NodeName is {:?}, not {node:?}",
                    r.node_name
                ));
            }
            Ok(r)
        }))
    }

    /// Deletes the move permission of `node` (and revokes its etcd lease). False if none.
    pub async fn clear_move(&self, node: &str) -> Result<bool, StoreError> {
        let key = self.move_key(node);
        self.delete_revoking(&key).await
    }

    /// Best-effort revoke of an etcd lease that no key uses any more.
    pub(crate) async fn revoke(&self, id: i64) {
        if let Err(e) = self.backend.revoke(id).await {
            tracing::debug!(lease = id, error = %e, "revoking an unused etcd lease failed (it expires by itself)");
        }
    }

    /// Reserves `subnet` for `attrs.node_name`: a key without TTL. Allowed when the subnet is
    /// free or already held by that node; the subnet must be valid under the stored config.
    /// A subnet the node holds keeps its key (a dual-stack key stays one, with its IPv6
    /// subnet); a free subnet gets the IPv4-only key (a dual-stack node that takes it moves it
    /// to its dual-stack form).
    pub async fn reserve(&self, subnet: Ipv4Net, attrs: &LeaseAttrs) -> Result<Lease, StoreError> {
        if attrs.node_name.is_empty() {
            return Err(StoreError::InvalidAttrs(
                "a reservation needs a NodeName".into(),
            ));
        }
        let cfg = self.require_config().await?;
        if !cfg.is_valid_subnet(&subnet) {
            return Err(StoreError::outside_config(&cfg, subnet, ""));
        }
        let (kvs, _) = self.subnet_kvs(&subnet).await?;
        // The key used for the subnet (of aliases, the older), else any key of it.
        let (leases, _) = self.parse_listing(&kvs);
        let (used, _) = resolve_aliases(leases);
        let held = used
            .first()
            .and_then(|l| {
                let name = self.key_of(l);
                kvs.iter().find(|k| k.key == name)
            })
            .or(kvs.first());
        let (key, conds, ipv6_subnet) = match held {
            None => {
                let key = self.lease_key(&subnet);
                let conds = vec![
                    Cond::Absent(key.clone()),
                    Cond::NoneUnder(format!("{key}&")),
                ];
                (key, conds, None)
            }
            Some(k) => {
                let holder = LeaseAttrs::from_json(&k.key, &k.value)
                    .map(|a| a.node_name)
                    .unwrap_or_default();
                if holder != attrs.node_name {
                    return Err(StoreError::Conflict {
                        key: k.key.clone(),
                        holder,
                    });
                }
                let v6 = k
                    .key
                    .strip_prefix(&self.subnets_prefix())
                    .and_then(|n| lease_key(n).ok())
                    .and_then(|n| n.v6());
                (
                    k.key.clone(),
                    vec![Cond::ModRevision(k.key.clone(), k.mod_revision)],
                    v6,
                )
            }
        };
        let put = Put {
            key,
            value: attrs.to_json(),
            lease: 0,
        };
        let Written::Done { revision: rev } = self
            .backend
            .write_if(conds, vec![], vec![put], None)
            .await?
        else {
            return Err(StoreError::Contention {
                what: "reserving (the key changed concurrently)",
                attempts: 1,
            });
        };
        Ok(Lease {
            subnet,
            ipv6_subnet,
            attrs: attrs.clone(),
            reserved: true,
            etcd_lease: 0,
            expires: None,
            mod_revision: rev,
            create_revision: rev,
        })
    }
}
