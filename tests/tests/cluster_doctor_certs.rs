//! `twillctl doctor`'s etcd certificate check on a real node: a real twilld talks to a real
//! etcd over mutual TLS (certificates made with rcgen: a CA, a server certificate for
//! 127.0.0.1, client certificates), and doctor runs in the node's namespace with the same
//! files. Proves, by verdict and exit code: a valid client certificate passes every check
//! (exit 0) with its expiry date; one that expires in 5 days warns naming the file and the
//! date and nothing else (exit 6); an expired one fails (etcd refuses it too); a key of
//! another pair fails; a certificate of another CA warns; and the certificate the *server*
//! presents in the TLS handshake is checked the same way (5 days left: warn; expired: fail).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use serde_json::Value;
use twill_tests::cluster::{Cluster, ClusterOpts, NsProxy, wait_for};
use twill_tests::etcd::EtcdServer;

const DAY: u64 = 86_400;
/// The TLS etcd's port inside the node namespace (the harness's plain etcd is on 2379).
const TLS_PORT: u16 = 2381;
const ENDPOINT: &str = "https://127.0.0.1:2381";

/// Seconds since the epoch, now.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Validity from `from` to `to` (Unix seconds), without naming the time crate's type.
fn window(p: &mut CertificateParams, from: u64, to: u64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    p.not_before = epoch + Duration::from_secs(from);
    p.not_after = epoch + Duration::from_secs(to);
}

