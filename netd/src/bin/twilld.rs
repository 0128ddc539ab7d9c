//! twilld: the twill node daemon (see twill_netd::daemon), `twilld install-cni` and `twilld uninstall-cni`.

use std::io::IsTerminal;

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use twill_netd::cli::{Cli, Command};

fn init_logging(format: &str) {
    // rtnetlink and netlink-proto log through `log`.
    let _ = tracing_log::LogTracer::init();
    let filter = twill_netd::logging::filter_from_env(
        &["TWILLD_LOG", "RUST_LOG"],
        "info,netlink_proto=warn,h2=warn,tower=warn,hyper=warn",
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        let _ = registry.with(fmt.json()).try_init();
    } else {
        let _ = registry.with(fmt).try_init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.run.log_format);
    match cli.command {
        Some(Command::InstallCni(args)) => twill_netd::install_cni::run(&args),
        Some(Command::UninstallCni(args)) => twill_netd::install_cni::uninstall(&args).map(|_| ()),
        Some(Command::Run) | None => {
            // One malloc arena: the few blocking threads (nft, large netlink batches) would
            // each get an arena of their own, and memory freed in one is not reused by another.
            // SAFETY: called before any other thread exists; mallopt only sets a parameter.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
            // One thread: netlink replies, etcd streams and HTTP are all I/O-bound; no
            // cross-thread wake-ups per netlink message, and a smaller RSS.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(twill_netd::daemon::run(cli.run))
        }
    }
}
