//! The demo's cluster: the e2e library's [`Cluster`] (control plane on a
//! manifest directory, one ztunnel per node fed by xDS, pods enrolled by
//! the `ztunnel-cni` plugin and captured by eBPF, waypoints configured over
//! xDS) with the demo's namespaces, pods, services and policies.
//!
//! The "apps" know nothing of the mesh: servers are the library's sample
//! HTTP and gRPC servers listening inside the pods' namespaces; clients
//! are `curl` and `sample-grpc call` processes started inside the pod's
//! namespace and cgroup.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use e2e::apps::grpc::{GrpcServer, ECHO_PATH, HELLO_PATH};
use e2e::apps::http::HttpServer;
use e2e::cluster::yaml::ServicePort;
pub use e2e::cluster::{counter, metric_line, wait_for, write_atomic, AccessLine};
use e2e::cluster::{
    App, Cluster, ClusterOptions, WaypointReplica, AMBIENT_LABEL, TRUST_DOMAIN, USE_WAYPOINT_LABEL,
};
use e2e::Node;

pub const CART_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const CATALOG_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
pub const REVIEWS_V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);
pub const REVIEWS_V2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 43);
/// The reviews split of the HTTPRoute (v1, v2).
pub const REVIEWS_WEIGHTS: (u32, u32) = (80, 20);
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
/// The reviews pods' gRPC port (service and pods).
pub const GRPC_PORT: u16 = 50051;

/// True once a stop signal arrived; long waits give up.
pub fn interrupted() -> bool {
    e2e::stop_requested()
}

pub struct Mesh {
    pub c: Cluster,
    pub node1: Node,
    pub node2: Node,
    pub frontend: App,
    pub batch: App,
    pub cart: App,
    pub catalog: App,
    /// Created when the cart service is scaled out.
    pub cart2: Option<App>,
    /// Namespace store, behind the waypoint (added by the waypoint step).
    pub store: Option<Store>,
    http: Vec<HttpServer>,
    grpc: Vec<GrpcServer>,
}

/// Namespace `store`: service `reviews` (v1 on node-1, v2 on node-2,
/// each also serving gRPC) and a replica of the waypoint `waypoint` (a
/// pod on node-2, configured over xDS) that the namespace's
/// `istio.io/use-waypoint` label names.
pub struct Store {
    pub waypoint: WaypointReplica,
    pub v1: App,
    pub v2: App,
}

impl Store {
    /// The manifest holding the store's HTTPRoutes.
    pub const ROUTES: &'static str = "store-routes.yaml";
    /// The manifest holding the store's L7 DENY policy.
    pub const DENY: &'static str = "policy-reviews-no-admin.yaml";
}

