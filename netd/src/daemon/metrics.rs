//! twilld's metrics (Prometheus text format via prometheus-client) and its HTTP endpoints:
//! `/healthz` (the main loop completes cycles), `/readyz` (lease held and data plane programmed)
//! and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use twill_ipam::store::{HolderStats, LeaseHolder, WatchCounters};

/// Every metric of twilld, cheap to clone (the metrics are shared handles).
#[derive(Clone)]
pub struct Metrics {
    pub peers: Gauge,
    /// Dual-stack: peers with an IPv6 side programmed on `twill-v6.<VNI>`.
    pub ipv6_peers: Gauge,
    /// Dual-stack: leases whose IPv6 side is rejected (their IPv4 side may be a peer).
    pub ipv6_rejected: Gauge,
    pub routes: Gauge,
    pub fdb: Gauge,
    pub neighs: Gauge,
    /// What the leases ask for after validation (routes without the conflicting ones).
    pub routes_expected: Gauge,
    pub fdb_expected: Gauge,
    pub neighs_expected: Gauge,
    pub reconcile_seconds: Histogram,
    pub reconciles: Counter,
    pub ops_applied: Counter,
    pub op_errors: Counter,
    pub drift_repaired: Counter,
    pub lease_expiry: Gauge<f64, AtomicU64>,
    pub netlink_overruns: Counter,
    pub vxlan_recreated: Counter,
    pub ready: Gauge,
    /// 1 while the lease is blocked (the subnet this node's pods use is held by another
    /// node), else 0.
    pub lease_blocked: Gauge,
    /// Leases rejected now, by `reason` label (see [`Metrics::set_rejected`]).
    pub leases_rejected: Family<Vec<(String, String)>, Gauge>,
    pub route_conflicts: Gauge,
    pub vxlan_dropped: Counter,
    pub nft_errors: Counter,
    /// The counters kept where the work happens, read at scrape time.
    pub counted: Arc<Counted>,
}

impl Metrics {
    pub fn new(reg: &mut Registry) -> Metrics {
        let m = Metrics {
            peers: Gauge::default(),
            ipv6_peers: Gauge::default(),
            ipv6_rejected: Gauge::default(),
            routes: Gauge::default(),
            fdb: Gauge::default(),
            neighs: Gauge::default(),
            routes_expected: Gauge::default(),
            fdb_expected: Gauge::default(),
            neighs_expected: Gauge::default(),
            // 100 µs .. ~3 s
            reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            reconciles: Counter::default(),
            ops_applied: Counter::default(),
            op_errors: Counter::default(),
            drift_repaired: Counter::default(),
            lease_expiry: Gauge::default(),
            netlink_overruns: Counter::default(),
            vxlan_recreated: Counter::default(),
            ready: Gauge::default(),
            lease_blocked: Gauge::default(),
            leases_rejected: Family::default(),
            route_conflicts: Gauge::default(),
            vxlan_dropped: Counter::default(),
            nft_errors: Counter::default(),
            counted: Arc::new(Counted::default()),
        };
        reg.register(
            "twill_peers",
            "Peer nodes (other leases) programmed for",
            m.peers.clone(),
        );
        reg.register(
            "twill_ipv6_peers",
            "Dual-stack: peers whose IPv6 side is programmed for on the IPv6 VXLAN device",
            m.ipv6_peers.clone(),
        );
        reg.register(
            "twill_ipv6_leases_rejected",
            "Dual-stack: leases whose IPv6 side is rejected (IPv4 side unaffected)",
            m.ipv6_rejected.clone(),
        );
        reg.register(
            "twill_routes_programmed",
            "Routes on the VXLAN device",
            m.routes.clone(),
        );
        reg.register(
            "twill_fdb_programmed",
            "FDB entries on the VXLAN device",
            m.fdb.clone(),
        );
        reg.register(
            "twill_neighbours_programmed",
            "Permanent neighbours on the VXLAN device",
            m.neighs.clone(),
        );
        reg.register(
            "twill_routes_expected",
            "Routes the valid peer leases ask for on the VXLAN device, without those a foreign route blocks",
            m.routes_expected.clone(),
        );
        reg.register(
            "twill_fdb_expected",
            "FDB entries the valid peer leases ask for on the VXLAN device",
            m.fdb_expected.clone(),
        );
        reg.register(
            "twill_neighbours_expected",
            "Permanent neighbours the valid peer leases ask for on the VXLAN device",
            m.neighs_expected.clone(),
        );
        reg.register(
            "twill_reconcile_duration_seconds",
            "Time of one reconcile (diff + apply)",
            m.reconcile_seconds.clone(),
        );
        reg.register("twill_reconciles", "Reconciles run", m.reconciles.clone());
        reg.register(
            "twill_netlink_ops",
            "Netlink writes applied",
            m.ops_applied.clone(),
        );
        reg.register(
            "twill_netlink_op_errors",
            "Netlink writes that failed",
            m.op_errors.clone(),
        );
        reg.register(
            "twill_drift_repaired",
            "Entries changed outside twilld (deleted or altered by hand, stale) and repaired",
            m.drift_repaired.clone(),
        );
        reg.register(
            "twill_lease_expiry_timestamp_seconds",
            "When this node's lease expires unless renewed (Unix time)",
            m.lease_expiry.clone(),
        );
        reg.register(
            "twill_lease_blocked",
            "1 while this node takes no lease because the subnet its pods hold addresses of is held by another node (it stays NotReady, keeps its data plane and retries; docs/leases.md), else 0",
            m.lease_blocked.clone(),
        );
        reg.register(
            "twill_netlink_overruns",
            "Netlink event overruns (each followed by a full dump)",
            m.netlink_overruns.clone(),
        );
        reg.register(
            "twill_vxlan_recreated",
            "Times the VXLAN device was (re)created",
            m.vxlan_recreated.clone(),
        );
        reg.register(
            "twill_ready",
            "1 when the lease is held and the data plane programmed",
            m.ready.clone(),
        );
        // Encoded as twill_build_info{version=".."} 1.
        reg.register(
            "twill_build",
            "The twilld build: its version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        reg.register(
            "twill_leases_rejected",
            "Keys under <prefix>/subnets/ rejected by the lease validation now, by reason",
            m.leases_rejected.clone(),
        );
        reg.register(
            "twill_route_conflicts",
            "Peer routes not programmed: the main table has a route for the subnet that is not twill's",
            m.route_conflicts.clone(),
        );
        reg.register(
            "twill_vxlan_dropped_packets",
            "VXLAN packets dropped on input: the source is not an accepted peer (read at each resync)",
            m.vxlan_dropped.clone(),
        );
        reg.register(
            "twill_nft_errors",
            "nft runs and peer set changes that failed or timed out",
            m.nft_errors.clone(),
        );
        reg.register_collector(Box::new(m.counted.clone()));
        m
    }

