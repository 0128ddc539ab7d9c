//! `twillctl network show|set`.

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::StoreError;

use super::{Cli, EXIT_NOT_FOUND, EXIT_REFUSED, Failure, Output, connect, print_json};

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// The network config in etcd (with defaults filled in) and how many subnets are used.
    Show,
    /// Validate a net-conf.json and write it to etcd. Values that cannot work (see
    /// docs/operations.md) are refused, naming the field and the value; a change that would
    /// strand existing leases (or change the backend under them) is refused unless --force.
    /// Whether Network overlaps a node's underlay subnet is checked by each twilld at start
    /// (twillctl does not know the nodes' underlays).
    Set {
        /// The net-conf.json file (`-` for stdin).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Write it even if existing leases would be stranded.
        #[arg(long)]
        force: bool,
        /// Only validate and check against etcd; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn read_input(path: &PathBuf) -> Result<String, Failure> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|e| {
            Failure::new(
                super::EXIT_ERROR,
                format!("cannot read {}: {e}", path.display()),
            )
        })
    }
}

pub async fn run(cli: &Cli, cmd: &NetworkCmd) -> Result<(), Failure> {
    match cmd {
        NetworkCmd::Show => {
            let store = connect(&cli.etcd).await?;
            let Some(cfg) = store.get_config().await? else {
                return Err(Failure::new(
                    EXIT_NOT_FOUND,
                    format!("no network config at {}", store.config_key()),
                ));
            };
            let (leases, _) = store.list().await?;
            let leased = leases
                .iter()
                .filter(|l| cfg.is_valid_subnet(&l.subnet))
                .count() as u64;
            let stranded = leases.len() as u64 - leased;
            match cli.output {
                Output::Json => {
                    let config: Value =
                        serde_json::from_str(&cfg.to_json()).expect("config JSON parses");
                    print_json(&json!({
                        "key": store.config_key(),
                        "config": config,
                        "unsupported_keys": cfg.unsupported_keys(),
                        "subnets": {
                            "total": cfg.subnet_count(),
                            "leased": leased,
                            "free": cfg.subnet_count().saturating_sub(leased),
                            "outside_config": stranded,
                        },
                    }))
                }
                Output::Table => {
                    let kv = |k: &str, v: String| println!("{:<14} {v}", format!("{k}:"));
                    kv("Key", store.config_key());
                    kv("Network", cfg.network.to_string());
                    kv("SubnetLen", cfg.subnet_len.to_string());
                    kv("SubnetMin", cfg.subnet_min.to_string());
                    kv("SubnetMax", cfg.subnet_max.to_string());
                    let vx = cfg.backend.vxlan();
                    kv(
                        "Backend",
                        format!(
                            "{} VNI {} port {} MTU {}",
                            cfg.backend.type_name(),
                            vx.vni,
                            vx.port,
                            vx.mtu
                                .map_or("from each node's underlay".into(), |m| m.to_string())
                        ),
                    );
                    kv("EnableIPv6", cfg.enable_ipv6.to_string());
                    if let Some(n) = cfg.ipv6_network {
                        kv("IPv6Network", n.to_string());
                        kv(
                            "IPv6SubnetLen",
                            cfg.ipv6_subnet_len.unwrap_or_default().to_string(),
                        );
                    }
                    kv(
                        "Subnets",
                        format!(
                            "{} total, {leased} leased, {} free{}",
                            cfg.subnet_count(),
                            cfg.subnet_count().saturating_sub(leased),
                            if stranded > 0 {
                                format!(", {stranded} lease(s) outside the config")
                            } else {
                                String::new()
                            }
                        ),
                    );
                    let unsupported = cfg.unsupported_keys();
                    if !unsupported.is_empty() {
                        kv(
                            "Unsupported",
                            format!(
                                "{} (set, but not implemented by this twill: no effect)",
                                unsupported.join(", ")
                            ),
                        );
                    }
                }
            }
            Ok(())
        }
        NetworkCmd::Set {
            file,
            force,
            dry_run,
        } => {
            // Validate before talking to etcd: a bad file fails the same way with etcd down.
            let text = read_input(file)?;
            let cfg = NetConfig::from_json(&text)?;
            let unsupported = cfg.unsupported_keys();
            if !unsupported.is_empty() {
                eprintln!(
                    "twillctl: warning: keys set but not implemented by this twill (no effect): {}",
                    unsupported.join(", ")
                );
            }
            let store = connect(&cli.etcd).await?;
            if *dry_run {
                let (leases, _) = store.list().await?;
                let old = store.get_config().await.ok().flatten();
                let problems = cfg.replacement_problems(old.as_ref(), &leases);
                let stranded: Vec<String> =
                    problems.stranded.iter().map(|s| s.to_string()).collect();
                let changes = problems.backend_changes;
                let ok = *force || problems.reasons.is_empty();
                match cli.output {
                    Output::Json => print_json(&json!({
                        "valid": true,
                        "would_write": ok,
                        "stranded": stranded,
                        "incompatible_changes": changes,
                    })),
                    Output::Table => {
                        println!("valid; stranded leases: {}", stranded.len());
                        for c in &changes {
                            println!("change: {c}");
                        }
                    }
                }
                return if ok {
                    Ok(())
                } else {
                    Err(Failure::new(
                        EXIT_REFUSED,
                        "the change would be refused without --force",
                    ))
                };
            }
            match store.put_config(&cfg, *force).await {
                Ok(()) => {}
                Err(StoreError::Refused { reasons, stranded }) => {
                    if cli.output == Output::Json {
                        print_json(&json!({
                            "written": false,
                            "stranded": stranded.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                            "reasons": reasons,
                        }));
                    }
                    return Err(Failure::new(
                        EXIT_REFUSED,
                        format!("refused: {}", reasons.join("; ")),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
            match cli.output {
                Output::Json => {
                    let config: Value =
                        serde_json::from_str(&cfg.to_json()).expect("config JSON parses");
                    print_json(
                        &json!({"written": true, "key": store.config_key(), "config": config}),
                    )
                }
                Output::Table => println!("wrote {}: {}", store.config_key(), cfg.to_json()),
            }
            Ok(())
        }
    }
}
