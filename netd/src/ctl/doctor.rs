//! `twillctl doctor`: run on a node (in its network namespace), checks what most often
//! breaks pod traffic and says, for each problem, what is wrong, why it matters and the
//! fix. Exit code 0 when every check passes, [`EXIT_PROBLEMS`] when one warns or fails.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::json;
use twill_dataplane::Netlink;
use twill_dataplane::overlay::{Overlay, RtnlOverlay, underlay};
use twill_dataplane::pod::{PodDataplane, RtnlPod};
use twill_ipam::alloc::Allocator;
use twill_ipam::lease::Lease;
use twill_ipam::store::LeaseStore;
use twill_ipam::subnet_file::SubnetFile;

use super::{Cli, Failure, NodePaths, Output, certs, print_json, print_table};

/// Exit code when a check warns or fails.
pub const EXIT_PROBLEMS: i32 = 6;

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// This node's name, to find its lease when the VXLAN device is missing (default: the
    /// hostname).
    #[arg(long, env = "TWILLCTL_NODE_NAME")]
    pub node_name: Option<String>,
    /// The underlay interface (default: that of the default route), as twilld's --iface.
    #[arg(long, env = "TWILLCTL_IFACE")]
    pub iface: Option<String>,
    #[command(flatten)]
    pub node: NodePaths,
    /// The bridge of the pods.
    #[arg(long, default_value = "cni0")]
    pub bridge: String,
    /// Warn when this node's lease expires within this time.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub lease_warn: Duration,
    /// Warn when the etcd CA, client or server certificate expires within this time.
    #[arg(long, env = "TWILLCTL_CERT_WARN", default_value = super::certs::CERT_WARN_DEFAULT, value_parser = humantime::parse_duration)]
    pub cert_warn: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One finding of one check.
#[derive(Debug, Clone)]
struct Finding {
    check: &'static str,
    level: Level,
    what: String,
    why: String,
    fix: String,
}

#[derive(Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, check: &'static str, what: impl Into<String>) {
        self.findings.push(Finding {
            check,
            level: Level::Ok,
            what: what.into(),
            why: String::new(),
            fix: String::new(),
        });
    }

    fn problem(
        &mut self,
        check: &'static str,
        level: Level,
        what: impl Into<String>,
        why: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.findings.push(Finding {
            check,
            level,
            what: what.into(),
            why: why.into(),
            fix: fix.into(),
        });
    }

    fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }
}

fn sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_string())
}

