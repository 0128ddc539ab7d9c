//! twilld's command line: every flag is also an environment variable `TWILLD_<NAME>`.
//! This struct is the contract that deploy/ (DaemonSet env, systemd env file) relies on.

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use twill_ipam::store::EtcdOptions;

#[derive(Debug, Parser)]
#[command(
    name = "twilld",
    version,
    about = "twill node daemon: subnet lease + VXLAN overlay"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default when no subcommand is given).
    Run,
    /// Install the CNI plugin binary and conflist into place atomically (init container).
    InstallCni(InstallCniArgs),
    /// Remove what install-cni installed: the conflist (only if it is twill's), then the
    /// plugin binary. Run it once the node's pods are gone (their DEL needs the plugin).
    UninstallCni(UninstallCniArgs),
}

/// The program-specific half of [`EtcdArgs`]: each program's environment variables and
/// whether the flags are global (accepted after a subcommand too).
pub trait EtcdEnv: Clone + std::fmt::Debug + 'static {
    const ENDPOINTS: &'static str;
    const PREFIX: &'static str;
    const CAFILE: &'static str;
    const CERTFILE: &'static str;
    const KEYFILE: &'static str;
    const TIMEOUT: &'static str;
    /// Help of `--etcd-prefix` (no final period: clap strips it from doc comments only).
    const PREFIX_HELP: &'static str;
    const GLOBAL: bool;
}

/// twilld's etcd flags: `TWILLD_*`, before the subcommand only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Twilld;

impl EtcdEnv for Twilld {
    const ENDPOINTS: &'static str = "TWILLD_ETCD_ENDPOINTS";
    const PREFIX: &'static str = "TWILLD_ETCD_PREFIX";
    const CAFILE: &'static str = "TWILLD_ETCD_CAFILE";
    const CERTFILE: &'static str = "TWILLD_ETCD_CERTFILE";
    const KEYFILE: &'static str = "TWILLD_ETCD_KEYFILE";
    const TIMEOUT: &'static str = "TWILLD_ETCD_TIMEOUT";
    const PREFIX_HELP: &'static str =
        "Key prefix of the network in etcd (`/coreos.com/network` to share with flanneld)";
    const GLOBAL: bool = false;
}

/// twillctl's etcd flags: `TWILLCTL_*`, global (before or after the command).
#[derive(Debug, Clone, Copy, Default)]
pub struct Twillctl;

impl EtcdEnv for Twillctl {
    const ENDPOINTS: &'static str = "TWILLCTL_ETCD_ENDPOINTS";
    const PREFIX: &'static str = "TWILLCTL_ETCD_PREFIX";
    const CAFILE: &'static str = "TWILLCTL_ETCD_CAFILE";
    const CERTFILE: &'static str = "TWILLCTL_ETCD_CERTFILE";
    const KEYFILE: &'static str = "TWILLCTL_ETCD_KEYFILE";
    const TIMEOUT: &'static str = "TWILLCTL_ETCD_TIMEOUT";
    const PREFIX_HELP: &'static str = "Key prefix of the network in etcd";
    const GLOBAL: bool = true;
}

/// Connection to etcd, one set of flags for twilld (`EtcdArgs<Twilld>`, the default) and
/// twillctl (`EtcdArgs<Twillctl>`): the same names, help and defaults.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs<E: EtcdEnv = Twilld> {
    /// etcd endpoints, comma separated (http:// or https://).
    #[arg(
        long,
        global = E::GLOBAL,
        env = E::ENDPOINTS,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    #[arg(long, global = E::GLOBAL, env = E::PREFIX, help = E::PREFIX_HELP, default_value = "/twill/network")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, global = E::GLOBAL, env = E::CAFILE)]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd mTLS.
    #[arg(long, global = E::GLOBAL, env = E::CERTFILE)]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd mTLS.
    #[arg(long, global = E::GLOBAL, env = E::KEYFILE)]
    pub etcd_keyfile: Option<PathBuf>,
    /// Timeout of one etcd request (and of connecting).
    #[arg(long, global = E::GLOBAL, env = E::TIMEOUT, default_value = "5s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
    #[arg(skip)]
    _env: PhantomData<E>,
}

