//! The real waypoint (in-process, `waypoint::xds`) configured by the real
//! control plane over delta and over SotW ADS with TLS and a node token: an HTTPRoute
//! with a header match and an 80/20 split routes HBONE traffic from a
//! loopback client to two loopback backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod in_process_waypoint;
#[path = "../../waypoint/tests/common/mod.rs"]
mod wcommon;

use waypoint::xds::ApiType;

fn pod_at(name: &str, version: &str, port: u16) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {{app: echo, version: {version}, istio.io/dataplane-mode: none}}
spec:
  nodeName: node-b
  serviceAccountName: echo
  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: {port}}}]}}]
status:
  podIP: 127.0.0.1
"#
    )
}

const CONFIG: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: demo}
spec:
  selector: {app: echo, version: v1}
  clusterIP: 10.96.0.11
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: demo}
spec:
  selector: {app: echo, version: v2}
  clusterIP: 10.96.0.12
  ports: [{port: 80, targetPort: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-split, value: "yes"}]}
    backendRefs:
    - {name: echo-v1, port: 80, weight: 80}
    - {name: echo-v2, port: 80, weight: 20}
"#;

#[tokio::test]
async fn real_waypoint_routes_by_httproute_from_the_control_plane() {
    routes_by_httproute(ApiType::DeltaGrpc).await
}

#[tokio::test]
async fn real_waypoint_routes_by_httproute_over_sotw_ads() {
    routes_by_httproute(ApiType::Grpc).await
}

async fn routes_by_httproute(api: ApiType) {
    let v1 = wcommon::backend("v1").await;
    let v2 = wcommon::backend("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let mut text = common::NS.to_string();
    text += &pod_at("echo-1", "v1", v1.addr.port());
    text += &pod_at("echo-2", "v2", v2.addr.port());
    text += CONFIG;
    text += &common::waypoint_pod("wp-1", "node-a", "10.244.1.99", "wp");
    common::write(dir.path(), "mesh.yaml", &text);
    let server = common::start(dir.path()).await;
    assert!(server.errors.lock().unwrap().is_empty());

    let w = in_process_waypoint::start_waypoint_over(&server, api).await;
    let (wp, ca) = (&w.wp, w.ca.clone());

    let c = wcommon::client(ca, "client", wp);
    // Header match.
    assert_eq!(c.get("/a", &[("x-version", "v2")]).await.body, "v2 /a");
    // Weighted split, per request, with the header modifier applied.
    let mut h2 = c.h2(wcommon::VIP).await;
    let n = 300;
    let (b1, b2) = (v1.hits(), v2.hits());
    for _ in 0..n {
        let req = http::Request::builder()
            .uri("http://echo.demo.svc.cluster.local/split")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    }
    let (d1, d2) = (v1.hits() - b1, v2.hits() - b2);
    assert_eq!(d1 + d2, n);
    let share = d1 as f64 / n as f64;
    assert!((0.65..=0.95).contains(&share), "v1 got {share}");
    assert_eq!(v1.last_headers().get("x-split").unwrap(), "yes");

    // The waypoint ACKed every Envoy type and NACKed none.
    use mesh_proto::type_url::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION};
    for t in [
        LISTENER,
        ROUTE_CONFIGURATION,
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
    ] {
        let l = xds::metrics::TypeLabel {
            type_url: t.to_string(),
        };
        assert!(server.metrics.acks.get_or_create(&l).get() > 0, "{t}");
        assert_eq!(server.metrics.nacks.get_or_create(&l).get(), 0, "{t}");
    }
    server.stop().await;
}
