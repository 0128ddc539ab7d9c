//! Peer health: every twilld probes every peer through the overlay and publishes what it
//! sees, so that any node (and `twillctl cluster status`) can see the whole matrix.
//!
//! - **Probe.** A UDP datagram from this node's VTEP address (the lease's network address,
//!   on `twill.<VNI>`) to the peer's VTEP address, port `--health-port`. It travels exactly
//!   as pod traffic does: route → neighbour → FDB → VXLAN over the underlay, through the
//!   peer's input filter. The peer's twilld answers on the same socket. A probe failure
//!   never changes the data plane; it is only reported.
//! - **Rate.** One probe per peer per `--health-interval`, spread evenly over the interval,
//!   and never more than `--health-max-rate` probes per second in total: at large node
//!   counts the interval stretches instead (5,000 peers at 200/s: one probe per peer every
//!   25 s).
//! - **Verdict.** A peer is unreachable after [`LOST_IN_A_ROW`] probes in a row without an
//!   answer within `--health-timeout`; reachable again on the first answer.
//! - **Published** to etcd as `<prefix>/health/<node name>` (JSON, [`NodeReport`]) every
//!   `--health-publish` under an etcd lease of three times that, so a node that stops
//!   publishing disappears instead of showing stale data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use twill_ipam::store::backend::Put;
use twill_ipam::store::{LeaseStore, StoreError};

use super::metrics::Shared;

/// Probes lost in a row before a peer counts as unreachable.
pub const LOST_IN_A_ROW: u32 = 3;
const PROBE: &[u8; 4] = b"TWP1";
const ANSWER: &[u8; 4] = b"TWA1";

/// How often and how hard to probe.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_rate: u32,
    pub publish: Duration,
    /// Bounds one publication of the report (the store's request timeout).
    pub report_timeout: Duration,
    /// Peers listed one by one (report rows, per-peer series) while the node has at most
    /// this many; above it only unreachable peers are, at most this many of them.
    pub detail_max: usize,
}

impl HealthConfig {
    /// The time between two probes (to any peer): the interval spread over the peers, but
    /// never more than `max_rate` per second.
    pub fn spacing(&self, peers: usize) -> Duration {
        let even = self.interval / (peers.max(1) as u32);
        let floor = Duration::from_secs(1) / self.max_rate.max(1);
        even.max(floor)
    }
}

/// One peer to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub subnet: Ipv4Net,
    pub node: String,
}

/// What the probe task needs from the main loop: this node's VTEP address and the peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub own: Option<Ipv4Net>,
    pub peers: Vec<Target>,
}

/// One peer as this node sees it (also the JSON published to etcd).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    pub subnet: String,
    pub node: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Unix time of the last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// Probes in a row without an answer.
    pub lost_in_a_row: u32,
    /// The peer's VTEP address, the probes' destination (reports of older twillds lack
    /// it: the subnet's network address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<String>,
    /// How packets to the peer travel: `vxlan` (direct routing is not implemented yet;
    /// reports of older twillds lack the field and mean `vxlan`).
    #[serde(default = "vxlan_path")]
    pub path: String,
}

/// The only path twill has today.
pub const PATH_VXLAN: &str = "vxlan";

fn vxlan_path() -> String {
    PATH_VXLAN.to_string()
}

impl PeerView {
    /// The VTEP address: the report's, else the subnet's network address (what twilld
    /// probes).
    pub fn vtep_addr(&self) -> Option<String> {
        self.vtep.clone().or_else(|| {
            self.subnet
                .parse::<Ipv4Net>()
                .ok()
                .map(|n| n.network().to_string())
        })
    }

    /// `yes`, `no`, or `unknown`: a peer that never answered yet is not known to be
    /// reachable (twilld counts it reachable until 3 probes are lost, so that it is not
    /// reported down before its first probes had a chance).
    pub fn verdict(&self) -> &'static str {
        if !self.reachable {
            "no"
        } else if self.last_seen.is_some() {
            "yes"
        } else {
            "unknown"
        }
    }
}

