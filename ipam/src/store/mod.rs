//! The etcd lease store (feature `etcd`): network config, subnet leases, watch, hold.
//!
//! Layout (see docs/leases.md): `<prefix>/config` holds net-conf.json, `<prefix>/subnets/<net>-<len>`
//! one lease per node, bound to an etcd lease (TTL) or without one (a reservation).
//! Every request carries the timeout of [`EtcdOptions::timeout`]; nothing here panics on an
//! unreachable etcd, and the long-running parts ([`LeaseWatch`], [`LeaseHolder`]) retry with
//! backoff forever.

mod holder;
mod watch;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    GetResponse, Identity, KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use ipnet::Ipv4Net;
use rand::Rng;

/// The etcd client crate, for callers that need raw access (tests, tools).
pub use etcd_client;
pub use holder::{Blocked, EXPIRY_MARGIN, HolderState, HolderStats, LeaseHolder, Pin, RETRY_CAP};
pub use watch::{LeaseWatch, WatchStats};

use crate::lease::{InvalidLease, Lease, LeaseAttrs, key_to_subnet, parse_lease, subnet_to_key};
use crate::netconf::{ConfigError, NetConfig};

/// Default key prefix (Flannel's is `/coreos.com/network`).
pub const DEFAULT_PREFIX: &str = "/twill/network";

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`; several for a cluster.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/twill/network` (a trailing `/` is ignored).
    pub prefix: String,
    /// CA that signed etcd's server certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mTLS (PEM); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key for mTLS (PEM); needs `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Timeout of connecting and of every single request.
    pub timeout: Duration,
}

impl EtcdOptions {
    /// Plain-HTTP options with the default prefix and a 5 s timeout.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// Errors of the lease store. Each names the operation and the key or value involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid etcd options: {0}")]
    Options(String),
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd {op} {key}: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        source: etcd_client::Error,
    },
    #[error("etcd {op} {key}: no answer within {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    #[error("the network config at {key} is invalid: {source}")]
    BadConfig { key: String, source: ConfigError },
    #[error("no network config at {key} (write one with `twillctl network set`)")]
    NoConfig { key: String },
    #[error(
        "network full: all {count} subnets /{subnet_len} of {network} between {min} and {max} are leased"
    )]
    NetworkFull {
        network: Ipv4Net,
        subnet_len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
        count: u64,
    },
    #[error("refused: {}", reasons.join("; "))]
    Refused {
        reasons: Vec<String>,
        stranded: Vec<Ipv4Net>,
    },
    #[error("subnet {subnet} {reason}")]
    InvalidSubnet { subnet: Ipv4Net, reason: String },
    #[error("lease attributes invalid: {0}")]
    InvalidAttrs(String),
    #[error("{key} is held by node {holder:?}")]
    Conflict { key: String, holder: String },
    /// [`LeaseStore::acquire_only`]: the one subnet this node may take is not free.
    #[error("subnet {subnet} {}", held_by(holder, holder_ip, *grace))]
    SubnetHeld {
        subnet: Ipv4Net,
        /// The node holding it (its `NodeName`; empty: a lease without one, e.g. flanneld's).
        holder: String,
        /// That node's PublicIP, when the key is a lease (not a grace key).
        holder_ip: Option<Ipv4Addr>,
        /// Held by the other node's grace key (its lease expired a moment ago).
        grace: bool,
    },
    #[error("gave up on {what} after {attempts} attempts: every attempt collided")]
    Contention { what: &'static str, attempts: u32 },
    /// Another node (another PublicIP) holds a live lease, or a reservation it has taken,
    /// under this node's name: taking it over would make the two nodes take the key from each
    /// other forever (cloned VMs, hostnames). Allowed only when the PublicIP matches or the
    /// other lease has expired.
    #[error(
        "node name {node:?} is already used by the node at {other_ip}: it holds subnet {subnet}{} (this node is {our_ip}); give this node a unique --node-name, {fix}",
        if *reserved { " (a reservation)" } else { " with a live lease" }
    )]
    DuplicateName {
        node: String,
        subnet: Ipv4Net,
        other_ip: Ipv4Addr,
        our_ip: Ipv4Addr,
        reserved: bool,
        fix: String,
    },
}

/// "is held by node "b" (192.168.0.2)" / "is in the grace period of node "b"".
fn held_by(holder: &str, ip: &Option<Ipv4Addr>, grace: bool) -> String {
    let who = if holder.is_empty() {
        "a node without NodeName".to_string()
    } else {
        format!("node {holder:?}")
    };
    match (grace, ip) {
        (true, _) => format!("is in the grace period of {who} (its lease expired just now)"),
        (false, Some(ip)) if !ip.is_unspecified() => format!("is held by {who} ({ip})"),
        (false, _) => format!("is held by {who}"),
    }
}

