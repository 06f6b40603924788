//! Waypoints end to end on the multi-node test bed: one mesh (2 nodes, the
//! control plane on a manifest directory, a ztunnel per node, pods enrolled
//! through the CNI plugin) with a waypoint of two replicas (the real
//! `waypoint` binary, configured over xDS from the HTTPRoutes and policies
//! written as manifests), and the behaviour a user relies on, one named
//! check each:
//!
//! - a namespace without a waypoint is reached directly, at L4;
//! - labelling it `istio.io/use-waypoint` sends its traffic through the
//!   waypoint, with no restart of anything;
//! - an HTTPRoute splitting 80/20 between two versions gives about 80/20;
//! - header-based routing, a path rewrite, a request timeout, a backend
//!   request timeout, and a retry that turns a flaky backend's 503 into a
//!   200, and an L7 DENY on a path (403, never reaching a backend);
//! - gRPC calls routed by method;
//! - raw TCP to a Service port declared `appProtocol: tcp` passes through
//!   the waypoint (its tcp_proxy chain) and echoes; the L7 DENY, which a
//!   TCP chain applies without its path, refuses it;
//! - both waypoint replicas take traffic, and killing one loses no new
//!   requests (the ztunnels try the other replica).
//!
//! Needs root and the mesh's binaries (`cargo build --workspace`, which
//! `scripts/test.sh` runs first). Without root it prints why and passes.

// Helpers outside #[test] fns aren't covered by clippy.toml's
// allow-unwrap-in-tests; panicking is how a test helper fails.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use e2e::apps::grpc::{GrpcServer, ECHO_PATH, HELLO_PATH};
use e2e::apps::http::{echoed_path, HttpServer};
use e2e::apps::tcp_echo::TcpEcho;
use e2e::cluster::yaml::ServicePort;
use e2e::cluster::{
    counter, wait_for, App, Cluster, ClusterOptions, Reply, WaypointReplica, AMBIENT_LABEL,
    USE_WAYPOINT_LABEL,
};

const NS: &str = "app";
const HTTP_PORT: u16 = 80;
const APP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;
const TCP_PORT: u16 = 9000;
const TIMEOUT_MS: u64 = 500;

/// Runs named checks in order, printing each result; the test fails at
/// the end listing every check that failed.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
        match f() {
            Ok(what) => eprintln!("check ok: {name}: {what}"),
            Err(e) => {
                eprintln!("check FAILED: {name}: {e:#}");
                self.failed.push(format!("{name}: {e:#}"));
            }
        }
    }
}

struct Mesh {
    c: Cluster,
    client: App,
    v1: App,
    v2: App,
    vip: IpAddr,
    replicas: Vec<WaypointReplica>,
    http: Vec<HttpServer>,
    _grpc: Vec<GrpcServer>,
    _tcp: Vec<TcpEcho>,
}

impl Mesh {
    fn url(&self, path: &str) -> String {
        format!("{}:{HTTP_PORT}{path}", self.vip)
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.c.http(&self.client, &self.url(path), headers)
    }

