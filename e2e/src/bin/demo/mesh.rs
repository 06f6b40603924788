//! The demo cluster: two nodes, a handful of pods, one ztunnel per node, and
//! pod traffic captured into ztunnel with iptables REDIRECT (so the "apps"
//! are plain TCP clients and servers that know nothing of the mesh).
//!
//! Pods are the test bed's host pods: an address on the node's `lo`, with
//! their processes in the node's network namespace binding that address.
//! That is what REDIRECT capture on the node can serve (HBONE inbound needs
//! the pod address as the listener's local address, which REDIRECT would
//! rewrite).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use e2e::mesh::{capture_inbound, capture_outbound, http_get, parse_response};
use e2e::{ChildGuard, Node, Pod, Testbed};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CART_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const CATALOG_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
/// ztunnel's default SO_MARK; capture lets ztunnel's own sockets through.
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
const READY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);

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
    /// Service account; `None` = not in the mesh.
    pub sa: Option<&'static str>,
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
}

/// What the generated state file contains beyond the base set-up.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateKnobs {
    /// `cart-2` (node-1) is an endpoint of the cart service.
    pub cart2: bool,
    /// The extra DENY: frontend may not reach catalog.
    pub lockdown: bool,
}

pub struct Mesh {
    pub tb: Testbed,
    pub node1: Node,
    pub node2: Node,
    pub frontend: App,
    pub batch: App,
    pub cart: App,
    pub catalog: App,
    /// Created when the cart service is scaled out.
    pub cart2: Option<App>,
    pub state_file: PathBuf,
    pub ztunnels: Vec<(Node, ChildGuard)>,
    pub ztunnel_bin: PathBuf,
}