impl StoreError {
    /// A node name held by another node: see [`StoreError::DuplicateName`].
    fn duplicate_name(
        node: &str,
        subnet: Ipv4Net,
        other: Ipv4Addr,
        ours: Ipv4Addr,
        reserved: bool,
    ) -> Self {
        let fix = if reserved {
            format!(
                "or, if {other} is gone, reserve the subnet again (`twillctl leases reserve {subnet} --node {node}`) so that the next node of that name takes it"
            )
        } else {
            format!(
                "or, if {other} is gone, wait for its lease to expire or release it (`twillctl leases release {subnet}`)"
            )
        };
        StoreError::DuplicateName {
            node: node.to_string(),
            subnet,
            other_ip: other,
            our_ip: ours,
            reserved,
            fix,
        }
    }

    /// True for errors that a retry may cure (etcd unreachable, timeouts, collisions).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable { .. }
                | StoreError::Etcd { .. }
                | StoreError::Timeout { .. }
                | StoreError::Contention { .. }
        )
    }
}

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

/// A handle on the leases of one network in etcd. Cheap to clone.
#[derive(Clone)]
pub struct LeaseStore {
    /// One client per endpoint: requests go to the current one and fail over to the next
    /// on a transport error or timeout (etcd-client's balanced channel would keep sending
    /// a share of the requests to a dead endpoint).
    /// Swapped as a whole by [`LeaseStore::reload_tls`]; every clone sees the new set.
    clients: Arc<RwLock<Arc<[Client]>>>,
    /// Bumped by every swap of `clients`: long-lived streams (keep-alive, watches) made on
    /// an older generation are remade on the new one, so the old connections close.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    /// The endpoint URLs with their scheme (as the clients were built).
    urls: Arc<[String]>,
    current: Arc<AtomicUsize>,
    opts: Arc<EtcdOptions>,
    prefix: Arc<str>,
    rpcs: Arc<AtomicU64>,
    /// Grace period of an expired lease (see [`LeaseStore::with_grace`]); zero: none.
    grace: Duration,
}

impl std::fmt::Debug for LeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseStore")
            .field("endpoints", &self.opts.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The PEM contents of the TLS files: what a client is built from.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsMaterial {
    /// CA bundle that signed etcd's server certificate.
    pub ca: Option<Vec<u8>>,
    /// Client certificate (chain).
    pub cert: Option<Vec<u8>>,
    /// Client private key.
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key's bytes.
        f.debug_struct("TlsMaterial")
            .field("ca_bytes", &self.ca.as_ref().map(Vec::len))
            .field("cert_bytes", &self.cert.as_ref().map(Vec::len))
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsMaterial {
    /// Reads the files named in `opts` (each one that is set).
    pub fn read(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let rd = |what, p: &Option<PathBuf>| p.as_deref().map(|p| read_file(what, p)).transpose();
        Ok(TlsMaterial {
            ca: rd("CA file", &opts.ca_file)?,
            cert: rd("client certificate", &opts.cert_file)?,
            key: rd("client key", &opts.key_file)?,
        })
    }
}

/// One client per endpoint, with TLS from `material` if given. Connects lazily.
async fn build_clients(
    endpoints: &[String],
    opts: &EtcdOptions,
    material: Option<&TlsMaterial>,
) -> Result<Vec<Client>, StoreError> {
    let mut co = ConnectOptions::new()
        .with_connect_timeout(opts.timeout)
        .with_keep_alive(Duration::from_secs(10), opts.timeout)
        .with_keep_alive_while_idle(true);
    if let Some(m) = material {
        let mut t = TlsOptions::new();
        if let Some(ca) = &m.ca {
            t = t.ca_certificate(Certificate::from_pem(ca.clone()));
        }
        match (&m.cert, &m.key) {
            (Some(c), Some(k)) => {
                t = t.identity(Identity::from_pem(c.clone(), k.clone()));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Options(
                    "--etcd-certfile and --etcd-keyfile go together".into(),
                ));
            }
        }
        co = co.with_tls(t);
    }
    let mut clients = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        clients.push(
            Client::connect([e.as_str()], Some(co.clone()))
                .await
                .map_err(|err| StoreError::Options(format!("endpoint {e}: {err}")))?,
        );
    }
    Ok(clients)
}

/// Maximum number of create-if-absent attempts of one acquisition.
const MAX_ATTEMPTS: u32 = 1000;

