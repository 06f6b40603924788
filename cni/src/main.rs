//! `ztunnel-cni`: a chained CNI plugin that enrolls ambient pods with the
//! node's ztunnel.
//!
//! It runs after the cluster's primary CNI, exactly as the CNI spec has a
//! runtime call a plugin: `CNI_COMMAND` (`ADD`, `DEL`, `CHECK`, `VERSION`),
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` in the
//! environment, the network config on stdin, the result on stdout. It
//! changes nothing in the pod's network: `ADD` prints the previous plugin's
//! `prevResult` unchanged.
//!
//! On `ADD` for a pod in the mesh it hands the pod's netns (an open fd) to
//! ztunnel over ztunnel's enrollment socket (see `ztunnel::inpod::zds`);
//! `DEL` removes it (and succeeds when there is nothing to remove or ztunnel
//! is away: a restarted ztunnel drops pods whose netns is gone).
//!
//! # Which pods
//!
//! A pod is in the mesh when the pod carries `istio.io/dataplane-mode=ambient`,
//! or its namespace does and the pod does not say `none` (Istio's rule, with
//! Istio's exclusions: see `pods.rs`). The pod is named by `CNI_ARGS` as
//! containerd and CRI-O pass it (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
//! `K8S_POD_UID`), and its cgroup by the `cgroupPath` capability
//! (`runtimeConfig.cgroupPath`): the pod-level cgroup the kubelet chose, a
//! path from the cgroup2 mount's root or (CRI-O with systemd) a slice name,
//! resolved to its directory by `cgroup.rs`.
//!
//! Labels come from the API server when the config names a `kubeconfig`
//! (on a cluster: `ztunnel-cni-install` writes it and chains the plugin in;
//! see `install/main.rs`). When the API server cannot be reached or answers
//! an error, `ADD` fails with a CNI error naming what failed, and the runtime
//! retries the pod. Once ztunnel has the pod, the plugin annotates it
//! `ambient.istio.io/redirection: enabled` (Istio's record that the pod's
//! capture is in place; the control plane waits for it before sending
//! other ztunnels to the pod over HBONE); a failed patch fails the `ADD` too. The test bed has no API server: there, labels come from
//! a JSON file named by `labelsFile`:
//!
//! ```json
//! {"namespaces": {"default": {"istio.io/dataplane-mode": "ambient"}},
//!  "pods": {"default/echo": {"istio.io/dataplane-mode": "none"}}}
//! ```
//!
//! With neither, no pod is in the mesh.
//!
//! # Config
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ztunnel-cni",
//!  "ztunnelSocket": "/var/run/ztunnel/ztunnel.sock",
//!  "kubeconfig": "/etc/cni/net.d/ztunnel-cni-kubeconfig",
//!  "capabilities": {"cgroupPath": true},
//!  "runtimeConfig": {"cgroupPath": "kubepods-besteffort-pod1234_56.slice"},
//!  "prevResult": {...}}
//! ```

use ztunnel_cni::{api, cgroup, pods, within};

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use serde::Deserialize;
use serde_json::{json, Value};
use ztunnel::inpod::zds::{self, workload_request::Payload};

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    ztunnel_socket: Option<PathBuf>,
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    labels_file: Option<PathBuf>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    #[serde(default)]
    prev_result: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    /// The pod's cgroup in the runtime's words (see `cgroup.rs`).
    #[serde(default)]
    cgroup_path: Option<String>,
}

/// A CNI error: printed as the spec's error object, exit status 1.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

fn err(code: u32, msg: &str, e: impl std::fmt::Display) -> CniError {
    CniError {
        code,
        msg: msg.to_string(),
        details: e.to_string(),
    }
}

fn main() {
    let version = std::cell::RefCell::new(String::from("1.0.0"));
    match run(&version) {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            let out = json!({
                "cniVersion": *version.borrow(),
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            });
            println!("{out}");
            std::process::exit(1);
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
fn cni_args() -> BTreeMap<String, String> {
    env("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run(version: &std::cell::RefCell<String>) -> Result<Option<String>, CniError> {
    // 4 = invalid environment variables, 6 = failed to decode content,
    // 11 = try again later (per the CNI spec's well-known codes).
    let command = env("CNI_COMMAND").ok_or_else(|| err(4, "CNI_COMMAND is not set", ""))?;
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string(),
        ));
    }
    let mut stdin = String::new();
    std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| err(6, "reading the network config from stdin", e))?;
    let raw: Value =
        serde_json::from_str(&stdin).map_err(|e| err(6, "network config is not JSON", e))?;
    let conf: NetConf = serde_json::from_value(raw.clone())
        .map_err(|e| err(6, "network config has a field of the wrong type", e))?;
    if !conf.cni_version.is_empty() {
        *version.borrow_mut() = conf.cni_version.clone();
    }
    let args = cni_args();
    let socket = conf
        .ztunnel_socket
        .clone()
        .unwrap_or_else(|| DEFAULT_SOCKET.into());
    match command.as_str() {
        "ADD" => {
            let prev = conf.prev_result.clone().ok_or_else(|| {
                err(
                    4,
                    "no prevResult: ztunnel-cni is chained after the primary CNI plugin",
                    "",
                )
            })?;
            runtime()?.block_on(add(&conf, &args, &socket))?;
            Ok(Some(prev.to_string()))
        }
        "DEL" => {
            if let Some(uid) = args.get("K8S_POD_UID") {
                let del = runtime()?.block_on(within("ztunnel", async {
                    let c = zds::Client::connect(&socket).await?;
                    c.request(Payload::Del(zds::DelWorkload { uid: uid.clone() }), None)
                        .await
                }));
                if let Err(e) = del {
                    eprintln!("ztunnel-cni: DEL of pod {uid}: {e:#} (ignored)");
                }
            }
            Ok(None)
        }
        "CHECK" => {
            runtime()?.block_on(async {
                if pod_in_mesh(&conf, &args).await?.is_some() {
                    within("ztunnel", zds::Client::connect(&socket))
                        .await
                        .map_err(|e| err(11, "ztunnel is not reachable", format!("{e:#}")))?;
                }
                Ok::<_, CniError>(())
            })?;
            Ok(None)
        }
        other => Err(err(4, "unknown CNI_COMMAND", other)),
    }
}

