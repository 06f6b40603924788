//! Two ztunnels fed by the control plane from a manifest directory, on
//! the e2e network-namespace test bed: nodes `a` and `b`, the control plane
//! on node `cp`. Needs root and the workspace's `ztunnel` binary (built by
//! `cargo build --workspace`, which `scripts/test.sh` runs first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use e2e::mesh::http_get;
use e2e::{ChildGuard, Node, Pod, Testbed};
use ztunnel::identity::LocalCa;

const VIP: &str = "10.96.0.10";
const ECHO_PORT: u16 = 8080;
const SOCKS: &str = "127.0.0.1:15080";

fn ztunnel_bin() -> Option<PathBuf> {
    // target/<profile>/deps/<test> -> target/<profile>/ztunnel
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("ztunnel");
    p.exists().then_some(p)
}

struct Mesh {
    tb: Testbed,
    a: Node,
    b: Node,
    cp: Node,
    client: Pod,
    other: Pod,
    late: Pod,
    echo: Pod,
    dir: PathBuf,
    xds: Option<ChildGuard>,
    za: Option<ChildGuard>,
    zb: Option<ChildGuard>,
}

fn pod_yaml(p: &Pod, node: &str, sa: &str, labels: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {{{labels}}}
  # Enrolled: reached over HBONE.
  annotations: {{ambient.istio.io/redirection: enabled}}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers: [{{name: app, image: app}}]
status:
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
"#,
        name = p.name(),
        ip = p.ipv4()
    )
}

const BASE: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
"#;

fn deny(principal: &str) -> String {
    format!(
        r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["{principal}"]}}}}]}}]
"#
    )
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn spawn_echo(netns: &str, addr: SocketAddr) {
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

fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = vec![0u8; msg.len()];
    s.write_all(msg).is_ok() && s.read_exact(&mut got).is_ok() && got == msg
}

fn socks(netns: &str, src: IpAddr, dst: SocketAddr) -> Option<TcpStream> {
    let mut s = e2e::tcp_connect_from_in(netns, src, SOCKS.parse().unwrap()).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(&[5, 1, 0]).ok()?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).ok()?;
    let mut req = vec![5, 1, 0, 1];
    match dst {
        SocketAddr::V4(a) => req.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(_) => return None,
    }
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).ok()?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).ok()?;
    (rep[1] == 0).then_some(s)
}

impl Mesh {
    fn start(cert_ttl: &str) -> Option<Mesh> {
        if !e2e::require_root() {
            return None;
        }
        let Some(zbin) = ztunnel_bin() else {
            eprintln!("skipping: no ztunnel binary next to the tests (cargo build --workspace)");
            return None;
        };
        let tb = Testbed::new().expect("test bed");
        let a = tb.add_node("a").unwrap();
        let b = tb.add_node("b").unwrap();
        let cp = tb.add_node("cp").unwrap();
        let client = tb.add_host_pod(&a, "client").unwrap();
        let other = tb.add_host_pod(&a, "other").unwrap();
        let late = tb.add_host_pod(&a, "late").unwrap();
        let echo = tb.add_host_pod(&b, "echo").unwrap();
        spawn_echo(
            b.netns(),
            SocketAddr::new(IpAddr::V4(echo.ipv4()), ECHO_PORT),
        );
        let dir = tb.dir().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        LocalCa::generate("cluster.local")
            .unwrap()
            .write(&tb.dir().join("ca.crt"), &tb.dir().join("ca.key"))
            .unwrap();
        std::fs::write(tb.dir().join("tokens"), "a tok-a\nb tok-b\n").unwrap();
        std::fs::write(tb.dir().join("tok-a"), "tok-a\n").unwrap();
        std::fs::write(tb.dir().join("tok-b"), "tok-b\n").unwrap();
        let mut m = Mesh {
            tb,
            a,
            b,
            cp,
            client,
            other,
            late,
            echo,
            dir,
            xds: None,
            za: None,
            zb: None,
        };
        m.write_manifests("app: echo", "", false);
        m.start_xds();
        let (a, b) = (m.a.clone(), m.b.clone());
        m.za = Some(m.start_ztunnel(&zbin, &a, cert_ttl));
        m.zb = Some(m.start_ztunnel(&zbin, &b, cert_ttl));
        Some(m)
    }

