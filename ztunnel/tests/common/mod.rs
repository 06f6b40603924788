//! A two-node mesh on the e2e test bed: nodes `a` and `b`, host pods
//! (addresses owned by the node namespace), one ztunnel per node sharing a
//! CA root, an echo server behind a service VIP on node `b`, and a SOCKS5
//! client to drive traffic from pods on node `a`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use e2e::mesh::http_get;
use e2e::{ChildGuard, Node, Pod, Testbed};
use ztunnel::identity::{Identity, LocalCa, SecretManager};

pub const ECHO_PORT: u16 = 8080;
pub const VIP: &str = "10.96.0.10";
pub const SERVICE_PORT: u16 = 80;
pub const SOCKS: &str = "127.0.0.1:15080";

pub struct Cluster {
    pub tb: Testbed,
    pub a: Node,
    pub b: Node,
    /// On node a, service account `client`.
    pub client: Pod,
    /// On node a, service account `other`.
    pub other: Pod,
    /// On node b, service account `echo`, backs the `echo` service.
    pub echo: Pod,
    /// On node a, not in the mesh at all.
    pub outsider: Pod,
    /// On node b, not in the mesh; runs a plain echo server.
    pub plain: Pod,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub za: Option<ChildGuard>,
    pub zb: Option<ChildGuard>,
}

/// Extra YAML appended to the state: policies, usually.
pub struct Options {
    pub policies: String,
    /// Service account node `a` believes the echo pod runs as.
    pub echo_sa_seen_by_a: String,
    /// Give node `b` a CA of its own instead of the shared root.
    pub b_has_own_root: bool,
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            policies: String::new(),
            echo_sa_seen_by_a: "echo".into(),
            b_has_own_root: false,
            extra_args: vec![],
        }
    }
}

pub fn root_or_skip() -> bool {
    e2e::require_root()
}

impl Cluster {
    pub fn start(opts: Options) -> Cluster {
        let tb = Testbed::new().expect("test bed");
        let a = tb.add_node("a").unwrap();
        let b = tb.add_node("b").unwrap();
        let client = tb.add_host_pod(&a, "client").unwrap();
        let other = tb.add_host_pod(&a, "other").unwrap();
        let outsider = tb.add_host_pod(&a, "outsider").unwrap();
        let echo = tb.add_host_pod(&b, "echo").unwrap();
        let plain = tb.add_host_pod(&b, "plain").unwrap();
        let ca_cert = tb.dir().join("ca.crt");
        let ca_key = tb.dir().join("ca.key");
        LocalCa::generate("cluster.local")
            .unwrap()
            .write(&ca_cert, &ca_key)
            .unwrap();
        let mut c = Cluster {
            tb,
            a,
            b,
            client,
            other,
            echo,
            outsider,
            plain,
            ca_cert,
            ca_key,
            za: None,
            zb: None,
        };
        c.write_state("a", &opts.echo_sa_seen_by_a, &opts.policies);
        c.write_state("b", "echo", &opts.policies);
        for ip in [IpAddr::V4(c.echo.ipv4()), IpAddr::V6(c.echo.ipv6())] {
            spawn_echo(c.b.netns(), SocketAddr::new(ip, ECHO_PORT));
        }
        spawn_echo(
            c.b.netns(),
            SocketAddr::new(IpAddr::V4(c.plain.ipv4()), ECHO_PORT),
        );
        let (a, b) = (c.a.clone(), c.b.clone());
        c.za = Some(c.start_ztunnel(&a, false, &opts.extra_args));
        c.zb = Some(c.start_ztunnel(&b, opts.b_has_own_root, &opts.extra_args));
        c
    }

    pub fn state_path(&self, node: &str) -> PathBuf {
        self.tb.dir().join(format!("state-{node}.yaml"))
    }

    pub fn state_yaml(&self, echo_sa: &str, policies: &str) -> String {
        format!(
            r#"workloads:
  - name: client
    namespace: default
    serviceAccount: client
    node: a
    addresses: [{client4}, "{client6}"]
    labels: {{app: client}}
  - name: other
    namespace: default
    serviceAccount: other
    node: a
    addresses: [{other4}, "{other6}"]
  - name: echo
    namespace: default
    serviceAccount: {echo_sa}
    node: b
    addresses: [{echo4}, "{echo6}"]
    labels: {{app: echo, version: v1}}
    services: [default/echo]
  - name: plain
    namespace: legacy
    node: b
    protocol: TCP
    addresses: [{plain4}]
services:
  - name: echo
    namespace: default
    addresses: [{VIP}, "fd00:96::10"]
    ports: [{{port: {SERVICE_PORT}, targetPort: {ECHO_PORT}}}]
{policies}
"#,
            client4 = self.client.ipv4(),
            client6 = self.client.ipv6(),
            other4 = self.other.ipv4(),
            other6 = self.other.ipv6(),
            echo4 = self.echo.ipv4(),
            echo6 = self.echo.ipv6(),
            plain4 = self.plain.ipv4(),
        )
    }

    pub fn write_state(&self, node: &str, echo_sa: &str, policies: &str) {
        write_atomic(&self.state_path(node), &self.state_yaml(echo_sa, policies));
    }