/// What a node publishes under `<prefix>/health/<node>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeReport {
    pub node: String,
    pub subnet: Option<String>,
    pub public_ip: String,
    pub version: String,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Unix time of this report.
    pub time: u64,
    /// Pod IPs reserved in this node's subnet, and how many it has at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_capacity: Option<u64>,
    /// Which peers `peers` lists (reports of older twillds lack it: all of them).
    #[serde(default)]
    pub peers_listed: PeersListed,
    /// All the peers this node probes, and how many of them are unreachable (also those
    /// that `peers` leaves out). Reports of older twillds lack them: count `peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_unreachable: Option<u64>,
    pub peers: Vec<PeerView>,
}

/// Which peers a report lists one by one: a node with more than `--health-detail-max`
/// peers lists only the unreachable ones (at most that many), so that a report stays small
/// in a large cluster (5,000 rows × 5,000 nodes would not fit etcd).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeersListed {
    #[default]
    All,
    /// A peer missing from `peers` answered its last probes.
    Unreachable,
    /// A value this twill does not know (a newer twilld): trust only the rows.
    #[serde(other)]
    Unknown,
}

impl NodeReport {
    pub fn unreachable(&self) -> impl Iterator<Item = &PeerView> {
        self.peers.iter().filter(|p| !p.reachable)
    }

    /// The peers this node probes, listed or not.
    pub fn peer_count(&self) -> u64 {
        self.peers_total.unwrap_or(self.peers.len() as u64)
    }

    /// The unreachable peers, listed or not.
    pub fn unreachable_count(&self) -> u64 {
        self.peers_unreachable
            .unwrap_or_else(|| self.unreachable().count() as u64)
    }
}

/// The etcd key prefix of the reports.
pub fn health_prefix(prefix: &str) -> String {
    format!("{}/health/", prefix.trim_end_matches('/'))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

/// The peer-health metrics.
#[derive(Clone)]
pub struct HealthMetrics {
    pub reachable: Family<PeerLabel, Gauge>,
    pub rtt: Family<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Every answered probe's round-trip time, all peers together (bounded at any size).
    pub rtt_all: Histogram,
    pub unreachable: Gauge,
    pub probes: Counter,
    pub lost: Counter,
    /// This node's allocator: pod IPs reserved, and how many the subnet has.
    pub pod_ips_used: Gauge,
    pub pod_ips_capacity: Gauge,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        HealthMetrics {
            reachable: Family::default(),
            rtt: Family::default(),
            // 0.1 ms to 0.8 s.
            rtt_all: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            unreachable: Gauge::default(),
            probes: Counter::default(),
            lost: Counter::default(),
            pod_ips_used: Gauge::default(),
            pod_ips_capacity: Gauge::default(),
        }
    }
}

impl HealthMetrics {
    pub fn register(reg: &mut Registry) -> HealthMetrics {
        let m = HealthMetrics::default();
        reg.register(
            "twill_peer_reachable",
            "1 when the peer answers probes through the overlay, 0 after 3 lost in a row (above --health-detail-max peers: only unreachable peers, at most that many)",
            m.reachable.clone(),
        );
        reg.register(
            "twill_peer_rtt_seconds",
            "Round-trip time of the last answered probe to the peer, through the overlay (only up to --health-detail-max peers)",
            m.rtt.clone(),
        );
        reg.register(
            "twill_health_probe_rtt_seconds",
            "Round-trip time of answered probes to all peers, through the overlay",
            m.rtt_all.clone(),
        );
        reg.register(
            "twill_peers_unreachable",
            "Peers that do not answer probes through the overlay",
            m.unreachable.clone(),
        );
        reg.register(
            "twill_health_probes",
            "Probes sent to peers",
            m.probes.clone(),
        );
        reg.register(
            "twill_health_probes_lost",
            "Probes that got no answer within the timeout",
            m.lost.clone(),
        );
        reg.register(
            "twill_pod_ips_used",
            "Pod IPs reserved in this node's subnet (the CNI plugin's allocator, read at each health publish)",
            m.pod_ips_used.clone(),
        );
        reg.register(
            "twill_pod_ips_capacity",
            "Pod IPs this node's subnet has (all but network, gateway and broadcast)",
            m.pod_ips_capacity.clone(),
        );
        m
    }
}