impl<E: EtcdEnv> EtcdArgs<E> {
    /// The store options.
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            timeout: self.etcd_timeout,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This node's name (default: the hostname). The lease is sticky per node name.
    #[arg(long, env = "TWILLD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface, by name or by one of its addresses; repeat it (or list them
    /// comma separated) to try several in order, the first that exists wins (default: the
    /// interface of the default route).
    #[arg(long, env = "TWILLD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Regular expression matched against every interface's addresses, then names (write
    /// `^...$` for a whole name); repeatable, tried in order after --iface.
    #[arg(long, env = "TWILLD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// The underlay is the interface (and the public IP the source address) of the
    /// kernel's route to this address, e.g. another node or the etcd server; tried last.
    #[arg(long, env = "TWILLD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IP that other nodes send VXLAN traffic to (default: the first address of --iface).
    #[arg(long, env = "TWILLD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// IPv6 address that other nodes send IPv6 VXLAN traffic to, with `EnableIPv6` in the
    /// network config (default: the first global IPv6 address of --iface).
    #[arg(long, env = "TWILLD_PUBLIC_IPV6")]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// Where to write the subnet file for the CNI plugin (Flannel's keys).
    #[arg(
        long,
        env = "TWILLD_SUBNET_FILE",
        default_value = "/run/twill/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic that leaves the cluster network.
    #[arg(long, env = "TWILLD_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// TTL of the node's lease in etcd; renewed at a third of it.
    #[arg(long, env = "TWILLD_LEASE_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Grace period of an expired lease: its subnet is not handed to another node for this
    /// long after the lease expired, so a node cut off longer than the TTL gets it back
    /// (docs/leases.md). 0 disables it.
    #[arg(long, env = "TWILLD_LEASE_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub lease_grace: Duration,
    /// How often the etcd TLS files (--etcd-cafile/--etcd-certfile/--etcd-keyfile) are read
    /// again; a changed, valid set that etcd accepts replaces the clients without a restart
    /// (docs/operations.md). 0 disables the reload.
    #[arg(long, env = "TWILLD_ETCD_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub etcd_tls_reload_interval: Duration,
    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "TWILLD_METRICS_ADDR", default_value = "127.0.0.1:9472")]
    pub metrics_addr: SocketAddr,
    /// A second address that serves /metrics only, for a Prometheus on another host (e.g.
    /// `0.0.0.0:9473` or the node's IP). Off by default: the probes stay on --metrics-addr.
    #[arg(long, env = "TWILLD_METRICS_SCRAPE_ADDR")]
    pub metrics_scrape_addr: Option<SocketAddr>,
    /// UDP port of the peer-health probes, on this node's VTEP address (reached only
    /// through the overlay).
    #[arg(long, env = "TWILLD_HEALTH_PORT", default_value_t = 8475)]
    pub health_port: u16,
    /// Probe each peer once per this interval (stretched by --health-max-rate). 0 turns
    /// peer health off: no probes, no answers to peers' probes, no report in etcd.
    #[arg(long, env = "TWILLD_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// A probe without an answer within this is lost; 3 lost in a row: unreachable.
    #[arg(long, env = "TWILLD_HEALTH_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,
    /// At most this many probes per second in total, whatever the node count.
    #[arg(long, env = "TWILLD_HEALTH_MAX_RATE", default_value_t = 200)]
    pub health_max_rate: u32,
    /// Publish this node's health report to etcd this often (it expires after 3 times).
    #[arg(long, env = "TWILLD_HEALTH_PUBLISH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub health_publish: Duration,
    /// List peers one by one (health report rows, per-peer metric series) while there are
    /// at most this many; above, only unreachable peers, at most this many.
    #[arg(long, env = "TWILLD_HEALTH_DETAIL_MAX", default_value_t = 250)]
    pub health_detail_max: usize,
    /// The CNI plugin's data dir (its `dataDir`), for the pod IPs used in the report.
    #[arg(
        long,
        env = "TWILLD_CNI_DATA_DIR",
        default_value = "/var/lib/cni/twill"
    )]
    pub cni_data_dir: PathBuf,
    /// /healthz fails (503) once the main loop has not begun a cycle for this long: it
    /// begins one at least every second when healthy, so only a wedged loop trips it.
    #[arg(long, env = "TWILLD_LIVENESS_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub liveness_timeout: Duration,
    /// Period of the full resync: device, sysctls and nftables checked, a fresh netlink dump
    /// diffed against the leases (kept current by the etcd watch), drift repaired.
    #[arg(long, env = "TWILLD_RESYNC_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub resync_period: Duration,
    /// Bound on each netlink request (a write and its ack, a dump, a peer set change): past
    /// it the request is abandoned, logged, counted in twill_netlink_timeouts_total, and
    /// retried by the next reconcile.
    #[arg(long, env = "TWILLD_NETLINK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub netlink_timeout: Duration,
    /// A net-conf.json file (e.g. from the ConfigMap): written to etcd if etcd has none,
    /// checked against etcd's if it has one (an incompatible change is refused).
    #[arg(long, env = "TWILLD_NET_CONF")]
    pub net_conf: Option<PathBuf>,
    /// MTU of the VXLAN device (default: underlay MTU − 50, − 70 over IPv6).
    #[arg(long, env = "TWILLD_MTU")]
    pub mtu: Option<u32>,
    /// Log format: text or json.
    #[arg(long, env = "TWILLD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone, Args)]
