//! [`LeaseWatch`]: the lease set as a stream of typed events.
//!
//! A background task lists `<prefix>/subnets/` (revision R), emits the difference to what it
//! delivered before (everything, the first time) and `Synced { revision: R }`, then watches
//! from R + 1. After a broken stream (etcd restart, network) it resumes from the last revision
//! it delivered + 1, so nothing is lost or repeated; when etcd answers that this revision is
//! compacted it re-lists and emits the diff. It retries with backoff forever.
//!
//! The lease map is kept once, on the receiving side: the background task sends what it read
//! (a list, or one key's put or delete) and [`LeaseWatch`] turns it into events against its
//! map, one update at a time. Besides the events, the map can be read as of the events
//! returned so far ([`LeaseWatch::state`], [`LeaseWatch::invalid`]).
//!
//! Key-values under the prefix that are not leases (a key that is not canonical, a value
//! that is not lease JSON) are kept apart, keyed by their key, and reported with
//! `LeaseEvent::Invalid`: they are rejected leases, never dropped silently, and they never
//! change the lease map (an alias key cannot replace or delete the real lease).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::backend::{WatchEvent, WatchMessage, WatchSpec};
use super::{Backoff, LeaseStore};
use crate::lease::{
    InvalidLease, Lease, LeaseEvent, lease_key_subnet, parse_lease, resolve_aliases,
};

/// Counters of a [`LeaseWatch`] (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Full lists (1 + re-lists after compaction).
    pub lists: u64,
    /// Watches cancelled by etcd because the revision was compacted.
    pub compactions: u64,
    /// Watch streams that broke and were resumed.
    pub reconnects: u64,
    /// Failed requests (list, watch create).
    pub errors: u64,
    /// Added/Changed/Removed events delivered from the watch stream (not from lists).
    pub events: u64,
}

/// The live counters of a [`LeaseWatch`], shared with its background task: a handle
/// ([`LeaseWatch::counters`]) can be read at any time, e.g. by a metrics collector at scrape
/// time, and outlives the watch.
#[derive(Debug, Default)]
pub struct WatchCounters {
    lists: AtomicU64,
    compactions: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
}

impl WatchCounters {
    /// The counters now.
    pub fn stats(&self) -> WatchStats {
        WatchStats {
            lists: self.lists.load(Ordering::Relaxed),
            compactions: self.compactions.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
        }
    }
}

/// What the background task read, sent to [`LeaseWatch`] to be applied to its map.
// Moved through the channel once; a Kv holds one lease inline, as LeaseEvent does.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Update {
    /// A full list at `revision`.
    Listed {
        leases: Vec<Lease>,
        invalid: Vec<InvalidLease>,
        revision: i64,
    },
    /// Puts (`Some`) and deletes of keys under the prefix, by key name: one change, or the
    /// changes of one revision (one transaction) to keys of one IPv4 subnet, in order (a
    /// move from `<v4>` to `<v4>&<v6>` is one change of the subnet's lease, not a removal
    /// and an addition).
    Kv { changes: Vec<KvChange> },
}

/// A put (`Some`) or delete of one key name under the prefix.
type KvChange = (String, Option<Result<Lease, InvalidLease>>);

/// The one copy of the lease set.
#[derive(Debug, Default)]
struct View {
    /// The lease used for each IPv4 subnet: of several keys of one subnet (an IPv4-only and a
    /// dual-stack key), the older one.
    leases: BTreeMap<Ipv4Net, Lease>,
    /// The other keys of a subnet in `leases`, by (subnet, key name); each is also in
    /// `invalid` ([`crate::lease::aliased`]). Normally empty. Kept up to date with the
    /// updates read (not with the events returned): events are computed only once every
    /// earlier one was returned.
    aliases: BTreeMap<(Ipv4Net, String), Lease>,
    invalid: BTreeMap<String, InvalidLease>,
    synced: bool,
    revision: i64,
    /// Events of the last update not yet returned (and not yet applied).
    pending: VecDeque<LeaseEvent>,
    /// Leases added one by one since the map was last rebuilt ([`View::compact`]).
    added: usize,
}

