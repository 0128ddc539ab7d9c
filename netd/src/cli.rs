//! twilld's command line: every flag is also an environment variable `TWILLD_<NAME>`.
//! This struct is the contract that deploy/ (DaemonSet env, systemd env file) relies on.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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

/// Connection to etcd, shared by twilld (`TWILLD_*`) and twillctl (`TWILLCTL_*`).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated (http:// or https://).
    #[arg(
        long,
        env = "TWILLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of the network in etcd (`/coreos.com/network` to share with flanneld).
    #[arg(long, env = "TWILLD_ETCD_PREFIX", default_value = "/twill/network")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, env = "TWILLD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd mTLS.
    #[arg(long, env = "TWILLD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd mTLS.
    #[arg(long, env = "TWILLD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// Timeout of one etcd request (and of connecting).
    #[arg(long, env = "TWILLD_ETCD_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This node's name (default: the hostname). The lease is sticky per node name.
    #[arg(long, env = "TWILLD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface (default: the interface of the default route).
    #[arg(long, env = "TWILLD_IFACE")]
    pub iface: Option<String>,
    /// IP that other nodes send VXLAN traffic to (default: the first address of --iface).
    #[arg(long, env = "TWILLD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
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
