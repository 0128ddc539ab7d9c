//! [`LeaseWatch`]: the lease set as a stream of typed events.
//!
//! A background task lists `<prefix>/subnets/` (revision R), emits the difference to what it
//! delivered before (everything, the first time) and `Synced { revision: R }`, then watches
//! from R + 1. After a broken stream (etcd restart, network) it resumes from the last revision
//! it delivered + 1, so nothing is lost or repeated; when etcd answers that this revision is
//! compacted it re-lists and emits the diff. It retries with backoff forever.
//!
//! Key-values under the prefix that are not leases (a key that is not canonical, a value
//! that is not lease JSON) are kept apart, keyed by their key, and reported with
//! `LeaseEvent::Invalid`: they are rejected leases, never dropped silently, and they never
//! change the lease map (an alias key cannot replace or delete the real lease).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Backoff, LeaseStore, by_subnet};
use crate::lease::{InvalidKind, InvalidLease, Lease, LeaseEvent, key_to_subnet, parse_lease};

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

#[derive(Debug, Default)]
struct Counters {
    lists: AtomicU64,
    compactions: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
}

/// Events of the lease set; see the module doc. Dropping it stops the background task.
#[derive(Debug)]
pub struct LeaseWatch {
    rx: mpsc::Receiver<LeaseEvent>,
    state: BTreeMap<Ipv4Net, Lease>,
    invalid: BTreeMap<String, InvalidLease>,
    synced: bool,
    revision: i64,
    counters: Arc<Counters>,
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
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(store, tx, counters.clone()));
        LeaseWatch {
            rx,
            state: BTreeMap::new(),
            invalid: BTreeMap::new(),
            synced: false,
            revision: 0,
            counters,
            task,
        }
    }

    /// The next event. Cancel-safe. `None` only if the background task is gone.
    pub async fn next(&mut self) -> Option<LeaseEvent> {
        let ev = self.rx.recv().await?;
        match &ev {
            LeaseEvent::Added(l) => {
                self.revision = self.revision.max(l.mod_revision);
                self.state.insert(l.subnet, l.clone());
            }
            LeaseEvent::Changed { new, .. } => {
                self.revision = self.revision.max(new.mod_revision);
                self.state.insert(new.subnet, new.clone());
            }
            LeaseEvent::Removed(l) => {
                self.state.remove(&l.subnet);
            }
            LeaseEvent::Invalid { key, entry } => match entry {
                Some(i) => {
                    self.revision = self.revision.max(i.mod_revision);
                    self.invalid.insert(key.clone(), i.clone());
                }
                None => {
                    self.invalid.remove(key);
                }
            },
            LeaseEvent::Synced { revision } => {
                // A full state: after a re-list of a restored etcd the revision may go down.
                self.synced = true;
                self.revision = *revision;
            }
        }
        Some(ev)
    }

    /// Consumes events until the first `Synced` (if not synced yet) and returns the state.
    pub async fn wait_synced(&mut self) -> Option<&BTreeMap<Ipv4Net, Lease>> {
        while !self.synced {
            self.next().await?;
        }
        Some(&self.state)
    }

    /// The lease set as of the events returned so far by [`LeaseWatch::next`].
    pub fn state(&self) -> &BTreeMap<Ipv4Net, Lease> {
        &self.state
    }

    /// The key-values under `<prefix>/subnets/` that are not leases, by key name, as of the
    /// events returned so far.
    pub fn invalid(&self) -> &BTreeMap<String, InvalidLease> {
        &self.invalid
    }

    /// Whether a `Synced` event has been returned (the state is complete).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The highest revision seen in the events returned so far.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Counters.
    pub fn stats(&self) -> WatchStats {
        let c = &self.counters;
        WatchStats {
            lists: c.lists.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
        }
    }
}