impl View {
    /// The events of `u` against the map (which already holds every earlier event); keeps
    /// `aliases` as of `u`.
    fn events_of(&mut self, u: Update) -> Vec<LeaseEvent> {
        match u {
            Update::Listed {
                leases,
                invalid,
                revision,
            } => {
                let (used, shadowed) = resolve_aliases(leases.clone());
                let used_keys: std::collections::HashSet<String> =
                    used.iter().map(|l| l.key().to_string()).collect();
                self.aliases = leases
                    .into_iter()
                    .filter(|l| !used_keys.contains(&l.key().to_string()))
                    .map(|l| ((l.subnet, l.key().to_string()), l))
                    .collect();
                let new: BTreeMap<Ipv4Net, Lease> =
                    used.into_iter().map(|l| (l.subnet, l)).collect();
                let mut new_invalid: BTreeMap<String, InvalidLease> =
                    invalid.into_iter().map(|i| (i.key.clone(), i)).collect();
                new_invalid.extend(shadowed.into_iter().map(|i| (i.key.clone(), i)));
                let mut out = diff(&self.leases, new);
                out.extend(diff_invalid(&self.invalid, &new_invalid));
                out.push(LeaseEvent::Synced { revision });
                out
            }
            Update::Kv { changes } => self.kv_events(changes),
        }
    }

    /// Inserting in key order leaves the B-tree's nodes half empty; rebuilt from a sorted
    /// iterator they are full (about 40 % less memory per lease).
    fn compact(&mut self) {
        self.leases = std::mem::take(&mut self.leases).into_iter().collect();
        self.added = 0;
    }

    /// Queues `events` (the queue takes the Vec's buffer when it is empty: no copy).
    fn queue(&mut self, events: Vec<LeaseEvent>) {
        if self.pending.is_empty() {
            self.pending = events.into();
        } else {
            self.pending.extend(events);
        }
    }

    /// Frees the queue's buffer once it is drained. A `VecDeque` keeps its capacity, and the
    /// first list of 5,000 leases queues 5,000 events: 4.7 MiB that stayed allocated for the
    /// life of the process (found with heaptrack; docs/benchmarks.md).
    fn release_queue(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 64 {
            self.pending = VecDeque::new();
        }
    }

    /// The events of the changes of one update (see [`Update::Kv`]). A key without an IPv4
    /// subnet (not canonical, IPv6-only) only ever touches `invalid`. The keys of an IPv4
    /// subnet S decide anew which of S's keys is used (the older one), and which are
    /// reported as aliases.
    fn kv_events(&mut self, changes: Vec<KvChange>) -> Vec<LeaseEvent> {
        let mut gone = Vec::new();
        let mut came = Vec::new();
        let mut note = |key: &str,
                        now: Option<InvalidLease>,
                        invalid: &BTreeMap<String, InvalidLease>| {
            match (invalid.get(key), now) {
                (Some(_), None) => gone.push(LeaseEvent::Invalid {
                    key: key.to_string(),
                    entry: None,
                }),
                (old, Some(i)) if old != Some(&i) => came.push(LeaseEvent::Invalid {
                    key: key.to_string(),
                    entry: Some(i),
                }),
                _ => {}
            }
        };
        let subnet = changes.first().and_then(|(n, _)| lease_key_subnet(n));
        let Some(subnet) = subnet else {
            for (name, put) in changes {
                let now = match put {
                    Some(Err(i)) => Some(i),
                    _ => None,
                };
                note(&name, now, &self.invalid);
            }
            return gone.into_iter().chain(came).collect();
        };
        // S's keys before this update, then after it.
        let before: Vec<Lease> = self
            .leases
            .get(&subnet)
            .cloned()
            .into_iter()
            .chain(self.alias_range(subnet).map(|(_, l)| l.clone()))
            .collect();
        let mut after = before.clone();
        let mut put_invalid: BTreeMap<String, InvalidLease> = BTreeMap::new();
        let mut keys: Vec<String> = Vec::new();
        for (name, put) in changes {
            after.retain(|l| l.key().to_string() != name);
            put_invalid.remove(&name);
            match put {
                Some(Ok(l)) => after.push(l),
                Some(Err(i)) => {
                    put_invalid.insert(name.clone(), i);
                }
                None => {}
            }
            keys.push(name);
        }
        let (used, shadowed) = resolve_aliases(after.clone());
        keys.extend(before.iter().chain(&after).map(|l| l.key().to_string()));
        keys.sort();
        keys.dedup();
        for k in &keys {
            let now = shadowed
                .iter()
                .find(|i| i.key == *k)
                .cloned()
                .or_else(|| put_invalid.get(k).cloned());
            note(k, now, &self.invalid);
        }
        // The aliases of S as of this update.
        let stale: Vec<(Ipv4Net, String)> =
            self.alias_range(subnet).map(|(k, _)| k.clone()).collect();
        for k in stale {
            self.aliases.remove(&k);
        }
        let used = used.into_iter().next();
        for l in after {
            let k = l.key().to_string();
            if used.as_ref().is_some_and(|u| u.key().to_string() == k) {
                continue;
            }
            self.aliases.insert((subnet, k), l);
        }
        let lease_event = match (self.leases.get(&subnet), used) {
            (None, None) => None,
            (None, Some(n)) => Some(LeaseEvent::Added(n)),
            (Some(o), None) => Some(LeaseEvent::Removed(o.clone())),
            (Some(o), Some(n)) if *o != n => Some(LeaseEvent::Changed {
                old: o.clone(),
                new: n,
            }),
            (Some(_), Some(_)) => None,
        };
        gone.into_iter().chain(lease_event).chain(came).collect()
    }

