# Sourced by the profile-guided build scripts (pgo-build.sh, pgo-waypoint.sh).

# Sets PROFDATA: llvm-profdata, of the LLVM that rustc itself uses
# (rustup's llvm-tools).
find_profdata() {
  rustup component add llvm-tools >/dev/null
  PROFDATA="$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f | head -n1)"
  if [[ ! -x "$PROFDATA" ]]; then
    echo "$0: ERROR: llvm-profdata not found after adding llvm-tools" >&2
    exit 1
  fi
}

# merge_profiles DIR OUT: merges the counters the trained processes wrote
# to DIR (each writes its own .profraw when it exits) into OUT.
merge_profiles() {
  local raw
  shopt -s nullglob
  raw=("$1"/*.profraw)
  shopt -u nullglob
  if [[ ${#raw[@]} -eq 0 ]]; then
    echo "$0: ERROR: the training wrote no profiles to $1" >&2
    exit 1
  fi
  "$PROFDATA" merge -o "$2" "${raw[@]}"
}
