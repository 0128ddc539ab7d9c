//! `twillctl` end to end against a real etcd: list/show/release/reserve, network show/set,
//! table and JSON output, exit codes.

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use twill_ipam::lease::LeaseAttrs;
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::LeaseStore;
use twill_tests::bins::bin;
use twill_tests::etcd::EtcdServer;

const PREFIX: &str = "/tw-ctl/network";

struct Ctl<'a> {
    etcd: &'a EtcdServer,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout not JSON ({e}): {}", self.stdout))
    }
}

impl Ctl<'_> {
    /// Runs twillctl with the endpoint from the environment and the prefix as a flag after
    /// the command (global flags).
    fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, |_| {})
    }

    fn run_with(&self, args: &[&str], f: impl FnOnce(&mut Command)) -> Run {
        let mut cmd = Command::new(bin("twillctl"));
        cmd.args(args)
            .arg("--etcd-prefix")
            .arg(PREFIX)
            .env("TWILLCTL_ETCD_ENDPOINTS", self.etcd.endpoint())
            .env("TWILLCTL_ETCD_TIMEOUT", "3s")
            .env_remove("TWILLCTL_OUTPUT");
        f(&mut cmd);
        let out: Output = cmd.output().expect("running twillctl");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twillctl_end_to_end() {
    let etcd = EtcdServer::start().unwrap();
    let ctl = Ctl { etcd: &etcd };
    let dir = tempfile::tempdir().unwrap();

    // No config yet: not found.
    let r = ctl.run(&["network", "show"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("no network config"), "{}", r.stderr);

    // A bad config is rejected before etcd, naming the field and the value.
    let bad = write(
        &dir,
        "bad.json",
        r#"{"Network":"10.50.0.0/16","SubnetLen":31}"#,
    );
    let r = ctl.run(&["network", "set", "--file", &bad]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(
        r.stderr.contains("SubnetLen") && r.stderr.contains("31"),
        "{}",
        r.stderr
    );
    let bad = write(
        &dir,
        "bad2.json",
        r#"{"Network":"10.50.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    let r = ctl.run(&["network", "set", "--file", &bad]);
    assert_eq!(r.code, 5);
    assert!(
        r.stderr.contains("Backend.Type") && r.stderr.contains("host-gw"),
        "{}",
        r.stderr
    );

    // A good one is written; global flags before the command work too.
    let good = write(
        &dir,
        "good.json",
        r#"{"Network":"10.50.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#,
    );
    let r = ctl.run(&["-o", "json", "network", "set", "--file", &good]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["written"], true);
    let r = ctl.run(&["network", "show"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("10.50.0.0/16") && r.stdout.contains("255 total"),
        "{}",
        r.stdout
    );
    let r = ctl.run(&["network", "show", "-o", "json"]);
    let v = r.json();
    assert_eq!(v["config"]["Network"], "10.50.0.0/16");
    assert_eq!(v["config"]["SubnetLen"], 24);
    assert_eq!(v["config"]["Backend"]["Port"], 8472);
    assert_eq!(v["subnets"]["total"], 255);

    // Leases taken by "nodes".
    let store = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    let cfg = store.get_config().await.unwrap().unwrap();
    let a = store
        .acquire(
            &cfg,
            &LeaseAttrs::vxlan(
                "node-a",
                Ipv4Addr::new(192, 168, 7, 1),
                1,
                "02:00:00:00:00:0a",
            ),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let b = store
        .acquire(
            &cfg,
            &LeaseAttrs::vxlan(
                "node-b",
                Ipv4Addr::new(192, 168, 7, 2),
                1,
                "02:00:00:00:00:0b",
            ),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();

    let r = ctl.run(&["leases", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(lines[0].starts_with("SUBNET") && lines[0].contains("VTEP-MAC"));
    // IPv4-only leases: the IPV6-SUBNET column says "-".
    assert_eq!(
        lines[0].split_whitespace().take(2).collect::<Vec<_>>(),
        ["SUBNET", "IPV6-SUBNET"]
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(cells[1], "-", "{}", lines[1]);
    assert!(r.stdout.contains(&a.subnet.to_string()));
    assert!(r.stdout.contains("node-b") && r.stdout.contains("192.168.7.2"));
    assert!(
        r.stdout.contains("02:00:00:00:00:0a")
            && (r.stdout.contains("in 59m") || r.stdout.contains("in 1h")),
        "{}",
        r.stdout
    );

    let r = ctl.run(&["leases", "list", "-o", "json"]);
    let v = r.json();
    let leases = v["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 2);
    assert!(v["revision"].as_i64().unwrap() > 0);
    let la = leases.iter().find(|l| l["node"] == "node-a").unwrap();
    assert_eq!(la["subnet"], a.subnet.to_string());
    assert_eq!(la["public_ip"], "192.168.7.1");
    assert_eq!(la["vtep_mac"], "02:00:00:00:00:0a");
    assert_eq!(la["vni"], 1);
    assert_eq!(la["reserved"], false);
    let secs = la["expires_in_seconds"].as_u64().unwrap();
    assert!(secs > 3500 && secs <= 3600, "{secs}");
    assert_eq!(la["value"]["NodeName"], "node-a");
    // Dual-stack fields: null for an IPv4-only lease; the etcd key name.
    assert_eq!(la["ipv6_subnet"], Value::Null);
    assert_eq!(la["public_ipv6"], Value::Null);
    assert_eq!(la["key"], a.subnet.to_string().replace('/', "-"));

    // show by node and by subnet (both spellings); unknown: exit 3.
    let r = ctl.run(&["leases", "show", "node-b", "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["subnet"], b.subnet.to_string());
    let key_form = b.subnet.to_string().replace('/', "-");
    let r = ctl.run(&["leases", "show", &key_form]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("node-b") && r.stdout.contains("KEY:"),
        "{}",
        r.stdout
    );
    let r = ctl.run(&["leases", "show", "node-zzz"]);
    assert_eq!(r.code, 3);

    // release asks for --yes (4), then releases; a second release is not found (3).
    let sa = a.subnet.to_string();
    let r = ctl.run(&["leases", "release", &sa]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("--yes"));
    assert!(store.get(&a.subnet).await.unwrap().is_some());
    let r = ctl.run(&["leases", "release", &sa, "--yes", "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["released"], sa);
    assert!(store.get(&a.subnet).await.unwrap().is_none());
    let r = ctl.run(&["leases", "release", &sa, "--yes"]);
    assert_eq!(r.code, 3);
    let r = ctl.run(&["leases", "release", "not-a-subnet", "--yes"]);
    assert_eq!(r.code, 2);

    // reserve: shown as reserved.
    let r = ctl.run(&["leases", "reserve", "10.50.77.0/24", "--node", "node-r"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = ctl.run(&["leases", "list"]);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("10.50.77.0/24"))
        .unwrap();
    assert!(
        // EXPIRES "reserved", then STATUS/REASON: a reservation not taken yet.
        line.contains("node-r") && line.contains(" reserved ") && line.ends_with("not_taken"),
        "{line}"
    );
    let r = ctl.run(&[
        "leases",
        "reserve",
        &b.subnet.to_string(),
        "--node",
        "node-r",
    ]);
    assert_eq!(r.code, 4, "held by node-b: {}", r.stderr);

    // A config that strands node-b's lease is refused (4) unless --force.
    let idx: u32 = b.subnet.network().octets()[2].into();
    let narrow = if idx >= 128 {
        r#"{"Network":"10.50.0.0/17"}"#
    } else {
        r#"{"Network":"10.50.128.0/17"}"#
    };
    let narrow_f = write(&dir, "narrow.json", narrow);
    let r = ctl.run(&["network", "set", "--file", &narrow_f]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains(&b.subnet.to_string()), "{}", r.stderr);
    let r = ctl.run(&[
        "network",
        "set",
        "--file",
        &narrow_f,
        "--dry-run",
        "-o",
        "json",
    ]);
    assert_eq!(r.code, 4);
    assert_eq!(r.json()["would_write"], false);
    assert_eq!(
        store.get_config().await.unwrap().unwrap().network,
        "10.50.0.0/16".parse::<Ipv4Net>().unwrap()
    );
    let r = ctl.run(&["network", "set", "--file", &narrow_f, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        store.get_config().await.unwrap().unwrap(),
        NetConfig::from_json(narrow).unwrap()
    );
    // From stdin.
    let r = ctl.run_with(&["network", "set", "--file", "-", "--force"], |c| {
        c.stdin(std::fs::File::open(&good).unwrap());
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = ctl.run(&["network", "show", "-o", "json"]).json();
    assert_eq!(v["unsupported_keys"], json!([]));

    // Flannel keys twill does not implement: accepted and kept, and named on every read.
    let dead = write(
        &dir,
        "dead.json",
        r#"{"Network":"10.50.0.0/16","Backend":{"Type":"vxlan","VNI":1,"DirectRouting":true,"MTU":1400,"GBP":true,"Learning":false}}"#,
    );
    let r = ctl.run(&["network", "set", "--file", &dead]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("not implemented") && r.stderr.contains("Backend.GBP"),
        "{}",
        r.stderr
    );
    // DirectRouting and Backend.MTU are implemented, Learning false asks for nothing: none
    // is named.
    assert!(
        !r.stderr.contains("MTU")
            && !r.stderr.contains("Learning")
            && !r.stderr.contains("DirectRouting"),
        "{}",
        r.stderr
    );
    let v = ctl.run(&["network", "show", "-o", "json"]).json();
    assert_eq!(v["unsupported_keys"], json!(["Backend.GBP"]));
    assert_eq!(v["config"]["Backend"]["DirectRouting"], true);
    let r = ctl.run(&["network", "show"]);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("Backend:") && l.ends_with("MTU 1400")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("Unsupported:") && l.contains("Backend.GBP")),
        "{}",
        r.stdout
    );
}

#[test]
fn twillctl_unreachable_etcd_and_usage_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(bin("twillctl"))
        .args(["leases", "list", "--etcd-timeout", "500ms"])
        .env(
            "TWILLCTL_ETCD_ENDPOINTS",
            format!("http://127.0.0.1:{port}"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach etcd") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let out = Command::new(bin("twillctl"))
        .args(["leases", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("twillctl"))
        .args(["network", "set"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `twillctl completion <shell>` needs no etcd, and bash really loads the script: `complete`
/// then knows twillctl, and completing `twillctl le` offers `leases`.
#[test]
fn twillctl_completion_scripts_load_and_complete() {
    let script_for = |shell: &str| {
        let out = Command::new(bin("twillctl"))
            .args(["completion", shell])
            // An etcd that does not exist: completion must not try to reach it.
            .env("TWILLCTL_ETCD_ENDPOINTS", "http://127.0.0.1:1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("twillctl.bash");
    std::fs::write(&script, script_for("bash")).unwrap();
    let probe = format!(
        "source {}; complete -p twillctl >/dev/null || exit 3; \
         COMP_WORDS=(twillctl le); COMP_CWORD=1; COMP_LINE='twillctl le'; COMP_POINT=11; \
         _twillctl twillctl le twillctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &probe])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        offered.lines().any(|l| l == "leases"),
        "bash offered {offered:?}"
    );
    for shell in ["zsh", "fish"] {
        let s = script_for(shell);
        for sub in ["leases", "network", "status", "completion"] {
            assert!(s.contains(sub), "{shell} script lacks {sub}");
        }
    }
    let out = Command::new(bin("twillctl"))
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Proves that `twillctl leases` shows a dual-stack lease (written by hand, as flanneld
/// writes it): the IPV6-SUBNET column, the JSON fields `ipv6_subnet`, `key` and
/// `public_ipv6` (the fields of before unchanged), `show` by the dual-stack key with its
/// full etcd key, and `release` of the subnet deletes the dual-stack key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twillctl_leases_dual_stack() {
    let etcd = EtcdServer::start().unwrap();
    let ctl = Ctl { etcd: &etcd };
    let store = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    let cfg = NetConfig::from_json(
        r#"{"Network":"10.50.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:50::/56","Backend":{"Type":"vxlan","VNI":1}}"#,
    )
    .unwrap();
    store.put_config(&cfg, true).await.unwrap();
    let name = "10.50.7.0-24&fd00:50:0:7::-64";
    let value = r#"{"PublicIP":"192.168.7.5","PublicIPv6":"2001:db8::5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"9a:2b:3c:4d:5e:6f"},"BackendV6Data":{"VNI":1,"VtepMAC":"ae:7f:01:02:03:04"}}"#;
    let mut c = store.client();
    c.put(format!("{}{name}", store.subnets_prefix()), value, None)
        .await
        .unwrap();

    let r = ctl.run(&["leases", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("10.50.7.0/24"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells[1], "fd00:50:0:7::/64", "{line}");
    assert_eq!(cells[3], "192.168.7.5", "{line}");

    let v = ctl.run(&["leases", "list", "-o", "json"]).json();
    let l = &v["leases"][0];
    assert_eq!(l["subnet"], "10.50.7.0/24");
    assert_eq!(l["ipv6_subnet"], "fd00:50:0:7::/64");
    assert_eq!(l["key"], name);
    assert_eq!(l["public_ipv6"], "2001:db8::5");
    assert_eq!(l["public_ip"], "192.168.7.5");
    assert_eq!(l["vtep_mac"], "9a:2b:3c:4d:5e:6f");
    assert_eq!(l["reserved"], true, "no etcd lease");
    assert_eq!(l["value"]["BackendV6Data"]["VtepMAC"], "ae:7f:01:02:03:04");
    assert_eq!(v["invalid"], json!([]));

    // A younger IPv4-only key of the same subnet: listed as not a lease (bad_key, naming the
    // dual-stack key), and the dual-stack lease keeps its own verdict.
    c.put(
        format!("{}10.50.7.0-24", store.subnets_prefix()),
        value,
        None,
    )
    .await
    .unwrap();
    let v = ctl.run(&["leases", "list", "-o", "json"]).json();
    assert_eq!(v["leases"].as_array().unwrap().len(), 1);
    assert_eq!(v["leases"][0]["key"], name);
    assert_eq!(v["leases"][0]["accepted"], true, "{v}");
    assert_eq!(v["invalid"][0]["key"], "10.50.7.0-24");
    assert_eq!(v["invalid"][0]["reason"], "bad_key");
    assert!(
        v["invalid"][0]["detail"].as_str().unwrap().contains(name),
        "{v}"
    );

    let r = ctl.run(&["leases", "show", name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains(&format!("{}{name}", store.subnets_prefix()))
            && r.stdout.contains("IPV6-SUBNET: fd00:50:0:7::/64"),
        "{}",
        r.stdout
    );
    let r = ctl.run(&["leases", "show", "10.50.7.0/24", "-o", "json"]);
    assert_eq!(r.json()["key"], name);

    let r = ctl.run(&["leases", "release", "10.50.7.0/24", "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(store.list().await.unwrap().0.is_empty());
}