#[derive(Debug)]
struct PeerState {
    node: String,
    reachable: bool,
    rtt: Option<Duration>,
    last_seen: Option<SystemTime>,
    lost_in_a_row: u32,
    /// (nonce, sent at) of the probe waiting for its answer.
    pending: Option<(u64, Instant)>,
}

/// Everything the task keeps.
struct Prober {
    cfg: HealthConfig,
    metrics: HealthMetrics,
    peers: BTreeMap<Ipv4Net, PeerState>,
    by_addr: HashMap<Ipv4Addr, Ipv4Net>,
    /// The last peer probed (round robin).
    cursor: Option<Ipv4Net>,
    nonce: u64,
    /// The peers that have per-peer series now (see [`Prober::detailed`]).
    series: BTreeSet<Ipv4Net>,
}

impl Prober {
    /// No peers yet; probes are numbered from `nonce`.
    fn new(cfg: HealthConfig, metrics: HealthMetrics, nonce: u64) -> Self {
        Prober {
            cfg,
            metrics,
            peers: BTreeMap::new(),
            by_addr: HashMap::new(),
            cursor: None,
            nonce,
            series: BTreeSet::new(),
        }
    }

    /// Takes the new peer list: peers that left go (with their series), new ones start as
    /// reachable, the others keep their state. The cost is a lookup per peer: a join or a
    /// leave in a large cluster must not rebuild every peer's state and series.
    fn set_targets(&mut self, t: &Targets) {
        let mut subnets: Vec<Ipv4Net> = t.peers.iter().map(|p| p.subnet).collect();
        if !subnets.is_sorted() {
            subnets.sort();
        }
        let gone: Vec<Ipv4Net> = self
            .peers
            .keys()
            .filter(|s| subnets.binary_search(s).is_err())
            .copied()
            .collect();
        for s in &gone {
            self.peers.remove(s);
            self.by_addr.remove(&s.network());
            self.drop_series(*s);
        }
        for target in &t.peers {
            if let Some(st) = self.peers.get_mut(&target.subnet) {
                if st.node != target.node {
                    st.node.clone_from(&target.node);
                }
                continue;
            }
            self.peers.insert(
                target.subnet,
                PeerState {
                    node: target.node.clone(),
                    // Innocent until proven otherwise: a new peer is not reported
                    // unreachable before its first probes had a chance.
                    reachable: true,
                    rtt: None,
                    last_seen: None,
                    lost_in_a_row: 0,
                    pending: None,
                },
            );
            self.by_addr.insert(target.subnet.network(), target.subnet);
        }
        self.sync_series();
    }

    /// Whether every peer is listed (report rows, per-peer series): at most
    /// `--health-detail-max` peers. Above, only unreachable peers are, at most that many:
    /// 5,000 peers would be 10,000 series per node and a report of 5,000 rows per node.
    fn detailed(&self) -> bool {
        self.peers.len() <= self.cfg.detail_max
    }

    /// The peers to list: all of them, or the first `detail_max` unreachable ones.
    fn listed(&self) -> impl Iterator<Item = (&Ipv4Net, &PeerState)> {
        let all = self.detailed();
        self.peers
            .iter()
            .filter(move |(_, p)| all || !p.reachable)
            .take(self.cfg.detail_max)
    }

    /// Makes the per-peer series those of [`Prober::listed`], with their values, and sets
    /// the unreachable count. A walk over the peers: called when the peer set changes or a
    /// peer's verdict flips, never per answer.
    fn sync_series(&mut self) {
        let want: BTreeSet<Ipv4Net> = self.listed().map(|(s, _)| *s).collect();
        let stale: Vec<Ipv4Net> = self.series.difference(&want).copied().collect();
        for s in stale {
            self.drop_series(s);
        }
        for s in want {
            self.set_series(s);
        }
        let down = self.peers.values().filter(|p| !p.reachable).count();
        self.metrics.unreachable.set(down as i64);
    }

    /// Creates or updates one peer's series from its state.
    fn set_series(&mut self, subnet: Ipv4Net) {
        let Some(p) = self.peers.get(&subnet) else {
            return;
        };
        let l = PeerLabel {
            peer: subnet.to_string(),
        };
        self.metrics
            .reachable
            .get_or_create(&l)
            .set(i64::from(p.reachable));
        if let Some(rtt) = p.rtt {
            self.metrics.rtt.get_or_create(&l).set(rtt.as_secs_f64());
        }
        self.series.insert(subnet);
    }