impl LeaseStore {
    /// Builds the client without talking to etcd (it connects on the first request, and
    /// reconnects by itself). Fails only on invalid options or unreadable TLS files.
    pub async fn new(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Options("no etcd endpoints".into()));
        }
        let tls = opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some();
        let mut endpoints = Vec::new();
        for e in &opts.endpoints {
            let e = e.trim();
            if e.starts_with("http://") {
                if tls {
                    return Err(StoreError::Options(format!(
                        "endpoint {e} is http:// but TLS files are given: use https://"
                    )));
                }
                endpoints.push(e.to_string());
            } else if e.starts_with("https://") {
                endpoints.push(e.to_string());
            } else if e.contains("://") {
                return Err(StoreError::Options(format!(
                    "endpoint {e}: scheme must be http:// or https://"
                )));
            } else {
                let scheme = if tls { "https" } else { "http" };
                endpoints.push(format!("{scheme}://{e}"));
            }
        }
        let material = if tls || endpoints.iter().any(|e| e.starts_with("https://")) {
            Some(TlsMaterial::read(&opts)?)
        } else {
            None
        };
        let clients = build_clients(&endpoints, &opts, material.as_ref()).await?;
        let prefix: Arc<str> = opts.prefix.trim_end_matches('/').into();
        Ok(LeaseStore {
            clients: Arc::new(RwLock::new(clients.into())),
            generation: Arc::new(tokio::sync::watch::Sender::new(0)),
            urls: endpoints.into(),
            current: Arc::new(AtomicUsize::new(0)),
            opts: Arc::new(opts),
            prefix,
            rpcs: Arc::new(AtomicU64::new(0)),
            grace: Duration::ZERO,
        })
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

    /// `<prefix>/grace/` (with the trailing slash).
    pub fn grace_prefix(&self) -> String {
        format!("{}/grace/", self.prefix)
    }

    /// `<prefix>/grace/<net>-<len>`.
    pub fn grace_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.grace_prefix(), subnet_to_key(subnet))
    }

    /// Renews the etcd lease of `subnet`'s grace key if it names `node` (one keep-alive;
    /// best effort: a failure is retried with the next renewal of the lease).
    pub(crate) async fn renew_grace(&self, subnet: &Ipv4Net, node: &str) {
        let key = self.grace_key(subnet);
        let Ok(resp) = self.kv_get(&key, None).await else {
            return;
        };
        let Some(k) = resp.kvs().first() else { return };
        let id = k.lease();
        if id == 0 || !LeaseAttrs::from_json(&key, k.value()).is_ok_and(|a| a.node_name == node) {
            return;
        }
        let what = format!("lease {id:x}");
        let r = self
            .rpc("lease-keepalive", &what, |c| async move {
                let (mut keeper, mut stream) = c.lease_client().keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(%subnet, error = %e, "renewing the grace key's lease failed");
        }
    }

    /// Subnets whose grace key names another node than `node`, with that node's name.
    async fn in_grace_of_others(&self, node: &str) -> Result<HashMap<Ipv4Net, String>, StoreError> {
        let prefix = self.grace_prefix();
        let resp = self
            .kv_get(&prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|k| {
                let key = String::from_utf8_lossy(k.key());
                let subnet = key_to_subnet(key.strip_prefix(&prefix)?).ok()?;
                let a = LeaseAttrs::from_json(&key, k.value()).ok()?;
                (a.node_name != node).then_some((subnet, a.node_name))
            })
            .collect())
    }

    /// [`LeaseStore::new`], then one read to check that etcd answers: a clear
    /// [`StoreError::Unreachable`] otherwise.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        let store = Self::new(opts).await?;
        store.ping().await?;
        Ok(store)
    }

    /// One read of the config key: Ok if etcd answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let key = self.config_key();
        self.kv_get(&key, None)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                StoreError::Etcd { source, .. } => StoreError::Unreachable {
                    endpoints: self.opts.endpoints.join(","),
                    reason: source.to_string(),
                },
                StoreError::Timeout { timeout, .. } => StoreError::Unreachable {
                    endpoints: self.opts.endpoints.join(","),
                    reason: format!("no answer within {timeout:?}"),
                },
                e => e,
            })
    }

    /// The options this store was built with.
    pub fn options(&self) -> &EtcdOptions {
        &self.opts
    }

    /// The etcd client of the current endpoint (tests, tools).
    pub fn client(&self) -> Client {
        let clients = self.clients();
        clients[self.current.load(Ordering::Relaxed) % clients.len()].clone()
    }

    /// The current client set (one per endpoint).
    fn clients(&self) -> Arc<[Client]> {
        self.clients
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The generation of the clients: 0 at the start, +1 per [`LeaseStore::reload_tls`].
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// A receiver notified when the clients are swapped.
    pub fn subscribe_generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Builds new clients from `material` (new TLS files), checks that etcd answers a read
    /// through them (the TLS handshake, the server's trust in the client certificate), and
    /// only then swaps them in for every clone of this store. The etcd leases are
    /// server-side: a holder renews the same lease ID over the new connection. On any error
    /// the old clients stay in use. Returns the endpoint that answered.
    pub async fn reload_tls(&self, material: &TlsMaterial) -> Result<String, StoreError> {
        if !self.urls.iter().any(|u| u.starts_with("https://")) {
            return Err(StoreError::Options(
                "the etcd endpoints are http://: there is no TLS to reload".into(),
            ));
        }
        let clients = build_clients(&self.urls, &self.opts, Some(material)).await?;
        let key = self.config_key();
        let mut last = None;
        let mut answered = None;
        for (i, c) in clients.iter().enumerate() {
            let mut kv = c.kv_client();
            match self.timed("get", &key, kv.get(key.clone(), None)).await {
                Ok(_) => {
                    answered = Some(i);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(i) = answered else {
            let e = last.expect("at least one endpoint");
            return Err(StoreError::Unreachable {
                endpoints: self.opts.endpoints.join(","),
                reason: format!("with the new TLS files: {}", inner_error(&e)),
            });
        };
        *self
            .clients
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = clients.into();
        self.current.store(i, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
        Ok(self.urls[i].clone())
    }

    /// Number of etcd requests (round trips) made through this store and its clones.
    pub fn rpc_count(&self) -> u64 {
        self.rpcs.load(Ordering::Relaxed)
    }

    /// `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// `<prefix>/subnets/` (with the trailing slash).
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// `<prefix>/subnets/<net>-<len>`.
    pub fn lease_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_to_key(subnet))
    }

    /// Runs one etcd request with the timeout, counting it: `f` is called with the current
    /// endpoint's client, and again with the next endpoint's after a transport error or a
    /// timeout, until every endpoint was tried once.
    async fn rpc<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let clients = self.clients();
        let n = clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match self.timed(op, key, f(clients[idx].clone())).await {
                Ok(v) => {
                    if i > 0 {
                        self.current.store(idx, Ordering::Relaxed);
                        tracing::info!(endpoint = %self.opts.endpoints[idx], "switched etcd endpoint");
                    }
                    return Ok(v);
                }
                Err(e) if i + 1 < n && is_endpoint_failure(&e) => {
                    tracing::debug!(endpoint = %self.opts.endpoints[idx], error = %e, "etcd endpoint failed, trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// One request with the timeout, counted, no failover.
    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.rpcs.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.opts.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(StoreError::Etcd {
                op,
                key: key.to_string(),
                source,
            }),
            Err(_) => Err(StoreError::Timeout {
                op,
                key: key.to_string(),
                timeout: self.opts.timeout,
            }),
        }
    }

    async fn kv_get(&self, key: &str, opts: Option<GetOptions>) -> Result<GetResponse, StoreError> {
        let op = if opts.is_some() { "list" } else { "get" };
        self.rpc(op, key, |c| {
            let (k, o) = (key.to_string(), opts.clone());
            async move { c.kv_client().get(k, o).await }
        })
        .await
    }

    async fn kv_txn(&self, key: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.rpc("txn", key, |c| {
            let t = txn.clone();
            async move { c.kv_client().txn(t).await }
        })
        .await
    }

    /// The network config, `None` if there is none.
    pub async fn get_config(&self) -> Result<Option<NetConfig>, StoreError> {
        Ok(self.get_config_kv().await?.map(|(c, _)| c))
    }

    async fn get_config_kv(&self) -> Result<Option<(NetConfig, i64)>, StoreError> {
        let key = self.config_key();
        let resp = self.kv_get(&key, None).await?;
        let Some(item) = resp.kvs().first() else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(item.value());
        let cfg = NetConfig::from_json(&text).map_err(|source| StoreError::BadConfig {
            key: key.clone(),
            source,
        })?;
        Ok(Some((cfg, item.mod_revision())))
    }

    /// The network config, or [`StoreError::NoConfig`].
    pub async fn require_config(&self) -> Result<NetConfig, StoreError> {
        self.get_config()
            .await?
            .ok_or_else(|| StoreError::NoConfig {
                key: self.config_key(),
            })
    }

    /// Writes the network config. Without `force` it refuses ([`StoreError::Refused`]) a
    /// config under which existing leases would be invalid (stranded), and a change of
    /// backend type/VNI/port while leases exist.
    pub async fn put_config(&self, cfg: &NetConfig, force: bool) -> Result<(), StoreError> {
        let key = self.config_key();
        // The current config's revision guards the write: a concurrent writer makes us fail
        // rather than silently overwrite what we checked against.
        let current_rev = {
            let resp = self.kv_get(&key, None).await?;
            resp.kvs()
                .first()
                .map(|k| (k.mod_revision(), k.value().to_vec()))
        };
        if !force {
            let (leases, _) = self.list().await?;
            let old = current_rev
                .as_ref()
                .and_then(|(_, old)| NetConfig::from_json(&String::from_utf8_lossy(old)).ok());
            let problems = cfg.replacement_problems(old.as_ref(), &leases);
            if !problems.is_empty() {
                let mut reasons = problems.reasons;
                reasons.push("use --force to write it anyway".into());
                return Err(StoreError::Refused {
                    reasons,
                    stranded: problems.stranded,
                });
            }
        }
        let guard = match &current_rev {
            Some((rev, _)) => Compare::mod_revision(key.clone(), CompareOp::Equal, *rev),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new().when(vec![guard]).and_then(vec![TxnOp::put(
            key.clone(),
            cfg.to_json(),
            None,
        )]);
        let resp = self.kv_txn(&key, txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::Contention {
                what: "writing the network config (it changed concurrently)",
                attempts: 1,
            });
        }
        Ok(())
    }

    /// Parses one lease key-value: the lease, or why it is none (`None` only for a key
    /// outside `<prefix>/subnets/`).
    fn parse_kv(&self, kv: &KeyValue) -> Option<Result<Lease, InvalidLease>> {
        let key = String::from_utf8_lossy(kv.key());
        let name = key.strip_prefix(&self.subnets_prefix())?;
        Some(parse_lease(
            name,
            kv.value(),
            kv.lease(),
            kv.create_revision(),
            kv.mod_revision(),
        ))
    }

    /// All readable leases (sorted by subnet) and the revision they were read at. The
    /// key-values that are not leases are left out: [`LeaseStore::list_all`] has them.
    pub async fn list(&self) -> Result<(Vec<Lease>, i64), StoreError> {
        let (leases, _, rev) = self.list_all().await?;
        Ok((leases, rev))
    }

    /// All key-values under `<prefix>/subnets/`: the leases (sorted by subnet), the ones
    /// that are not leases (bad key or value, sorted by key) and the revision.
    pub async fn list_all(&self) -> Result<(Vec<Lease>, Vec<InvalidLease>, i64), StoreError> {
        let (kvs, rev) = self.list_raw().await?;
        let mut leases = Vec::new();
        let mut invalid = Vec::new();
        for r in kvs.iter().filter_map(|k| self.parse_kv(k)) {
            match r {
                Ok(l) => leases.push(l),
                Err(i) => invalid.push(i),
            }
        }
        leases.sort_by_key(|l| l.subnet);
        invalid.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((leases, invalid, rev))
    }

    async fn list_raw(&self) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let key = self.subnets_prefix();
        let mut resp = self
            .kv_get(&key, Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.take_kvs(), rev))
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
        let resp = self
            .rpc("lease-ttl", &format!("lease {id:x}"), |c| async move {
                c.lease_client().time_to_live(id, None).await
            })
            .await?;
        Ok((resp.ttl() > 0).then(|| SystemTime::now() + Duration::from_secs(resp.ttl() as u64)))
    }

    /// The lease of `subnet`, if any.
    pub async fn get(&self, subnet: &Ipv4Net) -> Result<Option<Lease>, StoreError> {
        let key = self.lease_key(subnet);
        let resp = self.kv_get(&key, None).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|k| self.parse_kv(k))
            .and_then(|r| r.ok()))
    }

    /// Deletes `key` and revokes the etcd lease it was attached to, if any. False if the key
    /// did not exist.
    async fn delete_revoking(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self
            .rpc("delete", key, |c| {
                let k = key.to_string();
                async move {
                    c.kv_client()
                        .delete(k, Some(DeleteOptions::new().with_prev_key()))
                        .await
                }
            })
            .await?;
        for prev in resp.prev_kvs() {
            if prev.lease() != 0 {
                self.revoke(prev.lease()).await;
            }
        }
        Ok(resp.deleted() > 0)
    }

    /// Deletes the lease of `subnet` (and revokes its etcd lease). False if there was none.
    pub async fn release(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        let key = self.lease_key(&subnet);
        let deleted = self.delete_revoking(&key).await?;
        // An explicit release frees the subnet at once: no grace period.
        let grace = self.grace_key(&subnet);
        self.rpc("delete", &grace, |c| {
            let k = grace.clone();
            async move { c.kv_client().delete(k, None).await }
        })
        .await?;
        Ok(deleted)
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
        let key = self.move_key(node);
        let secs = (ttl.as_secs() as i64).max(1);
        let id = self
            .rpc(
                "lease-grant",
                &format!("lease ttl {secs}s"),
                |c| async move { c.lease_client().grant(secs, None).await },
            )
            .await?
            .id();
        let value = serde_json::to_string(&req).expect("a move request serializes");
        let r = self
            .rpc("put", &key, |c| {
                let (k, v) = (key.clone(), value.clone());
                async move {
                    c.kv_client()
                        .put(k, v, Some(PutOptions::new().with_lease(id)))
                        .await
                }
            })
            .await;
        if let Err(e) = r {
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
        let resp = self.kv_get(&key, None).await?;
        Ok(resp.kvs().first().map(|k| {
            let r: MoveRequest = serde_json::from_slice(k.value())
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
    async fn revoke(&self, id: i64) {
        if let Err(e) = self
            .rpc("lease-revoke", &format!("lease {id:x}"), |c| async move {
                c.lease_client().revoke(id).await
            })
            .await
        {
            tracing::debug!(lease = id, error = %e, "revoking an unused etcd lease failed (it expires by itself)");
        }
    }

    /// Reserves `subnet` for `attrs.node_name`: a key without TTL. Allowed when the subnet is
    /// free or already held by that node; the subnet must be valid under the stored config.
    pub async fn reserve(&self, subnet: Ipv4Net, attrs: &LeaseAttrs) -> Result<Lease, StoreError> {
        if attrs.node_name.is_empty() {
            return Err(StoreError::InvalidAttrs(
                "a reservation needs a NodeName".into(),
            ));
        }
        let cfg = self.require_config().await?;
        if !cfg.is_valid_subnet(&subnet) {
            return Err(StoreError::InvalidSubnet {
                subnet,
                reason: format!(
                    "is not a /{} between SubnetMin {} and SubnetMax {} of Network {}",
                    cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.network
                ),
            });
        }
        let key = self.lease_key(&subnet);
        let cur = self.kv_get(&key, None).await?;
        let guard = match cur.kvs().first() {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(k) => {
                let holder = LeaseAttrs::from_json(&key, k.value())
                    .map(|a| a.node_name)
                    .unwrap_or_default();
                if holder != attrs.node_name {
                    return Err(StoreError::Conflict { key, holder });
                }
                Compare::mod_revision(key.clone(), CompareOp::Equal, k.mod_revision())
            }
        };
        let txn = Txn::new().when(vec![guard]).and_then(vec![TxnOp::put(
            key.clone(),
            attrs.to_json(),
            None,
        )]);
        let resp = self.kv_txn(&key, txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::Contention {
                what: "reserving (the key changed concurrently)",
                attempts: 1,
            });
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Lease {
            subnet,
            attrs: attrs.clone(),
            reserved: true,
            etcd_lease: 0,
            expires: None,
            mod_revision: rev,
            create_revision: rev,
        })
    }

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
    /// 3. else a random free subnet, created only if absent (one txn); on collision the txn's
    ///    else-branch returns the fresh list and the next attempt picks again.
    ///
    /// The etcd TTL is `ttl` rounded up to whole seconds (etcd may raise very short TTLs to
    /// its minimum of about 2 s).
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
            return Err(StoreError::InvalidSubnet {
                subnet,
                reason: format!(
                    "is not a /{} between SubnetMin {} and SubnetMax {} of Network {} (the network config changed?)",
                    cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.network
                ),
            });
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
        let value = attrs.to_json();
        let prefix = self.subnets_prefix();

        // The list and the etcd lease grant are independent: one round trip of latency.
        let grant_key = format!("lease ttl {ttl_secs}s");
        let (listed, granted) = tokio::join!(
            self.list_raw(),
            self.rpc("lease-grant", &grant_key, |c| async move {
                c.lease_client().grant(ttl_secs, None).await
            })
        );
        let granted = granted?;
        let lease_id = granted.id();
        let granted_ttl = granted.ttl().max(ttl_secs);
        // The grace key's etcd lease: TTL + grace (see `with_grace`).
        let grace_lease = if self.grace.is_zero() {
            None
        } else {
            let g = ttl_secs + self.grace.as_secs().max(1) as i64;
            match self
                .rpc("lease-grant", &format!("lease ttl {g}s"), |c| async move {
                    c.lease_client().grant(g, None).await
                })
                .await
            {
                Ok(r) => Some(r.id()),
                Err(e) => {
                    self.revoke(lease_id).await;
                    return Err(e);
                }
            }
        };
        let grace_value = {
            let mut a = LeaseAttrs::vxlan(&attrs.node_name, attrs.public_ip, 0, "");
            a.backend_type.clear();
            a.backend_data = Default::default();
            a.to_json()
        };
        let grace_put = |subnet: &Ipv4Net| {
            grace_lease.map(|g| {
                TxnOp::put(
                    self.grace_key(subnet),
                    grace_value.clone(),
                    Some(PutOptions::new().with_lease(g)),
                )
            })
        };
        let result = async {
            let (mut kvs, _) = listed?;
            let in_grace = self.in_grace_of_others(&attrs.node_name).await?;
            for attempt in 1..=MAX_ATTEMPTS {
                // Subnets in another node's grace period count as taken.
                let mut taken: HashSet<Ipv4Net> = in_grace.keys().copied().collect();
                let mut own: Vec<(Ipv4Net, &KeyValue)> = Vec::new();
                let mut duplicate: Option<(Ipv4Net, Ipv4Addr, bool)> = None;
                for k in &kvs {
                    let key = String::from_utf8_lossy(k.key());
                    let Some(name) = key.strip_prefix(&prefix) else {
                        continue;
                    };
                    let Ok(subnet) = key_to_subnet(name) else {
                        continue;
                    };
                    taken.insert(subnet);
                    if !cfg.is_valid_subnet(&subnet) {
                        continue;
                    }
                    let Ok(a) = LeaseAttrs::from_json(&key, k.value()) else {
                        continue;
                    };
                    if a.node_name != attrs.node_name {
                        continue;
                    }
                    if only && Some(subnet) != prefer {
                        continue;
                    }
                    // Our name from another PublicIP: a TTL key exists only while its etcd
                    // lease lives, so that node is alive; a reservation it took is its own.
                    if a.public_ip != attrs.public_ip && !a.public_ip.is_unspecified() {
                        duplicate.get_or_insert((subnet, a.public_ip, k.lease() == 0));
                        continue;
                    }
                    own.push((subnet, k));
                }
                if own.is_empty()
                    && let Some((subnet, other, reserved)) = duplicate
                {
                    return Err(StoreError::duplicate_name(
                        &attrs.node_name,
                        subnet,
                        other,
                        attrs.public_ip,
                        reserved,
                    ));
                }
                // 1. Our own key (sticky), the preferred one first.
                own.sort_by_key(|(s, _)| (Some(*s) != prefer, *s));
                if let Some((subnet, k)) = own.first() {
                    let key = self.lease_key(subnet);
                    let reserved = k.lease() == 0;
                    let old_lease = k.lease();
                    // Keep the fields that a newer version wrote into this key.
                    let kept = match LeaseAttrs::from_json(&key, k.value()) {
                        Ok(old) => attrs.keeping_unknown_fields_of(&old),
                        Err(_) => attrs.clone(),
                    };
                    let value = kept.to_json();
                    let mut put = vec![if reserved {
                        TxnOp::put(key.clone(), value, None)
                    } else {
                        TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(lease_id)))
                    }];
                    if !reserved {
                        put.extend(grace_put(subnet));
                    }
                    let txn = Txn::new()
                        .when(vec![Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            k.mod_revision(),
                        )])
                        .and_then(put)
                        .or_else(vec![TxnOp::get(
                            prefix.clone(),
                            Some(GetOptions::new().with_prefix()),
                        )]);
                    let subnet = *subnet;
                    let resp = self.kv_txn(&key, txn).await?;
                    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                    if resp.succeeded() {
                        if !reserved && old_lease != lease_id {
                            self.revoke(old_lease).await;
                        }
                        tracing::info!(%subnet, node = %attrs.node_name, reserved, "took over this node's existing subnet");
                        return Ok((subnet, reserved, rev, kept));
                    }
                    kvs = else_list(resp.op_responses());
                    tracing::debug!(%subnet, attempt, "own key changed concurrently, retrying");
                    continue;
                }
                // Only `prefer`: free, or held by whom.
                if only && let Some(p) = prefer {
                    if let Some(k) = kvs
                        .iter()
                        .find(|k| k.key() == self.lease_key(&p).as_bytes())
                    {
                        let key = self.lease_key(&p);
                        let a = LeaseAttrs::from_json(&key, k.value()).ok();
                        return Err(StoreError::SubnetHeld {
                            subnet: p,
                            holder: a.as_ref().map(|a| a.node_name.clone()).unwrap_or_default(),
                            holder_ip: a.map(|a| a.public_ip),
                            grace: false,
                        });
                    }
                    if let Some(node) = in_grace.get(&p) {
                        return Err(StoreError::SubnetHeld {
                            subnet: p,
                            holder: node.clone(),
                            holder_ip: None,
                            grace: true,
                        });
                    }
                }
                // 2./3. A free subnet.
                let free_count = count_free(cfg, &taken);
                if free_count == 0 {
                    return Err(StoreError::NetworkFull {
                        network: cfg.network,
                        subnet_len: cfg.subnet_len,
                        min: cfg.subnet_min,
                        max: cfg.subnet_max,
                        count: cfg.subnet_count(),
                    });
                }
                // The caller's hint first (the subnet it had), then the node's home subnet
                // (a hash of its name): a node whose key expired while it was down, and whose
                // hint is gone too (/run is tmpfs), still gets its old subnet back when that
                // was its home and is free. Otherwise a random free one.
                let subnet = [prefer, home_subnet(cfg, &attrs.node_name)]
                    .into_iter()
                    .flatten()
                    .find(|p| cfg.is_valid_subnet(p) && !taken.contains(p))
                    .unwrap_or_else(|| pick_free(cfg, &taken));
                let key = self.lease_key(&subnet);
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(
                        std::iter::once(TxnOp::put(
                            key.clone(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease_id)),
                        ))
                        .chain(grace_put(&subnet))
                        .collect::<Vec<_>>(),
                    )
                    .or_else(vec![TxnOp::get(
                        prefix.clone(),
                        Some(GetOptions::new().with_prefix()),
                    )]);
                let resp = self.kv_txn(&key, txn).await?;
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                if resp.succeeded() {
                    tracing::info!(%subnet, node = %attrs.node_name, attempt, "acquired subnet");
                    return Ok((subnet, false, rev, attrs.clone()));
                }
                tracing::debug!(%subnet, attempt, "subnet taken concurrently, picking another");
                kvs = else_list(resp.op_responses());
            }
            Err(StoreError::Contention {
                what: "acquiring a subnet",
                attempts: MAX_ATTEMPTS,
            })
        }
        .await;
        match result {
            Ok((subnet, reserved, rev, attrs)) => {
                if reserved {
                    self.revoke(lease_id).await;
                    if let Some(g) = grace_lease {
                        self.revoke(g).await;
                    }
                }
                Ok(Lease {
                    subnet,
                    attrs,
                    reserved,
                    etcd_lease: if reserved { 0 } else { lease_id },
                    expires: (!reserved)
                        .then(|| SystemTime::now() + Duration::from_secs(granted_ttl as u64)),
                    mod_revision: rev,
                    create_revision: rev,
                })
            }
            Err(e) => {
                self.revoke(lease_id).await;
                if let Some(g) = grace_lease {
                    self.revoke(g).await;
                }
                Err(e)
            }
        }
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

