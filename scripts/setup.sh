#!/usr/bin/env bash
# Installs what twill's build, tests and demo need on Debian 12, only what is missing.
# Idempotent; needs root (apt-get) the first time.
set -euo pipefail

PKGS=(
  etcd-server          # the real etcd the tests and the demo start (etcd 3.4)
  protobuf-compiler    # protoc, for etcd-client's build
  iproute2             # ip, bridge: namespaces, links, and checks in tests
  nftables             # nft: twilld's masquerade/forward table
  iptables             # portmap (chained plugin) programs iptables
  iputils-ping         # ping between pods
  containernetworking-plugins  # reference plugins: bridge, host-local, portmap (benchmarks, chaining)
  iperf3               # throughput benchmark
  util-linux           # nsenter
  procps               # ps, for RSS figures
  jq                   # demo output
  ca-certificates
  openssl              # test certificates for etcd mTLS
  pkg-config
  podman               # podman_cni test: a real libcni client (podman 4.3, CNI backend, libcni 1.1.2)
  runc                 # podman_cni: OCI runtime (crun refuses this host's cgroup v1/v2 hybrid)
  conmon               # podman_cni: podman's container monitor
  busybox-static       # podman_cni: the containers' rootfs (no image registry needed)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || [ -x /usr/local/cargo/bin/cargo ] ||
  { echo "setup: cargo (Rust toolchain, see rust-toolchain.toml) is required" >&2; exit 1; }
