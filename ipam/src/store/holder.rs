//! [`LeaseHolder`]: keeps this node's lease, in a background task.
//!
//! Acquire (sticky, see [`LeaseStore::acquire_with`]) retrying with backoff; then renew with
//! a keep-alive every TTL/3 and watch the node's own key. A failed renewal is retried with a
//! backoff capped at [`RETRY_CAP`], whatever the TTL, so the lease is renewed within seconds
//! of etcd answering again; the retries aim at etcd's expiry (measured from when the last
//! successful keep-alive was *sent*) minus [`EXPIRY_MARGIN`], and they go on past it: only
//! etcd's answer (TTL 0) says the lease is gone, never a local clock. When the lease is lost
//! anyway (its etcd lease expired while etcd was unreachable, or the key was deleted or taken
//! over), the holder logs it, counts it and acquires again preferring the same subnet.
//!
//! With a pin ([`LeaseStore::hold_pinned`]), the holder never leaves a subnet whose addresses
//! this node's pods still hold: before each acquisition it asks the pin how many pod
//! addresses of the subnet it is about to prefer (its last lease, or the caller's hint) are
//! in use; if any are, it takes that subnet only ([`LeaseStore::acquire_only`]). While
//! another node holds it, the holder is *blocked* ([`HolderState::blocked`]), says so once per
//! change (a warning) and keeps trying for it; it takes another subnet only when no pod
//! address remains or an operator wrote a move permission ([`super::MoveRequest`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::backend::{EventStream, KeepAlive, Put, WatchEvent, WatchMessage, WatchSpec, Written};
use super::{Backoff, LeaseStore, StoreError};
use crate::lease::{Lease, LeaseAttrs};
use crate::netconf::NetConfig;
use std::fmt;

/// What the holder has, published on a `tokio::sync::watch` channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HolderState {
    /// The lease last acquired (stays set while re-acquiring after a loss: the data plane
    /// keeps using it, and the re-acquisition normally yields the same subnet).
    pub lease: Option<Lease>,
    /// True while the lease is held, i.e. acquired and not known to be lost.
    pub held: bool,
    /// True while held and the last request to etcd succeeded.
    pub healthy: bool,
    /// The last error, cleared by the next success.
    pub last_error: Option<String>,
    /// Set while the holder does not acquire because the subnet its pods use is held by
    /// another node (see the module doc); cleared by the next acquisition.
    pub blocked: Option<Blocked>,
}

/// Why a pinned holder takes no subnet: the one its pods use is not free.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    /// This node's name.
    pub node: String,
    /// The subnet this node's pods hold addresses of.
    pub subnet: Ipv4Net,
    /// Who holds it, or why it cannot be taken (the store's error).
    pub why: String,
    /// Pod addresses of `subnet` in use on this node (`None`: the allocator state could not
    /// be read, which counts as in use).
    pub pods: Option<u64>,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pods = match self.pods {
            Some(n) => format!("{n} pod address(es) of it are in use on this node"),
            None => "the pod address allocator cannot be read (counted as in use)".into(),
        };
        write!(
            f,
            "{}, and {pods}: not moving to another subnet (their addresses would be routed to the other node); retrying for {}. Drain the node's pods and run `twillctl leases move {} --yes` to let it move",
            self.why, self.subnet, self.node
        )
    }
}

/// Pod addresses of a subnet in use on this node (see [`LeaseStore::hold_pinned`]);
/// `Err` when that cannot be read (counted as in use).
pub type Pin = Arc<dyn Fn(Ipv4Net) -> Result<u64, String> + Send + Sync>;

/// Counters of a [`LeaseHolder`] (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HolderStats {
    /// Successful acquisitions (1 + re-acquisitions).
    pub acquisitions: u64,
    /// Successful keep-alives.
    pub renewals: u64,
    /// Leases lost (expired, deleted, taken over).
    pub losses: u64,
    /// Acquisitions not made because the pinned subnet was held by another node.
    pub blocked: u64,
    /// Failed requests.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    acquisitions: AtomicU64,
    renewals: AtomicU64,
    losses: AtomicU64,
    errors: AtomicU64,
    blocked: AtomicU64,
}

