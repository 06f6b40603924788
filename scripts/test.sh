#!/usr/bin/env bash
# Build everything and run the workspace tests.
# Usage: scripts/test.sh [extra args passed to `cargo test`]
#   e.g. scripts/test.sh -p ztunnel -- --nocapture
# Needs root: the tests create network namespaces.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "test.sh: ERROR: must run as root (tests create network namespaces); try: sudo $0 $*" >&2
  exit 1
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# A build and test run from scratch fills target/ with about 5 GiB (under
# 3 GiB as .ci/run builds, without incremental caches or debug info). Say
# so up front rather than fail half-way with "No space left on device".
read -r avail_kib mount < <(df -Pk "$ROOT" | awk 'NR == 2 {print $4, $6}') || true
if [[ -n "${avail_kib:-}" ]] && (( avail_kib < 6 * 1024 * 1024 )); then
  echo "test.sh: WARNING: $((avail_kib / 1024)) MiB free on $mount;" \
    "a build and test run from scratch needs about 6 GiB" >&2
fi

echo "== test.sh: setup"
bash "$ROOT/scripts/setup.sh"

echo "== test.sh: cargo build --workspace --all-targets"
cargo build --workspace --all-targets

echo "== test.sh: cargo test --workspace $*"
cargo test --workspace "$@"

# Only with no extra arguments (the whole suite): the control plane's
# Kubernetes parts (feature `kube`: the cluster source and TokenReview auth,
# whose tests run against a fake API server).
if [[ $# -eq 0 ]]; then
  echo "== test.sh: cargo test -p xds --features kube --lib"
  cargo test -p xds --features kube --lib
fi

# Only with no extra arguments: the Helm charts, rendered, validated and
# checked against the binaries just built (charts/test.py; tools from setup).
if [[ $# -eq 0 ]]; then
  echo "== test.sh: charts/test.py"
  CHARTS_VENV="${CHARTS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ambient-mesh/charts-venv}"
  "$CHARTS_VENV/bin/python" "$ROOT/charts/test.py"
fi

# The README's demo scenario, end to end on the binaries just built.
echo "== test.sh: demo --once"
"${CARGO_TARGET_DIR:-$ROOT/target}/debug/demo" --once
