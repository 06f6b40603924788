//! In-pod eBPF capture, end to end: pods in their own netns and cgroup,
//! enrolled by the CNI plugin invoked the way a container runtime invokes
//! it, traffic from unmodified clients (curl in the pod, plain `TcpStream`),
//! over IPv4 and IPv6, through a ztunnel `kill -9` and restart, and after
//! un-enrolling.
//!
//! The servers answer with the peer address they see, which tells the path:
//! a connection ztunnel delivered comes from the pod's own address (ztunnel
//! connects from inside the pod's netns), a direct one from the client's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{counter, wait_until, write_atomic};
use e2e::{ChildGuard, Node, Pod, Testbed};
use ztunnel::identity::LocalCa;

const PORT: u16 = 8080;
const MARKER: &str = "inpod-secret-marker-5c1e";

/// Per-node bits ztunnel keeps for in-pod mode.
struct NodeDirs {
    socket: PathBuf,
    bpf: PathBuf,
    state: PathBuf,
}

struct Bed {
    tb: Testbed,
    a: Node,
    b: Node,
    /// Ambient (namespace `default`), node a.
    client: Pod,
    /// Ambient, node b; runs the server.
    server: Pod,
    /// Not in the mesh, node a, denied by the server's policy.
    blocked: Pod,
    /// Not in the mesh, node b; runs the same server.
    plain: Pod,
    /// Not in the mesh, node a; its addresses are exempt from capture (as
    /// the kubelet's probe source would be).
    prober: Pod,
    ca: (PathBuf, PathBuf),
    labels: PathBuf,
    za: Option<ChildGuard>,
    zb: Option<ChildGuard>,
}

impl Bed {
    fn dirs(&self, node: &Node) -> NodeDirs {
        let base = self.tb.dir().join(format!("inpod-{}", node.name()));
        NodeDirs {
            socket: base.join("ztunnel.sock"),
            bpf: self.tb.bpf_dir(&format!("inpod-{}", node.name())),
            state: base.join("pods"),
        }
    }

    fn start_ztunnel(&self, node: &Node) -> ChildGuard {
        let d = self.dirs(node);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
        cmd.args(["--node", node.name()])
            .arg("--local-state")
            .arg(self.tb.dir().join("state.yaml"))
            .arg("--ca-cert")
            .arg(&self.ca.0)
            .arg("--ca-key")
            .arg(&self.ca.1)
            .arg("--inpod-socket")
            .arg(&d.socket)
            .arg("--inpod-bpf-dir")
            .arg(&d.bpf)
            .arg("--inpod-state-dir")
            .arg(&d.state)
            .arg("--inpod-exempt")
            .arg(format!("{}/32", self.prober.ipv4()))
            .arg("--inpod-exempt")
            .arg(self.prober.ipv6().to_string())
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(node.netns(), cmd).expect("spawn ztunnel");
        let ns = node.netns().to_string();
        wait_until(Duration::from_secs(15), "ztunnel readiness", || {
            e2e::mesh::http_get(&ns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
        });
        child
    }

    /// Runs the CNI plugin as a runtime does; returns its stdout.
    fn cni(&self, command: &str, pod: &Pod, namespace: &str) -> String {
        let node = if pod.node() == self.a.name() {
            &self.a
        } else {
            &self.b
        };
        let prev = prev_result(pod);
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "ztunnel-cni",
            "ztunnelSocket": self.dirs(node).socket,
            "labelsFile": self.labels,
            "capabilities": {"cgroupPath": true},
            "runtimeConfig": {"cgroupPath": pod.cgroup().unwrap()},
            "prevResult": prev,
        });
        let mut child = Command::new(cni_binary())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name()))
            .env("CNI_NETNS", format!("/run/netns/{}", pod.netns()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}",
                    pod.name(),
                    pod.name(),
                    uid(pod)
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ztunnel-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ztunnel-cni {command} {}: {stdout} {}",
            pod.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        if command == "ADD" {
            let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(got, prev, "ADD passes prevResult through unchanged");
        }
        stdout
    }

    fn pinned(&self, node: &Node) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dirs(node).bpf)
            .map(|es| {
                es.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn records(&self, node: &Node) -> usize {
        std::fs::read_dir(self.dirs(node).state)
            .map(|es| es.count())
            .unwrap_or(0)
    }
}

fn cni_binary() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"))
        .parent()
        .unwrap()
        .join("ztunnel-cni");
    assert!(
        p.is_file(),
        "{} missing: build it first (`cargo build --workspace --all-targets`, as scripts/test.sh does)",
        p.display()
    );
    p
}

