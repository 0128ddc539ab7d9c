//! twill's own nftables table, `table ip twill`: masquerade for pod traffic leaving the
//! cluster network, never NAT inside it, forward-accept for the cluster network, and an
//! input filter that drops VXLAN (UDP to the VXLAN port) from any source that is not in the
//! set `peers` of the accepted peers' public IPs, counting the drops in `vxlan_dropped`.
//! With `Backend.DirectRouting` ([`DirectFilter`]) a prerouting filter also drops packets that
//! arrive on the underlay device with a source in the cluster network outside the set
//! `direct_peers` (the subnets of the peers routed directly), counted in `direct_dropped`:
//! only a direct peer's pods may send to this node's pods without VXLAN.
//!
//! Idempotent: the table is listed first as `nft -j` JSON (terse: without set elements) and
//! left alone when it has the same objects and rules as [`expected`] (compared structurally,
//! not as text, so another nft version's print format cannot cause a rewrite); otherwise it is
//! replaced in one atomic `nft -f -` transaction (create-if-absent, delete, create, the set's
//! members), so there is never a moment without the rules or without the members.
//! The set itself changes by element ([`Nft::add_peers`], [`Nft::set_peers`]), never by
//! rewriting the table. Every `nft` run is bounded by a timeout (the child is killed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

use crate::{Error, Result};

/// The table's name (family `ip`).
pub const TABLE: &str = "twill";
/// The set of the accepted peers' public IPs: VXLAN from anyone else is dropped.
pub const PEER_SET: &str = "peers";
/// The named counter of dropped VXLAN packets.
pub const DROP_COUNTER: &str = "vxlan_dropped";
/// The set of the direct peers' subnets (interval set): unencapsulated pod traffic from
/// the underlay is accepted only from these.
pub const DIRECT_SET: &str = "direct_peers";
/// The named counter of dropped unencapsulated pod packets from the underlay.
pub const DIRECT_DROP_COUNTER: &str = "direct_dropped";
/// How long one `nft` run may take before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the table must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftConfig {
    /// The cluster network (`Network` of the net config).
    pub network: Ipv4Net,
    /// This node's subnet (its lease).
    pub node_subnet: Ipv4Net,
    /// Masquerade traffic leaving the cluster network (`--ip-masq`).
    pub masquerade: bool,
    /// The VXLAN UDP port: accepted only from the members of [`PEER_SET`].
    pub vxlan_port: u16,
}

/// The direct-path filter (`Backend.DirectRouting`): packets in on `underlay` with a source
/// in the cluster network are dropped unless the source is in [`DIRECT_SET`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectFilter {
    /// The underlay device's name (matched as `iifname`, so a re-created device matches).
    pub underlay: String,
}

/// Whether [`Nft::ensure`] had to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftOutcome {
    Unchanged,
    Applied,
}

/// The table exactly as `nft -s -t list table ip twill` prints it (tabs, blank line between
/// objects; no counter values, no set elements), so that a listing can be compared with it
/// as text.
pub fn render(cfg: &NftConfig) -> String {
    render_with(cfg, None)
}

