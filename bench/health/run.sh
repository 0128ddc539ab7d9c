#!/usr/bin/env bash
# Peer-health benchmark: one real twilld with 1,000 simulated peer leases in a real etcd,
# CPU time, RSS and probes per second with peer health on (defaults) and off
# (--health-interval 0), over a fixed window. Everything runs in namespaces named tw<pid>*
# with a local etcd (/usr/bin/etcd) on free loopback ports; all of it is removed at the end.
# Needs root. docs/benchmarks.md ("Peer health") records the numbers.
#   BENCH_PEERS=1000 BENCH_WINDOW_SECS=60 BENCH_MAX_RATE=200 PROFILE=release bench/health/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PROFILE:-release}"
flag=""; [ "$profile" = release ] && flag="--release"
cargo build $flag -p twill-netd --bins
cargo build $flag -p twill-tests --bin bench_health
target="${CARGO_TARGET_DIR:-target}"
export TWILL_BIN_DIR="$PWD/$target/$profile"
case "$target" in /*) export TWILL_BIN_DIR="$target/$profile" ;; esac
exec "$TWILL_BIN_DIR/bench_health"
