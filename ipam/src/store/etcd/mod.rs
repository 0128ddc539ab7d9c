//! The etcd backend ([`EtcdBackend`]): endpoints, TLS, failover, and the [`LeaseBackend`]
//! verbs as etcd requests. The only module of the lease store that uses etcd_client's types.
//!
//! Every request carries the timeout of [`EtcdOptions::timeout`]; requests go to the current
//! endpoint and fail over to the next one on a transport error or timeout.

mod tls;

use std::any::Any;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;

pub use tls::TlsMaterial;

use super::backend::{
    BackendFuture, Cond, EventStream, Granted, Guard, KeepAlive, KeyValue, LeaseBackend, Listing,
    Put, WatchEvent, WatchMessage, WatchSpec, Written,
};
use super::{DEFAULT_PREFIX, StoreError};

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

/// The timeout and the request counter, shared with the streams a backend opens.
#[derive(Debug, Clone)]
struct Timer {
    timeout: Duration,
    rpcs: Arc<AtomicU64>,
}

impl Timer {
    /// One request with the timeout, counted, no failover.
    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.rpcs.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(StoreError::Etcd {
                op,
                key: key.to_string(),
                source,
            }),
            Err(_) => Err(StoreError::Timeout {
                op,
                key: key.to_string(),
                timeout: self.timeout,
            }),
        }
    }
}

/// etcd as a [`LeaseBackend`]. Cheap to share (`Arc`).
pub struct EtcdBackend {
    /// One client per endpoint: requests go to the current one and fail over to the next
    /// on a transport error or timeout (etcd-client's balanced channel would keep sending
    /// a share of the requests to a dead endpoint).
    /// Swapped as a whole by [`EtcdBackend::reload_tls`].
    clients: RwLock<Arc<[Client]>>,
    /// Bumped by every swap of `clients`: long-lived streams (keep-alive, watches) made on
    /// an older generation are remade on the new one, so the old connections close.
    generation: watch::Sender<u64>,
    /// The endpoint URLs with their scheme (as the clients were built).
    urls: Arc<[String]>,
    current: AtomicUsize,
    opts: EtcdOptions,
    timer: Timer,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.opts.endpoints)
            .finish()
    }
}

