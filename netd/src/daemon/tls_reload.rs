//! Reloads the etcd client's TLS files (`--etcd-cafile/--etcd-certfile/--etcd-keyfile`)
//! without a restart.
//!
//! Every `--etcd-tls-reload-interval` the three paths are opened again and read in full.
//! Opening the path each time follows the symlinks as they are now, so Kubernetes' update of
//! a Secret volume (the `..data` symlink swapped to a new timestamped directory; the file
//! names are symlinks through `..data`) is seen like an in-place write or a `mv`: only the
//! contents count. A periodic read of three small files is chosen over inotify because an
//! inotify watch follows an inode, and the swap replaces the directory behind the name.
//!
//! A changed set is taken once it reads the same twice in a row (a tool writing the
//! files one after the other is not caught half way), then validated: every file parses as
//! PEM, the certificate is valid now, the key is the certificate's. Then the store builds
//! new clients, checks that etcd answers through them (the handshake, the server's trust in
//! the new certificate), and swaps them in for the lease holder, the lease watch and the
//! health publisher; the etcd lease ID is server-side, so the same lease is renewed over the
//! new connection and the watch resumes from its revision. A set that fails any step is
//! logged once (naming the file and why), counted, and noted on `/readyz`; the old clients
//! stay in use, and the data plane is never touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{error, info, warn};
use twill_ipam::store::{LeaseStore, TlsMaterial, inner_error};

use super::metrics::Shared;

/// Which files to watch and how often.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub interval: Duration,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The reload metrics.
#[derive(Clone)]
pub struct TlsMetrics {
    reloads: Family<ResultLabel, Counter>,
    cert_expiry: Gauge<f64, AtomicU64>,
    rejected: Gauge,
}

impl TlsMetrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = TlsMetrics {
            reloads: Family::default(),
            cert_expiry: Gauge::default(),
            rejected: Gauge::default(),
        };
        reg.register(
            "twill_etcd_tls_reloads",
            "Changed etcd TLS file sets handled, by result (ok: in use; error: rejected, once per change)",
            m.reloads.clone(),
        );
        reg.register(
            "twill_etcd_cert_expiry_timestamp_seconds",
            "notAfter of the etcd client certificate in use (Unix time; 0: none)",
            m.cert_expiry.clone(),
        );
        reg.register(
            "twill_etcd_tls_files_rejected",
            "1 while the etcd TLS files on disk differ from the ones in use and were rejected",
            m.rejected.clone(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }
}

/// What is wrong with a set of TLS files: the file and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {}: {why}", path.display())]
pub struct BadFile {
    pub what: &'static str,
    pub path: PathBuf,
    pub why: String,
}

