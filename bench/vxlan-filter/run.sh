#!/usr/bin/env bash
# VXLAN input filter benchmark: iperf3 pod↔pod with twill's input filter, without it, and with
# it plus strict rp_filter on twill.1, alternating in one run (node↔node as the reference).
# Two node namespaces (tw<pid>*) with a local etcd; all removed at the end. Needs root.
# docs/benchmarks.md ("VXLAN input filter") records the numbers.
#   BENCH_IPERF_SECS=5 BENCH_ROUNDS=3 PROFILE=release bench/vxlan-filter/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PROFILE:-release}"
flag=""; [ "$profile" = release ] && flag="--release"
cargo build $flag -p twill-netd -p twill-cni --bins
cargo build $flag -p twill-tests --bin bench_vxlan_filter
target="${CARGO_TARGET_DIR:-target}"
export TWILL_BIN_DIR="$PWD/$target/$profile"
case "$target" in /*) export TWILL_BIN_DIR="$target/$profile" ;; esac
exec "$TWILL_BIN_DIR/bench_vxlan_filter"
