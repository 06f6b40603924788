//! A mesh on the test bed, run the way a real cluster runs it: the `xds`
//! control plane on a directory of Kubernetes manifests (Namespaces, Pods,
//! Services, Gateways, HTTPRoutes, AuthorizationPolicies) that this module
//! writes, one ztunnel per node fed by xDS with workload certificates from
//! the control plane's CA, pods that are network namespaces in their own
//! cgroups, enrolled by invoking the `ztunnel-cni` plugin exactly as a
//! container runtime would (their TCP captured by eBPF inside each pod, no
//! iptables), and waypoints: replicas of the real `waypoint` binary
//! configured over xDS by the same control plane.
//!
//! Nodes are `node-1` .. `node-N`, plus `control` where the control plane
//! runs (no pods). Every name comes from the test bed's unique prefix: the
//! pins ztunnel makes live under the test bed's bpffs dir
//! ([`Testbed::bpf_dir`]), so cleanup on success, failure (unwinding) and,
//! for a process that died, at the next start, is the test bed's.
//!
//! Manifests are plain files: [`Cluster::apply`] writes one (atomically),
//! [`Cluster::delete`] removes it; the control plane picks changes up
//! within its poll interval. What "applied" means depends on who consumes
//! the change, so the waits are explicit: [`Cluster::wait_ztunnels`] (every
//! ztunnel's `/config_dump`), [`WaypointReplica::wait_config`] (the
//! waypoint's configuration in force), or the traffic itself.

mod app;
mod bins;
mod client;
mod cni;
mod observe;
mod waypoint;
pub mod yaml;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

pub use app::{labels, App, TRUST_DOMAIN};
pub use bins::Bins;
pub use client::{parse_curl, Reply, SERVED_BY};
pub use observe::{counter, metric_line, wait_for, AccessLine};
pub use waypoint::WaypointReplica;

use crate::mesh::http_get;
use crate::process::lock;
use crate::{ChildGuard, Node, Testbed};

/// ztunnel's and the waypoint's admin (`/config_dump`), metrics and
/// readiness ports, on localhost / any address in their namespace.
pub const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
pub const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
pub const READY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
/// The control plane's Prometheus and `/debug/errors` port (in its netns).
pub const XDS_DEBUG: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15014);
/// The namespace label that puts a namespace's pods in the mesh.
pub const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";
/// The namespace (or Service) label naming the waypoint to use.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The label a waypoint's pods carry.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// How big a cluster to build.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of nodes with a ztunnel (`node-1` .. `node-N`).
    pub nodes: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { nodes: 2 }
    }
}

/// A node's in-pod mode paths.
pub struct NodeDirs {
    pub socket: PathBuf,
    pub bpf: PathBuf,
    pub state: PathBuf,
}

#[derive(Default)]
struct State {
    /// Pods enrolled through CNI ADD, for CNI DEL at shutdown.
    enrolled: Vec<App>,
    /// Namespace labels, as the CNI plugin reads them.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    next_vip: u8,
}

/// The cluster; see the module docs. Dropping it shuts the mesh down (CNI
/// DEL of every enrolled pod, ztunnels, control plane), then the test bed
/// removes the rest.
pub struct Cluster {
    nodes: Vec<Node>,
    cp: Node,
    manifests: PathBuf,
    labels_file: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    bins: Bins,
    xds: Option<ChildGuard>,
    ztunnels: Vec<(Node, ChildGuard)>,
    state: Mutex<State>,
    /// Last field: dropped after everything above stopped.
    pub tb: Testbed,
}

