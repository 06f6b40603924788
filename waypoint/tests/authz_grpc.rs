//! L7 authorization and gRPC routing by method.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use common::*;

#[tokio::test]
async fn deny_on_a_path_gives_403_and_the_backend_sees_nothing() {
    let ca = ca();
    let v1 = backend("v1").await;
    let rbac = r#"
            - action: DENY
              policies:
                no-admin:
                  permissions: [{paths: [{prefix: /admin}]}]
                  principals: [{principals: ["*"]}]
            - action: ALLOW
              policies:
                from-default:
                  principals: [{namespaces: [default], not_principals: ["cluster.local/ns/default/sa/intruder"]}]
"#;
    let routes = "          - match: {prefix: /}
            route: {cluster: v1}
";
    let wp = waypoint(
        ca.clone(),
        &config(rbac, routes, &cluster("v1", &[v1.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca.clone(), "client", &wp);
    let r = c.get("/admin/users", &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "RBAC: access denied\n");
    assert_eq!(v1.hits(), 0);
    assert_eq!(c.get("/public", &[]).await.status, 200);
    assert_eq!(v1.hits(), 1);
    // The principal is the client's certificate identity.
    let intruder = client(ca, "intruder", &wp);
    assert_eq!(intruder.get("/public", &[]).await.status, 403);
    assert_eq!(v1.hits(), 1);
    let metrics = admin_get(&wp, "/metrics").await;
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"403\"")));
}

#[tokio::test]
async fn allow_by_method_and_header() {
    let ca = ca();
    let v1 = backend("v1").await;
    let rbac = r#"
            - action: ALLOW
              policies:
                reads:
                  permissions: [{methods: [GET, HEAD]}]
                writes-with-token:
                  permissions: [{methods: [POST], headers: [{name: x-token, string_match: {exact: s3cret}}]}]
"#;
    let routes = "          - match: {prefix: /}
            route: {cluster: v1}
";
    let wp = waypoint(
        ca.clone(),
        &config(rbac, routes, &cluster("v1", &[v1.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/x", &[]).await.status, 200);
    assert_eq!(c.request("POST", "/x", &[], "").await.status, 403);
    assert_eq!(
        c.request("POST", "/x", &[("x-token", "s3cret")], "")
            .await
            .status,
        200
    );
    assert_eq!(c.request("DELETE", "/x", &[], "").await.status, 403);
    assert_eq!(v1.hits(), 2);
}

fn grpc_request(method: &str) -> http::Request<Full<Bytes>> {
    let msg = b"ping";
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(msg);
    http::Request::builder()
        .method("POST")
        .uri(format!("http://echo.default.svc.cluster.local{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed)))
        .unwrap()
}

#[tokio::test]
async fn grpc_routes_by_method_over_http2() {
    let ca = ca();
    let a = backend("a").await;
    let b = backend("b").await;
    let routes = "          - match: {path: /demo.Echo/Say}
            route: {cluster: a}
          - match: {prefix: /demo.Echo/}
            route: {cluster: b}
";
    let proto = "    upstream_protocol: HTTP2\n";
    let clusters = cluster("a", &[a.addr], proto) + &cluster("b", &[b.addr], proto);
    let wp = waypoint(ca.clone(), &config("[]", routes, &clusters), "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut h2 = c.h2(VIP).await;
    for (method, who) in [("/demo.Echo/Say", "a"), ("/demo.Echo/Shout", "b")] {
        let resp = h2.send_request(grpc_request(method)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        let body = collected.to_bytes();
        assert_eq!(&body[5..], format!("{who} {method}").as_bytes());
    }
    assert_eq!((a.hits(), b.hits()), (1, 1));
    // Upstream, `:authority` is the service's host, with no Host header.
    let h = a.last_headers();
    assert_eq!(h["x-seen-authority"], "echo.default.svc.cluster.local");
    assert!(h.get("host").is_none());
    // Local replies to gRPC clients carry a gRPC status: an unknown
    // service is UNIMPLEMENTED (12).
    let resp = h2
        .send_request(grpc_request("/other.Svc/Call"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "12");
    // The gRPC status shows in the metrics.
    let metrics = admin_get(&wp, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("grpc_response_status=\"0\"")),
        "{metrics}"
    );
}
