//! `twillctl cluster status`: every node in one table, from etcd: its lease (subnet, public
//! IP, expiry) and what its twilld last published (ready or not and why, version, pod IPs
//! used / capacity, the peers it cannot reach through the overlay). Exit code 0 when all
//! is well, [`super::doctor::EXIT_PROBLEMS`] when anything is wrong.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use serde_json::json;

use super::doctor::EXIT_PROBLEMS;
use super::{Cli, EXIT_ERROR, Failure, Output, connect, print_json, print_table};
use crate::daemon::health::{NodeReport, read_reports};

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Every node: lease, readiness, version, pod IPs, unreachable peers.
    Status {
        /// A report older than this counts as stale (twilld publishes every 10 s by
        /// default; a report expires from etcd after three periods anyway).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        stale_after: Duration,
    },
}

struct Row {
    node: String,
    subnet: String,
    public_ip: String,
    expires_in: Option<u64>,
    report: Option<NodeReport>,
    problems: Vec<String>,
}

pub async fn run(cli: &Cli, cmd: &ClusterCmd) -> Result<(), Failure> {
    let ClusterCmd::Status { stale_after } = cmd;
    let store = connect(&cli.etcd).await?;
    let (leases, _) = store.list_with_ttl().await?;
    let reports = read_reports(&store)
        .await
        .map_err(|e| Failure::new(EXIT_ERROR, format!("read the health reports: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut by_node: BTreeMap<String, NodeReport> =
        reports.into_iter().map(|r| (r.node.clone(), r)).collect();
    let mut rows = Vec::new();
    for l in &leases {
        let report = by_node.remove(&l.attrs.node_name);
        let expires_in = l.expires.map(|e| {
            e.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .as_secs()
        });
        rows.push(Row {
            node: l.attrs.node_name.clone(),
            subnet: l.subnet.to_string(),
            public_ip: l.attrs.public_ip.to_string(),
            expires_in,
            report,
            problems: Vec::new(),
        });
    }
    // A node that publishes but holds no lease.
    for (node, r) in by_node {
        rows.push(Row {
            node,
            subnet: r.subnet.clone().unwrap_or_default(),
            public_ip: r.public_ip.clone(),
            expires_in: None,
            report: Some(r),
            problems: vec!["holds no lease".into()],
        });
    }
    for row in &mut rows {
        match &row.report {
            None => {
                // A reservation without a running node is not a problem of its own.
                if row.expires_in.is_some() {
                    row.problems
                        .push("no health report (twilld not running, or too old)".into());
                }
            }
            Some(r) => {
                if now.saturating_sub(r.time) > stale_after.as_secs() {
                    row.problems
                        .push(format!("report is {} s old", now.saturating_sub(r.time)));
                }
                if !r.ready {
                    row.problems.push(format!("not ready: {}", r.reason));
                }
                if let Some(down) = unreachable_summary(r) {
                    row.problems.push(format!("cannot reach {down}"));
                }
                if let (Some(u), Some(c)) = (r.pods_used, r.pods_capacity)
                    && c > 0
                    && u * 10 >= c * 9
                {
                    row.problems
                        .push(format!("pod subnet {u}/{c} used (≥ 90 %)"));
                }
            }
        }
        if row.expires_in == Some(0) {
            row.problems.push("lease expired".into());
        }
    }
    let ok = rows.iter().all(|r| r.problems.is_empty());
    match cli.output {
        Output::Json => print_json(&json!({
            "ok": ok,
            "nodes": rows.iter().map(|r| {
                let rep = r.report.as_ref();
                json!({
                    "node": r.node,
                    "subnet": r.subnet,
                    "public_ip": r.public_ip,
                    "expires_in_seconds": r.expires_in,
                    "reported": rep.is_some(),
                    "ready": rep.map(|x| x.ready),
                    "reason": rep.map(|x| x.reason.clone()),
                    "version": rep.map(|x| x.version.clone()),
                    "pods_used": rep.and_then(|x| x.pods_used),
                    "pods_capacity": rep.and_then(|x| x.pods_capacity),
                    "unreachable": rep.map(|x| x.unreachable().map(|p| p.node.clone()).collect::<Vec<_>>()).unwrap_or_default(),
                    "unreachable_count": rep.map(|x| x.unreachable_count()),
                    "peers": rep.map(|x| x.peer_count()),
                    "problems": r.problems,
                })
            }).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let rep = r.report.as_ref();
                    vec![
                        r.node.clone(),
                        r.subnet.clone(),
                        r.public_ip.clone(),
                        r.expires_in
                            .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
                            .unwrap_or_else(|| "-".into()),
                        match rep {
                            Some(x) if x.ready => "yes".into(),
                            Some(_) => "NO".into(),
                            None => "?".into(),
                        },
                        rep.map(|x| x.version.clone()).unwrap_or_else(|| "-".into()),
                        match rep.and_then(|x| x.pods_used.zip(x.pods_capacity)) {
                            Some((u, c)) => format!("{u}/{c}"),
                            None => "-".into(),
                        },
                        if r.problems.is_empty() {
                            "-".into()
                        } else {
                            r.problems.join("; ")
                        },
                    ]
                })
                .collect();
            print_table(
                &[
                    "NODE",
                    "SUBNET",
                    "PUBLIC-IP",
                    "EXPIRES",
                    "READY",
                    "VERSION",
                    "PODS",
                    "PROBLEMS",
                ],
                &table,
            );
        }
    }
    if ok {
        Ok(())
    } else {
        let n = rows.iter().filter(|r| !r.problems.is_empty()).count();
        Err(Failure::new(
            EXIT_PROBLEMS,
            format!("{n} node(s) with problems"),
        ))
    }
}

/// The peers a report cannot reach, for the problems column: at most 10 names, then how
/// many more (the report's count also covers peers it does not list).
fn unreachable_summary(r: &NodeReport) -> Option<String> {
    const SHOWN: usize = 10;
    let names: Vec<&str> = r.unreachable().map(|p| p.node.as_str()).collect();
    let total = (r.unreachable_count() as usize).max(names.len());
    if total == 0 {
        return None;
    }
    let mut s = names[..names.len().min(SHOWN)].join(", ");
    let more = total - names.len().min(SHOWN);
    if more > 0 {
        if !s.is_empty() {
            s.push_str(", ");
        }
        s.push_str(&format!("{more} more"));
    }
    Some(s)
}
