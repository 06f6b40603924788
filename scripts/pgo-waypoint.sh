#!/usr/bin/env bash
# The profile-guided (PGO) build of the waypoint alone, for the image
# (charts/Containerfile): the waypoint's training runs on loopback only
# (scripts/pgo-train-waypoint.sh), so a container build can run it, while
# ztunnel's needs network namespaces. scripts/pgo-build.sh builds both
# proxies this way, for the benchmarks. The PGO build spends 5-10% less
# CPU per proxied HTTP/1.1 request than the plain one (the waypoint's
# README, "Benchmark").
#
# Usage: scripts/pgo-waypoint.sh DEST
#   Needs cargo and rustup, and what the training runs: nginx, wrk, h2load,
#   openssl, curl and ss. Works in target/pgo-waypoint/ and writes the
#   PGO-built waypoint to DEST. About two release builds' time.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DEST" >&2; exit 2; }
DEST=$1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { echo "== pgo-waypoint.sh: $*"; }

source "$ROOT/scripts/pgo-lib.sh"
find_profdata

OUT="$ROOT/target/pgo-waypoint"
PROFILES="$OUT/profiles"
rm -rf "$PROFILES"
mkdir -p "$PROFILES"

step "instrumented build"
RUSTFLAGS="-Cprofile-generate=$PROFILES" CARGO_TARGET_DIR="$OUT/gen-target" \
  cargo build --release --locked -p waypoint
# Build scripts compiled with the same flags wrote profiles of their own.
rm -f "$PROFILES"/*.profraw

step "training (scripts/pgo-train-waypoint.sh)"
bash "$ROOT/scripts/pgo-train-waypoint.sh" "$OUT/gen-target/release/waypoint"
merge_profiles "$PROFILES" "$OUT/waypoint.profdata"

step "build with the profile"
RUSTFLAGS="-Cprofile-use=$OUT/waypoint.profdata" CARGO_TARGET_DIR="$OUT/use-target" \
  cargo build --release --locked -p waypoint
install -m 755 "$OUT/use-target/release/waypoint" "$DEST"
step "done: $DEST"