pub async fn run(cli: &Cli, args: &DoctorArgs) -> Result<(), Failure> {
    let mut r = Report::default();
    let subnet = check_subnet_file(&mut r, &args.node.subnet_file);
    check_forwarding(&mut r);
    check_bridge_netfilter(&mut r);
    check_conntrack(&mut r);

    // etcd: every endpoint, then the leases; the certificates twilld and twillctl use.
    let leases = check_etcd(&mut r, cli).await;
    check_certs(&mut r, cli, args).await;
    let nl = Netlink::current();
    let (vxlan, under) = match &nl {
        Ok(nl) => {
            let ov = RtnlOverlay::new(nl.clone());
            let cfg_vni = leases.as_ref().map(|(_, vni)| *vni).unwrap_or(1);
            let vx = ov.get_vxlan(cfg_vni).await.ok().flatten();
            let iface: Vec<String> = args.iface.iter().cloned().collect();
            let under = match underlay::Selector::new(&iface, &[], None) {
                Ok(sel) => underlay::resolve(nl, &sel, None).await.ok(),
                Err(_) => None,
            };
            (vx, under)
        }
        Err(e) => {
            r.problem(
                "netlink",
                Level::Fail,
                format!("cannot open a netlink socket: {e}"),
                "every data-plane check needs it",
                "run twillctl doctor as root (or with CAP_NET_ADMIN) on the node",
            );
            (None, None)
        }
    };
    if let Some((leases, _)) = &leases {
        check_lease(&mut r, args, leases, vxlan.as_ref());
        if let Some(own) = own_lease(args, leases, vxlan.as_ref()) {
            check_peers(&mut r, cli, &own.attrs.node_name).await;
        }
        if let Some(u) = &under {
            check_rp_filter(&mut r, leases, vxlan.as_ref(), u, nl.as_ref().ok()).await;
        }
    }
    check_mtu(
        &mut r,
        args,
        subnet.as_ref(),
        vxlan.as_ref(),
        under.as_ref(),
    )
    .await;
    check_ipam(&mut r, args).await;
    check_cni_config(&mut r, args);
    check_versions(&mut r, args);

    let worst = r.worst();
    match cli.output {
        Output::Json => print_json(&json!({
            "ok": worst == Level::Ok,
            "checks": r.findings.iter().map(|f| json!({
                "check": f.check, "status": f.level.as_str().to_lowercase(), "what": f.what,
                "why": f.why, "fix": f.fix,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let rows: Vec<Vec<String>> = r
                .findings
                .iter()
                .map(|f| vec![f.check.to_string(), f.level.as_str().into(), f.what.clone()])
                .collect();
            print_table(&["CHECK", "STATUS", "WHAT"], &rows);
            for f in r.findings.iter().filter(|f| f.level != Level::Ok) {
                println!();
                println!("{} {}: {}", f.level.as_str(), f.check, f.what);
                println!("  why: {}", f.why);
                println!("  fix: {}", f.fix);
            }
        }
    }
    if worst == Level::Ok {
        Ok(())
    } else {
        let n = r.findings.iter().filter(|f| f.level != Level::Ok).count();
        Err(Failure::new(EXIT_PROBLEMS, format!("{n} problem(s) found")))
    }
}

fn check_subnet_file(r: &mut Report, path: &Path) -> Option<SubnetFile> {
    match SubnetFile::read(path) {
        Ok(s) => {
            r.ok(
                "subnet-file",
                format!("{}: subnet {} mtu {}", path.display(), s.subnet, s.mtu),
            );
            Some(s)
        }
        Err(e) => {
            r.problem(
                "subnet-file",
                Level::Fail,
                e.to_string(),
                "the CNI plugin refuses every ADD without it: no pod on this node gets a network",
                "twilld writes it once it holds a lease and has programmed the data plane: check `curl 127.0.0.1:9472/readyz` and twilld's log",
            );
            None
        }
    }
}

fn check_forwarding(r: &mut Report) {
    match sysctl("net.ipv4.ip_forward").as_deref() {
        Some("1") => r.ok("ip-forward", "net.ipv4.ip_forward = 1"),
        v => r.problem(
            "ip-forward",
            Level::Fail,
            format!("net.ipv4.ip_forward = {}", v.unwrap_or("unreadable")),
            "the node does not route: pods cannot reach other nodes' pods or the outside",
            "twilld sets it at start and on every resync; if something resets it (a sysctl.d file, another agent), remove that, or `sysctl -w net.ipv4.ip_forward=1`",
        ),
    }
}

fn check_bridge_netfilter(r: &mut Report) {
    let call = sysctl("net.bridge.bridge-nf-call-iptables");
    if call.as_deref() != Some("1") {
        r.ok(
            "bridge-netfilter",
            format!(
                "bridged traffic does not go through iptables (bridge-nf-call-iptables = {})",
                call.as_deref().unwrap_or("absent: br_netfilter not loaded")
            ),
        );
        return;
    }
    let out = std::process::Command::new("iptables")
        .args(["-w", "5", "-S", "FORWARD"])
        .output();
    let policy_drop = match &out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.trim() == "-P FORWARD DROP"),
        _ => false,
    };
    if policy_drop {
        r.problem(
            "bridge-netfilter",
            Level::Warn,
            "bridge-nf-call-iptables = 1 and iptables' FORWARD policy is DROP",
            "traffic between pods on this node's bridge then passes iptables' FORWARD chain too (not only twill's nftables table), and is dropped unless a rule accepts it: pods on one node cannot talk",
            "accept the cluster network in iptables' FORWARD (e.g. `iptables -A FORWARD -s <Network> -j ACCEPT` and `-d <Network>`), or set the policy to ACCEPT if nothing relies on it (Docker sets DROP)",
        );
    } else {
        r.ok(
            "bridge-netfilter",
            "bridge-nf-call-iptables = 1, iptables FORWARD policy accepts",
        );
    }
}

/// Fill of the conntrack table: warn above 75 %, fail above 90 %.
fn conntrack_level(count: u64, max: u64) -> Level {
    if max == 0 {
        return Level::Ok;
    }
    match count * 100 / max {
        0..=75 => Level::Ok,
        76..=90 => Level::Warn,
        _ => Level::Fail,
    }
}

fn check_conntrack(r: &mut Report) {
    let (Some(count), Some(max)) = (
        sysctl("net.netfilter.nf_conntrack_count").and_then(|v| v.parse::<u64>().ok()),
        sysctl("net.netfilter.nf_conntrack_max").and_then(|v| v.parse::<u64>().ok()),
    ) else {
        r.ok("conntrack", "no conntrack table (nf_conntrack not loaded)");
        return;
    };
    let what = format!("conntrack table {count} of {max} entries");
    match conntrack_level(count, max) {
        Level::Ok => r.ok("conntrack", what),
        level => r.problem(
            "conntrack",
            level,
            what,
            "once the table is full the kernel drops new connections (\"nf_conntrack: table full, dropping packet\" in dmesg)",
            "raise net.netfilter.nf_conntrack_max (and nf_conntrack_buckets), or find the client opening so many connections (`conntrack -L | awk ...`)",
        ),
    }
}

/// Every endpoint on its own, then the leases and the VNI through all of them.
async fn check_etcd(r: &mut Report, cli: &Cli) -> Option<(Vec<Lease>, u32)> {
    let mut reachable = 0;
    for ep in &cli.etcd.etcd_endpoints {
        let mut opts = cli.etcd.options();
        opts.endpoints = vec![ep.clone()];
        opts.timeout = opts.timeout.min(Duration::from_secs(3));
        match LeaseStore::connect(opts).await {
            Ok(_) => {
                reachable += 1;
                r.ok("etcd", format!("{ep} answers"));
            }
            Err(e) => r.problem(
                "etcd",
                Level::Warn,
                format!("{ep}: {e}"),
                "twilld fails over to the other endpoints, but with fewer left an etcd outage cuts the node off sooner (no lease renewal, no new peers)",
                "check that member (`etcdctl endpoint health`), the network path to it and the client certificate",
            ),
        }
    }
    if reachable == 0 {
        r.problem(
            "etcd",
            Level::Fail,
            "no etcd endpoint answers",
            "the data plane stays as it is, but no lease is renewed and no node that joins is reached",
            "check --etcd-endpoints, the network to etcd and the certificates; `twillctl leases list` shows the error in full",
        );
        return None;
    }
    let store = LeaseStore::connect(cli.etcd.options()).await.ok()?;
    let cfg = match store.require_config().await {
        Ok(c) => c,
        Err(e) => {
            r.problem(
                "network-config",
                Level::Fail,
                e.to_string(),
                "twilld cannot start without the network config",
                "`twillctl network set -f net-conf.json`",
            );
            return None;
        }
    };
    let (leases, _) = store.list_with_ttl().await.ok()?;
    Some((leases, cfg.backend.vxlan().vni))
}

const CERT_FIX: &str = "renew it before it expires (docs/troubleshooting.md, \"etcd certificates\"), update the Secret twill-etcd and restart twilld; `openssl x509 -noout -dates -in <file>` shows the dates";

/// One certificate's validity window as a finding: fail when expired or not yet valid, warn
/// within `--cert-warn` of its expiry, ok with the expiry date otherwise.
fn report_validity(r: &mut Report, args: &DoctorArgs, what: &str, c: &certs::CertInfo) {
    let now = SystemTime::now();
    let until = certs::date(c.not_after);
    let who = format!("{what} ({})", c.subject);
    match c.validity(now, args.cert_warn) {
        certs::Validity::Valid => r.ok(
            "etcd-certs",
            format!(
                "{who} valid until {until} ({} left)",
                certs::days(c.not_after.duration_since(now).unwrap_or_default())
            ),
        ),
        certs::Validity::ExpiresSoon => r.problem(
            "etcd-certs",
            Level::Warn,
            format!(
                "{who} expires on {until}, in {} (warning {} ahead)",
                certs::days(c.not_after.duration_since(now).unwrap_or_default()),
                humantime::format_duration(args.cert_warn)
            ),
            "once it expires etcd refuses the TLS connection: no lease renewal, and after the lease TTL the node's subnet can go to another node",
            CERT_FIX,
        ),
        certs::Validity::Expired => r.problem(
            "etcd-certs",
            Level::Fail,
            format!("{who} expired on {until}"),
            "etcd refuses a TLS connection with an expired certificate: twilld cannot renew its lease or see new nodes",
            CERT_FIX,
        ),
        certs::Validity::NotYetValid => r.problem(
            "etcd-certs",
            Level::Fail,
            format!(
                "{who} is not valid before {} (valid until {until})",
                certs::date(c.not_before)
            ),
            "etcd refuses it until then; most often the node's clock is wrong, or the certificate was issued with a start date in the future",
            "check the node's clock (`timedatectl`), or reissue the certificate",
        ),
    }
}

/// The etcd CA and client certificate that twilld and twillctl are configured with
/// (`--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`): readable, inside their validity
/// window, the client certificate signed by the CA and matching the key; then the
/// certificate every `https://` endpoint presents in a real TLS handshake.
async fn check_certs(r: &mut Report, cli: &Cli, args: &DoctorArgs) {
    let e = &cli.etcd;
    let unreadable = |r: &mut Report, what: &str, f: &Path, err: String| {
        r.problem(
            "etcd-certs",
            Level::Fail,
            format!("{what} {}: {err}", f.display()),
            "without it no TLS connection to etcd can be made",
            "mount the Secret twill-etcd (docs/install.md) or fix the path",
        )
    };
    let ca = match &e.etcd_cafile {
        Some(f) => match certs::read_pem_certs(f) {
            Ok(list) => {
                for c in &list {
                    report_validity(r, args, &format!("CA {}", f.display()), c);
                }
                Some(list)
            }
            Err(err) => {
                unreadable(r, "CA", f, err);
                None
            }
        },
        None => None,
    };
    let client = match &e.etcd_certfile {
        Some(f) => match certs::read_pem_certs(f) {
            Ok(mut list) => {
                report_validity(
                    r,
                    args,
                    &format!("client certificate {}", f.display()),
                    &list[0],
                );
                Some(list.swap_remove(0))
            }
            Err(err) => {
                unreadable(r, "client certificate", f, err);
                None
            }
        },
        None => None,
    };
    if let (Some(cert), Some(cafile), Some(ca)) = (&client, &e.etcd_cafile, &ca) {
        // The signature itself, against each certificate of the CA file; the issuer name
        // alone could match a different CA of the same name.
        let signed = ca.iter().map(|a| cert.signed_by(a)).collect::<Vec<_>>();
        if signed.iter().any(|s| matches!(s, Ok(true))) {
            r.ok(
                "etcd-certs",
                format!(
                    "client certificate signed by the CA in {}",
                    cafile.display()
                ),
            );
        } else if signed.iter().all(|s| s.is_err()) && ca.iter().any(|a| a.subject == cert.issuer) {
            // An algorithm the check cannot verify: the names are all there is.
            r.ok(
                "etcd-certs",
                format!(
                    "client certificate issued by {} (names match; signature not checked)",
                    cert.issuer
                ),
            );
        } else {
            r.problem(
                "etcd-certs",
                Level::Warn,
                format!(
                    "client certificate {} (issuer {}) is not signed by the CA in {} ({})",
                    e.etcd_certfile.as_deref().unwrap_or(Path::new("")).display(),
                    cert.issuer,
                    cafile.display(),
                    ca.iter().map(|a| a.subject.as_str()).collect::<Vec<_>>().join("; ")
                ),
                "etcd accepts a client certificate only from the CA in its --trusted-ca-file: unless that is another CA than the one this node trusts for the server, etcd refuses the connection",
                "issue the client certificate from etcd's client CA, or point --etcd-cafile at the CA that signs both",
            );
        }
    }
    if let (Some(cert), Some(keyfile)) = (&client, &e.etcd_keyfile) {
        match certs::key_matches(cert, keyfile) {
            Ok(Some(true)) | Ok(None) => {}
            Ok(Some(false)) => r.problem(
                "etcd-certs",
                Level::Fail,
                format!(
                    "key {} does not belong to the client certificate {}",
                    keyfile.display(),
                    e.etcd_certfile.as_deref().unwrap_or(Path::new("")).display()
                ),
                "the TLS handshake needs the certificate's own key: etcd refuses every connection",
                "mount the key issued with this certificate (the Secret's keys may have been swapped or only one of them renewed)",
            ),
            Err(err) => unreadable(r, "client key", keyfile, err),
        }
    }
    // The servers' certificates, through the same trust twilld uses.
    let https: Vec<&String> = e
        .etcd_endpoints
        .iter()
        .filter(|ep| ep.trim().starts_with("https://"))
        .collect();
    if https.is_empty() {
        return;
    }
    let Some(cafile) = &e.etcd_cafile else {
        r.ok(
            "etcd-certs",
            "server certificates not checked: no --etcd-cafile to verify them with",
        );
        return;
    };
    if ca.is_none() {
        return; // already a failure above
    }
    let identity = match (&e.etcd_certfile, &e.etcd_keyfile) {
        (Some(c), Some(k)) if client.is_some() => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    for ep in https {
        let ep = ep.trim();
        let timeout = e.etcd_timeout.min(Duration::from_secs(3));
        match certs::server_cert(ep, cafile, identity, timeout).await {
            Err(err) => r.ok(
                "etcd-certs",
                format!("{ep}: server certificate not checked: {err}"),
            ),
            Ok(sc) => {
                match &sc.leaf {
                    Some(leaf) => {
                        report_validity(r, args, &format!("server certificate of {ep}"), leaf)
                    }
                    None => r.ok(
                        "etcd-certs",
                        format!(
                            "{ep}: sent no certificate (handshake: {})",
                            sc.error.as_deref().unwrap_or("ok")
                        ),
                    ),
                }
                let dated = sc.leaf.as_ref().is_some_and(|l| {
                    matches!(
                        l.validity(SystemTime::now(), args.cert_warn),
                        certs::Validity::Expired | certs::Validity::NotYetValid
                    )
                });
                if let Some(err) = sc.error
                    && !dated
                {
                    r.problem(
                        "etcd-certs",
                        Level::Fail,
                        format!("TLS handshake with {ep} failed: {err}"),
                        "twilld makes the same handshake with the same files: it cannot reach this member",
                        "check that the server certificate is signed by the CA in --etcd-cafile and names the endpoint's host (subjectAltName), and that etcd trusts the client certificate's CA",
                    );
                }
            }
        }
    }
}

fn own_lease<'a>(
    args: &DoctorArgs,
    leases: &'a [Lease],
    vxlan: Option<&twill_dataplane::overlay::VxlanLink>,
) -> Option<&'a Lease> {
    let node = args.node_name.clone().unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    vxlan
        .and_then(|v| {
            leases
                .iter()
                .find(|l| v.addresses.iter().any(|a| a.addr() == l.net_addr()))
        })
        .or_else(|| leases.iter().find(|l| l.attrs.node_name == node))
}

fn check_lease(
    r: &mut Report,
    args: &DoctorArgs,
    leases: &[Lease],
    vxlan: Option<&twill_dataplane::overlay::VxlanLink>,
) {
    let Some(own) = own_lease(args, leases, vxlan) else {
        r.problem(
            "lease",
            Level::Fail,
            "this node holds no lease",
            "without a lease the node has no pod subnet and no other node routes to it",
            "check twilld's log and /readyz; give --node-name if the hostname is not the node name",
        );
        return;
    };
    match own.expires {
        None => r.ok(
            "lease",
            format!(
                "{} ({}) reserved, no expiry",
                own.subnet, own.attrs.node_name
            ),
        ),
        Some(at) => {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            let what = format!(
                "{} ({}) expires in {}",
                own.subnet,
                own.attrs.node_name,
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            );
            if left < args.lease_warn {
                r.problem(
                    "lease",
                    Level::Warn,
                    what,
                    "renewals normally keep a lease a full TTL ahead; a short time left means they fail, and when it expires the subnet can go to another node",
                    "check etcd (the etcd checks above) and twilld's log for keep-alive errors",
                );
            } else {
                r.ok("lease", what);
            }
        }
    }
}

/// Strict rp_filter on the underlay drops VXLAN from a peer whose route back leaves by
/// another device (a multi-homed node): the most confusing "UDP 8472 is open but nothing
/// arrives" case.
async fn check_rp_filter(
    r: &mut Report,
    leases: &[Lease],
    vxlan: Option<&twill_dataplane::overlay::VxlanLink>,
    under: &underlay::Underlay,
    nl: Option<&Netlink>,
) {
    let all = sysctl("net.ipv4.conf.all.rp_filter")
        .and_then(|v| v.parse::<u8>().ok())
        .unwrap_or(0);
    let dev = sysctl(&format!("net.ipv4.conf.{}.rp_filter", under.name))
        .and_then(|v| v.parse::<u8>().ok())
        .unwrap_or(0);
    // The kernel uses the larger of "all" and the device's value.
    let effective = all.max(dev);
    if effective != 1 {
        r.ok(
            "rp-filter",
            format!("{}: rp_filter {effective} (not strict)", under.name),
        );
        return;
    }
    let Some(nl) = nl else { return };
    let cni = RtnlPod::new(nl.clone());
    let Ok(routes) = cni
        .routes(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
        .await
    else {
        return;
    };
    let own_addr = vxlan.and_then(|v| v.addresses.first().map(|a| a.addr()));
    let mut wrong = Vec::new();
    for l in leases {
        if Some(l.net_addr()) == own_addr || l.attrs.public_ip.is_unspecified() {
            continue;
        }
        let ip = IpAddr::V4(l.attrs.public_ip);
        let best = routes
            .iter()
            .filter(|rt| rt.dst.contains(&ip))
            .max_by_key(|rt| rt.dst.prefix_len());
        if let Some(rt) = best
            && rt.oif.is_some()
            && rt.oif != Some(under.index)
        {
            wrong.push(format!("{} ({})", l.attrs.public_ip, l.attrs.node_name));
        }
    }
    if wrong.is_empty() {
        r.ok(
            "rp-filter",
            format!(
                "{}: strict rp_filter, every peer's route leaves by it",
                under.name
            ),
        );
    } else {
        r.problem(
            "rp-filter",
            Level::Fail,
            format!(
                "strict rp_filter on {} but the route to {} leaves by another device",
                under.name,
                wrong.join(", ")
            ),
            "VXLAN from those peers arrives on the underlay, the reverse-path check finds the route back on another device, and the kernel drops it silently: no traffic from their pods",
            format!(
                "route the peers' public IPs via {} or set loose mode: `sysctl -w net.ipv4.conf.{}.rp_filter=2 net.ipv4.conf.all.rp_filter=2`",
                under.name, under.name
            ),
        );
    }
}

/// The VXLAN path to each peer, from this node's own peer-health report in etcd.
async fn check_peers(r: &mut Report, cli: &Cli, node: &str) {
    let Ok(store) = LeaseStore::connect(cli.etcd.options()).await else {
        return;
    };
    let reports = crate::daemon::health::read_reports(&store)
        .await
        .unwrap_or_default();
    let Some(mine) = reports.iter().find(|x| x.node == node) else {
        r.problem(
            "vxlan-peers",
            Level::Warn,
            format!("no peer-health report of {node} in etcd"),
            "twilld publishes one every --health-publish: without it nothing says whether the overlay works",
            "check that twilld runs on this node and reaches etcd",
        );
        return;
    };
    let down: Vec<String> = mine
        .unreachable()
        .map(|p| {
            let public = reports
                .iter()
                .find(|x| x.node == p.node)
                .map(|x| x.public_ip.clone())
                .unwrap_or_default();
            format!("{} ({} {public})", p.node, p.subnet)
        })
        .collect();
    if down.is_empty() {
        r.ok(
            "vxlan-peers",
            format!("{} peer(s) answer through the overlay", mine.peer_count()),
        );
    } else {
        r.problem(
            "vxlan-peers",
            Level::Fail,
            format!("no answer through the overlay from {}", down.join(", ")),
            "pods on this node cannot reach pods on those nodes; most often UDP 8472 (Backend.Port) is blocked between the nodes (a cloud security group, a host firewall)",
            "allow UDP 8472 both ways between every pair of nodes (docs/install.md, firewall); `twillctl cluster status` shows which pairs fail",
        );
    }
}

async fn check_mtu(
    r: &mut Report,
    args: &DoctorArgs,
    subnet: Option<&SubnetFile>,
    vxlan: Option<&twill_dataplane::overlay::VxlanLink>,
    under: Option<&underlay::Underlay>,
) {
    let Some(vx) = vxlan else {
        r.problem(
            "mtu",
            Level::Fail,
            "the VXLAN device is missing",
            "without it no pod traffic leaves the node",
            "twilld creates it: check that twilld runs and its log",
        );
        return;
    };
    let mut bad = Vec::new();
    if let Some(u) = under
        && vx.mtu > u.vxlan_mtu()
    {
        bad.push(format!(
            "{} mtu {} > {} mtu {} − VXLAN overhead = {}",
            vx.name,
            vx.mtu,
            u.name,
            u.mtu,
            u.vxlan_mtu()
        ));
    }
    let Some(s) = subnet else { return };
    if s.mtu > vx.mtu {
        bad.push(format!(
            "FLANNEL_MTU {} > {} mtu {}",
            s.mtu, vx.name, vx.mtu
        ));
    }
    if let Ok(nl) = Netlink::current() {
        let cni = RtnlPod::new(nl);
        if let Ok(Some(br)) = cni.link(&args.bridge).await {
            let mut above = |what: String, mtu: Option<u32>| {
                if let Some(m) = mtu.filter(|m| *m > s.mtu) {
                    bad.push(format!("{what} mtu {m} > FLANNEL_MTU {}", s.mtu));
                }
            };
            above(args.bridge.clone(), br.mtu);
            if let Ok(ports) = cni.bridge_ports(br.index).await {
                for p in ports {
                    above(format!("pod veth {}", p.name), p.mtu);
                }
            }
        }
    }
    if bad.is_empty() {
        r.ok(
            "mtu",
            format!(
                "{}{} {} ≥ pods {}",
                under
                    .map(|u| format!("{} {} → ", u.name, u.mtu))
                    .unwrap_or_default(),
                vx.name,
                vx.mtu,
                s.mtu
            ),
        );
    } else {
        r.problem(
            "mtu",
            Level::Fail,
            bad.join("; "),
            "a packet larger than the path is dropped (VXLAN sets DF): small requests work, large transfers hang",
            "the pod MTU must be at most the VXLAN device's, which is the underlay's − 50 (IPv4): fix FLANNEL_MTU / Backend.MTU, or recreate the pods whose veth is too large",
        );
    }
}

async fn check_ipam(r: &mut Report, args: &DoctorArgs) {
    let Ok(dirs) = std::fs::read_dir(&args.node.cni_data_dir) else {
        r.ok(
            "ipam",
            format!(
                "{}: no IPAM state (no pod yet)",
                args.node.cni_data_dir.display()
            ),
        );
        return;
    };
    let Ok(nl) = Netlink::current() else { return };
    let cni = RtnlPod::new(nl);
    let ports: BTreeSet<String> = match cni.link(&args.bridge).await {
        Ok(Some(br)) => cni
            .bridge_ports(br.index)
            .await
            .map(|p| p.into_iter().map(|l| l.name).collect())
            .unwrap_or_default(),
        _ => BTreeSet::new(),
    };
    let mut reserved_veths = BTreeSet::new();
    let mut leaks = Vec::new();
    let mut total = 0;
    for d in dirs.flatten() {
        if !d.path().is_dir() {
            continue;
        }
        let network = d.file_name().to_string_lossy().into_owned();
        match Allocator::new(&args.node.cni_data_dir, &network).list() {
            Ok(list) => {
                for res in list {
                    total += 1;
                    match &res.host_veth {
                        Some(v) if ports.contains(v) => {
                            reserved_veths.insert(v.clone());
                        }
                        Some(v) => leaks.push(format!(
                            "{} of container {} (veth {v} gone)",
                            res.ip, res.container_id
                        )),
                        None => {}
                    }
                }
            }
            Err(e) => r.problem(
                "ipam",
                Level::Fail,
                format!("{network}: {e}"),
                "the plugin cannot allocate from an unreadable state: every ADD fails",
                "see docs/troubleshooting.md (allocator state)",
            ),
        }
    }
    let strays: Vec<&String> = ports.difference(&reserved_veths).collect();
    if !leaks.is_empty() {
        r.problem(
            "ipam",
            Level::Warn,
            format!("reserved but no pod: {}", leaks.join(", ")),
            "those IPs stay taken until the runtime runs DEL or GC for their containers: a leak that fills the subnet",
            "let the runtime garbage-collect (containerd/CRI-O do at start and with CNI GC), or run CNI DEL for each container ID",
        );
    }
    if !strays.is_empty() {
        r.problem(
            "ipam",
            Level::Warn,
            format!(
                "ports of {} with no reservation: {}",
                args.bridge,
                strays
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "a veth on the pod bridge that twill did not give an address: another tool's, or left by a failed teardown; it can carry traffic twill does not account for",
            "find its owner (`ip -d link show <veth>`, its alias names twill's container), delete it if stale; CNI GC removes twill's own",
        );
    }
    if leaks.is_empty() && strays.is_empty() {
        r.ok(
            "ipam",
            format!(
                "{total} reservation(s), each with its veth on {}",
                args.bridge
            ),
        );
    }
}

fn check_cni_config(r: &mut Report, args: &DoctorArgs) {
    let no_config = |r: &mut Report, what: String| {
        r.problem(
            "cni-config",
            Level::Fail,
            what,
            "the runtime finds no network config: the node stays NotReady",
            "the install-cni init container writes it (docs/install.md)",
        )
    };
    let Ok(dir) = std::fs::read_dir(&args.node.cni_conf_dir) else {
        no_config(
            r,
            format!("{}: no such directory", args.node.cni_conf_dir.display()),
        );
        return;
    };
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    let Some(first) = files.first() else {
        no_config(
            r,
            format!("no CNI config in {}", args.node.cni_conf_dir.display()),
        );
        return;
    };
    let text = std::fs::read(first).unwrap_or_default();
    let is_twill = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .map(|v| v["plugins"][0]["type"] == "twill" || v["type"] == "twill")
        .unwrap_or(false);
    if !is_twill {
        r.problem(
            "cni-config",
            Level::Fail,
            format!("{} sorts first and is not twill's", first.display()),
            "runtimes use the first config file by name: pods on this node get that network, not twill's",
            "remove the other provider's file (or rename twill's to sort first, e.g. 10-twill.conflist)",
        );
        return;
    }
    match twill_cni::config::validate_conflist(&text) {
        Err(e) if first.extension().and_then(|e| e.to_str()) == Some("conflist") => {
            r.problem(
                "cni-config",
                Level::Fail,
                format!("{}: {}", first.display(), e.msg),
                "the runtime refuses an invalid config: no pod gets a network",
                "reinstall it (`twilld install-cni`, the init container)",
            );
            return;
        }
        _ => {}
    }
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
    let conf = if v["plugins"].is_array() {
        v["plugins"][0].clone()
    } else {
        v
    };
    let subnet_file = conf["subnetFile"]
        .as_str()
        .unwrap_or(twill_cni::config::DEFAULT_SUBNET_FILE);
    if Path::new(subnet_file) != args.node.subnet_file {
        r.problem(
            "cni-config",
            Level::Fail,
            format!(
                "{}: subnetFile {subnet_file} is not twilld's {}",
                first.display(),
                args.node.subnet_file.display()
            ),
            "the plugin reads another subnet file than twilld writes: ADD fails, or uses a stale subnet",
            "make the conflist's subnetFile and twilld's --subnet-file the same",
        );
        return;
    }
    r.ok(
        "cni-config",
        format!("{} is twill's and valid", first.display()),
    );
}

fn check_versions(r: &mut Report, args: &DoctorArgs) {
    let mine = env!("CARGO_PKG_VERSION");
    let metrics = super::diag::http_get(args.node.metrics_addr, "/metrics")
        .ok()
        .map(|r| String::from_utf8_lossy(&r).into_owned());
    let theirs = metrics.as_deref().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("twill_build_info{"))
            .and_then(|l| l.split("version=\"").nth(1))
            .and_then(|v| v.split('"').next())
            .map(str::to_string)
    });
    match theirs {
        Some(v) if v == mine => r.ok("versions", format!("twilld {v} = twillctl {mine}")),
        Some(v) => r.problem(
            "versions",
            Level::Warn,
            format!("twilld {v}, twillctl {mine}"),
            "a half-finished upgrade: the node runs another build than the tools (and the plugin, which install-cni copies from the same image)",
            "finish the rollout (`kubectl -n kube-twill rollout status ds/twilld`)",
        ),
        None => r.problem(
            "versions",
            Level::Warn,
            format!("twilld does not answer on {}", args.node.metrics_addr),
            "twilld is not running on this node, or listens elsewhere: nothing keeps the data plane in step",
            "check the twilld pod (or `systemctl status twilld`); give --metrics-addr if it is not the default",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_thresholds() {
        assert_eq!(conntrack_level(0, 0), Level::Ok);
        assert_eq!(conntrack_level(750, 1000), Level::Ok);
        assert_eq!(conntrack_level(760, 1000), Level::Warn);
        assert_eq!(conntrack_level(900, 1000), Level::Warn);
        assert_eq!(conntrack_level(950, 1000), Level::Fail);
    }
}
