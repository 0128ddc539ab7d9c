//! The fixture of the CNI kernel tests: a node namespace with its own subnet file and data
//! dir (a temp dir), pods as namespaces, and the real `twill` binary exec'd inside the node
//! namespace the way a runtime does.

#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use twill_tests::bins::{CniOutput, bin, exec_plugin};
use twill_tests::netns::TestNetns;

pub const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
pub const GATEWAY: &str = "10.244.3.1";

pub struct Node {
    pub ns: TestNetns,
    pub dir: tempfile::TempDir,
    pub plugin: PathBuf,
    /// Extra config keys merged into every config.
    pub extra: Value,
}

pub struct Pod {
    pub ns: TestNetns,
    pub id: String,
    pub ifname: String,
}

impl Pod {
    pub fn netns(&self) -> String {
        self.ns.path().display().to_string()
    }
}

impl Node {
    pub fn new() -> Node {
        Self::with_subnet(SUBNET_ENV)
    }

    pub fn with_subnet(subnet_env: &str) -> Node {
        let ns = TestNetns::new("node").expect("node netns");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("subnet.env"), subnet_env).unwrap();
        Node {
            ns,
            dir,
            plugin: bin("twill"),
            extra: json!({}),
        }
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn state_file(&self) -> PathBuf {
        self.data_dir().join("twill/state.json")
    }

    /// Damages the allocator state beyond recovery: `state.json` and its previous copy
    /// `.state.json.next` (one torn file alone is recovered from the other).
    pub fn corrupt_state(&self, garbage: &str) {
        let next = self.data_dir().join("twill/.state.json.next");
        std::fs::write(self.state_file(), garbage).unwrap();
        std::fs::write(next, garbage).unwrap();
    }

    /// The twill plugin config for `version`, with this node's files.
    pub fn conf(&self, version: &str) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "twill",
            "type": "twill",
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
            "bridge": "cni0",
            "hairpinMode": true,
        });
        if let Some(o) = self.extra.as_object() {
            for (k, v) in o {
                c[k] = v.clone();
            }
        }
        c
    }

    pub fn pod(&self, tag: &str) -> Pod {
        let ns = TestNetns::new(tag).expect("pod netns");
        Pod {
            id: format!("c-{}", ns.name()),
            ns,
            ifname: "eth0".into(),
        }
    }

    /// Execs the plugin in the node namespace.
    pub fn exec(&self, env: &[(&str, &str)], conf: &Value) -> CniOutput {
        exec_plugin(&self.plugin, Some(&self.ns.path()), env, &conf.to_string()).unwrap()
    }

    pub fn call(&self, cmd: &str, pod: &Pod, conf: &Value) -> CniOutput {
        let netns = pod.netns();
        self.exec(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", &pod.id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", &pod.ifname),
                ("CNI_PATH", "/usr/lib/cni"),
            ],
            conf,
        )
    }

    pub fn add(&self, pod: &Pod) -> Value {
        self.call("ADD", pod, &self.conf("1.1.0"))
            .expect_ok("ADD")
            .json()
    }

    pub fn del(&self, pod: &Pod) {
        self.call("DEL", pod, &self.conf("1.1.0")).expect_ok("DEL");
    }

    /// CHECK with `prev` as prevResult.
    pub fn check(&self, pod: &Pod, prev: &Value) -> CniOutput {
        let mut c = self.conf("1.1.0");
        c["prevResult"] = prev.clone();
        self.call("CHECK", pod, &c)
    }

    /// The reservations on disk.
    pub fn reservations(&self) -> Vec<Value> {
        match std::fs::read(self.state_file()) {
            Ok(b) => serde_json::from_slice::<Value>(&b).unwrap()["reservations"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            Err(_) => vec![],
        }
    }

    /// The host veths (links whose name starts with "veth") in the node namespace.
    pub fn host_veths(&self) -> Vec<String> {
        self.ns
            .links()
            .unwrap()
            .into_iter()
            .filter(|l| l.starts_with("veth"))
            .collect()
    }

    /// Whether the allocator's lock is free (no process holds it).
    pub fn lock_is_free(&self) -> bool {
        let p = self.data_dir().join("twill/lock");
        match std::fs::File::open(&p) {
            Ok(f) => {
                let free = f.try_lock().is_ok();
                let _ = f.unlock();
                free
            }
            Err(_) => true,
        }
    }

    /// Files other than state.json, its temp file (the previous version between two writes)
    /// and lock left in the data dir.
    pub fn stray_files(&self) -> Vec<String> {
        let d = self.data_dir().join("twill");
        std::fs::read_dir(&d)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !["state.json", ".state.json.next", "lock"].contains(&n.as_str()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The pod's IP from an ADD result.
pub fn result_ip(r: &Value) -> IpAddr {
    let a = r["ips"][0]["address"].as_str().expect("ips[0].address");
    a.split('/').next().unwrap().parse().unwrap()
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