pub struct InstallCniArgs {
    /// The plugin binary to install.
    #[arg(
        long,
        env = "TWILLD_CNI_PLUGIN_SRC",
        default_value = "/usr/local/bin/twill"
    )]
    pub plugin_src: PathBuf,
    /// Directory of CNI binaries on the host.
    #[arg(long, env = "TWILLD_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The conflist to install (e.g. the ConfigMap's cni-conf.json).
    #[arg(
        long,
        env = "TWILLD_CNI_CONF_SRC",
        default_value = "/etc/twill/cni-conf.json"
    )]
    pub conf_src: PathBuf,
    /// Directory of CNI configs on the host.
    #[arg(long, env = "TWILLD_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// File name of the installed conflist.
    #[arg(
        long,
        env = "TWILLD_CNI_CONF_NAME",
        default_value = "10-twill.conflist"
    )]
    pub conf_name: String,
}

#[derive(Debug, Clone, Args)]
pub struct UninstallCniArgs {
    /// Directory of CNI binaries on the host.
    #[arg(long, env = "TWILLD_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Directory of CNI configs on the host.
    #[arg(long, env = "TWILLD_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// File name of the installed conflist.
    #[arg(
        long,
        env = "TWILLD_CNI_CONF_NAME",
        default_value = "10-twill.conflist"
    )]
    pub conf_name: String,
    /// Remove only the conflist and keep the plugin binary (pods still on the node can
    /// then still be torn down by their runtime's DEL).
    #[arg(long, env = "TWILLD_CNI_KEEP_PLUGIN", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub keep_plugin: bool,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// One etcd connection flag of a command.
    #[derive(Debug)]
    struct Flag {
        long: String,
        help: String,
        default: Vec<String>,
        env: String,
        global: bool,
    }

    fn etcd_flags(cmd: &clap::Command) -> Vec<Flag> {
        cmd.get_arguments()
            .filter(|a| {
                a.get_id().as_str().starts_with("etcd_") && a.get_id() != "etcd_tls_reload_interval"
            })
            .map(|a| Flag {
                long: a.get_long().unwrap().to_string(),
                help: a.get_help().unwrap().to_string(),
                default: a
                    .get_default_values()
                    .iter()
                    .map(|d| d.to_string_lossy().into_owned())
                    .collect(),
                env: a.get_env().unwrap().to_string_lossy().into_owned(),
                global: a.is_global_set(),
            })
            .collect()
    }

    #[test]
    fn twilld_and_twillctl_share_the_etcd_flags_with_their_own_env_prefix() {
        let d = etcd_flags(&super::Cli::command());
        let c = etcd_flags(&crate::ctl::Cli::command());
        let names: Vec<&str> = d.iter().map(|f| f.long.as_str()).collect();
        assert_eq!(
            names,
            [
                "etcd-endpoints",
                "etcd-prefix",
                "etcd-cafile",
                "etcd-certfile",
                "etcd-keyfile",
                "etcd-timeout"
            ]
        );
        assert_eq!(d.len(), c.len());
        for (d, c) in d.iter().zip(&c) {
            assert_eq!((&d.long, &d.default), (&c.long, &c.default));
            // Only --etcd-prefix's help differs: twilld's names flanneld.
            if d.long != "etcd-prefix" {
                assert_eq!(d.help, c.help, "{}", d.long);
            }
            let name = d.env.strip_prefix("TWILLD_").unwrap();
            assert_eq!(c.env.strip_prefix("TWILLCTL_"), Some(name));
            // twillctl's are global, twilld's are not.
            assert!(!d.global && c.global, "{}", d.long);
        }
    }

    /// What this proves: --iface is repeatable and comma separated (TWILLD_IFACE too), in
    /// order; --iface-regex is repeatable and never split at a comma (a regex may hold one).
    #[test]
    fn iface_flags_keep_their_order_and_regexes_are_not_split() {
        let run = |argv: &[&str]| {
            let mut v = vec!["twilld"];
            v.extend_from_slice(argv);
            super::Cli::try_parse_from(v).unwrap().run
        };
        let r = run(&["--iface", "eth1,10.0.0.4", "--iface", "eth0"]);
        assert_eq!(r.iface, ["eth1", "10.0.0.4", "eth0"]);
        let r = run(&["--iface-regex", "^ens[0-9]{1,3}$", "--iface-regex", "^eth"]);
        assert_eq!(r.iface_regex, ["^ens[0-9]{1,3}$", "^eth"]);
        let r = run(&["--iface-can-reach", "10.0.0.1"]);
        assert_eq!(r.iface_can_reach, Some("10.0.0.1".parse().unwrap()));
        assert!(run(&[]).iface.is_empty());
        assert!(
            super::Cli::try_parse_from(["twilld", "--iface-can-reach", "etcd.example"]).is_err()
        );
    }

    #[test]
    fn twillctl_takes_the_etcd_flags_before_or_after_the_command() {
        for argv in [
            &[
                "twillctl",
                "--etcd-prefix",
                "/p/",
                "--etcd-timeout",
                "2s",
                "leases",
                "list",
            ][..],
            &[
                "twillctl",
                "leases",
                "list",
                "--etcd-prefix",
                "/p/",
                "--etcd-timeout",
                "2s",
            ][..],
        ] {
            let cli = crate::ctl::Cli::try_parse_from(argv).unwrap();
            let o = cli.etcd.options();
            assert_eq!(o.prefix, "/p/");
            assert_eq!(o.timeout, std::time::Duration::from_secs(2));
            assert_eq!(o.endpoints, ["http://127.0.0.1:2379"]);
        }
        // twilld's stay before the subcommand.
        assert!(
            super::Cli::try_parse_from(["twilld", "install-cni", "--etcd-prefix", "/p"]).is_err()
        );
        let d = super::Cli::try_parse_from(["twilld", "--etcd-endpoints", "http://a:1,http://b:2"])
            .unwrap();
        assert_eq!(d.run.etcd.options().endpoints, ["http://a:1", "http://b:2"]);
    }
}