/// The subnet a node tries first when it holds none: the stable hash of its name over the
/// candidate subnets. Stable across versions and restarts, uniform across names.
fn home_subnet(cfg: &NetConfig, node_name: &str) -> Option<Ipv4Net> {
    let count = cfg.subnet_count();
    if count == 0 {
        return None;
    }
    cfg.subnet_at(crate::mac::stable_hash(node_name.bytes()) % count)
}

/// The innermost cause of an etcd error, e.g. "received fatal alert: BadCertificate"
/// rather than tonic's "transport error".
pub fn inner_error(e: &StoreError) -> String {
    use std::error::Error as _;
    let mut out = e.to_string();
    let mut src: Option<&dyn std::error::Error> = match e {
        StoreError::Etcd { source, .. } => source.source(),
        _ => None,
    };
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out = format!("{out}: {t}");
        }
        src = s.source();
    }
    out
}

/// Errors after which another endpoint may answer: transport failures and timeouts (not
/// etcd's own answers such as "lease not found").
fn is_endpoint_failure(e: &StoreError) -> bool {
    match e {
        StoreError::Timeout { .. } => true,
        StoreError::Etcd { source, .. } => match source {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            // gRPC codes: 1 Cancelled, 2 Unknown (tonic's transport errors), 4 DeadlineExceeded,
            // 14 Unavailable.
            etcd_client::Error::GRpcStatus(st) => matches!(st.code() as i32, 1 | 2 | 4 | 14),
            _ => false,
        },
        _ => false,
    }
}