    /// `istio_requests_total` of each replica.
    fn waypoint_requests(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| {
                r.metrics()
                    .map(|m| counter(&m, "istio_requests_total", &["reporter=\"waypoint\""]))
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Pids of everything that must not restart.
    fn pids(&self) -> Vec<u32> {
        self.c
            .xds()
            .map(|x| x.pid())
            .into_iter()
            .chain(self.c.ztunnels().iter().map(|(_, z)| z.pid()))
            .chain(self.replicas.iter().map(|r| r.child.pid()))
            .collect()
    }

    fn all_running(&self) -> bool {
        self.c.xds().is_some_and(|x| x.is_running())
            && self.c.ztunnels().iter().all(|(_, z)| z.is_running())
            && self.replicas.iter().all(|r| r.child.is_running())
    }

    /// The replicas' access-log lines for opaque TCP connections to the
    /// echo Service's TCP port.
    fn waypoint_tcp_log_lines(&self) -> usize {
        let cluster = format!("outbound|{TCP_PORT}||echo.{NS}.");
        self.replicas
            .iter()
            .map(|r| {
                r.log()
                    .lines()
                    .filter(|l| l.contains("tcp connection") && l.contains(&cluster))
                    .count()
            })
            .sum()
    }

    /// An `istio_tcp_*` counter for the echo Service, summed over replicas.
    fn waypoint_tcp(&self, name: &str) -> u64 {
        let service = format!("destination_service=\"echo.{NS}.svc.cluster.local\"");
        self.replicas
            .iter()
            .map(|r| {
                r.metrics()
                    .map(|m| counter(&m, name, &["reporter=\"waypoint\"", &service]))
                    .unwrap_or(0)
            })
            .sum()
    }

    fn server(&self, a: &App) -> &HttpServer {
        self.http.iter().find(|s| s.served_by() == a.key()).unwrap()
    }
}

fn start() -> Result<Mesh> {
    let c = Cluster::start(ClusterOptions { nodes: 2 }, &|s| eprintln!("setup: {s}"))?;
    let (n1, n2) = (c.node(0).clone(), c.node(1).clone());
    c.namespace(NS, &[(AMBIENT_LABEL, "ambient")])?;
    let client = c.add_pod(&n1, NS, "client", "client", &[("app", "client")])?;
    let v1 = c.add_pod(
        &n2,
        NS,
        "echo-v1",
        "echo",
        &[("app", "echo"), ("version", "v1")],
    )?;
    let v2 = c.add_pod(
        &n1,
        NS,
        "echo-v2",
        "echo",
        &[("app", "echo"), ("version", "v2")],
    )?;
    let ports = [
        ServicePort::new(HTTP_PORT, APP_PORT),
        ServicePort {
            port: GRPC_PORT,
            target_port: GRPC_PORT,
            app_protocol: Some("grpc"),
        },
        // Opaque TCP: the waypoint passes it through (tcp_proxy).
        ServicePort {
            port: TCP_PORT,
            target_port: TCP_PORT,
            app_protocol: Some("tcp"),
        },
    ];
    let vip = c.next_vip();
    c.service(NS, "echo", &[("app", "echo")], vip, &ports)?;
    for (name, version) in [("echo-v1", "v1"), ("echo-v2", "v2")] {
        c.service(
            NS,
            name,
            &[("app", "echo"), ("version", version)],
            c.next_vip(),
            &ports,
        )?;
    }
    // Raw TCP, by pod IP: no Service, so no waypoint ever applies to it.
    let (mut http, mut grpc, mut tcp) = (Vec::new(), Vec::new(), Vec::new());
    for a in [&v1, &v2] {
        http.push(HttpServer::start_for(a, APP_PORT)?);
        grpc.push(GrpcServer::start_for(a, GRPC_PORT)?);
        tcp.push(TcpEcho::start_for(a, TCP_PORT)?);
    }
    for a in [&client, &v1, &v2] {
        ensure!(c.enroll(a)?, "{} was not enrolled", a.key());
    }
    // The waypoint exists from the start; the namespace opts in later.
    c.add_waypoint(NS, "waypoint", c.next_vip())?;
    let replicas = vec![
        c.start_waypoint_replica(&n1, NS, "waypoint", "waypoint-1")?,
        c.start_waypoint_replica(&n2, NS, "waypoint", "waypoint-2")?,
    ];
    Ok(Mesh {
        c,
        client,
        v1,
        v2,
        vip,
        replicas,
        http,
        _grpc: grpc,
        _tcp: tcp,
    })
}

/// The HTTPRoutes under test, on the echo Service's HTTP and gRPC ports.
fn routes() -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: {NS}}}
spec:
  parentRefs: [{{kind: Service, group: "", name: echo, port: {HTTP_PORT}}}]
  rules:
  - matches: [{{headers: [{{name: x-version, value: v2}}]}}]
    backendRefs: [{{name: echo-v2, port: {HTTP_PORT}}}]
  - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}]
    backendRefs: [{{name: echo-v1, port: {HTTP_PORT}}}]
  - matches: [{{path: {{type: PathPrefix, value: /delay}}}}]
    timeouts: {{request: {TIMEOUT_MS}ms}}
    backendRefs: [{{name: echo-v1, port: {HTTP_PORT}}}]
  - backendRefs:
    - {{name: echo-v1, port: {HTTP_PORT}, weight: 80}}
    - {{name: echo-v2, port: {HTTP_PORT}, weight: 20}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-grpc, namespace: {NS}}}
spec:
  parentRefs: [{{kind: Service, group: "", name: echo, port: {GRPC_PORT}}}]
  rules:
  - matches: [{{path: {{type: Exact, value: {HELLO_PATH}}}}}]
    backendRefs: [{{name: echo-v1, port: {GRPC_PORT}}}]
  - matches: [{{path: {{type: Exact, value: {ECHO_PATH}}}}}]
    backendRefs: [{{name: echo-v2, port: {GRPC_PORT}}}]
"#
    )
}

