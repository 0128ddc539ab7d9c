//! Certificates for `twillctl doctor`: the validity window of the etcd CA and client
//! certificate, whether the CA signed the client certificate, whether the key belongs to
//! it, and the certificate the etcd server presents in a real TLS handshake (rustls, ring,
//! the configured CA and client identity: the same trust twilld has).

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Doctor warns when a certificate expires within this (its `--cert-warn` default).
pub const CERT_WARN_DEFAULT: &str = "30d";

/// Largest PEM file read (a CA bundle of a few hundred certificates fits).
const MAX_PEM: u64 = 1 << 20;

/// The parts of one certificate that the checks use.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub der: Vec<u8>,
}

/// Where a certificate stands in its validity window at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    NotYetValid,
    Expired,
    /// Valid, but expires within the warning window.
    ExpiresSoon,
    Valid,
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs as u64))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// The date as people read it (UTC, to the second).
pub fn date(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration in days (to the nearest), or hours below two days.
pub fn days(d: Duration) -> String {
    let h = d.as_secs() / 3600;
    if h >= 48 {
        format!("{} days", (h + 12) / 24)
    } else {
        format!("{h} h")
    }
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        Ok(CertInfo {
            subject: c.subject().to_string(),
            issuer: c.issuer().to_string(),
            not_before: unix_to_system(c.validity().not_before.timestamp()),
            not_after: unix_to_system(c.validity().not_after.timestamp()),
            der: der.to_vec(),
        })
    }

    /// Where this certificate stands at `now`, warning `warn` ahead of its expiry.
    pub fn validity(&self, now: SystemTime, warn: Duration) -> Validity {
        if now < self.not_before {
            Validity::NotYetValid
        } else if now >= self.not_after {
            Validity::Expired
        } else if self.not_after.duration_since(now).unwrap_or_default() < warn {
            Validity::ExpiresSoon
        } else {
            Validity::Valid
        }
    }

    /// Whether `ca`'s key made this certificate's signature (not only a matching issuer
    /// name). `Err` when the algorithm is one ring does not know.
    pub fn signed_by(&self, ca: &CertInfo) -> Result<bool, String> {
        let (_, me) = x509_parser::parse_x509_certificate(&self.der).map_err(|e| e.to_string())?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca.der).map_err(|e| e.to_string())?;
        match me.verify_signature(Some(ca.public_key())) {
            Ok(()) => Ok(true),
            Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => {
                Err("signature algorithm not supported by the check".into())
            }
            Err(_) => Ok(false),
        }
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    f.take(MAX_PEM + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_PEM {
        return Err(format!("larger than {MAX_PEM} bytes"));
    }
    Ok(buf)
}

/// Every certificate of a PEM file, in order. An error says what is wrong (the caller
/// names the file).
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertInfo>, String> {
    let pem = read_bounded(path)?;
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("not PEM: {e}"))?;
        out.push(CertInfo::from_der(&c).map_err(|e| format!("not an X.509 certificate: {e}"))?);
    }
    if out.is_empty() {
        return Err("no CERTIFICATE block in it".into());
    }
    Ok(out)
}