    fn drop_series(&mut self, subnet: Ipv4Net) {
        if self.series.remove(&subnet) {
            let l = PeerLabel {
                peer: subnet.to_string(),
            };
            self.metrics.reachable.remove(&l);
            self.metrics.rtt.remove(&l);
        }
    }

    /// Times out the pending probe of `subnet` if it is older than the timeout.
    fn expire(&mut self, now: Instant) {
        let timeout = self.cfg.timeout;
        let mut changed = false;
        for (s, p) in self.peers.iter_mut() {
            if let Some((_, at)) = p.pending
                && now.duration_since(at) > timeout
            {
                p.pending = None;
                p.lost_in_a_row += 1;
                self.metrics.lost.inc();
                if p.reachable && p.lost_in_a_row >= LOST_IN_A_ROW {
                    p.reachable = false;
                    warn!(peer = %s, node = %p.node, lost = p.lost_in_a_row, "peer unreachable through the overlay (probes lost)");
                    changed = true;
                }
            }
        }
        if changed {
            self.sync_series();
        }
    }

    fn on_answer(&mut self, from: Ipv4Addr, nonce: u64, now: Instant) {
        let Some(subnet) = self.by_addr.get(&from).copied() else {
            return;
        };
        let Some(p) = self.peers.get_mut(&subnet) else {
            return;
        };
        let Some((want, at)) = p.pending else { return };
        if want != nonce {
            return;
        }
        p.pending = None;
        p.rtt = Some(now.duration_since(at));
        p.last_seen = Some(SystemTime::now());
        p.lost_in_a_row = 0;
        let flipped = !p.reachable;
        if flipped {
            p.reachable = true;
            info!(peer = %subnet, node = %p.node, "peer reachable again through the overlay");
        }
        self.metrics
            .rtt_all
            .observe(now.duration_since(at).as_secs_f64());
        // Only this peer's series: an answer is the common case, at up to --health-max-rate
        // per second, and must not walk every peer.
        if flipped {
            self.sync_series();
        } else if self.series.contains(&subnet) {
            self.set_series(subnet);
        }
    }

    /// The next peer to probe (round robin) and a fresh nonce.
    fn next_probe(&mut self, now: Instant) -> Option<(Ipv4Addr, u64)> {
        if self.peers.is_empty() {
            return None;
        }
        // Round robin by subnet: the one after the last probed, or the first.
        let after = self.cursor;
        let (subnet, p) = match after {
            Some(c) => match self.peers.range_mut((Excluded(c), Unbounded)).next() {
                Some(e) => e,
                None => self.peers.iter_mut().next()?,
            },
            None => self.peers.iter_mut().next()?,
        };
        self.cursor = Some(*subnet);
        if p.pending.is_some() {
            return None; // still waiting for the last one
        }
        self.nonce = self.nonce.wrapping_add(1);
        p.pending = Some((self.nonce, now));
        self.metrics.probes.inc();
        Some((subnet.network(), self.nonce))
    }

    /// The report's rows: the [`Prober::listed`] peers.
    fn views(&self) -> Vec<PeerView> {
        self.listed()
            .map(|(s, p)| PeerView {
                subnet: s.to_string(),
                node: p.node.clone(),
                reachable: p.reachable,
                rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                last_seen: p
                    .last_seen
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                lost_in_a_row: p.lost_in_a_row,
                vtep: Some(s.network().to_string()),
                path: vxlan_path(),
            })
            .collect()
    }
}

/// What the report needs besides the probes.
pub struct ReportContext {
    pub node: String,
    pub public_ip: String,
    pub shared: Arc<Shared>,
    /// The CNI plugin's data dir, for pod IPs used / capacity.
    pub cni_data_dir: std::path::PathBuf,
}

