//! deploy/kube-twill.yml against the Kubernetes API types (k8s-openapi, strictly: a key the
//! types do not know fails), and against twill itself: env names are twilld's flags and
//! their values parse, referenced ConfigMap/Secret keys exist, the probes hit the metrics
//! address, the conflist and net-conf.json parse with twill's own parsers.
//! Pure file checks: no root, no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, ServiceAccount, Volume,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest_text() -> String {
    let p = repo().join("deploy/kube-twill.yml");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Every object of the manifest, typed.
#[derive(Default)]
struct Manifest {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    daemon_sets: Vec<DaemonSet>,
    rbac: Vec<String>,
}

/// Paths (`a.b[2].c`) where two JSON trees differ.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    Some(vb) => diff(va, vb, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: not a field of the API type")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the API type"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Deserializes `doc` into `T` and serializes it back: any key that `T` does not know is
/// dropped on the way, so the two trees differ. k8s-openapi ignores unknown fields by
/// default, this makes a typo'd key (`hostNetwrk`) an error.
fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    diff(doc, &back, "", &mut out);
    if out.is_empty() {
        Ok(typed)
    } else {
        Err(out.join("; "))
    }
}

fn parse(text: &str) -> Result<Manifest, String> {
    let mut m = Manifest::default();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = Value::deserialize(de).map_err(|e| format!("document {i}: {e}"))?;
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let ctx = |e: String| format!("document {i} ({kind}): {e}");
        match kind.as_str() {
            "Namespace" => m.namespaces.push(strict(&doc).map_err(ctx)?),
            "ServiceAccount" => m.service_accounts.push(strict(&doc).map_err(ctx)?),
            "ConfigMap" => m.config_maps.push(strict(&doc).map_err(ctx)?),
            "Secret" => m.secrets.push(strict(&doc).map_err(ctx)?),
            "DaemonSet" => m.daemon_sets.push(strict(&doc).map_err(ctx)?),
            "ClusterRole" => {
                strict::<ClusterRole>(&doc).map_err(ctx)?;
                m.rbac.push(kind);
            }
            "ClusterRoleBinding" => {
                strict::<ClusterRoleBinding>(&doc).map_err(ctx)?;
                m.rbac.push(kind);
            }
            "Role" => {
                strict::<Role>(&doc).map_err(ctx)?;
                m.rbac.push(kind);
            }
            "RoleBinding" => {
                strict::<RoleBinding>(&doc).map_err(ctx)?;
                m.rbac.push(kind);
            }
            other => return Err(ctx(format!("unexpected kind {other:?}"))),
        }
    }
    Ok(m)
}

fn secret_example_text() -> String {
    let p = repo().join("deploy/twill-etcd-secret.example.yml");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// What a cluster gets: kube-twill.yml plus the Secret the operator creates (its shape is
/// deploy/twill-etcd-secret.example.yml).
fn manifest() -> Manifest {
    let mut m = parse(&manifest_text()).unwrap_or_else(|e| panic!("deploy/kube-twill.yml: {e}"));
    let s = parse(&secret_example_text())
        .unwrap_or_else(|e| panic!("deploy/twill-etcd-secret.example.yml: {e}"));
    assert!(
        s.namespaces.is_empty()
            && s.service_accounts.is_empty()
            && s.config_maps.is_empty()
            && s.daemon_sets.is_empty()
            && s.rbac.is_empty(),
        "the Secret example holds only the Secret"
    );
    m.secrets.extend(s.secrets);
    m
}

/// Applying kube-twill.yml again (an upgrade) must never overwrite the real etcd
/// certificates with placeholders: the manifest holds no Secret at all.
#[test]
fn reapplying_the_manifest_cannot_clobber_the_etcd_secret() {
    let m = parse(&manifest_text()).unwrap();
    assert!(
        m.secrets.is_empty(),
        "deploy/kube-twill.yml contains a Secret: re-applying it would overwrite the real one"
    );
    // The example Secret is the one the DaemonSet mounts (so the test can fail).
    let s = parse(&secret_example_text()).unwrap();
    assert_eq!(s.secrets.len(), 1);
    assert_eq!(s.secrets[0].metadata.name.as_deref(), Some("twill-etcd"));
}

fn daemon_set(m: &Manifest) -> &DaemonSet {
    assert_eq!(m.daemon_sets.len(), 1, "one DaemonSet");
    &m.daemon_sets[0]
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet has a pod spec")
}

fn containers(pod: &PodSpec) -> Vec<(&'static str, &Container)> {
    let mut v: Vec<(&'static str, &Container)> = pod
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("init", c))
        .collect();
    v.extend(pod.containers.iter().map(|c| ("main", c)));
    v
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    containers(pod)
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name:?}"))
}