struct PodRef {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    /// The API server that said so (on a cluster).
    api: Option<kube::Client>,
}

/// ADD: enroll the pod if it is in the mesh, then, on a cluster, say so on
/// the pod.
async fn add(
    conf: &NetConf,
    args: &BTreeMap<String, String>,
    socket: &Path,
) -> Result<(), CniError> {
    let Some(pod) = pod_in_mesh(conf, args).await? else {
        return Ok(());
    };
    // 7 = invalid network config: the runtime's value names no cgroup.
    let value = conf.runtime_config.cgroup_path.as_deref().ok_or_else(|| {
        err(
            7,
            "runtimeConfig.cgroupPath is not set",
            "the runtime passes it with the cgroupPath capability (containerd and CRI-O do)",
        )
    })?;
    let cgroup = cgroup::resolve(value, &cgroup::mount())
        .map_err(|e| err(7, "finding the pod's cgroup", format!("{e:#}")))?;
    within("ztunnel", enroll(socket, &pod, &cgroup))
        .await
        .map_err(|e| err(11, "enrolling the pod with ztunnel", format!("{e:#}")))?;
    if let Some(client) = &pod.api {
        within(
            "the API server",
            api::mark_captured(client, &pod.namespace, &pod.name),
        )
        .await
        .map_err(|e| {
            err(
                11,
                "recording the pod's capture on the API server",
                format!("{e:#}"),
            )
        })?;
    }
    Ok(())
}

async fn pod_in_mesh(
    conf: &NetConf,
    args: &BTreeMap<String, String>,
) -> Result<Option<PodRef>, CniError> {
    let (Some(ns), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) else {
        return Ok(None); // not a Kubernetes pod
    };
    // Before anything that could fail: these pods never wait for us.
    if pods::EXCLUDED_NAMESPACES.contains(&ns.as_str()) {
        return Ok(None);
    }
    let (facts, client) = if let Some(kubeconfig) = &conf.kubeconfig {
        within("the API server", async {
            let client = api::client(kubeconfig).await?;
            Ok((api::facts(&client, ns, name).await?, Some(client)))
        })
        .await
        .map_err(|e| {
            err(
                11,
                &format!("reading pod {ns}/{name} from the API server"),
                format!("{e:#}"),
            )
        })?
    } else if let Some(path) = &conf.labels_file {
        let facts = pods::from_file(path, ns, name)
            .map_err(|e| err(4, "reading labelsFile", format!("{e:#}")))?;
        (facts, None)
    } else {
        (pods::Facts::default(), None)
    };
    if !facts.in_mesh() {
        return Ok(None);
    }
    let uid = args
        .get("K8S_POD_UID")
        .cloned()
        .ok_or_else(|| err(4, "CNI_ARGS has no K8S_POD_UID for an ambient pod", ""))?;
    Ok(Some(PodRef {
        namespace: ns.clone(),
        name: name.clone(),
        uid,
        service_account: facts.service_account,
        api: client,
    }))
}

/// Hands the pod (its netns as an fd, its pod-level cgroup) to ztunnel.
async fn enroll(socket: &Path, pod: &PodRef, cgroup: &Path) -> anyhow::Result<()> {
    let netns_path = env("CNI_NETNS").ok_or_else(|| anyhow!("CNI_NETNS is not set"))?;
    let netns = std::fs::File::open(&netns_path)
        .with_context(|| format!("opening CNI_NETNS {netns_path}"))?;
    let c = zds::Client::connect(socket).await?;
    c.request(
        Payload::Add(zds::AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(zds::WorkloadInfo {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            }),
            netns_path: netns_path.clone(),
            cgroup_path: cgroup.display().to_string(),
        }),
        Some(netns.as_fd()),
    )
    .await
}

/// A small current-thread runtime: the plugin lives for one call.
fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(11, "starting a tokio runtime", e))
}