/// [`render`] with the direct-path filter when `direct` is given.
pub fn render_with(cfg: &NftConfig, direct: Option<&DirectFilter>) -> String {
    let n = cfg.network.trunc();
    let s = cfg.node_subnet.trunc();
    let mut t = String::new();
    t.push_str(&format!("table ip {TABLE} {{\n"));
    t.push_str("\tcomment \"managed by twilld\"\n");
    // nft lists named counters first, then sets, then chains.
    t.push_str(&format!("\tcounter {DROP_COUNTER} {{\n\t}}\n\n"));
    if direct.is_some() {
        t.push_str(&format!("\tcounter {DIRECT_DROP_COUNTER} {{\n\t}}\n\n"));
    }
    t.push_str(&format!(
        "\tset {PEER_SET} {{\n\t\ttype ipv4_addr\n\t}}\n\n"
    ));
    if direct.is_some() {
        t.push_str(&format!(
            "\tset {DIRECT_SET} {{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}}\n\n"
        ));
    }
    // VXLAN only from member nodes: one set lookup per packet to the VXLAN port, nothing
    // for any other packet (the dport test comes first).
    t.push_str("\tchain input {\n");
    t.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
    t.push_str(&format!(
        "\t\tudp dport {} ip saddr != @{PEER_SET} counter name \"{DROP_COUNTER}\" drop\n",
        cfg.vxlan_port
    ));
    t.push_str("\t}\n\n");
    if let Some(d) = direct {
        // Before routing, so it covers what is forwarded to pods and what is for the node.
        t.push_str("\tchain prerouting {\n");
        t.push_str("\t\ttype filter hook prerouting priority filter; policy accept;\n");
        t.push_str(&format!(
            "\t\tiifname \"{}\" ip saddr {n} ip saddr != @{DIRECT_SET} counter name \"{DIRECT_DROP_COUNTER}\" drop\n",
            d.underlay
        ));
        t.push_str("\t}\n\n");
    }
    t.push_str("\tchain postrouting {\n");
    t.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
    if cfg.masquerade {
        // Pod to pod / pod to node inside the cluster network: never NAT.
        t.push_str(&format!("\t\tip saddr {n} ip daddr {n} return\n"));
        // Multicast stays unNATed.
        t.push_str(&format!("\t\tip saddr {n} ip daddr 224.0.0.0/4 return\n"));
        // Pod traffic leaving the cluster network.
        t.push_str(&format!("\t\tip saddr {n} masquerade fully-random\n"));
        // Outside traffic to this node's own pods keeps its source.
        t.push_str(&format!("\t\tip saddr != {n} ip daddr {s} return\n"));
        // Outside traffic forwarded to other nodes' pods: so that replies come back here.
        t.push_str(&format!(
            "\t\tip saddr != {n} ip daddr {n} masquerade fully-random\n"
        ));
    }
    t.push_str("\t}\n\n");
    t.push_str("\tchain forward {\n");
    t.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    t.push_str(&format!("\t\tip saddr {n} accept\n"));
    t.push_str(&format!("\t\tip daddr {n} accept\n"));
    t.push_str("\t}\n");
    t.push_str("}\n");
    t
}

/// The table as objects, what [`Nft::ensure`] compares: names, types, hooks, priorities,
/// policies and each rule's expressions (libnftables' JSON schema); no handles, no counter
/// values, no set elements.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TableState {
    /// `None` when nft does not print it (nft 1.0.6's JSON has no table comment).
    pub comment: Option<String>,
    pub counters: BTreeSet<String>,
    /// Set name → element type.
    pub sets: BTreeMap<String, String>,
    pub chains: BTreeMap<String, ChainState>,
}

/// One base chain and its rules in order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ChainState {
    pub kind: String,
    pub hook: String,
    pub prio: i64,
    pub policy: String,
    /// Each rule's `expr` array.
    pub rules: Vec<Value>,
}

impl TableState {
    /// Whether the listed table (`self`) is `want`; a comment nft did not print is not a
    /// difference.
    pub fn matches(&self, want: &TableState) -> bool {
        let comment_ok = self.comment.is_none() || self.comment == want.comment;
        comment_ok
            && self.counters == want.counters
            && self.sets == want.sets
            && self.chains == want.chains
    }

