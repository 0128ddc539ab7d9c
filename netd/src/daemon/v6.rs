//! The IPv6 side of a dual-stack node (`EnableIPv6`): `twill-v6.<VNI>`, its peers' entries,
//! `net.ipv6.conf.all.forwarding` and `table ip6 twill`. Set up with the IPv4 device (in
//! `ensure_node`) and reconciled after each IPv4 reconcile, in full (one dump of the IPv6
//! device per reconcile); an IPv4-only config never gets here.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv6Addr;

use anyhow::{Context, Result, anyhow};
use ipnet::{IpNet, Ipv6Net};
use tracing::{debug, info, warn};
use twill_dataplane::nft::Nft6Config;
use twill_dataplane::overlay::underlay::Underlay;
use twill_dataplane::overlay::v6::{Programmed6, Vxlan6Spec, diff6};
use twill_dataplane::overlay::{EnsureOutcome, Mac, RtnlOverlay, VxlanLink, sysctl};
use twill_dataplane::{Error as DpError, Netlink};
use twill_ipam::lease::Lease;
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::LeaseWatch;

use super::Daemon;
use super::reconcile6::{Peer6, Skipped6, Validation6, desired6, peers6, public_ipv6s};
use crate::cli::RunArgs;

/// This node's IPv6 side before its lease: the address and the VTEP MAC it announces.
#[derive(Clone, Copy, Debug)]
pub(super) struct Side6 {
    pub public_ip: Ipv6Addr,
    pub mac: Mac,
}

/// The IPv6 state of the daemon.
pub(super) struct V6 {
    pub spec: Vxlan6Spec,
    pub link: VxlanLink,
    pub network: Ipv6Net,
    pub own: Ipv6Net,
    pub actual: Programmed6,
    pub peers: Vec<Peer6>,
    pub skipped: Vec<Skipped6>,
    /// Rejections already logged (each is logged once).
    logged: HashSet<(String, String)>,
    /// The ip6 table as last written (config and members); `None`: write it.
    nft_written: Option<(Nft6Config, BTreeSet<Ipv6Addr>)>,
    /// The device needs a check (a link event on it).
    pub need_ensure: bool,
}

/// Whether `ip` can be the node's PublicIPv6 by default: global unicast (ULA included),
/// not link-local, loopback, multicast or unspecified.
fn usable_v6(ip: &Ipv6Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unspecified()
        || (ip.segments()[0] & 0xffc0) == 0xfe80)
}

/// `--public-ipv6`, else the first usable IPv6 address of the underlay; and the IPv6 VTEP
/// MAC: the existing `twill-v6.<VNI>`'s, else derived from the node name (stable, and not
/// the IPv4 device's).
pub(super) async fn side6(
    args: &RunArgs,
    nl: &Netlink,
    ov: &RtnlOverlay,
    under: &Underlay,
    vni: u32,
    node: &str,
) -> Result<Side6> {
    let public_ip = match args.public_ipv6 {
        Some(ip) => ip,
        None => nl
            .link_addresses(under.index)
            .await
            .context("list the underlay's addresses")?
            .iter()
            .filter_map(
                |m| match twill_dataplane::netlink::parse::address(m).own() {
                    Some(IpNet::V6(n)) if usable_v6(&n.addr()) => Some(n.addr()),
                    _ => None,
                },
            )
            .next()
            .ok_or_else(|| {
                anyhow!(
                    "EnableIPv6 is true but the underlay {} has no global IPv6 address: \
                     give --public-ipv6 (TWILLD_PUBLIC_IPV6)",
                    under.name
                )
            })?,
    };
    if !usable_v6(&public_ip) {
        return Err(anyhow!(
            "--public-ipv6 {public_ip} is not a global unicast IPv6 address"
        ));
    }
    let existing = ov
        .get_vxlan6(vni)
        .await
        .context("look for the IPv6 VXLAN device")?;
    let mac = match &existing {
        Some(l) if l.vni == Some(vni) && !l.mac.is_zero() => l.mac,
        _ => Mac::derive(&format!("{node}/ipv6")),
    };
    Ok(Side6 { public_ip, mac })
}