fn config_map<'a>(m: &'a Manifest, name: &str) -> &'a ConfigMap {
    m.config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("DaemonSet references ConfigMap {name:?}, not in the manifest"))
}

fn secret<'a>(m: &'a Manifest, name: &str) -> &'a Secret {
    m.secrets
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("DaemonSet references Secret {name:?}, not in the manifest"))
}

fn config_map_keys(cm: &ConfigMap) -> BTreeSet<String> {
    cm.data
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .chain(cm.binary_data.iter().flatten().map(|(k, _)| k.clone()))
        .collect()
}

fn secret_keys(s: &Secret) -> BTreeSet<String> {
    s.data
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .chain(s.string_data.iter().flatten().map(|(k, _)| k.clone()))
        .collect()
}

fn config_value(m: &Manifest, cm: &str, key: &str) -> String {
    config_map(m, cm)
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap {cm:?} has no key {key:?}"))
        .clone()
}

/// The env of a container with every value resolved (ConfigMap keys looked up, downward
/// API fields given a sample value).
fn resolved_env(m: &Manifest, c: &Container) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let v = if let Some(v) = &e.value {
            expand(v, &out)
        } else {
            let src = e.value_from.as_ref().unwrap_or_else(|| {
                panic!("{}: env {} has neither value nor valueFrom", c.name, e.name)
            });
            if let Some(r) = &src.config_map_key_ref {
                config_value(m, &r.name, &r.key)
            } else if let Some(r) = &src.secret_key_ref {
                assert!(secret_keys(secret(m, &r.name)).contains(&r.key));
                "secret".into()
            } else if let Some(f) = &src.field_ref {
                assert_eq!(f.field_path, "spec.nodeName", "{}: env {}", c.name, e.name);
                "node-a".into()
            } else {
                panic!("{}: env {}: unsupported valueFrom", c.name, e.name)
            }
        };
        assert!(
            out.insert(e.name.clone(), v).is_none(),
            "{}: env {} twice",
            c.name,
            e.name
        );
    }
    out
}

/// Kubernetes' `$(VAR)` expansion: a reference to a variable defined earlier in the list is
/// replaced by its value (an unknown one stays as written, which the flag parsers reject).
fn expand(v: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) if defined.contains_key(&after[..j]) => {
                out.push_str(&defined[&after[..j]]);
                rest = &after[j + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// (env name → long flag) of the clap command (twilld itself, or one subcommand).
fn flags_by_env(cmd: &clap::Command) -> BTreeMap<String, String> {
    cmd.get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((
                env,
                a.get_long().expect("env flags are long flags").to_string(),
            ))
        })
        .collect()
}

/// `twillctl status`: the global connection flags and the node name.
fn twillctl_status(twillctl: &clap::Command) -> clap::Command {
    let mut status = twillctl
        .find_subcommand("status")
        .expect("twillctl has the status command")
        .clone();
    for a in twillctl.get_arguments() {
        status = status.arg(a.clone());
    }
    status
}

fn twilld() -> clap::Command {
    twill_netd::cli::Cli::command()
}

fn install_cni_cmd() -> clap::Command {
    twilld()
        .find_subcommand("install-cni")
        .expect("twilld has the install-cni subcommand")
        .clone()
}

fn twilld_container(pod: &PodSpec) -> &Container {
    container(pod, "twilld")
}

fn install_container(pod: &PodSpec) -> &Container {
    container(pod, "install-cni")
}

fn mount_volume<'a>(pod: &'a PodSpec, c: &Container, file: &str) -> Option<(&'a Volume, String)> {
    // The longest mount path that contains `file`.
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(file).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let rel = Path::new(file)
        .strip_prefix(&m.mount_path)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap_or_else(|| panic!("{}: mount {} has no volume", c.name, m.name));
    Some((vol, rel))
}