    /// Parses `nft -j list table ip twill`.
    pub fn from_json(listing: &str) -> Result<TableState> {
        let bad = |what: &str| Error::Nft(format!("nft -j listing: {what}"));
        let v: Value = serde_json::from_str(listing).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let objs = v["nftables"]
            .as_array()
            .ok_or_else(|| bad("no \"nftables\" array"))?;
        let text = |o: &Value, k: &str| -> Result<String> {
            o[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("{k} missing in {o}")))
        };
        let mut t = TableState::default();
        for o in objs {
            if let Some(tab) = o.get("table") {
                t.comment = tab["comment"].as_str().map(str::to_string);
            } else if let Some(c) = o.get("counter") {
                t.counters.insert(text(c, "name")?);
            } else if let Some(s) = o.get("set") {
                // A concatenated type is an array: kept as its JSON text.
                let ty = match &s["type"] {
                    Value::String(x) => x.clone(),
                    other => other.to_string(),
                };
                t.sets.insert(text(s, "name")?, ty);
            } else if let Some(c) = o.get("chain") {
                let chain = ChainState {
                    kind: c["type"].as_str().unwrap_or_default().to_string(),
                    hook: c["hook"].as_str().unwrap_or_default().to_string(),
                    prio: c["prio"].as_i64().unwrap_or_default(),
                    policy: c["policy"].as_str().unwrap_or_default().to_string(),
                    rules: Vec::new(),
                };
                t.chains.insert(text(c, "name")?, chain);
            } else if let Some(r) = o.get("rule") {
                let name = text(r, "chain")?;
                let chain = t
                    .chains
                    .get_mut(&name)
                    .ok_or_else(|| bad(&format!("rule of unknown chain {name}")))?;
                chain.rules.push(r["expr"].clone());
            }
        }
        Ok(t)
    }
}

/// `ip <field> [!=] <net>`: a prefix, or the bare address for a /32 (as nft prints it).
fn ip_match(field: &str, op: &str, net: Ipv4Net) -> Value {
    let right = if net.prefix_len() == 32 {
        json!(net.addr().to_string())
    } else {
        json!({"prefix": {"addr": net.addr().to_string(), "len": net.prefix_len()}})
    };
    json!({"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}}, "right": right}})
}

/// The objects of [`render`]`(cfg)`, as `nft -j` lists them.
pub fn expected(cfg: &NftConfig) -> TableState {
    expected_with(cfg, None)
}

/// The objects of [`render_with`]`(cfg, direct)`.
pub fn expected_with(cfg: &NftConfig, direct: Option<&DirectFilter>) -> TableState {
    let mut t = expected_vxlan(cfg);
    if let Some(d) = direct {
        let n = cfg.network.trunc();
        t.counters.insert(DIRECT_DROP_COUNTER.to_string());
        t.sets
            .insert(DIRECT_SET.to_string(), "ipv4_addr".to_string());
        let rule = json!([
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": d.underlay}},
            ip_match("saddr", "==", n),
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": format!("@{DIRECT_SET}")}},
            {"counter": DIRECT_DROP_COUNTER},
            {"drop": null},
        ]);
        t.chains.insert(
            "prerouting".to_string(),
            ChainState {
                kind: "filter".into(),
                hook: "prerouting".into(),
                prio: 0,
                policy: "accept".into(),
                rules: vec![rule],
            },
        );
    }
    t
}

fn expected_vxlan(cfg: &NftConfig) -> TableState {
    let n = cfg.network.trunc();
    let s = cfg.node_subnet.trunc();
    let verdict = |v: &str| json!({ v: null });
    let masq = json!({"masquerade": {"flags": "fully-random"}});
    let chain = |kind: &str, hook: &str, prio: i64, rules: Vec<Value>| ChainState {
        kind: kind.into(),
        hook: hook.into(),
        prio,
        policy: "accept".into(),
        rules,
    };
    let input = vec![json!([
        {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": cfg.vxlan_port}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": format!("@{PEER_SET}")}},
        {"counter": DROP_COUNTER},
        verdict("drop"),
    ])];
    let mut post = Vec::new();
    if cfg.masquerade {
        let multicast: Ipv4Net = "224.0.0.0/4".parse().expect("a prefix");
        post = vec![
            json!([
                ip_match("saddr", "==", n),
                ip_match("daddr", "==", n),
                verdict("return")
            ]),
            json!([
                ip_match("saddr", "==", n),
                ip_match("daddr", "==", multicast),
                verdict("return")
            ]),
            json!([ip_match("saddr", "==", n), masq]),
            json!([
                ip_match("saddr", "!=", n),
                ip_match("daddr", "==", s),
                verdict("return")
            ]),
            json!([ip_match("saddr", "!=", n), ip_match("daddr", "==", n), masq]),
        ];
    }
    let forward = vec![
        json!([ip_match("saddr", "==", n), verdict("accept")]),
        json!([ip_match("daddr", "==", n), verdict("accept")]),
    ];
    // Priorities: filter = 0, srcnat = 100 (nft -j prints them as numbers).
    TableState {
        comment: Some("managed by twilld".into()),
        counters: [DROP_COUNTER.to_string()].into(),
        sets: [(PEER_SET.to_string(), "ipv4_addr".to_string())].into(),
        chains: [
            ("input".to_string(), chain("filter", "input", 0, input)),
            (
                "postrouting".to_string(),
                chain("nat", "postrouting", 100, post),
            ),
            (
                "forward".to_string(),
                chain("filter", "forward", 0, forward),
            ),
        ]
        .into(),
    }
}

/// `{ a, b, c }` for an nft element list.
fn elements<T: std::fmt::Display>(items: &BTreeSet<T>) -> String {
    let v: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", v.join(", "))
}

/// The IPv6 table of a dual-stack node (`EnableIPv6`): `table ip6 twill`, the IPv6 twin of
/// `table ip twill` (masquerade of pod traffic leaving `IPv6Network`, forward-accept for it,
/// VXLAN over IPv6 only from the set [`PEER6_SET`] of the peers' `PublicIPv6`s).
pub const PEER6_SET: &str = "peers6";
/// The named counter of dropped VXLAN-over-IPv6 packets (in `table ip6 twill`).
pub const DROP6_COUNTER: &str = "vxlan6_dropped";

/// What `table ip6 twill` must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nft6Config {
    /// `IPv6Network`.
    pub network: Ipv6Net,
    /// This node's IPv6 subnet.
    pub node_subnet: Ipv6Net,
    /// `--ip-masq`.
    pub masquerade: bool,
    pub vxlan_port: u16,
}

