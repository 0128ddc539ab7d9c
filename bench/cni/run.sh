#!/usr/bin/env bash
# CNI benchmark: twill vs Debian's bridge + host-local, 200 sequential ADD/DEL each (one
# run, one node namespace, same subnet and MTU, each pod in a fresh netns). Prints p50/p95
# raw and net of the exec floor (/bin/true), the ratios, binary size and peak RSS; then a
# second loop: `ip link del` of a pod's veth, and twill ADD with its reservations on disk vs
# on tmpfs (the disk's share of an ADD).
# Usage: bench/cni/run.sh [iterations]   (root; creates only namespaces named twb*)
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-200}"
./scripts/setup.sh
[ "$(id -u)" = 0 ] || { echo "bench: needs root" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# The plugin as shipped (deploy/Dockerfile): statically linked, built for the host triple.
HOST_TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p twill-cni --bin twill --target "$HOST_TRIPLE" >&2
cargo build --locked -p twill-tests --bin bench_cni >&2

PREFIX="twb$$"
NODE="${PREFIX}node"
WORK="$(mktemp -d /tmp/twbench.XXXXXX)"
# A second data dir on tmpfs: the second loop compares reservations on disk and on tmpfs.
SHM="$(mktemp -d /dev/shm/twbench.XXXXXX)"
cleanup() {
  # Pods of an interrupted run, then the node namespace (its bridge and veths go with it).
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${PREFIX}[trvw][0-9]+$" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$WORK" "$SHM"
}
trap cleanup EXIT
ip netns add "$NODE"
ip -n "$NODE" link set lo up
echo "bench: $(uname -r), $(nproc) cores, node netns $NODE" >&2
nsenter --net="/var/run/netns/$NODE" -- "$CARGO_TARGET_DIR/debug/bench_cni" \
  --twill "$CARGO_TARGET_DIR/$HOST_TRIPLE/release/twill" --work "$WORK" --iterations "$N" --prefix "$PREFIX" \
  --tmpfs-work "$SHM"