/// Whether the private key in `key_file` belongs to `cert`: `Ok(None)` when that cannot be
/// told for this key type.
pub fn key_matches(cert: &CertInfo, key_file: &Path) -> Result<Option<bool>, String> {
    let pem = read_bounded(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("no private key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let ck = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(cert.der.clone())], signer);
    match ck.keys_match() {
        Ok(()) => Ok(Some(true)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Ok(Some(false))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Records the certificates the server presents, then lets the standard verifier decide.
#[derive(Debug)]
struct Capture {
    inner: Arc<dyn ServerCertVerifier>,
    seen: Mutex<Vec<Vec<u8>>>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(end_entity.to_vec());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the TLS handshake with one endpoint showed.
#[derive(Debug)]
pub struct ServerCert {
    /// The server's own certificate, when it sent one.
    pub leaf: Option<CertInfo>,
    /// Why the handshake failed (verification or otherwise), `None` when it succeeded.
    pub error: Option<String>,
}

/// `host:port` and the TLS server name of an `https://` endpoint.
fn split_endpoint(ep: &str) -> Result<(String, ServerName<'static>), String> {
    let rest = ep
        .strip_prefix("https://")
        .ok_or_else(|| format!("endpoint {ep}: not https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| format!("endpoint {ep}: bad IPv6 address"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("2379"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), "2379"),
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("endpoint {ep}: bad port {port:?}"))?;
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone())
            .map_err(|e| format!("endpoint {ep}: bad host name: {e}"))?,
    };
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((addr, name))
}

/// A TLS handshake with `ep` (`https://host:port`) trusting the CA certificates in
/// `ca_file`, presenting `client` (cert, key files) if given; the connection is closed
/// right after, nothing is sent over it. `Err` when no handshake could start (no TCP
/// connection, unusable files).
pub async fn server_cert(
    ep: &str,
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
    timeout: Duration,
) -> Result<ServerCert, String> {
    let (addr, name) = split_endpoint(ep)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = read_bounded(ca_file)?;
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("CA file: {e}"))?;
        roots.add(c).map_err(|e| format!("CA file: {e}"))?;
    }
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("CA file: {e}"))?;
    let capture = Arc::new(Capture {
        inner,
        seen: Mutex::new(Vec::new()),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone());
    let config = match client {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&read_bounded(cert)?)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("client certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(&read_bounded(key)?)
                .map_err(|e| format!("client key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate and key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok::<_, String>(connector.connect(name, tcp).await)
    };
    let handshake = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("{addr}: no TLS handshake within {timeout:?}"))??;
    let leaf = capture
        .seen
        .lock()
        .ok()
        .and_then(|s| s.first().cloned())
        .map(|der| CertInfo::from_der(&der))
        .transpose()?;
    Ok(ServerCert {
        leaf,
        error: handshake.err().map(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(from: i64, to: i64) -> CertInfo {
        CertInfo {
            subject: "CN=x".into(),
            issuer: "CN=ca".into(),
            not_before: unix_to_system(from),
            not_after: unix_to_system(to),
            der: Vec::new(),
        }
    }

    #[test]
    fn validity_window_and_warning() {
        let day = 86_400;
        let now = unix_to_system(100 * day);
        let warn = Duration::from_secs(30 * day as u64);
        assert_eq!(
            cert(101 * day, 200 * day).validity(now, warn),
            Validity::NotYetValid
        );
        assert_eq!(cert(0, 100 * day).validity(now, warn), Validity::Expired);
        assert_eq!(cert(0, 99 * day).validity(now, warn), Validity::Expired);
        assert_eq!(
            cert(0, 105 * day).validity(now, warn),
            Validity::ExpiresSoon
        );
        assert_eq!(
            cert(0, 129 * day).validity(now, warn),
            Validity::ExpiresSoon
        );
        assert_eq!(cert(0, 131 * day).validity(now, warn), Validity::Valid);
        // Dates before 1970 (x509 allows them) do not wrap.
        assert_eq!(cert(-5 * day, -day).validity(now, warn), Validity::Expired);
    }

    #[test]
    fn endpoints_split_into_address_and_name() {
        let (a, n) = split_endpoint("https://127.0.0.1:2379").unwrap();
        assert_eq!(a, "127.0.0.1:2379");
        assert!(matches!(n, ServerName::IpAddress(_)));
        let (a, n) = split_endpoint("https://etcd-0.example:2380/").unwrap();
        assert_eq!(a, "etcd-0.example:2380");
        assert!(matches!(n, ServerName::DnsName(_)));
        let (a, _) = split_endpoint("https://[::1]:2379").unwrap();
        assert_eq!(a, "[::1]:2379");
        assert_eq!(split_endpoint("https://etcd").unwrap().0, "etcd:2379");
        let e = split_endpoint("https://h:99999").unwrap_err();
        assert!(e.contains("99999"), "{e}");
        assert!(split_endpoint("http://h:1").is_err());
    }

    #[test]
    fn days_reads_well() {
        assert_eq!(days(Duration::from_secs(5 * 86_400 + 100)), "5 days");
        // A certificate of 5 days, checked a minute after it was made.
        assert_eq!(days(Duration::from_secs(5 * 86_400 - 60)), "5 days");
        assert_eq!(days(Duration::from_secs(30 * 3600)), "30 h");
    }
}