/// The list returned by the else-branch of an acquire txn.
fn else_list(responses: Vec<TxnOpResponse>) -> Vec<KeyValue> {
    responses
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(mut g) => Some(g.take_kvs()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A random free candidate: random probes first (cheap for large ranges), then a uniform
/// pick among the enumerated free subnets. `taken` must leave at least one free.
fn pick_free(cfg: &NetConfig, taken: &HashSet<Ipv4Net>) -> Ipv4Net {
    let count = cfg.subnet_count();
    let mut rng = rand::rng();
    for _ in 0..16 {
        let s = cfg
            .subnet_at(rng.random_range(0..count))
            .expect("index in range");
        if !taken.contains(&s) {
            return s;
        }
    }
    let free: Vec<Ipv4Net> = cfg.subnets().filter(|s| !taken.contains(s)).collect();
    free[rng.random_range(0..free.len())]
}

/// Number of candidate subnets of `cfg` not in `taken`.
fn count_free(cfg: &NetConfig, taken: &HashSet<Ipv4Net>) -> u64 {
    let used = taken.iter().filter(|s| cfg.is_valid_subnet(s)).count() as u64;
    cfg.subnet_count().saturating_sub(used)
}

/// Backoff for retries: 100 ms doubling up to `max`, with ±20 % jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }
    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::rng().random_range(0.8..1.2);
        d.mul_f64(jitter)
    }
}

/// Groups leases by subnet (used by the watch diff).
pub(crate) fn by_subnet(leases: Vec<Lease>) -> HashMap<Ipv4Net, Lease> {
    leases.into_iter().map(|l| (l.subnet, l)).collect()
}