/// Starts the prober/responder and the publisher; they run until the process exits.
pub fn spawn(
    cfg: HealthConfig,
    mut targets: watch::Receiver<Targets>,
    metrics: HealthMetrics,
    store: LeaseStore,
    ctx: ReportContext,
) {
    tokio::spawn(async move {
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut prober = Prober::new(cfg.clone(), metrics, nonce);
        let mut sock: Option<(Ipv4Addr, UdpSocket)> = None;
        let mut publish = tokio::time::interval(cfg.publish);
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut publisher = Publisher::new(store, cfg.publish * 3, cfg.report_timeout);
        let mut buf = [0u8; 64];
        loop {
            let own = {
                let t = targets.borrow_and_update();
                prober.set_targets(&t);
                t.own.map(|n| n.network())
            };
            // The socket lives on this node's VTEP address: reachable only through the
            // overlay (and locally), never from the underlay directly.
            if own != sock.as_ref().map(|(a, _)| *a) {
                sock = None;
                if let Some(addr) = own {
                    match UdpSocket::bind(SocketAddrV4::new(addr, cfg.port)).await {
                        Ok(s) => sock = Some((addr, s)),
                        Err(e) => warn!(%addr, port = cfg.port, error = %e, "health socket"),
                    }
                }
            }
            let spacing = cfg.spacing(prober.peers.len());
            let mut tick = tokio::time::interval(spacing);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = targets.changed() => {
                        if r.is_err() { return; }
                        break;
                    }
                    _ = tick.tick() => {
                        let now = Instant::now();
                        prober.expire(now);
                        if let Some((_, s)) = &sock
                            && let Some((dst, nonce)) = prober.next_probe(now)
                        {
                            let mut msg = [0u8; 12];
                            msg[..4].copy_from_slice(PROBE);
                            msg[4..].copy_from_slice(&nonce.to_be_bytes());
                            if let Err(e) = s.send_to(&msg, SocketAddrV4::new(dst, cfg.port)).await {
                                debug!(%dst, error = %e, "probe not sent");
                            }
                        }
                    }
                    r = recv(&sock, &mut buf) => {
                        let Some((n, from)) = r else { continue };
                        let SocketAddr::V4(from) = from else { continue };
                        if n != 12 { continue; }
                        let nonce = u64::from_be_bytes(buf[4..12].try_into().unwrap_or_default());
                        if &buf[..4] == PROBE {
                            // Answer only peers' VTEP addresses: nothing else may use us as
                            // a reflector.
                            if prober.by_addr.contains_key(from.ip())
                                && let Some((_, s)) = &sock
                            {
                                let mut msg = [0u8; 12];
                                msg[..4].copy_from_slice(ANSWER);
                                msg[4..].copy_from_slice(&nonce.to_be_bytes());
                                let _ = s.send_to(&msg, from).await;
                            }
                        } else if &buf[..4] == ANSWER {
                            prober.on_answer(*from.ip(), nonce, Instant::now());
                        }
                    }
                    _ = publish.tick() => {
                        let own_subnet = targets.borrow().own;
                        let report = build_report(&ctx, own_subnet, &prober);
                        if let (Some(u), Some(c)) = (report.pods_used, report.pods_capacity) {
                            prober.metrics.pod_ips_used.set(u as i64);
                            prober.metrics.pod_ips_capacity.set(c as i64);
                        }
                        publisher.put(&ctx.node, &report).await;
                    }
                }
            }
        }
    });
}

async fn recv(sock: &Option<(Ipv4Addr, UdpSocket)>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match sock {
        Some((_, s)) => s.recv_from(buf).await.ok(),
        None => futures::future::pending().await,
    }
}

fn build_report(ctx: &ReportContext, own: Option<Ipv4Net>, prober: &Prober) -> NodeReport {
    let (ready, reason) = ctx.shared.readiness();
    let (pods_used, pods_capacity) = match own {
        Some(own) => pod_usage(&ctx.cni_data_dir, own),
        None => (None, None),
    };
    NodeReport {
        node: ctx.node.clone(),
        subnet: own.map(|s| s.to_string()),
        public_ip: ctx.public_ip.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        ready,
        reason,
        time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pods_used,
        pods_capacity,
        peers_listed: if prober.detailed() {
            PeersListed::All
        } else {
            PeersListed::Unreachable
        },
        peers_total: Some(prober.peers.len() as u64),
        peers_unreachable: Some(prober.peers.values().filter(|p| !p.reachable).count() as u64),
        peers: prober.views(),
    }
}

