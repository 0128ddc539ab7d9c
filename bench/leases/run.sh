#!/usr/bin/env bash
# Lease benchmark: 200 concurrent acquisitions, list + watch of 5000 leases, against one
# local etcd (/usr/bin/etcd) started on free loopback ports in a temp dir and killed after.
# Prints the numbers; docs/benchmarks.md ("Leases") records them.
#   BENCH_ACQUIRERS=200 BENCH_LEASES=5000 PROFILE=release bench/leases/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PROFILE:-release}"
flag=""; [ "$profile" = release ] && flag="--release"
cargo build $flag -p twill-tests --bin bench_leases
target="${CARGO_TARGET_DIR:-target}"
exec "$target/$profile/bench_leases"