impl Cluster {
    /// Builds the nodes, starts the control plane on an empty manifest
    /// directory and one ztunnel per node, and waits until each ztunnel is
    /// ready (first xDS sync). Prints one line per stage to `progress`.
    pub fn start(opts: ClusterOptions, progress: &dyn Fn(&str)) -> Result<Cluster> {
        if opts.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        let bins = Bins::locate()?;
        let tb = Testbed::new().context("creating the network-namespace test bed")?;
        let mut nodes = Vec::new();
        for i in 1..=opts.nodes {
            nodes.push(tb.add_node(&format!("node-{i}"))?);
        }
        let cp = tb.add_node("control")?;
        progress(&format!(
            "nodes {} and control ({}) on one bridge (prefix {})",
            nodes
                .iter()
                .map(|n| format!("{} ({})", n.name(), n.ipv4()))
                .collect::<Vec<_>>()
                .join(", "),
            cp.ipv4(),
            tb.prefix()
        ));
        let manifests = tb.dir().join("manifests");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let mut c = Cluster {
            nodes,
            cp,
            manifests,
            labels_file: tb.dir().join("cni-labels.json"),
            ca_cert: tb.dir().join("ca.crt"),
            ca_key: tb.dir().join("ca.key"),
            bins,
            xds: None,
            ztunnels: Vec::new(),
            state: Mutex::new(State::default()),
            tb,
        };
        c.write_labels()?;
        let t0 = Instant::now();
        c.start_xds()?;
        progress(&format!(
            "control plane (xds) serving on {}:15012 in {} ms, watching {}; it generated the mesh root CA {}",
            c.cp.ipv4(),
            t0.elapsed().as_millis(),
            c.manifests.display(),
            c.ca_cert.display()
        ));
        for node in c.nodes.clone() {
            let t0 = Instant::now();
            let z = c.start_ztunnel(&node)?;
            progress(&format!(
                "ztunnel on {} synced from xDS and ready in {} ms (pid {})",
                node.name(),
                t0.elapsed().as_millis(),
                z.pid()
            ));
            c.ztunnels.push((node, z));
        }
        Ok(c)
    }

    // ---- topology ----

    /// The nodes with a ztunnel, `node-1` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i` (0-based: `node(0)` is `node-1`). Panics if the cluster
    /// has fewer nodes.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// The control plane's node.
    pub fn control(&self) -> &Node {
        &self.cp
    }

    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// The directory the control plane watches.
    pub fn manifests(&self) -> &Path {
        &self.manifests
    }

    /// The mesh root certificate (and key) the control plane generated.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }
    pub fn ca_key(&self) -> &Path {
        &self.ca_key
    }

    /// The file the CNI plugin reads namespace and pod labels from, in
    /// place of the API server.
    pub fn labels_file(&self) -> &Path {
        &self.labels_file
    }

    pub fn dirs(&self, node: &Node) -> NodeDirs {
        let base = self.tb.dir().join(format!("inpod-{}", node.name()));
        NodeDirs {
            socket: base.join("ztunnel.sock"),
            bpf: self.tb.bpf_dir(&format!("ztunnel-{}", node.name())),
            state: base.join("pods"),
        }
    }