impl EtcdBackend {
    /// Builds the clients without talking to etcd (they connect on the first request, and
    /// reconnect by themselves). Fails only on invalid options or unreadable TLS files.
    pub async fn new(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Options("no etcd endpoints".into()));
        }
        let endpoints = tls::endpoint_urls(&opts)?;
        let material =
            if tls::wants_tls(&opts) || endpoints.iter().any(|e| e.starts_with("https://")) {
                Some(TlsMaterial::read(&opts)?)
            } else {
                None
            };
        let clients = tls::build_clients(&endpoints, &opts, material.as_ref()).await?;
        Ok(EtcdBackend {
            clients: RwLock::new(clients.into()),
            generation: watch::Sender::new(0),
            urls: endpoints.into(),
            current: AtomicUsize::new(0),
            timer: Timer {
                timeout: opts.timeout,
                rpcs: Arc::new(AtomicU64::new(0)),
            },
            opts,
        })
    }

    /// The options this backend was built with.
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

    /// Builds new clients from `material` (new TLS files), checks that etcd answers a read
    /// of `probe_key` through them (the TLS handshake, the server's trust in the client
    /// certificate), and only then swaps them in. The etcd leases are server-side: a holder
    /// renews the same lease ID over the new connection. On any error the old clients stay
    /// in use. Returns the endpoint that answered.
    pub async fn reload_tls(
        &self,
        material: &TlsMaterial,
        probe_key: &str,
    ) -> Result<String, StoreError> {
        if !self.urls.iter().any(|u| u.starts_with("https://")) {
            return Err(StoreError::Options(
                "the etcd endpoints are http://: there is no TLS to reload".into(),
            ));
        }
        let clients = tls::build_clients(&self.urls, &self.opts, Some(material)).await?;
        let mut last = None;
        let mut answered = None;
        for (i, c) in clients.iter().enumerate() {
            let mut kv = c.kv_client();
            match self
                .timer
                .timed("get", probe_key, kv.get(probe_key, None))
                .await
            {
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
            match self.timer.timed(op, key, f(clients[idx].clone())).await {
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
}

fn kv_of(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        lease: k.lease(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
    }
}

fn lease_label(id: i64) -> String {
    format!("lease {id:x}")
}

impl LeaseBackend for EtcdBackend {
    fn get<'a>(&'a self, key: &'a str) -> BackendFuture<'a, (Option<KeyValue>, i64)> {
        Box::pin(async move {
            let resp = self
                .rpc("get", key, |c| {
                    let k = key.to_string();
                    async move { c.kv_client().get(k, None).await }
                })
                .await?;
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            Ok((resp.kvs().first().map(kv_of), rev))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Listing> {
        Box::pin(async move {
            let resp = self
                .rpc("list", prefix, |c| {
                    let k = prefix.to_string();
                    async move {
                        c.kv_client()
                            .get(k, Some(GetOptions::new().with_prefix()))
                            .await
                    }
                })
                .await?;
            Ok(Listing {
                kvs: resp.kvs().iter().map(kv_of).collect(),
                revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            })
        })
    }

    fn watch(&self, spec: WatchSpec) -> BackendFuture<'_, Box<dyn EventStream>> {
        Box::pin(async move {
            let mut opts = WatchOptions::new().with_start_revision(spec.from_revision);
            if spec.prefix {
                opts = opts.with_prefix().with_prev_key();
            }
            if spec.progress {
                opts = opts.with_progress_notify();
            }
            let stream = self
                .rpc("watch", &spec.key, |c| {
                    let (k, o) = (spec.key.clone(), opts.clone());
                    async move { c.watch_client().watch(k, Some(o)).await }
                })
                .await?;
            Ok(Box::new(EtcdEvents {
                stream,
                key: spec.key,
            }) as Box<dyn EventStream>)
        })
    }

    fn grant(&self, ttl: i64) -> BackendFuture<'_, Granted> {
        Box::pin(async move {
            let r = self
                .rpc(
                    "lease-grant",
                    &format!("lease ttl {ttl}s"),
                    |c| async move { c.lease_client().grant(ttl, None).await },
                )
                .await?;
            Ok(Granted {
                id: r.id(),
                ttl: r.ttl(),
            })
        })
    }

    fn keep_alive(&self, id: i64) -> BackendFuture<'_, Box<dyn KeepAlive>> {
        Box::pin(async move {
            let (keeper, stream) = self
                .rpc("lease-keepalive", &lease_label(id), |c| async move {
                    c.lease_client().keep_alive(id).await
                })
                .await?;
            Ok(Box::new(EtcdKeepAlive {
                keeper,
                stream,
                id,
                timer: self.timer.clone(),
            }) as Box<dyn KeepAlive>)
        })
    }

    fn keep_alive_once(&self, id: i64) -> BackendFuture<'_, i64> {
        // Open, ping and read the answer within one request's timeout.
        Box::pin(async move {
            let r = self
                .rpc("lease-keepalive", &lease_label(id), |c| async move {
                    let (mut keeper, mut stream) = c.lease_client().keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await?;
            Ok(r.map_or(0, |r| r.ttl()))
        })
    }

    fn time_to_live(&self, id: i64) -> BackendFuture<'_, i64> {
        Box::pin(async move {
            let r = self
                .rpc("lease-ttl", &lease_label(id), |c| async move {
                    c.lease_client().time_to_live(id, None).await
                })
                .await?;
            Ok(r.ttl())
        })
    }

    fn revoke(&self, id: i64) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.rpc("lease-revoke", &lease_label(id), |c| async move {
                c.lease_client().revoke(id).await
            })
            .await
            .map(|_| ())
        })
    }

    fn put_if(
        &self,
        guard: Guard,
        puts: Vec<Put>,
        else_list: Option<String>,
    ) -> BackendFuture<'_, Written> {
        let key = puts.first().map(|p| p.key.clone()).unwrap_or_default();
        let cond = match guard {
            Guard::Absent => Cond::Absent(key),
            Guard::ModRevision(rev) => Cond::ModRevision(key, rev),
        };
        self.write_if(vec![cond], vec![], puts, else_list)
    }

    fn write_if(
        &self,
        conds: Vec<Cond>,
        deletes: Vec<String>,
        puts: Vec<Put>,
        else_list: Option<String>,
    ) -> BackendFuture<'_, Written> {
        Box::pin(async move {
            let key = puts.first().map(|p| p.key.clone()).unwrap_or_default();
            // A compare on a range holds when every key in it satisfies it; on an empty
            // range, when the zero key-value does (create revision 0).
            let cmps: Vec<Compare> = conds
                .into_iter()
                .map(|c| match c {
                    Cond::Absent(k) => Compare::create_revision(k, CompareOp::Equal, 0),
                    Cond::ModRevision(k, rev) => Compare::mod_revision(k, CompareOp::Equal, rev),
                    Cond::NoneUnder(p) => {
                        Compare::create_revision(p, CompareOp::Equal, 0).with_prefix()
                    }
                    Cond::UnchangedSince { prefix, revision } => {
                        Compare::mod_revision(prefix, CompareOp::Less, revision + 1).with_prefix()
                    }
                })
                .collect();
            let ops: Vec<TxnOp> = deletes
                .into_iter()
                .map(|k| TxnOp::delete(k, None))
                .chain(puts.into_iter().map(|p| {
                    let o = (p.lease != 0).then(|| PutOptions::new().with_lease(p.lease));
                    TxnOp::put(p.key, p.value, o)
                }))
                .collect();
            let mut txn = Txn::new().when(cmps).and_then(ops);
            if let Some(prefix) = &else_list {
                txn = txn.or_else(vec![TxnOp::get(
                    prefix.clone(),
                    Some(GetOptions::new().with_prefix()),
                )]);
            }
            let resp = self
                .rpc("txn", &key, |c| {
                    let t = txn.clone();
                    async move { c.kv_client().txn(t).await }
                })
                .await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if resp.succeeded() {
                return Ok(Written::Done { revision });
            }
            let current = else_list.map(|_| Listing {
                kvs: resp
                    .op_responses()
                    .into_iter()
                    .find_map(|r| match r {
                        TxnOpResponse::Get(g) => Some(g.kvs().iter().map(kv_of).collect()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                revision,
            });
            Ok(Written::Refused { current })
        })
    }

    fn put(&self, put: Put) -> BackendFuture<'_, i64> {
        Box::pin(async move {
            let resp = self
                .rpc("put", &put.key, |c| {
                    let (k, v) = (put.key.clone(), put.value.clone());
                    let o = (put.lease != 0).then(|| PutOptions::new().with_lease(put.lease));
                    async move { c.kv_client().put(k, v, o).await }
                })
                .await?;
            Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BackendFuture<'a, Option<KeyValue>> {
        Box::pin(async move {
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
            if resp.deleted() == 0 {
                return Ok(None);
            }
            let prev = resp.prev_kvs().first().map(kv_of);
            Ok(Some(prev.unwrap_or_else(|| KeyValue {
                key: key.to_string(),
                value: Vec::new(),
                lease: 0,
                create_revision: 0,
                mod_revision: 0,
            })))
        })
    }

    fn connections(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn requests(&self) -> u64 {
        self.timer.rpcs.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        self.opts.endpoints.join(",")
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A watch stream of etcd, as [`WatchMessage`]s.
struct EtcdEvents {
    stream: etcd_client::WatchStream,
    key: String,
}

impl EventStream for EtcdEvents {
    fn next(&mut self) -> BackendFuture<'_, Option<WatchMessage>> {
        Box::pin(async move {
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(StoreError::Etcd {
                        op: "watch",
                        key: self.key.clone(),
                        source,
                    });
                }
            };
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if resp.canceled() {
                return Ok(Some(if resp.compact_revision() > 0 {
                    WatchMessage::Compacted {
                        compact_revision: resp.compact_revision(),
                    }
                } else {
                    WatchMessage::Cancelled {
                        reason: resp.cancel_reason().to_string(),
                    }
                }));
            }
            if resp.created() {
                return Ok(Some(WatchMessage::Started { revision }));
            }
            if resp.events().is_empty() {
                return Ok(Some(WatchMessage::Progress { revision }));
            }
            let events = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = kv_of(ev.kv()?);
                    Some(match ev.event_type() {
                        EventType::Put => WatchEvent::Put(kv),
                        EventType::Delete => WatchEvent::Delete(kv),
                    })
                })
                .collect();
            Ok(Some(WatchMessage::Events(events)))
        })
    }
}

/// A keep-alive stream of one etcd lease: one ping per [`KeepAlive::renew`].
struct EtcdKeepAlive {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    id: i64,
    timer: Timer,
}

impl KeepAlive for EtcdKeepAlive {
    fn renew(&mut self) -> BackendFuture<'_, i64> {
        Box::pin(async move {
            let what = lease_label(self.id);
            let (k, s) = (&mut self.keeper, &mut self.stream);
            let res = self
                .timer
                .timed("lease-keepalive", &what, async {
                    k.keep_alive().await?;
                    s.message().await
                })
                .await?;
            match res {
                Some(resp) => Ok(resp.ttl()),
                None => Err(StoreError::Etcd {
                    op: "lease-keepalive",
                    key: what,
                    source: etcd_client::Error::LeaseKeepAliveError("stream closed".into()),
                }),
            }
        })
    }
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
