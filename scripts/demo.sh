#!/usr/bin/env bash
# The local mesh demo: two nodes on network namespaces, the xds control
# plane on a directory of Kubernetes manifests, one ztunnel per node fed by
# xDS, pods (netns + cgroup) enrolled by the ztunnel-cni plugin and captured
# with eBPF, and a checked walk through identities, policy, encryption and
# live manifest edits. Then it stays up for you to poke at until Ctrl-C,
# and removes everything it created.
#
#   bash scripts/demo.sh          # scenario, then interactive until Ctrl-C
#   bash scripts/demo.sh --once   # scenario only; exit 0 iff every step passed
#
# Needs root (network namespaces, veths, cgroups, eBPF). Runs scripts/setup.sh
# first (idempotent), then builds the release binaries.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: must run as root (network namespaces, cgroups, eBPF); try: sudo bash scripts/demo.sh $*" >&2
  exit 1
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in
  *":$CARGO_BIN:"*) ;;
  *) export PATH="$CARGO_BIN:$PATH" ;;
esac

echo "demo: set-up (scripts/setup.sh)"
bash scripts/setup.sh

# Only the binaries the demo runs: a half-edited benchmark in e2e must not
# keep the demo from starting.
echo "demo: building (cargo build --release: ztunnel, xds, ztunnel-cni, waypoint, demo, sample-grpc)"
cargo build --release -p ztunnel -p xds -p ztunnel-cni -p waypoint -p e2e \
  --bin ztunnel --bin xds --bin ztunnel-cni --bin waypoint --bin demo --bin sample-grpc

exec target/release/demo "$@"
