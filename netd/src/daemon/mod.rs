//! twilld: the node daemon.
//!
//! Start-up ([`startup`], one phase per function): the metrics and HTTP endpoints →
//! netlink, the underlay and public IP → the lease store (and its TLS reload) → the network
//! config (etcd, `--net-conf`; a refused one waits, not ready) → the node's lease (sticky,
//! kept by a [`LeaseHolder`]) → `twill.<VNI>` (adopted if right) → forwarding sysctls →
//! nftables → the lease watch and a netlink dump → the first reconcile → the subnet file
//! (only now: the data plane is ready) → `/readyz` says ready → the peer health prober.
//!
//! Then a loop ([`Inputs::next_work`]) records what there is to do, and [`Daemon::step`]
//! does it: reconciles on lease events (desired state), netlink events (the programmed
//! state, kept in a cache that events update; a fresh dump after an overrun) and on a
//! periodic resync (fresh dump, repairs drift). Stopping (SIGTERM, SIGINT, kill -9) never
//! tears the data plane down: the next start adopts it.

pub mod health;
mod memory;
pub mod metrics;
pub mod reconcile;
pub mod reconcile6;
pub mod tls_reload;
mod underlay_check;
mod v6;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use futures::FutureExt;
use ipnet::{IpNet, Ipv4Net};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{debug, error, info, warn};

use twill_dataplane::Netlink;
use twill_dataplane::nft::{DirectFilter, Nft, NftConfig, NftOutcome};
use twill_dataplane::nft_set::PeerSet;
use twill_dataplane::overlay::underlay::{self, Underlay};
use twill_dataplane::overlay::{
    DirectRoute, EnsureOutcome, Mac, Monitor, MonitorEvent, Op, Overlay, Programmed, Route,
    RoutePath, RtnlOverlay, VxlanLink, VxlanSpec, sysctl,
};
use twill_ipam::lease::{Lease, LeaseAttrs};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::{HolderState, LeaseHolder, LeaseStore, LeaseWatch, Pin};
use twill_ipam::subnet_file::SubnetFile;

use crate::cli::RunArgs;
use metrics::{Metrics, Shared};
use reconcile::{
    Direct, LeaseChanges, Peer, PeerDelta, RejectLog, ValidPeers, Validation, desired_with, diff,
    diff_touched, patch_desired, rejected_counts,
};

/// Netlink requests in flight when applying many ops.
const PARALLEL_OPS: usize = 64;

/// The node name: `--node-name`, else the hostname.
pub fn node_name(args: &RunArgs) -> Result<String> {
    match &args.node_name {
        Some(n) if !n.is_empty() => Ok(n.clone()),
        _ => Ok(hostname::get()
            .context("read the hostname (give --node-name)")?
            .to_string_lossy()
            .into_owned()),
    }
}

/// The context of a failed VXLAN device setup (no reconcile can run without the device).
#[derive(Debug)]
struct DeviceFailed;

impl std::fmt::Display for DeviceFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the VXLAN device is not in place")
    }
}

/// Why a reconcile runs (drift is counted only for the ones that are not lease changes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Start,
    Leases,
    Netlink,
    Resync,
}

/// What the main loop found to do; [`Daemon::step`] does it.
enum Work {
    /// Lease events, every queued one merged: the incremental reconcile.
    Leases(LeaseChanges),
    /// Netlink events left the cache different from what is expected (or need a dump).
    Netlink,
    /// The periodic resync: fresh dump, full reconcile, the drop counter.
    Resync,
    /// A retry after a failed node setup or a reconcile that needs a dump.
    Retry,
    /// The lease holder's state changed (renewal, loss, a move to another subnet).
    Holder(Box<HolderState>),
    /// The one-second tick: readiness, a pending dump.
    Tick,
}

struct Daemon {
    /// The peers for the health prober, updated by every reconcile.
    health: tokio::sync::watch::Sender<health::Targets>,
    args: RunArgs,
    ov: RtnlOverlay,
    metrics: Metrics,
    shared: Arc<Shared>,
    cfg: NetConfig,
    spec: VxlanSpec,
    link: VxlanLink,
    own: Ipv4Net,
    /// The programmed entries as last dumped and updated by our writes and netlink events.
    actual: Programmed,
    /// A fresh dump is needed before the next reconcile (overrun, failed op, recreated link).
    need_dump: bool,
    /// When [`Work::Retry`] is due (see [`Daemon::ensure_or_retry`]).
    retry_at: Option<tokio::time::Instant>,
    programmed_once: bool,
    nft: Nft,
    /// Adds and deletes the peer set's members over netlink (no `nft` process per join).
    peer_set: PeerSet,
    /// The members of nft's peer set as last written; `None`: not known (rewrite it).
    /// The members it must have are the valid peers' IPv4 public IPs
    /// ([`ValidPeers::public_v4s`]).
    nft_members: Option<BTreeSet<Ipv4Addr>>,
    /// Peer subnets whose route is not programmed: someone else's route holds the dst.
    conflicts: BTreeSet<Ipv4Net>,
    /// The drop counter as last read (it restarts at 0 when the table is rewritten).
    last_vxlan_dropped: u64,
    /// Rejected leases already logged (each is logged once).
    reject_log: RejectLog,
    /// The validated peers, kept between lease events (an event costs its own leases only).
    valid: ValidPeers,
    /// The entries that `valid` asks for.
    want: Programmed,
    /// The underlay device's name (the direct-path filter matches it as `iifname`).
    underlay_name: String,
    /// The peers routed directly (`Backend.DirectRouting`; always empty without it).
    direct: Direct,
    /// The members of nft's direct-peer set as last written; `None`: not known.
    nft_direct: Option<BTreeSet<Ipv4Net>>,
    /// A route that is not twill's changed since the direct peers were last decided: the
    /// next reconcile looks every peer up again.
    underlay_routes_changed: bool,
    /// The IPv6 side of a dual-stack node (`EnableIPv6`); `None`: IPv4 only.
    v6: Option<v6::V6>,
}

/// Asks the kernel how it routes each of `ips` now (one RTM_GETROUTE each, up to
/// [`PARALLEL_OPS`] in flight). Returns the answers (an address without a route has none)
/// and the addresses whose lookup failed.
pub async fn lookup_paths<O: Overlay>(
    o: &O,
    ips: impl IntoIterator<Item = Ipv4Addr>,
) -> (BTreeMap<Ipv4Addr, RoutePath>, BTreeSet<Ipv4Addr>) {
    use futures::stream::{self, StreamExt};
    let ips: BTreeSet<Ipv4Addr> = ips.into_iter().collect();
    let mut answers = stream::iter(ips)
        .map(|ip| async move { (ip, o.lookup_route(ip).await) })
        .buffer_unordered(PARALLEL_OPS);
    let mut paths = BTreeMap::new();
    let mut failed = BTreeSet::new();
    while let Some((ip, r)) = answers.next().await {
        match r {
            Ok(Some(p)) => {
                paths.insert(ip, p);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(%ip, error = %e, "route lookup for a peer's public IP failed; its route mode stays as it was");
                failed.insert(ip);
            }
        }
    }
    (paths, failed)
}

/// The route mode of `peers` over the underlay `dev`: [`Direct::decide`] on the kernel's
/// answers; a peer whose lookup failed keeps its mode in `before`.
pub async fn decide_direct<O: Overlay>(o: &O, peers: &[Peer], dev: u32, before: &Direct) -> Direct {
    let (paths, failed) = lookup_paths(o, peers.iter().filter_map(Peer::public_v4)).await;
    let mut d = Direct::decide(peers, &paths, dev);
    for p in peers {
        if p.public_v4().is_some_and(|ip| failed.contains(&ip))
            && before.subnets.contains(&p.subnet)
        {
            d.subnets.insert(p.subnet);
        }
    }
    d
}