    /// Sets `twill_leases_rejected{reason}` to the number of leases rejected now for each
    /// reason (every reason is set, zeros included, so a fixed lease brings its count down).
    pub fn set_rejected<'a>(&self, counts: impl IntoIterator<Item = (&'a str, usize)>) {
        for (reason, n) in counts {
            self.leases_rejected
                .get_or_create(&vec![("reason".to_string(), reason.to_string())])
                .set(n as i64);
        }
    }
}

/// The counters that the lease holder, the lease watch and the netlink layer keep
/// themselves, encoded at scrape time (no copy to keep in step).
#[derive(Debug, Default)]
pub struct Counted {
    /// Failed etcd requests of twilld's own (the network config at start-up).
    pub etcd_errors: AtomicU64,
    /// The lease watch's counters, once there is one.
    watch: OnceLock<Arc<WatchCounters>>,
    /// The lease holder, once there is one (weak: dropping the daemon's stops renewing).
    holder: OnceLock<Weak<LeaseHolder>>,
}

impl Counted {
    /// From now on the holder's counters are the lease metrics.
    pub fn set_holder(&self, holder: &Arc<LeaseHolder>) {
        let _ = self.holder.set(Arc::downgrade(holder));
    }

    /// From now on the watch's counters are part of the etcd metrics.
    pub fn set_watch(&self, counters: Arc<WatchCounters>) {
        let _ = self.watch.set(counters);
    }

    fn holder_stats(&self) -> HolderStats {
        self.holder
            .get()
            .and_then(Weak::upgrade)
            .map(|h| h.stats())
            .unwrap_or_default()
    }
}

