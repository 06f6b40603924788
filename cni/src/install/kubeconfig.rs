//! The plugin's kubeconfig: the installer's own service-account identity
//! (token and cluster CA, as projected into its pod) and the API server's
//! in-cluster address, written where the plugin, which runs on the host,
//! can read it.
//!
//! The token is inlined, not referenced by path: the projected token lives
//! under a path of the installer's pod (a kubelet directory named by the
//! pod's UID), which changes with every pod. Kubernetes rotates the
//! projected token (hourly by default), so the installer re-renders the
//! kubeconfig every tick and rewrites it when anything changed.

use std::path::Path;

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::json;

/// `file` of the service-account dir `dir`, which must not be empty.
fn read(dir: &Path, file: &str) -> anyhow::Result<String> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading service-account {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("service-account {} is empty", path.display());
    }
    Ok(text)
}

/// `https://host:port` for `KUBERNETES_SERVICE_HOST`/`_PORT` (an IPv6
/// address in brackets).
pub fn server_url(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// The kubeconfig for `server` with the current token and CA of the
/// service-account dir `sa_dir`. JSON, which is YAML, so any kubeconfig
/// reader takes it.
pub fn render(server: &str, sa_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let token = read(sa_dir, "token")?;
    let ca = read(sa_dir, "ca.crt")?;
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
        }}],
        "users": [{"name": "ztunnel-cni", "user": {"token": token.trim()}}],
        "contexts": [{"name": "ztunnel-cni", "context": {"cluster": "local", "user": "ztunnel-cni"}}],
        "current-context": "ztunnel-cni",
    });
    let mut out = serde_json::to_vec_pretty(&doc)?;
    out.push(b'\n');
    Ok(out)
}

/// Whether `path` holds exactly `data` (a missing file does not).
pub fn unchanged(path: &Path, data: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|cur| cur == data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(server_url("10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(server_url("fd00::1", "6443"), "https://[fd00::1]:6443");
        assert_eq!(server_url("[fd00::1]", "443"), "https://[fd00::1]:443");
        assert_eq!(server_url("api.example", "443"), "https://api.example:443");
    }
}