/// Reservations in `own` across the plugin's networks under `data_dir`, and the number of
/// pod addresses `own` has (all but network, gateway and broadcast). Read without the
/// allocator's lock: a count for a report, not a decision.
pub fn pod_usage(data_dir: &std::path::Path, own: Ipv4Net) -> (Option<u64>, Option<u64>) {
    let host_bits = 32 - u32::from(own.prefix_len());
    let capacity = (1u64 << host_bits).saturating_sub(3);
    let Ok(dirs) = std::fs::read_dir(data_dir) else {
        return (Some(0), Some(capacity));
    };
    let mut used = 0;
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if let Ok(list) = twill_ipam::alloc::Allocator::new(data_dir, &name).list() {
            used += list
                .iter()
                .filter(|r| matches!(r.ip, std::net::IpAddr::V4(ip) if own.contains(&ip)))
                .count() as u64;
        }
    }
    (Some(used), Some(capacity))
}

/// Puts the report under a store lease of its own, kept alive by each put.
struct Publisher {
    store: LeaseStore,
    ttl: Duration,
    /// Bounds one publication (a keep-alive or grant, then the put): the prober waits for it.
    timeout: Duration,
    lease: Option<i64>,
}

impl Publisher {
    fn new(store: LeaseStore, ttl: Duration, timeout: Duration) -> Self {
        Publisher {
            store,
            ttl,
            timeout,
            lease: None,
        }
    }

    async fn put(&mut self, node: &str, report: &NodeReport) {
        let key = report_key(&self.store, node);
        let Ok(value) = serde_json::to_string(report) else {
            return;
        };
        let r = tokio::time::timeout(self.timeout, self.put_inner(key, value)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "health report not published");
                self.lease = None;
            }
            Err(_) => {
                debug!("health report not published: etcd timeout");
                self.lease = None;
            }
        }
    }

    async fn put_inner(&mut self, key: String, value: String) -> Result<(), StoreError> {
        let backend = self.store.backend();
        let renewed = match self.lease {
            Some(id) => {
                let mut keeper = backend.keep_alive(id).await?;
                (keeper.renew().await? > 0).then_some(id)
            }
            None => None,
        };
        let lease = match renewed {
            Some(id) => id,
            None => backend.grant(self.ttl.as_secs() as i64).await?.id,
        };
        self.lease = Some(lease);
        backend.put(Put { key, value, lease }).await?;
        Ok(())
    }
}

/// `<prefix>/health/<node>`.
fn report_key(store: &LeaseStore, node: &str) -> String {
    format!("{}{node}", health_prefix(store.prefix()))
}

/// Every node's report, from etcd. A value that does not parse is left out (it is
/// untrusted input; `twillctl cluster status` shows the node as not reporting).
pub async fn read_reports(store: &LeaseStore) -> Result<Vec<NodeReport>, StoreError> {
    let prefix = health_prefix(store.prefix());
    let listing = store.backend().list(&prefix).await?;
    Ok(listing
        .kvs
        .iter()
        .filter_map(|kv| parse_report(&kv.value).ok())
        .collect())
}

/// One node's report: `Ok(None)` when there is none (twilld not running health, or its
/// report expired), `Ok(Some(Err(why)))` when the value does not parse.
pub async fn read_report(
    store: &LeaseStore,
    node: &str,
) -> Result<Option<Result<NodeReport, String>>, StoreError> {
    let key = report_key(store, node);
    let (kv, _) = store.backend().get(&key).await?;
    Ok(kv.map(|kv| {
        parse_report(&kv.value).map_err(|e| format!("the report at {} does not parse: {e}", kv.key))
    }))
}

