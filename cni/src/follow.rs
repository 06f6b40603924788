//! Running pods follow their labels: the node agent half of the installer.
//!
//! The plugin decides at `ADD`, when a pod starts. A pod already running
//! when its namespace (or the pod itself) gets `istio.io/dataplane-mode=ambient`
//! would otherwise wait for a restart to join, and one whose label goes
//! would stay captured. As Istio's CNI node agent does, this watches the
//! Pods of this node (field selector `spec.nodeName`) and all Namespaces
//! (kube-rs reflectors) and, level-triggered, on every change and every
//! tick, brings each running pod to what its labels say ([`decide`]).
//! `ztunnel-cni-install` runs it ([`run`]) when given `--node-name`.
//!
//! - **enroll** a pod in the mesh that is not annotated
//!   `ambient.istio.io/redirection: enabled`: find its oldest process
//!   through the host's `/proc` (`procfs.rs`), hand ztunnel its netns (an
//!   fd) and its pod-level cgroup (`cgroup.rs`) over ZDS as the plugin
//!   does, then annotate it;
//! - **remove** an annotated pod that is no longer in the mesh: `del` it
//!   from ztunnel, then take the annotation off. Istio's order: the record
//!   is let go only once the capture is really gone, so a failed `del` is
//!   retried (the pod still says `enabled`) rather than forgotten; peers
//!   that still send HBONE in between fail until the annotation goes.
//!
//! A pod this agent enrolled that then goes away (deleted, or finished) is
//! `del`eted from ztunnel too. Its CNI `DEL` normally does that, but the
//! runtime may have sent it while the agent was still enrolling the pod
//! (the pod deleted between the agent's read and ztunnel's add); without
//! this second `del` ztunnel would keep serving a pod that is gone. A
//! `del` of a pod ztunnel no longer has is a no-op.
//!
//! The annotation is the record of what is in place, so a restarted agent
//! picks up where it was. Pods the plugin would never enroll are left
//! alone: kube-system, host-network pods, pods with a sidecar, ztunnel, and
//! pods not `Running` (a pending pod gets its `ADD`; a finished one has
//! nothing to capture). A failure (no process yet, ztunnel away, a refused
//! patch) is logged once per pod and message, and retried on the next
//! change or tick.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{api, cgroup, pods, procfs, within};
use anyhow::{anyhow, Context};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use ztunnel::inpod::zds::{self, workload_request::Payload};

/// What to do about one pod.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Action {
    Enroll,
    Remove,
    Nothing,
}

/// What pod `pod` in namespace `ns` needs: its labels against its record
/// (the annotation). Level-triggered, so a missed event or a restart only
/// delays it.
pub fn decide(pod: &Pod, ns: &Namespace) -> Action {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Running");
    if pods::EXCLUDED_NAMESPACES.contains(&namespace)
        || !running
        || pod.metadata.deletion_timestamp.is_some()
    {
        return Action::Nothing;
    }
    match (api::facts_of(pod, ns).in_mesh(), api::is_captured(pod)) {
        (true, false) => Action::Enroll,
        (false, true) => Action::Remove,
        _ => Action::Nothing,
    }
}

/// Where the agent finds the host's things, and how it reaches ztunnel.
pub struct Options {
    /// This node (`spec.nodeName` of its pods).
    pub node: String,
    /// The host's `/proc`, as mounted here.
    pub proc_dir: PathBuf,
    /// The host's cgroup2 mount, as mounted here.
    pub cgroup_dir: PathBuf,
    /// `cgroup_dir` as the host (and ztunnel) sees it.
    pub host_cgroup_dir: PathBuf,
    /// ztunnel's enrollment socket.
    pub socket: PathBuf,
    /// How often to retry what failed without a change to wake it.
    pub interval: Duration,
}

/// Watches until the process ends; errors only if it cannot start.
pub async fn run(client: Client, opts: Options) -> anyhow::Result<()> {
    let host_netns = procfs::own_netns()?;
    let (kick_tx, mut kick) = mpsc::channel(1);
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node)),
        "pods",
        kick_tx.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        "namespaces",
        kick_tx,
    );
    // Acting before both are listed would read a missing namespace as
    // one without labels, and remove pods enrolled at ADD.
    pods.wait_until_ready().await.context("listing pods")?;
    namespaces
        .wait_until_ready()
        .await
        .context("listing namespaces")?;
    info!(node = %opts.node, "following the ambient labels of this node's running pods");
    let mut tick = tokio::time::interval(opts.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut agent = Agent::new(client, opts, host_netns);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            k = kick.recv() => if k.is_none() { return Err(anyhow!("the watches ended")) },
        }
        agent
            .reconcile(&pods.state(), |name| {
                namespaces.get(&reflector::ObjectRef::new(name))
            })
            .await;
    }
}

