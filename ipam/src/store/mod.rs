//! The lease store (feature `etcd`): network config, subnet leases, watch, hold.
//!
//! Layout (see docs/leases.md): `<prefix>/config` holds net-conf.json,
//! `<prefix>/subnets/<net>-<len>` (dual-stack: `<net>-<len>&<IPv6 net>-<len>`) one lease per node, bound to an etcd lease (TTL) or without one (a reservation).
//! Nothing here panics on an unreachable etcd, and the long-running parts ([`LeaseWatch`],
//! [`LeaseHolder`]) retry with backoff forever.
//!
//! By job:
//! - [`backend`]: the [`LeaseBackend`] trait, the verbs the store needs from a database;
//! - [`etcd`]: its etcd implementation (endpoints, TLS, failover);
//! - `config`: the network config key;
//! - `leases`: lease, grace and move keys (list, get, reserve, release);
//! - `acquire`: the acquisition algorithm (the subnet choice itself is
//!   [`crate::subnets::choose`]);
//! - `holder` and `watch`: the long-running parts, on the trait only.

mod acquire;
pub mod backend;
mod backoff;
mod config;
mod error;
pub mod etcd;
mod holder;
mod leases;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;

/// The etcd client crate, for callers that need raw access (tests, tools).
pub use etcd_client;

pub use backend::LeaseBackend;
pub use backoff::Backoff;
pub use error::StoreError;
pub use etcd::{EtcdBackend, EtcdOptions, TlsMaterial, inner_error};
pub use holder::{Blocked, EXPIRY_MARGIN, HolderState, HolderStats, LeaseHolder, Pin, RETRY_CAP};
pub use watch::{LeaseWatch, WatchCounters, WatchStats};

use crate::lease::{Lease, LeaseAttrs, SubnetKey, subnet_to_key};
use crate::netconf::NetConfig;

/// Default key prefix (Flannel's is `/coreos.com/network`).
pub const DEFAULT_PREFIX: &str = "/twill/network";

/// The value of `<prefix>/move/<node>` (JSON): the operator lets `NodeName` leave its
/// subnet (`From`; absent: whichever it is blocked on) for another one although its pods still
/// hold addresses of it. Written by `twillctl leases move`, read by the node's
/// [`LeaseHolder`] only while it is blocked, deleted by it once it has moved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    #[serde(rename = "NodeName")]
    pub node_name: String,
    #[serde(rename = "From", default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Ipv4Net>,
}

impl MoveRequest {
    /// Whether it lets the node leave `subnet`.
    pub fn allows(&self, subnet: &Ipv4Net) -> bool {
        self.from.is_none_or(|f| f == *subnet)
    }
}

/// How long a move permission lives unless its node uses it.
pub const MOVE_TTL: Duration = Duration::from_secs(3600);

/// A handle on the leases of one network. Cheap to clone.
#[derive(Clone)]
pub struct LeaseStore {
    backend: Arc<dyn LeaseBackend>,
    prefix: Arc<str>,
    /// Grace period of an expired lease (see [`LeaseStore::with_grace`]); zero: none.
    grace: Duration,
}

