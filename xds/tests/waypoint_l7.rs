//! HTTPRoute resilience and L7 AuthorizationPolicies, end to end: the real
//! control plane translates them, the real waypoint (in-process,
//! `waypoint::xds`, delta ADS over TLS with a node token) enforces them on
//! HBONE traffic from loopback clients to a loopback backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod in_process_waypoint;
#[path = "../../waypoint/tests/common/mod.rs"]
mod wcommon;

use std::sync::Arc;

use waypoint::app::Running as Waypoint;
use ztunnel::identity::CaClient;

struct Mesh {
    server: xds::Running,
    wp: Waypoint,
    ca: Arc<dyn CaClient>,
    backend: wcommon::Backend,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// The control plane serving `common::waypoint_mesh(.., extra)`, and a waypoint
/// configured by it (as pod `wp-1` on node-a), ready.
async fn mesh(extra: &str) -> Mesh {
    let backend = wcommon::backend("echo").await;
    let dir = tempfile::tempdir().unwrap();
    common::write(
        dir.path(),
        "mesh.yaml",
        &common::waypoint_mesh("127.0.0.1", backend.addr.port(), extra),
    );
    let server = common::start(dir.path()).await;
    let w = in_process_waypoint::start_waypoint(&server).await;
    Mesh {
        server,
        wp: w.wp,
        ca: w.ca,
        backend,
        _dirs: (dir, w._secrets),
    }
}

impl Mesh {
    fn client(&self, sa: &str) -> wcommon::Client {
        wcommon::client(self.ca.clone(), sa, &self.wp)
    }
}

const RESILIENCE: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {backendRequest: 200ms}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /patient}}]
    retry: {attempts: 1, backoff: 10ms}
    timeouts: {request: 5s, backendRequest: 200ms}
    backendRefs: [{name: echo, port: 80}]
  - backendRefs: [{name: echo, port: 80}]
"#;

#[tokio::test]
async fn retry_turns_a_flaky_503_into_200() {
    let m = mesh(RESILIENCE).await;
    let c = m.client("client");
    // Without a retry policy the backend's 503 reaches the client.
    m.backend.script(&[503]);
    let before = m.backend.hits();
    assert_eq!(c.get("/plain", &[]).await.status, 503);
    assert_eq!(m.backend.hits() - before, 1);
    // With one, the waypoint tries again and the client sees the 200.
    m.backend.script(&[503]);
    let before = m.backend.hits();
    let r = c.get("/retry/x", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "echo /retry/x");
    assert_eq!(m.backend.hits() - before, 2);
    m.server.stop().await;
}

#[tokio::test]
async fn backend_request_timeout_answers_504() {
    let m = mesh(RESILIENCE).await;
    let c = m.client("client");
    assert_eq!(c.get("/slow", &[]).await.status, 200);
    let r = c.get("/slow", &[("x-delay-ms", "3000")]).await;
    assert_eq!(r.status, 504, "{}", r.body);
    // With a retry, each try is bounded: both time out, then 504.
    let before = m.backend.hits();
    let r = c.get("/patient", &[("x-delay-ms", "3000")]).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(m.backend.hits() - before, 2);
    // Only those rules have timeouts.
    assert_eq!(c.get("/other", &[("x-delay-ms", "400")]).await.status, 200);
    m.server.stop().await;
}