fn uid(pod: &Pod) -> String {
    format!("uid-{}", pod.name())
}

/// What the primary CNI (ptp) would have returned for the pod.
fn prev_result(pod: &Pod) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": format!("/run/netns/{}", pod.netns())}],
        "ips": [
            {"address": format!("{}/32", pod.ipv4()), "interface": 0},
            {"address": format!("{}/128", pod.ipv6()), "interface": 0}
        ]
    })
}

/// An HTTP/1.0 server that answers `peer=<address it sees> path=<path>`.
fn spawn_whoami(netns: &str) {
    let listener = e2e::tcp_listen_in(netns, "[::]:8080".parse().unwrap()).expect("listen");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let path = req.split_whitespace().nth(1).unwrap_or("?").to_string();
                let peer = conn.peer_addr().map(|a| a.ip().to_canonical());
                let body = match peer {
                    Ok(p) => format!("peer={p} path={path}"),
                    Err(_) => "peer=? path=?".into(),
                };
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
}

fn url(ip: IpAddr, path: &str) -> String {
    match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{PORT}{path}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{PORT}{path}"),
    }
}

/// curl from inside the pod (its netns and cgroup): the body, or the log.
fn curl(tb: &Testbed, pod: &Pod, ip: IpAddr, path: &str) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", &url(ip, path)]);
    let c = tb.spawn_in_pod(pod, cmd).expect("spawn curl");
    match c.wait_success(Duration::from_secs(20)) {
        Ok(()) => Ok(c.log()),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// A plain TcpStream from the test process inside `pod`'s netns (not its
/// cgroup: this is a client outside the mesh). `None` if refused/closed.
fn tcp_get(pod: &Pod, ip: IpAddr, path: &str) -> Option<String> {
    let mut s: TcpStream = e2e::tcp_connect_in(pod.netns(), SocketAddr::new(ip, PORT)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let body = out.split("\r\n\r\n").nth(1)?.to_string();
    (!body.is_empty()).then_some(body)
}

/// True if `pcap` holds an IP header `src -> dst` followed by a TCP header
/// to `port` (no IP options).
fn tcp_to_port(pcap: &[u8], src: &[u8], dst: &[u8], port: u16) -> bool {
    let mut pat = src.to_vec();
    pat.extend_from_slice(dst);
    let n = pat.len();
    pcap.windows(n + 4)
        .any(|w| w[..n] == pat[..] && w[n + 2..n + 4] == port.to_be_bytes())
}

/// Sends `keep` for each uid, then `snapshot_sent`.
fn resync(socket: &Path, keep: &[String]) {
    use ztunnel::inpod::zds::{workload_request::Payload, Client, KeepWorkload, SnapshotSent};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(socket).await.unwrap();
        for uid in keep {
            c.request(Payload::Keep(KeepWorkload { uid: uid.clone() }), None)
                .await
                .unwrap();
        }
        c.request(Payload::SnapshotSent(SnapshotSent {}), None)
            .await
            .unwrap();
    });
}

fn state_yaml(bed: &Bed) -> String {
    format!(
        r#"workloads:
  - name: client
    namespace: default
    serviceAccount: client
    node: a
    addresses: [{c4}, "{c6}"]
  - name: server
    namespace: default
    serviceAccount: server
    node: b
    addresses: [{s4}, "{s6}"]
    labels: {{app: server}}
  - name: plain
    namespace: legacy
    node: b
    protocol: TCP
    addresses: [{p4}, "{p6}"]
policies:
  - name: no-blocked
    namespace: default
    scope: WorkloadSelector
    selector: {{app: server}}
    action: Deny
    rules:
      - clauses:
          - matches:
              - sourceIps: ["{b4}/32", "{b6}/128"]
"#,
        c4 = bed.client.ipv4(),
        c6 = bed.client.ipv6(),
        s4 = bed.server.ipv4(),
        s6 = bed.server.ipv6(),
        p4 = bed.plain.ipv4(),
        p6 = bed.plain.ipv6(),
        b4 = bed.blocked.ipv4(),
        b6 = bed.blocked.ipv6(),
    )
}

