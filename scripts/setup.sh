#!/usr/bin/env bash
# Idempotent machine set-up for this workspace (Debian 12, run as root).
#
# Installs only what is missing, one short line per step:
#   - Debian packages: iproute2 tcpdump iptables nftables curl procps make
#     ca-certificates, nginx (or nginx-light; installed, never started),
#     bpftool (skipped if the archive has none)
#   - rustup components: rustfmt + clippy (stable); nightly toolchain with rust-src
#   - bpf-linker, built against the nightly toolchain's own libLLVM
#   - cgroup2 at /sys/fs/cgroup/unified, bpffs at /sys/fs/bpf
#   - the Helm charts' test tools (charts/test.py): helm-python-sdk (Helm v4's
#     engine) and kubernetes-validate, in a virtualenv of their own
#
# Environment knobs:
#   SETUP_SKIP_EBPF=1        skip nightly / rust-src / bpf-linker / bpffs / cgroup2 steps
#   BPF_LINKER_VERSION=x.y.z bpf-linker version to build (default below)
#   CHARTS_VENV=DIR          virtualenv for the charts' test tools
#                            (default ~/.cache/ambient-mesh/charts-venv)
set -euo pipefail

BPF_LINKER_VERSION="${BPF_LINKER_VERSION:-0.13.0}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in
  *":$CARGO_BIN:"*) ;;
  *) export PATH="$CARGO_BIN:$PATH" ;;
esac