/// A route with a retry on 503 (for `/flaky/...`, which fails each key's
/// first request), and one with a backend request timeout (for `/slow/`),
/// in a file of their own.
fn retry_route() -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-retry, namespace: {NS}}}
spec:
  parentRefs: [{{kind: Service, group: "", name: echo, port: {HTTP_PORT}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /flaky}}}}]
    retry: {{attempts: 2, codes: [503], backoff: 10ms}}
    backendRefs: [{{name: echo-v1, port: {HTTP_PORT}}}]
  - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]
    timeouts: {{backendRequest: {TIMEOUT_MS}ms}}
    backendRefs: [{{name: echo-v1, port: {HTTP_PORT}}}]
"#
    )
}

/// An L7 policy on the waypoint (Istio's `targetRefs` to the Gateway):
/// nobody gets `/admin...`.
fn deny_policy() -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: {NS}}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin*"]}}}}]
"#
    )
}

/// Waits until every replica has the route `name` (as the control plane
/// names translated routes: `<ns>/<route>.<rule>.<match>`).
fn wait_route(m: &Mesh, name: &str) -> Result<()> {
    for r in &m.replicas {
        r.wait_config(
            Duration::from_secs(20),
            &format!("{} to have route {name}", r.app.key()),
            |d| d.to_string().contains(&format!("\"{name}\"")),
        )?;
    }
    Ok(())
}

/// `(v1, v2, others)` among replies, by who served them.
fn tally(m: &Mesh, replies: &[Reply]) -> (u64, u64, Vec<String>) {
    let (mut a, mut b, mut other) = (0, 0, Vec::new());
    for r in replies {
        match (r.code, r.served_by.as_str()) {
            (200, s) if s == m.v1.key() => a += 1,
            (200, s) if s == m.v2.key() => b += 1,
            _ => other.push(r.describe()),
        }
    }
    (a, b, other)
}