/// Keeps a lease; dropping it stops renewing (the key then expires after its TTL unless the
/// node comes back before, which keeps the subnet).
#[derive(Debug)]
pub struct LeaseHolder {
    state: watch::Receiver<HolderState>,
    attrs: watch::Sender<LeaseAttrs>,
    counters: Arc<Counters>,
    store: LeaseStore,
    task: JoinHandle<()>,
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaseHolder {
    pub(super) fn spawn(
        store: LeaseStore,
        cfg: NetConfig,
        attrs: LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
        pin: Option<Pin>,
    ) -> Self {
        let (state_tx, state_rx) = watch::channel(HolderState::default());
        let (attrs_tx, attrs_rx) = watch::channel(attrs);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(
            Task {
                store: store.clone(),
                cfg,
                ttl,
                attrs: attrs_rx,
                state: state_tx,
                counters: counters.clone(),
                pin,
            }
            .run(prefer),
        );
        LeaseHolder {
            state: state_rx,
            attrs: attrs_tx,
            counters,
            store,
            task,
        }
    }

    /// A receiver of the state (changes are notified).
    pub fn subscribe(&self) -> watch::Receiver<HolderState> {
        self.state.clone()
    }

    /// The current state.
    pub fn state(&self) -> HolderState {
        self.state.borrow().clone()
    }

    /// Waits until a lease is held and returns it.
    pub async fn acquired(&mut self) -> Lease {
        let s = self
            .state
            .wait_for(|s| s.held && s.lease.is_some())
            .await
            .expect("the holder task owns the sender until it is aborted");
        s.lease.clone().expect("checked above")
    }

    /// Counters.
    pub fn stats(&self) -> HolderStats {
        let c = &self.counters;
        HolderStats {
            acquisitions: c.acquisitions.load(Ordering::Relaxed),
            renewals: c.renewals.load(Ordering::Relaxed),
            losses: c.losses.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            blocked: c.blocked.load(Ordering::Relaxed),
        }
    }

    /// New attributes (e.g. a new VTEP MAC): written to the held key.
    pub fn update_attrs(&self, attrs: LeaseAttrs) {
        self.attrs.send_replace(attrs);
    }

    /// Stops renewing and deletes the key (explicit release). Returns whether a key was
    /// deleted.
    pub async fn release(self) -> Result<bool, StoreError> {
        self.task.abort();
        let lease = self.state.borrow().lease.clone();
        match lease {
            Some(l) => self.store.release_key(&l.key()).await,
            None => Ok(false),
        }
    }
}

/// The longest wait between two tries of a failed renewal or acquisition.
pub const RETRY_CAP: Duration = Duration::from_secs(2);

/// How long before etcd's expiry of the lease the last scheduled retry aims.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

struct Task {
    store: LeaseStore,
    cfg: NetConfig,
    ttl: Duration,
    attrs: watch::Receiver<LeaseAttrs>,
    state: watch::Sender<HolderState>,
    counters: Arc<Counters>,
    pin: Option<Pin>,
}

/// Why a held lease ended.
enum Lost {
    Expired,
    Deleted,
    TakenOver(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Expired => f.write_str("its etcd lease expired"),
            Lost::Deleted => f.write_str("its key was deleted"),
            Lost::TakenOver(who) => write!(f, "its key was overwritten (now {who})"),
        }
    }
}

impl Task {
    fn error(&self, e: &StoreError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.state.send_modify(|s| {
            s.healthy = false;
            s.last_error = Some(e.to_string());
        });
    }