/// SIGTERM and SIGINT: twilld exits on either, in every phase.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
        })
    }

    /// The name of the next signal.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// `f`'s output, or `None` if a signal comes first (start-up then ends quietly).
    async fn unless<T>(&mut self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            v = f => Some(v),
            _ = self.recv() => None,
        }
    }
}

/// What the main loop waits on (besides the daemon's retry timer).
struct Inputs {
    watch: LeaseWatch,
    monitor: Monitor,
    holder: Arc<LeaseHolder>,
    holder_rx: tokio::sync::watch::Receiver<HolderState>,
    resync: tokio::time::Interval,
    stats_tick: tokio::time::Interval,
    signals: Signals,
}

/// Runs twilld until SIGTERM/SIGINT. Never removes the data plane.
pub async fn run(args: RunArgs) -> Result<()> {
    let Some((mut d, mut inputs)) = startup(args).await? else {
        return Ok(());
    };
    while let Some(work) = inputs.next_work(&mut d).await? {
        d.step(work, &inputs.watch, &inputs.holder).await;
    }
    // Dropping the holder stops the keep-alive; the lease stays until its TTL, so a restart
    // gets the same subnet back.
    drop(inputs);
    Ok(())
}

/// Start-up, phase by phase (see the module doc). `None`: SIGTERM or SIGINT came while it
/// waited (for etcd and the network config, after a refused config, for the lease or the
/// first lease list).
async fn startup(args: RunArgs) -> Result<Option<(Daemon, Inputs)>> {
    let node = node_name(&args)?;
    let tele = Telemetry::serve(&args, &node).await?;
    let mut s = Startup {
        signals: Signals::install()?,
        metrics: tele.metrics,
        shared: tele.shared,
        args,
        node,
    };
    let kernel = Kernel::open(&s.args).await?;
    let store = s.open_store(tele.tls).await?;
    let Some(cfg) = s.network_config(&store, &kernel).await? else {
        return Ok(None);
    };
    // The peers' leases are listed (and then watched) by a task of their own from here on,
    // while this node takes its lease and sets up its device and nftables.
    let mut watch = store.watch();
    s.metrics.counted.set_watch(watch.counters());
    let side6 = if cfg.enable_ipv6 {
        let vni = cfg.backend.vxlan().vni;
        let side = v6::side6(&s.args, &kernel.nl, &kernel.ov, &kernel.under, vni, &s.node).await?;
        info!(public_ipv6 = %side.public_ip, "dual-stack: IPv6 side");
        Some(side)
    } else {
        None
    };
    let Some((holder, lease, mac)) = s.take_lease(&store, &cfg, &kernel, side6).await? else {
        return Ok(None);
    };
    let Kernel {
        ov,
        peer_set,
        under,
        ..
    } = kernel;
    let spec = s.vxlan_spec(&under, &cfg, mac, &lease);
    let v6 = side6.and_then(|side| v6::V6::new(&cfg, &s.args, &under, side, &lease));
    let (health_tx, health_rx) = tokio::sync::watch::channel(health::Targets::default());
    let mut d = s.daemon(ov, peer_set, cfg, spec, lease.subnet, health_tx);
    d.underlay_name = under.name.clone();
    d.v6 = v6;
    // Subscribe before the first dump so that no change between the two is missed.
    let monitor = if d.v6.is_some() {
        Monitor::current_dual_stack()
    } else {
        Monitor::current()
    }
    .context("subscribe to netlink events")?;
    let Some(listed) = s.signals.unless(watch.wait_synced()).await else {
        return Ok(None);
    };
    listed.ok_or_else(|| anyhow!("lease watch ended"))?;
    // The peers are known before the nft table is written: a table written with an empty
    // peer set would drop the VXLAN packets of peers that already reach this node's lease.
    d.seed_peers(&watch);
    // DirectRouting: the direct peers are known too, so that the filter's set has them
    // from the start (their pods' packets already come unencapsulated).
    d.decide_routes(
        &PeerDelta {
            full: true,
            ..Default::default()
        },
        true,
    )
    .await;
    d.ensure_node().await?;
    d.first_reconcile(&watch, &holder).await?;
    s.spawn_health(health_rx, tele.health, store, under.ip);

    let mut resync = tokio::time::interval(s.args.resync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let inputs = Inputs {
        watch,
        monitor,
        holder_rx: holder.subscribe(),
        holder,
        resync,
        stats_tick: tokio::time::interval(Duration::from_secs(1)),
        signals: s.signals,
    };
    Ok(Some((d, inputs)))
}

/// The metrics registry and the HTTP endpoints, served first (so /readyz tells every phase).
struct Telemetry {
    metrics: Metrics,
    health: health::HealthMetrics,
    tls: tls_reload::TlsMetrics,
    shared: Arc<Shared>,
}

impl Telemetry {
    async fn serve(args: &RunArgs, node: &str) -> Result<Telemetry> {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let health = health::HealthMetrics::register(&mut registry);
        let tls = tls_reload::TlsMetrics::register(&mut registry);
        let shared = Arc::new(Shared::new(registry, args.liveness_timeout));
        let bound = metrics::serve(args.metrics_addr, shared.clone())
            .await
            .with_context(|| format!("listen on --metrics-addr {}", args.metrics_addr))?;
        info!(node = %node, metrics = %bound, "twilld starting");
        if let Some(addr) = args.metrics_scrape_addr {
            let scrape = metrics::serve_scrape(addr, shared.clone())
                .await
                .with_context(|| format!("listen on --metrics-scrape-addr {addr}"))?;
            info!(metrics = %scrape, "serving /metrics for scraping");
        }
        Ok(Telemetry {
            metrics,
            health,
            tls,
            shared,
        })
    }
}

/// The kernel side: the netlink sockets, the underlay and this node's public IP.
struct Kernel {
    nl: Netlink,
    peer_set: PeerSet,
    ov: RtnlOverlay,
    under: Underlay,
    public_v4: Ipv4Addr,
}

impl Kernel {
    async fn open(args: &RunArgs) -> Result<Kernel> {
        let nl = Netlink::current()
            .context("open netlink socket")?
            .with_timeout(args.netlink_timeout);
        let peer_set = PeerSet::current()
            .context("open the nftables netlink socket")?
            .with_timeout(args.netlink_timeout);
        let ov = RtnlOverlay::new(nl.clone())
            .with_batch()
            .context("open the netlink batch socket")?;
        let sel = underlay::Selector::new(&args.iface, &args.iface_regex, args.iface_can_reach)?;
        let under = underlay::resolve(&nl, &sel, args.public_ip)
            .await
            .context("find the underlay interface and public IP")?;
        let IpAddr::V4(public_v4) = under.ip else {
            bail!(
                "public IP {} is IPv6: only an IPv4 underlay is supported (give --public-ip)",
                under.ip
            );
        };
        info!(iface = %under.name, index = under.index, mtu = under.mtu, public_ip = %under.ip, "underlay");
        Ok(Kernel {
            nl,
            peer_set,
            ov,
            under,
            public_v4,
        })
    }
}

/// What every start-up phase may use.
struct Startup {
    args: RunArgs,
    node: String,
    metrics: Metrics,
    shared: Arc<Shared>,
    signals: Signals,
}

impl Startup {
    /// The lease store; new etcd TLS files replace the clients of it and of all its clones.
    async fn open_store(&self, tls_metrics: tls_reload::TlsMetrics) -> Result<LeaseStore> {
        let store = LeaseStore::new(self.args.etcd.options())
            .await
            .context("etcd client")?
            .with_grace(self.args.lease_grace);
        let etcd = &self.args.etcd;
        tls_reload::spawn(
            tls_reload::TlsFiles {
                ca: etcd.etcd_cafile.clone(),
                cert: etcd.etcd_certfile.clone(),
                key: etcd.etcd_keyfile.clone(),
                interval: self.args.etcd_tls_reload_interval,
            },
            store.clone(),
            tls_metrics,
            self.shared.clone(),
        );
        Ok(store)
    }

    /// The network config (see [`net_config`]) that the underlay accepts. A refused one
    /// keeps twilld up and not ready until a signal (`None`): the node's data plane stays
    /// as it is, /readyz tells why, and a DaemonSet rollout stops here instead of
    /// crash-looping through the cluster.
    async fn network_config(
        &mut self,
        store: &LeaseStore,
        k: &Kernel,
    ) -> Result<Option<NetConfig>> {
        let file = self.args.net_conf.as_deref();
        let Some(cfg) = self
            .signals
            .unless(net_config(store, file, &self.metrics))
            .await
        else {
            return Ok(None);
        };
        // A Network overlapping the underlay's own subnet is refused here (issue 15 item 5).
        let cfg = match cfg? {
            Ok(c) => underlay_check::check(&k.nl, &k.under, c).await?,
            Err(r) => Err(r),
        };
        let cfg = cfg.and_then(|c| underlay_check::check_mtu(&k.under, self.args.mtu, c));
        let cfg = match cfg {
            Ok(c) => c,
            Err(refused) => {
                error!("{refused}");
                self.shared.set_ready(false, &refused);
                self.signals.recv().await;
                return Ok(None);
            }
        };
        let vxlan = cfg.backend.vxlan();
        info!(network = %cfg.network, subnet_len = cfg.subnet_len, vni = vxlan.vni, port = vxlan.port, "network config");
        let unsupported = cfg.unsupported_keys();
        if !unsupported.is_empty() {
            warn!(keys = %unsupported.join(", "), "the network config sets keys that this twill does not implement: they have no effect");
        }
        Ok(Some(cfg))
    }

    /// This node's lease, kept by a holder from now on, and the VTEP MAC it names. `None`:
    /// a signal came while waiting for it.
    async fn take_lease(
        &mut self,
        store: &LeaseStore,
        cfg: &NetConfig,
        k: &Kernel,
        side6: Option<v6::Side6>,
    ) -> Result<Option<(Arc<LeaseHolder>, Lease, Mac)>> {
        let vni = cfg.backend.vxlan().vni;
        let mac = vtep_mac(&k.ov, vni, &self.node).await?;
        let prefer = previous_subnet(&self.args, cfg.subnet_len);
        let mut attrs = LeaseAttrs::vxlan(&self.node, k.public_v4, vni, mac);
        if let Some(side) = side6 {
            // Dual-stack: the holder takes a v4+v6 pair key in one transaction.
            attrs = attrs.with_ipv6(side.public_ip, vni, side.mac);
        }
        // Never leave a subnet whose addresses pods here still hold (issue 14): the holder takes
        // that subnet only, and is blocked while another node has it.
        let data_dir = self.args.cni_data_dir.clone();
        let pin: Pin = Arc::new(move |subnet| pods_in(&data_dir, subnet));
        let mut holder = store.hold_pinned(cfg.clone(), attrs, self.args.lease_ttl, prefer, pin);
        let Some(lease) = self.wait_for_lease(&mut holder).await? else {
            return Ok(None);
        };
        let holder = Arc::new(holder);
        self.metrics.counted.set_holder(&holder);
        info!(subnet = %lease.subnet, "lease held");
        self.metrics.lease_blocked.set(0);
        if let Some(exp) = lease.expires {
            set_expiry(&self.metrics, exp);
        }
        Ok(Some((holder, lease, mac)))
    }

    /// Waits for the holder's lease. Meanwhile /readyz names why it is not held yet (e.g. a
    /// duplicate node name: the message names the other node's IP). `None`: a signal.
    async fn wait_for_lease(&mut self, holder: &mut LeaseHolder) -> Result<Option<Lease>> {
        self.shared.set_ready(false, "waiting for the lease");
        let mut waiting = holder.subscribe();
        loop {
            tokio::select! {
                l = holder.acquired() => return Ok(Some(l)),
                r = waiting.changed() => {
                    if r.is_err() { bail!("lease holder stopped") }
                    let st = waiting.borrow_and_update().clone();
                    self.metrics.lease_blocked.set(i64::from(st.blocked.is_some()));
                    let why = match (&st.blocked, &st.last_error) {
                        (Some(b), _) => format!("lease blocked: {b}"),
                        (None, Some(e)) => format!("waiting for the lease: {e}"),
                        (None, None) => "waiting for the lease".to_string(),
                    };
                    self.shared.set_ready(false, &why);
                }
                _ = self.signals.recv() => return Ok(None),
            }
        }
    }

    fn vxlan_spec(&self, under: &Underlay, cfg: &NetConfig, mac: Mac, lease: &Lease) -> VxlanSpec {
        let vxlan = cfg.backend.vxlan();
        VxlanSpec {
            vni: vxlan.vni,
            port: vxlan.port,
            underlay_index: under.index,
            local: under.ip,
            // --mtu, else Backend.MTU (checked against the underlay), else the underlay's − 50.
            mtu: self
                .args
                .mtu
                .or(vxlan.mtu)
                .unwrap_or_else(|| under.vxlan_mtu()),
            mac,
            address: lease.net_addr(),
        }
    }

    /// The daemon on its lease, before its device is set up.
    fn daemon(
        &self,
        ov: RtnlOverlay,
        peer_set: PeerSet,
        cfg: NetConfig,
        spec: VxlanSpec,
        own: Ipv4Net,
        health: tokio::sync::watch::Sender<health::Targets>,
    ) -> Daemon {
        Daemon {
            health,
            args: self.args.clone(),
            ov,
            metrics: self.metrics.clone(),
            shared: self.shared.clone(),
            cfg,
            spec,
            link: VxlanLink::default(),
            own,
            actual: Programmed::default(),
            need_dump: true,
            retry_at: None,
            programmed_once: false,
            nft: Nft::new(),
            peer_set,
            nft_members: None,
            conflicts: BTreeSet::new(),
            last_vxlan_dropped: 0,
            reject_log: RejectLog::default(),
            valid: ValidPeers::default(),
            want: Programmed::default(),
            underlay_name: String::new(),
            direct: Direct::default(),
            nft_direct: None,
            underlay_routes_changed: false,
            v6: None,
        }
    }

    /// The peer health prober and responder; `--health-interval 0`: none, and no report
    /// (the benchmark's reference).
    fn spawn_health(
        &self,
        targets: tokio::sync::watch::Receiver<health::Targets>,
        metrics: health::HealthMetrics,
        store: LeaseStore,
        public_ip: IpAddr,
    ) {
        let args = &self.args;
        if args.health_interval.is_zero() {
            info!("peer health disabled (--health-interval 0)");
            return;
        }
        health::spawn(
            health::HealthConfig {
                port: args.health_port,
                interval: args.health_interval,
                timeout: args.health_timeout,
                max_rate: args.health_max_rate,
                publish: args.health_publish,
                report_timeout: args.etcd.etcd_timeout,
                detail_max: args.health_detail_max,
            },
            targets,
            metrics,
            store,
            health::ReportContext {
                node: self.node.clone(),
                public_ip: public_ip.to_string(),
                shared: self.shared.clone(),
                cni_data_dir: args.cni_data_dir.clone(),
            },
        );
    }
}

impl Inputs {
    /// Waits for the next piece of work: the arms only record it (netlink events update the
    /// cache, which is cheap). `None`: SIGTERM or SIGINT.
    async fn next_work(&mut self, d: &mut Daemon) -> Result<Option<Work>> {
        loop {
            d.shared.heartbeat();
            let retry_at = d.retry_at;
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => futures::future::pending().await,
                }
            };
            let work = tokio::select! {
                ev = self.watch.next() => {
                    let Some(ev) = ev else { bail!("lease watch ended") };
                    debug!(?ev, "lease event");
                    let mut changes = LeaseChanges::default();
                    changes.note(&ev);
                    // Take every event already queued, then reconcile once.
                    while let Some(Some(ev)) = self.watch.next().now_or_never() {
                        debug!(?ev, "lease event");
                        changes.note(&ev);
                    }
                    Work::Leases(changes)
                }
                ev = self.monitor.next() => {
                    let Some(ev) = ev else { bail!("netlink monitor socket closed") };
                    let mut dirty = d.on_netlink(ev);
                    while let Some(ev) = self.monitor.try_next() {
                        dirty |= d.on_netlink(ev);
                    }
                    if !dirty { continue }
                    Work::Netlink
                }
                _ = self.resync.tick() => Work::Resync,
                _ = retry => Work::Retry,
                r = self.holder_rx.changed() => {
                    if r.is_err() { bail!("lease holder stopped") }
                    Work::Holder(Box::new(self.holder_rx.borrow_and_update().clone()))
                }
                _ = self.stats_tick.tick() => Work::Tick,
                name = self.signals.recv() => {
                    info!("{name}: exiting, the data plane stays in place");
                    return Ok(None);
                }
            };
            return Ok(Some(work));
        }
    }
}

