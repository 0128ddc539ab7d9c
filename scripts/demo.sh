#!/usr/bin/env bash
# The main job: a local twill cluster in network namespaces. A real etcd, 3 nodes (namespaces
# on an underlay bridge), one real twilld per node, 2 pods per node made by the real `twill`
# CNI plugin; the ping matrix, a no-NAT check, `twillctl leases list` and `twillctl status`;
# then everything is removed (also on failure or Ctrl-C: the demo's guards delete the
# namespaces and stop the processes they started). Root, Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
. ./scripts/env.sh
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: needs root (it creates network namespaces)" >&2
  exit 1
fi

export CARGO_TERM_COLOR=never
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
echo "== build (cargo build: twill, twilld, twillctl, the demo driver)"
cargo build --locked -q -p twill-cni -p twill-netd --bins
cargo build --locked -q -p twill-tests --bin demo_cluster
export TWILL_BIN_DIR="$TARGET/debug"
exec "$TARGET/debug/demo_cluster"