    /// One acquisition: plain, or (pinned, pods in `prefer`) `prefer` only unless the
    /// operator's move permission lets it go. `Ok(Err(blocked))`: not acquired, blocked.
    async fn acquire(
        &self,
        attrs: &LeaseAttrs,
        prefer: Option<Ipv4Net>,
        prefer6: Option<Ipv6Net>,
    ) -> Result<Result<(Lease, bool), Blocked>, StoreError> {
        let pinned = match (prefer, &self.pin) {
            (Some(p), Some(pin)) => match pin(p) {
                Ok(0) => None,
                Ok(n) => Some((p, Some(n))),
                Err(e) => {
                    tracing::warn!(subnet = %p, error = %e, "cannot tell whether pods use the subnet: counting it as in use");
                    Some((p, None))
                }
            },
            _ => None,
        };
        let Some((subnet, pods)) = pinned else {
            return Ok(Ok((
                self.store
                    .acquire_with_ipv6(&self.cfg, attrs, self.ttl, prefer, prefer6)
                    .await?,
                false,
            )));
        };
        let why = match self
            .store
            .acquire_only_ipv6(&self.cfg, attrs, self.ttl, subnet, prefer6)
            .await
        {
            Ok(l) => return Ok(Ok((l, false))),
            Err(e @ (StoreError::SubnetHeld { .. } | StoreError::InvalidSubnet { .. })) => {
                e.to_string()
            }
            Err(e) => return Err(e),
        };
        match self.store.move_request(&attrs.node_name).await? {
            Some(Ok(m)) if m.allows(&subnet) => {
                tracing::warn!(subnet = %subnet, pods = ?pods, reason = %why, key = %self.store.move_key(&attrs.node_name), "the operator allows this node to move: taking another subnet although pods hold addresses of this one");
                let l = self
                    .store
                    .acquire_with(&self.cfg, attrs, self.ttl, None)
                    .await?;
                return Ok(Ok((l, true)));
            }
            Some(Ok(m)) => {
                tracing::debug!(subnet = %subnet, from = ?m.from, "a move permission for another subnet: ignored")
            }
            Some(Err(bad)) => tracing::warn!(reason = %bad, "ignoring an invalid move permission"),
            None => {}
        }
        Ok(Err(Blocked {
            node: attrs.node_name.clone(),
            subnet,
            why,
            pods,
        }))
    }