    /// Rewrites both nodes' state with new policies and waits until both
    /// ztunnels have applied it.
    pub fn set_policies(&self, policies: &str) {
        let before = [self.state_version(&self.a), self.state_version(&self.b)];
        self.write_state("a", "echo", policies);
        self.write_state("b", "echo", policies);
        wait_until(Duration::from_secs(10), "state reload", || {
            self.state_version(&self.a) > before[0] && self.state_version(&self.b) > before[1]
        });
    }

    pub fn start_ztunnel(&self, node: &Node, own_root: bool, extra: &[String]) -> ChildGuard {
        let (cert, key) = if own_root {
            (
                self.tb.dir().join(format!("own-{}.crt", node.name())),
                self.tb.dir().join(format!("own-{}.key", node.name())),
            )
        } else {
            (self.ca_cert.clone(), self.ca_key.clone())
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
        cmd.args(["--node", node.name()])
            .arg("--local-state")
            .arg(self.state_path(node.name()))
            .arg("--ca-cert")
            .arg(cert)
            .arg("--ca-key")
            .arg(key)
            .args(["--socks5-addr", SOCKS])
            .args(extra)
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(node.netns(), cmd).expect("spawn ztunnel");
        let ns = node.netns().to_string();
        wait_until(Duration::from_secs(15), "ztunnel readiness", || {
            http_get(&ns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
        });
        child
    }

    pub fn state_version(&self, node: &Node) -> u64 {
        self.config_dump(node)["stateVersion"].as_u64().unwrap_or(0)
    }

    pub fn config_dump(&self, node: &Node) -> serde_json::Value {
        let (code, body) = http_get(
            node.netns(),
            "127.0.0.1:15000".parse().unwrap(),
            "/config_dump",
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn metrics(&self, node: &Node) -> String {
        http_get(node.netns(), "127.0.0.1:15020".parse().unwrap(), "/metrics")
            .unwrap()
            .1
    }

    /// Opens a connection from `pod` (on node a) to `dst` through node a's
    /// SOCKS5 listener. `Err(code)` is the SOCKS5 reply code.
    pub fn socks(&self, pod: &Pod, dst: SocketAddr) -> Result<TcpStream, u8> {
        // The SOCKS5 listener is on IPv4 loopback; the pod is identified by
        // its IPv4 address whatever the destination's family.
        socks_connect(
            self.a.netns(),
            IpAddr::V4(pod.ipv4()),
            SOCKS.parse().unwrap(),
            dst,
        )
    }

    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(VIP.parse().unwrap(), SERVICE_PORT)
    }

    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.echo.ipv4()), ECHO_PORT)
    }

    pub fn za(&self) -> &ChildGuard {
        self.za.as_ref().unwrap()
    }

    pub fn zb(&self) -> &ChildGuard {
        self.zb.as_ref().unwrap()
    }
}

pub fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// An echo server: every connection gets its bytes back.
pub fn spawn_echo(netns: &str, addr: SocketAddr) {
    let listener = e2e::tcp_listen_in(netns, addr).expect("echo listen");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Sends `msg` and expects it back.
pub fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

pub fn socks_connect(
    netns: &str,
    src: IpAddr,
    proxy: SocketAddr,
    dst: SocketAddr,
) -> Result<TcpStream, u8> {
    let mut s = e2e::tcp_connect_from_in(netns, src, proxy).expect("connect to SOCKS5");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0]);
    let mut req = vec![5, 1, 0];
    match dst {
        SocketAddr::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
    }
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    if rep[1] != 0 {
        return Err(rep[1]);
    }
    s.set_read_timeout(None).unwrap();
    Ok(s)
}

/// Sum of a counter's samples whose labels contain every `needle`.
pub fn counter(metrics: &str, name: &str, needles: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A server that answers every connection with `name` and closes, so a
/// client can tell which endpoint it reached.
pub fn spawn_named(netns: &str, addr: SocketAddr, name: &'static str) {
    let listener = e2e::tcp_listen_in(netns, addr).expect("named listen");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.write_all(name.as_bytes());
        }
    });
}

/// Reads everything until the peer closes.
pub fn read_all(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Node b's HBONE address for the echo pod.
pub fn hbone_addr(c: &Cluster) -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(c.echo.ipv4()), 15008)
}

/// A TLS connection from node a to node b's HBONE port.
pub async fn connect_tls(
    c: &Cluster,
    cfg: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let std = e2e::tcp_connect_in(c.a.netns(), hbone_addr(c))?;
    std.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(std)?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ztunnel::tls::server_name(c.echo.ipv4().into()), tcp)
        .await
}

/// A client config presenting `client`'s certificate from the shared root.
pub async fn client_config(c: &Cluster) -> rustls::ClientConfig {
    let ca = LocalCa::from_pem(
        &std::fs::read_to_string(&c.ca_cert).unwrap(),
        &std::fs::read_to_string(&c.ca_key).unwrap(),
    )
    .unwrap();
    let secrets = SecretManager::new(Arc::new(ca), Duration::from_secs(3600));
    let cert = secrets
        .fetch(&Identity::new("cluster.local", "default", "client"))
        .await
        .unwrap();
    cert.client_config(vec![Identity::new("cluster.local", "default", "echo")])
        .unwrap()
}
