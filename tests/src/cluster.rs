//! The cluster harness: an underlay bridge in its own namespace, N node namespaces joined to
//! it by veths, a real etcd, one real `twilld` per node started inside its node namespace,
//! and pods made with the real `twill` CNI plugin. Everything has a unique `tw<pid><n>`
//! prefix and is removed on drop, also when a test fails.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{TestNetns, checked, next_seq, veth_on_bridge};
pub use crate::netns::{require_root, run_host as run};

/// A unique short prefix `tw<pid><n>` for names of this process (namespaces, links).
/// Kept short: link names are at most 15 bytes.
pub fn unique_prefix() -> String {
    format!("tw{}{}", std::process::id() % 100_000, next_seq())
}

/// `checked` with the command line as the description.
fn check(cmd: &str, args: &[&str], out: Output) -> Result<String> {
    checked(&format!("{cmd} {}", args.join(" ")), out)
}

/// Polls `f` every 10 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Option<Child>,
    pub what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        ChildGuard {
            child: Some(child),
            what: what.into(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` to the process (by its PID).
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
                .with_context(|| format!("kill {sig} {}", self.what))?;
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (after a signal), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let st = wait_for(timeout, || c.try_wait().ok().flatten());
        if st.is_some() {
            self.child = None;
        }
        st
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses the first IPv4 address of `dev` from `ip -4 -o addr show dev`.
pub fn first_v4(ns: &TestNetns, dev: &str) -> Result<Ipv4Addr> {
    let out = ns.ip(&["-4", "-o", "addr", "show", "dev", dev])?;
    let tok = out
        .split_whitespace()
        .skip_while(|t| *t != "inet")
        .nth(1)
        .with_context(|| format!("no IPv4 address on {dev} in {}: {out}", ns.name()))?;
    let ip = tok.split('/').next().unwrap_or_default();
    ip.parse()
        .with_context(|| format!("parse address {tok:?} of {dev}"))
}

/// Reads a file, empty if missing.
pub fn read_or_empty(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Runs `f` on a new thread that has entered the network namespace at `path`; sockets it
/// creates stay in that namespace for their whole life.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// A plain HTTP/1.0 GET from inside the namespace at `ns`: (status, body).
pub fn http_get(ns: &Path, addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let stream = in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })??;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    stream.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP response: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of a metric (first sample whose name matches exactly, labels ignored).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        let k = k.split('{').next()?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

/// A TCP forwarder whose listening socket lives inside a node namespace (127.0.0.1:port
/// there) and whose upstream connections are made from the test process's own namespace:
/// how a twilld inside a node namespace reaches the etcd that the test runs on the host's
/// loopback, without touching any interface of the host.
pub struct NsProxy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsProxy {
    pub fn start(ns: &Path, listen: u16, upstream: std::net::SocketAddr) -> Result<NsProxy> {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = in_netns(ns, move || {
            std::net::TcpListener::bind(("127.0.0.1", listen))
        })??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (st, cs) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        let Ok(up) =
                            std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(1))
                        else {
                            continue; // upstream down: drop the client, it retries
                        };
                        let _ = down.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        if let (Ok(d2), Ok(u2)) = (down.try_clone(), up.try_clone()) {
                            let mut g = cs.lock().unwrap();
                            g.retain(|s| s.peer_addr().is_ok());
                            g.push(down.try_clone().unwrap());
                            g.push(up.try_clone().unwrap());
                            drop(g);
                            pipe(down, u2);
                            pipe(up, d2);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(NsProxy {
            stop,
            conns,
            thread: Some(thread),
        })
    }

    /// Closes every open connection (clients see their streams break).
    pub fn reset(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

impl Drop for NsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reset();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The etcd prefix every cluster uses.
pub const ETCD_PREFIX: &str = "/twill/network";
/// br0's IPv6 address on a dual-stack underlay ([`ClusterOpts::underlay_ipv6`]).
pub const UNDERLAY_V6_GATEWAY: &str = "fd50::fe";
/// The cluster network.
pub const NETWORK: &str = "10.244.0.0/16";
/// twilld's metrics address inside each node namespace.
pub const METRICS: &str = "127.0.0.1:9472";
/// The etcd port inside each node namespace (the [`NsProxy`]).
pub const NODE_ETCD_PORT: u16 = 2379;

/// Options of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub resync: Duration,
    pub lease_ttl: Duration,
    /// Extra twilld arguments.
    pub extra_args: Vec<String>,
    /// 0: one etcd on the host's loopback, reached through each node's proxy. n > 0: an
    /// n-member etcd cluster on the underlay ([`crate::etcd_ha::EtcdHa`]), every member an
    /// endpoint of every twilld.
    pub etcd_members: usize,
    /// The network config (net-conf.json) instead of the harness's IPv4-only one.
    pub net_conf: Option<String>,
    /// A dual-stack underlay: br0 gets [`UNDERLAY_V6_GATEWAY`]/64 too and each node an
    /// IPv6 address of `fd50::/64` on eth0 ([`Node::ip6`]).
    pub underlay_ipv6: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 3,
            pods_per_node: 2,
            resync: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(60),
            extra_args: Vec::new(),
            etcd_members: 0,
            net_conf: None,
            underlay_ipv6: false,
        }
    }
}

/// A pod: a namespace with `eth0` made by the real `twill` CNI plugin.
pub struct Pod {
    pub ns: TestNetns,
    pub ip: Ipv4Addr,
    pub id: String,
}

/// A node: a namespace on the underlay, its files, its etcd proxy and its twilld.
pub struct Node {
    pub name: String,
    pub ns: TestNetns,
    /// Underlay address on eth0.
    pub ip: Ipv4Addr,
    /// IPv6 underlay address on eth0 (with [`ClusterOpts::underlay_ipv6`]).
    pub ip6: Option<std::net::Ipv6Addr>,
    pub dir: PathBuf,
    pub daemon: Option<ChildGuard>,
    pub pods: Vec<Pod>,
    _proxy: NsProxy,
}

impl Node {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// `twillctl -o json doctor` in the node's namespace, pointed at this node's subnet
    /// file, CNI data dir and name, and at the CNI config dir `conf_dir`; the caller adds
    /// the etcd flags and its own.
    pub fn doctor_command(&self, conf_dir: &Path) -> Command {
        let mut cmd = self.ns.command(crate::bins::bin("twillctl"));
        cmd.args(["--etcd-prefix", ETCD_PREFIX, "-o", "json", "doctor"])
            .arg("--subnet-file")
            .arg(self.subnet_file())
            .arg("--cni-data-dir")
            .arg(self.dir.join("cni"))
            .arg("--cni-conf-dir")
            .arg(conf_dir)
            .args(["--node-name", &self.name]);
        cmd
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("twilld.log")
    }

    /// GET on twilld's metrics server inside this node.
    pub fn http(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.ns.path(), METRICS.parse().unwrap(), path)
    }

    pub fn ready(&self) -> bool {
        matches!(self.http("/readyz"), Ok((200, _)))
    }

    pub fn metrics(&self) -> String {
        self.http("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// The routes on `twill.1` (lines of `ip route show dev twill.1`).
    pub fn overlay_routes(&self) -> Vec<String> {
        self.ns
            .ip(&["route", "show", "dev", "twill.1"])
            .map(|s| s.lines().map(|l| l.trim().to_string()).collect())
            .unwrap_or_default()
    }

    /// Whether a route to `subnet` (e.g. "10.244.3.0/24") is on `twill.1`.
    pub fn has_route(&self, subnet: &str) -> bool {
        self.overlay_routes()
            .iter()
            .any(|l| l.starts_with(&format!("{subnet} ")))
    }

    /// The node's subnet from its subnet file (e.g. "10.244.3.0/24").
    pub fn subnet(&self) -> Option<String> {
        let text = read_or_empty(&self.subnet_file());
        let s = text
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))?;
        let net: ipnet::Ipv4Net = s.trim().parse().ok()?;
        Some(net.trunc().to_string())
    }

    /// twilld's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        read_or_empty(&self.log())
    }

    /// SIGKILL twilld (the data plane stays).
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// SIGTERM twilld and wait for it to exit.
    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.signal(nix::sys::signal::Signal::SIGTERM)?;
            if d.wait_exit(Duration::from_secs(10)).is_none() {
                bail!("twilld of {} did not exit on SIGTERM", self.name);
            }
        }
        Ok(())
    }
}

/// The whole test cluster. Dropping it kills every twilld, deletes every namespace and
/// stops etcd.
pub struct Cluster {
    pub opts: ClusterOpts,
    pub prefix: String,
    // Field order = drop order: nodes (twilld, pods, namespaces) before the underlay, etcd last.
    pub nodes: Vec<Node>,
    /// The etcd cluster of `opts.etcd_members` (on the underlay, so before it).
    pub ha: Option<crate::etcd_ha::EtcdHa>,
    pub underlay: TestNetns,
    pub etcd: crate::etcd::EtcdServer,
    pub dir: tempfile::TempDir,
    next_node: usize,
}

impl Cluster {
    /// Starts etcd, the underlay and `opts.nodes` nodes with their twilld (ready), then
    /// `opts.pods_per_node` pods on each.
    pub fn start(opts: ClusterOpts) -> Result<Cluster> {
        require_root();
        Self::start_with_etcd(opts, crate::etcd::EtcdServer::start()?)
    }

    /// [`Cluster::start`] with an etcd the test started (e.g. with TLS: the nodes reach it
    /// over `https://` through their proxies; give twilld its TLS flags in
    /// `opts.extra_args`).
    pub fn start_with_etcd(opts: ClusterOpts, etcd: crate::etcd::EtcdServer) -> Result<Cluster> {
        require_root();
        let prefix = unique_prefix();
        let dir = tempfile::Builder::new().prefix("tw-cluster-").tempdir()?;
        let underlay = TestNetns::named(format!("{prefix}-u"))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["addr", "add", "192.168.50.254/24", "dev", "br0"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        if opts.underlay_ipv6 {
            underlay.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{UNDERLAY_V6_GATEWAY}/64"),
                "dev",
                "br0",
                "nodad",
            ])?;
        }
        let conf = opts.net_conf.clone().unwrap_or_else(|| {
            format!(
                r#"{{"Network":"{NETWORK}","SubnetLen":24,"Backend":{{"Type":"vxlan","VNI":1}}}}"#
            )
        });
        std::fs::write(dir.path().join("net-conf.json"), conf)?;
        let ha = match opts.etcd_members {
            0 => None,
            n => Some(crate::etcd_ha::EtcdHa::start(
                &underlay,
                "br0",
                &prefix,
                n,
                Ipv4Addr::new(192, 168, 50, 201),
            )?),
        };
        let mut c = Cluster {
            opts: opts.clone(),
            prefix,
            nodes: Vec::new(),
            ha,
            underlay,
            etcd,
            dir,
            next_node: 1,
        };
        for _ in 0..opts.nodes {
            c.add_node()?;
        }
        for i in 0..c.nodes.len() {
            c.wait_ready(i, Duration::from_secs(20))?;
        }
        for i in 0..c.nodes.len() {
            for _ in 0..opts.pods_per_node {
                c.add_pod(i)?;
            }
        }
        Ok(c)
    }

    /// etcd options for the test's own clients (from the host namespace).
    /// The etcd endpoints as a node (inside its namespace) reaches them.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        match &self.ha {
            Some(ha) => ha.endpoints(),
            None => {
                let scheme = if self.etcd.endpoint().starts_with("https://") {
                    "https"
                } else {
                    "http"
                };
                vec![format!("{scheme}://127.0.0.1:{NODE_ETCD_PORT}")]
            }
        }
    }

    pub fn etcd_options(&self) -> twill_ipam::store::EtcdOptions {
        self.etcd.options(ETCD_PREFIX)
    }

    /// Adds a node (namespace, veth to the underlay bridge, etcd proxy) and starts its
    /// twilld; does not wait for it. Returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let ip = Ipv4Addr::new(192, 168, 50, 10 + self.next_node as u8);
        self.add_node_on("br0", ip, 24, Ipv4Addr::new(192, 168, 50, 254))
    }

    /// [`Cluster::add_node`] on another segment: a port of `bridge` (in the underlay
    /// namespace; its veth end there is `n<number>`), the address `ip/len` on eth0 and the
    /// default route via `gateway`.
    pub fn add_node_on(
        &mut self,
        bridge: &str,
        ip: Ipv4Addr,
        len: u8,
        gateway: Ipv4Addr,
    ) -> Result<usize> {
        let n = self.next_node;
        self.next_node += 1;
        let name = format!("node-{n}");
        let ns = TestNetns::named(format!("{}-n{n}", self.prefix))?;
        // The veth is created in the underlay namespace with its peer directly in the node's.
        veth_on_bridge(&self.underlay, bridge, &format!("n{n}"), &ns, "eth0")?;
        ns.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        let ip6 = if self.opts.underlay_ipv6 {
            let a: std::net::Ipv6Addr = format!("fd50::{:x}", 10 + n).parse()?;
            // nodad: usable at once (no tentative second), unique by construction.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            Some(a)
        } else {
            None
        };
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        let upstream: std::net::SocketAddr = self
            .etcd
            .endpoint()
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .context("etcd endpoint")?;
        let proxy = NsProxy::start(&ns.path(), NODE_ETCD_PORT, upstream)?;
        self.nodes.push(Node {
            name,
            ns,
            ip,
            ip6,
            dir,
            daemon: None,
            pods: Vec::new(),
            _proxy: proxy,
        });
        let i = self.nodes.len() - 1;
        self.start_daemon(i)?;
        Ok(i)
    }

    /// Starts node `i`'s twilld inside its namespace: the built binary, the harness's flags.
    pub fn start_daemon(&mut self, i: usize) -> Result<()> {
        self.start_daemon_with(i, &crate::bins::bin("twilld"), &[], &[])
    }

    /// twilld's flags for node `i` as the harness runs it, then `extra` (a flag in `extra`
    /// replaces the harness's value of it: clap refuses a flag given twice).
    pub fn daemon_args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let node = &self.nodes[i];
        let defaults = [
            ("--etcd-endpoints", self.etcd_endpoints().join(",")),
            ("--etcd-prefix", ETCD_PREFIX.to_string()),
            ("--etcd-timeout", "2s".to_string()),
            ("--node-name", node.name.clone()),
            ("--subnet-file", node.subnet_file().display().to_string()),
            ("--metrics-addr", METRICS.to_string()),
            ("--cni-data-dir", node.dir.join("cni").display().to_string()),
            (
                "--net-conf",
                self.dir.path().join("net-conf.json").display().to_string(),
            ),
            (
                "--resync-period",
                format!("{}ms", self.opts.resync.as_millis()),
            ),
            ("--lease-ttl", format!("{}s", self.opts.lease_ttl.as_secs())),
        ];
        let mut args = Vec::new();
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.push(flag.to_string());
                args.push(value);
            }
        }
        args.extend(self.opts.extra_args.iter().cloned());
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Starts node `i`'s twilld from `binary` with [`Cluster::daemon_args`] and `extra`,
    /// behind `wrapper` (an argv prefix run inside the node namespace) if not empty, and
    /// keeps it as the node's daemon; its stderr goes to the node's log.
    pub fn start_daemon_with(
        &mut self,
        i: usize,
        binary: &Path,
        extra: &[&str],
        wrapper: &[&str],
    ) -> Result<()> {
        let args = self.daemon_args(i, extra);
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log())?;
        let mut cmd = match wrapper.split_first() {
            None => node.ns.command(binary),
            Some((first, rest)) => {
                let mut c = node.ns.command(first);
                c.args(rest).arg(binary);
                c
            }
        };
        cmd.args(&args)
            .env("TWILLD_LOG", "info,twill_netd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().context("spawn twilld")?;
        node.daemon = Some(ChildGuard::new(
            child,
            format!("twilld {} ({})", node.name, binary.display()),
        ));
        Ok(())
    }

    /// Waits until node `i`'s `/readyz` answers 200; fails with its log otherwise.
    pub fn wait_ready(&self, i: usize, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let n = &self.nodes[i];
        if wait_for(timeout, || n.ready().then_some(())).is_none() {
            bail!(
                "{} not ready within {timeout:?}; twilld log:\n{}",
                n.name,
                n.log_text()
            );
        }
        Ok(t0.elapsed())
    }

    /// Makes a pod on node `i` with the real `twill` plugin (CNI ADD). Returns its index.
    pub fn add_pod(&mut self, i: usize) -> Result<usize> {
        let node = &mut self.nodes[i];
        let k = node.pods.len() + 1;
        let ns = TestNetns::named(format!(
            "{}-{}p{k}",
            self.prefix,
            &node.ns.name()[self.prefix.len() + 1..]
        ))?;
        let id = format!("{}-pod{k}", node.name);
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"twill","type":"twill","subnetFile":"{}","dataDir":"{}","bridge":"cni0"}}"#,
            node.subnet_file().display(),
            node.dir.join("cni").display()
        );
        let netns = ns.path().display().to_string();
        let bin_dir = crate::bins::bin_dir().display().to_string();
        let out = crate::bins::exec_plugin(
            &crate::bins::bin("twill"),
            Some(&node.ns.path()),
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &bin_dir),
            ],
            &conf,
        )?;
        if !out.ok() {
            bail!("CNI ADD for {id}: {} {}", out.stdout, out.stderr);
        }
        let ip = first_v4(&ns, "eth0")?;
        node.pods.push(Pod { ns, ip, id });
        Ok(node.pods.len() - 1)
    }

    /// Every pod IP with its (node, pod) index.
    pub fn pods(&self) -> Vec<(usize, usize, Ipv4Addr)> {
        let mut v = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for (k, p) in n.pods.iter().enumerate() {
                v.push((i, k, p.ip));
            }
        }
        v
    }

    /// twillctl (from the host namespace) with this cluster's etcd.
    pub fn twillctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(crate::bins::bin("twillctl"))
            .args([
                "--etcd-endpoints",
                &self.etcd.endpoint(),
                "--etcd-prefix",
                ETCD_PREFIX,
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("spawn twillctl")?;
        check("twillctl", args, out)
    }

    /// The logs of every twilld (for failure messages).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("===== {} =====\n{}", n.name, n.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `ping -6 -c <count> -W <wait>` from inside `ns`; true if every reply came back.
pub fn ping6(ns: &TestNetns, dst: std::net::Ipv6Addr, count: u32, wait_s: u32) -> bool {
    ping_ip(ns, dst.into(), count, wait_s)
}

/// `ping -c <count> -W <wait>` from inside `ns`; true if every reply came back.
pub fn ping(ns: &TestNetns, dst: Ipv4Addr, count: u32, wait_s: u32) -> bool {
    ping_ip(ns, dst.into(), count, wait_s)
}

/// `ping -4|-6 -c <count> -i 0.2 -W <wait> <dst>` from inside `ns`.
fn ping_ip(ns: &TestNetns, dst: std::net::IpAddr, count: u32, wait_s: u32) -> bool {
    let family = if dst.is_ipv6() { "-6" } else { "-4" };
    let (count, wait, dst) = (count.to_string(), wait_s.to_string(), dst.to_string());
    let args = [
        family, "-n", "-q", "-c", &count, "-i", "0.2", "-W", &wait, &dst,
    ];
    ns.exec_output("ping", &args)
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A ping running in the background (`-i interval`), whose loss is read at the end.
pub struct BackgroundPing {
    child: ChildGuard,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl BackgroundPing {
    /// Pings `dst` from `ns` every `interval` until [`BackgroundPing::finish`].
    pub fn start(ns: &TestNetns, dst: Ipv4Addr, interval: Duration) -> Result<BackgroundPing> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("ping.out");
        let f = std::fs::File::create(&out)?;
        let child = ns
            .command("ping")
            .args([
                "-n",
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                "-W",
                "1",
            ])
            .arg(dst.to_string())
            .stdout(f)
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()?;
        Ok(BackgroundPing {
            child: ChildGuard::new(child, format!("ping {dst}")),
            out,
            _dir: dir,
        })
    }

    /// Stops the ping (SIGINT, so it prints its summary): (transmitted, received).
    ///
    /// The echo requests still in flight when SIGINT arrives (at most the last one or two,
    /// sent within an RTT of the signal) are not counted as sent: they are not losses, and
    /// under load their replies can take longer than the gap to the signal. Every earlier
    /// request counts, and so does a tail of unanswered requests longer than that (a path
    /// that broke at the end).
    pub fn finish(mut self) -> Result<(u32, u32)> {
        // Let the last replies arrive.
        std::thread::sleep(Duration::from_millis(1200));
        self.child.signal(nix::sys::signal::Signal::SIGINT)?;
        self.child.wait_exit(Duration::from_secs(5));
        let text = std::fs::read_to_string(&self.out)?;
        let (transmitted, received) = parse_ping_output(&text)?;
        Ok((transmitted, received))
    }
}

/// (transmitted, received) from iputils ping's output, not counting an unanswered tail of at
/// most [`IN_FLIGHT_TAIL`] requests (see [`BackgroundPing::finish`]).
pub fn parse_ping_output(text: &str) -> Result<(u32, u32)> {
    let (transmitted, _) = ping_summary(text)?;
    let seqs: std::collections::BTreeSet<u32> = text
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    let received = seqs.len() as u32;
    let missing: Vec<u32> = (1..=transmitted).filter(|q| !seqs.contains(q)).collect();
    if !missing.is_empty() {
        eprintln!("ping: unanswered icmp_seq {missing:?} of {transmitted}");
    }
    let last_answered = seqs.last().copied().unwrap_or(0);
    let tail = transmitted.saturating_sub(last_answered);
    let transmitted = if tail <= IN_FLIGHT_TAIL {
        last_answered
    } else {
        transmitted
    };
    Ok((transmitted, received))
}

/// (transmitted, received) from a ping's summary line, whichever ping printed it: iputils
/// says "3 packets transmitted, 3 received", busybox "3 packets transmitted, 3 packets
/// received". The first two numbers on the line are the counts in both.
pub fn ping_summary(text: &str) -> Result<(u32, u32)> {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary in {text:?}"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    match nums[..] {
        [transmitted, received, ..] => Ok((transmitted, received)),
        _ => anyhow::bail!("no counts in ping summary {line:?}"),
    }
}

/// Unanswered echo requests at the very end of a background ping that count as in flight.
const IN_FLIGHT_TAIL: u32 = 2;

#[cfg(test)]
mod ping_tests {
    use super::parse_ping_output;

    fn out(replies: &[u32], transmitted: u32) -> String {
        let mut s = String::from("PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n");
        for q in replies {
            s += &format!("64 bytes from 10.0.0.2: icmp_seq={q} ttl=62 time=0.1 ms\n");
        }
        s += &format!(
            "--- 10.0.0.2 ping statistics ---\n{transmitted} packets transmitted, {} received, 0% packet loss, time 1ms\n",
            replies.len()
        );
        s
    }

    #[test]
    fn in_flight_tail_is_not_a_loss_but_a_gap_or_a_broken_end_is() {
        // The last request was in flight at SIGINT.
        assert_eq!(parse_ping_output(&out(&[1, 2, 3, 4], 5)).unwrap(), (4, 4));
        // A gap in the middle is a loss.
        assert_eq!(parse_ping_output(&out(&[1, 2, 4, 5], 5)).unwrap(), (5, 4));
        // A path that broke: many unanswered at the end, all count.
        assert_eq!(parse_ping_output(&out(&[1, 2], 10)).unwrap(), (10, 2));
        // Nothing answered at all.
        assert_eq!(parse_ping_output(&out(&[], 10)).unwrap(), (10, 0));
    }

    #[test]
    fn summary_is_read_from_iputils_and_busybox_wording() {
        use super::ping_summary;
        let iputils = "3 packets transmitted, 2 received, 33% packet loss, time 2003ms\n";
        let busybox = "3 packets transmitted, 2 packets received, 33% packet loss\n";
        assert_eq!(ping_summary(iputils).unwrap(), (3, 2));
        assert_eq!(ping_summary(busybox).unwrap(), (3, 2));
        assert!(ping_summary("PING 10.0.0.2: 56 data bytes\n").is_err());
    }
}
