#!/usr/bin/env bash
# Release binaries with profile-guided optimisation (PGO) for the two
# data-plane proxies, ztunnel and waypoint: build them instrumented, run
# traffic through them, and build them again with the recorded profile, so
# the compiler lays out and inlines for the paths a request really takes.
# The waypoint trains on a config and traffic mix of its own
# (scripts/pgo-train-waypoint.sh), not on `bench waypoint`, which then
# measures it; ztunnel trains on `bench ztunnel`. On the 2-vCPU development
# VM PGO took the waypoint from 30.8k to 23.0k instructions per HTTP/1.1
# request (README, "Profile-guided builds").
#
# Usage: scripts/pgo-build.sh            (as root: ztunnel's training runs
#                                          its benchmark in network namespaces)
# Result: target/pgo/bin/, laid out like target/release/: the PGO-built
#   ztunnel and waypoint, next to the plain release xds, ztunnel-cni,
#   ztunnel-cni-install, bench and demo, so `target/pgo/bin/bench ...` runs
#   the benchmarks on the PGO builds. The profile is
#   target/pgo/merged.profdata, ztunnel's training report target/pgo/training/.
# Takes about three release builds' time (25-30 min on 2 vCPUs).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "pgo-build.sh: ERROR: must run as root (the training benchmarks create network namespaces)" >&2
  exit 1
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
step() { echo "== pgo-build.sh: $*"; }

step "setup"
bash "$ROOT/scripts/setup.sh"
# The waypoint's training load: wrk (HTTP/1.1) and h2load (HTTP/2).
if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client >/dev/null
fi
source "$ROOT/scripts/pgo-lib.sh"
find_profdata

OUT="$ROOT/target/pgo"
PROFILES="$OUT/profiles"
rm -rf "$PROFILES" "$OUT/gen-bin" "$OUT/bin" "$OUT/training"
mkdir -p "$PROFILES" "$OUT/gen-bin" "$OUT/bin"

# Everything, ztunnel and waypoint included: the benchmark driver and the
# binaries not trained come from here, and the plain proxies are the
# baseline to compare the PGO builds with.
step "plain release build"
cargo build --release -p e2e -p xds -p ztunnel-cni -p ztunnel -p waypoint

# Their own target directories: the flags differ, and the plain build in
# target/release stays as it is.
step "instrumented build of ztunnel and waypoint"
RUSTFLAGS="-Cprofile-generate=$PROFILES" CARGO_TARGET_DIR="$OUT/gen-target" \
  cargo build --release -p ztunnel -p waypoint
# Build scripts compiled with the same flags wrote profiles of their own.
rm -f "$PROFILES"/*.profraw
cp "$OUT/gen-target/release/ztunnel" "$OUT/gen-target/release/waypoint" "$OUT/gen-bin/"

# Each process writes its counters when it exits (the training stops the
# proxies with SIGTERM, on which both exit normally).
step "training: the waypoint (scripts/pgo-train-waypoint.sh)"
bash "$ROOT/scripts/pgo-train-waypoint.sh" "$OUT/gen-bin/waypoint"
step "training: bench ztunnel (bulk, request/response, connection churn)"
target/release/bench ztunnel --ztunnel "$OUT/gen-bin/ztunnel" --duration-secs 4 --rounds 1 \
  --out-dir "$OUT/training"
merge_profiles "$PROFILES" "$OUT/merged.profdata"

step "optimised build of ztunnel and waypoint with the profile"
RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" CARGO_TARGET_DIR="$OUT/use-target" \
  cargo build --release -p ztunnel -p waypoint

cp "$OUT/use-target/release/ztunnel" "$OUT/use-target/release/waypoint" "$OUT/bin/"
for b in xds ztunnel-cni ztunnel-cni-install bench demo; do
  cp "target/release/$b" "$OUT/bin/"
done
step "done: $OUT/bin (PGO: ztunnel, waypoint; plain: xds, ztunnel-cni, ztunnel-cni-install, bench, demo)"
