#!/usr/bin/env bash
# Direct routing benchmark: iperf3 pod↔pod with Backend.DirectRouting against node↔node on the
# same underlay, and pod↔pod over VXLAN against node↔node on the same topology, alternating in
# one run (two clusters of two node namespaces each, tw<pid>*, with local etcds; all removed
# at the end). Needs root. docs/benchmarks.md ("Direct routing") records the numbers.
#   BENCH_IPERF_SECS=5 BENCH_ROUNDS=3 PROFILE=debug bench/direct-routing/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PROFILE:-release}"
flag=""; [ "$profile" = release ] && flag="--release"
cargo build $flag -p twill-netd -p twill-cni --bins
cargo build $flag -p twill-tests --bin bench_direct_routing
target="${CARGO_TARGET_DIR:-target}"
export TWILL_BIN_DIR="$PWD/$target/$profile"
case "$target" in /*) export TWILL_BIN_DIR="$target/$profile" ;; esac
exec "$TWILL_BIN_DIR/bench_direct_routing"