    fn node_named(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| anyhow!("no node {name} with a ztunnel"))
    }

    /// A fresh service VIP, `10.96.1.N`.
    pub fn next_vip(&self) -> IpAddr {
        let mut st = lock(&self.state);
        st.next_vip = st.next_vip.saturating_add(1).max(1);
        IpAddr::V4(Ipv4Addr::new(10, 96, 1, st.next_vip))
    }

    // ---- namespaces and pods ----

    /// Writes Namespace `name` with `labels` (replacing an earlier one) and
    /// tells the CNI plugin about its labels.
    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let l = app::labels(labels);
        lock(&self.state)
            .namespaces
            .insert(name.to_string(), l.clone());
        self.write_labels()?;
        self.apply(
            &format!("namespace-{name}.yaml"),
            &yaml::namespace(name, &l),
        )
    }

    /// True if namespace `ns` is labelled into the mesh.
    pub fn in_mesh(&self, ns: &str) -> bool {
        lock(&self.state)
            .namespaces
            .get(ns)
            .and_then(|l| l.get(AMBIENT_LABEL))
            .is_some_and(|v| v == "ambient")
    }

    fn write_labels(&self) -> Result<()> {
        let labels = serde_json::json!({
            "namespaces": lock(&self.state).namespaces,
            "pods": {}
        });
        write_atomic(&self.labels_file, &labels.to_string())
    }

    /// Creates pod `namespace/name` on `node` (its netns and cgroup) and
    /// writes its Pod manifest. Not enrolled yet: see [`Cluster::enroll`].
    pub fn add_pod(
        &self,
        node: &Node,
        namespace: &str,
        name: &str,
        sa: &str,
        labels: &[(&str, &str)],
    ) -> Result<App> {
        let pod = self
            .tb
            .add_netns_pod(node, &format!("{namespace}-{name}"))
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        let a = App {
            name: name.to_string(),
            namespace: namespace.to_string(),
            sa: sa.to_string(),
            labels: app::labels(labels),
            pod,
        };
        self.write_pod(&a)?;
        Ok(a)
    }

    pub fn pod_file(&self, a: &App) -> String {
        format!("pod-{}-{}.yaml", a.namespace, a.name)
    }

    /// (Re)writes `a`'s Pod manifest, e.g. after changing its labels;
    /// annotated as captured while it is.
    pub fn write_pod(&self, a: &App) -> Result<()> {
        self.apply(&self.pod_file(a), &yaml::pod(a, self.is_pinned(a)))
    }

    /// CNI ADD for `a`, as the container runtime does for a new pod
    /// sandbox; the plugin enrolls it with its node's ztunnel if its
    /// namespace is ambient. Returns whether the pod is now captured.
    ///
    /// A captured pod's manifest then gets the annotation that says so, as
    /// the plugin patches it on a real cluster, and this returns once
    /// every ztunnel reaches the pod over HBONE.
    pub fn enroll(&self, a: &App) -> Result<bool> {
        let node = self.node_named(a.node())?;
        cni::run(
            &self.bins.cni,
            "ADD",
            a,
            &self.dirs(node).socket,
            &self.labels_file,
        )?;
        lock(&self.state).enrolled.push(a.clone());
        if !self.is_pinned(a) {
            return Ok(false);
        }
        self.write_pod(a)?;
        self.wait_ztunnels(
            Duration::from_secs(20),
            &format!("every ztunnel to reach {} over HBONE", a.key()),
            |d| {
                d["workloads"].as_array().is_some_and(|ws| {
                    ws.iter().any(|w| {
                        w["name"] == a.name.as_str()
                            && w["namespace"] == a.namespace.as_str()
                            && w["protocol"] == "HBONE"
                    })
                })
            },
        )?;
        Ok(true)
    }

    /// True if the pod's eBPF objects are pinned under its node's pin root.
    pub fn is_pinned(&self, a: &App) -> bool {
        self.node_named(a.node())
            .map(|n| self.dirs(n).bpf.join(a.uid()).exists())
            .unwrap_or(false)
    }

    /// The cgroup-attached eBPF programs of a pod, as `bpftool` lists them
    /// (`connect4`, `connect6`, `sock_ops` ...), or an empty list.
    pub fn cgroup_programs(&self, a: &App) -> Vec<String> {
        let Some(cg) = a.pod.cgroup() else {
            return Vec::new();
        };
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cg)
            .output();
        let Ok(out) = out else { return Vec::new() };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["attach_type"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    // ---- manifests ----

    /// Writes manifest `file` (a name inside the manifest directory),
    /// replacing it atomically if it exists.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        check_file_name(file)?;
        write_atomic(&self.manifests.join(file), yaml)
    }

    /// Removes manifest `file`; its objects go away.
    pub fn delete(&self, file: &str) -> Result<()> {
        check_file_name(file)?;
        let p = self.manifests.join(file);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// Writes Service `ns/name` selecting `selector`, at `vip`, to
    /// `service-<ns>-<name>.yaml`.
    pub fn service(
        &self,
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        vip: IpAddr,
        ports: &[yaml::ServicePort],
    ) -> Result<()> {
        self.apply(
            &format!("service-{ns}-{name}.yaml"),
            &yaml::service(
                ns,
                name,
                &BTreeMap::new(),
                &app::labels(selector),
                vip,
                ports,
            ),
        )
    }

    /// Waits until every ztunnel's `/config_dump` satisfies `f`.
    pub fn wait_ztunnels(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        wait_for(timeout, what, || {
            for n in &self.nodes {
                if !f(&self.config_dump(n)?) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    // ---- observing ----

    pub fn config_dump(&self, node: &Node) -> Result<serde_json::Value> {
        let (code, body) = http_get(node.netns(), ADMIN, "/config_dump")?;
        if code != 200 {
            bail!("config_dump on {}: HTTP {code}", node.name());
        }
        serde_json::from_str(&body)
            .with_context(|| format!("config_dump on {} is not JSON", node.name()))
    }

    /// `stateVersion` of a node's ztunnel.
    pub fn state_version(&self, node: &Node) -> Result<u64> {
        self.config_dump(node)?["stateVersion"]
            .as_u64()
            .ok_or_else(|| anyhow!("no stateVersion in {}'s config_dump", node.name()))
    }

    pub fn metrics(&self, node: &Node) -> Result<String> {
        Ok(http_get(node.netns(), METRICS, "/metrics")?.1)
    }

    /// The control plane's `/debug/errors` (bad manifests it skipped).
    pub fn xds_errors(&self) -> Result<String> {
        Ok(http_get(self.cp.netns(), XDS_DEBUG, "/debug/errors")?.1)
    }

    pub fn xds(&self) -> Option<&ChildGuard> {
        self.xds.as_ref()
    }

    pub fn ztunnels(&self) -> &[(Node, ChildGuard)] {
        &self.ztunnels
    }

    pub fn ztunnel(&self, node: &Node) -> Result<&ChildGuard> {
        self.ztunnels
            .iter()
            .find(|(n, _)| n.name() == node.name())
            .map(|(_, z)| z)
            .ok_or_else(|| anyhow!("no ztunnel on {}", node.name()))
    }

    /// Byte length of a node's ztunnel log: access lines after it are new.
    pub fn log_mark(&self, node: &Node) -> usize {
        self.ztunnel(node).map(|z| z.log().len()).unwrap_or(0)
    }

    /// Access-log entries (`connection complete` / `connection refused`)
    /// written by `node`'s ztunnel after `mark`.
    pub fn access_since(&self, node: &Node, mark: usize) -> Vec<AccessLine> {
        let Ok(z) = self.ztunnel(node) else {
            return Vec::new();
        };
        z.log()
            .get(mark..)
            .unwrap_or("")
            .lines()
            .filter_map(AccessLine::parse)
            .collect()
    }

    /// Waits for an access line on `node` after `mark` that satisfies `f`.
    pub fn wait_access(
        &self,
        node: &Node,
        mark: usize,
        what: &str,
        f: impl Fn(&AccessLine) -> bool,
    ) -> Result<AccessLine> {
        let mut found = None;
        wait_for(Duration::from_secs(5), what, || {
            found = self.access_since(node, mark).into_iter().find(|l| f(l));
            Ok(found.is_some())
        })?;
        found.ok_or_else(|| anyhow!("timed out waiting for {what}"))
    }

    // ---- processes ----

    fn token_file(&self, node: &str) -> PathBuf {
        self.tb.dir().join(format!("token-{node}"))
    }

    fn xds_url(&self) -> String {
        format!("https://{}:15012", self.cp.ipv4())
    }

    fn start_xds(&mut self) -> Result<()> {
        let d = self.tb.dir().to_path_buf();
        let mut tokens = String::new();
        for n in &self.nodes {
            let tok = token(n.name());
            let _ = writeln!(tokens, "{} {tok}", n.name());
            write_atomic(&self.token_file(n.name()), &format!("{tok}\n"))?;
        }
        write_atomic(&d.join("tokens"), &tokens)?;
        let mut cmd = Command::new(&self.bins.xds);
        cmd.arg("--manifests")
            .arg(&self.manifests)
            .args(["--listen", "0.0.0.0:15012", "--metrics-addr"])
            .arg(XDS_DEBUG.to_string())
            .arg("--tokens")
            .arg(d.join("tokens"))
            .arg("--ca-cert")
            .arg(&self.ca_cert)
            .arg("--ca-key")
            .arg(&self.ca_key)
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(self.cp.netns(), cmd)?;
        let ns = self.cp.netns().to_string();
        let ready = wait_for(Duration::from_secs(20), "the control plane", || {
            if !child.is_running() {
                bail!("xds exited");
            }
            Ok(http_get(&ns, XDS_DEBUG, "/metrics").is_ok() && self.ca_cert.is_file())
        });
        if let Err(e) = ready {
            bail!(
                "{e:#}; its log ({}):\n{}",
                child.log_path().display(),
                tail(&child.log(), 20)
            );
        }
        self.xds = Some(child);
        Ok(())
    }

    fn start_ztunnel(&self, node: &Node) -> Result<ChildGuard> {
        let d = self.dirs(node);
        let addr = self.xds_url();
        let mut cmd = Command::new(&self.bins.ztunnel);
        cmd.args(["--node", node.name()])
            .args(["--xds-address", &addr, "--ca-address", &addr])
            .arg("--xds-root-cert")
            .arg(&self.ca_cert)
            .arg("--xds-token-file")
            .arg(self.token_file(node.name()))
            .arg("--inpod-socket")
            .arg(&d.socket)
            .arg("--inpod-bpf-dir")
            .arg(&d.bpf)
            .arg("--inpod-state-dir")
            .arg(&d.state)
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(node.netns(), cmd)?;
        let ns = node.netns().to_string();
        let ready = wait_for(
            Duration::from_secs(30),
            "ztunnel readiness (first xDS sync)",
            || {
                if !child.is_running() {
                    bail!("ztunnel exited during start-up");
                }
                Ok(matches!(
                    http_get(&ns, READY, "/healthz/ready"),
                    Ok((200, _))
                ))
            },
        );
        if let Err(e) = ready {
            bail!(
                "ztunnel on {}: {e:#}; its log ({}):\n{}",
                node.name(),
                child.log_path().display(),
                tail(&child.log(), 20)
            );
        }
        Ok(child)
    }

    /// Everything the cluster added outside the test bed's own namespaces,
    /// cgroups and dir: CNI DEL for every enrolled pod (as the runtime does
    /// when a pod goes away), then the ztunnels and the control plane
    /// stopped. Idempotent; also what drop does.
    pub fn shutdown(&mut self) {
        let enrolled = std::mem::take(&mut lock(&self.state).enrolled);
        for a in enrolled {
            let r = self.node_named(a.node()).and_then(|n| {
                cni::run(
                    &self.bins.cni,
                    "DEL",
                    &a,
                    &self.dirs(n).socket,
                    &self.labels_file,
                )
            });
            if let Err(e) = r {
                eprintln!("e2e: CNI DEL {}: {e:#}", a.key());
            }
        }
        for (_, z) in self.ztunnels.drain(..) {
            let _ = z.terminate();
            if !matches!(z.wait_exit_timeout(Duration::from_secs(5)), Ok(Some(_))) {
                let _ = z.kill9();
            }
        }
        if let Some(x) = self.xds.take() {
            let _ = x.terminate();
            let _ = x.wait_exit_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.tb.prefix())
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

fn check_file_name(file: &str) -> Result<()> {
    if file.is_empty() || file.contains('/') || file.starts_with('.') {
        bail!("manifest name {file:?} must be a plain file name");
    }
    Ok(())
}

/// The last `n` lines of a log, for error messages.
pub(crate) fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A per-run bearer token for a node.
fn token(node: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{node}-{:x}-{nanos:x}", std::process::id())
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// watcher never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
