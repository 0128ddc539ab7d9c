#!/usr/bin/env bash
# Bounded coverage-guided fuzzing of every parser of untrusted input (docs/fuzzing.md).
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS (default 15) each: ~3 minutes
#   scripts/fuzz.sh netconf 60      one target (or a comma list), 60 s each
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`, from crates.io) and g++ (libFuzzer is
# built from C++ source by libfuzzer-sys). cargo-fuzz passes nightly-only flags to rustc
# (-Zsanitizer=address, coverage instrumentation): on this project's pinned stable toolchain
# (rust-toolchain.toml) RUSTC_BOOTSTRAP=1 enables them, so no nightly is needed; set
# FUZZ_TOOLCHAIN=nightly to use an installed nightly instead.
#
# The committed corpus fuzz/corpus/<target>/ seeds each run read-only; what the fuzzer finds
# goes to fuzz/target/work-corpus/<target>/ and crashes to fuzz/artifacts/<target>/. A crash
# worth keeping: fix it, then copy the input into fuzz/corpus/<target>/ (a short name), so that
# `cargo test -p twill-tests --test fuzz_corpus` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

ALL="netconf lease_key lease_value subnet_env alloc_state cni_conf cni_conflist cni_args cni_env cni_prev_result cni_runtime_config"
targets="${1:-$ALL}"
targets="${targets//,/ }"
secs="${2:-${FUZZ_SECONDS:-15}}"

if ! cargo fuzz --help >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
if [[ -n "${FUZZ_TOOLCHAIN:-}" ]]; then
    fuzz=(cargo "+$FUZZ_TOOLCHAIN" fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

# The allocator target writes a state file per run; tmpfs keeps that cheap.
export TWILL_FUZZ_TMP="${TWILL_FUZZ_TMP:-$(mktemp -d /dev/shm/twill-fuzz.XXXXXX 2>/dev/null || mktemp -d)}"
trap 'rm -rf "$TWILL_FUZZ_TMP"' EXIT

"${fuzz[@]}" build -O

# Fork mode with -ignore_crashes: a corpus file that still fails (a finding whose fix has not
# landed) is recorded and the run goes on, instead of ending at the first input.
failed=()
for t in $targets; do
    work="target/work-corpus/$t"
    mkdir -p "$work" "artifacts/$t" "corpus/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "== $t: ${secs}s"
    "${fuzz[@]}" run -O "$t" "$work" "corpus/$t" -- \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$t/" 2>"target/$t.log" || true
    after=$(find "artifacts/$t" -type f | wc -l)
    grep -E "^#[0-9]+: cov" "target/$t.log" | tail -1 || true
    if ((after > before)); then
        failed+=("$t")
        echo "   $((after - before)) new crash input(s) in fuzz/artifacts/$t/:" >&2
        grep -E "panicked at|^(thread|assertion)|accepted|not canonical" "target/$t.log" |
            sort | uniq -c | sort -rn | head -5 >&2 || true
    fi
done

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (inputs in fuzz/artifacts/, logs in fuzz/target/<target>.log)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a finding"
