#!/usr/bin/env bash
# Installs what twill's build, tests and demo need on Debian 12 (only what is missing), then
# checks that each piece works, not just that its package is installed. Idempotent; needs root
# (apt-get) the first time. Every package is named here: with --no-install-recommends a
# package's Recommends never come, so nothing may rely on one.
set -euo pipefail

PKGS=(
  etcd-server          # the real etcd the tests and the demo start (etcd 3.4)
  protobuf-compiler    # protoc, for etcd-client's build script
  libprotobuf-dev      # protoc's well-known types (google/protobuf/descriptor.proto): only a Recommends of protobuf-compiler
  pkg-config
  iproute2             # ip, bridge: namespaces, links, and checks in tests
  nftables             # nft: twilld's masquerade/forward/input table
  iptables             # portmap (chained plugin) programs iptables
  iputils-ping         # ping between pods
  containernetworking-plugins  # reference plugins: bridge, host-local, portmap (benchmarks, chaining)
  iperf3               # throughput benchmark
  util-linux           # nsenter, unshare
  procps               # ps, for RSS figures
  jq                   # demo output
  ca-certificates
  openssl              # test certificates for etcd mTLS
  systemd              # systemd-analyze: the deploy test verifies deploy/twilld.service
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
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root (apt-get install --no-install-recommends ${missing[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# What the build, the tests and the demo use, checked by running it. Each failure names the
# missing piece and the Debian package that provides it.
failed=0
need() { # need <package> <what> <command...>
  local pkg=$1 what=$2
  shift 2
  if ! out=$("$@" 2>&1); then
    echo "setup: $what does not work (package $pkg): $* -> ${out:-no output}" >&2
    failed=1
  fi
}
protoc_check() {
  local d
  d=$(mktemp -d)
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage M { google.protobuf.FileDescriptorProto f = 1; }\n' >"$d/check.proto"
  protoc -I"$d" --include_imports -o/dev/null "$d/check.proto"
  local rc=$?
  rm -rf "$d"
  return $rc
}
need protobuf-compiler "protoc" protoc --version
need libprotobuf-dev "protoc's well-known types (google/protobuf/descriptor.proto)" protoc_check
need etcd-server "etcd" etcd --version
need iproute2 "ip" ip -V
need iproute2 "bridge" bridge -V
need nftables "nft" nft --version
need iptables "iptables" iptables --version
need iputils-ping "ping" ping -V
need containernetworking-plugins "the reference CNI plugins" test -x /usr/lib/cni/bridge -a -x /usr/lib/cni/host-local -a -x /usr/lib/cni/portmap
need iperf3 "iperf3" iperf3 --version
need util-linux "nsenter" nsenter --version
need util-linux "unshare" unshare --version
need procps "ps" ps --version
need jq "jq" jq --version
need openssl "openssl" openssl version
need systemd "systemd-analyze" systemd-analyze --version
need podman "podman" podman --version
need runc "runc" runc --version
need conmon "conmon" conmon --version
need busybox-static "busybox (static)" /bin/busybox true
need pkg-config "pkg-config" pkg-config --version
if ((failed)); then
  echo "setup: fix the above (apt-get install --no-install-recommends <package>) and run again" >&2
  exit 1
fi

if ! command -v cargo >/dev/null 2>&1 && ! [ -x "$HOME/.cargo/bin/cargo" ] && ! [ -x /usr/local/cargo/bin/cargo ]; then
  echo "setup: cargo is missing: install the Rust toolchain named in rust-toolchain.toml (rustup)" >&2
  exit 1
fi