#[test]
fn manifest_parses_strictly_into_the_api_types() {
    let m = manifest();
    assert_eq!(m.namespaces.len(), 1);
    assert_eq!(m.service_accounts.len(), 1);
    assert!(!m.config_maps.is_empty());
    assert!(!m.secrets.is_empty());
    daemon_set(&m);
}

#[test]
fn strict_parse_catches_a_typo_and_a_wrong_type() {
    let text = manifest_text();
    let typo = text.replacen("hostNetwork: true", "hostNetwrk: true", 1);
    assert_ne!(typo, text);
    let err = parse(&typo).err().expect("typo'd key must fail");
    assert!(err.contains("hostNetwrk"), "{err}");

    let nested = text.replacen("readOnlyRootFilesystem: true", "readOnlyRootFs: true", 1);
    let err = parse(&nested).err().expect("typo'd nested key must fail");
    assert!(err.contains("securityContext.readOnlyRootFs"), "{err}");

    let wrong = text.replacen("maxUnavailable: 1", "maxUnavailable: [1]", 1);
    assert!(parse(&wrong).is_err(), "wrong type must fail");

    let kind = text.replacen("kind: DaemonSet", "kind: DeamonSet", 1);
    assert!(parse(&kind).is_err(), "unknown kind must fail");
}

#[test]
fn objects_live_in_the_twill_namespace() {
    let m = manifest();
    let ns = m.namespaces[0].metadata.name.clone().unwrap();
    let labels = m.namespaces[0].metadata.labels.clone().unwrap_or_default();
    // hostNetwork/hostPath/NET_ADMIN are only allowed by the "privileged" Pod Security level.
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
    let names = m
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(m.config_maps.iter().map(|o| &o.metadata))
        .chain(m.secrets.iter().map(|o| &o.metadata))
        .chain(m.daemon_sets.iter().map(|o| &o.metadata));
    for meta in names {
        assert_eq!(meta.namespace.as_ref(), Some(&ns), "{:?}", meta.name);
    }
}

#[test]
fn twilld_needs_no_kubernetes_api_access() {
    let m = manifest();
    assert!(
        m.rbac.is_empty(),
        "twilld uses etcd only; RBAC objects: {:?}",
        m.rbac
    );
    let sa = &m.service_accounts[0];
    assert_eq!(sa.automount_service_account_token, Some(false));
    let pod = pod_spec(daemon_set(&m));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn daemonset_shape() {
    let m = manifest();
    let ds = daemon_set(&m);
    let spec = &ds.spec;
    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // Cluster DNS runs on the pod network: twilld must use the node's resolver.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    // Tolerates every taint: no key + Exists matches every key and every effect.
    let tols = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tols.iter().any(|t| t.key.is_none()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.is_none()),
        "{tols:?}"
    );
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(ru.max_surge, Some(IntOrString::Int(0)));
    // The selector selects the template.
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(labels.get(k), Some(v), "selector {k}={v}");
    }
    // The same image for the init container and twilld, tagged with twill's version.
    let images: BTreeSet<_> = containers(pod)
        .iter()
        .map(|(_, c)| c.image.clone().unwrap())
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let image = images.into_iter().next().unwrap();
    assert!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "{image} is not tagged with the workspace version"
    );
    assert_eq!(
        install_container(pod).command.as_ref().unwrap()[1],
        "install-cni"
    );
    assert_eq!(pod.init_containers.as_ref().unwrap().len(), 1);
}

#[test]
fn required_host_paths_are_mounted() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    let host_paths: BTreeSet<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    for p in [
        "/run/twill",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/lib/cni",
    ] {
        assert!(host_paths.contains(p), "no hostPath volume for {p}");
    }
    // Every mount names a volume, every volume is mounted somewhere.
    let mut used = BTreeSet::new();
    for (_, c) in containers(pod) {
        for vm in c.volume_mounts.iter().flatten() {
            assert!(
                pod.volumes.iter().flatten().any(|v| v.name == vm.name),
                "{}: mount of unknown volume {}",
                c.name,
                vm.name
            );
            used.insert(vm.name.clone());
        }
    }
    for v in pod.volumes.iter().flatten() {
        assert!(used.contains(&v.name), "volume {} is never mounted", v.name);
    }
    // The Secret is mounted read-only, owner-readable only.
    let secret_vol = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.secret.as_ref())
        .expect("a Secret volume");
    assert_eq!(secret_vol.default_mode, Some(0o400));
}