/// A reflector into a store, kicking `kick` on every change.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    kick: mpsc::Sender<()>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, config))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    let _ = kick.try_send(());
                }
                Err(e) => warn!("watching {what}: {e} (retrying)"),
            }
        }
    });
    store
}

/// Brings pods to what their labels say; remembers what it did.
pub struct Agent {
    client: Client,
    opts: Options,
    host_netns: u64,
    /// The pods acted on, by uid: the resourceVersion they had then. Until
    /// the pod changes (our patch lands) the same action is not redone.
    done: HashMap<String, String>,
    /// The last failure logged per pod uid.
    reported: HashMap<String, String>,
    /// The pods this agent handed to ztunnel and has not removed: `del`ed
    /// once they are gone (see the module docs).
    enrolled: HashSet<String>,
}

impl Agent {
    /// `host_netns`: the inode of the host's network namespace
    /// ([`procfs::own_netns`] on the host network).
    pub fn new(client: Client, opts: Options, host_netns: u64) -> Agent {
        Agent {
            client,
            opts,
            host_netns,
            done: HashMap::new(),
            reported: HashMap::new(),
            enrolled: HashSet::new(),
        }
    }

    /// One pass over this node's pods (`all`); `namespace` looks one up by
    /// name (`None`: not listed yet, the pod waits).
    pub async fn reconcile(
        &mut self,
        all: &[Arc<Pod>],
        namespace: impl Fn(&str) -> Option<Arc<Namespace>>,
    ) {
        self.release_finished(all).await;
        // Forget pods that are gone.
        self.done
            .retain(|uid, _| all.iter().any(|p| p.metadata.uid.as_ref() == Some(uid)));
        self.reported
            .retain(|uid, _| all.iter().any(|p| p.metadata.uid.as_ref() == Some(uid)));
        for pod in all.iter().cloned() {
            let (Some(uid), Some(ns_name), Some(name)) = (
                pod.metadata.uid.clone(),
                pod.metadata.namespace.clone(),
                pod.metadata.name.clone(),
            ) else {
                continue;
            };
            let Some(ns) = namespace(&ns_name) else {
                continue; // not listed yet: wait for it
            };
            let action = decide(&pod, &ns);
            let version = pod.metadata.resource_version.clone().unwrap_or_default();
            if action == Action::Nothing || self.done.get(&uid) == Some(&version) {
                continue;
            }
            let key = format!("{ns_name}/{name}");
            let result = match action {
                Action::Enroll => self.enroll(&pod, &ns, &uid).await,
                Action::Remove => self.remove(&ns_name, &name, &uid).await,
                Action::Nothing => continue,
            };
            match result {
                Ok(()) => {
                    info!(pod = %key, ?action, "followed the pod's ambient label");
                    self.done.insert(uid.clone(), version);
                    self.reported.remove(&uid);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.reported.get(&uid) != Some(&msg) {
                        error!(pod = %key, ?action, "{msg} (retrying)");
                        self.reported.insert(uid, msg);
                    }
                }
            }
        }
    }

    /// `del`s the pods this agent enrolled that are gone from `all` or
    /// finished; one that fails stays, to be retried on the next pass.
    async fn release_finished(&mut self, all: &[Arc<Pod>]) {
        let finished = |uid: &String| {
            let pod = all.iter().find(|p| p.metadata.uid.as_ref() == Some(uid));
            let phase = pod.and_then(|p| p.status.as_ref()?.phase.as_deref());
            pod.is_none() || matches!(phase, Some("Succeeded" | "Failed"))
        };
        let gone: Vec<String> = self
            .enrolled
            .iter()
            .filter(|u| finished(u))
            .cloned()
            .collect();
        for uid in gone {
            match self.del(&uid).await {
                Ok(()) => {
                    info!(
                        uid,
                        "pod enrolled by the agent is gone: removed from ztunnel"
                    );
                    self.enrolled.remove(&uid);
                }
                Err(e) => warn!(uid, "{e:#} (retrying)"),
            }
        }
    }