impl V6 {
    /// The IPv6 state of a node on `lease`; `None` (logged) when the lease has no IPv6
    /// subnet.
    pub(super) fn new(
        cfg: &NetConfig,
        args: &RunArgs,
        under: &Underlay,
        side: Side6,
        lease: &Lease,
    ) -> Option<V6> {
        let (Some(own), Some(network)) = (lease.ipv6_subnet, cfg.ipv6_network) else {
            warn!(subnet = %lease.subnet, "EnableIPv6 is true but the lease has no IPv6 subnet: IPv4 only");
            return None;
        };
        let vx = cfg.backend.vxlan();
        Some(V6 {
            spec: Vxlan6Spec {
                vni: vx.vni,
                port: vx.port,
                underlay_index: under.index,
                local: side.public_ip,
                mtu: args.mtu.unwrap_or_else(|| {
                    under
                        .mtu
                        .saturating_sub(twill_dataplane::overlay::VXLAN_OVERHEAD_V6)
                }),
                mac: side.mac,
                address: own.network(),
            },
            link: VxlanLink::default(),
            network,
            own,
            actual: Programmed6::default(),
            peers: Vec::new(),
            skipped: Vec::new(),
            logged: HashSet::new(),
            nft_written: None,
            need_ensure: true,
        })
    }

    /// Moves to the IPv6 subnet `own` (the lease was re-acquired with another one).
    pub(super) fn move_to(&mut self, own: Ipv6Net) {
        self.own = own;
        self.spec.address = own.network();
        self.nft_written = None;
        self.need_ensure = true;
    }

    fn validation(&self, cfg: &NetConfig) -> Validation6 {
        Validation6 {
            network: self.network,
            subnet_len: cfg.ipv6_subnet_len.unwrap_or(64),
            subnet_min: cfg.ipv6_subnet_min.unwrap_or(Ipv6Addr::UNSPECIFIED),
            subnet_max: cfg.ipv6_subnet_max.unwrap_or(Ipv6Addr::from(u128::MAX)),
            vni: cfg.backend.vxlan().vni,
            own_subnet: self.own,
            own_public_ip: self.spec.local,
            own_vtep_mac: self.spec.mac,
        }
    }
}

impl Daemon {
    /// The IPv6 device, IPv6 forwarding and `table ip6 twill`; nothing without IPv6.
    pub(super) async fn ensure_v6(&mut self) -> Result<()> {
        let Some(v6) = &mut self.v6 else {
            return Ok(());
        };
        let (link, outcome) = self
            .ov
            .ensure_vxlan6(&v6.spec)
            .await
            .with_context(|| format!("ensure IPv6 VXLAN device {}", v6.spec.name()))?;
        match &outcome {
            EnsureOutcome::Adopted => debug!(link = %link.name, "IPv6 VXLAN device adopted"),
            EnsureOutcome::Created => {
                info!(link = %link.name, index = link.index, mtu = link.mtu, mac = %link.mac, local = %v6.spec.local, "IPv6 VXLAN device created")
            }
            EnsureOutcome::Recreated { reason } => {
                warn!(link = %link.name, %reason, "IPv6 VXLAN device recreated")
            }
        }
        v6.link = link;
        v6.need_ensure = false;
        sysctl::enable_forwarding6().context("enable IPv6 forwarding")?;
        self.write_nft6().await
    }

