//! Issue 14, certificate rotation: twilld picks up replaced etcd client certificate, key and
//! CA files without a restart, keeping its lease and its routes throughout.
//!
//! A real etcd with TLS and `--client-cert-auth` (certificates from rcgen), a real cluster of
//! two twilld nodes with a pod each pinging across, and the TLS files laid out like a
//! Kubernetes Secret volume (`..data` → a timestamped directory, the file names symlinks
//! through `..data`), updated the way the kubelet does it (a new directory, `..data`
//! swapped atomically, the old directory deleted). Then:
//! 1. a new client certificate from the same CA; etcd is then restarted with a CRL that
//!    revokes the old certificate, so a twilld still using it could not reconnect;
//! 2. a client certificate from a second CA that etcd also trusts; etcd is then restarted
//!    trusting only that second CA;
//! 3. an expired certificate, then a key that is not the certificate's, then a valid
//!    certificate that etcd does not trust: each is refused with a clear error in the log, the
//!    metric and `/readyz`, while the clients in use go on.
//!
//! Throughout: no ping lost, each node's lease (subnet and etcd lease ID) unchanged, no
//! route changed, renewals going on after each etcd restart. Without the reload, the renewals
//! after the first restart fail (the old certificate is revoked), and the test fails.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};
use twill_tests::cluster::{BackgroundPing, Cluster, ClusterOpts, metric, wait_for};
use twill_tests::etcd::{EtcdServer, ServerTls};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(cn: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2099, 1, 1);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

struct Leaf {
    cert: String,
    key: String,
}