impl Mesh {
    /// Builds the cluster (two nodes), the pods, the manifests, the app
    /// servers, and enrolls the pods through the CNI plugin. Prints one
    /// line per stage.
    pub fn start(progress: &dyn Fn(&str)) -> Result<Mesh> {
        let c = Cluster::start(ClusterOptions { nodes: 2 }, progress)?;
        let (node1, node2) = (c.node(0).clone(), c.node(1).clone());
        c.namespace("shop", &[(AMBIENT_LABEL, "ambient")])?;
        c.namespace("legacy", &[])?;
        let frontend = c.add_pod(
            &node1,
            "shop",
            "frontend",
            "frontend",
            &[("app", "frontend")],
        )?;
        let batch = c.add_pod(&node1, "legacy", "batch", "default", &[("app", "batch")])?;
        let cart = c.add_pod(&node2, "shop", "cart", "cart", &[("app", "cart")])?;
        let catalog = c.add_pod(&node2, "shop", "catalog", "catalog", &[("app", "catalog")])?;
        let svc = |name: &str, vip: Ipv4Addr| {
            c.service(
                "shop",
                name,
                &[("app", name)],
                IpAddr::V4(vip),
                &[ServicePort::new(SERVICE_PORT, APP_PORT)],
            )
        };
        svc("cart", CART_VIP)?;
        svc("catalog", CATALOG_VIP)?;
        c.apply(
            "policy-catalog-shop-only.yaml",
            "# Only workloads of namespace shop may reach catalog.\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: catalog-shop-only, namespace: shop}\nspec:\n  selector: {matchLabels: {app: catalog}}\n  action: DENY\n  rules: [{from: [{source: {notNamespaces: [shop]}}]}]\n",
        )?;
        progress(&format!(
            "4 pods, each its own netns and cgroup; manifests (Namespaces, Pods, Services, AuthorizationPolicy) written to {}",
            c.manifests().display()
        ));
        let mut mesh = Mesh {
            c,
            node1,
            node2,
            frontend,
            batch,
            cart,
            catalog,
            cart2: None,
            store: None,
            http: Vec::new(),
            grpc: Vec::new(),
        };
        for a in [
            mesh.frontend.clone(),
            mesh.batch.clone(),
            mesh.cart.clone(),
            mesh.catalog.clone(),
        ] {
            mesh.http.push(HttpServer::start_for(&a, APP_PORT)?);
        }
        progress("app servers listening on :8080 in every pod (they say who answered)");
        let mut lines = Vec::new();
        for a in [&mesh.frontend, &mesh.batch, &mesh.cart, &mesh.catalog] {
            let t0 = std::time::Instant::now();
            let pinned = mesh.c.enroll(a)?;
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

    pub fn manifests(&self) -> &Path {
        self.c.manifests()
    }

    pub fn is_pinned(&self, a: &App) -> bool {
        self.c.is_pinned(a)
    }

    pub fn cgroup_programs(&self, a: &App) -> Vec<String> {
        self.c.cgroup_programs(a)
    }

    pub fn pod_file(&self, a: &App) -> std::path::PathBuf {
        self.manifests().join(self.c.pod_file(a))
    }

    pub fn deny_frontend_file(&self) -> std::path::PathBuf {
        self.manifests().join("policy-catalog-no-frontend.yaml")
    }

    /// Adds the live DENY policy: frontend may no longer reach catalog.
    pub fn write_deny_frontend(&self) -> Result<()> {
        self.c.apply(
            "policy-catalog-no-frontend.yaml",
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
        let app = self
            .c
            .add_pod(&self.node1, "shop", "cart-2", "cart", &[("app", "cart")])?;
        self.http.push(HttpServer::start_for(&app, APP_PORT)?);
        self.c.enroll(&app)?;
        self.cart2 = Some(app.clone());
        Ok(app)
    }

    /// Rewrites cart-2's Pod manifest with another `app` label (a user's
    /// `kubectl label`): service cart selects it only while it says `cart`.
    pub fn relabel_cart2(&mut self, label: &str) -> Result<App> {
        let app = self
            .cart2
            .as_mut()
            .ok_or_else(|| anyhow!("no cart-2 yet"))?;
        app.labels.insert("app".into(), label.into());
        let app = app.clone();
        self.c.write_pod(&app)?;
        Ok(app)
    }

    /// cart-2 as node-1's ztunnel holds it: (`app` label, services).
    pub fn cart2_state(&self) -> Result<Option<(String, Vec<String>)>> {
        let d = self.c.config_dump(&self.node1)?;
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
            .map(|n| self.c.state_version(n))
            .collect()
    }

    /// Names (`ns/name`) of the policies a node's ztunnel holds.
    pub fn policies(&self, node: &Node) -> Result<Vec<String>> {
        let d = self.c.config_dump(node)?;
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
        self.c.config_dump(node)
    }

    pub fn metrics(&self, node: &Node) -> Result<String> {
        self.c.metrics(node)
    }

    pub fn xds_errors(&self) -> Result<String> {
        self.c.xds_errors()
    }

    pub fn log_mark(&self, node: &Node) -> usize {
        self.c.log_mark(node)
    }

    pub fn wait_access(
        &self,
        node: &Node,
        mark: usize,
        what: &str,
        f: impl Fn(&AccessLine) -> bool,
    ) -> Result<AccessLine> {
        self.c.wait_access(node, mark, what, f)
    }

    /// `curl http://<dst><path>` run inside pod `from` (its netns and its
    /// cgroup), as the pod's own app would: nothing in the client knows of
    /// the mesh; the pod's eBPF programs capture the connection if the pod
    /// is enrolled.
    pub fn request(&self, from: &App, dst: SocketAddr, path: &str) -> Outcome {
        let t0 = std::time::Instant::now();
        let r = self.c.http(from, &format!("{dst}{path}"), &[]);
        let ms = t0.elapsed().as_millis();
        match r.code {
            200 => Outcome::Answered {
                body: r.body.trim().to_string(),
                ms,
            },
            0 => Outcome::NoReply(r.error),
            c => Outcome::NoReply(format!("HTTP {c}: {}", r.body.trim())),
        }
    }

    /// Stops the waypoint, then the cluster (CNI DEL, ztunnels, control
    /// plane).
    pub fn shutdown(&mut self) {
        if let Some(s) = self.store.take() {
            let w = s.waypoint.child;
            let _ = w.terminate();
            if !matches!(w.wait_exit_timeout(Duration::from_secs(5)), Ok(Some(_))) {
                let _ = w.kill9();
            }
        }
        self.c.shutdown();
    }
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
            Outcome::Answered { body, ms, .. } => {
                format!(
                    "answered in {ms} ms: \"{}\"",
                    body.lines().next().unwrap_or("")
                )
            }
            Outcome::NoReply(why) => why.clone(),
        }
    }
}

impl Mesh {
    /// Adds namespace store: the manifests (Namespace with
    /// `istio.io/use-waypoint: waypoint`, the waypoint's Gateway of class
    /// istio-waypoint and Service, Services reviews, reviews-v1 and
    /// reviews-v2, their Pods), a replica of the waypoint (the real binary,
    /// configured over xDS by the control plane, certificate from its CA),
    /// the reviews pods' HTTP and gRPC servers, and CNI ADD of the reviews
    /// pods. Routes come separately: [`Mesh::write_store_routes`].
    pub fn add_store(&mut self, progress: &dyn Fn(&str)) -> Result<()> {
        let c = &self.c;
        c.namespace(
            "store",
            &[(AMBIENT_LABEL, "ambient"), (USE_WAYPOINT_LABEL, "waypoint")],
        )?;
        c.add_waypoint("store", "waypoint", IpAddr::V4(WAYPOINT_VIP))?;
        let v1 = c.add_pod(
            &self.node1,
            "store",
            "reviews-v1",
            "reviews",
            &[("app", "reviews"), ("version", "v1")],
        )?;
        let v2 = c.add_pod(
            &self.node2,
            "store",
            "reviews-v2",
            "reviews",
            &[("app", "reviews"), ("version", "v2")],
        )?;
        let ports = [
            ServicePort::new(SERVICE_PORT, APP_PORT),
            ServicePort {
                port: GRPC_PORT,
                target_port: GRPC_PORT,
                app_protocol: Some("grpc"),
            },
        ];
        c.service(
            "store",
            "reviews",
            &[("app", "reviews")],
            IpAddr::V4(REVIEWS_VIP),
            &ports,
        )?;
        c.service(
            "store",
            "reviews-v1",
            &[("app", "reviews"), ("version", "v1")],
            IpAddr::V4(REVIEWS_V1_VIP),
            &ports,
        )?;
        c.service(
            "store",
            "reviews-v2",
            &[("app", "reviews"), ("version", "v2")],
            IpAddr::V4(REVIEWS_V2_VIP),
            &ports,
        )?;
        for a in [&v1, &v2] {
            self.http.push(HttpServer::start_for(a, APP_PORT)?);
            self.grpc.push(GrpcServer::start_for(a, GRPC_PORT)?);
        }
        let waypoint = c
            .start_waypoint_replica(&self.node2, "store", "waypoint", "waypoint-1")
            .context("starting the waypoint")?;
        progress(&format!(
            "waypoint store/waypoint-1 ready on {}:15008 (pid {}), identity {}, configured over xDS by the control plane",
            waypoint.app.ip(),
            waypoint.child.pid(),
            waypoint.app.spiffe(),
        ));
        for a in [&v1, &v2] {
            c.enroll(a)?;
        }
        self.store = Some(Store { waypoint, v1, v2 });
        Ok(())
    }