/// Differences from `known` to `new`, ordered by subnet.
fn diff(known: &HashMap<Ipv4Net, Lease>, new: &HashMap<Ipv4Net, Lease>) -> Vec<LeaseEvent> {
    let mut out: Vec<(Ipv4Net, LeaseEvent)> = Vec::new();
    for (s, old) in known {
        if !new.contains_key(s) {
            out.push((*s, LeaseEvent::Removed(old.clone())));
        }
    }
    for (s, l) in new {
        match known.get(s) {
            None => out.push((*s, LeaseEvent::Added(l.clone()))),
            Some(old) if old.mod_revision != l.mod_revision || !old.same_content(l) => out.push((
                *s,
                LeaseEvent::Changed {
                    old: old.clone(),
                    new: l.clone(),
                },
            )),
            Some(_) => {}
        }
    }
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

/// The events of one put or delete of key `name` (under the prefix), applied to `known` and
/// `invalid`. A non-canonical key only ever touches `invalid`.
fn apply_kv(
    known: &mut HashMap<Ipv4Net, Lease>,
    invalid: &mut BTreeMap<String, InvalidLease>,
    name: &str,
    put: Option<Result<Lease, InvalidLease>>,
) -> Vec<LeaseEvent> {
    let mut out = Vec::new();
    let subnet = key_to_subnet(name).ok();
    let gone_invalid = |invalid: &mut BTreeMap<String, InvalidLease>, out: &mut Vec<LeaseEvent>| {
        if invalid.remove(name).is_some() {
            out.push(LeaseEvent::Invalid {
                key: name.to_string(),
                entry: None,
            });
        }
    };
    match put {
        Some(Ok(l)) => {
            gone_invalid(invalid, &mut out);
            out.push(match known.insert(l.subnet, l.clone()) {
                Some(old) => LeaseEvent::Changed { old, new: l },
                None => LeaseEvent::Added(l),
            });
        }
        Some(Err(i)) => {
            // A canonical key whose value became unreadable: that lease is no longer usable.
            if i.kind == InvalidKind::Value
                && let Some(s) = subnet
                && let Some(old) = known.remove(&s)
            {
                out.push(LeaseEvent::Removed(old));
            }
            invalid.insert(name.to_string(), i.clone());
            out.push(LeaseEvent::Invalid {
                key: name.to_string(),
                entry: Some(i),
            });
        }
        None => {
            gone_invalid(invalid, &mut out);
            if let Some(s) = subnet
                && let Some(old) = known.remove(&s)
            {
                out.push(LeaseEvent::Removed(old));
            }
        }
    }
    out
}

async fn run(store: LeaseStore, tx: mpsc::Sender<LeaseEvent>, counters: Arc<Counters>) {
    let prefix = store.subnets_prefix();
    let mut known: HashMap<Ipv4Net, Lease> = HashMap::new();
    let mut invalid: BTreeMap<String, InvalidLease> = BTreeMap::new();
    // The last revision whose events have all been delivered.
    let mut rev: i64 = 0;
    let mut need_list = true;
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        if need_list {
            match store.list_all().await {
                Ok((leases, bad, r)) => {
                    counters.lists.fetch_add(1, Ordering::Relaxed);
                    let new = by_subnet(leases);
                    let new_invalid: BTreeMap<String, InvalidLease> =
                        bad.into_iter().map(|i| (i.key.clone(), i)).collect();
                    for ev in diff(&known, &new)
                        .into_iter()
                        .chain(diff_invalid(&invalid, &new_invalid))
                    {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    known = new;
                    invalid = new_invalid;
                    rev = r;
                    need_list = false;
                    if tx.send(LeaseEvent::Synced { revision: r }).await.is_err() {
                        return;
                    }
                    tracing::debug!(revision = r, leases = known.len(), "lease list delivered");
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

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1)
            .with_prev_key()
            .with_progress_notify();
        let mut stream = match store
            .rpc("watch", &prefix, |c| {
                let (k, o) = (prefix.clone(), opts.clone());
                async move { c.watch_client().watch(k, Some(o)).await }
            })
            .await
        {
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
                m = stream.message() => m,
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
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            counters.compactions.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                from_revision = rev + 1,
                                compacted_to = resp.compact_revision(),
                                "lease watch revision compacted: re-listing"
                            );
                            need_list = true;
                        } else {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                reason = resp.cancel_reason(),
                                "etcd cancelled the lease watch"
                            );
                        }
                        break;
                    }
                    // A store whose revision went backwards (etcd restored from a backup, or
                    // wiped): the history we resume from is not this store's; start over.
                    if resp.created()
                        && let Some(h) = resp.header()
                        && h.revision() < rev
                    {
                        counters.compactions.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            store_revision = h.revision(),
                            delivered_revision = rev,
                            "etcd's revision went backwards (restored or replaced): re-listing"
                        );
                        need_list = true;
                        break;
                    }
                    backoff.reset();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        rev = rev.max(kv.mod_revision());
                        let key = String::from_utf8_lossy(kv.key());
                        let Some(name) = key.strip_prefix(&prefix) else {
                            continue;
                        };
                        let put = match ev.event_type() {
                            EventType::Put => Some(parse_lease(
                                name,
                                kv.value(),
                                kv.lease(),
                                kv.create_revision(),
                                kv.mod_revision(),
                            )),
                            EventType::Delete => None,
                        };
                        for out in apply_kv(&mut known, &mut invalid, name, put) {
                            counters.events.fetch_add(1, Ordering::Relaxed);
                            if tx.send(out).await.is_err() {
                                return;
                            }
                        }
                    }
                    // A progress notification: every event up to its revision was sent.
                    if resp.events().is_empty()
                        && !resp.created()
                        && let Some(h) = resp.header()
                    {
                        rev = rev.max(h.revision());
                    }
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
    use crate::lease::LeaseAttrs;

    fn lease(s: &str, node: &str, rev: i64) -> Lease {
        Lease {
            subnet: s.parse().unwrap(),
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

    fn put(name: &str, value: &str, rev: i64) -> Option<Result<Lease, InvalidLease>> {
        Some(parse_lease(name, value.as_bytes(), 7, rev, rev))
    }

    const GOOD: &str = r#"{"PublicIP":"10.0.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}"#;

    /// An alias key of a real lease (`-024`) is an invalid entry of its own: putting it and
    /// deleting it leave the real lease in the map exactly as it was.
    #[test]
    fn alias_key_never_touches_the_real_lease() {
        let mut known = HashMap::new();
        let mut invalid = BTreeMap::new();
        let ev = apply_kv(
            &mut known,
            &mut invalid,
            "10.0.2.0-24",
            put("10.0.2.0-24", GOOD, 5),
        );
        assert!(matches!(&ev[..], [LeaseEvent::Added(_)]), "{ev:?}");
        let real = known.clone();
        for alias in [
            "10.0.2.0-024",
            "10.0.2.0-00000000000000000024",
            "10.0.02.0-24",
        ] {
            let ev = apply_kv(&mut known, &mut invalid, alias, put(alias, GOOD, 6));
            assert!(
                matches!(&ev[..], [LeaseEvent::Invalid { key, entry: Some(i) }] if key == alias && i.kind == InvalidKind::Key),
                "{ev:?}"
            );
            assert_eq!(known, real);
            let ev = apply_kv(&mut known, &mut invalid, alias, None);
            assert!(
                matches!(&ev[..], [LeaseEvent::Invalid { key, entry: None }] if key == alias),
                "{ev:?}"
            );
            assert_eq!(known, real);
        }
        assert!(invalid.is_empty());
        // Deleting a key that was never there changes nothing.
        assert!(apply_kv(&mut known, &mut invalid, "junk", None).is_empty());
    }

    /// A canonical key whose value is not lease JSON: the lease is removed and the key is
    /// reported as invalid (kind Value); a good value again makes it a lease again.
    #[test]
    fn unreadable_value_is_reported_not_dropped() {
        let mut known = HashMap::new();
        let mut invalid = BTreeMap::new();
        apply_kv(
            &mut known,
            &mut invalid,
            "10.0.2.0-24",
            put("10.0.2.0-24", GOOD, 5),
        );
        let ev = apply_kv(
            &mut known,
            &mut invalid,
            "10.0.2.0-24",
            put("10.0.2.0-24", "{", 6),
        );
        assert!(
            matches!(&ev[..], [LeaseEvent::Removed(_), LeaseEvent::Invalid { entry: Some(i), .. }] if i.kind == InvalidKind::Value),
            "{ev:?}"
        );
        assert!(known.is_empty());
        assert_eq!(invalid.len(), 1);
        let ev = apply_kv(
            &mut known,
            &mut invalid,
            "10.0.2.0-24",
            put("10.0.2.0-24", GOOD, 7),
        );
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
        assert!(invalid.is_empty());
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
        let ev = diff(&known, &new);
        assert_eq!(ev.len(), 3);
        assert!(matches!(&ev[0], LeaseEvent::Removed(l) if l.attrs.node_name == "a"));
        assert!(
            matches!(&ev[1], LeaseEvent::Changed { old, new } if old.attrs.node_name == "c" && new.attrs.node_name == "c2")
        );
        assert!(matches!(&ev[2], LeaseEvent::Added(l) if l.attrs.node_name == "d"));
        assert!(diff(&new, &new).is_empty());
    }
}