impl std::fmt::Debug for LeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseStore")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl LeaseStore {
    /// An etcd store. Builds the client without talking to etcd (it connects on the first
    /// request, and reconnects by itself). Fails only on invalid options or unreadable TLS
    /// files.
    pub async fn new(opts: EtcdOptions) -> Result<Self, StoreError> {
        let prefix = opts.prefix.clone();
        let backend = EtcdBackend::new(opts).await?;
        Ok(Self::with_backend(Arc::new(backend), &prefix))
    }

    /// A store on any backend (see [`backend`]), under key prefix `prefix` (a trailing `/`
    /// is ignored).
    pub fn with_backend(backend: Arc<dyn LeaseBackend>, prefix: &str) -> Self {
        LeaseStore {
            backend,
            prefix: prefix.trim_end_matches('/').into(),
            grace: Duration::ZERO,
        }
    }

    /// [`LeaseStore::new`], then one read to check that etcd answers: a clear
    /// [`StoreError::Unreachable`] otherwise.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        let store = Self::new(opts).await?;
        store.ping().await?;
        Ok(store)
    }

    /// One read of the config key: Ok if the backend answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let key = self.config_key();
        self.backend
            .get(&key)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                StoreError::Etcd { source, .. } => StoreError::Unreachable {
                    endpoints: self.backend.describe(),
                    reason: source.to_string(),
                },
                StoreError::Timeout { timeout, .. } => StoreError::Unreachable {
                    endpoints: self.backend.describe(),
                    reason: format!("no answer within {timeout:?}"),
                },
                e => e,
            })
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn LeaseBackend> {
        &self.backend
    }

    /// The etcd backend, if this store is on etcd.
    pub fn etcd(&self) -> Option<&EtcdBackend> {
        self.backend.as_any().downcast_ref()
    }

    fn etcd_only(&self) -> &EtcdBackend {
        self.etcd()
            .expect("an etcd-only call on a store that is not on etcd")
    }

    /// The options this store was built with. Etcd stores only (panics otherwise).
    pub fn options(&self) -> &EtcdOptions {
        self.etcd_only().options()
    }

    /// The etcd client of the current endpoint (tests, tools). Etcd stores only (panics
    /// otherwise).
    pub fn client(&self) -> etcd_client::Client {
        self.etcd_only().client()
    }

    /// The generation of the backend's connections: 0 at the start, +1 per
    /// [`LeaseStore::reload_tls`].
    pub fn generation(&self) -> u64 {
        *self.backend.connections().borrow()
    }

    /// A receiver notified when the backend's connections are replaced.
    pub fn subscribe_generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.backend.connections()
    }

    /// New etcd clients from `material` (see [`EtcdBackend::reload_tls`]), checked with a
    /// read of the config key, for every clone of this store.
    pub async fn reload_tls(&self, material: &TlsMaterial) -> Result<String, StoreError> {
        let Some(etcd) = self.etcd() else {
            return Err(StoreError::Options(
                "the lease store is not on etcd: there is no TLS to reload".into(),
            ));
        };
        etcd.reload_tls(material, &self.config_key()).await
    }

    /// Number of requests (round trips) made through this store and its clones.
    pub fn rpc_count(&self) -> u64 {
        self.backend.requests()
    }

    /// Sets the grace period of an expired lease: every TTL lease acquired through this
    /// store writes a grace key `<prefix>/grace/<net>-<len>` naming its node, bound to an
    /// etcd lease of TTL + `grace` that is renewed together with the lease. Until that key
    /// expires (`grace` after the lease), no other node's acquisition through a store with a
    /// grace period takes the subnet, so a node cut off longer than its TTL gets its subnet
    /// back when it returns. Zero (the default) writes no grace key; grace keys are always
    /// honoured. An explicit release deletes the grace key too.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The grace period (see [`LeaseStore::with_grace`]).
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The key prefix, without a trailing `/` (`<prefix>` of `<prefix>/config`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// `<prefix>/subnets/` (with the trailing slash).
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// `<prefix>/subnets/<net>-<len>`: the IPv4-only key of `subnet` (a dual-stack lease has
    /// its own key: [`LeaseStore::key_of`]).
    pub fn lease_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_to_key(subnet))
    }

    /// `<prefix>/subnets/<key>`: the etcd key of a lease key (`<net>-<len>`, or
    /// `<net>-<len>&<IPv6 net>-<len>`).
    pub fn subnet_key_name(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_prefix())
    }

    /// The etcd key of `lease` (its IPv4-only or dual-stack key).
    pub fn key_of(&self, lease: &Lease) -> String {
        self.subnet_key_name(&lease.key())
    }

    /// `<prefix>/grace/` (with the trailing slash).
    pub fn grace_prefix(&self) -> String {
        format!("{}/grace/", self.prefix)
    }

    /// `<prefix>/grace/<net>-<len>`.
    pub fn grace_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.grace_prefix(), subnet_to_key(subnet))
    }

    /// `<prefix>/move/` (with the trailing slash).
    pub fn move_prefix(&self) -> String {
        format!("{}/move/", self.prefix)
    }

    /// `<prefix>/move/<node>`: an operator's permission for `node` to leave its subnet
    /// although its pods still hold addresses of it (see [`MoveRequest`]).
    pub fn move_key(&self, node: &str) -> String {
        format!("{}{node}", self.move_prefix())
    }

    /// Keeps a lease for `attrs.node_name` in a background task (see [`LeaseHolder`]).
    /// Must be called inside a tokio runtime.
    pub fn hold(&self, cfg: NetConfig, attrs: LeaseAttrs, ttl: Duration) -> LeaseHolder {
        LeaseHolder::spawn(self.clone(), cfg, attrs, ttl, None, None)
    }

    /// [`LeaseStore::hold`] preferring `prefer` (e.g. the subnet of the node's subnet file)
    /// when the node has no key in etcd.
    pub fn hold_with(
        &self,
        cfg: NetConfig,
        attrs: LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
    ) -> LeaseHolder {
        LeaseHolder::spawn(self.clone(), cfg, attrs, ttl, prefer, None)
    }

    /// [`LeaseStore::hold_with`] that never leaves a subnet whose addresses pods on this node
    /// still hold: `pin(subnet)` counts them (see [`LeaseHolder`]'s module doc and
    /// [`HolderState::blocked`]).
    pub fn hold_pinned(
        &self,
        cfg: NetConfig,
        attrs: LeaseAttrs,
        ttl: Duration,
        prefer: Option<Ipv4Net>,
        pin: Pin,
    ) -> LeaseHolder {
        LeaseHolder::spawn(self.clone(), cfg, attrs, ttl, prefer, Some(pin))
    }

    /// A stream of lease events: full state, then changes (see [`LeaseWatch`]).
    /// Must be called inside a tokio runtime.
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch::spawn(self.clone())
    }
}