#[test]
fn every_referenced_configmap_and_secret_key_exists() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    let mut checked = 0;
    for (_, c) in containers(pod) {
        for e in c.env.iter().flatten() {
            let Some(src) = &e.value_from else { continue };
            if let Some(r) = &src.config_map_key_ref {
                let keys = config_map_keys(config_map(&m, &r.name));
                assert!(
                    keys.contains(&r.key),
                    "{}: env {} -> ConfigMap {}/{}",
                    c.name,
                    e.name,
                    r.name,
                    r.key
                );
                checked += 1;
            }
            if let Some(r) = &src.secret_key_ref {
                let keys = secret_keys(secret(&m, &r.name));
                assert!(
                    keys.contains(&r.key),
                    "{}: env {} -> Secret {}/{}",
                    c.name,
                    e.name,
                    r.name,
                    r.key
                );
                checked += 1;
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = &ef.config_map_ref {
                config_map(&m, &r.name);
            }
            if let Some(r) = &ef.secret_ref {
                secret(&m, &r.name);
            }
        }
    }
    for v in pod.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            let keys = config_map_keys(config_map(&m, &cm.name));
            for item in cm.items.iter().flatten() {
                assert!(
                    keys.contains(&item.key),
                    "volume {}: ConfigMap {} has no key {}",
                    v.name,
                    cm.name,
                    item.key
                );
                checked += 1;
            }
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.as_deref().expect("secretName");
            let keys = secret_keys(secret(&m, name));
            for item in s.items.iter().flatten() {
                assert!(
                    keys.contains(&item.key),
                    "volume {}: Secret {name} has no key {}",
                    v.name,
                    item.key
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} references checked");
}

#[test]
fn secret_placeholders_are_documented() {
    let m = manifest();
    let s = secret(&m, "twill-etcd");
    let keys = secret_keys(s);
    assert_eq!(
        keys,
        ["ca.crt", "tls.crt", "tls.key"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    for (k, v) in s.string_data.iter().flatten() {
        assert!(v.starts_with("REPLACE-ME"), "{k}: placeholder {v:?}");
    }
    let install = std::fs::read_to_string(repo().join("docs/install.md")).unwrap_or_default();
    for k in &keys {
        assert!(
            install.contains(k.as_str()),
            "docs/install.md does not document Secret key {k}"
        );
    }
}

#[test]
fn env_names_are_twilld_flags_and_values_parse() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    let twillctl = twill_netd::ctl::Cli::command();
    // (container, env prefix, clap command, argv head): every variable of a container is a
    // flag of one of its commands, and the values parse as that flag.
    let checks = [
        (twilld_container(pod), "TWILLD_", twilld(), vec!["twilld"]),
        (
            twilld_container(pod),
            "TWILLCTL_",
            twillctl_status(&twillctl),
            vec!["twillctl", "status"],
        ),
        (
            install_container(pod),
            "TWILLD_",
            install_cni_cmd(),
            vec!["twilld", "install-cni"],
        ),
    ];
    for (c, _, _, _) in &checks {
        for name in resolved_env(&m, c).keys() {
            assert!(
                checks
                    .iter()
                    .any(|(cc, p, _, _)| cc.name == c.name && name.starts_with(p)),
                "{}: env {name} belongs to no twill command",
                c.name
            );
        }
    }
    for (c, prefix, cmd, head) in &checks {
        let flags = flags_by_env(cmd);
        let mut argv: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        for (name, value) in resolved_env(&m, c)
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
        {
            let flag = flags.get(name).unwrap_or_else(|| {
                panic!(
                    "{}: env {name} is not a flag of `{}` (known: {:?})",
                    c.name,
                    head.join(" "),
                    flags.keys().collect::<Vec<_>>()
                )
            });
            argv.push(format!("--{flag}={value}"));
        }
        let parsed = if head[0] == "twillctl" {
            twill_netd::ctl::Cli::try_parse_from(&argv).map(|_| ())
        } else {
            twill_netd::cli::Cli::try_parse_from(&argv).map(|_| ())
        };
        if let Err(e) = parsed {
            panic!("{}: `{}` rejects {argv:?}: {e}", c.name, head.join(" "));
        }
    }
    // twillctl in the pod talks to the same etcd as twilld.
    let env = resolved_env(&m, twilld_container(pod));
    for k in [
        "ETCD_ENDPOINTS",
        "ETCD_PREFIX",
        "ETCD_CAFILE",
        "ETCD_CERTFILE",
        "ETCD_KEYFILE",
        "NODE_NAME",
    ] {
        assert_eq!(
            env.get(&format!("TWILLCTL_{k}")),
            env.get(&format!("TWILLD_{k}")),
            "{k}"
        );
    }
    // The daemon gets the settings it cannot guess.
    let env = resolved_env(&m, twilld_container(pod));
    for k in [
        "TWILLD_NODE_NAME",
        "TWILLD_ETCD_ENDPOINTS",
        "TWILLD_ETCD_CAFILE",
        "TWILLD_ETCD_CERTFILE",
        "TWILLD_ETCD_KEYFILE",
        "TWILLD_NET_CONF",
        "TWILLD_METRICS_ADDR",
    ] {
        assert!(env.contains_key(k), "twilld: env {k} missing");
    }
}

#[test]
fn file_env_values_point_into_mounted_volumes() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    for (c, names) in [
        (
            twilld_container(pod),
            vec![
                "TWILLD_ETCD_CAFILE",
                "TWILLD_ETCD_CERTFILE",
                "TWILLD_ETCD_KEYFILE",
                "TWILLD_NET_CONF",
            ],
        ),
        (install_container(pod), vec!["TWILLD_CNI_CONF_SRC"]),
    ] {
        let env = resolved_env(&m, c);
        for name in names {
            let file = &env[name];
            let (vol, rel) = mount_volume(pod, c, file)
                .unwrap_or_else(|| panic!("{}: {name}={file} is on no volume", c.name));
            let items: Vec<String> = if let Some(cm) = &vol.config_map {
                cm.items.iter().flatten().map(|i| i.path.clone()).collect()
            } else if let Some(s) = &vol.secret {
                s.items.iter().flatten().map(|i| i.path.clone()).collect()
            } else {
                panic!(
                    "{}: {name}={file}: volume {} is not a ConfigMap/Secret",
                    c.name, vol.name
                )
            };
            assert!(
                items.contains(&rel),
                "{}: {name}={file}: volume {} has no item {rel}",
                c.name,
                vol.name
            );
        }
    }
    // Directories the daemon and the installer write are the host's.
    let host_dir = |c: &Container, name: &str, env: &BTreeMap<String, String>| {
        let dir = &env[name];
        let (vol, rel) =
            mount_volume(pod, c, dir).unwrap_or_else(|| panic!("{name}={dir} not mounted"));
        let hp = vol
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: not a hostPath"));
        Path::new(&hp.path).join(rel)
    };
    let env = resolved_env(&m, install_container(pod));
    let c = install_container(pod);
    assert_eq!(
        host_dir(c, "TWILLD_CNI_BIN_DIR", &env),
        Path::new("/opt/cni/bin")
    );
    assert_eq!(
        host_dir(c, "TWILLD_CNI_CONF_DIR", &env),
        Path::new("/etc/cni/net.d")
    );
    assert!(
        !c.volume_mounts
            .iter()
            .flatten()
            .any(|v| v.read_only == Some(true) && v.mount_path.starts_with("/host"))
    );
    let env = resolved_env(&m, twilld_container(pod));
    let subnet = Path::new(&env["TWILLD_SUBNET_FILE"]);
    assert_eq!(
        host_dir(twilld_container(pod), "TWILLD_SUBNET_FILE", &env),
        Path::new("/run/twill").join(subnet.file_name().unwrap())
    );
}

#[test]
fn probes_hit_the_metrics_address() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    let c = twilld_container(pod);
    let env = resolved_env(&m, c);
    let addr: SocketAddr = env["TWILLD_METRICS_ADDR"]
        .parse()
        .expect("TWILLD_METRICS_ADDR");
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            IntOrString::Int(addr.port().into()),
            "{path}: port vs {addr}"
        );
        // hostNetwork: the kubelet probes the node's IP unless `host` says otherwise.
        match &get.host {
            Some(h) => assert!(
                addr.ip().is_unspecified() || h.parse() == Ok(addr.ip()),
                "{path}: probe host {h} vs TWILLD_METRICS_ADDR {addr}"
            ),
            None => assert!(
                addr.ip().is_unspecified(),
                "{path}: no probe host, but twilld listens on {addr}"
            ),
        }
        assert!(get.scheme.as_deref().unwrap_or("HTTP") == "HTTP");
    }
}

