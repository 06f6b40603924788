//! Where the mesh's binaries are: next to the running executable (the
//! demo in `target/<profile>/`), or one level up when that is cargo's
//! `deps/` (integration tests), unless an environment variable names one.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Paths of the binaries a [`Cluster`](super::Cluster) runs.
#[derive(Clone, Debug)]
pub struct Bins {
    pub ztunnel: PathBuf,
    pub xds: PathBuf,
    pub cni: PathBuf,
    /// Only waypoints need it: a cluster without waypoints starts without.
    pub waypoint: Result<PathBuf, String>,
    /// The gRPC sample's client (`sample-grpc call`), run inside pods.
    pub sample_grpc: Result<PathBuf, String>,
}

const BUILD_HINT: &str = "cargo build -p ztunnel -p xds -p ztunnel-cni -p waypoint -p e2e --bin ztunnel --bin xds --bin ztunnel-cni --bin waypoint --bin sample-grpc";

impl Bins {
    pub fn locate() -> Result<Bins> {
        let exe = std::env::current_exe().context("locating the running executable")?;
        let mut dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent dir", exe.display()))?
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(up) = dir.parent() {
                dir = up.to_path_buf();
            }
        }
        let find = |name: &str, env: &str| find_in(&dir, name, env);
        Ok(Bins {
            ztunnel: find("ztunnel", "ZTUNNEL_BIN")?,
            xds: find("xds", "XDS_BIN")?,
            cni: find("ztunnel-cni", "ZTUNNEL_CNI_BIN")?,
            waypoint: find("waypoint", "WAYPOINT_BIN").map_err(|e| format!("{e:#}")),
            sample_grpc: find("sample-grpc", "SAMPLE_GRPC_BIN").map_err(|e| format!("{e:#}")),
        })
    }
}

fn find_in(dir: &Path, name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "no {name} binary at {} (build with `{BUILD_HINT}`, adding --release for release builds, or set {env})",
            p.display()
        );
    }
    Ok(p)
}