fn bad(what: &'static str, path: &Path, why: impl Into<String>) -> BadFile {
    BadFile {
        what,
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The certificates of a PEM file (DER), or why not.
fn pem_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, BadFile> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| bad(what, path, format!("not PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    if out.is_empty() {
        return Err(bad(what, path, "no PEM CERTIFICATE block"));
    }
    Ok(out)
}

/// A certificate's notAfter (Unix seconds), or why it is not usable now.
fn check_cert(what: &'static str, path: &Path, der: &[u8], now: i64) -> Result<i64, BadFile> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(what, path, format!("not an X.509 certificate: {e}")))?;
    let v = c.validity();
    let subject = c.subject().to_string();
    if now > v.not_after.timestamp() {
        return Err(bad(
            what,
            path,
            format!("certificate {subject:?} expired at {}", v.not_after),
        ));
    }
    if now < v.not_before.timestamp() {
        return Err(bad(
            what,
            path,
            format!(
                "certificate {subject:?} is not valid before {}",
                v.not_before
            ),
        ));
    }
    Ok(v.not_after.timestamp())
}

/// The client certificate of a valid set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// notAfter, Unix seconds.
    pub not_after: i64,
    pub subject: String,
    pub issuer: String,
}

/// Checks a set read from `files` at time `now` (Unix seconds). Returns its client
/// certificate, if there is one.
pub fn validate(
    files: &TlsFiles,
    m: &TlsMaterial,
    now: i64,
) -> Result<Option<ClientCert>, BadFile> {
    if let (Some(p), Some(ca)) = (&files.ca, &m.ca) {
        let certs = pem_certs("CA file", p, ca)?;
        // A bundle may keep an old CA for a while; it needs one that is valid now.
        let errs: Vec<BadFile> = certs
            .iter()
            .filter_map(|d| check_cert("CA file", p, d, now).err())
            .collect();
        if errs.len() == certs.len() {
            return Err(errs.into_iter().next().expect("at least one certificate"));
        }
    }
    let (Some(cp), Some(kp), Some(cert), Some(key)) = (&files.cert, &files.key, &m.cert, &m.key)
    else {
        return Ok(None);
    };
    let chain = pem_certs("client certificate", cp, cert)?;
    let not_after = check_cert("client certificate", cp, &chain[0], now)?;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let der = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| bad("client key", kp, format!("no PEM private key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| bad("client key", kp, format!("unusable private key: {e}")))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| bad("client certificate", cp, format!("not X.509: {e}")))?;
    if let Some(spki) = signer.public_key()
        && spki.as_ref() != leaf.public_key().raw
    {
        return Err(bad(
            "client key",
            kp,
            format!(
                "does not match the client certificate {} (another key pair)",
                cp.display()
            ),
        ));
    }
    Ok(Some(ClientCert {
        not_after,
        subject: leaf.subject().to_string(),
        issuer: leaf.issuer().to_string(),
    }))
}

/// Reads the files: the first that cannot be read is the error.
fn read(files: &TlsFiles) -> Result<TlsMaterial, BadFile> {
    let rd = |what: &'static str, p: &Option<PathBuf>| {
        p.as_deref()
            .map(|p| std::fs::read(p).map_err(|e| bad(what, p, format!("cannot read: {e}"))))
            .transpose()
    };
    Ok(TlsMaterial {
        ca: rd("CA file", &files.ca)?,
        cert: rd("client certificate", &files.cert)?,
        key: rd("client key", &files.key)?,
    })
}

fn expiry(c: &Option<ClientCert>) -> f64 {
    c.as_ref().map_or(0.0, |c| c.not_after as f64)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Starts the reload task if TLS files are configured and the interval is not zero.
pub fn spawn(files: TlsFiles, store: LeaseStore, metrics: TlsMetrics, shared: Arc<Shared>) {
    if files.is_empty() {
        return;
    }
    // The set the store was built from (read just before): its expiry is the metric's.
    let initial = read(&files).ok();
    if let Some(m) = &initial {
        match validate(&files, m, unix_now()) {
            Ok(cert) => {
                metrics.cert_expiry.set(expiry(&cert));
            }
            Err(e) => warn!(error = %e, "the etcd TLS files in use have a problem"),
        }
    }
    if files.interval.is_zero() {
        return;
    }
    tokio::spawn(run(files, store, metrics, shared, initial));
}

/// The outcome of a set that was not taken, remembered so that it is logged once.
#[derive(PartialEq)]
enum Failed {
    Read(BadFile),
    Set(TlsMaterial),
}

async fn run(
    files: TlsFiles,
    store: LeaseStore,
    metrics: TlsMetrics,
    shared: Arc<Shared>,
    mut applied: Option<TlsMaterial>,
) {
    let debounce = (files.interval / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut failed: Option<Failed> = None;
    let mut tick = tokio::time::interval(files.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let mut m = match read(&files) {
            Ok(m) => m,
            Err(e) => {
                let f = Failed::Read(e.clone());
                if failed.as_ref() != Some(&f) {
                    error!(error = %e, "etcd TLS files not reloaded: keeping the ones in use");
                    metrics.count("error");
                    metrics.rejected.set(1);
                    note(&shared, &store, format!("{e}")).await;
                    failed = Some(f);
                }
                continue;
            }
        };
        let back = |failed: &mut Option<Failed>| {
            if failed.take().is_some() {
                info!("the etcd TLS files are back to the ones in use");
                metrics.rejected.set(0);
                shared.set_etcd_tls_problem(None);
            }
        };
        if applied.as_ref() == Some(&m) {
            back(&mut failed);
            continue;
        }
        // Taken once it reads the same twice in a row.
        let mut stable = false;
        for _ in 0..10 {
            tokio::time::sleep(debounce).await;
            match read(&files) {
                Ok(again) if again == m => {
                    stable = true;
                    break;
                }
                Ok(again) => m = again,
                Err(_) => break,
            }
        }
        if !stable {
            continue;
        }
        if applied.as_ref() == Some(&m) {
            back(&mut failed);
            continue;
        }
        let is_new = failed.as_ref() != Some(&Failed::Set(m.clone()));
        let cert = match validate(&files, &m, unix_now()) {
            Ok(c) => c,
            Err(e) => {
                if is_new {
                    error!(error = %e, "etcd TLS files not reloaded: keeping the ones in use");
                    metrics.count("error");
                    metrics.rejected.set(1);
                    note(&shared, &store, e.to_string()).await;
                    failed = Some(Failed::Set(m));
                }
                continue;
            }
        };
        // Valid files that etcd refuses (e.g. not yet trusted by the server) are tried again
        // on every tick, and logged once.
        match store.reload_tls(&m).await {
            Ok(endpoint) => {
                let (subject, issuer) = cert
                    .as_ref()
                    .map(|c| (c.subject.as_str(), c.issuer.as_str()))
                    .unwrap_or_default();
                info!(%endpoint, generation = store.generation(), subject, issuer, cert_not_after = cert.as_ref().map_or(0, |c| c.not_after), "etcd TLS files reloaded: new clients in use");
                metrics.count("ok");
                metrics.rejected.set(0);
                metrics.cert_expiry.set(expiry(&cert));
                shared.set_etcd_tls_problem(None);
                applied = Some(m);
                failed = None;
            }
            Err(e) => {
                if is_new {
                    // With TLS 1.3 a client learns of the server's refusal of its certificate
                    // only as a closed connection: say which certificate it was.
                    let mut why = inner_error(&e);
                    if let Some(c) = &cert {
                        why = format!(
                            "{why} (client certificate {:?} issued by {:?}: is that CA in etcd's --trusted-ca-file, and the certificate not revoked?)",
                            c.subject, c.issuer
                        );
                    }
                    error!(error = %why, cert = ?files.cert, "etcd TLS files not reloaded: etcd does not accept a connection made with them; keeping the ones in use");
                    metrics.count("error");
                    metrics.rejected.set(1);
                    note(
                        &shared,
                        &store,
                        format!("etcd refused the new files: {why}"),
                    )
                    .await;
                    failed = Some(Failed::Set(m));
                } else {
                    note_old(&shared, &store).await;
                }
            }
        }
    }
}

/// Puts the reason on /readyz, with whether the clients in use still work.
async fn note(shared: &Shared, store: &LeaseStore, why: String) {
    let old = match store.ping().await {
        Ok(()) => "the clients in use still work".to_string(),
        Err(e) => format!("the clients in use fail too: {}", inner_error(&e)),
    };
    shared.set_etcd_tls_problem(Some(format!("new etcd TLS files rejected: {why}; {old}")));
}

async fn note_old(shared: &Shared, store: &LeaseStore) {
    if let Some(prev) = shared.etcd_tls_problem() {
        let head = prev.split("; the clients in use").next().unwrap_or(&prev);
        let old = match store.ping().await {
            Ok(()) => "the clients in use still work".to_string(),
            Err(e) => format!("the clients in use fail too: {}", inner_error(&e)),
        };
        shared.set_etcd_tls_problem(Some(format!("{head}; {old}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> TlsFiles {
        TlsFiles {
            ca: Some("/certs/ca.crt".into()),
            cert: Some("/certs/tls.crt".into()),
            key: Some("/certs/tls.key".into()),
            interval: Duration::from_secs(5),
        }
    }

    struct Ca {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        pem: String,
    }

    fn ca(cn: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// (cert PEM, key PEM) signed by `ca`, valid from `from` to `to` (years).
    fn leaf(ca: &Ca, from: i32, to: i32) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    fn set(ca: &Ca, cert: &str, key: &str) -> TlsMaterial {
        TlsMaterial {
            ca: Some(ca.pem.clone().into_bytes()),
            cert: Some(cert.as_bytes().to_vec()),
            key: Some(key.as_bytes().to_vec()),
        }
    }

    // 2030-01-01.
    const NOW: i64 = 1_893_456_000;

    #[test]
    fn good_set_gives_the_expiry() {
        let a = ca("a");
        let (c, k) = leaf(&a, 2020, 2099);
        let cert = validate(&files(), &set(&a, &c, &k), NOW).unwrap().unwrap();
        assert_eq!(cert.not_after, 4_070_908_800, "2099-01-01");
        assert_eq!(cert.issuer, "CN=a");
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let a = ca("a");
        let (c, k) = leaf(&a, 2020, 2021);
        let e = validate(&files(), &set(&a, &c, &k), NOW).unwrap_err();
        assert_eq!(e.path, PathBuf::from("/certs/tls.crt"));
        assert!(e.why.contains("expired at"), "{e}");
        let (c, k) = leaf(&a, 2090, 2099);
        let e = validate(&files(), &set(&a, &c, &k), NOW).unwrap_err();
        assert!(e.why.contains("not valid before"), "{e}");
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let a = ca("a");
        let (c, _) = leaf(&a, 2020, 2099);
        let (_, k2) = leaf(&a, 2020, 2099);
        let e = validate(&files(), &set(&a, &c, &k2), NOW).unwrap_err();
        assert_eq!(e.path, PathBuf::from("/certs/tls.key"));
        assert!(e.why.contains("does not match"), "{e}");
        // A certificate where the key should be.
        let e = validate(&files(), &set(&a, &c, &c), NOW).unwrap_err();
        assert!(e.why.contains("no PEM private key"), "{e}");
    }

    #[test]
    fn ca_bundle_needs_one_valid_ca() {
        let a = ca("a");
        let b = ca("b");
        let (c, k) = leaf(&a, 2020, 2099);
        let mut m = set(&a, &c, &k);
        m.ca = Some(format!("{}{}", a.pem, b.pem).into_bytes());
        validate(&files(), &m, NOW).unwrap();
        m.ca = Some(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec());
        let e = validate(&files(), &m, NOW).unwrap_err();
        assert_eq!(e.path, PathBuf::from("/certs/ca.crt"), "{e}");
    }

    #[test]
    fn garbage_names_the_file() {
        let m = TlsMaterial {
            ca: Some(b"not pem".to_vec()),
            cert: Some(b"x".to_vec()),
            key: Some(b"y".to_vec()),
        };
        let e = validate(&files(), &m, 0).unwrap_err();
        assert_eq!(e.path, PathBuf::from("/certs/ca.crt"), "{e}");
        assert!(e.to_string().starts_with("CA file /certs/ca.crt: "), "{e}");
    }
}
