//! twillctl: inspect and operate twill's subnet leases and network config in etcd.
//! Exit codes: see twill_netd::ctl (0 ok, 1 error, 2 usage, 3 not found, 4 refused,
//! 5 invalid config).

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use twill_netd::ctl::{self, Cli, EXIT_ERROR};

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::registry()
        .with(twill_netd::logging::filter_from_env(
            &["TWILLCTL_LOG"],
            "warn",
        ))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twillctl: cannot start the async runtime: {e}");
            std::process::exit(EXIT_ERROR);
        }
    };
    match rt.block_on(ctl::run(cli)) {
        Ok(()) => {}
        Err(f) => {
            eprintln!("twillctl: {}", f.message);
            std::process::exit(f.code);
        }
    }
}