    fn write_manifests(&self, echo_labels: &str, policy: &str, with_late: bool) {
        let mut s = BASE.to_string();
        s += &pod_yaml(&self.client, "a", "client", "app: client");
        s += &pod_yaml(&self.other, "a", "other", "app: other");
        s += &pod_yaml(&self.echo, "b", "echo", echo_labels);
        if with_late {
            s += &pod_yaml(&self.late, "a", "late", "app: late");
        }
        s += policy;
        write(&self.dir.join("mesh.yaml"), &s);
    }

    fn start_xds(&mut self) {
        let d = self.tb.dir();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xds"));
        cmd.arg("--manifests")
            .arg(&self.dir)
            .args([
                "--listen",
                "0.0.0.0:15012",
                "--metrics-addr",
                "127.0.0.1:15014",
            ])
            .arg("--tokens")
            .arg(d.join("tokens"))
            .arg("--ca-cert")
            .arg(d.join("ca.crt"))
            .arg("--ca-key")
            .arg(d.join("ca.key"))
            .args(["--poll-interval", "50ms"])
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(self.cp.netns(), cmd).expect("spawn xds");
        let ns = self.cp.netns().to_string();
        wait_until(Duration::from_secs(15), "xds metrics", || {
            http_get(&ns, "127.0.0.1:15014".parse().unwrap(), "/metrics").is_ok()
        });
        self.xds = Some(child);
    }