#[test]
fn capabilities_are_net_admin_only() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    for (_, c) in containers(pod) {
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_ne!(sc.privileged, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{}",
            c.name
        );
        let add = caps.add.clone().unwrap_or_default();
        let want: Vec<String> = if c.name == "twilld" {
            vec!["NET_ADMIN".into()]
        } else {
            vec![]
        };
        assert_eq!(add, want, "{}", c.name);
    }
    assert_ne!(pod.host_pid, Some(true));
    assert_ne!(pod.host_ipc, Some(true));
}

#[test]
fn resources_requests_within_limits() {
    let m = manifest();
    let pod = pod_spec(daemon_set(&m));
    fn mib(q: &str) -> f64 {
        let (n, unit) = q.split_at(q.find(|c: char| c.is_alphabetic()).unwrap_or(q.len()));
        let n: f64 = n.parse().unwrap();
        n * match unit {
            "Ki" => 1.0 / 1024.0,
            "Mi" => 1.0,
            "Gi" => 1024.0,
            "" => 1.0 / (1024.0 * 1024.0),
            u => panic!("unit {u}"),
        }
    }
    for (_, c) in containers(pod) {
        let r = c.resources.as_ref().expect("resources");
        let req = r.requests.as_ref().expect("requests");
        let lim = r.limits.as_ref().expect("limits");
        assert!(req.contains_key("cpu"), "{}: cpu request", c.name);
        let (rq, lm) = (mib(&req["memory"].0), mib(&lim["memory"].0));
        assert!(rq <= lm, "{}: request {rq} MiB > limit {lm} MiB", c.name);
        if c.name == "twilld" {
            // The benchmark target: RSS <= 15 MiB with 1,000 peers; the limit leaves room.
            assert!(
                lm >= 2.0 * 15.0,
                "twilld memory limit {lm} MiB too tight for 15 MiB RSS"
            );
            assert!(
                !lim.contains_key("cpu"),
                "no CPU limit: throttling delays resyncs"
            );
        }
    }
}

