//! The waypoint on the multi-node test bed (network namespaces): a client
//! on node `a` reaches the waypoint on node `w` over HBONE, as its ztunnel
//! would; the waypoint routes to two versions of `echo` on node `b`,
//! reaching them through node b's real ztunnel over HBONE with the
//! waypoint's identity. Node b's L4 policy admits only the waypoint; the
//! waypoint's L7 policy denies `/admin` before anything reaches node b.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use clap::Parser;
use common::*;
use e2e::Testbed;
use ztunnel::identity::{CaClient, LocalCa};

/// A runtime whose threads live in network namespace `ns`.
fn runtime_in(ns: &str) -> tokio::runtime::Runtime {
    e2e::in_netns(ns, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Runs `f` on `rt`'s threads (so its sockets are in their namespace).
fn run_in<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(rt.spawn(f)).unwrap()
}

fn state_b(v1: IpAddr, v2: IpAddr) -> String {
    format!(
        r#"workloads:
  - {{name: echo-v1, namespace: default, serviceAccount: echo-v1, node: b, addresses: [{v1}], labels: {{app: echo}}}}
  - {{name: echo-v2, namespace: default, serviceAccount: echo-v2, node: b, addresses: [{v2}], labels: {{app: echo}}}}
policies:
  - name: only-the-waypoint
    namespace: default
    scope: WorkloadSelector
    selector: {{app: echo}}
    action: Allow
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/default/sa/waypoint"]
"#
    )
}

fn mesh_endpoint_cluster(name: &str, ip: IpAddr, sa: &str) -> String {
    format!(
        r#"  - name: {name}
    load_assignment:
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: 8080}}}}}}
              metadata: {{identity: "spiffe://cluster.local/ns/default/sa/{sa}", workload: {sa}, namespace: default}}
"#
    )
}

#[test]
fn split_and_header_routing_across_nodes_through_ztunnel() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let a = tb.add_node("a").unwrap();
    let b = tb.add_node("b").unwrap();
    let w = tb.add_node("w").unwrap();
    let client_pod = tb.add_host_pod(&a, "client").unwrap();
    let v1_pod = tb.add_host_pod(&b, "echo-v1").unwrap();
    let v2_pod = tb.add_host_pod(&b, "echo-v2").unwrap();
    let wp_pod = tb.add_host_pod(&w, "waypoint").unwrap();
    let (ca_cert, ca_key) = (tb.dir().join("ca.crt"), tb.dir().join("ca.key"));
    let ca = LocalCa::generate(TD).unwrap();
    ca.write(&ca_cert, &ca_key).unwrap();
    let ca: Arc<dyn CaClient> = Arc::new(ca);
    let (v1_ip, v2_ip) = (IpAddr::V4(v1_pod.ipv4()), IpAddr::V4(v2_pod.ipv4()));
    let state = tb.dir().join("state-b.yaml");
    std::fs::write(&state, state_b(v1_ip, v2_ip)).unwrap();

    // Node b: the two versions and the real ztunnel in front of them.
    let rt_b = runtime_in(b.netns());
    let v1 = run_in(&rt_b, backend_at("v1", SocketAddr::new(v1_ip, 8080)));
    let v2 = run_in(&rt_b, backend_at("v2", SocketAddr::new(v2_ip, 8080)));
    let zcfg = ztunnel::config::Config::parse_from([
        "ztunnel".into(),
        "--node".into(),
        "b".into(),
        "--local-state".into(),
        state.display().to_string(),
        "--ca-cert".into(),
        ca_cert.display().to_string(),
        "--ca-key".into(),
        ca_key.display().to_string(),
        "--socket-mark".into(),
        "0".into(),
    ]);
    rt_b.spawn(async move {
        if let Err(e) = ztunnel::app::run(zcfg).await {
            panic!("ztunnel b: {e:#}");
        }
    });

    // Node w: the waypoint.
    let routes = "          - match:
              prefix: /
              headers: [{name: x-version, string_match: {exact: v2}}]
            route: {cluster: v2}
          - match: {prefix: /}
            route:
              weighted_clusters:
                clusters: [{name: v1, weight: 80}, {name: v2, weight: 20}]
              retry_policy: {retry_on: connect-failure, num_retries: 5, retry_back_off: {base_interval: 0.1s}}
";
    let clusters = mesh_endpoint_cluster("v1", v1_ip, "echo-v1")
        + &mesh_endpoint_cluster("v2", v2_ip, "echo-v2");
    let deny_admin = r#"
            - action: DENY
              policies:
                no-admin: {permissions: [{paths: [{prefix: /admin}]}]}"#;
    let yaml = config(deny_admin, routes, &clusters);
    let rt_w = runtime_in(w.netns());
    let wp_ip = IpAddr::V4(wp_pod.ipv4());
    let ca_w = ca.clone();
    let wp = run_in(&rt_w, async move {
        waypoint_at(ca_w, &yaml, "waypoint", wp_ip).await
    });

    // Node a: the client, speaking HBONE to the waypoint as ztunnel would.
    let rt_a = runtime_in(a.netns());
    let entered = rt_a.enter();
    let c = client(ca.clone(), "client", &wp);
    let c = Arc::new(c);
    let n = 300;
    let cc = c.clone();
    let _ = client_pod;
    run_in(&rt_a, async move {
        // The first request also waits for ztunnel b to come up.
        let mut h2 = cc.h2(VIP).await;
        for i in 0..n {
            let req = http::Request::builder()
                .uri("http://echo.default.svc.cluster.local/")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let r = h2.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200, "request {i}");
        }
        for _ in 0..10 {
            let r = cc.get("/", &[("x-version", "v2")]).await;
            assert_eq!(r.body, "v2 /");
        }
        // L7 policy at the waypoint: denied, and nothing reaches node b.
        assert_eq!(cc.get("/admin/x", &[]).await.status, 403);
    });
    let share = v1.hits() as f64 / n as f64;
    assert_eq!(v1.hits() + v2.hits(), n + 10);
    assert!((0.70..=0.90).contains(&share), "v1 got {share}");

    // Going around the waypoint straight to node b's ztunnel is refused.
    let direct = Client {
        waypoint: SocketAddr::new(v1_ip, 15008),
        waypoint_id: id("echo-v1"),
        ..client(ca, "client", &wp)
    };
    let target = SocketAddr::new(v1_ip, 8080).to_string();
    let err = run_in(&rt_a, async move { direct.tunnel(&target).await.err() });
    assert!(format!("{:#}", err.expect("denied")).contains("401"));
    drop(entered);
    drop((rt_a, rt_w, rt_b));
}
