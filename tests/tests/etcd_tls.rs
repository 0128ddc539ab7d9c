//! mTLS to etcd: certificates made in the test (openssl CLI), etcd with --client-cert-auth.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use twill_ipam::lease::{LeaseAttrs, LeaseEvent};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::{LeaseStore, StoreError};
use twill_tests::bins::bin;
use twill_tests::etcd::EtcdServer;

const PREFIX: &str = "/tw-tls/network";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_works_and_clients_without_a_valid_cert_are_refused() {
    let etcd = EtcdServer::start_tls().unwrap();
    assert!(etcd.endpoint().starts_with("https://"));
    let tls = etcd.tls().unwrap().clone();

    // With the client certificate: the whole API works.
    let store = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    let cfg = NetConfig::from_json(r#"{"Network":"10.60.0.0/16"}"#).unwrap();
    store.put_config(&cfg, false).await.unwrap();
    let mut w = store.watch();
    w.wait_synced().await.unwrap();
    let lease = store
        .acquire(
            &cfg,
            &LeaseAttrs::vxlan(
                "tls-node",
                Ipv4Addr::new(192, 168, 5, 5),
                1,
                "02:00:00:00:05:05",
            ),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
    {
        LeaseEvent::Added(l) => assert_eq!(l.subnet, lease.subnet),
        e => panic!("{e:?}"),
    }

    // Without a client certificate (CA only): refused.
    let mut o = etcd.options(PREFIX);
    o.cert_file = None;
    o.key_file = None;
    o.timeout = Duration::from_secs(2);
    let err = LeaseStore::connect(o).await.unwrap_err();
    eprintln!("without a client certificate: {err}");
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    // (With TLS 1.3 the client learns of the rejection after its handshake: the error reads
    // "received fatal alert: BadCertificate" or just "connection closed", depending on timing.)

    // With a certificate from another CA: refused.
    let mut o = etcd.options(PREFIX);
    o.cert_file = Some(tls.rogue_cert.clone());
    o.key_file = Some(tls.rogue_key.clone());
    o.timeout = Duration::from_secs(2);
    let err = LeaseStore::connect(o).await.unwrap_err();
    eprintln!("with a certificate from another CA: {err}");

    // Without trusting etcd's CA: refused (the server certificate is not trusted).
    let mut o = etcd.options(PREFIX);
    o.ca_file = None;
    o.timeout = Duration::from_secs(2);
    let err = LeaseStore::connect(o).await.unwrap_err();
    eprintln!("without the CA: {err}");

    // http:// with TLS files: an option error, not a silent plaintext connection.
    let mut o = etcd.options(PREFIX);
    o.endpoints = vec![etcd.endpoint().replace("https://", "http://")];
    assert!(matches!(
        LeaseStore::new(o).await.unwrap_err(),
        StoreError::Options(_)
    ));

    // twillctl with the same files (flags and TWILLCTL_* env), and without a cert.
    let out = Command::new(bin("twillctl"))
        .args(["leases", "list", "-o", "json", "--etcd-prefix", PREFIX])
        .env("TWILLCTL_ETCD_ENDPOINTS", etcd.endpoint())
        .env("TWILLCTL_ETCD_CAFILE", &tls.ca)
        .env("TWILLCTL_ETCD_CERTFILE", &tls.client_cert)
        .env("TWILLCTL_ETCD_KEYFILE", &tls.client_key)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["leases"][0]["node"], "tls-node");
    let out = Command::new(bin("twillctl"))
        .args([
            "leases",
            "list",
            "--etcd-prefix",
            PREFIX,
            "--etcd-timeout",
            "2s",
        ])
        .arg("--etcd-endpoints")
        .arg(etcd.endpoint())
        .arg("--etcd-cafile")
        .arg(&tls.ca)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach etcd"));
}
