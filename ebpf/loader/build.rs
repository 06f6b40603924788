//! Builds the eBPF programs (`../programs`) for `bpfel-unknown-none` with the
//! nightly toolchain and `-Z build-std=core`, and leaves the object at
//! `$OUT_DIR/capture` for `include_bytes!`.
//!
//! `aya-build` does the same but runs `cargo build --package <name>` inside
//! *this* workspace, and the programs crate is deliberately not a member (it
//! only builds for the BPF target, with nightly and build-std), so this is
//! the same recipe pointed at the programs' own manifest.
//!
//! The nested build's target directory is shared by every build of this
//! crate in one profile (see [`shared_target_dir`]): `cargo clippy` and
//! `cargo build` with other features each run this script in an `OUT_DIR`
//! of their own, and each nightly build of `core` took 300 MB and a minute.
//!
//! Needs what `scripts/setup.sh` installs: rustup's `nightly` with `rust-src`
//! and `bpf-linker` on `PATH`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let programs = manifest_dir.join("../programs");
    let common = manifest_dir.join("../common");
    for dir in [&programs, &common] {
        for sub in ["src", "Cargo.toml"] {
            println!("cargo:rerun-if-changed={}", dir.join(sub).display());
        }
    }
    let target_dir = shared_target_dir(&out_dir);
    // The programs read kernel structs laid out for the host's arch.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(programs.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer (stable) build's settings must not leak into the
        // nightly one: its compiler, wrappers, flags and jobserver-free
        // target dir.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2"),
        );
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "running {cmd:?}: {e} (scripts/setup.sh installs the nightly toolchain and bpf-linker)"
        )
    });
    if !status.success() {
        panic!("building the eBPF programs failed ({status}); see the output above. scripts/setup.sh installs nightly, rust-src and bpf-linker");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/capture");
    std::fs::copy(&obj, out_dir.join("capture"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
}

/// `<target>/<profile>/ebpf-programs` when `out_dir` is cargo's usual
/// `<target>/<profile>/build/<crate>-<hash>/out`, else `<out_dir>/ebpf-target`.
/// Cargo's lock on the nested target directory serialises two builds that
/// share it.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    let crate_dir = out_dir.parent();
    let build_dir = crate_dir.and_then(Path::parent);
    let usual = out_dir.ends_with("out")
        && crate_dir
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ztunnel-ebpf-"))
        && build_dir.is_some_and(|b| b.ends_with("build"));
    match build_dir.and_then(Path::parent) {
        Some(profile_dir) if usual => profile_dir.join("ebpf-programs"),
        _ => out_dir.join("ebpf-target"),
    }
}