#[test]
fn waypoint_routes_and_survives_losing_a_replica() {
    if !e2e::require_root() {
        return;
    }
    e2e::cleanup_on_stop_signal().unwrap();
    let m = start().context("starting the mesh").unwrap();
    let mut checks = Checks::default();
    let pids = m.pids();
    m.c.apply("routes-echo.yaml", &routes()).unwrap();

    checks.run("no waypoint: reached directly at L4", || {
        let before = m.waypoint_requests();
        let replies = m.c.http_many(
            &m.client,
            &(0..10)
                .map(|i| m.url(&format!("/direct/{i}")))
                .collect::<Vec<_>>(),
            &[],
            true,
        );
        let (a, b, other) = tally(&m, &replies);
        ensure!(other.is_empty(), "failed requests: {other:?}");
        let after = m.waypoint_requests();
        ensure!(
            after == before,
            "the waypoint saw requests: {before:?} -> {after:?}"
        );
        // The header route would send everything to v2; direct L4 ignores it.
        let r = m.get("/direct/header", &[("x-version", "v2")]);
        ensure!(r.ok(), "{}", r.describe());
        // Raw TCP to a pod, through both ztunnels.
        let echo =
            m.c.tcp_echo(&m.client, &m.v1.addr(TCP_PORT).to_string(), "ping 1")?;
        ensure!(echo == "ping 1", "TCP echo answered {echo:?}");
        Ok(format!(
            "10 requests answered by v1 {a} / v2 {b}; waypoint requests {after:?}; TCP echo ok"
        ))
    });

    checks.run(
        "labelling the namespace: through the waypoint, no restart",
        || {
            m.c.namespace(
                NS,
                &[(AMBIENT_LABEL, "ambient"), (USE_WAYPOINT_LABEL, "waypoint")],
            )?;
            let before: u64 = m.waypoint_requests().iter().sum();
            wait_for(
                Duration::from_secs(20),
                "a request through the waypoint",
                || {
                    let r = m.get("/labelled", &[]);
                    Ok(r.ok() && m.waypoint_requests().iter().sum::<u64>() > before)
                },
            )?;
            wait_route(&m, "app/echo.3.0")?;
            ensure!(m.pids() == pids, "pids changed: {pids:?} -> {:?}", m.pids());
            ensure!(m.all_running(), "a process exited");
            Ok(format!(
                "waypoint requests {:?}; pids unchanged {pids:?}",
                m.waypoint_requests()
            ))
        },
    );

    checks.run("opaque TCP (appProtocol: tcp) through the waypoint", || {
        let lines = m.waypoint_tcp_log_lines();
        let closed = m.waypoint_tcp("istio_tcp_connections_closed_total");
        let received = m.waypoint_tcp("istio_tcp_received_bytes_total");
        let addr = format!("{}:{TCP_PORT}", m.vip);
        let mut sent = 0;
        for i in 0..3 {
            let msg = format!("tcp via waypoint {i}");
            let echo = m.c.tcp_echo(&m.client, &addr, &msg)?;
            ensure!(echo == msg, "TCP echo answered {echo:?} to {msg:?}");
            sent += msg.len() as u64 + 1;
        }
        // The access line and the closed count come when the connection
        // closes.
        wait_for(
            Duration::from_secs(5),
            "the waypoints' tcp access lines and metrics",
            || {
                Ok(m.waypoint_tcp_log_lines() >= lines + 3
                    && m.waypoint_tcp("istio_tcp_connections_closed_total") >= closed + 3)
            },
        )?;
        let got = m.waypoint_tcp("istio_tcp_received_bytes_total") - received;
        ensure!(got == sent, "istio_tcp_received_bytes_total grew by {got}, sent {sent}");
        Ok(format!(
            "3 echoes ok; waypoint tcp access lines +{}, connections closed {closed} -> {}, received bytes +{got}",
            m.waypoint_tcp_log_lines() - lines,
            m.waypoint_tcp("istio_tcp_connections_closed_total")
        ))
    });

    checks.run("HTTPRoute 80/20 split", || {
        let n = 300;
        let urls: Vec<String> = (0..n).map(|i| m.url(&format!("/split/{i}"))).collect();
        let (a, b, other) = tally(&m, &m.c.http_many(&m.client, &urls, &[], false));
        ensure!(other.is_empty(), "failed requests: {other:?}");
        // v2's share is binomial(300, 0.2): 60 ± 6.9; allow 4 sd.
        ensure!((33..=88).contains(&b), "v1 {a} / v2 {b} of {n}");
        Ok(format!("v1 {a} / v2 {b} of {n}"))
    });

    checks.run("header-based routing", || {
        let urls: Vec<String> = (0..20).map(|i| m.url(&format!("/h/{i}"))).collect();
        let (a, b, other) = tally(
            &m,
            &m.c.http_many(&m.client, &urls, &[("x-version", "v2")], false),
        );
        ensure!(
            other.is_empty() && a == 0 && b == 20,
            "with x-version: v2: v1 {a}, v2 {b}, other {other:?}"
        );
        Ok("20 of 20 with x-version: v2 went to v2".into())
    });

    checks.run("URL rewrite", || {
        let r = m.get("/old/page?q=1", &[]);
        ensure!(r.ok(), "{}", r.describe());
        let seen = echoed_path(&r.body).unwrap_or("");
        ensure!(seen == "/new/page?q=1", "backend saw {seen:?}");
        ensure!(
            m.server(&m.v1).hits("/old/page?q=1") == 0,
            "the old path reached the backend"
        );
        Ok(format!("/old/page?q=1 reached {} as {seen}", r.served_by))
    });

    checks.run("request timeout", || {
        let slow = m.get("/delay/3000", &[]);
        ensure!(slow.code == 504, "slow request: {}", slow.describe());
        let fast = m.get("/delay/10", &[]);
        ensure!(fast.ok(), "fast request: {}", fast.describe());
        Ok(format!(
            "3 s backend with a {TIMEOUT_MS} ms timeout: {}; 10 ms: {}",
            slow.code, fast.code
        ))
    });

    checks.run("gRPC routed by method", || {
        let addr = format!("{}:{GRPC_PORT}", m.vip);
        for i in 0..5 {
            let (by, msg) = m.c.grpc_call(&m.client, &addr, "hello", &format!("n{i}"))?;
            ensure!(
                by == m.v1.key() && msg == format!("hello n{i}"),
                "Hello answered by {by}: {msg}"
            );
            let (by, msg) = m.c.grpc_call(&m.client, &addr, "echo", &format!("e{i}"))?;
            ensure!(
                by == m.v2.key() && msg == format!("e{i}"),
                "Echo answered by {by}: {msg}"
            );
        }
        Ok("5 Hello to echo-v1, 5 Echo to echo-v2".into())
    });

    checks.run("retry turns a flaky backend's 503 into a 200", || {
        // Before the retry route: the first try's 503 reaches the client.
        let r = m.get("/flaky/before", &[]);
        ensure!(r.code == 503, "without a retry: {}", r.describe());
        m.c.apply("routes-echo-retry.yaml", &retry_route())?;
        wait_route(&m, "app/echo-retry.0.0")?;
        let r = m.get("/flaky/after", &[]);
        ensure!(r.ok(), "with a retry: {}", r.describe());
        let hits = m.server(&m.v1).hits("/flaky/after");
        ensure!(hits == 2, "the backend saw /flaky/after {hits} times");
        Ok(format!(
            "503 then 200 on the backend, 200 to the client ({})",
            r.served_by
        ))
    });

    checks.run("backendRequest timeout", || {
        let slow = m.get("/slow/delay/3000", &[]);
        ensure!(slow.code == 504, "slow backend: {}", slow.describe());
        let fast = m.get("/slow/delay/10", &[]);
        ensure!(fast.ok(), "fast backend: {}", fast.describe());
        Ok(format!(
            "per-try timeout {TIMEOUT_MS} ms: 3 s backend {}, 10 ms backend {}",
            slow.code, fast.code
        ))
    });

    checks.run("L7 DENY on a path", || {
        m.c.apply("policy-deny-admin.yaml", &deny_policy())?;
        for r in &m.replicas {
            r.wait_config(
                Duration::from_secs(20),
                &format!("{} to have the policy", r.app.key()),
                |d| d.to_string().contains("deny-admin"),
            )?;
        }
        let urls: Vec<String> = (0..10).map(|i| m.url(&format!("/admin/{i}"))).collect();
        let denied = m.c.http_many(&m.client, &urls, &[], true);
        let codes: Vec<u16> = denied.iter().map(|r| r.code).collect();
        ensure!(codes.iter().all(|&c| c == 403), "/admin/*: {codes:?}");
        let reached: Vec<String> = [&m.v1, &m.v2]
            .iter()
            .flat_map(|a| m.server(a).paths())
            .filter(|p| p.starts_with("/admin"))
            .collect();
        ensure!(
            reached.is_empty(),
            "denied requests reached a backend: {reached:?}"
        );
        let ok = m.get("/public/1", &[]);
        ensure!(ok.ok(), "/public/1: {}", ok.describe());
        Ok("10 x /admin/*: 403, none reached a backend; /public/1: 200".into())
    });

    checks.run("the L7 DENY on opaque TCP applies without its path", || {
        // An opaque TCP chain cannot see paths: the DENY rule applies
        // without them (stricter), as Istio does for L4 enforcement.
        let denied = |m: &Mesh| {
            m.replicas
                .iter()
                .map(|r| r.log().matches("tcp connection denied").count())
                .sum::<usize>()
        };
        let before = denied(&m);
        let msg = "tcp after deny";
        let r =
            m.c.tcp_echo(&m.client, &format!("{}:{TCP_PORT}", m.vip), msg);
        ensure!(
            !matches!(&r, Ok(e) if e == msg),
            "the denied TCP connection echoed"
        );
        wait_for(
            Duration::from_secs(5),
            "a tcp denial in the waypoints' logs",
            || Ok(denied(&m) > before),
        )?;
        let how = match &r {
            Ok(e) => format!("answered {e:?}"),
            Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
        };
        Ok(format!("echo refused ({how}); waypoint logged the denial"))
    });

    checks.run("both waypoint replicas take traffic", || {
        let before = m.waypoint_requests();
        let urls: Vec<String> = (0..40).map(|i| m.url(&format!("/spread/{i}"))).collect();
        let (_, _, other) = tally(&m, &m.c.http_many(&m.client, &urls, &[], true));
        ensure!(other.is_empty(), "failed requests: {other:?}");
        let mut d = Vec::new();
        wait_for(Duration::from_secs(5), "the replicas' metrics", || {
            d = m
                .waypoint_requests()
                .iter()
                .zip(&before)
                .map(|(a, b)| a - b)
                .collect();
            Ok(d.iter().sum::<u64>() >= 40)
        })?;
        ensure!(d.iter().all(|&x| x > 0), "per replica: {d:?}");
        Ok(format!("40 connections, per replica {d:?}"))
    });

    checks.run("losing a replica loses no new requests", || {
        let dead = &m.replicas[1];
        dead.child.kill9()?;
        let urls: Vec<String> = (0..40)
            .map(|i| m.url(&format!("/after-kill/{i}")))
            .collect();
        let (a, b, other) = tally(&m, &m.c.http_many(&m.client, &urls, &[], true));
        if !other.is_empty() {
            bail!("{} of 40 failed: {other:?}", other.len());
        }
        Ok(format!(
            "{} killed; 40 new connections all answered (v1 {a} / v2 {b})",
            dead.app.key()
        ))
    });

    assert!(
        checks.failed.is_empty(),
        "failed checks:\n{}",
        checks.failed.join("\n")
    );
}