/// A certificate signed by `ca`: a client certificate, or the server's (SAN 127.0.0.1).
fn leaf(ca: &Ca, cn: &str, serial: u64, server: bool, years: (i32, i32)) -> Leaf {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(SerialNumber::from(serial));
    p.not_before = date_time_ymd(years.0, 1, 1);
    p.not_after = date_time_ymd(years.1, 1, 1);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if server {
        p.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    Leaf {
        cert: p.signed_by(&key, &issuer).unwrap().pem(),
        key: key.serialize_pem(),
    }
}

/// A CRL of `ca` revoking `serials`.
fn crl(ca: &Ca, serials: &[u64]) -> String {
    let p = CertificateRevocationListParams {
        this_update: date_time_ymd(2024, 1, 1),
        next_update: date_time_ymd(2098, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    p.signed_by(&Issuer::from_params(&ca.params, &ca.key))
        .unwrap()
        .pem()
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A directory laid out like a Kubernetes Secret volume, updated like the kubelet does.
struct SecretVolume {
    dir: PathBuf,
    n: u32,
    current: Option<PathBuf>,
}

impl SecretVolume {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
        SecretVolume {
            dir,
            n: 0,
            current: None,
        }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// A new timestamped dir with the files, `..data` swapped to it by a rename, the old dir
    /// deleted.
    fn update(&mut self, ca: &str, cert: &str, key: &str) {
        self.n += 1;
        let ts = format!("..2026_01_01_00_00_{:02}.{}", self.n, 100 + self.n);
        let new = self.dir.join(&ts);
        std::fs::create_dir(&new).unwrap();
        write(&new, "ca.crt", ca);
        write(&new, "tls.crt", cert);
        write(&new, "tls.key", key);
        let tmp = self.dir.join("..data_tmp");
        symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(new) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

/// The value of `name{result="<result>"}` in a metrics text.
fn reloads(text: &str, result: &str) -> f64 {
    let want = format!("twill_etcd_tls_reloads_total{{result=\"{result}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&want)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// (subnet, etcd lease ID) per node name, read by the harness.
fn leases(etcd: &EtcdServer) -> Vec<(String, String, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opts = etcd.options(twill_tests::cluster::ETCD_PREFIX);
    rt.block_on(async {
        let store = twill_ipam::store::LeaseStore::connect(opts).await.unwrap();
        let (ls, _) = store.list().await.unwrap();
        let mut v: Vec<_> = ls
            .into_iter()
            .map(|l| (l.attrs.node_name, l.subnet.to_string(), l.etcd_lease))
            .collect();
        v.sort();
        v
    })
}

fn renewals(c: &Cluster, i: usize) -> f64 {
    metric(&c.nodes[i].metrics(), "twill_lease_renewals_total").unwrap_or(0.0)
}

/// Waits until every node counts `ok` successful and `err` refused reloads.
fn wait_reloads(c: &Cluster, ok: f64, err: f64, what: &str) {
    for (i, n) in c.nodes.iter().enumerate() {
        let got = wait_for(Duration::from_secs(20), || {
            let m = n.metrics();
            (reloads(&m, "ok") == ok && reloads(&m, "error") == err).then_some(())
        });
        assert!(
            got.is_some(),
            "{what}: node {i} did not count ok={ok} error={err}:\n{}\n{}",
            n.metrics(),
            n.log_text()
        );
    }
}

/// Waits until every node renewed its lease twice after now (bounded).
fn wait_renewals(c: &Cluster, what: &str) {
    let before: Vec<f64> = (0..c.nodes.len()).map(|i| renewals(c, i)).collect();
    for (i, b) in before.iter().enumerate() {
        let got = wait_for(Duration::from_secs(30), || {
            (renewals(c, i) >= b + 2.0).then_some(())
        });
        assert!(
            got.is_some(),
            "{what}: node {i} stopped renewing its lease:\n{}",
            c.nodes[i].log_text()
        );
    }
}

#[test]
fn etcd_certificates_rotate_without_a_restart_and_bad_ones_are_refused() {
    twill_tests::cluster::require_root();
    let tmp = tempfile::Builder::new()
        .prefix("tw-certrot-")
        .tempdir()
        .unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca_a = ca("twill-test-ca-a");
    let ca_b = ca("twill-test-ca-b");
    let server = leaf(&ca_a, "etcd-server", 10, true, (2020, 2099));
    // The harness's own client: from CA B, which etcd trusts throughout.
    let harness = leaf(&ca_b, "twill-test-harness", 11, false, (2020, 2099));
    let c1 = leaf(&ca_a, "twill-node-1", 101, false, (2020, 2099));
    let c2 = leaf(&ca_a, "twill-node-2", 102, false, (2020, 2099));
    let c3 = leaf(&ca_b, "twill-node-3", 103, false, (2020, 2099));
    let expired = leaf(&ca_b, "twill-node-expired", 104, false, (2020, 2021));
    let bundle_ab = write(&pki, "trusted-ab.pem", &format!("{}{}", ca_a.pem, ca_b.pem));
    let bundle_b = write(&pki, "trusted-b.pem", &ca_b.pem);
    let crl_a = write(&pki, "crl-a.pem", &crl(&ca_a, &[101]));
    let mut tls = ServerTls {
        server_cert: write(&pki, "server.crt", &server.cert),
        server_key: write(&pki, "server.key", &server.key),
        trusted_ca: bundle_ab.clone(),
        crl: None,
        client_ca: write(&pki, "ca-a.crt", &ca_a.pem),
        client_cert: write(&pki, "harness.crt", &harness.cert),
        client_key: write(&pki, "harness.key", &harness.key),
    };
    let etcd = EtcdServer::start_with_tls(tls.clone()).unwrap();

    // Both nodes mount the same Secret: CA A (etcd's server CA), client certificate c1.
    let mut vol = SecretVolume::new(tmp.path().join("etcd-tls"));
    vol.update(&ca_a.pem, &c1.cert, &c1.key);
    let args = vec![
        "--etcd-cafile".to_string(),
        vol.path("ca.crt").display().to_string(),
        "--etcd-certfile".to_string(),
        vol.path("tls.crt").display().to_string(),
        "--etcd-keyfile".to_string(),
        vol.path("tls.key").display().to_string(),
        "--etcd-tls-reload-interval".to_string(),
        "500ms".to_string(),
    ];
    let mut c = Cluster::start_with_etcd(
        ClusterOpts {
            nodes: 2,
            pods_per_node: 1,
            lease_ttl: Duration::from_secs(6),
            extra_args: args,
            ..ClusterOpts::default()
        },
        etcd,
    )
    .unwrap();
    let leases0 = leases(&c.etcd);
    assert_eq!(leases0.len(), 2, "{leases0:?}");
    let routes0: Vec<Vec<String>> = c.nodes.iter().map(|n| n.overlay_routes()).collect();
    assert!(routes0.iter().all(|r| !r.is_empty()), "{routes0:?}");
    let expiry0 = metric(
        &c.nodes[0].metrics(),
        "twill_etcd_cert_expiry_timestamp_seconds",
    );
    assert_eq!(expiry0, Some(4_070_908_800.0), "c1's notAfter: 2099-01-01");

    let dst1 = c.nodes[1].pods[0].ip;
    let dst0 = c.nodes[0].pods[0].ip;
    let ping01 =
        BackgroundPing::start(&c.nodes[0].pods[0].ns, dst1, Duration::from_millis(100)).unwrap();
    let ping10 =
        BackgroundPing::start(&c.nodes[1].pods[0].ns, dst0, Duration::from_millis(100)).unwrap();

    // 1. A new client certificate from the same CA, then the old one revoked.
    vol.update(&ca_a.pem, &c2.cert, &c2.key);
    wait_reloads(&c, 1.0, 0.0, "same-CA rotation");
    tls.crl = Some(crl_a.clone());
    c.etcd.set_tls(tls.clone());
    c.etcd.restart().unwrap();
    wait_renewals(&c, "after etcd revoked the old certificate");

    // 2. A client certificate from CA B (etcd trusts A and B), then etcd trusts only B.
    vol.update(&ca_a.pem, &c3.cert, &c3.key);
    wait_reloads(&c, 2.0, 0.0, "new-CA rotation");
    tls.trusted_ca = bundle_b.clone();
    c.etcd.set_tls(tls.clone());
    c.etcd.restart().unwrap();
    wait_renewals(&c, "after etcd stopped trusting CA A");

    // 3. Bad sets: each refused once, with the file and the reason; c3 stays in use.
    vol.update(&ca_a.pem, &expired.cert, &expired.key);
    wait_reloads(&c, 2.0, 1.0, "expired certificate");
    for n in &c.nodes {
        let log = n.log_text();
        assert!(
            log.contains("etcd TLS files not reloaded")
                && log.contains("tls.crt")
                && log.contains("expired at"),
            "{log}"
        );
        let (code, body) = n.http("/readyz").unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("expired at") && body.contains("the clients in use still work"),
            "{body}"
        );
        assert_eq!(
            metric(&n.metrics(), "twill_etcd_tls_files_rejected"),
            Some(1.0)
        );
    }
    // A key that is not the certificate's.
    vol.update(&ca_a.pem, &c3.cert, &c2.key);
    wait_reloads(&c, 2.0, 2.0, "mismatched key");
    for n in &c.nodes {
        let log = n.log_text();
        assert!(
            log.contains("tls.key") && log.contains("does not match the client certificate"),
            "{log}"
        );
    }
    // A valid certificate that etcd no longer trusts (CA A): the handshake check refuses it.
    vol.update(&ca_a.pem, &c2.cert, &c2.key);
    wait_reloads(&c, 2.0, 3.0, "certificate etcd does not trust");
    for n in &c.nodes {
        let log = n.log_text();
        assert!(
            log.contains("etcd does not accept a connection made with them")
                && log.contains("CN=twill-node-2")
                && log.contains("CN=twill-test-ca-a"),
            "{log}"
        );
        let (code, body) = n.http("/readyz").unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("etcd refused the new files"), "{body}");
    }
    // The refused set is retried quietly: still counted once.
    wait_renewals(&c, "with refused files on disk");
    for n in &c.nodes {
        assert_eq!(reloads(&n.metrics(), "error"), 3.0);
    }
    // Back to the set in use: the warning goes, and nothing is reloaded for it.
    vol.update(&ca_a.pem, &c3.cert, &c3.key);
    for n in &c.nodes {
        let cleared = wait_for(Duration::from_secs(10), || {
            let (code, body) = n.http("/readyz").ok()?;
            (code == 200 && !body.contains("warning")).then_some(())
        });
        assert!(cleared.is_some(), "{}", n.log_text());
    }

    for n in &c.nodes {
        assert!(
            n.log_text().contains("back to the ones in use"),
            "{}",
            n.log_text()
        );
        assert_eq!(reloads(&n.metrics(), "ok"), 2.0);
    }
    for l in c.nodes[0]
        .log_text()
        .lines()
        .filter(|l| l.contains("TLS") || l.contains("clients replaced"))
    {
        eprintln!("node-1: {l}");
    }

    // Throughout: no ping lost, leases and routes as they were, no lease lost.
    let (tx01, rx01) = ping01.finish().unwrap();
    let (tx10, rx10) = ping10.finish().unwrap();
    eprintln!("pings: node0→node1 {rx01}/{tx01}, node1→node0 {rx10}/{tx10}");
    assert!(tx01 > 50 && tx10 > 50, "{tx01} {tx10}");
    assert_eq!((rx01, rx10), (tx01, tx10), "pings lost\n{}", c.logs());
    assert_eq!(leases(&c.etcd), leases0, "a lease changed\n{}", c.logs());
    let routes1: Vec<Vec<String>> = c.nodes.iter().map(|n| n.overlay_routes()).collect();
    assert_eq!(routes1, routes0, "routes changed");
    for n in &c.nodes {
        let m = n.metrics();
        assert_eq!(
            metric(&m, "twill_lease_losses_total"),
            Some(0.0),
            "{}",
            n.log_text()
        );
        assert!(!n.log_text().contains("lost the subnet lease"));
    }
}
