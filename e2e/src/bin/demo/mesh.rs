//! The demo cluster, run the way a real one is: the `xds` control plane on
//! a directory of Kubernetes manifests (Namespaces, Pods, Services,
//! AuthorizationPolicies) that this module writes, one ztunnel per node fed
//! by xDS with workload certificates from the control plane's CA, and pods
//! that are network namespaces in their own cgroups, enrolled by invoking
//! the `ztunnel-cni` plugin exactly as a container runtime would, their TCP
//! captured by eBPF inside each pod (no iptables anywhere).
//!
//! The "apps" know nothing of the mesh: servers are threads of the demo
//! listening inside the pod's namespace; clients are `curl` processes
//! started inside the pod's namespace and cgroup.
//!
//! Everything is named after the test bed's unique prefix; the bpffs pins
//! ztunnel makes live under `/sys/fs/bpf/<prefix>-demo-<node>` and are
//! removed on exit (and, for dead demos, at the next start).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use e2e::mesh::http_get;
use e2e::{ChildGuard, Node, Pod, Testbed};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CART_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const CATALOG_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
/// The reviews split the waypoint is configured with (v1, v2).
pub const REVIEWS_WEIGHTS: (u32, u32) = (80, 20);
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
const READY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
/// The control plane's Prometheus and `/debug/errors` port (in its netns).
pub const XDS_DEBUG: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15014);
/// Where the demo's pin roots live; `<prefix>-demo-<node>` below it.
const BPFFS: &str = "/sys/fs/bpf";

/// Set by the signal thread; long waits give up when it is set.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// One application pod.
#[derive(Clone, Debug)]
pub struct App {
    pub name: &'static str,
    pub namespace: &'static str,
    /// Service account; `None` = not in the mesh (its namespace is not
    /// ambient).
    pub sa: Option<&'static str>,
    /// The `app` label (services select on it).
    pub app_label: &'static str,
    pub pod: Pod,
}

impl App {
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ipv4()
    }
    pub fn node(&self) -> &str {
        self.pod.node()
    }
    /// `shop/frontend`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    pub fn spiffe(&self) -> String {
        match self.sa {
            Some(sa) => format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{sa}", self.namespace),
            None => "-".into(),
        }
    }
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip()), APP_PORT)
    }
    /// The pod uid the CNI plugin passes on (`K8S_POD_UID`).
    pub fn uid(&self) -> String {
        format!("uid-{}-{}", self.namespace, self.name)
    }
}

/// Paths of the binaries the demo runs, next to its own.
pub struct Bins {
    pub ztunnel: PathBuf,
    pub xds: PathBuf,
    pub cni: PathBuf,
    /// Only the waypoint step needs it: without it, that step fails and
    /// says how to build it, and the rest of the demo still runs.
    pub waypoint: Result<PathBuf, String>,
}

