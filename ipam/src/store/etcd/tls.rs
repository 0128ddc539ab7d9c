//! The etcd clients: endpoint URLs, TLS material, one client per endpoint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::EtcdOptions;
use crate::store::StoreError;

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The PEM contents of the TLS files: what a client is built from.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsMaterial {
    /// CA bundle that signed etcd's server certificate.
    pub ca: Option<Vec<u8>>,
    /// Client certificate (chain).
    pub cert: Option<Vec<u8>>,
    /// Client private key.
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key's bytes.
        f.debug_struct("TlsMaterial")
            .field("ca_bytes", &self.ca.as_ref().map(Vec::len))
            .field("cert_bytes", &self.cert.as_ref().map(Vec::len))
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsMaterial {
    /// Reads the files named in `opts` (each one that is set).
    pub fn read(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let rd = |what, p: &Option<PathBuf>| p.as_deref().map(|p| read_file(what, p)).transpose();
        Ok(TlsMaterial {
            ca: rd("CA file", &opts.ca_file)?,
            cert: rd("client certificate", &opts.cert_file)?,
            key: rd("client key", &opts.key_file)?,
        })
    }
}

/// Whether `opts` names any TLS file.
pub(super) fn wants_tls(opts: &EtcdOptions) -> bool {
    opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some()
}

/// The endpoint URLs with their scheme: `http://` unless TLS files are given (a bare
/// `host:port` then gets `https://`); `http://` together with TLS files is an error.
pub(super) fn endpoint_urls(opts: &EtcdOptions) -> Result<Vec<String>, StoreError> {
    let tls = wants_tls(opts);
    let mut endpoints = Vec::new();
    for e in &opts.endpoints {
        let e = e.trim();
        if e.starts_with("http://") {
            if tls {
                return Err(StoreError::Options(format!(
                    "endpoint {e} is http:// but TLS files are given: use https://"
                )));
            }
            endpoints.push(e.to_string());
        } else if e.starts_with("https://") {
            endpoints.push(e.to_string());
        } else if e.contains("://") {
            return Err(StoreError::Options(format!(
                "endpoint {e}: scheme must be http:// or https://"
            )));
        } else {
            let scheme = if tls { "https" } else { "http" };
            endpoints.push(format!("{scheme}://{e}"));
        }
    }
    Ok(endpoints)
}

/// One client per endpoint, with TLS from `material` if given. Connects lazily.
pub(super) async fn build_clients(
    endpoints: &[String],
    opts: &EtcdOptions,
    material: Option<&TlsMaterial>,
) -> Result<Vec<Client>, StoreError> {
    let mut co = ConnectOptions::new()
        .with_connect_timeout(opts.timeout)
        .with_keep_alive(Duration::from_secs(10), opts.timeout)
        .with_keep_alive_while_idle(true);
    if let Some(m) = material {
        let mut t = TlsOptions::new();
        if let Some(ca) = &m.ca {
            t = t.ca_certificate(Certificate::from_pem(ca.clone()));
        }
        match (&m.cert, &m.key) {
            (Some(c), Some(k)) => {
                t = t.identity(Identity::from_pem(c.clone(), k.clone()));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Options(
                    "--etcd-certfile and --etcd-keyfile go together".into(),
                ));
            }
        }
        co = co.with_tls(t);
    }
    let mut clients = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        clients.push(
            Client::connect([e.as_str()], Some(co.clone()))
                .await
                .map_err(|err| StoreError::Options(format!("endpoint {e}: {err}")))?,
        );
    }
    Ok(clients)
}
