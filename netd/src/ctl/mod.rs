//! twillctl's commands, one file per command.
//!
//! The connection flags are twilld's (`--etcd-endpoints`, `--etcd-prefix`, `--etcd-cafile`,
//! `--etcd-certfile`, `--etcd-keyfile`, `--etcd-timeout`) with `TWILLCTL_*` environment
//! variables, global: accepted before or after the command. `-o json` prints stable JSON on
//! stdout (docs/leases.md); messages go to stderr.
//!
//! Exit codes: 0 ok, 1 error (etcd unreachable, ...), 2 usage, 3 not found,
//! 4 refused (needs `--yes` / `--force`), 5 invalid network config.

pub mod certs;
pub mod cluster;
pub mod diag;
pub mod doctor;
pub mod lease_move;
pub mod leases;
pub mod network;
pub mod status;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use twill_ipam::netconf::ConfigError;
use twill_ipam::store::{LeaseStore, StoreError};

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: any other error (etcd unreachable, I/O, ...).
pub const EXIT_ERROR: i32 = 1;
/// Exit code: bad command line (clap's own).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the lease, node or config does not exist.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code: refused without `--yes` / `--force`.
pub const EXIT_REFUSED: i32 = 4;
/// Exit code: the network config is invalid (the message names the field and value).
pub const EXIT_INVALID: i32 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "twillctl",
    version,
    about = "twill operator CLI: subnet leases, network config, node status"
)]
pub struct Cli {
    #[command(flatten)]
    pub etcd: CtlEtcdArgs,
    /// Output: a table for people, or JSON for scripts.
    #[arg(short = 'o', long, global = true, env = "TWILLCTL_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Subnet leases: list, show, release, reserve, move.
    #[command(subcommand)]
    Leases(leases::LeasesCmd),
    /// The network config: show, set.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// This node's data plane: expected entries (etcd) against programmed ones (netlink).
    Status(status::StatusArgs),
    /// The whole cluster from etcd: every node's lease, readiness, version, pod IPs and
    /// the peers it cannot reach.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Check this node for what most often breaks pod traffic; say what, why and the fix.
    Doctor(doctor::DoctorArgs),
    /// Write a diagnostics bundle (tar.gz) of this node: status, metrics, the data plane,
    /// the nftables table, IPAM state, subnet file, CNI configs, versions. No keys.
    Diag(diag::DiagArgs),
    /// Print a shell completion script: `source <(twillctl completion bash)`.
    Completion {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// The etcd connection flags with `TWILLCTL_*` environment variables, global.
pub type CtlEtcdArgs = crate::cli::EtcdArgs<crate::cli::Twillctl>;

/// Where this node's twill pieces are, as twilld and the CNI config name them: shared by
/// `doctor` and `diag`.
#[derive(Debug, Clone, Args)]
pub struct NodePaths {
    /// twilld's --metrics-addr (its /readyz, /metrics and version).
    #[arg(long, env = "TWILLCTL_METRICS_ADDR", default_value = "127.0.0.1:9472")]
    pub metrics_addr: std::net::SocketAddr,
    /// The subnet file twilld writes.
    #[arg(
        long,
        env = "TWILLCTL_SUBNET_FILE",
        default_value = "/run/twill/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// The CNI plugin's data dir (its `dataDir`; the state is `<dir>/<network name>/`).
    #[arg(
        long,
        env = "TWILLCTL_CNI_DATA_DIR",
        default_value = "/var/lib/cni/twill"
    )]
    pub cni_data_dir: PathBuf,
    /// The directory of CNI configs.
    #[arg(long, env = "TWILLCTL_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

/// A failed command: the message for stderr and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NoConfig { .. } => EXIT_NOT_FOUND,
            StoreError::Refused { .. } => EXIT_REFUSED,
            StoreError::BadConfig { .. } => EXIT_INVALID,
            _ => EXIT_ERROR,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(EXIT_INVALID, format!("invalid network config: {e}"))
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::new(EXIT_ERROR, e.to_string())
    }
}

/// Connects (one request to check that etcd answers).
pub async fn connect(args: &CtlEtcdArgs) -> Result<LeaseStore, Failure> {
    Ok(LeaseStore::connect(args.options()).await?)
}

/// Runs one command; the caller prints the failure and exits with its code.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Leases(cmd) => leases::run(&cli, cmd).await,
        Command::Network(cmd) => network::run(&cli, cmd).await,
        Command::Status(args) => status::run(&cli, args).await,
        Command::Cluster(cmd) => cluster::run(&cli, cmd).await,
        Command::Diag(args) => diag::run(&cli, args).await,
        Command::Doctor(args) => doctor::run(&cli, args).await,
        Command::Completion { shell } => {
            // Needs no etcd: the script is generated from the command definition alone.
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "twillctl", &mut script);
            // Into a buffer first: clap_complete panics on a write error (`| head`).
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}

/// Prints a JSON value on stdout (pretty, one document).
pub(crate) fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("a JSON value serializes")
    );
}

/// Prints rows as a left-aligned table with a header.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