    /// The HTTPRoutes of namespace store: reviews split 80/20 between
    /// the reviews-v1 and reviews-v2 Services; gRPC to reviews routed by
    /// method (Hello to v1, Echo to v2).
    pub fn write_store_routes(&self) -> Result<()> {
        let (w1, w2) = REVIEWS_WEIGHTS;
        self.c.apply(
            Store::ROUTES,
            &format!(
                "# reviews: {w1}/{w2} between v1 and v2 (HTTP), by method (gRPC).\n\
                 apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: store}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: reviews, port: {SERVICE_PORT}}}]\n  rules:\n  - backendRefs:\n    - {{name: reviews-v1, port: {SERVICE_PORT}, weight: {w1}}}\n    - {{name: reviews-v2, port: {SERVICE_PORT}, weight: {w2}}}\n\
                 ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews-grpc, namespace: store}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: reviews, port: {GRPC_PORT}}}]\n  rules:\n  - matches: [{{path: {{type: Exact, value: {HELLO_PATH}}}}}]\n    backendRefs: [{{name: reviews-v1, port: {GRPC_PORT}}}]\n  - matches: [{{path: {{type: Exact, value: {ECHO_PATH}}}}}]\n    backendRefs: [{{name: reviews-v2, port: {GRPC_PORT}}}]\n"
            ),
        )
    }

    /// An L7 policy on the waypoint (Istio's `targetRefs` to its
    /// Gateway): nobody may GET reviews' `/admin...` paths.
    pub fn write_store_deny(&self) -> Result<()> {
        self.c.apply(
            Store::DENY,
            "# L7: nobody gets reviews' /admin pages (enforced by the waypoint).\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reviews-no-admin, namespace: store}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n",
        )
    }

    /// The paths `a`'s HTTP server was asked for.
    pub fn server_paths(&self, a: &App) -> Vec<String> {
        self.http
            .iter()
            .filter(|s| s.served_by() == a.key())
            .flat_map(|s| s.paths())
            .collect()
    }

    /// The store's waypoint replica.
    pub fn waypoint(&self) -> Result<&WaypointReplica> {
        self.store
            .as_ref()
            .map(|s| &s.waypoint)
            .ok_or_else(|| anyhow!("no waypoint"))
    }

    /// GET on the waypoint's admin (`/config_dump`) or metrics port.
    pub fn waypoint_get(&self, path: &str) -> Result<String> {
        self.waypoint()?.get(path)
    }

    /// The waypoint's log (access lines have target `access`).
    pub fn waypoint_log(&self) -> String {
        self.waypoint().map(|w| w.log()).unwrap_or_default()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown();
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
