//! A real etcd (Debian's `etcd-server`, /usr/bin/etcd) for tests: free loopback ports, a temp
//! data dir, stopped by PID on drop. `stop()`/`kill()`/`restart()` keep the ports and the
//! data dir, so tests can take etcd away and bring it back. `start_tls()` serves HTTPS with
//! client-certificate authentication, certificates made by the `openssl` CLI.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use twill_ipam::store::{EtcdOptions, LeaseStore};

/// Path of the etcd binary (`TWILL_ETCD_BIN` overrides).
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("TWILL_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// Certificates of a TLS etcd (all PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate signed by another CA (must be refused).
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

/// TLS of an etcd whose certificates the test makes itself (e.g. with rcgen), for
/// [`EtcdServer::start_with_tls`]: the server's certificate, the CA bundle it trusts for
/// client certificates (several CAs: one file with each), an optional CRL, and the identity
/// the harness's own clients use.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// `--trusted-ca-file`: the CAs whose client certificates etcd accepts (a PEM bundle).
    pub trusted_ca: PathBuf,
    /// `--client-crl-file`: revoked client certificates.
    pub crl: Option<PathBuf>,
    /// The CA of `server_cert`, for the harness's clients.
    pub client_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A running (or stopped) etcd owned by the test.
#[derive(Debug)]
pub struct EtcdServer {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<TlsFiles>,
    custom_tls: Option<ServerTls>,
    starts: u32,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A CA, a server cert for 127.0.0.1, a client cert, and a rogue client cert from another CA.
pub fn make_certs(dir: &Path) -> Result<TlsFiles> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "rogue-ca"] {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let subj = format!("/CN=twill-test-{ca}");
        let (k, c) = (format!("{ca}.key"), format!("{ca}.crt"));
        a.extend(["-keyout", &k, "-out", &c, "-days", "2", "-subj", &subj]);
        openssl(dir, &a)?;
    }
    let sign = |name: &str, ca: &str, ext: &str| -> Result<()> {
        let (k, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let subj = format!("/CN=twill-test-{name}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &k, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a)?;
        let extfile = format!("{name}.ext");
        std::fs::write(dir.join(&extfile), ext)?;
        let (cac, cak) = (format!("{ca}.crt"), format!("{ca}.key"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &cac,
                "-CAkey",
                &cak,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        )
    };
    sign(
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )?;
    sign(
        "client",
        "ca",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )?;
    sign(
        "rogue",
        "rogue-ca",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )?;
    Ok(TlsFiles {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        rogue_cert: dir.join("rogue.crt"),
        rogue_key: dir.join("rogue.key"),
    })
}

impl EtcdServer {
    /// Starts a plain-HTTP etcd and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::start_inner(false)
    }

    /// Starts an HTTPS etcd with `--client-cert-auth` and waits until it answers (with the
    /// client certificate).
    pub fn start_tls() -> Result<Self> {
        Self::start_inner(true)
    }

    /// Starts an HTTPS etcd with `--client-cert-auth` and the given certificates.
    pub fn start_with_tls(tls: ServerTls) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tw-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let mut server = EtcdServer {
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            child: None,
            tls: None,
            custom_tls: Some(tls),
            starts: 0,
        };
        server.spawn_first()?;
        Ok(server)
    }

    /// Replaces the TLS of a server started with [`EtcdServer::start_with_tls`]; used from
    /// the next (re)start on.
    pub fn set_tls(&mut self, tls: ServerTls) {
        self.custom_tls = Some(tls);
    }

    fn start_inner(tls: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tw-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let tls = if tls {
            let certs = dir.path().join("certs");
            std::fs::create_dir(&certs)?;
            Some(make_certs(&certs)?)
        } else {
            None
        };
        let mut server = EtcdServer {
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            child: None,
            tls,
            custom_tls: None,
            starts: 0,
        };
        server.spawn_first()?;
        Ok(server)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() || self.custom_tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    /// The client URLs (one).
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The certificates, for a TLS server.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Options to reach this etcd under `prefix` (with the client certificate if TLS).
    pub fn options(&self, prefix: &str) -> EtcdOptions {
        let mut o = EtcdOptions::new(self.endpoints()).with_prefix(prefix);
        o.timeout = Duration::from_secs(3);
        if let Some(t) = &self.tls {
            o.ca_file = Some(t.ca.clone());
            o.cert_file = Some(t.client_cert.clone());
            o.key_file = Some(t.client_key.clone());
        }
        if let Some(t) = &self.custom_tls {
            o.ca_file = Some(t.client_ca.clone());
            o.cert_file = Some(t.client_cert.clone());
            o.key_file = Some(t.client_key.clone());
        }
        o
    }

    /// The data dir (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's log (stdout+stderr of every start).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// PID of the running etcd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The first start. A port picked by [`free_port`] is free only when picked: another
    /// test (or an outgoing connection) can take it before etcd binds it. Then etcd exits
    /// with "address already in use", and the start is retried on new ports (a few times).
    fn spawn_first(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 && format!("{e:#}").contains("address already in use") => {
                    attempt += 1;
                    eprintln!("etcd: port taken before it bound it; retrying on new ports");
                    let _ = std::fs::remove_dir_all(self.data_dir());
                    let _ = std::fs::remove_file(self.log_path());
                    self.starts = 0;
                    self.client_port = free_port()?;
                    self.peer_port = free_port()?;
                    while self.peer_port == self.client_port {
                        self.peer_port = free_port()?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.endpoint();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .arg("--initial-cluster-token")
            .arg(format!("tw-{}", std::process::id()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Server certificate, key and the CA that client certificates must chain to.
        let server = |cmd: &mut Command, cert: &Path, key: &Path, ca: &Path| {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        };
        if let Some(t) = &self.tls {
            server(&mut cmd, &t.server_cert, &t.server_key, &t.ca);
        }
        if let Some(t) = &self.custom_tls {
            server(&mut cmd, &t.server_cert, &t.server_key, &t.trusted_ca);
            if let Some(crl) = &t.crl {
                cmd.arg("--client-crl-file").arg(crl);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", etcd_bin().display()))?;
        self.child = Some(child);
        self.starts += 1;
        self.wait_healthy(Duration::from_secs(20))
    }

    fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let opts = self.options("/tw-health");
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "etcd exited with {status} during start; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            let o = opts.clone();
            // A separate thread with its own runtime: works whether or not the caller is
            // inside a tokio runtime.
            let ok = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let mut o = o;
                    o.timeout = Duration::from_millis(500);
                    LeaseStore::connect(o).await.is_ok()
                })
            })
            .join()
            .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy within {within:?}; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal_and_wait(&mut self, sig: Signal) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), sig);
            child.wait().context("waiting for etcd")?;
        }
        Ok(())
    }

    /// Stops etcd gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        self.signal_and_wait(Signal::SIGTERM)
    }

    /// Kills etcd (SIGKILL) and waits for it.
    pub fn kill(&mut self) -> Result<()> {
        self.signal_and_wait(Signal::SIGKILL)
    }

    /// Starts etcd again on the same ports and data dir (stops it first if running).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.signal_and_wait(Signal::SIGKILL);
    }
}