/// The parse both readers use: a report of an older twilld (fewer fields) still reads.
pub fn parse_report(value: &[u8]) -> Result<NodeReport, serde_json::Error> {
    serde_json::from_slice(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            port: 1,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            max_rate: 200,
            publish: Duration::from_secs(10),
            report_timeout: Duration::from_secs(5),
            detail_max: 4,
        }
    }

    #[test]
    fn spacing_spreads_the_interval_and_caps_the_rate() {
        let c = cfg();
        assert_eq!(c.spacing(0), Duration::from_secs(2));
        assert_eq!(c.spacing(4), Duration::from_millis(500));
        // 5,000 peers: 200/s at most, so 5 ms apart and 25 s per round.
        assert_eq!(c.spacing(5000), Duration::from_millis(5));
    }

    #[test]
    fn three_lost_probes_make_a_peer_unreachable_and_one_answer_reachable() {
        let mut p = Prober::new(cfg(), HealthMetrics::default(), 0);
        let subnet: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        p.set_targets(&Targets {
            own: Some("10.244.1.0/24".parse().unwrap()),
            peers: vec![Target {
                subnet,
                node: "b".into(),
            }],
        });
        let t0 = Instant::now();
        for k in 0..3 {
            let at = t0 + Duration::from_secs(2 * k);
            assert!(p.next_probe(at).is_some());
            assert!(p.peers[&subnet].reachable, "after {k} lost");
            p.expire(at + Duration::from_millis(1500));
        }
        assert!(!p.peers[&subnet].reachable);
        assert_eq!(p.metrics.unreachable.get(), 1);
        let at = t0 + Duration::from_secs(10);
        let (dst, nonce) = p.next_probe(at).unwrap();
        assert_eq!(dst, subnet.network());
        // An answer from another address or with another nonce does not count.
        p.on_answer("10.244.9.0".parse().unwrap(), nonce, at);
        p.on_answer(dst, nonce + 1, at);
        assert!(!p.peers[&subnet].reachable);
        p.on_answer(dst, nonce, at + Duration::from_millis(3));
        assert!(p.peers[&subnet].reachable);
        assert_eq!(p.peers[&subnet].rtt, Some(Duration::from_millis(3)));
        assert_eq!(p.metrics.unreachable.get(), 0);
        let v = &p.views()[0];
        assert_eq!(v.verdict(), "yes");
        assert_eq!(v.vtep.as_deref(), Some("10.244.2.0"));
        assert_eq!(v.path, "vxlan");
    }

    /// Above `detail_max` peers (4 here) only unreachable peers have series and report
    /// rows, at most `detail_max` of them, and the counts still cover every peer; back at
    /// or below it, every peer is listed again.
    #[test]
    fn above_detail_max_only_unreachable_peers_are_listed() {
        let mut p = Prober::new(cfg(), HealthMetrics::default(), 0);
        let subnet = |i: u8| -> Ipv4Net { format!("10.244.{i}.0/24").parse().unwrap() };
        let targets = |n: u8| Targets {
            own: Some(subnet(200)),
            peers: (1..=n)
                .map(|i| Target {
                    subnet: subnet(i),
                    node: format!("n{i}"),
                })
                .collect(),
        };
        let label = |i: u8| PeerLabel {
            peer: subnet(i).to_string(),
        };
        let ctx = ReportContext {
            node: "me".into(),
            public_ip: "192.0.2.1".into(),
            shared: Arc::new(Shared::new(Registry::default(), Duration::from_secs(30))),
            cni_data_dir: "/nonexistent".into(),
        };
        p.set_targets(&targets(4));
        assert!(p.detailed());
        assert_eq!(p.series.len(), 4);
        assert_eq!(p.metrics.reachable.get(&label(1)).map(|g| g.get()), Some(1));
        p.set_targets(&targets(6));
        assert!(!p.detailed());
        assert!(p.series.is_empty(), "every peer answers: none listed");
        assert!(p.metrics.reachable.get(&label(1)).is_none());
        let r = build_report(&ctx, Some(subnet(200)), &p);
        assert_eq!(r.peers_listed, PeersListed::Unreachable);
        assert_eq!((r.peer_count(), r.unreachable_count()), (6, 0));
        assert!(r.peers.is_empty());

        // Peers 2..=6 lose 3 probes each: 5 unreachable, only 4 listed.
        let t0 = Instant::now();
        for round in 0..3u64 {
            for _ in 0..6 {
                let at = t0 + Duration::from_secs(10 * round);
                if let Some((dst, nonce)) = p.next_probe(at)
                    && dst == subnet(1).network()
                {
                    p.on_answer(dst, nonce, at + Duration::from_millis(1));
                }
            }
            p.expire(t0 + Duration::from_secs(10 * round + 5));
        }
        assert_eq!(p.metrics.unreachable.get(), 5);
        assert_eq!(
            p.series,
            (2..=5).map(subnet).collect::<BTreeSet<_>>(),
            "the first 4 unreachable"
        );
        assert_eq!(p.metrics.reachable.get(&label(2)).map(|g| g.get()), Some(0));
        assert!(p.metrics.reachable.get(&label(1)).is_none());
        assert!(p.metrics.rtt.get(&label(1)).is_none());
        let r = build_report(&ctx, Some(subnet(200)), &p);
        assert_eq!((r.peer_count(), r.unreachable_count()), (6, 5));
        assert_eq!(r.peers.len(), 4);
        assert!(r.peers.iter().all(|v| v.verdict() == "no"));
        let back = parse_report(serde_json::to_string(&r).unwrap().as_bytes()).unwrap();
        assert_eq!(back, r);

        // Peer 2 answers again: its series goes, peer 6 takes the free place.
        let at = t0 + Duration::from_secs(100);
        let (dst, nonce) = loop {
            let (dst, nonce) = p.next_probe(at).unwrap();
            if dst == subnet(2).network() {
                break (dst, nonce);
            }
            p.expire(at + Duration::from_secs(5));
        };
        p.on_answer(dst, nonce, at + Duration::from_millis(2));
        assert_eq!(p.series, [3, 4, 5, 6].map(subnet).into());

        // Back to 4 peers: all listed, with their state.
        p.set_targets(&targets(4));
        assert!(p.detailed());
        assert_eq!(p.series, (1..=4).map(subnet).collect::<BTreeSet<_>>());
        assert_eq!(p.metrics.reachable.get(&label(3)).map(|g| g.get()), Some(0));
        assert_eq!(p.metrics.reachable.get(&label(2)).map(|g| g.get()), Some(1));
        assert!(p.metrics.reachable.get(&label(6)).is_none());
        let r = build_report(&ctx, Some(subnet(200)), &p);
        assert_eq!(r.peers_listed, PeersListed::All);
        assert_eq!(r.peers.len(), 4);
    }

    /// A report with a `peers_listed` value of a newer twilld still reads.
    #[test]
    fn an_unknown_peers_listed_value_reads() {
        let r = parse_report(
            br#"{"node":"a","subnet":null,"public_ip":"x","version":"v","ready":true,"time":1,
            "peers_listed":"sampled","peers":[]}"#,
        )
        .unwrap();
        assert_eq!(r.peers_listed, PeersListed::Unknown);
    }

    /// A report of an older twilld (no `vtep`, no `path`) still reads, with the VTEP derived
    /// from the subnet and the path `vxlan`; the verdict of a peer that never answered is
    /// `unknown`, of one that lost 3 probes `no`.
    #[test]
    fn an_old_report_still_reads() {
        let old = br#"{"node":"a","subnet":"10.244.1.0/24","public_ip":"192.0.2.1","version":"0.1.0",
            "ready":true,"time":1,"peers":[
            {"subnet":"10.244.2.0/24","node":"b","reachable":true,"lost_in_a_row":1},
            {"subnet":"10.244.3.0/24","node":"c","reachable":false,"rtt_ms":0.5,"last_seen":1,"lost_in_a_row":3}]}"#;
        let r = parse_report(old).unwrap();
        assert_eq!(r.peers[0].vtep, None);
        assert_eq!(r.peers[0].vtep_addr().as_deref(), Some("10.244.2.0"));
        assert_eq!(r.peers[0].path, "vxlan");
        assert_eq!(r.peers[0].verdict(), "unknown");
        assert_eq!(r.peers[1].verdict(), "no");
        // And what we write reads back the same.
        let again = parse_report(serde_json::to_string(&r).unwrap().as_bytes()).unwrap();
        assert_eq!(again, r);
        // A bad value names the field.
        let bad = br#"{"node":"a","subnet":null,"public_ip":"x","version":"v","ready":"yes","time":1,"peers":[]}"#;
        let e = parse_report(bad).unwrap_err().to_string();
        assert!(e.contains("bool"), "{e}");
    }
}
