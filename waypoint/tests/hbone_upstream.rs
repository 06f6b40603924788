//! Upstream over HBONE: the waypoint reaches a mesh endpoint through that
//! endpoint's "ztunnel" (here a second waypoint whose filter chain passes
//! opaque TCP through), presenting its own identity and accepting only the
//! endpoint's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;

/// A destination-side HBONE terminator identified as `sa`, passing TCP
/// for `backend` through, with the given network RBAC.
fn terminator(backend: SocketAddr, rbac: &str) -> String {
    format!(
        r#"listeners:
  - name: hbone
    filter_chains:
      - filter_chain_match: {{destination_port: {port}, prefix_ranges: ["{ip}/32"]}}
        tcp_proxy:
          cluster: local
          rbac: {rbac}
clusters:
{cluster}"#,
        port = backend.port(),
        ip = backend.ip(),
        cluster = cluster("local", &[backend], ""),
    )
}

/// A cluster with one mesh endpoint reached over HBONE at `hbone`.
fn mesh_cluster(backend: SocketAddr, identity: &str, hbone: SocketAddr) -> String {
    format!(
        r#"  - name: mesh
    load_assignment:
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: "{}", port_value: {}}}}}}}
              metadata: {{identity: "{identity}", hbone_port: {}, workload: echo-v1, namespace: default}}
"#,
        backend.ip(),
        backend.port(),
        hbone.port()
    )
}

#[tokio::test]
async fn requests_leave_over_hbone_with_the_waypoints_identity() {
    let ca = ca();
    let echo = backend("echo").await;
    let only_waypoint = r#"
            - action: ALLOW
              policies:
                waypoint: {principals: [{principals: ["cluster.local/ns/default/sa/waypoint"]}]}"#;
    let dest = waypoint(ca.clone(), &terminator(echo.addr, only_waypoint), "echo").await;
    let routes = "          - match: {prefix: /}\n            route: {cluster: mesh}\n";
    let yaml = config(
        "[]",
        routes,
        &mesh_cluster(
            echo.addr,
            "spiffe://cluster.local/ns/default/sa/echo",
            dest.hbone_addr,
        ),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca.clone(), "client", &wp);
    for _ in 0..5 {
        let r = c.get("/through", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "echo /through"));
    }
    // HTTP/2 from the client, kept HTTP/2 inside the upstream tunnel.
    let mut h2 = c.h2(VIP).await;
    let req = http::Request::builder()
        .uri("http://echo.default.svc.cluster.local/h2")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    assert_eq!(echo.hits(), 6);
    // The destination labels come from the endpoint's metadata.
    let metrics = admin_get(&wp, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_workload=\"echo-v1\"")
                && l.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\""
                )),
        "{metrics}"
    );

    // A client going straight to the destination is refused by its L4
    // policy (the waypoint is the only allowed caller).
    let direct = Client {
        waypoint: dest.hbone_addr,
        waypoint_id: id("echo"),
        ..client(ca, "client", &dest)
    };
    let target = echo.addr.to_string();
    let err = direct.tunnel(&target).await.err().expect("denied");
    assert!(format!("{err:#}").contains("401"), "{err:#}");
}

#[tokio::test]
async fn a_wrong_endpoint_identity_fails_the_handshake() {
    let ca = ca();
    let echo = backend("echo").await;
    let dest = waypoint(ca.clone(), &terminator(echo.addr, "[]"), "echo").await;
    let routes = "          - match: {prefix: /}\n            route: {cluster: mesh}\n";
    // The endpoint is expected to be `billing`, but presents `echo`.
    let yaml = config(
        "[]",
        routes,
        &mesh_cluster(
            echo.addr,
            "spiffe://cluster.local/ns/default/sa/billing",
            dest.hbone_addr,
        ),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let r = c.get("/", &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn opaque_tcp_passes_through_with_l4_policy() {
    let ca = ca();
    let echo = backend("echo").await;
    let deny_intruder = r#"
            - action: DENY
              policies:
                intruder: {principals: [{principals: ["*/sa/intruder"]}]}"#;
    let tcp = terminator(echo.addr, deny_intruder);
    let wp = waypoint(ca.clone(), &tcp, "waypoint").await;
    let target = echo.addr.to_string();
    // Bytes, not HTTP requests, as far as the waypoint is concerned.
    let c = client(ca.clone(), "client", &wp);
    let io = c.tunnel(&target).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/raw")
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut s, req).await.body, "echo /raw");
    let intruder = client(ca, "intruder", &wp);
    let err = intruder.tunnel(&target).await.err().expect("denied");
    assert!(format!("{err:#}").contains("401"), "{err:#}");
}