/// `table ip6 twill` as one `nft -f` table block (without the set's elements).
pub fn render6(cfg: &Nft6Config) -> String {
    let n = cfg.network.trunc();
    let s = cfg.node_subnet.trunc();
    let mut t = format!("table ip6 {TABLE} {{\n");
    t.push_str("\tcomment \"managed by twilld\"\n");
    t.push_str(&format!("\tcounter {DROP6_COUNTER} {{\n\t}}\n\n"));
    t.push_str(&format!(
        "\tset {PEER6_SET} {{\n\t\ttype ipv6_addr\n\t}}\n\n"
    ));
    t.push_str("\tchain input {\n");
    t.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
    t.push_str(&format!(
        "\t\tudp dport {} ip6 saddr != @{PEER6_SET} counter name \"{DROP6_COUNTER}\" drop\n",
        cfg.vxlan_port
    ));
    t.push_str("\t}\n\n");
    t.push_str("\tchain postrouting {\n");
    t.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
    if cfg.masquerade {
        t.push_str(&format!("\t\tip6 saddr {n} ip6 daddr {n} return\n"));
        t.push_str(&format!("\t\tip6 saddr {n} ip6 daddr ff00::/8 return\n"));
        t.push_str(&format!("\t\tip6 saddr {n} masquerade fully-random\n"));
        t.push_str(&format!("\t\tip6 saddr != {n} ip6 daddr {s} return\n"));
        t.push_str(&format!(
            "\t\tip6 saddr != {n} ip6 daddr {n} masquerade fully-random\n"
        ));
    }
    t.push_str("\t}\n\n");
    t.push_str("\tchain forward {\n");
    t.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    t.push_str(&format!("\t\tip6 saddr {n} accept\n"));
    t.push_str(&format!("\t\tip6 daddr {n} accept\n"));
    t.push_str("\t}\n");
    t.push_str("}\n");
    t
}

/// The one `nft -f` transaction that replaces `table ip6 twill` with [`render6`] and the
/// members `peers` (create-if-absent, delete, create: never a moment without the rules).
pub fn transaction6(cfg: &Nft6Config, peers: &BTreeSet<Ipv6Addr>) -> String {
    let mut t = format!("table ip6 {TABLE} {{}}\ndelete table ip6 {TABLE}\n");
    t.push_str(&render6(cfg));
    if !peers.is_empty() {
        t.push_str(&format!(
            "add element ip6 {TABLE} {PEER6_SET} {}\n",
            elements(peers)
        ));
    }
    t
}