/// The VTEP MAC: the existing device's (a restart keeps what peers have), else derived from
/// the node name (the same on every start, also after a reboot).
async fn vtep_mac(ov: &RtnlOverlay, vni: u32, node: &str) -> Result<Mac> {
    let existing = ov
        .get_vxlan(vni)
        .await
        .context("look for the VXLAN device")?;
    Ok(match &existing {
        Some(l) if l.vni == Some(vni) && !l.mac.is_zero() => l.mac,
        _ => Mac::derive(node),
    })
}

/// The subnet this node had: its subnet file's, else the one its pods' addresses are in
/// (/run is tmpfs; the allocator state survives a twilld restart and drops the pods of a
/// previous boot).
fn previous_subnet(args: &RunArgs, subnet_len: u8) -> Option<Ipv4Net> {
    SubnetFile::read(&args.subnet_file)
        .ok()
        .and_then(|f| match f.node_subnet() {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
        .or_else(|| allocator_subnet(&args.cni_data_dir, subnet_len))
}

/// The CNI plugin's allocators under `data_dir`: one directory per network name.
fn allocators(data_dir: &Path) -> Result<Vec<twill_ipam::alloc::Allocator>, String> {
    let dirs = match std::fs::read_dir(data_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {}: {e}", data_dir.display())),
    };
    let mut v = Vec::new();
    for d in dirs {
        let d = d.map_err(|e| format!("read {}: {e}", data_dir.display()))?;
        if d.file_type().is_ok_and(|t| t.is_dir()) {
            let name = d.file_name().to_string_lossy().into_owned();
            v.push(twill_ipam::alloc::Allocator::new(data_dir, &name));
        }
    }
    Ok(v)
}

/// Pod addresses inside `subnet` that the allocator state under `data_dir` holds (every
/// network's), read under the allocator's lock; an unreadable state is an error (the lease
/// holder counts it as in use). Blocks for the lock (a CNI ADD holds it for milliseconds).
fn pods_in(data_dir: &Path, subnet: Ipv4Net) -> std::result::Result<u64, String> {
    let mut n = 0;
    for a in allocators(data_dir)? {
        let list = a
            .list()
            .map_err(|e| format!("allocator state {}: {e}", a.dir().display()))?;
        n += list
            .iter()
            .filter(|r| matches!(r.ip, IpAddr::V4(ip) if subnet.contains(&ip)))
            .count() as u64;
    }
    Ok(n)
}

/// The /`subnet_len` subnet that most of the allocator's pod addresses are in, if any.
fn allocator_subnet(data_dir: &Path, subnet_len: u8) -> Option<Ipv4Net> {
    let mut count: BTreeMap<Ipv4Net, usize> = BTreeMap::new();
    for a in allocators(data_dir).ok()? {
        for r in a.list().ok()? {
            if let IpAddr::V4(ip) = r.ip
                && let Ok(n) = Ipv4Net::new(ip, subnet_len)
            {
                *count.entry(n.trunc()).or_default() += 1;
            }
        }
    }
    count.into_iter().max_by_key(|(_, c)| *c).map(|(n, _)| n)
}

fn set_expiry(m: &Metrics, at: SystemTime) {
    if let Ok(d) = at.duration_since(SystemTime::UNIX_EPOCH) {
        m.lease_expiry.set(d.as_secs_f64());
    }
}

/// The network config: etcd's; when etcd has none, `--net-conf` is written there. When both
/// exist, a file that differs compatibly is ignored (etcd wins, a warning says so) and an
/// incompatible one (another backend type/VNI/port, or a Network/SubnetLen under which
/// existing leases would be invalid) is refused: `Ok(Err(reason))`. Retries while etcd is
/// unreachable.
async fn net_config(
    store: &LeaseStore,
    file: Option<&Path>,
    m: &Metrics,
) -> Result<std::result::Result<NetConfig, String>> {
    let from_file = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("read --net-conf {}", p.display()))?;
            Some(
                NetConfig::from_json(&text)
                    .with_context(|| format!("parse --net-conf {}", p.display()))?,
            )
        }
        None => None,
    };
    let mut backoff = twill_ipam::store::Backoff::new(Duration::from_secs(5));
    loop {
        let got = match store.get_config().await {
            Ok(Some(etcd)) => match &from_file {
                Some(f) if f != &etcd => match store.list().await {
                    Ok((leases, _)) => {
                        let why = f.replacement_problems(Some(&etcd), &leases).reasons;
                        if why.is_empty() {
                            warn!(
                                key = %store.config_key(),
                                "--net-conf differs from etcd's config (compatibly): running with etcd's; change it with `twillctl network set`"
                            );
                            return Ok(Ok(etcd));
                        }
                        return Ok(Err(format!(
                            "--net-conf is incompatible with the network config in etcd ({}): {}",
                            store.config_key(),
                            why.join("; ")
                        )));
                    }
                    Err(e) => Err(e),
                },
                _ => return Ok(Ok(etcd)),
            },
            Ok(None) => match &from_file {
                Some(f) => match store.put_config(f, false).await {
                    Ok(()) => {
                        info!(key = %store.config_key(), "wrote --net-conf to etcd");
                        continue;
                    }
                    // Another node may have written it concurrently: read again.
                    Err(e) if !e.is_transient() => {
                        warn!(error = %e, "writing the network config to etcd failed; reading again");
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                None => {
                    warn!(
                        key = %store.config_key(),
                        "no network config in etcd and no --net-conf: waiting (`twillctl network set`)"
                    );
                    Ok(())
                }
            },
            Err(e) => Err(e),
        };
        if let Err(e) = got {
            m.counted
                .etcd_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !e.is_transient() {
                return Err(e).context("read the network config from etcd");
            }
            warn!(error = %e, "etcd unreachable; retrying");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// What writing the ops of a reconcile did.
struct Written {
    applied: u64,
    failed: usize,
    route_delete_failed: bool,
}

impl Daemon {
    /// Validates the listed leases, so that the node set-up writes nft's peer set with
    /// the peers in it (the first reconcile validates again and logs what it rejects).
    fn seed_peers(&mut self, watch: &LeaseWatch) {
        let v = self.validation();
        self.valid.rebuild(watch.state(), watch.invalid(), &v);
    }

    /// The rules a peer lease is checked against, with this node's subnet, IP and MAC.
    fn validation(&self) -> Validation {
        Validation::new(
            &self.cfg,
            Some(self.own),
            Some(self.spec.local),
            Some(self.spec.mac),
        )
    }

    /// The first reconcile (the watch has listed the leases), then the subnet file: the
    /// data plane is ready.
    async fn first_reconcile(&mut self, watch: &LeaseWatch, holder: &LeaseHolder) -> Result<()> {
        self.reconcile(watch, Cause::Start).await;
        self.write_subnet_file()?;
        self.programmed_once = true;
        self.update_ready(holder);
        info!(
            peers = self.metrics.peers.get(),
            entries = self.actual.len(),
            "data plane ready"
        );
        Ok(())
    }

    /// Does one piece of work. Lease events take the incremental reconcile; netlink events,
    /// the resync and retries the full one.
    async fn step(&mut self, work: Work, watch: &LeaseWatch, holder: &LeaseHolder) {
        match work {
            Work::Leases(changes) => self.reconcile_leases(watch, &changes).await,
            Work::Netlink => {
                if self.need_link_check()
                    && !self.ensure_or_retry("repairing the VXLAN device").await
                {
                    return;
                }
                self.reconcile(watch, Cause::Netlink).await;
            }
            Work::Resync => {
                self.need_dump = true;
                if self.ensure_or_retry("resync: node setup").await {
                    self.reconcile(watch, Cause::Resync).await;
                }
                self.read_vxlan_drops().await;
            }
            Work::Retry => {
                self.retry_at = None;
                self.need_dump = true;
                if self.ensure_or_retry("retry: node setup").await {
                    self.reconcile(watch, Cause::Resync).await;
                }
            }
            Work::Holder(st) => {
                if let Some(l) = &st.lease
                    && st.held
                    && l.subnet != self.own
                {
                    warn!(old = %self.own, new = %l.subnet, "lease re-acquired with another subnet: moving the node");
                    self.remove_old_gateway(self.own).await;
                    self.own = l.subnet;
                    self.spec.address = l.net_addr();
                    if self.ensure_or_retry("moving to the new subnet").await {
                        self.reconcile(watch, Cause::Leases).await;
                    }
                    if let Err(e) = self.write_subnet_file() {
                        error!(error = %format!("{e:#}"), "subnet file");
                    }
                }
                if let Some(l) = &st.lease
                    && st.held
                    && let (Some(v), Some(s6)) = (&mut self.v6, l.ipv6_subnet)
                    && v.own != s6
                {
                    warn!(old = %v.own, new = %s6, "lease re-acquired with another IPv6 subnet");
                    v.move_to(s6);
                    self.reconcile(watch, Cause::Leases).await;
                    if let Err(e) = self.write_subnet_file() {
                        error!(error = %format!("{e:#}"), "subnet file");
                    }
                }
                if let Some(l) = &st.lease
                    && let Some(exp) = l.expires
                {
                    set_expiry(&self.metrics, exp);
                }
                self.update_ready(holder);
            }
            Work::Tick => {
                self.update_ready(holder);
                if self.need_dump && self.retry_at.is_none() {
                    self.retry_at = Some(tokio::time::Instant::now());
                }
            }
        }
    }

    /// The one retry policy of the node setup: a failure is logged and [`Work::Retry`]
    /// comes in a second. Returns whether a reconcile can run: the VXLAN device is in
    /// place (a failed sysctl or nft write does not hold the peers' entries back).
    async fn ensure_or_retry(&mut self, what: &str) -> bool {
        match self.ensure_node().await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "{what} failed; retrying");
                self.retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                e.downcast_ref::<DeviceFailed>().is_none()
            }
        }
    }

    /// The VXLAN device, forwarding sysctls, nftables: compared first, changed only if wrong.
    async fn ensure_node(&mut self) -> Result<()> {
        let (link, outcome) = self
            .ov
            .ensure_vxlan(&self.spec)
            .await
            .map_err(|e| anyhow::Error::new(e).context(DeviceFailed))
            .with_context(|| format!("ensure VXLAN device {}", self.spec.name()))?;
        match &outcome {
            EnsureOutcome::Adopted => debug!(link = %link.name, "VXLAN device adopted"),
            EnsureOutcome::Created => {
                self.metrics.vxlan_recreated.inc();
                info!(link = %link.name, index = link.index, mtu = link.mtu, mac = %link.mac, "VXLAN device created");
            }
            EnsureOutcome::Recreated { reason } => {
                self.metrics.vxlan_recreated.inc();
                warn!(link = %link.name, %reason, "VXLAN device recreated");
            }
        }
        if outcome != EnsureOutcome::Adopted || link.index != self.link.index {
            self.need_dump = true;
        }
        self.link = link;
        sysctl::enable_forwarding(&self.spec.name()).context("enable forwarding")?;
        let nft_cfg = NftConfig {
            network: self.cfg.network,
            node_subnet: self.own,
            masquerade: self.args.ip_masq,
            vxlan_port: self.cfg.backend.vxlan().port,
        };
        let nft = self.nft.clone();
        // A rewrite keeps the members known so far, else the validated peers' (seeded
        // before the first one: see `seed_peers`).
        let members = self
            .nft_members
            .clone()
            .unwrap_or_else(|| self.valid.public_v4s().collect());
        let written = members.clone();
        let direct = self.direct_routing().then(|| DirectFilter {
            underlay: self.underlay_name.clone(),
        });
        let direct_members = self.direct.subnets.clone();
        let direct_written = direct_members.clone();
        let out = tokio::task::spawn_blocking(move || {
            nft.ensure_with(&nft_cfg, direct.as_ref(), &members, &direct_members)
        })
        .await
        .context("nft task")?;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                self.metrics.nft_errors.inc();
                self.nft_members = None;
                self.nft_direct = None;
                return Err(e).context("nftables");
            }
        };
        if out == NftOutcome::Applied {
            info!(table = "ip twill", "nftables table written");
            self.nft_members = Some(written);
            self.nft_direct = Some(direct_written);
            self.last_vxlan_dropped = 0;
        }
        // The IPv6 side after the IPv4 one: its failure never holds the IPv4 entries back.
        self.ensure_v6().await
    }

    /// Runs a blocking nft call off the runtime; a failure is logged, counted and makes the
    /// peer set unknown (rewritten in full by the next reconcile).
    async fn nft_call<T: Send + 'static>(
        &mut self,
        what: &str,
        f: impl FnOnce(&Nft) -> twill_dataplane::Result<T> + Send + 'static,
    ) -> Option<T> {
        let nft = self.nft.clone();
        match tokio::task::spawn_blocking(move || f(&nft)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.metrics.nft_errors.inc();
                self.nft_members = None;
                self.nft_direct = None;
                warn!(error = %e, "{what} failed; will retry");
                None
            }
            Err(e) => {
                self.metrics.nft_errors.inc();
                self.nft_members = None;
                self.nft_direct = None;
                warn!(error = %e, "{what}: nft task failed; will retry");
                None
            }
        }
    }

    /// A failed peer set change: logged, counted, and the members become unknown (the
    /// next reconcile rewrites the set in full through nft).
    fn peer_set_failed(&mut self, what: &str, e: &twill_dataplane::Error) {
        self.metrics.nft_errors.inc();
        self.nft_members = None;
        warn!(error = %e, "{what} failed; will retry");
    }

    /// Adds the drops counted by nft since the last read to the drop metric.
    async fn read_vxlan_drops(&mut self) {
        let Some(n) = self
            .nft_call("read the VXLAN drop counter", |n| n.dropped_packets())
            .await
        else {
            return;
        };
        // The counter restarts at 0 with the table.
        let delta = if n >= self.last_vxlan_dropped {
            n - self.last_vxlan_dropped
        } else {
            n
        };
        self.metrics.vxlan_dropped.inc_by(delta);
        self.last_vxlan_dropped = n;
    }

    /// Whether `Backend.DirectRouting` is on.
    fn direct_routing(&self) -> bool {
        self.cfg.backend.vxlan().direct_routing
    }

    /// Decides again which peers are routed directly: every peer after a full validation
    /// or when `all` (an underlay route changed, the resync), else only the peers that
    /// `delta` added. Returns whether the decision changed.
    async fn decide_routes(&mut self, delta: &PeerDelta, all: bool) -> bool {
        if !self.direct_routing() {
            return false;
        }
        let dev = self.spec.underlay_index;
        let new = if all || delta.full || self.direct.dev != dev {
            let peers: Vec<Peer> = self.valid.peers().values().copied().collect();
            decide_direct(&self.ov, &peers, dev, &self.direct).await
        } else {
            let mut d = self.direct.clone();
            for p in &delta.removed {
                d.subnets.remove(&p.subnet);
            }
            let added = decide_direct(&self.ov, &delta.added, dev, &Direct::default()).await;
            d.subnets.extend(added.subnets);
            d
        };
        if new == self.direct {
            return false;
        }
        let (to_direct, to_vxlan): (Vec<_>, Vec<_>) = {
            let a: Vec<_> = new.subnets.difference(&self.direct.subnets).collect();
            let b: Vec<_> = self.direct.subnets.difference(&new.subnets).collect();
            (a, b)
        };
        info!(
            direct = new.subnets.len(),
            ?to_direct,
            ?to_vxlan,
            "route modes changed (DirectRouting)"
        );
        self.direct = new;
        true
    }

    /// Makes nft's direct-peer set the subnets of the direct peers, when it is not known
    /// to be (one `nft` transaction: flush and add together).
    async fn write_direct_set(&mut self) {
        if !self.direct_routing() || self.nft_direct.as_ref() == Some(&self.direct.subnets) {
            return;
        }
        let nets = self.direct.subnets.clone();
        let members = nets.clone();
        if self
            .nft_call("update the direct-path filter's peers", move |n| {
                n.set_direct_peers(&nets)
            })
            .await
            .is_some()
        {
            self.nft_direct = Some(members);
        }
    }

    fn need_link_check(&self) -> bool {
        self.need_dump
    }

    /// Updates the cache from one event; true if it differs from what we expect (something
    /// to repair) or a full check is needed.
    fn on_netlink(&mut self, ev: MonitorEvent) -> bool {
        let link = self.link.index;
        match ev {
            MonitorEvent::Overrun => {
                self.metrics.netlink_overruns.inc();
                warn!("netlink events lost (overrun): dumping again");
                self.need_dump = true;
                true
            }
            MonitorEvent::LinkGone { index, .. } if index == link => {
                warn!(link = %self.link.name, "VXLAN device deleted: recreating");
                self.need_dump = true;
                true
            }
            MonitorEvent::LinkGone { index, .. } | MonitorEvent::Link { index, .. }
                if self.v6.as_ref().is_some_and(|v| v.link.index == index) =>
            {
                if let Some(v) = &mut self.v6 {
                    v.need_ensure = true;
                }
                true
            }
            // The IPv6 device's entries: the next reconcile dumps it again.
            MonitorEvent::Changed6 { link: l }
            | MonitorEvent::FdbUp { link: l, .. }
            | MonitorEvent::FdbGone { link: l, .. }
                if self.v6.as_ref().is_some_and(|v| v.link.index == l) =>
            {
                true
            }
            MonitorEvent::Link { index, .. } if index == link => {
                // Cheap to check (one get); catches a device set down or changed by hand.
                self.need_dump = true;
                true
            }
            MonitorEvent::NeighUp { link: l, neigh } if l == link => {
                self.cache_new(self.actual.neighs.contains(&neigh), Op::ReplaceNeigh(neigh))
            }
            MonitorEvent::NeighGone { link: l, ip } if l == link => {
                let before = self.actual.neighs.len();
                self.actual.neighs.retain(|n| n.ip != ip);
                before != self.actual.neighs.len()
            }
            MonitorEvent::FdbUp { link: l, fdb } if l == link => self.actual.fdbs.insert(fdb),
            MonitorEvent::FdbGone { link: l, fdb } if l == link => self.actual.fdbs.remove(&fdb),
            MonitorEvent::RouteUp { link: l, route } if l == link => {
                self.cache_new(self.actual.routes.contains(&route), Op::ReplaceRoute(route))
            }
            MonitorEvent::RouteGone { link: l, route } if l == link => {
                self.actual.routes.remove(&route)
            }
            // twill's routes on other devices: the direct ones.
            MonitorEvent::RouteUp { link: dev, route } => {
                let r = DirectRoute {
                    dst: route.dst,
                    via: route.via,
                    dev,
                };
                self.cache_new(self.actual.direct.contains(&r), Op::ReplaceDirect(r))
            }
            MonitorEvent::RouteGone { link: dev, route } => {
                self.actual.direct.remove(&DirectRoute {
                    dst: route.dst,
                    via: route.via,
                    dev,
                })
            }
            // An underlay route changed: whether a peer is on the same segment may have too
            // (the full reconcile looks every peer up again).
            MonitorEvent::ForeignRoute { .. } if self.direct_routing() => {
                self.underlay_routes_changed = true;
                true
            }
            _ => false,
        }
    }

    /// An entry that an event reports: put in the cache as `op` writes it unless `cached`;
    /// true if it was not cached.
    fn cache_new(&mut self, cached: bool, op: Op) -> bool {
        if !cached {
            op.apply_to(&mut self.actual);
        }
        !cached
    }

    /// Diff the leases against the programmed entries and apply the ops.
    async fn reconcile(&mut self, watch: &LeaseWatch, cause: Cause) {
        self.reconcile_with(watch, cause, None).await
    }

    /// After lease events: only the leases in `changes` are validated and diffed again,
    /// unless a conflict between leases is involved (see [`ValidPeers`]).
    async fn reconcile_leases(&mut self, watch: &LeaseWatch, changes: &LeaseChanges) {
        self.reconcile_with(watch, Cause::Leases, Some(changes))
            .await
    }

    async fn reconcile_with(
        &mut self,
        watch: &LeaseWatch,
        cause: Cause,
        changes: Option<&LeaseChanges>,
    ) {
        let t0 = Instant::now();
        let dumped = self.need_dump;
        if !self.refresh_actual().await {
            return;
        }
        let (delta, mut diff_all) = self.validate(watch, cause, changes);
        let peer_count = self.valid.peers().len();
        // Every peer is looked up again when the underlay's routes changed, on the resync
        // and at start; otherwise only the peers that came.
        let look_up_all =
            self.underlay_routes_changed || matches!(cause, Cause::Start | Cause::Resync);
        self.underlay_routes_changed = false;
        let modes_changed = self.decide_routes(&delta, look_up_all).await;
        // Peers that the lease events did not touch may have switched: diff them all.
        diff_all |= modes_changed && look_up_all;
        if delta.full || modes_changed {
            let peers: Vec<_> = self.valid.peers().values().copied().collect();
            self.want = desired_with(&peers, &self.direct);
        } else {
            patch_desired(&mut self.want, &delta, &self.direct);
        }
        // Inbound: a direct peer's pods are accepted on the underlay before its route is
        // written (the filter concerns its packets to us, not our route to it).
        self.write_direct_set().await;
        let touched: Vec<Peer> = delta.removed.iter().chain(&delta.added).copied().collect();
        let t_valid = t0.elapsed();
        self.admit_joining(&touched, diff_all).await;
        let t_set = t0.elapsed();
        let (ops, mut conflicts) = self.ops(diff_all, &touched);
        let mut route_delete_failed = false;
        if !ops.is_empty() {
            let t_diff = t0.elapsed();
            let written = self.write_ops(&ops, &mut conflicts).await;
            let t_written = t0.elapsed();
            route_delete_failed = written.route_delete_failed;
            // A switch of route modes (an underlay route changed) is not drift.
            if matches!(cause, Cause::Netlink | Cause::Resync) && !modes_changed {
                self.metrics.drift_repaired.inc_by(written.applied);
                info!(?cause, repaired = written.applied, "drift repaired");
            } else {
                info!(
                    ?cause,
                    ops = ops.len(),
                    failed = written.failed,
                    peers = peer_count,
                    incremental = !diff_all,
                    elapsed_us = t0.elapsed().as_micros() as u64,
                    // Phases, from the start: validated, peer set updated, diffed, written.
                    validated_us = t_valid.as_micros() as u64,
                    peer_set_us = t_set.as_micros() as u64,
                    diffed_us = t_diff.as_micros() as u64,
                    written_us = t_written.as_micros() as u64,
                    "reconciled"
                );
            }
            for op in ops.iter().take(20) {
                debug!(%op, "applied");
            }
        }
        self.record_conflicts(conflicts, diff_all, &touched);
        if !route_delete_failed {
            self.drop_leaving(&delta, diff_all).await;
            self.rewrite_peer_set(diff_all).await;
        }
        // The prober learns of the peers after their entries are written (its work never
        // delays a join's netlink writes).
        self.update_health_targets(watch, &delta, changes);
        self.set_entry_metrics(peer_count);
        if delta.full || dumped {
            memory::release_freed();
        }
        if self.v6.is_some() {
            self.reconcile_v6(watch).await;
        }
        self.metrics.reconciles.inc();
        self.metrics
            .reconcile_seconds
            .observe(t0.elapsed().as_secs_f64());
    }

    /// A fresh dump when one is needed; false if it failed (no reconcile without one).
    async fn refresh_actual(&mut self) -> bool {
        if !self.need_dump {
            return true;
        }
        match self.ov.dump(self.link.index).await {
            Ok(p) => {
                self.actual = p;
                self.need_dump = false;
                true
            }
            Err(e) => {
                warn!(error = %e, "netlink dump failed; will retry");
                false
            }
        }
    }

    /// Validates the leases into `valid`; logs new rejections and sets their metric.
    /// Returns what changed and whether everything is to be diffed.
    fn validate(
        &mut self,
        watch: &LeaseWatch,
        cause: Cause,
        changes: Option<&LeaseChanges>,
    ) -> (PeerDelta, bool) {
        let v = self.validation();
        let (state, invalid) = (watch.state(), watch.invalid());
        // Lease events diff only what they touched; netlink events and the resync diff
        // everything (drift can be anywhere).
        let (delta, diff_all) = match (cause, changes) {
            (Cause::Leases, Some(ch)) => {
                let d = self.valid.update(state, invalid, &v, ch);
                let all = d.full;
                (d, all)
            }
            (Cause::Netlink, _) => (
                self.valid
                    .update(state, invalid, &v, &LeaseChanges::default()),
                true,
            ),
            _ => (self.valid.rebuild(state, invalid, &v), true),
        };
        let skipped: Vec<reconcile::Skipped> = self.valid.skipped().cloned().collect();
        for s in self.reject_log.new_rejections(&skipped) {
            warn!(key = %s.key, reason = %s.reason, detail = %s.detail, "lease rejected");
        }
        self.metrics.set_rejected(
            rejected_counts(&skipped)
                .into_iter()
                .map(|(r, n)| (r.as_str(), n)),
        );
        (delta, diff_all)
    }

    /// A joining peer is accepted (its IP in nft's peer set) before its entries exist. Over
    /// netlink, without an `nft` process: a join costs one batch.
    async fn admit_joining(&mut self, touched: &[Peer], diff_all: bool) {
        let valid = &self.valid;
        let joining: BTreeSet<Ipv4Addr> = match &self.nft_members {
            Some(m) if !diff_all => touched
                .iter()
                .filter_map(Peer::public_v4)
                .filter(|ip| valid.has_public_ip(*ip) && !m.contains(ip))
                .collect(),
            Some(m) => valid.public_v4s().filter(|ip| !m.contains(ip)).collect(),
            None => valid.public_v4s().collect(),
        };
        if joining.is_empty() {
            return;
        }
        match self.peer_set.add(&joining).await {
            Ok(()) => {
                if let Some(m) = &mut self.nft_members {
                    m.extend(joining);
                }
            }
            Err(e) => self.peer_set_failed("add peers to the VXLAN filter", &e),
        }
    }

    /// The ops from the programmed entries to the wanted ones (the touched peers' only,
    /// unless `diff_all`), and apart from them the routes not written, with why.
    fn ops(&self, diff_all: bool, touched: &[Peer]) -> (Vec<Op>, BTreeMap<Ipv4Net, String>) {
        let mut ops = if diff_all {
            diff(&self.want, &self.actual)
        } else {
            diff_touched(&self.want, &self.actual, touched)
        };
        // Never write a route over someone else's (connected, default, cni0, host route).
        let mut conflicts: BTreeMap<Ipv4Net, String> = BTreeMap::new();
        ops.retain(|op| {
            let dst = match op {
                Op::ReplaceRoute(r) => r.dst,
                Op::ReplaceDirect(r) => r.dst,
                _ => return true,
            };
            if self.actual.foreign_routes.contains(&dst) {
                conflicts.insert(
                    dst,
                    "the last dump has a route for it that is not twill's".into(),
                );
                return false;
            }
            true
        });
        (ops, conflicts)
    }

    /// Writes `ops` and updates the cache by the ones that succeeded. A route refused as a
    /// conflict goes to `conflicts`; any other failure asks for a dump.
    async fn write_ops(
        &mut self,
        ops: &[Op],
        conflicts: &mut BTreeMap<Ipv4Net, String>,
    ) -> Written {
        let failed = self.ov.apply_ops(self.link.index, ops, PARALLEL_OPS).await;
        let failed_ops: Vec<Op> = failed.iter().map(|(o, _)| *o).collect();
        for op in ops {
            if !failed_ops.contains(op) {
                op.apply_to(&mut self.actual);
            }
        }
        let mut errors = 0u64;
        let mut route_delete_failed = false;
        for (op, e) in &failed {
            match (op, e) {
                (Op::ReplaceRoute(Route { dst, .. }), twill_dataplane::Error::Conflict(why))
                | (
                    Op::ReplaceDirect(DirectRoute { dst, .. }),
                    twill_dataplane::Error::Conflict(why),
                ) => {
                    conflicts.insert(*dst, why.clone());
                    continue;
                }
                _ => {}
            }
            route_delete_failed |= matches!(op, Op::DeleteRoute(_) | Op::DeleteDirect(_));
            errors += 1;
            warn!(%op, error = %e, "netlink write failed; will retry");
        }
        if errors > 0 {
            self.need_dump = true;
            self.metrics.op_errors.inc_by(errors);
        }
        let applied = (ops.len() - failed.len()) as u64;
        self.metrics.ops_applied.inc_by(applied);
        Written {
            applied,
            failed: failed.len(),
            route_delete_failed,
        }
    }

    /// Logs each new route conflict once and keeps them for the metric.
    fn record_conflicts(
        &mut self,
        mut conflicts: BTreeMap<Ipv4Net, String>,
        diff_all: bool,
        touched: &[Peer],
    ) {
        for (dst, why) in &conflicts {
            if !self.conflicts.contains(dst) {
                warn!(subnet = %dst, reason = %why, "peer route not programmed: the main table routes this subnet elsewhere and twill never replaces a route it did not make (logged once)");
            }
        }
        if !diff_all {
            // The other peers' conflicts stand: only the touched routes were looked at.
            let mut kept = std::mem::take(&mut self.conflicts);
            for p in touched {
                kept.remove(&p.subnet.trunc());
            }
            conflicts.extend(kept.into_iter().map(|d| (d, String::new())));
        }
        self.conflicts = conflicts.into_keys().collect();
        self.metrics
            .route_conflicts
            .set(self.conflicts.len() as i64);
    }

    /// A leaving peer is dropped from the set after its route went: by element over
    /// netlink when the members are known, else the whole set is rewritten through nft
    /// (flush and add in one transaction, so the members that stay are never missing).
    async fn drop_leaving(&mut self, delta: &PeerDelta, diff_all: bool) {
        let Some(m) = &self.nft_members else { return };
        let valid = &self.valid;
        let (leaving, missing): (BTreeSet<Ipv4Addr>, bool) = if diff_all {
            (
                m.iter()
                    .copied()
                    .filter(|ip| !valid.has_public_ip(*ip))
                    .collect(),
                valid.public_v4s().any(|ip| !m.contains(&ip)),
            )
        } else {
            (
                delta
                    .removed
                    .iter()
                    .filter_map(Peer::public_v4)
                    .filter(|ip| m.contains(ip) && !valid.has_public_ip(*ip))
                    .collect(),
                delta
                    .added
                    .iter()
                    .filter_map(Peer::public_v4)
                    .any(|ip| !m.contains(&ip)),
            )
        };
        if missing {
            // A join whose add failed: the full rewrite comes next.
            self.nft_members = None;
        } else if !leaving.is_empty() {
            match self.peer_set.delete(&leaving).await {
                Ok(()) => {
                    if let Some(m) = &mut self.nft_members {
                        m.retain(|ip| !leaving.contains(ip));
                    }
                }
                Err(e) => self.peer_set_failed("drop peers from the VXLAN filter", &e),
            }
        }
    }

    /// Rewrites nft's peer set in full when its members are not known, or (after a full
    /// diff) are not the valid peers' public IPs.
    async fn rewrite_peer_set(&mut self, diff_all: bool) {
        let rewrite = match &self.nft_members {
            None => true,
            Some(m) => diff_all && !m.iter().copied().eq(self.valid.public_v4s()),
        };
        if !rewrite {
            return;
        }
        let ips: BTreeSet<Ipv4Addr> = self.valid.public_v4s().collect();
        let members = ips.clone();
        if self
            .nft_call("update the VXLAN filter's peers", move |n| {
                n.set_peers(&ips)
            })
            .await
            .is_some()
        {
            self.nft_members = Some(members);
        }
    }

    fn set_entry_metrics(&self, peer_count: usize) {
        self.metrics.peers.set(peer_count as i64);
        // VXLAN and direct routes alike (a conflict blocks either kind).
        let routes_expected =
            (self.want.routes.len() + self.want.direct.len()).saturating_sub(self.conflicts.len());
        self.metrics.routes_expected.set(routes_expected as i64);
        self.metrics.fdb_expected.set(self.want.fdbs.len() as i64);
        self.metrics
            .neighs_expected
            .set(self.want.neighs.len() as i64);
        self.metrics
            .routes
            .set((self.actual.routes.len() + self.actual.direct.len()) as i64);
        self.metrics.fdb.set(self.actual.fdbs.len() as i64);
        self.metrics.neighs.set(self.actual.neighs.len() as i64);
    }

    /// The health prober's targets: rebuilt after a full validation, patched by the peers
    /// that came and went (and the node names of changed leases) otherwise.
    fn update_health_targets(
        &self,
        watch: &LeaseWatch,
        delta: &PeerDelta,
        changes: Option<&LeaseChanges>,
    ) {
        let node = |s: &Ipv4Net| {
            watch
                .state()
                .get(s)
                .map(|l| l.attrs.node_name.clone())
                .unwrap_or_default()
        };
        if delta.full {
            let targets = health::Targets {
                own: Some(self.own),
                peers: self
                    .valid
                    .peers()
                    .keys()
                    .map(|s| health::Target {
                        subnet: *s,
                        node: node(s),
                    })
                    .collect(),
            };
            self.health.send_if_modified(|t| {
                let changed = *t != targets;
                if changed {
                    *t = targets;
                }
                changed
            });
            return;
        }
        let renamed = changes.map(|c| &c.subnets).into_iter().flatten();
        self.health.send_if_modified(|t| {
            let mut changed = false;
            for p in &delta.removed {
                if let Ok(i) = t.peers.binary_search_by(|x| x.subnet.cmp(&p.subnet)) {
                    t.peers.remove(i);
                    changed = true;
                }
            }
            for p in &delta.added {
                if let Err(i) = t.peers.binary_search_by(|x| x.subnet.cmp(&p.subnet)) {
                    t.peers.insert(
                        i,
                        health::Target {
                            subnet: p.subnet,
                            node: node(&p.subnet),
                        },
                    );
                    changed = true;
                }
            }
            for s in renamed {
                if let Ok(i) = t.peers.binary_search_by(|x| x.subnet.cmp(s)) {
                    let n = node(s);
                    if t.peers[i].node != n {
                        t.peers[i].node = n;
                        changed = true;
                    }
                }
            }
            changed
        });
    }

    /// After a move: the old subnet's gateway address (on the bridge, put there by the CNI
    /// plugin) goes, or its connected route would keep the old subnet on this node and hide
    /// the node that holds it now (twill's peer route would be refused as a conflict). Only
    /// that exact address and prefix is removed, from whichever link has it; a failure is
    /// logged (an operator can `ip addr del` it) and changes nothing else.
    async fn remove_old_gateway(&self, old: Ipv4Net) {
        let gw = match twill_ipam::subnet_file::gateway_of(IpNet::V4(old)) {
            IpNet::V4(n) => n,
            IpNet::V6(_) => return,
        };
        match self.ov.remove_address(gw).await {
            Ok(links) if links.is_empty() => {}
            Ok(links) => {
                info!(address = %gw, ?links, "removed the old subnet's gateway address")
            }
            Err(e) => {
                warn!(address = %gw, error = %e, "could not remove the old subnet's gateway address; remove it by hand (ip addr del)")
            }
        }
    }

    fn write_subnet_file(&self) -> Result<()> {
        let mut f = SubnetFile::for_node_subnet(
            IpNet::V4(self.cfg.network),
            IpNet::V4(self.own),
            self.spec.mtu,
            self.args.ip_masq,
        );
        if let Some((network, own, mtu)) = self.v6_subnet_file() {
            f = f.with_ipv6(network, own);
            f.mtu = mtu;
        }
        if SubnetFile::read(&self.args.subnet_file).ok().as_ref() == Some(&f) {
            return Ok(());
        }
        if let Some(dir) = self.args.subnet_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        f.write_atomic(&self.args.subnet_file)
            .with_context(|| format!("write subnet file {}", self.args.subnet_file.display()))?;
        info!(path = %self.args.subnet_file.display(), subnet = %self.own, ipv6_subnet = ?f.ipv6_subnet, mtu = f.mtu, "subnet file written");
        Ok(())
    }

    fn update_ready(&self, holder: &LeaseHolder) {
        let st = holder.state();
        let ready = st.held && self.programmed_once;
        self.metrics
            .lease_blocked
            .set(i64::from(st.blocked.is_some()));
        let why = if let Some(b) = &st.blocked {
            // The data plane stays as it is (own subnet, cni0's route, peers) until it moves.
            format!("lease blocked: {b}")
        } else if !st.held {
            match &st.last_error {
                Some(e) => format!("lease not held: {e}"),
                None => "lease not held".to_string(),
            }
        } else if !self.programmed_once {
            "data plane not programmed yet".to_string()
        } else {
            String::new()
        };
        self.shared.set_ready(ready, &why);
        self.metrics.ready.set(i64::from(ready));
    }
}