/// The date doctor prints for `t` (Unix seconds), as `YYYY-MM-DD`.
fn ymd(t: u64) -> String {
    (rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(t))
        .date()
        .to_string()
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn make_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    window(&mut p, now() - DAY, now() + 365 * DAY);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate and its key (PEM), valid from `from` to `to`.
fn leaf(ca: &Ca, cn: &str, server: bool, from: u64, to: u64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let sans = if server {
        vec!["127.0.0.1".to_string(), "localhost".to_string()]
    } else {
        Vec::new()
    };
    let mut p = CertificateParams::new(sans).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    window(&mut p, from, to);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn doctor(c: &Cluster, conf_dir: &Path, f: &Files, cert_warn: Option<&str>) -> (Output, Value) {
    let n = &c.nodes[0];
    let mut cmd = n.doctor_command(conf_dir);
    cmd.args(["--etcd-endpoints", ENDPOINT])
        .arg("--etcd-cafile")
        .arg(&f.ca)
        .arg("--etcd-certfile")
        .arg(&f.cert)
        .arg("--etcd-keyfile")
        .arg(&f.key)
        .args(["--lease-warn", "1s"]);
    if let Some(w) = cert_warn {
        cmd.args(["--cert-warn", w]);
    }
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor output: {e}: {out:?}"));
    (out, v)
}

/// The findings that are not ok, as (check, status, what).
fn problems(v: &Value) -> Vec<(String, String, String)> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] != "ok")
        .map(|c| {
            assert!(
                !c["why"].as_str().unwrap().is_empty() && !c["fix"].as_str().unwrap().is_empty(),
                "{c}"
            );
            (
                c["check"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["what"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn oks(v: &Value, check: &str) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == check && c["status"] == "ok")
        .map(|c| c["what"].as_str().unwrap().to_string())
        .collect()
}

/// Whether some etcd-certs problem of `status` mentions every one of `needles`.
fn cert_problem(v: &Value, status: &str, needles: &[&str]) -> bool {
    problems(v)
        .iter()
        .any(|(c, s, w)| c == "etcd-certs" && s == status && needles.iter().all(|n| w.contains(n)))
}

#[test]
fn doctor_checks_the_etcd_certificates_and_the_servers() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 1,
        pods_per_node: 0,
        ..ClusterOpts::default()
    })
    .unwrap();

    // A TLS etcd whose certificates are replaced by rcgen's (a CA of a year, not the
    // harness's 2-day ones), restarted to load them.
    let mut etcd = EtcdServer::start_tls().unwrap();
    let tls = etcd.tls().unwrap().clone();
    let ca = make_ca("twill-test-doctor-ca");
    let t = now();
    let (server_crt, server_key) = leaf(&ca, "etcd-server", true, t - DAY, t + 365 * DAY);
    let (client_crt, client_key) = leaf(&ca, "twilld-client", false, t - DAY, t + 365 * DAY);
    std::fs::write(&tls.ca, &ca.pem).unwrap();
    std::fs::write(&tls.server_cert, &server_crt).unwrap();
    std::fs::write(&tls.server_key, &server_key).unwrap();
    std::fs::write(&tls.client_cert, &client_crt).unwrap();
    std::fs::write(&tls.client_key, &client_key).unwrap();
    etcd.restart().unwrap();

    // twilld of the node on the TLS etcd (reached through a proxy in its namespace).
    let _proxy = NsProxy::start(
        &c.nodes[0].ns.path(),
        TLS_PORT,
        format!("127.0.0.1:{}", etcd.client_port()).parse().unwrap(),
    )
    .unwrap();
    c.nodes[0].stop_daemon().unwrap();
    let (ca_s, cert_s, key_s) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    c.start_daemon_with(
        0,
        &twill_tests::bins::bin("twilld"),
        &[
            "--etcd-endpoints",
            ENDPOINT,
            "--etcd-cafile",
            &ca_s,
            "--etcd-certfile",
            &cert_s,
            "--etcd-keyfile",
            &key_s,
        ],
        &[],
    )
    .unwrap();
    c.wait_ready(0, Duration::from_secs(20)).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let conf_dir = tmp.path().join("net.d");
    std::fs::create_dir(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-twill.conflist"),
        format!(
            r#"{{"cniVersion":"1.0.0","name":"twill","plugins":[{{"type":"twill","subnetFile":"{}","bridge":"cni0"}}]}}"#,
            c.nodes[0].subnet_file().display()
        ),
    )
    .unwrap();
    let good = Files {
        ca: tls.ca.clone(),
        cert: tls.client_cert.clone(),
        key: tls.client_key.clone(),
    };

    // 1. Valid: every check passes (the node's health report reaches etcd within its first
    //    publish, so poll doctor until then).
    let mut last = None;
    let passed = wait_for(Duration::from_secs(20), || {
        let (out, v) = doctor(&c, &conf_dir, &good, None);
        let ok = out.status.code() == Some(0);
        last = Some(v.clone());
        ok.then_some(v)
    });
    let v = passed.unwrap_or_else(|| {
        panic!(
            "valid certificates: doctor did not pass: {:?}\n{}",
            problems(last.as_ref().unwrap()),
            c.logs()
        )
    });
    let ok = oks(&v, "etcd-certs");
    let until = ymd(t + 365 * DAY);
    for needle in [
        format!("client certificate {}", good.cert.display()),
        format!("server certificate of {ENDPOINT}"),
        format!("CA {}", good.ca.display()),
    ] {
        assert!(
            ok.iter()
                .any(|w| w.contains(&needle) && w.contains(&until) && w.contains("valid until")),
            "{needle} valid until {until}: {ok:?}"
        );
    }
    assert!(ok.iter().any(|w| w.contains("signed by the CA")), "{ok:?}");

    let dir = tmp.path();
    // 2. Expires in 5 days: a warning naming the file and the date, and nothing else.
    let (crt, key) = leaf(&ca, "twilld-soon", false, t - DAY, t + 5 * DAY);
    let soon = Files {
        ca: tls.ca.clone(),
        cert: write(dir, "soon.crt", &crt),
        key: write(dir, "soon.key", &key),
    };
    let (out, v) = doctor(&c, &conf_dir, &soon, None);
    assert_eq!(out.status.code(), Some(6), "{v}");
    let soon_name = soon.cert.display().to_string();
    let soon_date = ymd(t + 5 * DAY);
    assert!(
        cert_problem(&v, "warn", &[&soon_name, &soon_date, "expires on"]),
        "{:?}",
        problems(&v)
    );
    assert_eq!(problems(&v).len(), 1, "{:?}", problems(&v));
    // The threshold is a flag: at 3 days ahead the same certificate passes.
    let (out, v) = doctor(&c, &conf_dir, &soon, Some("3d"));
    assert_eq!(out.status.code(), Some(0), "{:?}", problems(&v));

    // 3. Expired: doctor fails it with the date; etcd refuses it as well.
    let (crt, key) = leaf(&ca, "twilld-old", false, t - 60 * DAY, t - 2 * DAY);
    let old = Files {
        ca: tls.ca.clone(),
        cert: write(dir, "old.crt", &crt),
        key: write(dir, "old.key", &key),
    };
    let (out, v) = doctor(&c, &conf_dir, &old, None);
    assert_eq!(out.status.code(), Some(6), "{v}");
    let old_name = old.cert.display().to_string();
    let old_date = ymd(t - 2 * DAY);
    assert!(
        cert_problem(&v, "fail", &[&old_name, &old_date, "expired on"]),
        "{:?}",
        problems(&v)
    );
    assert!(
        problems(&v)
            .iter()
            .any(|(c, s, _)| c == "etcd" && s == "fail"),
        "{:?}",
        problems(&v)
    );

    // 4. Not yet valid.
    let (crt, key) = leaf(&ca, "twilld-early", false, t + 3 * DAY, t + 90 * DAY);
    let early = Files {
        ca: tls.ca.clone(),
        cert: write(dir, "early.crt", &crt),
        key: write(dir, "early.key", &key),
    };
    let (_, v) = doctor(&c, &conf_dir, &early, None);
    assert!(
        cert_problem(
            &v,
            "fail",
            &["early.crt", "not valid before", &ymd(t + 3 * DAY)]
        ),
        "{:?}",
        problems(&v)
    );

    // 5. The key of another pair.
    let (_, other_key) = leaf(&ca, "twilld-other", false, t - DAY, t + 365 * DAY);
    let swapped = Files {
        ca: tls.ca.clone(),
        cert: tls.client_cert.clone(),
        key: write(dir, "other.key", &other_key),
    };
    let (out, v) = doctor(&c, &conf_dir, &swapped, None);
    assert_eq!(out.status.code(), Some(6), "{v}");
    assert!(
        cert_problem(&v, "fail", &["other.key", "does not belong"]),
        "{:?}",
        problems(&v)
    );

    // 6. A client certificate of another CA with the same name: the signature decides.
    let impostor = make_ca("twill-test-doctor-ca");
    let (crt, key) = leaf(&impostor, "twilld-rogue", false, t - DAY, t + 365 * DAY);
    let rogue = Files {
        ca: tls.ca.clone(),
        cert: write(dir, "rogue.crt", &crt),
        key: write(dir, "rogue.key", &key),
    };
    let (out, v) = doctor(&c, &conf_dir, &rogue, None);
    assert_eq!(out.status.code(), Some(6), "{v}");
    assert!(
        cert_problem(&v, "warn", &["rogue.crt", "is not signed by the CA"]),
        "{:?}",
        problems(&v)
    );

    // 7. The server's certificate: 5 days left, then expired (etcd still serves it).
    let (crt, key) = leaf(&ca, "etcd-server", true, t - DAY, t + 5 * DAY);
    std::fs::write(&tls.server_cert, crt).unwrap();
    std::fs::write(&tls.server_key, key).unwrap();
    etcd.restart().unwrap();
    let (out, v) = doctor(&c, &conf_dir, &good, None);
    assert_eq!(out.status.code(), Some(6), "{v}");
    assert!(
        cert_problem(
            &v,
            "warn",
            &[
                &format!("server certificate of {ENDPOINT}"),
                &soon_date,
                "expires on"
            ]
        ),
        "{:?}",
        problems(&v)
    );

    let (crt, key) = leaf(&ca, "etcd-server", true, t - 60 * DAY, t - 2 * DAY);
    std::fs::write(&tls.server_cert, crt).unwrap();
    std::fs::write(&tls.server_key, key).unwrap();
    // etcd's own health check (with verification) cannot pass now: start it and do not wait.
    let _ = etcd.restart();
    let v = wait_for(Duration::from_secs(20), || {
        let (_, v) = doctor(&c, &conf_dir, &good, None);
        cert_problem(
            &v,
            "fail",
            &[&format!("server certificate of {ENDPOINT}"), "expired on"],
        )
        .then_some(v)
    });
    assert!(
        v.is_some(),
        "the expired server certificate was not reported"
    );
}