/// Runs `nft`, in the caller's namespace or (for tests) inside the namespace at a path.
#[derive(Clone, Debug)]
pub struct Nft {
    netns: Option<PathBuf>,
    timeout: Duration,
}

impl Default for Nft {
    fn default() -> Self {
        Nft {
            netns: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl Nft {
    /// `nft` in the caller's own network namespace.
    pub fn new() -> Self {
        Self::default()
    }

    /// `nft` inside the namespace bound at `path` (through `nsenter --net=`).
    pub fn in_netns(path: impl AsRef<Path>) -> Self {
        Nft {
            netns: Some(path.as_ref().to_path_buf()),
            ..Self::default()
        }
    }

    /// The same, with another bound on each run.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn command(&self) -> Command {
        match &self.netns {
            None => Command::new("nft"),
            Some(p) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", p.display())).arg("--").arg("nft");
                c
            }
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = self.command();
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("nft {}", args.join(" "));
        let mut child = c
            .spawn()
            .map_err(|e| Error::Nft(format!("{what}: spawn: {e}")))?;
        // Threads feed stdin and drain the pipes, so that a full pipe cannot stall the
        // child (or us) past the deadline.
        let writer = match (stdin, child.stdin.take()) {
            (Some(s), Some(mut i)) => {
                let s = s.to_string();
                Some(std::thread::spawn(move || i.write_all(s.as_bytes())))
            }
            _ => None,
        };
        let drain = |p: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = p {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out_t = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err_t = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Nft(format!(
                        "{what}: no answer within {:?}: killed",
                        self.timeout
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Nft(format!("{what}: wait: {e}")));
                }
            }
        };
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        if let Some(w) = writer
            && let Ok(Err(e)) = w.join()
            && status.success()
        {
            return Err(Error::Nft(format!("{what}: write ruleset: {e}")));
        }
        if !status.success() {
            return Err(Error::Nft(format!(
                "{what}: {status}: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }

    /// The table as listed by nft without state and set elements (the form of
    /// [`render`]), `None` if it does not exist.
    pub fn list(&self) -> Result<Option<String>> {
        self.list_with(&["-s", "-t", "list", "table", "ip", TABLE])
    }

    /// The full listing (counter values, set elements), `None` if there is no table.
    pub fn list_full(&self) -> Result<Option<String>> {
        self.list_with(&["list", "table", "ip", TABLE])
    }

    /// The table as objects (from `nft -j -t list`), `None` if it does not exist.
    pub fn state(&self) -> Result<Option<TableState>> {
        match self.list_with(&["-j", "-t", "list", "table", "ip", TABLE])? {
            Some(s) => TableState::from_json(&s).map(Some),
            None => Ok(None),
        }
    }

    fn list_with(&self, args: &[&str]) -> Result<Option<String>> {
        match self.run(args, None) {
            Ok(s) => Ok(Some(s)),
            // nft says "No such file or directory" for a missing table.
            Err(Error::Nft(m)) if m.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes the table hold [`render`]`(cfg)`: nothing is written when its objects already
    /// match [`expected`]`(cfg)` (the set's members are then left as they are). A rewrite fills the set with
    /// `members` in the same transaction, so that no member is dropped meanwhile.
    pub fn ensure(&self, cfg: &NftConfig, members: &BTreeSet<Ipv4Addr>) -> Result<NftOutcome> {
        self.ensure_with(cfg, None, members, &BTreeSet::new())
    }

    /// [`Nft::ensure`] with the direct-path filter when `direct` is given; a rewrite fills
    /// its set with `direct_members` (subnets) in the same transaction.
    pub fn ensure_with(
        &self,
        cfg: &NftConfig,
        direct: Option<&DirectFilter>,
        members: &BTreeSet<Ipv4Addr>,
        direct_members: &BTreeSet<Ipv4Net>,
    ) -> Result<NftOutcome> {
        if let Some(have) = self.state()?
            && have.matches(&expected_with(cfg, direct))
        {
            return Ok(NftOutcome::Unchanged);
        }
        let want = render_with(cfg, direct);
        // One transaction: `table` creates it if absent so that `delete` cannot fail, then
        // the new table and its members; nft applies all of it or nothing.
        let mut tx = format!("table ip {TABLE} {{ }}\ndelete table ip {TABLE}\n{want}");
        if !members.is_empty() {
            tx.push_str(&format!(
                "add element ip {TABLE} {PEER_SET} {}\n",
                elements(members)
            ));
        }
        if direct.is_some() && !direct_members.is_empty() {
            tx.push_str(&format!(
                "add element ip {TABLE} {DIRECT_SET} {}\n",
                elements(direct_members)
            ));
        }
        self.run(&["-f", "-"], Some(&tx))?;
        Ok(NftOutcome::Applied)
    }

    /// Makes the direct-peer set exactly `nets`, in one transaction.
    pub fn set_direct_peers(&self, nets: &BTreeSet<Ipv4Net>) -> Result<()> {
        let mut tx = format!("flush set ip {TABLE} {DIRECT_SET}\n");
        if !nets.is_empty() {
            tx.push_str(&format!(
                "add element ip {TABLE} {DIRECT_SET} {}\n",
                elements(nets)
            ));
        }
        self.run(&["-f", "-"], Some(&tx)).map(|_| ())
    }

    /// The packets dropped by the direct-path filter since the table was written.
    pub fn direct_dropped_packets(&self) -> Result<u64> {
        let out = self.run(&["list", "counter", "ip", TABLE, DIRECT_DROP_COUNTER], None)?;
        parse_packets(&out).ok_or_else(|| {
            Error::Nft(format!(
                "counter {DIRECT_DROP_COUNTER}: no packet count in {:?}",
                out.trim()
            ))
        })
    }

    /// Adds `ips` to the peer set (members already there stay; nothing else changes).
    pub fn add_peers(&self, ips: &BTreeSet<Ipv4Addr>) -> Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        let tx = format!("add element ip {TABLE} {PEER_SET} {}\n", elements(ips));
        self.run(&["-f", "-"], Some(&tx)).map(|_| ())
    }

    /// Makes the peer set exactly `ips`, in one transaction (flush and add are applied
    /// together: a member that stays is never missing).
    pub fn set_peers(&self, ips: &BTreeSet<Ipv4Addr>) -> Result<()> {
        let mut tx = format!("flush set ip {TABLE} {PEER_SET}\n");
        if !ips.is_empty() {
            tx.push_str(&format!(
                "add element ip {TABLE} {PEER_SET} {}\n",
                elements(ips)
            ));
        }
        self.run(&["-f", "-"], Some(&tx)).map(|_| ())
    }

    /// The members of the peer set.
    pub fn peers(&self) -> Result<BTreeSet<Ipv4Addr>> {
        let out = self.run(&["list", "set", "ip", TABLE, PEER_SET], None)?;
        Ok(parse_elements(&out))
    }

    /// The packets dropped by the VXLAN input filter since the table was written.
    pub fn dropped_packets(&self) -> Result<u64> {
        let out = self.run(&["list", "counter", "ip", TABLE, DROP_COUNTER], None)?;
        parse_packets(&out).ok_or_else(|| {
            Error::Nft(format!(
                "counter {DROP_COUNTER}: no packet count in {:?}",
                out.trim()
            ))
        })
    }

    /// Writes `table ip6 twill` and its peer set in one transaction ([`transaction6`]).
    pub fn ensure6(&self, cfg: &Nft6Config, peers: &BTreeSet<Ipv6Addr>) -> Result<()> {
        self.run(&["-f", "-"], Some(&transaction6(cfg, peers)))
            .map(|_| ())
    }

    /// The packets counted by `vxlan6_dropped` in `table ip6 twill`.
    pub fn dropped6_packets(&self) -> Result<u64> {
        let out = self.run(&["list", "counter", "ip6", TABLE, DROP6_COUNTER], None)?;
        parse_packets(&out).ok_or_else(|| Error::Nft(format!("no packets in {out:?}")))
    }

    /// Deletes the table if it exists.
    pub fn remove(&self) -> Result<()> {
        let tx = format!("table ip {TABLE} {{ }}\ndelete table ip {TABLE}\n");
        self.run(&["-f", "-"], Some(&tx)).map(|_| ())
    }
}

/// The IPv4 addresses of `elements = { ... }` in a set listing.
fn parse_elements(listing: &str) -> BTreeSet<Ipv4Addr> {
    let Some(i) = listing.find("elements = {") else {
        return BTreeSet::new();
    };
    let rest = &listing[i + "elements = {".len()..];
    let body = &rest[..rest.find('}').unwrap_or(rest.len())];
    body.split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// `N` of `packets N bytes M` in a counter listing.
fn parse_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv6 table mirrors the IPv4 one: VXLAN over IPv6 only from the peer set, no NAT
    /// inside IPv6Network, masquerade out of it, and the members in the same transaction.
    #[test]
    fn the_ip6_table_mirrors_the_ip_one() {
        let cfg = Nft6Config {
            network: "fd00:10::/56".parse().unwrap(),
            node_subnet: "fd00:10:0:3::/64".parse().unwrap(),
            masquerade: true,
            vxlan_port: 8472,
        };
        let peers: BTreeSet<Ipv6Addr> = ["fd99::2".parse().unwrap()].into();
        let tx = transaction6(&cfg, &peers);
        assert!(tx.starts_with("table ip6 twill {}\ndelete table ip6 twill\n"));
        assert!(
            tx.contains("udp dport 8472 ip6 saddr != @peers6 counter name \"vxlan6_dropped\" drop")
        );
        assert!(tx.contains("ip6 saddr fd00:10::/56 ip6 daddr fd00:10::/56 return"));
        assert!(tx.contains("ip6 saddr fd00:10::/56 masquerade fully-random"));
        assert!(tx.contains("ip6 saddr != fd00:10::/56 ip6 daddr fd00:10:0:3::/64 return"));
        assert!(tx.contains("add element ip6 twill peers6 { fd99::2 }"));
        let no_masq = render6(&Nft6Config {
            masquerade: false,
            ..cfg
        });
        assert!(!no_masq.contains("masquerade"));
        assert!(no_masq.contains("ip6 daddr fd00:10::/56 accept"));
    }

    #[test]
    fn vxlan_filter_drops_only_the_vxlan_port_from_non_members() {
        let t = render(&NftConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade: false,
            vxlan_port: 8472,
        });
        assert!(t.contains("hook input priority filter; policy accept;"));
        assert!(
            t.contains("udp dport 8472 ip saddr != @peers counter name \"vxlan_dropped\" drop"),
            "{t}"
        );
        assert_eq!(t.matches(" drop\n").count(), 1, "{t}");
    }

    #[test]
    fn listings_parse() {
        let set = "table ip twill {\n\tset peers {\n\t\ttype ipv4_addr\n\t\telements = { 192.168.0.2, 192.168.0.3,\n\t\t\t     10.1.2.3 }\n\t}\n}\n";
        let got = parse_elements(set);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&Ipv4Addr::new(10, 1, 2, 3)));
        assert!(parse_elements("set peers {\n\ttype ipv4_addr\n}").is_empty());
        let c = "table ip twill {\n\tcounter vxlan_dropped {\n\t\tpackets 12 bytes 1480\n\t}\n}\n";
        assert_eq!(parse_packets(c), Some(12));
        assert_eq!(parse_packets("nothing"), None);
    }

    #[test]
    fn render_never_nats_inside_the_network() {
        let t = render(&NftConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade: true,
            vxlan_port: 8472,
        });
        let ret = t
            .find("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return")
            .unwrap();
        let masq = t.find("ip saddr 10.244.0.0/16 masquerade").unwrap();
        assert!(
            ret < masq,
            "the return must come before the masquerade:\n{t}"
        );
        assert!(t.contains("ip daddr 10.244.0.0/16 accept"));
    }

    fn cfg(masquerade: bool) -> NftConfig {
        NftConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade,
            vxlan_port: 8472,
        }
    }

    /// `nft -j -s -t list table ip twill` of nft 1.0.6 (Debian 12) after `nft -f` of
    /// `render(&cfg(true))` and one member added to the set.
    const LISTING_1_0_6: &str = include_str!("nft_list_1.0.6.json");

    #[test]
    fn a_listing_of_the_rendered_table_matches_what_is_expected() {
        let have = TableState::from_json(LISTING_1_0_6).unwrap();
        assert_eq!(
            have.comment, None,
            "nft 1.0.6 prints no table comment in JSON"
        );
        assert!(have.matches(&expected(&cfg(true))), "{have:#?}");
        assert!(!have.matches(&expected(&cfg(false))));
        // The same table listed by an nft that prints the comment.
        let mut with_comment = have.clone();
        with_comment.comment = Some("managed by twilld".into());
        assert!(with_comment.matches(&expected(&cfg(true))));
        with_comment.comment = Some("someone else's".into());
        assert!(!with_comment.matches(&expected(&cfg(true))));
    }

    #[test]
    fn a_changed_rule_or_object_is_a_difference() {
        let want = expected(&cfg(true));
        let edits: [(&str, &str); 6] = [
            ("\"right\": 8472", "\"right\": 8473"),
            ("\"len\": 24", "\"len\": 25"),
            ("\"prio\": 100", "\"prio\": 99"),
            ("\"type\": \"ipv4_addr\"", "\"type\": \"ipv6_addr\""),
            ("\"name\": \"vxlan_dropped\"", "\"name\": \"other\""),
            ("\"policy\": \"accept\"", "\"policy\": \"drop\""),
        ];
        for (from, to) in edits {
            assert!(LISTING_1_0_6.contains(from), "{from}");
            let changed = LISTING_1_0_6.replacen(from, to, 1);
            let have = TableState::from_json(&changed).unwrap();
            assert!(!have.matches(&want), "{from} -> {to} went unnoticed");
        }
        // A rule removed, or the rules of a chain reordered.
        let mut v: Value = serde_json::from_str(LISTING_1_0_6).unwrap();
        let objs = v["nftables"].as_array_mut().unwrap();
        let last = objs.iter().rposition(|o| o.get("rule").is_some()).unwrap();
        let dropped = objs.remove(last);
        let fewer = TableState::from_json(&v.to_string()).unwrap();
        assert!(!fewer.matches(&want));
        let objs = v["nftables"].as_array_mut().unwrap();
        let first_post = objs
            .iter()
            .position(|o| o["rule"]["chain"] == "postrouting")
            .unwrap();
        objs.swap(first_post, first_post + 1);
        objs.push(dropped);
        let swapped = TableState::from_json(&v.to_string()).unwrap();
        assert!(!swapped.matches(&want));
        assert!(TableState::from_json("not json").is_err());
    }

    /// The direct-path filter exists only with DirectRouting, and drops only cluster
    /// sources outside the direct peers' set on the underlay.
    #[test]
    fn direct_filter_only_with_direct_routing() {
        let d = DirectFilter {
            underlay: "eth0".into(),
        };
        let t = render_with(&cfg(false), Some(&d));
        assert!(
            t.contains("iifname \"eth0\" ip saddr 10.244.0.0/16 ip saddr != @direct_peers counter name \"direct_dropped\" drop"),
            "{t}"
        );
        assert!(t.contains("flags interval"), "{t}");
        assert_eq!(render_with(&cfg(false), None), render(&cfg(false)));
        assert!(!render(&cfg(false)).contains("direct"));
        let e = expected_with(&cfg(true), Some(&d));
        assert!(e.chains.contains_key("prerouting"));
        assert!(e.sets.contains_key(DIRECT_SET));
        // A table written without the filter is rewritten when it is turned on.
        let have = TableState::from_json(LISTING_1_0_6).unwrap();
        assert!(!have.matches(&e));
    }

    #[test]
    fn no_masquerade_without_ip_masq() {
        let t = render(&NftConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade: false,
            vxlan_port: 8472,
        });
        assert!(!t.contains("masquerade"));
        assert!(t.contains("chain forward"));
    }
}