impl Collector for Counted {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hs = self.holder_stats();
        let watch_errors = self.watch.get().map_or(0, |w| w.stats().errors);
        let etcd = self.etcd_errors.load(Ordering::Relaxed) + watch_errors + hs.errors;
        let counters = [
            ("twill_etcd_errors", "Failed requests to etcd", etcd),
            (
                "twill_lease_renewals",
                "Lease keep-alives that succeeded",
                hs.renewals,
            ),
            (
                "twill_lease_losses",
                "Leases lost (expired, deleted, taken over)",
                hs.losses,
            ),
            (
                "twill_netlink_timeouts",
                "netlink requests (routes, neighbours, FDB, links, addresses, dumps, peer set changes) that got no answer within --netlink-timeout",
                twill_dataplane::netlink::timeouts(),
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

/// What the HTTP handlers read.
pub struct Shared {
    pub registry: Registry,
    pub ready: AtomicBool,
    pub why_not_ready: std::sync::Mutex<String>,
    /// Why the etcd TLS files on disk are not the ones in use (see `tls_reload`), shown on
    /// /readyz; readiness itself is not changed by it.
    etcd_tls_problem: std::sync::Mutex<Option<String>>,
    /// When the main loop last began a cycle (ms since `started`; 0: not in the loop yet).
    heartbeat_ms: AtomicU64,
    started: std::time::Instant,
    /// `/healthz` fails when the main loop has not begun a cycle for longer than this.
    liveness_timeout: std::time::Duration,
}

impl Shared {
    pub fn new(registry: Registry, liveness_timeout: std::time::Duration) -> Shared {
        Shared {
            registry,
            ready: AtomicBool::new(false),
            why_not_ready: std::sync::Mutex::new("starting".into()),
            etcd_tls_problem: std::sync::Mutex::new(None),
            heartbeat_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
            liveness_timeout,
        }
    }

    /// (ready, why not) as /readyz answers.
    pub fn readiness(&self) -> (bool, String) {
        let ready = self.ready.load(Ordering::SeqCst);
        let why = if ready {
            String::new()
        } else {
            self.why_not_ready.lock().unwrap().clone()
        };
        (ready, why)
    }

    /// Called by the main loop at the start of every cycle (at least once a second: its
    /// stats tick), so a loop wedged in one step stops calling it.
    pub fn heartbeat(&self) {
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        self.heartbeat_ms.store(ms, Ordering::SeqCst);
    }

    /// `Err(how long)` when the main loop has stalled beyond the liveness timeout. Before the
    /// loop starts (waiting for etcd, the config or the lease: not wedged, just waiting)
    /// twilld counts as live; readiness tells that it is not ready.
    pub fn live(&self) -> Result<(), std::time::Duration> {
        let beat = self.heartbeat_ms.load(Ordering::SeqCst);
        if beat == 0 {
            return Ok(());
        }
        let since = self
            .started
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(beat));
        if since > self.liveness_timeout {
            Err(since)
        } else {
            Ok(())
        }
    }

    /// Sets (or clears) the note of rejected etcd TLS files.
    pub fn set_etcd_tls_problem(&self, why: Option<String>) {
        *self
            .etcd_tls_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// The note of rejected etcd TLS files, if any.
    pub fn etcd_tls_problem(&self) -> Option<String> {
        self.etcd_tls_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_ready(&self, ready: bool, why: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        *self.why_not_ready.lock().unwrap() = why.to_string();
    }
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match s.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(since) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "main loop stalled: no cycle for {:.1} s (--liveness-timeout {})\n",
                since.as_secs_f64(),
                humantime::format_duration(s.liveness_timeout)
            ),
        ),
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    // Rejected etcd TLS files do not change readiness (the old clients may still work);
    // the reason is carried either way, so a failing node says why.
    let tls = s
        .etcd_tls_problem()
        .map(|p| format!("warning: {p}\n"))
        .unwrap_or_default();
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, format!("ready\n{tls}"))
    } else {
        let why = s.why_not_ready.lock().unwrap().clone();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n{tls}"),
        )
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut out = String::new();
    if encode(&mut out, &s.registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

/// Binds `addr` (fails now if it cannot) and serves the endpoints in a background task.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    serve_app(addr, app).await
}

/// `--metrics-scrape-addr`: `/metrics` alone, for Prometheus on another host. The probes
/// stay on `--metrics-addr` (loopback), so a reachable port exposes nothing but counters.
pub async fn serve_scrape(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared);
    serve_app(addr, app).await
}

async fn serve_app(addr: SocketAddr, app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod counted_tests {
    use super::*;

    #[test]
    fn counted_metrics_keep_their_names_and_types() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.counted.etcd_errors.fetch_add(2, Ordering::Relaxed);
        m.counted.set_watch(Arc::default());
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("# TYPE twill_etcd_errors counter\n"),
            "{text}"
        );
        assert!(text.contains("\ntwill_etcd_errors_total 2\n"), "{text}");
        for name in [
            "twill_lease_renewals",
            "twill_lease_losses",
            "twill_netlink_timeouts",
        ] {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{text}");
            assert!(text.contains(&format!("\n{name}_total ")), "{text}");
        }
    }
}