    /// The aliases of IPv4 subnet `subnet`.
    fn alias_range(&self, subnet: Ipv4Net) -> impl Iterator<Item = (&(Ipv4Net, String), &Lease)> {
        self.aliases
            .range((subnet, String::new())..)
            .take_while(move |((s, _), _)| *s == subnet)
    }

    /// Applies one event of [`View::events_of`].
    fn apply(&mut self, ev: &LeaseEvent) {
        match ev {
            LeaseEvent::Added(l) | LeaseEvent::Changed { new: l, .. } => {
                self.revision = self.revision.max(l.mod_revision);
                if self.leases.insert(l.subnet, l.clone()).is_none() {
                    self.added += 1;
                    // Leases that join one by one leave the nodes part empty, as a first
                    // list would (below): rebuilt once they are half of the map, so the
                    // rebuilds cost O(1) per lease.
                    if self.added >= 256 && 2 * self.added >= self.leases.len() {
                        self.compact();
                    }
                }
            }
            LeaseEvent::Removed(l) => {
                self.leases.remove(&l.subnet);
            }
            LeaseEvent::Invalid {
                key,
                entry: Some(i),
            } => {
                self.revision = self.revision.max(i.mod_revision);
                self.invalid.insert(key.clone(), i.clone());
            }
            LeaseEvent::Invalid { key, entry: None } => {
                self.invalid.remove(key);
            }
            LeaseEvent::Synced { revision } => {
                // A full state: after a re-list of a restored etcd the revision may go down.
                self.synced = true;
                self.revision = *revision;
                self.compact();
            }
        }
    }
}

/// Events of the lease set; see the module doc. Dropping it stops the background task.
#[derive(Debug)]
pub struct LeaseWatch {
    rx: mpsc::Receiver<Update>,
    view: View,
    counters: Arc<WatchCounters>,
    task: JoinHandle<()>,
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaseWatch {
    pub(super) fn spawn(store: LeaseStore) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let counters = Arc::new(WatchCounters::default());
        let task = tokio::spawn(run(store, tx, counters.clone()));
        LeaseWatch {
            rx,
            view: View::default(),
            counters,
            task,
        }
    }

    /// Turns an update into pending events.
    fn absorb(&mut self, u: Update) {
        let from_stream = matches!(u, Update::Kv { .. });
        let events = self.view.events_of(u);
        if from_stream {
            self.counters
                .events
                .fetch_add(events.len() as u64, Ordering::Relaxed);
        }
        self.view.queue(events);
    }

    /// The next event. Cancel-safe. `None` only if the background task is gone.
    pub async fn next(&mut self) -> Option<LeaseEvent> {
        loop {
            if let Some(ev) = self.view.pending.pop_front() {
                self.view.apply(&ev);
                self.view.release_queue();
                return Some(ev);
            }
            let u = self.rx.recv().await?;
            self.absorb(u);
        }
    }

    /// Consumes events until the first `Synced` (if not synced yet) and returns the state.
    pub async fn wait_synced(&mut self) -> Option<&BTreeMap<Ipv4Net, Lease>> {
        while !self.view.synced {
            self.next().await?;
        }
        Some(&self.view.leases)
    }

    /// The lease set as of the events returned so far by [`LeaseWatch::next`].
    pub fn state(&self) -> &BTreeMap<Ipv4Net, Lease> {
        &self.view.leases
    }

    /// The key-values under `<prefix>/subnets/` that are not leases, by key name, as of the
    /// events returned so far.
    pub fn invalid(&self) -> &BTreeMap<String, InvalidLease> {
        &self.view.invalid
    }