#[test]
fn ambient_pods_with_ebpf_capture() {
    if !common::root_or_skip() {
        return;
    }
    let tb = Testbed::new().expect("test bed");
    let a = tb.add_node("a").unwrap();
    let b = tb.add_node("b").unwrap();
    let client = tb.add_netns_pod(&a, "client").unwrap();
    let outsider = tb.add_netns_pod(&a, "outsider").unwrap();
    let blocked = tb.add_netns_pod(&a, "blocked").unwrap();
    let server = tb.add_netns_pod(&b, "server").unwrap();
    let plain = tb.add_netns_pod(&b, "plain").unwrap();
    let prober = tb.add_netns_pod(&a, "prober").unwrap();
    let ca = (tb.dir().join("ca.crt"), tb.dir().join("ca.key"));
    LocalCa::generate("cluster.local")
        .unwrap()
        .write(&ca.0, &ca.1)
        .unwrap();
    let labels = tb.dir().join("labels.json");
    std::fs::write(
        &labels,
        serde_json::json!({
            "namespaces": {"default": {"istio.io/dataplane-mode": "ambient"}},
            "pods": {}
        })
        .to_string(),
    )
    .unwrap();
    let mut bed = Bed {
        tb,
        a: a.clone(),
        b: b.clone(),
        client: client.clone(),
        server: server.clone(),
        blocked: blocked.clone(),
        plain: plain.clone(),
        prober: prober.clone(),
        ca,
        labels,
        za: None,
        zb: None,
    };
    write_atomic(&bed.tb.dir().join("state.yaml"), &state_yaml(&bed));
    spawn_whoami(server.netns());
    spawn_whoami(plain.netns());
    bed.za = Some(bed.start_ztunnel(&a));
    bed.zb = Some(bed.start_ztunnel(&b));

    // Before enrolling: everything is direct.
    let s4 = IpAddr::V4(server.ipv4());
    let s6 = IpAddr::V6(server.ipv6());
    let body = curl(&bed.tb, &client, s4, "/").unwrap();
    assert!(body.contains(&format!("peer={}", client.ipv4())), "{body}");

    // Enroll through the CNI plugin. `legacy` pods are not ambient: ADD
    // passes their prevResult through and enrolls nothing.
    bed.cni("ADD", &client, "default");
    bed.cni("ADD", &server, "default");
    bed.cni("ADD", &outsider, "legacy");
    assert_eq!(bed.pinned(&a), vec![uid(&client)]);
    assert_eq!(bed.pinned(&b), vec![uid(&server)]);
    // ADD again is harmless (runtimes retry).
    bed.cni("ADD", &client, "default");

    // Enrolled -> enrolled on another node: HBONE between the ztunnels, the
    // node link shows no payload, the app sees ztunnel's in-pod delivery.
    let cap = bed.tb.capture(a.netns(), "eth0").unwrap();
    for ip in [s4, s6] {
        let body = curl(&bed.tb, &client, ip, &format!("/{MARKER}")).unwrap_or_else(|e| {
            panic!(
                "curl {ip}: {e}\nza: {}\nzb: {}",
                bed.za.as_ref().unwrap().log(),
                bed.zb.as_ref().unwrap().log()
            )
        });
        assert!(body.contains(&format!("peer={ip}")), "{ip}: {body}");
        assert!(body.contains(MARKER), "{body}");
    }
    let pcap = cap.stop().unwrap();
    assert!(!pcap.is_empty());
    assert!(
        !e2e::contains(&pcap, MARKER.as_bytes()),
        "payload in clear on the node link"
    );
    // HBONE left from the client pod's own address, as in Istio's in-pod
    // mode (IP header: source then destination; then the TCP ports).
    for (src, dst) in [
        (
            client.ipv4().octets().to_vec(),
            server.ipv4().octets().to_vec(),
        ),
        (
            client.ipv6().octets().to_vec(),
            server.ipv6().octets().to_vec(),
        ),
    ] {
        assert!(
            tcp_to_port(&pcap, &src, &dst, 15008),
            "no HBONE packet from the client pod's address {src:?}"
        );
    }
    let mb = e2e::mesh::http_get(b.netns(), "127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap()
        .1;
    assert!(
        counter(
            &mb,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "mutual_tls",
                "source_workload=\"client\""
            ]
        ) >= 2,
        "{mb}"
    );

    // Not enrolled -> enrolled: captured on the server pod's 15006, L4
    // policy applies (blocked is denied by source address).
    for ip in [s4, s6] {
        let body = tcp_get(&outsider, ip, "/").expect("outsider reaches server");
        assert!(body.contains(&format!("peer={ip}")), "{ip}: {body}");
        assert_eq!(tcp_get(&blocked, ip, "/"), None, "{ip}: blocked is denied");
    }
    // An exempt source (probes) reaches the enrolled pod untouched.
    for (ip, me) in [
        (s4, IpAddr::V4(prober.ipv4())),
        (s6, IpAddr::V6(prober.ipv6())),
    ] {
        let body = tcp_get(&prober, ip, "/").unwrap();
        assert!(body.contains(&format!("peer={me}")), "{body}");
    }
    // Not enrolled -> not enrolled: direct.
    for (ip, me) in [
        (IpAddr::V4(plain.ipv4()), IpAddr::V4(outsider.ipv4())),
        (IpAddr::V6(plain.ipv6()), IpAddr::V6(outsider.ipv6())),
    ] {
        let body = tcp_get(&outsider, ip, "/").unwrap();
        assert!(body.contains(&format!("peer={me}")), "{body}");
    }

    // kill -9 both ztunnels; capture stays pinned (and fails closed), a
    // leftover pin dir with no pod is cleaned, and the restarted ztunnels
    // serve the enrolled pods again with no CNI call.
    bed.za.take().unwrap().kill9().unwrap();
    bed.zb.take().unwrap().kill9().unwrap();
    assert_eq!(bed.pinned(&a), vec![uid(&client)]);
    assert!(
        curl(&bed.tb, &client, s4, "/").is_err(),
        "no bypass while ztunnel is down"
    );
    std::fs::create_dir(bed.dirs(&b).bpf.join("stale-pod")).unwrap();
    bed.za = Some(bed.start_ztunnel(&a));
    bed.zb = Some(bed.start_ztunnel(&b));
    assert_eq!(bed.pinned(&a), vec![uid(&client)]);
    assert_eq!(bed.pinned(&b), vec![uid(&server)]);
    for ip in [s4, s6] {
        let body = curl(&bed.tb, &client, ip, "/again")
            .unwrap_or_else(|e| panic!("{ip} after restart: {e}"));
        assert!(body.contains(&format!("peer={ip}")), "{body}");
        let body = tcp_get(&outsider, ip, "/").unwrap();
        assert!(body.contains(&format!("peer={ip}")), "{body}");
    }

    // A resync from the agent (ZDS snapshot): node b keeps the server;
    // node a is told of no pod at all, so it drops the client.
    resync(&bed.dirs(&b).socket, &[uid(&server)]);
    resync(&bed.dirs(&a).socket, &[]);
    assert_eq!(bed.pinned(&b), vec![uid(&server)]);
    assert!(bed.pinned(&a).is_empty());
    assert_eq!(bed.records(&a), 0);

    // CHECK: the runtime asking whether the pod is still set up.
    bed.cni("CHECK", &server, "default");

    // Un-enroll: everything added is gone and traffic is direct again.
    bed.cni("DEL", &client, "default");
    bed.cni("DEL", &server, "default");
    bed.cni("DEL", &server, "default"); // DEL is idempotent
    assert!(bed.pinned(&a).is_empty() && bed.pinned(&b).is_empty());
    assert_eq!(bed.records(&a) + bed.records(&b), 0);
    let body = curl(&bed.tb, &client, s4, "/").unwrap();
    assert!(body.contains(&format!("peer={}", client.ipv4())), "{body}");
    let body = curl(&bed.tb, &client, s6, "/").unwrap();
    assert!(body.contains(&format!("peer={}", client.ipv6())), "{body}");
    let body = tcp_get(&blocked, s4, "/").unwrap();
    assert!(body.contains(&format!("peer={}", blocked.ipv4())), "{body}");
}