/// A TCP proxy in front of etcd that a test can cut and restore, to make etcd unreachable
/// for one client while it keeps running (changes and compactions can happen meanwhile).
/// Must be created inside a tokio runtime.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    enabled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port, forwarding to `127.0.0.1:<target_port>`.
    pub async fn start(target_port: u16) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let enabled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let (en, cs) = (enabled.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !en.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut out) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                cs.lock().expect("lock").push(h);
            }
        });
        Ok(TcpProxy {
            port,
            enabled,
            conns,
            task,
        })
    }

    /// The proxy's client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.enabled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().expect("lock").drain(..) {
            h.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

impl EtcdServer {
    /// The client port (for a [`TcpProxy`]).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves that a client port taken between [`free_port`] and etcd's bind (here: held by
    /// this test) makes the first start retry on new ports instead of failing the test that
    /// wanted an etcd.
    #[test]
    fn a_port_taken_before_etcd_binds_it_is_retried_on_new_ports() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().port();
        let mut server = EtcdServer {
            dir: tempfile::Builder::new()
                .prefix("tw-etcd-")
                .tempdir()
                .unwrap(),
            client_port: taken,
            peer_port: free_port().unwrap(),
            child: None,
            tls: None,
            custom_tls: None,
            starts: 0,
        };
        server.spawn_first().unwrap();
        assert_ne!(server.client_port, taken);
        assert!(server.pid().is_some());
    }
}