const POLICIES: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
  - to: [{operation: {hosts: ["*.DEFAULT.svc.cluster.local"], paths: ["/internal*"]}}]
  - to: [{operation: {hosts: ["*.other.svc.cluster.local"], paths: ["/other*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: who, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/good"]}}]
  - from: [{source: {namespaces: [default]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bad"]}}]
    to: [{operation: {notPorts: ["8080"]}}]
  - from: [{source: {notNamespaces: [default]}}]
    when: [{key: "request.headers[x-pass]", values: ["yes"]}]
"#;

#[tokio::test]
async fn l7_policies_deny_allow_and_report_what_they_skip() {
    let m = mesh(POLICIES).await;
    // The unsupported `notPorts` is reported, naming object and field; its
    // ALLOW rule is skipped, the others apply.
    let errors = m.server.snapshots.borrow().resources.errors.clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("AuthorizationPolicy demo/who")
            && errors[0].contains("spec.rules[2].to[0].operation.notPorts")
            && errors[0].contains("skipped"),
        "{}",
        errors[0]
    );
    let good = m.client("good");
    let bad = m.client("bad");
    // ALLOW by principal.
    assert_eq!(good.get("/x", &[]).await.status, 200);
    // Not allowed: the skipped rule would have let `bad` in.
    let before = m.backend.hits();
    assert_eq!(bad.get("/x", &[]).await.status, 403);
    // ALLOW by namespace, for GETs under /public/ only.
    assert_eq!(bad.get("/public/a", &[]).await.status, 200);
    assert_eq!(bad.request("POST", "/public/a", &[], "").await.status, 403);
    // The notNamespaces rule does not match a client of `default`.
    assert_eq!(bad.get("/x", &[("x-pass", "yes")]).await.status, 403);
    assert_eq!(m.backend.hits() - before, 1);
    // DENY comes first: even the allowed principal is refused /admin, and
    // the backend never sees the request.
    let before = m.backend.hits();
    let r = good.get("/admin/users", &[]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // Paths are normalized first, as istiod asks Envoy to: the policy sees
    // the path the backend would act on.
    for disguised in ["/x/../admin/users", "/%61dmin", "/./admin"] {
        let r = good.get(disguised, &[]).await;
        assert_eq!(r.status, 403, "{disguised}: {}", r.body);
    }
    assert_eq!(m.backend.hits(), before);
    let r = good.get("/x/../public/%61", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "echo /public/a");
    // `hosts` match the request's authority (`Host` here), ignoring case:
    // the DENY rules apply only with their hosts.
    assert_eq!(good.get("/internal/x", &[]).await.status, 403);
    assert_eq!(good.get("/other/x", &[]).await.status, 200);
    // The waypoint took every filter as sent.
    let l = xds::metrics::TypeLabel {
        type_url: mesh_proto::type_url::LISTENER.to_string(),
    };
    assert!(m.server.metrics.acks.get_or_create(&l).get() > 0);
    assert_eq!(m.server.metrics.nacks.get_or_create(&l).get(), 0);
    m.server.stop().await;
}

/// A second Service on the same pod whose port declares `appProtocol:
/// grpc`: its server speaks HTTP/2, so the waypoint does too, upstream,
/// even to an HTTP/1.1 client; the first Service's port declares nothing,
/// and gets the client's protocol.
const H2_SERVICE: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: echo-h2, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.11
  ports: [{port: 80, targetPort: http, appProtocol: grpc}]
"#;

#[tokio::test]
async fn app_protocol_grpc_means_http2_upstream() {
    let m = mesh(H2_SERVICE).await;
    let c = m.client("client");
    // An HTTP/2 request carries `:authority`, which the backend records as
    // `x-seen-authority`; an HTTP/1.1 one (origin form) does not.
    let r = c.get("/h1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!m.backend.last_headers().contains_key("x-seen-authority"));
    let mut s = c.h1("10.96.0.11:80").await;
    let req = http::Request::builder()
        .uri("/h2")
        .header("host", "echo-h2.demo.svc.cluster.local")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = wcommon::send(&mut s, req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(m.backend.last_path(), "/h2");
    assert!(
        m.backend.last_headers().contains_key("x-seen-authority"),
        "the waypoint spoke HTTP/1.1 to an appProtocol: grpc port"
    );
    m.server.stop().await;
}

/// Filters on a backendRef apply to the requests sent to that backend
/// (and their responses), before the rule's own: where both set a header,
/// the rule's wins.
const BACKEND_FILTERS: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /tagged}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-both, value: rule}]}
    backendRefs:
    - name: echo
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{name: x-backend-tag, value: blue}, {name: x-both, value: backend}]
          remove: [x-drop-me]
      - type: ResponseHeaderModifier
        responseHeaderModifier: {add: [{name: x-served-by, value: echo-blue}]}
  - backendRefs: [{name: echo, port: 80}]
"#;

#[tokio::test]
async fn backend_ref_filters_apply_to_that_backend() {
    let m = mesh(BACKEND_FILTERS).await;
    let c = m.client("client");
    let r = c.get("/tagged/x", &[("x-drop-me", "1")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-served-by"], "echo-blue");
    let seen = m.backend.last_headers();
    assert_eq!(seen["x-backend-tag"], "blue");
    assert_eq!(seen["x-both"], "rule");
    assert!(!seen.contains_key("x-drop-me"));
    // Another rule to the same Service: none of that.
    let r = c.get("/plain", &[("x-drop-me", "1")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.headers.contains_key("x-served-by"));
    let seen = m.backend.last_headers();
    assert!(!seen.contains_key("x-backend-tag"));
    assert!(seen.contains_key("x-drop-me"));
    m.server.stop().await;
}

/// What a backend cannot have is reported, and the route skipped.
#[tokio::test]
async fn unsupported_backend_filter_is_reported() {
    let bad = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs:
    - name: echo
      port: 80
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]
"#;
    let m = mesh(bad).await;
    let errors = m.server.errors.lock().unwrap().clone();
    assert!(
        errors.iter().any(|e| e.contains("HTTPRoute demo/bad")
            && e.contains("spec.rules[0].backendRefs[0].filters[0].type")),
        "{errors:?}"
    );
    m.server.stop().await;
}
