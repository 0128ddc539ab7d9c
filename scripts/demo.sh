#!/usr/bin/env bash
# The main job, for now on one node: a node network namespace with the subnet file twilld
# would write, two pod namespaces wired by the real `twill` CNI plugin (exec'd inside the
# node namespace exactly as a runtime does), a ping between the pods, then cleanup.
# Everything is named tw<pid>-* and removed on exit, also on failure or Ctrl-C. Root.
#
# Written as small functions (node_up, pod_add, pod_ping, pod_del) so that the multi-node
# demo can call them per node.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: needs root (it creates network namespaces)" >&2
  exit 1
fi

export CARGO_TERM_COLOR=never
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
PREFIX="tw$$"
WORK="$(mktemp -d "/tmp/${PREFIX}-demo.XXXXXX")"
NAMESPACES=()

say() { printf '\n== %s\n' "$*"; }

cleanup() {
  local rc=$?
  say "cleanup"
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns" 2>/dev/null && echo "deleted netns $ns" || true
  done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

build() {
  say "build"
  cargo build --locked -p twill-cni --bin twill
  TWILL="$TARGET/debug/twill"
}

# node_up NODE NETWORK SUBNET MTU: a node namespace and its subnet file (what twilld writes).
node_up() {
  local node="$1" network="$2" subnet="$3" mtu="$4"
  local ns="${PREFIX}-${node}"
  ip netns add "$ns"
  NAMESPACES+=("$ns")
  ip -n "$ns" link set lo up
  mkdir -p "$WORK/$node"
  printf 'FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=%s\nFLANNEL_MTU=%s\nFLANNEL_IPMASQ=true\n' \
    "$network" "$subnet" "$mtu" > "$WORK/$node/subnet.env"
  echo "node $node: netns $ns, $WORK/$node/subnet.env:"
  sed 's/^/    /' "$WORK/$node/subnet.env"
}

# conf NODE: the plugin config of DESIGN.md's conflist, with the node's files.
conf() {
  local node="$1"
  printf '{"cniVersion":"1.1.0","name":"twill","type":"twill","subnetFile":"%s","dataDir":"%s","bridge":"cni0","hairpinMode":true}' \
    "$WORK/$node/subnet.env" "$WORK/$node/data"
}

# cni NODE POD COMMAND: exec twill inside the node namespace, as a runtime would.
cni() {
  local node="$1" pod="$2" cmd="$3"
  conf "$node" | CNI_COMMAND="$cmd" CNI_CONTAINERID="demo-$pod" \
    CNI_NETNS="/var/run/netns/${PREFIX}-${pod}" CNI_IFNAME=eth0 CNI_PATH="$(dirname "$TWILL")" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$pod" \
    nsenter --net="/var/run/netns/${PREFIX}-${node}" -- "$TWILL"
}

# pod_add NODE POD: a pod namespace, wired by `twill ADD`; prints the CNI result.
pod_add() {
  local node="$1" pod="$2"
  ip netns add "${PREFIX}-${pod}"
  NAMESPACES+=("${PREFIX}-${pod}")
  say "ADD $pod on $node"
  local result
  result="$(cni "$node" "$pod" ADD)"
  echo "$result" | jq .
  POD_IP["$pod"]="$(echo "$result" | jq -r '.ips[0].address' | cut -d/ -f1)"
}

# pod_ping FROM_POD TO_POD
pod_ping() {
  local from="$1" to="$2"
  say "ping from $from (${POD_IP[$from]}) to $to (${POD_IP[$to]})"
  nsenter --net="/var/run/netns/${PREFIX}-${from}" -- ping -c 3 -i 0.2 -W 2 "${POD_IP[$to]}"
}

# pod_del NODE POD
pod_del() {
  local node="$1" pod="$2"
  say "DEL $pod on $node"
  cni "$node" "$pod" DEL
  echo "released ${POD_IP[$pod]}"
}

declare -A POD_IP
build
say "node"
node_up node1 10.244.0.0/16 10.244.3.1/24 1450
pod_add node1 pod-a
pod_add node1 pod-b
say "inside pod-a"
ip -n "${PREFIX}-pod-a" -br addr show dev eth0
ip -n "${PREFIX}-pod-a" route
say "node1: bridge and host veths"
ip -n "${PREFIX}-node1" -br link show master cni0
pod_ping pod-a pod-b
pod_ping pod-b pod-a
pod_del node1 pod-a
pod_del node1 pod-b
say "reservations left on node1"
jq -c '.reservations' "$WORK/node1/data/twill/state.json"
say "demo: OK"