    async fn enroll(&mut self, pod: &Pod, ns: &Namespace, uid: &str) -> anyhow::Result<()> {
        let proc = &self.opts.proc_dir;
        let process = procfs::find_pod(proc, uid, self.host_netns)?
            .ok_or_else(|| anyhow!("no process of the pod under {} yet", proc.display()))?;
        let dir = cgroup::pod_dir_of_process(&process.cgroup, uid, &self.opts.cgroup_dir)?;
        let rel = dir.strip_prefix(&self.opts.cgroup_dir).unwrap_or(&dir);
        let host_cgroup = self.opts.host_cgroup_dir.join(rel);
        let netns_file = process.netns(proc);
        let netns = std::fs::File::open(&netns_file)
            .with_context(|| format!("opening {}", netns_file.display()))?;
        let facts = api::facts_of(pod, ns);
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        within("ztunnel", async {
            let c = zds::Client::connect(&self.opts.socket).await?;
            c.request(
                Payload::Add(zds::AddWorkload {
                    uid: uid.to_string(),
                    workload_info: Some(zds::WorkloadInfo {
                        name: name.clone(),
                        namespace: namespace.clone(),
                        service_account: facts.service_account,
                    }),
                    // The host's path (ztunnel reopens it after a restart).
                    netns_path: Path::new("/proc")
                        .join(process.pid.to_string())
                        .join("ns/net")
                        .display()
                        .to_string(),
                    cgroup_path: host_cgroup.display().to_string(),
                }),
                Some(netns.as_fd()),
            )
            .await
        })
        .await
        .context("enrolling the pod with ztunnel")?;
        self.enrolled.insert(uid.to_string());
        within(
            "the API server",
            api::mark_captured(&self.client, &namespace, &name),
        )
        .await
    }

    async fn remove(&mut self, namespace: &str, name: &str, uid: &str) -> anyhow::Result<()> {
        self.del(uid).await?;
        self.enrolled.remove(uid);
        within(
            "the API server",
            api::unmark_captured(&self.client, namespace, name),
        )
        .await
    }

    async fn del(&self, uid: &str) -> anyhow::Result<()> {
        within("ztunnel", async {
            let c = zds::Client::connect(&self.opts.socket).await?;
            c.request(
                Payload::Del(zds::DelWorkload {
                    uid: uid.to_string(),
                }),
                None,
            )
            .await
        })
        .await
        .with_context(|| format!("removing pod {uid} from ztunnel"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(
        ns: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
        phase: &str,
    ) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "app", "namespace": ns, "uid": "u1",
                         "labels": labels, "annotations": annotations},
            "spec": {"containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn namespace(labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": "n", "labels": labels}})).unwrap()
    }

    const AMBIENT: &str = "istio.io/dataplane-mode";
    const CAPTURED: &str = "ambient.istio.io/redirection";

    #[test]
    fn labels_against_the_record() {
        let amb = json!({AMBIENT: "ambient"});
        let none = json!({});
        let on = json!({CAPTURED: "enabled"});
        let cases = [
            // (namespace labels, pod labels, pod annotations) -> action
            (&amb, &none, &none, Action::Enroll, "namespace labelled"),
            (&none, &amb, &none, Action::Enroll, "pod labelled"),
            (&amb, &none, &on, Action::Nothing, "already enrolled"),
            (&none, &none, &on, Action::Remove, "namespace label removed"),
            (
                &amb,
                &json!({AMBIENT: "none"}),
                &on,
                Action::Remove,
                "pod opted out",
            ),
            (&none, &none, &none, Action::Nothing, "never in the mesh"),
            (
                &amb,
                &json!({"app": "ztunnel"}),
                &none,
                Action::Nothing,
                "ztunnel",
            ),
            (
                &amb,
                &none,
                &json!({"sidecar.istio.io/status": "{}"}),
                Action::Nothing,
                "sidecar",
            ),
            (
                &none,
                &none,
                &json!({CAPTURED: "disabled"}),
                Action::Nothing,
                "not our record",
            ),
        ];
        for (ns, labels, ann, want, why) in cases {
            let p = pod("shop", labels.clone(), ann.clone(), "Running");
            assert_eq!(decide(&p, &namespace(ns.clone())), want, "{why}");
        }
    }

    #[test]
    fn only_running_pods_outside_kube_system() {
        let amb = namespace(json!({AMBIENT: "ambient"}));
        for phase in ["Pending", "Succeeded", "Failed", "Unknown"] {
            let p = pod("shop", json!({}), json!({}), phase);
            assert_eq!(decide(&p, &amb), Action::Nothing, "{phase}");
        }
        let p = pod("kube-system", json!({}), json!({}), "Running");
        assert_eq!(decide(&p, &amb), Action::Nothing, "kube-system");
        let mut p = pod("shop", json!({}), json!({}), "Running");
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(decide(&p, &amb), Action::Nothing, "host network");
        let mut p = pod("shop", json!({}), json!({}), "Running");
        p.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
        assert_eq!(decide(&p, &amb), Action::Nothing, "being deleted");
    }
}