#[test]
fn net_conf_parses_with_twill_ipam() {
    let m = manifest();
    let json = config_value(&m, "twill-config", "net-conf.json");
    let conf = twill_ipam::netconf::NetConfig::from_json(&json)
        .unwrap_or_else(|e| panic!("net-conf.json: {e}"));
    assert_eq!(conf.backend.type_name(), "vxlan");
    assert_eq!(conf.backend.vxlan().port, 8472);
    assert!(conf.subnet_count() >= 2, "{conf:?}");
}

#[test]
fn conflist_is_valid_for_the_twill_plugin() {
    let m = manifest();
    let json = config_value(&m, "twill-config", "cni-conf.json");
    twill_netd::install_cni::validate_conflist(json.as_bytes())
        .unwrap_or_else(|e| panic!("cni-conf.json: {e:#}"));
    let v: Value = serde_json::from_str(&json).unwrap();
    // The plugin reads the subnet file where twilld writes it.
    let pod = pod_spec(daemon_set(&m));
    let env = resolved_env(&m, twilld_container(pod));
    assert_eq!(
        v["plugins"][0]["subnetFile"].as_str(),
        Some(env["TWILLD_SUBNET_FILE"].as_str())
    );
    // The design's conflist: 1.0.0 for libcni 1.1 runtimes, 1.1.0 (GC, STATUS) for newer.
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["cniVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
    assert_eq!(v["plugins"][1]["type"], "portmap");
}
