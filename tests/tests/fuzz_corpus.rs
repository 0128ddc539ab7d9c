//! Replays the fuzz regression corpus (`fuzz/corpus/<target>/`, docs/fuzzing.md) through the
//! same check functions that the cargo-fuzz targets call (`twill_ipam::fuzz_checks`,
//! `twill_cni::fuzz_checks`). No root, no kernel, no etcd: the allocator's check writes its
//! state file under a temp dir.
//!
//! What it proves: every input the fuzzer (or a person) once found wrong, and every seed of
//! the targets, still satisfies the semantic rules and round-trips. The corpus holds the
//! known findings of issue 15 (the /126 IPv6Network, padded lease keys, a gateway that is the
//! network address, `%`/non-ASCII interface names, `../../bin/sh` as a plugin type, loose
//! runtimeConfig IPs, nameservers that are no IPs): each one fails this test until the parser
//! refuses it, so the test fails for real and not only on a panic.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

type Check = fn(&[u8]);

const TARGETS: &[(&str, Check)] = &[
    ("netconf", twill_ipam::fuzz_checks::netconf),
    ("lease_key", twill_ipam::fuzz_checks::lease_key),
    ("lease_value", twill_ipam::fuzz_checks::lease_value),
    ("subnet_env", twill_ipam::fuzz_checks::subnet_env),
    ("alloc_state", twill_ipam::fuzz_checks::alloc_state),
    ("cni_conf", twill_cni::fuzz_checks::conf),
    ("cni_conflist", twill_cni::fuzz_checks::conflist),
    ("cni_args", twill_cni::fuzz_checks::cni_args),
    ("cni_env", twill_cni::fuzz_checks::env),
    ("cni_prev_result", twill_cni::fuzz_checks::prev_result),
    ("cni_runtime_config", twill_cni::fuzz_checks::runtime_config),
];

#[test]
fn every_corpus_file_passes_its_targets_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let tmp = tempfile::tempdir().unwrap();
    // SAFETY: set before any thread of this test reads the environment; the test binary runs
    // this one test in this file.
    unsafe { std::env::set_var("TWILL_FUZZ_TMP", tmp.path()) };
    let fuzz_targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in TARGETS {
        // Every cargo-fuzz target has its check here, and a non-empty corpus.
        assert!(
            fuzz_targets.join(format!("{target}.rs")).is_file(),
            "no fuzz target {target}"
        );
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "empty corpus {}", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap();
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!(
                    "{target}/{}: {msg}",
                    f.file_name().unwrap().to_string_lossy()
                ));
            }
            replayed += 1;
        }
    }
    let n = std::fs::read_dir(&fuzz_targets).unwrap().count();
    assert_eq!(n, TARGETS.len(), "a fuzz target without a replay here");
    assert!(
        failures.is_empty(),
        "{} of {replayed} corpus files fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