    async fn run(mut self, mut prefer: Option<Ipv4Net>) {
        let mut backoff = Backoff::new(RETRY_CAP);
        // The IPv6 subnet of the last dual-stack lease: preferred with `prefer`.
        let mut prefer6: Option<Ipv6Net> = None;
        loop {
            let attrs = self.attrs.borrow_and_update().clone();
            let lease = match self.acquire(&attrs, prefer, prefer6).await {
                Ok(Ok((l, moved))) => {
                    if moved && let Err(e) = self.store.clear_move(&attrs.node_name).await {
                        tracing::warn!(error = %e, "deleting the used move permission failed (it expires by itself)");
                    }
                    l
                }
                Ok(Err(blocked)) => {
                    self.counters.blocked.fetch_add(1, Ordering::Relaxed);
                    let text = blocked.to_string();
                    let changed = self.state.borrow().blocked.as_ref() != Some(&blocked);
                    if changed {
                        tracing::warn!(subnet = %blocked.subnet, reason = %text, "lease blocked: this node's subnet is not free");
                    }
                    self.state.send_modify(|s| {
                        s.held = false;
                        s.healthy = false;
                        s.last_error = Some(text);
                        s.blocked = Some(blocked);
                    });
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                Err(e) => {
                    self.error(&e);
                    let d = backoff.next_delay();
                    tracing::error!(error = %e, retry_in = ?d, "acquiring a subnet lease failed");
                    tokio::time::sleep(d).await;
                    continue;
                }
            };
            backoff.reset();
            self.counters.acquisitions.fetch_add(1, Ordering::Relaxed);
            if let Some(old) = prefer
                && old != lease.subnet
            {
                tracing::warn!(old = %old, new = %lease.subnet, "took another subnet than the one this node had");
            }
            prefer = Some(lease.subnet);
            prefer6 = lease.ipv6_subnet.or(prefer6);
            self.state.send_replace(HolderState {
                lease: Some(lease.clone()),
                held: true,
                healthy: true,
                last_error: None,
                blocked: None,
            });
            let lost = self.hold(lease.clone()).await;
            self.counters.losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(subnet = %lease.subnet, reason = %lost, "lost the subnet lease: re-acquiring it");
            if lease.etcd_lease != 0 && !matches!(lost, Lost::Expired) {
                self.store.revoke(lease.etcd_lease).await;
            }
            self.state.send_modify(|s| {
                s.held = false;
                s.healthy = false;
                s.last_error = Some(format!("lease {} lost: {lost}", lease.subnet));
            });
        }
    }

    /// Renews and watches `lease` until it is lost.
    async fn hold(&mut self, mut lease: Lease) -> Lost {
        // The key held: IPv4-only or dual-stack.
        let key = self.store.key_of(&lease);
        let ttl = lease
            .expires
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .unwrap_or(self.ttl)
            .max(Duration::from_secs(1));
        let interval = ttl / 3;
        // etcd's expiry of the lease as seen here: from the acquisition, then from the sending
        // of the last keep-alive that etcd answered (never from its answer: later than etcd's).
        let mut deadline = Instant::now() + ttl;
        let mut past_deadline_logged = false;
        let mut next_renew = Instant::now() + interval;
        let mut keeper: Option<Box<dyn KeepAlive>> = None;
        let mut own: Option<Box<dyn EventStream>> = None;
        let mut backoff = Backoff::new(interval.clamp(Duration::from_millis(200), RETRY_CAP));
        let mut watch_retry = Instant::now();
        let mut attrs_open = true;
        // New etcd clients (TLS files reloaded): the keep-alive stream and the watch of our
        // key move to them (same lease ID; the watch re-checks the key, then resumes).
        let mut generation = self.store.subscribe_generation();
        generation.mark_unchanged();
        loop {
            // (Re)start the watch of our own key: a get first (the key may have changed while
            // the watch was down, even beyond a compaction), then watch from after it.
            if own.is_none() && Instant::now() >= watch_retry {
                match self.check_own(&key, &lease).await {
                    Ok(Err(lost)) => return lost,
                    Ok(Ok(rev)) => {
                        let spec = WatchSpec {
                            key: key.clone(),
                            prefix: false,
                            from_revision: rev + 1,
                            progress: false,
                        };
                        match self.store.backend.watch(spec).await {
                            Ok(s) => own = Some(s),
                            Err(e) => {
                                self.error(&e);
                                watch_retry = Instant::now() + backoff.next_delay();
                            }
                        }
                    }
                    Err(e) => {
                        self.error(&e);
                        watch_retry = Instant::now() + backoff.next_delay();
                    }
                }
            }
            let renew_at = if lease.reserved {
                Instant::now() + Duration::from_secs(3600)
            } else {
                next_renew
            };
            let wake = if own.is_none() {
                renew_at.min(watch_retry)
            } else {
                renew_at
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {
                    if lease.reserved || Instant::now() < next_renew {
                        continue;
                    }
                    let sent = Instant::now();
                    let sent_wall = SystemTime::now();
                    match self.renew(&mut keeper, lease.etcd_lease).await {
                        Ok(ttl_left) if ttl_left > 0 => {
                            self.counters.renewals.fetch_add(1, Ordering::Relaxed);
                            deadline = sent + Duration::from_secs(ttl_left as u64);
                            past_deadline_logged = false;
                            next_renew = sent + interval;
                            backoff.reset();
                            // etcd's expiry: the TTL it answered, from when the keep-alive was sent.
                            let expires = sent_wall + Duration::from_secs(ttl_left as u64);
                            lease.expires = Some(expires);
                            self.state.send_modify(|s| {
                                s.healthy = true;
                                s.last_error = None;
                                if let Some(l) = &mut s.lease {
                                    l.expires = Some(expires);
                                }
                            });
                            tracing::debug!(subnet = %lease.subnet, ttl_left, "renewed the lease");
                            if !self.store.grace().is_zero() {
                                self.store.renew_grace(&lease.subnet, &lease.attrs.node_name).await;
                            }
                        }
                        Ok(_) => return Lost::Expired,
                        Err(e) => {
                            keeper = None;
                            self.error(&e);
                            let now = Instant::now();
                            // Aim the last retry before etcd's expiry, minus a margin; past it,
                            // keep trying every RETRY_CAP: etcd may still hold the lease (its
                            // clock, a leader change) and only its answer tells.
                            let aim = deadline.checked_sub(EXPIRY_MARGIN).unwrap_or(deadline);
                            let mut d = backoff.next_delay();
                            if now < aim {
                                d = d.min(aim - now).max(Duration::from_millis(50));
                            } else if !past_deadline_logged {
                                past_deadline_logged = true;
                                tracing::error!(subnet = %lease.subnet, error = %e, "the lease has probably expired in etcd (no renewal got through before its TTL): still trying to renew it, then to take the same subnet again");
                            }
                            tracing::warn!(subnet = %lease.subnet, error = %e, retry_in = ?d, "renewing the lease failed");
                            next_renew = now + d;
                        }
                    }
                }
                msg = async { own.as_mut().expect("guarded").next().await }, if own.is_some() => {
                    match msg {
                        Ok(Some(WatchMessage::Compacted { .. } | WatchMessage::Cancelled { .. })) => {
                            own = None;
                            continue;
                        }
                        Ok(Some(WatchMessage::Events(events))) => {
                            for ev in events {
                                match ev {
                                    WatchEvent::Delete(_) => return Lost::Deleted,
                                    WatchEvent::Put(kv) => {
                                        let a = LeaseAttrs::from_json(&key, &kv.value);
                                        let node = a.as_ref().map(|a| a.node_name.clone()).unwrap_or_default();
                                        if node != self.attrs.borrow().node_name || kv.lease != lease.etcd_lease {
                                            return Lost::TakenOver(format!("node {node:?}, etcd lease {:x}", kv.lease));
                                        }
                                        lease.mod_revision = kv.mod_revision;
                                    }
                                }
                            }
                        }
                        Ok(Some(WatchMessage::Started { .. } | WatchMessage::Progress { .. })) => {}
                        Ok(None) | Err(_) => {
                            // etcd restarted or the connection broke: re-check and re-watch.
                            own = None;
                            watch_retry = Instant::now() + backoff.next_delay();
                        }
                    }
                }
                r = generation.changed() => {
                    if r.is_ok() {
                        tracing::info!(subnet = %lease.subnet, lease = format!("{:x}", lease.etcd_lease), "etcd clients replaced: renewing the same lease over the new connection");
                        keeper = None;
                        own = None;
                        watch_retry = Instant::now();
                    }
                }
                changed = self.attrs.changed(), if attrs_open => {
                    if changed.is_err() {
                        attrs_open = false;
                        continue;
                    }
                    let attrs = self.attrs.borrow_and_update().clone();
                    match self.rewrite(&key, &lease, &attrs).await {
                        Ok(Some(rev)) => {
                            lease.attrs = attrs;
                            lease.mod_revision = rev;
                            let l = lease.clone();
                            self.state.send_modify(|s| s.lease = Some(l));
                        }
                        Ok(None) => return Lost::TakenOver("changed before the attribute update".into()),
                        Err(e) => {
                            self.error(&e);
                            // Retried by the next change notification.
                            self.attrs.mark_changed();
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                    }
                }
            }
        }
    }

    /// Ok(Ok(revision)) if the key is still ours; Ok(Err(lost)) if not.
    async fn check_own(&self, key: &str, lease: &Lease) -> Result<Result<i64, Lost>, StoreError> {
        let (kv, rev) = self.store.backend.get(key).await?;
        let Some(k) = kv else {
            return Ok(Err(Lost::Deleted));
        };
        let node = LeaseAttrs::from_json(key, &k.value)
            .map(|a| a.node_name)
            .unwrap_or_default();
        if node != self.attrs.borrow().node_name || k.lease != lease.etcd_lease {
            return Ok(Err(Lost::TakenOver(format!(
                "node {node:?}, etcd lease {:x}",
                k.lease
            ))));
        }
        Ok(Ok(rev))
    }

    /// One keep-alive round trip; returns the remaining TTL (0: the lease is gone).
    async fn renew(
        &self,
        keeper: &mut Option<Box<dyn KeepAlive>>,
        id: i64,
    ) -> Result<i64, StoreError> {
        if keeper.is_none() {
            *keeper = Some(self.store.backend.keep_alive(id).await?);
        }
        let res = keeper.as_mut().expect("set above").renew().await;
        if res.is_err() {
            *keeper = None;
        }
        res
    }

    /// Writes new attrs if the key is still ours. Ok(None) if it is not.
    async fn rewrite(
        &self,
        key: &str,
        lease: &Lease,
        attrs: &LeaseAttrs,
    ) -> Result<Option<i64>, StoreError> {
        let put = Put {
            key: key.to_string(),
            value: attrs.keeping_unknown_fields_of(&lease.attrs).to_json(),
            lease: if lease.reserved { 0 } else { lease.etcd_lease },
        };
        let written = self
            .store
            .backend
            .compare_and_put(lease.mod_revision, vec![put], None)
            .await?;
        Ok(match written {
            Written::Done { revision } => Some(revision),
            Written::Refused { .. } => None,
        })
    }
}
