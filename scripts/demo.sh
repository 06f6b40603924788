#!/usr/bin/env bash
# The local mesh demo: two nodes on network namespaces, one ztunnel each,
# a few pods, and a checked walk through identities, policy, encryption
# and live configuration changes. Then it stays up for you to poke at
# until Ctrl-C, and removes everything it created.
#
#   bash scripts/demo.sh          # scenario, then interactive until Ctrl-C
#   bash scripts/demo.sh --once   # scenario only; exit 0 iff every step passed
#
# Needs root (network namespaces, veths, iptables). Runs scripts/setup.sh
# first (idempotent), then builds the release binaries.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: must run as root (network namespaces, veths, iptables); try: sudo bash scripts/demo.sh $*" >&2
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

# Only the two binaries the demo runs: a half-edited benchmark in e2e must
# not keep the demo from starting.
echo "demo: building (cargo build --release -p ztunnel -p e2e --bin ztunnel --bin demo)"
cargo build --release -p ztunnel -p e2e --bin ztunnel --bin demo

exec target/release/demo "$@"