    fn start_ztunnel(&self, bin: &Path, node: &Node, cert_ttl: &str) -> ChildGuard {
        let d = self.tb.dir();
        let addr = format!("https://{}:15012", self.cp.ipv4());
        let mut cmd = Command::new(bin);
        cmd.args(["--node", node.name()])
            .args(["--xds-address", &addr, "--ca-address", &addr])
            .arg("--xds-root-cert")
            .arg(d.join("ca.crt"))
            .arg("--xds-token-file")
            .arg(d.join(format!("tok-{}", node.name())))
            .args(["--socks5-addr", SOCKS, "--cert-ttl", cert_ttl])
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(node.netns(), cmd).expect("spawn ztunnel");
        let ns = node.netns().to_string();
        wait_until(
            Duration::from_secs(20),
            "ztunnel readiness (first xDS sync)",
            || {
                http_get(&ns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                    .map(|(code, _)| code == 200)
                    .unwrap_or(false)
            },
        );
        child
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(VIP.parse().unwrap(), 80)
    }

    /// A fresh connection from `pod` (on node a) to the VIP echoes.
    fn works(&self, pod: &Pod) -> bool {
        socks(self.a.netns(), IpAddr::V4(pod.ipv4()), self.vip())
            .is_some_and(|mut s| roundtrip(&mut s, b"hello"))
    }

    fn xds_debug(&self, path: &str) -> String {
        http_get(self.cp.netns(), "127.0.0.1:15014".parse().unwrap(), path)
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    fn config_dump(&self, node: &Node) -> serde_json::Value {
        let (_, body) = http_get(
            node.netns(),
            "127.0.0.1:15000".parse().unwrap(),
            "/config_dump",
        )
        .unwrap();
        serde_json::from_str(&body).unwrap()
    }
}

const T: Duration = Duration::from_secs(20);

#[test]
fn ztunnels_follow_the_manifest_directory() {
    let Some(mut m) = Mesh::start("24h") else {
        return;
    };
    // Traffic between pods on two nodes, with workload certificates from
    // the control plane's CA.
    assert!(m.works(&m.client), "client -> echo over the mesh");
    let dump = m.config_dump(&m.a);
    assert!(dump["workloads"].as_array().unwrap().len() >= 3, "{dump}");
    let certs = dump["certificates"].to_string();
    assert!(certs.contains("/ns/demo/sa/client"), "{certs}");

    // A pod not in the manifests is unknown; adding it reaches node a.
    assert!(!m.works(&m.late));
    m.write_manifests("app: echo", "", true);
    wait_until(T, "the new pod", || m.works(&m.late));

    // A new DENY policy reaches node b and changes behaviour.
    m.write_manifests("app: echo", &deny("cluster.local/ns/demo/sa/client"), true);
    wait_until(T, "the DENY policy", || !m.works(&m.client));
    assert!(m.works(&m.other), "others are still allowed");

    // A changed label: echo leaves the service's selector, so the VIP has
    // no endpoint; then it comes back.
    m.write_manifests("app: moved", "", true);
    wait_until(T, "the label change", || !m.works(&m.other));
    m.write_manifests("app: echo", "", true);
    wait_until(T, "the label restored", || m.works(&m.client));

    // A malformed manifest is reported and skipped; the rest keeps working.
    write(
        &m.dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: demo}\nspec: {containers: []}\nstatus: {podIP: nope}\n",
    );
    wait_until(T, "the error report", || {
        let e = m.xds_debug("/debug/errors");
        e.contains("broken.yaml") && e.contains("status.podIP")
    });
    assert!(m.works(&m.client));

    // The control plane stops: the data plane keeps its last config.
    let za_pid = m.za.as_ref().unwrap().pid();
    drop(m.xds.take());
    thread::sleep(Duration::from_secs(1));
    assert!(
        m.works(&m.client),
        "data plane works without the control plane"
    );
    // A change made meanwhile arrives once it is back, without restarting
    // ztunnel.
    m.write_manifests("app: echo", &deny("cluster.local/ns/demo/sa/client"), true);
    m.start_xds();
    wait_until(T, "the resync after restart", || !m.works(&m.client));
    assert!(m.works(&m.other));
    assert_eq!(m.za.as_ref().unwrap().pid(), za_pid);
    assert!(m.za.as_ref().unwrap().is_running() && m.zb.as_ref().unwrap().is_running());
}

#[test]
fn certificates_from_the_control_plane_rotate_under_traffic() {
    let Some(m) = Mesh::start("4s") else {
        return;
    };
    let serial = || -> Option<String> {
        let d = m.config_dump(&m.a);
        d["certificates"].as_array()?.iter().find(|x| {
            x["identity"]
                .as_str()
                .is_some_and(|i| i.ends_with("/sa/client"))
        })?["serial"]
            .as_str()
            .map(String::from)
    };
    let mut long = socks(m.a.netns(), IpAddr::V4(m.client.ipv4()), m.vip()).unwrap();
    assert!(roundtrip(&mut long, b"before rotation"));
    wait_until(T, "a first certificate", || serial().is_some());
    let first = serial().unwrap();
    wait_until(T, "rotation", || serial().is_some_and(|s| s != first));
    // Past the first certificate's expiry the old connection still flows,
    // and new connections work with the new certificate.
    thread::sleep(Duration::from_secs(3));
    assert!(roundtrip(&mut long, b"after rotation"));
    let mut fresh = socks(m.a.netns(), IpAddr::V4(m.client.ipv4()), m.vip()).unwrap();
    assert!(roundtrip(&mut fresh, b"new connection"));
    // The new tunnel could not reuse the old certificate's HBONE connection.
    let pooled = m.config_dump(&m.a)["hbonePoolConnections"]
        .as_u64()
        .unwrap();
    assert!(
        pooled >= 2,
        "new tunnel reused the old certificate's connection"
    );
    assert!(m.works(&m.other));
}

/// The waypoint's configuration: TCP to the echo VIP goes to the echo pod
/// through node b's ztunnel, accepting only echo's identity.
fn waypoint_yaml(echo_ip: IpAddr) -> String {
    format!(
        r#"listeners:
  - name: waypoint
    filter_chains:
      - name: echo
        filter_chain_match: {{destination_port: 80, prefix_ranges: ["{VIP}/32"]}}
        tcp_proxy: {{cluster: echo}}
clusters:
  - name: echo
    load_assignment:
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: "{echo_ip}", port_value: {ECHO_PORT}}}}}}}
              metadata: {{identity: "spiffe://cluster.local/ns/demo/sa/echo", workload: echo, namespace: demo}}
"#
    )
}

/// The waypoint `wp` (Gateway API, class `istio-waypoint`), its service and
/// its replicas, as Istio would have them in the cluster.
fn waypoint_manifests(replicas: &[(&Pod, &str)]) -> String {
    let mut s = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: demo}
