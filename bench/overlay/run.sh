#!/usr/bin/env bash
# Overlay benchmark: convergence of N peers (leases kept alive by simulated holders) against ip -batch,
# new lease → route and deleted lease → route gone latency, twilld and etcd RSS and CPU, a full re-list
# after a compaction,
# iperf3 pod↔pod vs node↔node. Everything runs in
# namespaces named tw<pid>* with a local etcd (/usr/bin/etcd) on free loopback ports; all of
# it is removed at the end. Needs root. docs/benchmarks.md ("Overlay") records the numbers.
#   BENCH_PEERS=1000 BENCH_JOINS=100 BENCH_IPERF_SECS=5 PROFILE=release bench/overlay/run.sh
# The scale run (5,000 nodes: leases kept alive by simulated holders, etcd CPU/RSS, re-list):
#   BENCH_PEERS=5000 BENCH_JOINS=100 BENCH_IPERF_SECS=0 PROFILE=release bench/overlay/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PROFILE:-release}"
flag=""; [ "$profile" = release ] && flag="--release"
cargo build $flag -p twill-netd -p twill-cni --bins
cargo build $flag -p twill-tests --bin bench_overlay
target="${CARGO_TARGET_DIR:-target}"
export TWILL_BIN_DIR="$PWD/$target/$profile"
case "$target" in /*) export TWILL_BIN_DIR="$target/$profile" ;; esac
exec "$TWILL_BIN_DIR/bench_overlay"
