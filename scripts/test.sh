#!/usr/bin/env bash
# The whole test suite: format, lints, unit tests, kernel tests, etcd tests, cluster tests.
# Run as root on Debian 12: kernel and cluster tests create their own network namespaces
# (prefix "tw"), and remove them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. ./scripts/env.sh
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the kernel and cluster tests need root (they create network namespaces)" >&2
  exit 1
fi
export CARGO_TERM_COLOR=never
# One full build, not many small rebuilds: incremental caches would only take disk.
export CARGO_INCREMENTAL=0
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
# Tests find the binaries here (see tests/src/lib.rs).
export TWILL_BIN_DIR="$PWD/target/debug"
cargo test --workspace --locked -- --test-threads="${TWILL_TEST_THREADS:-4}"
