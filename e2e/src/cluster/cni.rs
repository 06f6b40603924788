//! Enrolling pods the way a container runtime does: `ztunnel-cni` run as
//! a chained plugin after a ptp-like primary plugin, whose result is the
//! `prevResult` of the network configuration.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use super::App;

/// Runs `cni` with `command` (`ADD` or `DEL`) for pod `a`: the network
/// config on stdin, the pod in `CNI_ARGS`, its cgroup as the
/// `cgroupPath` capability. Returns the plugin's stdout. The plugin
/// decides from `labels_file` whether the pod is enrolled.
pub fn run(
    cni: &Path,
    command: &str,
    a: &App,
    socket: &Path,
    labels_file: &Path,
) -> Result<String> {
    let cgroup = a
        .pod
        .cgroup()
        .ok_or_else(|| anyhow!("pod {} has no cgroup", a.key()))?;
    let sandbox = format!("/run/netns/{}", a.pod.netns());
    let prev = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": sandbox}],
        "ips": [
            {"address": format!("{}/32", a.pod.ipv4()), "interface": 0},
            {"address": format!("{}/128", a.pod.ipv6()), "interface": 0}
        ]
    });
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ztunnel-cni",
        "ztunnelSocket": socket,
        "labelsFile": labels_file,
        "capabilities": {"cgroupPath": true},
        "runtimeConfig": {"cgroupPath": cgroup},
        "prevResult": prev,
    });
    let mut child = Command::new(cni)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", a.uid()))
        .env("CNI_NETNS", &sandbox)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}",
                a.namespace,
                a.name,
                a.uid(),
                a.uid()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cni.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(conf.to_string().as_bytes())
            .context("writing the CNI config")?;
    }
    let out = child
        .wait_with_output()
        .context("waiting for ztunnel-cni")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "ztunnel-cni {command} {}: {} {}{}",
            a.key(),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}
