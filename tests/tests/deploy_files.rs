//! The Dockerfile, the systemd unit + env file and the operator's guide against the
//! workspace: binary names, paths, toolchain, every flag of twilld and every key of
//! net-conf.json documented. (No Docker engine runs in CI: the Dockerfile is checked by
//! construction.) Pure file checks, except `systemd-analyze verify` when it is installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Dockerfile instructions with their continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// `[[bin]]` names of a crate's Cargo.toml.
fn bin_names(crate_dir: &str) -> Vec<String> {
    let toml = read(&format!("{crate_dir}/Cargo.toml"));
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_bin = t == "[[bin]]";
        } else if in_bin && let Some(v) = t.strip_prefix("name = ") {
            names.push(v.trim_matches('"').to_string());
        }
    }
    names
}

fn package_name(crate_dir: &str) -> String {
    read(&format!("{crate_dir}/Cargo.toml"))
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .unwrap()
        .trim_matches('"')
        .to_string()
}

#[test]
fn dockerfile_builds_the_workspace_binaries_into_the_image() {
    let ins = dockerfile();
    let froms: Vec<&String> = ins.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert_eq!(
        froms.len(),
        2,
        "multi-stage: a build stage and a runtime stage"
    );
    assert!(froms[0].ends_with(" AS build"), "{}", froms[0]);
    // The toolchain of rust-toolchain.toml.
    let channel = read("rust-toolchain.toml")
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(
        ins.iter()
            .any(|i| *i == format!("ARG RUST_VERSION={channel}")),
        "Dockerfile's RUST_VERSION is not rust-toolchain.toml's {channel}"
    );
    // The build names real packages and copies exactly their binaries.
    let build = ins
        .iter()
        .find(|i| i.contains("cargo build"))
        .expect("cargo build");
    assert!(
        build.contains("--release") && build.contains("--locked"),
        "{build}"
    );
    let mut bins = Vec::new();
    for dir in ["netd", "cni-plugin"] {
        let pkg = package_name(dir);
        assert!(
            build.contains(&format!("-p {pkg}")),
            "build does not name package {pkg}"
        );
        bins.extend(bin_names(dir));
    }
    bins.sort();
    assert_eq!(bins, ["twill", "twillctl", "twilld"]);
    for b in &bins {
        // The plugin is built static, for the host's triple (target/<triple>/release/).
        let collected = if b == "twill" {
            build.contains("target/*/release/twill") && build.contains("+crt-static")
        } else {
            build.contains(&format!("target/release/{b}"))
        };
        assert!(collected, "binary {b} not collected");
    }
    let copy = ins
        .iter()
        .find(|i| i.starts_with("COPY --from=build"))
        .expect("COPY --from=build");
    for b in &bins {
        assert!(
            copy.contains(&format!("/out/{b}")),
            "{copy}: {b} not copied"
        );
    }
    assert!(copy.ends_with(" /usr/local/bin/"), "{copy}");
    // The runtime has nft (twilld's nftables table) and starts twilld.
    let runtime_start = ins.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
    assert!(
        ins[runtime_start..]
            .iter()
            .any(|i| i.contains("apt-get install") && i.contains("nftables")),
        "the runtime stage does not install nftables"
    );
    assert!(
        ins.iter()
            .any(|i| i == "ENTRYPOINT [\"/usr/local/bin/twilld\"]")
    );
    // protoc for etcd-client, in the build stage.
    assert!(
        ins[..runtime_start]
            .iter()
            .any(|i| i.contains("protobuf-compiler"))
    );
}

#[test]
fn image_paths_match_the_manifest_and_install_cni_defaults() {
    // The init container copies the plugin from where the Dockerfile puts it.
    let manifest = read("deploy/kube-twill.yml");
    assert!(manifest.contains("command: [\"/usr/local/bin/twilld\", \"install-cni\"]"));
    assert!(manifest.contains("value: /usr/local/bin/twill\n"));
    let cmd = twill_netd::cli::Cli::command();
    let install = cmd.find_subcommand("install-cni").unwrap();
    let default = |id: &str| {
        install
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("install-cni has no {id}"))
            .get_default_values()[0]
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(default("plugin_src"), "/usr/local/bin/twill");
    assert_eq!(default("bin_dir"), "/opt/cni/bin");
    assert_eq!(default("conf_dir"), "/etc/cni/net.d");
    assert_eq!(default("conf_name"), "10-twill.conflist");
}

#[test]
fn dockerignore_keeps_build_output_out_of_the_context() {
    let ignore = read("deploy/Dockerfile.dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for p in [".git", "target"] {
        assert!(lines.contains(&p), "Dockerfile.dockerignore lacks {p}");
    }
    // What the build needs is in the context: every workspace member and the lock file.
    for p in [
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain.toml",
        "ipam",
        "dataplane",
        "cni-plugin",
        "netd",
        "tests",
    ] {
        assert!(repo().join(p).exists(), "{p} missing from the repository");
        assert!(!lines.contains(&p), "{p} must not be ignored");
    }
}