    /// Whether a `Synced` event has been returned (the state is complete).
    pub fn is_synced(&self) -> bool {
        self.view.synced
    }

    /// The highest revision seen in the events returned so far.
    pub fn revision(&self) -> i64 {
        self.view.revision
    }

    /// Counters.
    pub fn stats(&self) -> WatchStats {
        self.counters.stats()
    }

    /// A handle on the live counters (see [`WatchCounters`]).
    pub fn counters(&self) -> Arc<WatchCounters> {
        self.counters.clone()
    }
}

/// Differences from `known` to `new`, ordered by subnet.
fn diff(known: &BTreeMap<Ipv4Net, Lease>, mut new: BTreeMap<Ipv4Net, Lease>) -> Vec<LeaseEvent> {
    let mut out: Vec<(Ipv4Net, LeaseEvent)> = Vec::new();
    for (s, old) in known {
        match new.remove(s) {
            None => out.push((*s, LeaseEvent::Removed(old.clone()))),
            Some(l) if old.mod_revision != l.mod_revision || !old.same_content(&l) => out.push((
                *s,
                LeaseEvent::Changed {
                    old: old.clone(),
                    new: l,
                },
            )),
            Some(_) => {}
        }
    }
    out.extend(new.into_iter().map(|(s, l)| (s, LeaseEvent::Added(l))));
    out.sort_by_key(|(s, _)| *s);
    out.into_iter().map(|(_, e)| e).collect()
}