    /// Writes `table ip6 twill` when its config or members are not the ones last written.
    async fn write_nft6(&mut self) -> Result<()> {
        let Some(v6) = &mut self.v6 else {
            return Ok(());
        };
        let cfg = Nft6Config {
            network: v6.network,
            node_subnet: v6.own,
            masquerade: self.args.ip_masq,
            vxlan_port: v6.spec.port,
        };
        let members = public_ipv6s(&v6.peers);
        let want = (cfg.clone(), members.clone());
        if v6.nft_written.as_ref() == Some(&want) {
            return Ok(());
        }
        let nft = self.nft.clone();
        let r = tokio::task::spawn_blocking(move || nft.ensure6(&cfg, &members))
            .await
            .context("nft task")?;
        match r {
            Ok(()) => {
                info!(
                    table = "ip6 twill",
                    peers = want.1.len(),
                    "nftables table written"
                );
                v6.nft_written = Some(want);
                Ok(())
            }
            Err(e) => {
                self.metrics.nft_errors.inc();
                v6.nft_written = None;
                Err(e).context("nftables (ip6)")
            }
        }
    }

    /// The IPv6 reconcile: the IPv4-accepted peers' leases → IPv6 peers → entries of
    /// `twill-v6.<VNI>` (dumped fresh), then the ip6 table's peer set.
    pub(super) async fn reconcile_v6(&mut self, watch: &LeaseWatch) {
        if self.v6.as_ref().is_some_and(|v| v.need_ensure)
            && let Err(e) = self.ensure_v6().await
        {
            warn!(error = %format!("{e:#}"), "IPv6 node setup failed; retrying");
            self.retry_at = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
            if self.v6.as_ref().is_some_and(|v| v.link.index == 0) {
                return;
            }
        }
        let Some(v6) = &mut self.v6 else { return };
        let val = v6.validation(&self.cfg);
        let state = watch.state();
        let accepted = self.valid.peers().keys().filter_map(|s| state.get(s));
        let (peers, skipped) = peers6(accepted, &val);
        let now: HashSet<(String, String)> = skipped
            .iter()
            .map(|s| (s.key.clone(), s.detail.clone()))
            .collect();
        for s in &skipped {
            if !v6.logged.contains(&(s.key.clone(), s.detail.clone())) {
                warn!(key = %s.key, reason = %s.detail, "lease rejected for IPv6 (its IPv4 side is not affected)");
            }
        }
        v6.logged = now;
        self.metrics.ipv6_peers.set(peers.len() as i64);
        self.metrics.ipv6_rejected.set(skipped.len() as i64);
        v6.peers = peers;
        v6.skipped = skipped;
        let link = v6.link.index;
        match self.ov.dump6(link).await {
            Ok(p) => v6.actual = p,
            Err(e) => {
                warn!(error = %e, "IPv6 netlink dump failed; will retry");
                self.retry_at =
                    Some(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
                return;
            }
        }
        let want = desired6(&v6.peers);
        for dst in want
            .routes
            .iter()
            .map(|r| r.dst)
            .filter(|d| v6.actual.foreign_routes.contains(d))
        {
            warn!(route = %dst, "IPv6 peer route not written: the main table has a route to it that is not twill's");
        }
        let ops = diff6(&want, &v6.actual);
        if !ops.is_empty() {
            let failed = self.ov.apply_ops6(link, &ops).await;
            for (op, e) in &failed {
                let e: &DpError = e;
                warn!(%op, error = %e, "IPv6 op failed; the resync retries it");
            }
            info!(
                ops = ops.len(),
                failed = failed.len(),
                peers = v6.peers.len(),
                "reconciled (IPv6)"
            );
        }
        if let Err(e) = self.write_nft6().await {
            warn!(error = %format!("{e:#}"), "IPv6 VXLAN filter's peers; will retry");
        }
    }

    /// `FLANNEL_IPV6_NETWORK` / `FLANNEL_IPV6_SUBNET` for the subnet file, and the smaller of
    /// the two devices' MTUs (a pod's one MTU must fit both tunnels).
    pub(super) fn v6_subnet_file(&self) -> Option<(Ipv6Net, Ipv6Net, u32)> {
        self.v6
            .as_ref()
            .map(|v| (v.network, v.own, v.spec.mtu.min(self.spec.mtu)))
    }
}