impl Bins {
    pub fn locate() -> Result<Bins> {
        let exe = std::env::current_exe().context("locating the demo binary")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent dir", exe.display()))?
            .to_path_buf();
        let find = |name: &str, env: &str| -> Result<PathBuf> {
            if let Some(p) = std::env::var_os(env) {
                return Ok(PathBuf::from(p));
            }
            let p = dir.join(name);
            if !p.is_file() {
                bail!(
                    "no {name} binary at {} (build with `cargo build --release -p ztunnel -p xds -p ztunnel-cni -p waypoint --bin ztunnel --bin xds --bin ztunnel-cni --bin waypoint`, or set {env})",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Bins {
            ztunnel: find("ztunnel", "ZTUNNEL_BIN")?,
            xds: find("xds", "XDS_BIN")?,
            cni: find("ztunnel-cni", "ZTUNNEL_CNI_BIN")?,
            waypoint: find("waypoint", "WAYPOINT_BIN").map_err(|e| format!("{e:#}")),
        })
    }
}

/// A node's in-pod mode paths.
pub struct NodeDirs {
    pub socket: PathBuf,
    pub bpf: PathBuf,
    pub state: PathBuf,
}

pub struct Mesh {
    pub tb: Testbed,
    pub node1: Node,
    pub node2: Node,
    /// The control plane's own node (no pods).
    pub cp: Node,
    pub frontend: App,
    pub batch: App,
    pub cart: App,
    pub catalog: App,
    /// Created when the cart service is scaled out.
    pub cart2: Option<App>,
    /// Namespace store, behind the waypoint (added by the waypoint step).
    pub store: Option<Store>,
    /// The waypoint process (in the store/waypoint pod).
    pub waypoint: Option<ChildGuard>,
    /// The manifest directory the control plane watches.
    pub manifests: PathBuf,
    /// The CNI plugin's stand-in for the API server's labels.
    pub labels_file: PathBuf,
    pub ca_cert: PathBuf,
    pub xds: Option<ChildGuard>,
    pub ztunnels: Vec<(Node, ChildGuard)>,
    /// Pods enrolled through CNI ADD, for CNI DEL at the end.
    enrolled: Vec<App>,
    bins: Bins,
}

impl Mesh {
    /// Builds the nodes and pods, writes the manifests, starts the control
    /// plane, the ztunnels and the app servers, and enrolls the pods through
    /// the CNI plugin. Prints one line per stage.
    pub fn start(progress: &dyn Fn(&str)) -> Result<Mesh> {
        let bins = Bins::locate()?;
        cleanup_stale_pins();
        let tb = Testbed::new().context("creating the network-namespace test bed")?;
        let node1 = tb.add_node("node-1")?;
        let node2 = tb.add_node("node-2")?;
        let cp = tb.add_node("control")?;
        let app = |node: &Node,
                   name: &'static str,
                   namespace: &'static str,
                   sa: Option<&'static str>|
         -> Result<App> {
            Ok(App {
                name,
                namespace,
                sa,
                app_label: name,
                pod: tb
                    .add_netns_pod(node, &format!("{namespace}-{name}"))
                    .with_context(|| format!("creating pod {namespace}/{name}"))?,
            })
        };
        let frontend = app(&node1, "frontend", "shop", Some("frontend"))?;
        let batch = app(&node1, "batch", "legacy", None)?;
        let cart = app(&node2, "cart", "shop", Some("cart"))?;
        let catalog = app(&node2, "catalog", "shop", Some("catalog"))?;
        progress(&format!(
            "nodes node-1 ({}), node-2 ({}) and control ({}); 4 pods, each its own netns and cgroup (prefix {})",
            node1.ipv4(),
            node2.ipv4(),
            cp.ipv4(),
            tb.prefix()
        ));
        let manifests = tb.dir().join("manifests");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let mut mesh = Mesh {
            labels_file: tb.dir().join("cni-labels.json"),
            ca_cert: tb.dir().join("ca.crt"),
            tb,
            node1,
            node2,
            cp,
            frontend,
            batch,
            cart,
            catalog,
            cart2: None,
            store: None,
            waypoint: None,
            manifests,
            xds: None,
            ztunnels: Vec::new(),
            enrolled: Vec::new(),
            bins,
        };
        mesh.write_base_manifests()?;
        mesh.write_labels()?;
        progress(&format!(
            "manifests (Namespaces, Pods, Services, AuthorizationPolicy) written to {}",
            mesh.manifests.display()
        ));

        let t0 = Instant::now();
        mesh.start_xds()?;
        progress(&format!(
            "control plane (xds) serving on {}:15012 in {} ms; it generated the mesh root CA {}",
            mesh.cp.ipv4(),
            t0.elapsed().as_millis(),
            mesh.ca_cert.display()
        ));

        for node in [mesh.node1.clone(), mesh.node2.clone()] {
            let t0 = Instant::now();
            let z = mesh.start_ztunnel(&node)?;
            progress(&format!(
                "ztunnel on {} synced from xDS and ready in {} ms (pid {})",
                node.name(),
                t0.elapsed().as_millis(),
                z.pid()
            ));
            mesh.ztunnels.push((node, z));
        }

        for a in [&mesh.frontend, &mesh.batch, &mesh.cart, &mesh.catalog] {
            spawn_server(a)?;
        }
        progress("app servers listening on :8080 in every pod (they say who answered)");

        let mut lines = Vec::new();
        for a in [
            mesh.frontend.clone(),
            mesh.batch.clone(),
            mesh.cart.clone(),
            mesh.catalog.clone(),
        ] {
            let t0 = Instant::now();
            mesh.cni_add(&a)?;
            let pinned = mesh.is_pinned(&a);
            lines.push(format!(
                "{} {} ({} ms)",
                a.key(),
                if pinned {
                    "enrolled, eBPF attached"
                } else {
                    "not enrolled"
                },
                t0.elapsed().as_millis()
            ));
        }
        progress(&format!("CNI ADD (ztunnel-cni): {}", lines.join("; ")));
        Ok(mesh)
    }

    pub fn dirs(&self, node: &Node) -> NodeDirs {
        let base = self.tb.dir().join(format!("inpod-{}", node.name()));
        NodeDirs {
            socket: base.join("ztunnel.sock"),
            bpf: pin_root(self.tb.prefix(), node.name()),
            state: base.join("pods"),
        }
    }

    fn node_of(&self, a: &App) -> &Node {
        if a.node() == self.node1.name() {
            &self.node1
        } else {
            &self.node2
        }
    }

    fn start_xds(&mut self) -> Result<()> {
        let d = self.tb.dir().to_path_buf();
        let mut tokens = String::new();
        for n in [&self.node1, &self.node2] {
            let tok = token(n.name());
            let _ = writeln!(tokens, "{} {tok}", n.name());
            write_atomic(&d.join(format!("token-{}", n.name())), &format!("{tok}\n"))?;
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
            .arg(d.join("ca.key"))
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
                child.log()
            );
        }
        self.xds = Some(child);
        Ok(())
    }

    fn start_ztunnel(&self, node: &Node) -> Result<ChildGuard> {
        let d = self.dirs(node);
        let addr = format!("https://{}:15012", self.cp.ipv4());
        let mut cmd = Command::new(&self.bins.ztunnel);
        cmd.args(["--node", node.name()])
            .args(["--xds-address", &addr, "--ca-address", &addr])
            .arg("--xds-root-cert")
            .arg(&self.ca_cert)
            .arg("--xds-token-file")
            .arg(self.tb.dir().join(format!("token-{}", node.name())))
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
                child.log()
            );
        }
        Ok(child)
    }

    pub fn ztunnel(&self, node: &Node) -> Result<&ChildGuard> {
        self.ztunnels
            .iter()
            .find(|(n, _)| n.name() == node.name())
            .map(|(_, z)| z)
            .ok_or_else(|| anyhow!("no ztunnel on {}", node.name()))
    }

    /// Runs `ztunnel-cni` as a container runtime does for a new pod sandbox:
    /// the network config on stdin (chained after a ptp-like primary plugin
    /// whose result is `prevResult`), the pod in `CNI_ARGS`, its cgroup as
    /// the `cgroupPath` capability. The plugin decides from the labels
    /// whether to enroll the pod.
    pub fn cni_add(&mut self, a: &App) -> Result<()> {
        self.cni("ADD", a)?;
        self.enrolled.push(a.clone());
        Ok(())
    }

    fn cni(&self, command: &str, a: &App) -> Result<String> {
        let node = self.node_of(a);
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
            "ztunnelSocket": self.dirs(node).socket,
            "labelsFile": self.labels_file,
            "capabilities": {"cgroupPath": true},
            "runtimeConfig": {"cgroupPath": cgroup},
            "prevResult": prev,
        });
        let mut child = Command::new(&self.bins.cni)
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
            .with_context(|| format!("running {}", self.bins.cni.display()))?;
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

    /// True if the pod's eBPF objects are pinned under its node's pin root.
    pub fn is_pinned(&self, a: &App) -> bool {
        self.dirs(self.node_of(a)).bpf.join(a.uid()).exists()
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

    fn pod_yaml(a: &App) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {uid}\n  labels: {{app: {label}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: demo/app}}]\nstatus:\n  phase: Running\n  podIP: {ip4}\n  podIPs: [{{ip: {ip4}}}, {{ip: \"{ip6}\"}}]\n",
            name = a.name,
            ns = a.namespace,
            uid = a.uid(),
            label = a.app_label,
            node = a.node(),
            sa = a.sa.unwrap_or("default"),
            ip4 = a.ip(),
            ip6 = a.pod.ipv6(),
        )
    }

    /// The manifests a cluster would hold at the start: one file per kind,
    /// as a user would keep them.
    fn write_base_manifests(&self) -> Result<()> {
        write_atomic(
            &self.manifests.join("namespaces.yaml"),
            "# Pods of namespace shop are in the mesh (ambient); legacy is not.\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {istio.io/dataplane-mode: ambient}\n\
             ---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n",
        )?;
        for a in [&self.frontend, &self.batch, &self.cart, &self.catalog] {
            self.write_pod(a)?;
        }
        write_atomic(
            &self.manifests.join("services.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: cart, namespace: shop}}\nspec:\n  selector: {{app: cart}}\n  clusterIP: {CART_VIP}\n  ports: [{{port: {SERVICE_PORT}, targetPort: {APP_PORT}}}]\n\
                 ---\napiVersion: v1\nkind: Service\nmetadata: {{name: catalog, namespace: shop}}\nspec:\n  selector: {{app: catalog}}\n  clusterIP: {CATALOG_VIP}\n  ports: [{{port: {SERVICE_PORT}, targetPort: {APP_PORT}}}]\n"
            ),
        )?;
        write_atomic(
            &self.manifests.join("policy-catalog-shop-only.yaml"),
            "# Only workloads of namespace shop may reach catalog.\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: catalog-shop-only, namespace: shop}\nspec:\n  selector: {matchLabels: {app: catalog}}\n  action: DENY\n  rules: [{from: [{source: {notNamespaces: [shop]}}]}]\n",
        )
    }

    pub fn pod_file(&self, a: &App) -> PathBuf {
        self.manifests
            .join(format!("pod-{}-{}.yaml", a.namespace, a.name))
    }

    fn write_pod(&self, a: &App) -> Result<()> {
        write_atomic(&self.pod_file(a), &Self::pod_yaml(a))
    }

    /// The labels the CNI plugin reads in place of the API server.
    fn write_labels(&self) -> Result<()> {
        let labels = serde_json::json!({
            "namespaces": {
                "shop": {"istio.io/dataplane-mode": "ambient"},
                "legacy": {}
            },
            "pods": {}
        });
        write_atomic(&self.labels_file, &labels.to_string())
    }

    pub fn deny_frontend_file(&self) -> PathBuf {
        self.manifests.join("policy-catalog-no-frontend.yaml")
    }

    /// Adds the live DENY policy: frontend may no longer reach catalog.
    pub fn write_deny_frontend(&self) -> Result<()> {
        write_atomic(
            &self.deny_frontend_file(),
            &format!(
                "# Added live by the demo: frontend may no longer reach catalog.\n\
                 apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: catalog-no-frontend, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: catalog}}}}\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [\"{TRUST_DOMAIN}/ns/shop/sa/frontend\"]}}}}]}}]\n"
            ),
        )
    }

    /// Adds `cart-2` on node-1: its netns and cgroup, its server, CNI ADD,
    /// and its Pod manifest (label `app: cart`, so service cart selects it).
    pub fn add_cart2(&mut self) -> Result<App> {
        if let Some(a) = &self.cart2 {
            return Ok(a.clone());
        }
        let app = App {
            name: "cart-2",
            namespace: "shop",
            sa: Some("cart"),
            app_label: "cart",
            pod: self.tb.add_netns_pod(&self.node1, "shop-cart-2")?,
        };
        spawn_server(&app)?;
        self.cni_add(&app)?;
        self.write_pod(&app)?;
        self.cart2 = Some(app.clone());
        Ok(app)
    }

    /// Rewrites cart-2's Pod manifest with another `app` label (a user's
    /// `kubectl label`): service cart selects it only while it says `cart`.
    pub fn relabel_cart2(&mut self, label: &'static str) -> Result<App> {
        let app = self
            .cart2
            .as_mut()
            .ok_or_else(|| anyhow!("no cart-2 yet"))?;
        app.app_label = label;
        let app = app.clone();
        self.write_pod(&app)?;
        Ok(app)
    }

    /// cart-2 as node-1's ztunnel holds it: (`app` label, services).
    pub fn cart2_state(&self) -> Result<Option<(String, Vec<String>)>> {
        let d = self.config_dump(&self.node1)?;
        Ok(d["workloads"].as_array().and_then(|ws| {
            ws.iter().find(|w| w["name"] == "cart-2").map(|w| {
                (
                    w["labels"]["app"].as_str().unwrap_or("").to_string(),
                    w["services"]
                        .as_array()
                        .map(|s| {
                            s.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                )
            })
        }))
    }

    // ---- observing ----

    /// `stateVersion` of each node's ztunnel.
    pub fn state_versions(&self) -> Result<Vec<u64>> {
        [&self.node1, &self.node2]
            .iter()
            .map(|n| {
                let d = self.config_dump(n)?;
                d["stateVersion"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("no stateVersion in {}'s config_dump", n.name()))
            })
            .collect()
    }

    /// Names (`ns/name`) of the policies a node's ztunnel holds.
    pub fn policies(&self, node: &Node) -> Result<Vec<String>> {
        let d = self.config_dump(node)?;
        Ok(d["policies"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p["namespace"].as_str().unwrap_or("?"),
                            p["name"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn config_dump(&self, node: &Node) -> Result<serde_json::Value> {
        let (code, body) = http_get(node.netns(), ADMIN, "/config_dump")?;
        if code != 200 {
            bail!("config_dump on {}: HTTP {code}", node.name());
        }
        serde_json::from_str(&body)
            .with_context(|| format!("config_dump on {} is not JSON", node.name()))
    }

    pub fn metrics(&self, node: &Node) -> Result<String> {
        Ok(http_get(node.netns(), METRICS, "/metrics")?.1)
    }

    /// The control plane's `/debug/errors` (bad manifests it skipped).
    pub fn xds_errors(&self) -> Result<String> {
        Ok(http_get(self.cp.netns(), XDS_DEBUG, "/debug/errors")?.1)
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
        let log = z.log();
        log.get(mark..)
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

    /// `curl http://<dst><path>` run inside pod `from` (its netns and its
    /// cgroup), as the pod's own app would: nothing in the client knows of
    /// the mesh; the pod's eBPF programs capture the connection if the pod
    /// is enrolled.
    pub fn request(&self, from: &App, dst: SocketAddr, path: &str) -> Outcome {
        let t0 = Instant::now();
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "5",
            "-A",
            "demo",
            "-w",
            "\n@@code=%{http_code}",
        ])
        .arg(format!("http://{dst}{path}"));
        let r = (|| -> Result<String> {
            let c = self.tb.spawn_in_pod(&from.pod, cmd)?;
            if c.wait_exit_timeout(Duration::from_secs(10))?.is_none() {
                bail!("curl still running after 10 s");
            }
            Ok(c.log())
        })();
        let ms = t0.elapsed().as_millis();
        match r {
            Err(e) => Outcome::NoReply(format!("error: {e:#}")),
            Ok(log) => {
                let (before, code) = match log.rsplit_once("\n@@code=") {
                    Some((b, c)) => (b, c.trim().parse::<u16>().unwrap_or(0)),
                    None => (log.as_str(), 0),
                };
                // curl's errors go to the same log (stderr), after the body.
                let (body, err): (Vec<&str>, Vec<&str>) =
                    before.lines().partition(|l| !l.starts_with("curl: "));
                match code {
                    200 => Outcome::Answered {
                        body: body.join("\n").trim().to_string(),
                        ms,
                    },
                    0 => Outcome::NoReply(if err.is_empty() {
                        "no reply".into()
                    } else {
                        err.join("; ")
                    }),
                    c => Outcome::NoReply(format!("HTTP {c}: {}", body.join(" ").trim())),
                }
            }
        }
    }

    /// Everything the demo added outside the test bed's own namespaces,
    /// cgroups and dir: CNI DEL for every enrolled pod (as the runtime does
    /// when a pod goes away), the ztunnels and the control plane stopped,
    /// then any pins left behind removed.
    pub fn shutdown(&mut self) {
        if let Some(w) = self.waypoint.take() {
            let _ = w.terminate();
            if !matches!(w.wait_exit_timeout(Duration::from_secs(5)), Ok(Some(_))) {
                let _ = w.kill9();
            }
        }
        for a in std::mem::take(&mut self.enrolled) {
            if let Err(e) = self.cni("DEL", &a) {
                eprintln!("   CNI DEL {}: {e:#}", a.key());
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
        for n in [&self.node1, &self.node2] {
            remove_pin_root(&self.dirs(n).bpf);
        }
    }
}

/// Namespace `store`: service `reviews` (v1 on node-1, v2 on node-2) and
/// the waypoint `waypoint` (a pod on node-2, not captured: it speaks HBONE
/// itself) that the namespace's `istio.io/use-waypoint` label names.
pub struct Store {
    pub waypoint: App,
    pub v1: App,
    pub v2: App,
    /// The waypoint's YAML configuration (polled; edit it live).
    pub config: PathBuf,
}

impl Store {
    pub fn manifest_file(m: &Mesh) -> PathBuf {
        m.manifests.join("store.yaml")
    }
}

impl Mesh {
    /// Adds namespace store: its pods, the manifests (Namespace with
    /// `istio.io/use-waypoint: waypoint`, Gateway of class istio-waypoint,
    /// Services, Pods), the waypoint binary in its pod with a certificate
    /// from the control plane's CA, and CNI ADD of the reviews pods.
    pub fn add_store(&mut self, progress: &dyn Fn(&str)) -> Result<()> {
        let wbin = self.bins.waypoint.clone().map_err(|e| anyhow!(e))?;
        let app = |node: &Node,
                   name: &'static str,
                   sa: &'static str,
                   label: &'static str|
         -> Result<App> {
            Ok(App {
                name,
                namespace: "store",
                sa: Some(sa),
                app_label: label,
                pod: self
                    .tb
                    .add_netns_pod(node, &format!("store-{name}"))
                    .with_context(|| format!("creating pod store/{name}"))?,
            })
        };
        let v1 = app(&self.node1, "reviews-v1", "reviews", "reviews")?;
        let v2 = app(&self.node2, "reviews-v2", "reviews", "reviews")?;
        let waypoint = app(&self.node2, "waypoint", "waypoint", "waypoint")?;
        spawn_server(&v1)?;
        spawn_server(&v2)?;
        let config = self.tb.dir().join("waypoint.yaml");
        write_atomic(&config, &waypoint_yaml(&v1, &v2))?;

        // The waypoint, as its Deployment would run it: identity
        // spiffe://cluster.local/ns/store/sa/waypoint, certificate signed by
        // the control plane's CA.
        let mut cmd = Command::new(&wbin);
        cmd.arg("--config")
            .arg(&config)
            .args(["--identity", &waypoint.spiffe()])
            .arg("--ca-cert")
            .arg(&self.ca_cert)
            .arg("--ca-key")
            .arg(self.tb.dir().join("ca.key"))
            .arg("--hbone-addr")
            .arg(format!("{}:15008", waypoint.ip()))
            .arg("--own-ip")
            .arg(waypoint.ip().to_string())
            .args(["--socket-mark", "0"])
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(waypoint.pod.netns(), cmd)?;
        let ns = waypoint.pod.netns().to_string();
        let ready = wait_for(Duration::from_secs(20), "waypoint readiness", || {
            if !child.is_running() {
                bail!("waypoint exited during start-up");
            }
            Ok(matches!(
                http_get(&ns, READY, "/healthz/ready"),
                Ok((200, _))
            ))
        });
        if let Err(e) = ready {
            bail!(
                "{e:#}; its log ({}):\n{}",
                child.log_path().display(),
                child.log()
            );
        }
        progress(&format!(
            "waypoint store/waypoint ready on {}:15008 (pid {}), identity {}, config {}",
            waypoint.ip(),
            child.pid(),
            waypoint.spiffe(),
            config.display()
        ));
        self.waypoint = Some(child);

        let pod = |a: &App, labels: &str| {
            Self::pod_yaml(a).replace(
                &format!("labels: {{app: {}}}", a.app_label),
                &format!("labels: {{{labels}}}"),
            )
        };
        let yaml = format!(
            "# Namespace store is in the mesh and uses the waypoint `waypoint` for L7.\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: store\n  labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: store}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: waypoint, namespace: store}}\nspec:\n  selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}\n  clusterIP: {WAYPOINT_VIP}\n  ports: [{{name: mesh, port: 15008}}]\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: store}}\nspec:\n  selector: {{app: reviews}}\n  clusterIP: {REVIEWS_VIP}\n  ports: [{{port: {SERVICE_PORT}, targetPort: {APP_PORT}}}]\n\
             ---\n{}---\n{}---\n{}",
            pod(&waypoint, "gateway.networking.k8s.io/gateway-name: waypoint"),
            pod(&v1, "app: reviews, version: v1"),
            pod(&v2, "app: reviews, version: v2"),
        );
        let labels = serde_json::json!({
            "namespaces": {
                "shop": {"istio.io/dataplane-mode": "ambient"},
                "legacy": {},
                "store": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}
            },
            "pods": {}
        });
        write_atomic(&self.labels_file, &labels.to_string())?;
        self.store = Some(Store {
            waypoint,
            v1: v1.clone(),
            v2: v2.clone(),
            config,
        });
        write_atomic(&Store::manifest_file(self), &yaml)?;
        for a in [v1, v2] {
            self.cni_add(&a)?;
        }
        Ok(())
    }

    /// GET on the waypoint's admin (`/config_dump`) or metrics port.
    pub fn waypoint_get(&self, path: &str) -> Result<String> {
        let s = self.store.as_ref().ok_or_else(|| anyhow!("no waypoint"))?;
        let port = if path == "/config_dump" {
            ADMIN
        } else {
            METRICS
        };
        let (code, body) = http_get(s.waypoint.pod.netns(), port, path)?;
        if code != 200 {
            bail!("waypoint {path}: HTTP {code}");
        }
        Ok(body)
    }

    /// The waypoint's log (access lines have target `access`).
    pub fn waypoint_log(&self) -> String {
        self.waypoint.as_ref().map(|w| w.log()).unwrap_or_default()
    }
}

/// The waypoint's configuration (Envoy's v3 resources, as the control
/// plane will send them over xDS once it translates HTTPRoutes): HTTP to
/// the reviews VIP, split 80/20 between the v1 and v2 pods, which are
/// reached over HBONE through their ztunnels, accepting only their identity.
fn waypoint_yaml(v1: &App, v2: &App) -> String {
    let (w1, w2) = REVIEWS_WEIGHTS;
    let cluster = |a: &App| {
        format!(
            "  - name: {name}\n    load_assignment:\n      endpoints:\n        - lb_endpoints:\n            - endpoint: {{address: {{socket_address: {{address: \"{ip}\", port_value: {APP_PORT}}}}}}}\n              metadata: {{identity: \"{id}\", workload: {name}, namespace: store}}\n",
            name = a.name,
            ip = a.ip(),
            id = a.spiffe(),
        )
    };
    format!(
        "listeners:\n  - name: waypoint\n    filter_chains:\n      - name: reviews-http\n        filter_chain_match: {{destination_port: {SERVICE_PORT}, prefix_ranges: [\"{REVIEWS_VIP}/32\"]}}\n        http_connection_manager: {{route_config_name: reviews}}\n\
         route_configurations:\n  - name: reviews\n    virtual_hosts:\n      - name: reviews\n        domains: [\"*\"]\n        routes:\n          - name: split\n            match: {{prefix: /}}\n            route:\n              weighted_clusters:\n                clusters: [{{name: {n1}, weight: {w1}}}, {{name: {n2}, weight: {w2}}}]\n\
         clusters:\n{c1}{c2}",
        n1 = v1.name,
        n2 = v2.name,
        c1 = cluster(v1),
        c2 = cluster(v2),
    )
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `<bpffs>/<prefix>-demo-<node>`: the pin root of one node's ztunnel.
fn pin_root(prefix: &str, node: &str) -> PathBuf {
    Path::new(BPFFS).join(format!("{prefix}-demo-{node}"))
}

/// Removes a pin root: one dir per pod holding pinned programs, links and
/// maps (unlinking a pin releases the object once nothing else holds it).
fn remove_pin_root(root: &Path) {
    if root.exists() {
        if let Err(e) = std::fs::remove_dir_all(root) {
            eprintln!("   removing {}: {e}", root.display());
        }
    }
}

/// Pin roots of demos whose process is gone (`ztb<pid>x<n>-demo-<node>`).
fn cleanup_stale_pins() {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ztb") else {
            continue;
        };
        if !name.contains("-demo-") {
            continue;
        }
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_pin_root(&e.path());
        }
    }
}

/// A per-run bearer token for a node's ztunnel.
fn token(node: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{node}-{:x}-{nanos:x}", std::process::id())
}

/// What a client saw.
#[derive(Clone, Debug)]
pub enum Outcome {
    Answered { body: String, ms: u128 },
    NoReply(String),
}

impl Outcome {
    pub fn answered(&self) -> bool {
        matches!(self, Outcome::Answered { .. })
    }
    pub fn body(&self) -> &str {
        match self {
            Outcome::Answered { body, .. } => body,
            Outcome::NoReply(why) => why,
        }
    }
    /// The pod that answered (`shop/cart`), from the server's greeting.
    pub fn who(&self) -> Option<&str> {
        match self {
            Outcome::Answered { body, .. } => body
                .strip_prefix("hello from ")
                .and_then(|b| b.split(' ').next()),
            Outcome::NoReply(_) => None,
        }
    }
    /// One line for the summary table.
    pub fn short(&self) -> String {
        match self.who() {
            Some(w) => format!("answered by {w}"),
            None => "no reply".into(),
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Outcome::Answered { body, ms, .. } => format!("answered in {ms} ms: \"{body}\""),
            Outcome::NoReply(why) => why.clone(),
        }
    }
}

/// One `target: access` line of a ztunnel log.
#[derive(Clone, Debug)]
pub struct AccessLine {
    pub refused: bool,
    pub fields: BTreeMap<String, String>,
}

impl AccessLine {
    fn parse(line: &str) -> Option<AccessLine> {
        let (refused, rest) = if let Some((_, r)) = line.split_once("connection complete") {
            (false, r)
        } else if let Some((_, r)) = line.split_once("connection refused") {
            (true, r)
        } else {
            return None;
        };
        Some(AccessLine {
            refused,
            fields: parse_fields(rest),
        })
    }
    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("-")
    }
    /// The IP of `src.addr`.
    pub fn src_ip(&self) -> &str {
        ip_of(self.get("src.addr"))
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|x| x.0).unwrap_or(addr)
}

/// `k=v k="quoted v" ...` as tracing's text format writes fields.
fn parse_fields(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim_start();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_string();
        let after = &rest[eq + 1..];
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            // Find the closing quote, honouring backslash escapes.
            let mut end = None;
            let mut esc = false;
            for (i, c) in q.char_indices() {
                match c {
                    '\\' if !esc => esc = true,
                    '"' if !esc => {
                        end = Some(i);
                        break;
                    }
                    _ => esc = false,
                }
            }
            let end = end.unwrap_or(q.len());
            (
                q[..end].replace("\\\"", "\""),
                q.get(end + 1..).unwrap_or(""),
            )
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key, val);
        rest = next.trim_start();
    }
    out
}

/// A tiny HTTP responder on `[::]:8080` inside the pod's namespace that
/// says who answered and what was asked: threads of this process.
fn spawn_server(app: &App) -> Result<()> {
    let any = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), APP_PORT);
    let listener: TcpListener = e2e::tcp_listen_in(app.pod.netns(), any)
        .with_context(|| format!("listening on {any} in pod {}", app.key()))?;
    let who = format!("{} on {} ({})", app.key(), app.node(), app.ip());
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let who = who.clone();
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Until the end of the headers, EOF, or a pause (nc users).
                while !e2e::contains(&req, b"\r\n\r\n") && !e2e::contains(&req, b"\n\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    if req.len() > 65536 {
                        break;
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let first = req.lines().next().unwrap_or("").trim();
                let path = first.split_whitespace().nth(1).unwrap_or(first);
                let body = format!("hello from {who}; you asked for {path}\n");
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    Ok(())
}

pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Polls `f` every 50 ms until it returns true, `timeout` passes, or the
/// demo is interrupted. Errors from `f` count as "not yet".
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out waiting for {what}")),
                None => anyhow!("timed out waiting for {what}"),
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Counts the TCP segments in a pcap (Ethernet link type, either byte
/// order): `(all, to or from port 15008)`.
pub fn pcap_tcp_counts(pcap: &[u8]) -> (usize, usize) {
    let Some(magic) = pcap.get(..4) else {
        return (0, 0);
    };
    let le = magic == [0xd4, 0xc3, 0xb2, 0xa1] || magic == [0x4d, 0x3c, 0xb2, 0xa1];
    let u32_at = |b: &[u8], i: usize| -> Option<usize> {
        let x: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(x)
        } else {
            u32::from_be_bytes(x)
        } as usize)
    };
    let u16_be = |b: &[u8], i: usize| -> Option<u16> {
        Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
    };
    let (mut all, mut hbone) = (0, 0);
    let mut off = 24;
    while let Some(caplen) = u32_at(pcap, off + 8) {
        let Some(frame) = pcap.get(off + 16..off + 16 + caplen) else {
            break;
        };
        off += 16 + caplen;
        let tcp = match u16_be(frame, 12) {
            Some(0x0800) if frame.get(23) == Some(&6) => {
                let ihl = frame.get(14).map_or(20, |b| usize::from(b & 0x0f) * 4);
                14 + ihl
            }
            Some(0x86dd) if frame.get(20) == Some(&6) => 14 + 40,
            _ => continue,
        };
        let (Some(sport), Some(dport)) = (u16_be(frame, tcp), u16_be(frame, tcp + 2)) else {
            continue;
        };
        all += 1;
        if sport == 15008 || dport == 15008 {
            hbone += 1;
        }
    }
    (all, hbone)
}

/// Sum of a counter's samples whose line contains every needle.
pub fn counter(metrics: &str, name: &str, needles: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The first sample line of a counter containing every needle.
pub fn metric_line<'a>(metrics: &'a str, name: &str, needles: &[&str]) -> Option<&'a str> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let l = AccessLine::parse(
            r#"2025 INFO access: connection complete direction="inbound" src.addr=10.0.0.1:0 src.identity=spiffe://x/ns/a/sa/b error="-""#,
        );
        let l = l.expect("parsed");
        assert!(!l.refused);
        assert_eq!(l.get("direction"), "inbound");
        assert_eq!(l.src_ip(), "10.0.0.1");
        assert_eq!(l.get("src.identity"), "spiffe://x/ns/a/sa/b");
        assert_eq!(l.get("error"), "-");
    }
}