pub fn ztunnel_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ZTUNNEL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the demo binary")?;
    let bin = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent dir", exe.display()))?
        .join("ztunnel");
    if !bin.exists() {
        bail!(
            "no ztunnel binary at {} (build it with `cargo build --release -p ztunnel`, or set ZTUNNEL_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Mesh {
    /// Builds the nodes and pods, writes the state file, starts the servers,
    /// the capture rules and the ztunnels. Prints one line per stage.
    pub fn start(progress: &dyn Fn(&str)) -> Result<Mesh> {
        let ztunnel_bin = ztunnel_bin()?;
        let tb = Testbed::new().context("creating the network-namespace test bed")?;
        let node1 = tb.add_node("node-1")?;
        let node2 = tb.add_node("node-2")?;
        // Order fixes the addresses: node-1 gets .10, .11; node-2 .10, .11.
        let frontend = App {
            name: "frontend",
            namespace: "shop",
            sa: Some("frontend"),
            pod: tb.add_host_pod(&node1, "frontend")?,
        };
        let batch = App {
            name: "batch",
            namespace: "legacy",
            sa: None,
            pod: tb.add_host_pod(&node1, "batch")?,
        };
        let cart = App {
            name: "cart",
            namespace: "shop",
            sa: Some("cart"),
            pod: tb.add_host_pod(&node2, "cart")?,
        };
        let catalog = App {
            name: "catalog",
            namespace: "shop",
            sa: Some("catalog"),
            pod: tb.add_host_pod(&node2, "catalog")?,
        };
        progress(&format!(
            "nodes node-1 ({}) and node-2 ({}) and 4 pods created (netns prefix {})",
            node1.ipv4(),
            node2.ipv4(),
            tb.prefix()
        ));
        let manifests = tb.dir().join("mesh");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let state_file = manifests.join("state.yaml");
        let mut mesh = Mesh {
            tb,
            node1,
            node2,
            frontend,
            batch,
            cart,
            catalog,
            cart2: None,
            state_file,
            ztunnels: Vec::new(),
            ztunnel_bin,
        };
        mesh.write_state(StateKnobs::default())?;
        progress(&format!(
            "mesh state written to {}",
            mesh.state_file.display()
        ));

        for app in [&mesh.frontend, &mesh.batch, &mesh.cart, &mesh.catalog] {
            spawn_server(app)?;
        }
        progress("app servers listening on :8080 in every pod (they say who answered)");

        for node in [mesh.node1.clone(), mesh.node2.clone()] {
            // REDIRECT happens after routing: service VIPs need a route.
            ip_in(
                node.netns(),
                &["ip", "route", "add", "10.96.0.0/16", "dev", "eth0"],
            )?;
        }
        for app in [&mesh.frontend, &mesh.cart, &mesh.catalog] {
            capture_app(app)?;
        }
        progress("iptables REDIRECT capture installed for the mesh pods (legacy/batch left alone)");

        // The first ztunnel creates the shared CA pair; the second reuses it.
        for node in [mesh.node1.clone(), mesh.node2.clone()] {
            let t0 = Instant::now();
            let z = mesh.start_ztunnel(&node)?;
            progress(&format!(
                "ztunnel on {} ready in {} ms (pid {})",
                node.name(),
                t0.elapsed().as_millis(),
                z.pid()
            ));
            mesh.ztunnels.push((node, z));
        }
        Ok(mesh)
    }

    pub fn ca_paths(&self) -> (PathBuf, PathBuf) {
        let dir = self.tb.dir().join("mesh");
        (dir.join("ca.crt"), dir.join("ca.key"))
    }

    fn start_ztunnel(&self, node: &Node) -> Result<ChildGuard> {
        let (cert, key) = self.ca_paths();
        let mut cmd = Command::new(&self.ztunnel_bin);
        cmd.args(["--node", node.name()])
            .arg("--local-state")
            .arg(&self.state_file)
            .arg("--ca-cert")
            .arg(cert)
            .arg("--ca-key")
            .arg(key)
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(node.netns(), cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if matches!(
                http_get(node.netns(), READY, "/healthz/ready"),
                Ok((200, _))
            ) {
                return Ok(child);
            }
            if !child.is_running() {
                bail!(
                    "ztunnel on {} exited during start-up; its log ({}):\n{}",
                    node.name(),
                    child.log_path().display(),
                    child.log()
                );
            }
            if Instant::now() > deadline || interrupted() {
                bail!(
                    "ztunnel on {} not ready after 20 s; its log ({}):\n{}",
                    node.name(),
                    child.log_path().display(),
                    child.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ztunnel(&self, node: &Node) -> Result<&ChildGuard> {
        self.ztunnels
            .iter()
            .find(|(n, _)| n.name() == node.name())
            .map(|(_, z)| z)
            .ok_or_else(|| anyhow!("no ztunnel on {}", node.name()))
    }

    /// Adds `cart-2` on node-1 (pod, server, capture); the state file is
    /// not touched.
    pub fn add_cart2(&mut self) -> Result<App> {
        if let Some(a) = &self.cart2 {
            return Ok(a.clone());
        }
        let app = App {
            name: "cart-2",
            namespace: "shop",
            sa: Some("cart"),
            pod: self.tb.add_host_pod(&self.node1, "cart-2")?,
        };
        spawn_server(&app)?;
        capture_app(&app)?;
        self.cart2 = Some(app.clone());
        Ok(app)
    }

    pub fn state_yaml(&self, k: StateKnobs) -> String {
        let mut y = String::new();
        let _ = writeln!(
            y,
            "# The mesh as both ztunnels see it (format: ztunnel/src/state/file.rs).\n\
             # Edit and save: each ztunnel re-reads this file within a second; a bad\n\
             # edit is rejected (see localStateError in /config_dump) and the last\n\
             # good state stays in force. legacy/batch is not listed: it is not in\n\
             # the mesh.\n\
             workloads:"
        );
        let mut apps = vec![(&self.frontend, "[]"), (&self.cart, "[shop/cart]")];
        if k.cart2 {
            if let Some(c2) = &self.cart2 {
                apps.push((c2, "[shop/cart]"));
            }
        }
        apps.push((&self.catalog, "[shop/catalog]"));
        for (a, svcs) in apps {
            let _ = writeln!(
                y,
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    node: {}\n    addresses: [{}]\n    labels: {{app: {}}}\n    services: {svcs}",
                a.name,
                a.namespace,
                a.sa.unwrap_or("default"),
                a.node(),
                a.ip(),
                if a.name == "cart-2" { "cart" } else { a.name },
            );
        }
        let _ = writeln!(
            y,
            "services:\n\
             \x20 - name: cart\n    namespace: shop\n    addresses: [{CART_VIP}]\n    ports: [{{port: {SERVICE_PORT}, targetPort: {APP_PORT}}}]\n\
             \x20 - name: catalog\n    namespace: shop\n    addresses: [{CATALOG_VIP}]\n    ports: [{{port: {SERVICE_PORT}, targetPort: {APP_PORT}}}]\n\
             policies:\n\
             \x20 # Only workloads of namespace shop may reach catalog.\n\
             \x20 - name: catalog-shop-only\n    namespace: shop\n    scope: WorkloadSelector\n    selector: {{app: catalog}}\n    action: Deny\n    rules:\n      - clauses:\n          - matches:\n              - notNamespaces: [shop]"
        );
        if k.lockdown {
            let _ = writeln!(
                y,
                "  # Added live by the demo: frontend may no longer reach catalog.\n\
                 \x20 - name: catalog-no-frontend\n    namespace: shop\n    scope: WorkloadSelector\n    selector: {{app: catalog}}\n    action: Deny\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"{TRUST_DOMAIN}/ns/shop/sa/frontend\"]"
            );
        }
        y
    }

    pub fn write_state(&self, k: StateKnobs) -> Result<()> {
        write_atomic(&self.state_file, &self.state_yaml(k))
    }

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

    /// Waits until both ztunnels report a state version above `before`.
    pub fn wait_applied(&self, before: &[u64]) -> Result<Vec<u64>> {
        let mut now = Vec::new();
        wait_for(
            Duration::from_secs(10),
            "both ztunnels to reload the state",
            || {
                now = self.state_versions()?;
                Ok(now.iter().zip(before).all(|(n, b)| n > b))
            },
        )?;
        Ok(now)
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

    /// Sends an HTTP/1.0 GET from `from` (a pod) to `dst`, as a plain TCP
    /// client would: its connection is captured by the node's iptables
    /// rules, not by anything in the client.
    pub fn request(&self, from: &App, dst: SocketAddr, path: &str) -> Outcome {
        let t0 = Instant::now();
        let r = (|| -> std::io::Result<(u16, String, u16)> {
            let mut s = e2e::tcp_connect_from_in(from.pod.netns(), IpAddr::V4(from.ip()), dst)?;
            let port = s.local_addr()?.port();
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                s,
                "GET {path} HTTP/1.0\r\nHost: {dst}\r\nUser-Agent: demo\r\n\r\n"
            )?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            let out = String::from_utf8_lossy(&out).into_owned();
            let (code, body) = parse_response(&out).unwrap_or_default();
            Ok((code, body, port))
        })();
        let ms = t0.elapsed().as_millis();
        match r {
            Ok((200, body, port)) => Outcome::Answered {
                body: body.trim().to_string(),
                port,
                ms,
            },
            Ok((0, _, _)) => Outcome::NoReply("connection closed without a reply".into()),
            Ok((code, body, _)) => Outcome::NoReply(format!("HTTP {code}: {}", body.trim())),
            // The capture accepted the connection; ztunnel then closed it
            // (maybe before the request was even written).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Outcome::NoReply(format!("connection closed without a reply ({e})"))
            }
            Err(e) => Outcome::NoReply(format!("error: {e}")),
        }
    }
}

/// What a client saw.
#[derive(Clone, Debug)]
pub enum Outcome {
    Answered { body: String, port: u16, ms: u128 },
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

/// Captures a mesh pod's traffic on its node, the way Istio's iptables mode
/// does: outbound TCP from the pod to 15001 (except ztunnel's own, marked,
/// sockets), inbound TCP to the pod to 15006 (except HBONE on 15008).
fn capture_app(app: &App) -> Result<()> {
    let ns = app.pod.node_netns();
    capture_outbound(ns, app.ip().into())?;
    capture_inbound(ns, app.ip().into())
}

fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    e2e::ip_netns_exec(netns, args).map(drop)
}

/// A tiny HTTP responder on `<pod ip>:8080` that says who answered and
/// what was asked. Threads of this process, in the node's namespace.
fn spawn_server(app: &App) -> Result<()> {
    let listener: TcpListener = e2e::tcp_listen_in(app.pod.netns(), app.addr())
        .with_context(|| format!("listening on {} for {}", app.addr(), app.key()))?;
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