/// Differences of the invalid key-values from `known` to `new`, ordered by key.
fn diff_invalid(
    known: &BTreeMap<String, InvalidLease>,
    new: &BTreeMap<String, InvalidLease>,
) -> Vec<LeaseEvent> {
    let mut out = Vec::new();
    for (k, old) in known {
        match new.get(k) {
            None => out.push((k.clone(), None)),
            Some(i) if i != old => out.push((k.clone(), Some(i.clone()))),
            Some(_) => {}
        }
    }
    for (k, i) in new {
        if !known.contains_key(k) {
            out.push((k.clone(), Some(i.clone())));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter()
        .map(|(key, entry)| LeaseEvent::Invalid { key, entry })
        .collect()
}

async fn run(store: LeaseStore, tx: mpsc::Sender<Update>, counters: Arc<WatchCounters>) {
    let prefix = store.subnets_prefix();
    // The last revision whose changes have all been sent.
    let mut rev: i64 = 0;
    let mut need_list = true;
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        if need_list {
            match store.list_keys().await {
                Ok((leases, invalid, r)) => {
                    counters.lists.fetch_add(1, Ordering::Relaxed);
                    let n = leases.len();
                    let listed = Update::Listed {
                        leases,
                        invalid,
                        revision: r,
                    };
                    if tx.send(listed).await.is_err() {
                        return;
                    }
                    rev = r;
                    need_list = false;
                    tracing::debug!(revision = r, leases = n, "lease list delivered");
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?d, "listing leases failed");
                    tokio::time::sleep(d).await;
                    continue;
                }
            }
        }

        let spec = WatchSpec {
            key: prefix.clone(),
            prefix: true,
            from_revision: rev + 1,
            progress: true,
        };
        let mut stream = match store.backend.watch(spec).await {
            Ok(s) => s,
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                let d = backoff.next_delay();
                tracing::warn!(error = %e, from_revision = rev + 1, retry_in = ?d, "starting the lease watch failed");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        let mut generation = store.subscribe_generation();
        generation.mark_unchanged();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                r = generation.changed() => {
                    if r.is_err() {
                        // The store is gone: keep the stream we have.
                        futures::future::pending::<()>().await;
                    }
                    tracing::info!(resume_from = rev + 1, "etcd clients replaced: resuming the lease watch on the new connection");
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    break;
                }
            };
            match msg {
                Ok(Some(WatchMessage::Compacted { compact_revision })) => {
                    counters.compactions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        from_revision = rev + 1,
                        compacted_to = compact_revision,
                        "lease watch revision compacted: re-listing"
                    );
                    need_list = true;
                    break;
                }
                Ok(Some(WatchMessage::Cancelled { reason })) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(reason, "etcd cancelled the lease watch");
                    break;
                }
                // A store whose revision went backwards (etcd restored from a backup, or
                // wiped): the history we resume from is not this store's; start over.
                Ok(Some(WatchMessage::Started { revision })) if revision < rev => {
                    counters.compactions.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        store_revision = revision,
                        delivered_revision = rev,
                        "etcd's revision went backwards (restored or replaced): re-listing"
                    );
                    need_list = true;
                    break;
                }
                Ok(Some(WatchMessage::Started { .. })) => backoff.reset(),
                Ok(Some(WatchMessage::Events(events))) => {
                    backoff.reset();
                    // Consecutive changes of one revision to keys of one IPv4 subnet go as
                    // one update (see `Update::Kv`).
                    let mut group: Option<(i64, Ipv4Net)> = None;
                    let mut changes: Vec<KvChange> = Vec::new();
                    for ev in events {
                        let kv = ev.kv();
                        rev = rev.max(kv.mod_revision);
                        let Some(name) = kv.key.strip_prefix(&prefix) else {
                            continue;
                        };
                        let put = match &ev {
                            WatchEvent::Put(kv) => Some(parse_lease(
                                name,
                                &kv.value,
                                kv.lease,
                                kv.create_revision,
                                kv.mod_revision,
                            )),
                            WatchEvent::Delete(_) => None,
                        };
                        let this = lease_key_subnet(name).map(|s| (kv.mod_revision, s));
                        if this.is_none() || this != group {
                            if !changes.is_empty() {
                                let update = Update::Kv {
                                    changes: std::mem::take(&mut changes),
                                };
                                if tx.send(update).await.is_err() {
                                    return;
                                }
                            }
                            group = this;
                        }
                        changes.push((name.to_string(), put));
                    }
                    if !changes.is_empty() && tx.send(Update::Kv { changes }).await.is_err() {
                        return;
                    }
                }
                // Every event up to its revision was sent.
                Ok(Some(WatchMessage::Progress { revision })) => {
                    backoff.reset();
                    rev = rev.max(revision);
                }
                Ok(None) => {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(resume_from = rev + 1, "lease watch stream ended: resuming");
                    break;
                }
                Err(e) => {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, resume_from = rev + 1, "lease watch stream broke: resuming");
                    break;
                }
            }
        }
        if !need_list {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{InvalidKind, LeaseAttrs};

    fn by_subnet(leases: Vec<Lease>) -> BTreeMap<Ipv4Net, Lease> {
        leases.into_iter().map(|l| (l.subnet, l)).collect()
    }

    /// One put or delete through the view, as `next` applies it: the events, applied.
    fn apply_kv(
        view: &mut View,
        name: &str,
        put: Option<Result<Lease, InvalidLease>>,
    ) -> Vec<LeaseEvent> {
        let ev = view.events_of(Update::Kv {
            changes: vec![(name.to_string(), put)],
        });
        for e in &ev {
            view.apply(e);
        }
        ev
    }

    fn lease(s: &str, node: &str, rev: i64) -> Lease {
        Lease {
            subnet: s.parse().unwrap(),
            ipv6_subnet: None,
            attrs: LeaseAttrs::vxlan(
                node,
                std::net::Ipv4Addr::new(10, 0, 0, 1),
                1,
                "02:00:00:00:00:01",
            ),
            reserved: false,
            etcd_lease: 7,
            expires: None,
            mod_revision: rev,
            create_revision: rev,
        }
    }

    /// After the events of a large list are drained, the queue holds no buffer (a VecDeque
    /// keeps its capacity: 4.7 MiB for 5,000 leases, for the life of the process).
    #[test]
    fn a_drained_queue_frees_its_buffer() {
        let mut view = View::default();
        let leases = (0..1000u32)
            .map(|i| lease(&format!("10.{}.{}.0/24", 100 + i / 256, i % 256), "n", 1))
            .collect();
        let events = view.events_of(Update::Listed {
            leases,
            invalid: vec![],
            revision: 9,
        });
        view.queue(events);
        assert!(view.pending.capacity() >= 1001);
        while let Some(ev) = view.pending.pop_front() {
            view.apply(&ev);
            view.release_queue();
        }
        assert_eq!(view.pending.capacity(), 0);
        assert_eq!(view.leases.len(), 1000);
        assert!(view.synced);
    }

    fn put(name: &str, value: &str, rev: i64) -> Option<Result<Lease, InvalidLease>> {
        Some(parse_lease(name, value.as_bytes(), 7, rev, rev))
    }

    const GOOD: &str = r#"{"PublicIP":"10.0.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}"#;

    /// An alias key of a real lease (`-024`) is an invalid entry of its own: putting it and
    /// deleting it leave the real lease in the map exactly as it was.
    #[test]
    fn alias_key_never_touches_the_real_lease() {
        let mut view = View::default();
        let ev = apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", GOOD, 5));
        assert!(matches!(&ev[..], [LeaseEvent::Added(_)]), "{ev:?}");
        let real = view.leases.clone();
        for alias in [
            "10.0.2.0-024",
            "10.0.2.0-00000000000000000024",
            "10.0.02.0-24",
        ] {
            let ev = apply_kv(&mut view, alias, put(alias, GOOD, 6));
            assert!(
                matches!(&ev[..], [LeaseEvent::Invalid { key, entry: Some(i) }] if key == alias && i.kind == InvalidKind::Key),
                "{ev:?}"
            );
            assert_eq!(view.leases, real);
            let ev = apply_kv(&mut view, alias, None);
            assert!(
                matches!(&ev[..], [LeaseEvent::Invalid { key, entry: None }] if key == alias),
                "{ev:?}"
            );
            assert_eq!(view.leases, real);
        }
        assert!(view.invalid.is_empty());
        // Deleting a key that was never there changes nothing.
        assert!(apply_kv(&mut view, "junk", None).is_empty());
    }

    const DS: &str = "10.0.2.0-24&fd00:0:0:2::-64";

    /// A dual-stack key and an IPv4-only key of one subnet do not alias in the map: the
    /// older one is the subnet's lease, the younger one is reported as invalid by its own key;
    /// removing the older one promotes the younger (one Changed event), and removing the
    /// younger one never removes the older one.
    #[test]
    fn dual_stack_and_ipv4_keys_of_one_subnet() {
        let mut view = View::default();
        let ev = apply_kv(&mut view, DS, put(DS, GOOD, 5));
        assert!(
            matches!(&ev[..], [LeaseEvent::Added(l)] if l.ipv6_subnet == Some("fd00:0:0:2::/64".parse().unwrap())),
            "{ev:?}"
        );
        // The younger IPv4-only key: an alias, the dual-stack lease stays.
        let ev = apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", GOOD, 6));
        assert!(
            matches!(&ev[..], [LeaseEvent::Invalid { key, entry: Some(i) }] if key == "10.0.2.0-24" && i.detail.contains(DS)),
            "{ev:?}"
        );
        let subnet: Ipv4Net = "10.0.2.0/24".parse().unwrap();
        assert_eq!(view.leases[&subnet].key().to_string(), DS);
        // Rewritten: still an alias (its detail is the same), nothing else moves.
        let ev = apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", GOOD, 7));
        assert!(
            ev.iter().all(|e| matches!(e, LeaseEvent::Invalid { .. })),
            "{ev:?}"
        );
        // The older one goes: the IPv4-only key becomes the lease.
        let ev = apply_kv(&mut view, DS, None);
        assert!(
            matches!(&ev[..], [LeaseEvent::Invalid { key, entry: None }, LeaseEvent::Changed { old, new }]
                if key == "10.0.2.0-24" && old.key().to_string() == DS && new.key().to_string() == "10.0.2.0-24"),
            "{ev:?}"
        );
        assert!(view.invalid.is_empty() && view.aliases.is_empty());
        // A younger dual-stack key again, then deleted: the IPv4-only lease is untouched.
        let real = view.leases.clone();
        let ev = apply_kv(&mut view, DS, put(DS, GOOD, 9));
        assert!(
            matches!(&ev[..], [LeaseEvent::Invalid { key, entry: Some(_) }] if key == DS),
            "{ev:?}"
        );
        assert_eq!(view.leases, real);
        let ev = apply_kv(&mut view, DS, None);
        assert!(
            matches!(&ev[..], [LeaseEvent::Invalid { key, entry: None }] if key == DS),
            "{ev:?}"
        );
        assert_eq!(view.leases, real);
        // An unreadable value of the alias: reported as a bad value, the lease untouched.
        apply_kv(&mut view, DS, put(DS, GOOD, 10));
        let ev = apply_kv(&mut view, DS, put(DS, "{", 11));
        assert!(
            matches!(&ev[..], [LeaseEvent::Invalid { key, entry: Some(i) }] if key == DS && i.kind == InvalidKind::Value),
            "{ev:?}"
        );
        assert_eq!(view.leases, real);
        assert!(view.aliases.is_empty());
        // IPv6-only: refused by name, never a lease.
        let v6 = "0.0.0.0-0&fd00:0:0:9::-64";
        let ev = apply_kv(&mut view, v6, put(v6, GOOD, 12));
        assert!(
            matches!(&ev[..], [LeaseEvent::Invalid { key, entry: Some(i) }] if key == v6 && i.detail.contains("IPv6-only")),
            "{ev:?}"
        );
        assert_eq!(view.leases, real);
    }

    /// A transaction that moves a subnet's lease from its IPv4-only key to a dual-stack key
    /// (delete + put at one revision, one update) is one Changed event, never a Removed.
    #[test]
    fn move_to_dual_stack_key_in_one_revision_is_one_change() {
        let mut view = View::default();
        apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", GOOD, 5));
        let ev = view.events_of(Update::Kv {
            changes: vec![("10.0.2.0-24".into(), None), (DS.into(), put(DS, GOOD, 8))],
        });
        assert!(
            matches!(&ev[..], [LeaseEvent::Changed { old, new }]
                if old.key().to_string() == "10.0.2.0-24" && new.key().to_string() == DS),
            "{ev:?}"
        );
        for e in &ev {
            view.apply(e);
        }
        assert!(view.invalid.is_empty() && view.aliases.is_empty());
    }

    /// A list with both keys of one subnet: the same outcome as the events, and a re-list
    /// without the older key promotes the younger.
    #[test]
    fn list_resolves_aliases() {
        let mut view = View::default();
        let listed = |revision, names: &[(&str, i64)]| Update::Listed {
            leases: names
                .iter()
                .map(|(n, r)| put(n, GOOD, *r).unwrap().unwrap())
                .collect(),
            invalid: vec![],
            revision,
        };
        for e in view.events_of(listed(8, &[("10.0.2.0-24", 6), (DS, 5)])) {
            view.apply(&e);
        }
        let subnet: Ipv4Net = "10.0.2.0/24".parse().unwrap();
        assert_eq!(view.leases[&subnet].key().to_string(), DS);
        assert_eq!(view.invalid.keys().collect::<Vec<_>>(), ["10.0.2.0-24"]);
        assert_eq!(view.aliases.len(), 1);
        let ev = view.events_of(listed(9, &[("10.0.2.0-24", 6)]));
        assert!(
            matches!(&ev[..], [LeaseEvent::Changed { new, .. }, LeaseEvent::Invalid { entry: None, .. }, LeaseEvent::Synced { .. }]
                if new.key().to_string() == "10.0.2.0-24"),
            "{ev:?}"
        );
        for e in ev {
            view.apply(&e);
        }
        assert!(view.invalid.is_empty() && view.aliases.is_empty());
    }

    /// A canonical key whose value is not lease JSON: the lease is removed and the key is
    /// reported as invalid (kind Value); a good value again makes it a lease again.
    #[test]
    fn unreadable_value_is_reported_not_dropped() {
        let mut view = View::default();
        apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", GOOD, 5));
        let ev = apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", "{", 6));
        assert!(
            matches!(&ev[..], [LeaseEvent::Removed(_), LeaseEvent::Invalid { entry: Some(i), .. }] if i.kind == InvalidKind::Value),
            "{ev:?}"
        );
        assert!(view.leases.is_empty());
        assert_eq!(view.invalid.len(), 1);
        let ev = apply_kv(&mut view, "10.0.2.0-24", put("10.0.2.0-24", GOOD, 7));
        assert!(
            matches!(
                &ev[..],
                [
                    LeaseEvent::Invalid { entry: None, .. },
                    LeaseEvent::Added(_)
                ]
            ),
            "{ev:?}"
        );
        assert!(view.invalid.is_empty());
    }

    #[test]
    fn diff_invalid_after_relist() {
        let inv = |k: &str, rev: i64| InvalidLease {
            key: k.into(),
            kind: InvalidKind::Key,
            detail: String::new(),
            create_revision: rev,
            mod_revision: rev,
        };
        let known: BTreeMap<_, _> = [("a", 1), ("b", 2)]
            .into_iter()
            .map(|(k, r)| (k.to_string(), inv(k, r)))
            .collect();
        let new: BTreeMap<_, _> = [("b", 3), ("c", 4)]
            .into_iter()
            .map(|(k, r)| (k.to_string(), inv(k, r)))
            .collect();
        let ev = diff_invalid(&known, &new);
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert!(matches!(&ev[0], LeaseEvent::Invalid { key, entry: None } if key == "a"));
        assert!(matches!(&ev[1], LeaseEvent::Invalid { key, entry: Some(_) } if key == "b"));
        assert!(matches!(&ev[2], LeaseEvent::Invalid { key, entry: Some(_) } if key == "c"));
        assert!(diff_invalid(&new, &new).is_empty());
    }

    #[test]
    fn diff_after_relist() {
        let known = by_subnet(vec![
            lease("10.0.1.0/24", "a", 5),
            lease("10.0.2.0/24", "b", 6),
            lease("10.0.3.0/24", "c", 7),
        ]);
        let new = by_subnet(vec![
            lease("10.0.2.0/24", "b", 6),
            lease("10.0.3.0/24", "c2", 9),
            lease("10.0.4.0/24", "d", 10),
        ]);
        let ev = diff(&known, new.clone());
        assert_eq!(ev.len(), 3);
        assert!(matches!(&ev[0], LeaseEvent::Removed(l) if l.attrs.node_name == "a"));
        assert!(
            matches!(&ev[1], LeaseEvent::Changed { old, new } if old.attrs.node_name == "c" && new.attrs.node_name == "c2")
        );
        assert!(matches!(&ev[2], LeaseEvent::Added(l) if l.attrs.node_name == "d"));
        assert!(diff(&new, new.clone()).is_empty());
    }

    /// Counts the bytes allocated and not freed on this thread (the other test threads
    /// allocate too: a global counter would count them).
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static LIVE: Cell<isize> = const { Cell::new(0) };
        }

        struct Counting;

        fn add(n: isize) {
            let _ = LIVE.try_with(|c| c.set(c.get() + n));
        }

        // SAFETY: forwards to the system allocator unchanged; only counts.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                // SAFETY: the caller's layout, as given.
                let p = unsafe { System.alloc(l) };
                if !p.is_null() {
                    add(l.size() as isize);
                }
                p
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                // SAFETY: `p` came from `alloc` with this layout.
                unsafe { System.dealloc(p, l) };
                add(-(l.size() as isize));
            }
        }

        #[global_allocator]
        static A: Counting = Counting;

        pub fn live() -> isize {
            LIVE.with(|c| c.get())
        }
    }

    fn many(n: u32) -> Vec<Lease> {
        (0..n)
            .map(|i| {
                let (a, b) = (i / 256, i % 256);
                let name = format!("10.{a}.{b}.0-24");
                let value = format!(
                    r#"{{"PublicIP":"192.168.{a}.{b}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:42:c0:a8:{a:02x}:{b:02x}"}},"NodeName":"worker-{i:05}.cluster.example.com"}}"#
                );
                parse_lease(&name, value.as_bytes(), 0x7000 + i64::from(i), 10, 10).unwrap()
            })
            .collect()
    }

    /// Memory of the watch's lease state for 5,000 parsed leases: the map kept once, against the layout before, where the task's HashMap
    /// (collected from the list) and the receiver's BTreeMap (inserted event by event) each
    /// held a copy. `cargo test -p twill-ipam --features etcd
    /// watch_memory -- --nocapture` prints the figures (docs/benchmarks.md).
    #[test]
    fn watch_memory_per_lease() {
        const N: u32 = 5_000;
        let base = counting::live();
        let old = {
            let known: std::collections::HashMap<Ipv4Net, Lease> =
                many(N).into_iter().map(|l| (l.subnet, l)).collect();
            // The receiver inserted one event at a time, in subnet order.
            let mut sorted: Vec<&Lease> = known.values().collect();
            sorted.sort_by_key(|l| l.subnet);
            let mut state = BTreeMap::new();
            for l in sorted {
                state.insert(l.subnet, l.clone());
            }
            let bytes = counting::live() - base;
            assert_eq!((known.len(), state.len()), (N as usize, N as usize));
            bytes
        };
        assert_eq!(counting::live(), base, "the old layout freed");
        let mut view = View::default();
        for ev in view.events_of(Update::Listed {
            leases: many(N),
            invalid: vec![],
            revision: 10,
        }) {
            view.apply(&ev);
        }
        let new = counting::live() - base;
        assert_eq!(view.leases.len(), N as usize);
        assert!(view.synced);
        let per = |b: isize| b as f64 / f64::from(N);
        eprintln!(
            "watch state, {N} leases: before {:.0} bytes/lease (two maps), after {:.0} bytes/lease (one map)",
            per(old),
            per(new)
        );
        assert!(new * 10 < old * 6, "old {old} B, new {new} B");
    }
}