/// (env name → (long flag, default)) of twilld and of `twilld install-cni`.
fn all_flags() -> BTreeMap<String, (String, Option<String>)> {
    let cmd = twill_netd::cli::Cli::command();
    let install = cmd.find_subcommand("install-cni").unwrap().clone();
    cmd.get_arguments()
        .chain(install.get_arguments())
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            let default = a
                .get_default_values()
                .first()
                .map(|d| d.to_string_lossy().into_owned());
            Some((env, (a.get_long().unwrap().to_string(), default)))
        })
        .collect()
}

#[test]
fn env_file_names_every_flag_with_its_default() {
    let flags = all_flags();
    let text = read("deploy/twilld.env");
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let (commented, kv) = match line.strip_prefix('#') {
            Some(rest) if rest.starts_with("TWILLD_") => (true, rest),
            Some(_) => continue,
            None if line.trim().is_empty() => continue,
            None => (false, line),
        };
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("twilld.env: bad line {line:?}"));
        let (_, default) = flags
            .get(k)
            .unwrap_or_else(|| panic!("twilld.env: {k} is not a flag of twilld"));
        if commented && !v.is_empty() {
            // A commented line documents the default: it must be the real one.
            assert_eq!(
                Some(v),
                default.as_deref(),
                "twilld.env: {k}={v} is not the default"
            );
        }
        assert!(
            seen.insert(k.to_string(), v.to_string()).is_none(),
            "{k} twice"
        );
    }
    let missing: Vec<_> = flags.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "twilld.env does not mention {missing:?}"
    );
}

#[test]
fn systemd_unit_runs_install_cni_then_twilld_with_net_admin_only() {
    let unit = read("deploy/twilld.service");
    let kv: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |k: &str| {
        kv.iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
    };
    assert_eq!(get("ExecStartPre"), ["/usr/local/bin/twilld install-cni"]);
    assert_eq!(get("ExecStart"), ["/usr/local/bin/twilld"]);
    assert_eq!(get("EnvironmentFile"), ["/etc/twill/twilld.env"]);
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_NET_ADMIN"]);
    // /run/twill (subnet.env) must survive a restart of twilld.
    assert_eq!(get("RuntimeDirectory"), ["twill"]);
    assert_eq!(get("RuntimeDirectoryPreserve"), ["yes"]);
    // The CNI directories install-cni writes are writable despite ProtectSystem=strict.
    let rw = get("ReadWritePaths").join(" ");
    for d in ["/opt/cni/bin", "/etc/cni/net.d"] {
        assert!(rw.split(' ').any(|p| p == d), "ReadWritePaths lacks {d}");
    }
    assert!(get("RestrictAddressFamilies")[0].contains("AF_NETLINK"));
}

/// `systemd-analyze verify` on the unit: syntax and directive names. The only complaint
/// allowed is that /usr/local/bin/twilld is not installed on this machine.
#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        panic!("systemd-analyze not installed (Debian: systemd)");
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("twilld.service");
    std::fs::copy(repo().join("deploy/twilld.service"), &unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("/usr/local/bin/twilld is not executable"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints:#?}"
    );
}

#[test]
fn operations_guide_documents_every_flag_and_net_conf_key() {
    let ops = read("docs/operations.md");
    for (env, (long, _)) in all_flags() {
        assert!(
            ops.contains(&format!("`--{long}`")),
            "docs/operations.md lacks `--{long}`"
        );
        assert!(
            ops.contains(&format!("`{env}`")),
            "docs/operations.md lacks `{env}`"
        );
    }
    for key in [
        "Network",
        "SubnetLen",
        "SubnetMin",
        "SubnetMax",
        "Backend",
        "Type",
        "VNI",
        "Port",
        "EnableIPv6",
        "IPv6Network",
        "IPv6SubnetLen",
    ] {
        assert!(
            ops.contains(&format!("`{key}`")),
            "docs/operations.md lacks net-conf key `{key}`"
        );
    }
}

#[test]
fn guides_exist_and_link_to_each_other() {
    for doc in [
        "install",
        "upgrade",
        "operations",
        "troubleshooting",
        "comparison",
    ] {
        let text = read(&format!("docs/{doc}.md"));
        assert!(text.starts_with("# "), "docs/{doc}.md has no title");
        // Every relative link to another doc resolves.
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            let p = repo().join("docs").join(file);
            assert!(p.exists(), "docs/{doc}.md links to missing {target}");
        }
    }
}