spec:
  selector: {gateway.networking.k8s.io/gateway-name: wp}
  clusterIP: 10.96.0.20
  ports: [{name: mesh, port: 15008}]
"#
    .to_string();
    for (p, node) in replicas {
        s += &pod_yaml(
            p,
            node,
            "waypoint",
            "gateway.networking.k8s.io/gateway-name: wp",
        );
    }
    s
}

/// Connections node a's ztunnel reported to `workload`.
fn opened_to(m: &Mesh, workload: &str) -> u64 {
    let (_, metrics) =
        http_get(m.a.netns(), "127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!("destination_workload=\"{workload}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn labelling_a_service_sends_its_traffic_through_the_waypoint() {
    let Some(m) = Mesh::start("24h") else {
        return;
    };
    let Some(wbin) = ztunnel_bin()
        .map(|z| z.with_file_name("waypoint"))
        .filter(|p| p.exists())
    else {
        eprintln!("skipping: no waypoint binary next to the tests (cargo build --workspace)");
        return;
    };
    // Two waypoint replicas, on nodes of their own.
    let w1 = m.tb.add_node("w1").unwrap();
    let w2 = m.tb.add_node("w2").unwrap();
    let wp1 = m.tb.add_host_pod(&w1, "wp-1").unwrap();
    let wp2 = m.tb.add_host_pod(&w2, "wp-2").unwrap();
    let config = m.tb.dir().join("waypoint.yaml");
    std::fs::write(&config, waypoint_yaml(IpAddr::V4(m.echo.ipv4()))).unwrap();
    let mut guards = Vec::new();
    for (node, pod) in [(&w1, &wp1), (&w2, &wp2)] {
        let mut cmd = Command::new(&wbin);
        cmd.arg("--config")
            .arg(&config)
            .args(["--identity", "spiffe://cluster.local/ns/demo/sa/waypoint"])
            .arg("--ca-cert")
            .arg(m.tb.dir().join("ca.crt"))
            .arg("--ca-key")
            .arg(m.tb.dir().join("ca.key"))
            .arg("--hbone-addr")
            .arg(format!("{}:15008", pod.ipv4()))
            .args(["--socket-mark", "0"])
            .env("RUST_LOG", "info");
        guards.push(m.tb.spawn(node.netns(), cmd).expect("spawn waypoint"));
        let ns = node.netns().to_string();
        wait_until(T, "waypoint readiness", || {
            http_get(&ns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
        });
    }
    let manifests = |svc_labels: &str| {
        let mut s = BASE.replace(
            "metadata: {name: echo, namespace: demo}",
            &format!("metadata: {{name: echo, namespace: demo, labels: {{{svc_labels}}}}}"),
        );
        s += &pod_yaml(&m.client, "a", "client", "app: client");
        s += &pod_yaml(&m.echo, "b", "echo", "app: echo");
        s += &waypoint_manifests(&[(&wp1, "w1"), (&wp2, "w2")]);
        s
    };

    // The waypoint exists, but nothing opted in: straight to echo at L4.
    write(&m.dir.join("mesh.yaml"), &manifests(""));
    wait_until(T, "the waypoint's workloads", || {
        m.config_dump(&m.a)["workloads"]
            .to_string()
            .contains("wp-2")
    });
    for _ in 0..5 {
        assert!(m.works(&m.client));
    }
    wait_until(T, "direct metrics", || opened_to(&m, "echo") >= 5);
    assert_eq!(opened_to(&m, "wp-1") + opened_to(&m, "wp-2"), 0);

    // Labelling the service in the manifest: through the waypoint, with no
    // restart of anything.
    write(
        &m.dir.join("mesh.yaml"),
        &manifests("istio.io/use-waypoint: wp"),
    );
    wait_until(T, "traffic through the waypoint", || {
        m.works(&m.client) && opened_to(&m, "wp-1") + opened_to(&m, "wp-2") > 0
    });
    for _ in 0..30 {
        assert!(m.works(&m.client), "through the waypoint");
    }
    wait_until(T, "both replicas take traffic", || {
        opened_to(&m, "wp-1") > 0 && opened_to(&m, "wp-2") > 0
    });
    drop(guards);
}