START=$SECONDS
step() { printf 'setup: %-28s %s\n' "$1" "$2"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi
as_root() {
  if [[ $(id -u) -ne 0 && -z "$SUDO" ]]; then
    die "need root for: $* (run as root)"
  fi
  $SUDO "$@"
}

# ---------------------------------------------------------------- apt packages
pkg_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}
pkg_candidate() { # prints the candidate version, or nothing if the archive has none
  local c
  c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && !v {v=$2} END {print v}' || true)
  [[ -n "$c" && "$c" != "(none)" ]] && printf '%s' "$c"
  return 0
}
apt_lists_present() {
  compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

# make: the waypoint's allocator (jemalloc) is built from C sources.
REQUIRED_PKGS=(iproute2 tcpdump iptables nftables curl procps ca-certificates python3 python3-venv openssl make)
missing=()
for p in "${REQUIRED_PKGS[@]}"; do
  pkg_installed "$p" || missing+=("$p")
done
nginx_missing=0
if ! pkg_installed nginx-light && ! pkg_installed nginx && ! pkg_installed nginx-core; then
  nginx_missing=1
fi
# bpftool is optional: only try it if the (possibly stale) lists know it, or
# if there are no lists at all yet; never apt-get update for it alone.
bpftool_wanted=0
if ! command -v bpftool >/dev/null 2>&1 && ! pkg_installed bpftool; then
  if [[ -n "$(pkg_candidate bpftool)" ]] || ! apt_lists_present; then
    bpftool_wanted=1
  fi
fi

if (( ${#missing[@]} == 0 && nginx_missing == 0 && bpftool_wanted == 0 )); then
  if command -v bpftool >/dev/null 2>&1 || pkg_installed bpftool; then
    step "apt packages" "ok (all present)"
  else
    step "apt packages" "ok (bpftool not in archive, skipped)"
  fi
else
  step "apt-get update" "running"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  install=()
  for p in "${missing[@]}"; do
    [[ -n "$(pkg_candidate "$p")" ]] || die "apt package '$p' has no install candidate"
    install+=("$p")
  done
  if (( nginx_missing )); then
    # On Debian 12 'nginx' is the server itself; 'nginx-light' is only a
    # metapackage (nginx + echo module). Older releases ship nginx-light proper.
    if [[ -n "$(pkg_candidate nginx)" ]]; then install+=(nginx)
    elif [[ -n "$(pkg_candidate nginx-light)" ]]; then install+=(nginx-light)
    else die "neither nginx-light nor nginx is installable"
    fi
  fi
  if (( bpftool_wanted )); then
    if [[ -n "$(pkg_candidate bpftool)" ]]; then install+=(bpftool)
    else step "bpftool" "not in archive, skipped"
    fi
  fi
  # Keep package maintainer scripts from starting services (nginx): use a
  # temporary policy-rc.d unless the machine already has one.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    made_policy=1
  fi
  step "apt-get install" "${install[*]}"
  rc=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${install[@]}" >/dev/null || rc=$?
  if (( made_policy )); then as_root rm -f "$policy"; fi
  (( rc == 0 )) || die "apt-get install failed (exit $rc)"
fi

# ---------------------------------------------------------------- rust (stable)
command -v rustup >/dev/null 2>&1 || die "rustup not found on PATH ($PATH)"
command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH ($PATH)"

components_missing() { # $1 = toolchain, rest = components; prints the missing ones
  local tc=$1; shift
  local have
  have=$(rustup component list --installed --toolchain "$tc" 2>/dev/null || true)
  local c
  for c in "$@"; do
    grep -q "^$c\(-\|\$\)" <<<"$have" || printf '%s ' "$c"
  done
}

miss=$(components_missing stable rustfmt clippy)
if [[ -z "$miss" ]]; then
  step "rustup stable components" "ok (rustfmt clippy)"
else
  step "rustup stable components" "adding $miss"
  # shellcheck disable=SC2086
  rustup component add --toolchain stable $miss
fi

if [[ "${SETUP_SKIP_EBPF:-0}" == 1 ]]; then
  step "eBPF tooling" "skipped (SETUP_SKIP_EBPF=1)"
else
  # ------------------------------------------------------------ rust (nightly)
  toolchains=$(rustup toolchain list 2>/dev/null || true)
  if grep -q '^nightly-' <<<"$toolchains"; then
    step "rustup nightly" "ok"
  else
    step "rustup nightly" "installing (profile minimal)"
    rustup toolchain install nightly --profile minimal
  fi
  if [[ -z "$(components_missing nightly rust-src)" ]]; then
    step "rustup nightly rust-src" "ok"
  else
    step "rustup nightly rust-src" "adding"
    rustup component add rust-src --toolchain nightly
  fi

  # ------------------------------------------------------------ bpf-linker
  if out=$(bpf-linker --version 2>/dev/null); then
    step "bpf-linker" "ok ($out)"
  else
    L="$(rustc +nightly --print sysroot)/lib"
    so=$(compgen -G "$L/libLLVM-*.so" | head -n1 || true)
    [[ -n "$so" ]] || die "no libLLVM-*.so in nightly sysroot $L"
    LLVM=$(basename "$so" .so | sed 's/^lib//')        # e.g. LLVM-22-rust-1.97.0-nightly
    LLVM_MAJOR=$(sed -n 's/^LLVM-\([0-9][0-9]*\)-.*/\1/p' <<<"$LLVM")
    [[ -n "$LLVM_MAJOR" ]] || die "cannot read LLVM major from $so"
    if [[ "$LLVM_MAJOR" != 22 ]]; then
      step "bpf-linker" "note: nightly LLVM is $LLVM_MAJOR, not 22; using feature llvm-$LLVM_MAJOR"
    fi
    step "bpf-linker" "building $BPF_LINKER_VERSION with llvm-$LLVM_MAJOR against $LLVM (takes minutes)"
    RUSTFLAGS="-L $L -l dylib=$LLVM -C link-arg=-Wl,-rpath,$L" \
      cargo install --force --locked bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-$LLVM_MAJOR,no-llvm-linking"
    out=$(bpf-linker --version) || die "bpf-linker built but does not run"
    step "bpf-linker" "installed ($out)"
  fi

  # ------------------------------------------------------------ mounts
  if [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null || true)" == cgroup2fs ]]; then
    step "cgroup2" "ok (/sys/fs/cgroup is cgroup2)"
  elif mountpoint -q /sys/fs/cgroup/unified 2>/dev/null; then
    step "cgroup2" "ok (/sys/fs/cgroup/unified mounted)"
  else
    step "cgroup2" "mounting at /sys/fs/cgroup/unified"
    [[ -d /sys/fs/cgroup/unified ]] || as_root mkdir -p /sys/fs/cgroup/unified
    as_root mount -t cgroup2 none /sys/fs/cgroup/unified
  fi
  if mountpoint -q /sys/fs/bpf 2>/dev/null; then
    step "bpffs" "ok (/sys/fs/bpf mounted)"
  else
    step "bpffs" "mounting at /sys/fs/bpf"
    [[ -d /sys/fs/bpf ]] || as_root mkdir -p /sys/fs/bpf
    as_root mount -t bpf bpf /sys/fs/bpf
  fi
fi

# ---------------------------------------------------------------- charts' test tools
# A virtualenv of their own: no change to the system's Python (Debian marks
# it externally managed), and the versions charts/test.py was written for.
CHARTS_VENV="${CHARTS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ambient-mesh/charts-venv}"
CHARTS_PY_PKGS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
if [[ -x "$CHARTS_VENV/bin/python" ]] &&
   "$CHARTS_VENV/bin/python" -c 'import helm_python.chart, kubernetes_validate' 2>/dev/null; then
  step "charts test tools" "ok ($CHARTS_VENV)"
else
  step "charts test tools" "installing ${CHARTS_PY_PKGS[*]} into $CHARTS_VENV"
  python3 -m venv "$CHARTS_VENV" || die "python3 -m venv $CHARTS_VENV failed"
  "$CHARTS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CHARTS_PY_PKGS[@]}" \
    || die "pip install ${CHARTS_PY_PKGS[*]} failed"
fi

step "done" "in $((SECONDS - START))s"
