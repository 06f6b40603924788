//! Routing through the waypoint over HBONE on loopback: matches, splits,
//! modifiers, rewrites, redirects, faults, mirroring, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test]
async fn routes_http1_over_hbone_and_counts_it() {
    let ca = ca();
    let v1 = backend("v1").await;
    let yaml = config(
        "[]",
        &format!("          - match: {{prefix: /}}\n            route: {{cluster: \"{ECHO}\"}}\n"),
        &istio_cluster(ECHO, v1.addr, "echo-v1;default;echo;v1;Kubernetes"),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let r = c.get("/hello?x=1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "v1 /hello?x=1");
    // The backend sees the original host, and the forwarding headers.
    let h = v1.last_headers();
    assert_eq!(h["host"], "echo.default.svc.cluster.local");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-request-id"].len(), 32);
    c.get(
        "/",
        &[("x-request-id", "abc"), ("x-forwarded-for", "10.0.0.1")],
    )
    .await;
    let h = v1.last_headers();
    assert_eq!(h["x-request-id"], "abc");
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    let metrics = admin_get(&wp, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .expect("istio_requests_total");
    assert!(line.contains("reporter=\"waypoint\""), "{line}");
    assert!(line.contains("response_code=\"200\""), "{line}");
    assert!(
        line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{line}"
    );
    // Istio's labels for dashboards: the Service from the cluster name,
    // the destination from Istio's endpoint metadata, the source as
    // Istio's waypoint reports a client without peer metadata.
    has_istio_labels(line);
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket"));
    assert!(metrics.contains("istio_response_bytes_sum"));
}

/// One keep-alive connection's requests, to two services and with two
/// statuses, each counted in its own series (the connection remembers the
/// series it used last; a change of any label must not reuse it).
#[tokio::test]
async fn one_connections_requests_are_counted_per_label_set() {
    let ca = ca();
    let (v1, other) = (backend("v1").await, backend("other").await);
    let yaml = config(
        "[]",
        &format!(
            "          - match: {{prefix: /other}}\n            route: {{cluster: \"{OTHER}\"}}\n          - match: {{prefix: /}}\n            route: {{cluster: \"{ECHO}\"}}\n"
        ),
        &format!(
            "{}{}",
            istio_cluster(ECHO, v1.addr, "echo-v1;default;echo;v1;Kubernetes"),
            istio_cluster(OTHER, other.addr, "other-v1;default;other;v1;Kubernetes")
        ),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = c.h1(VIP).await;
    let get = |path: &str| {
        http::Request::get(path)
            .header("host", "echo.default.svc.cluster.local")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    v1.script(&[200, 200, 503]);
    for (path, want) in [
        ("/", 200),
        ("/", 200),
        ("/other", 200),
        ("/", 503),
        ("/", 200),
        ("/other", 200),
    ] {
        assert_eq!(send(&mut s, get(path)).await.status, want, "{path}");
    }
    let metrics = admin_get(&wp, "/metrics").await;
    let count = |service: &str, code: &str| -> Vec<&str> {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("destination_service=\"{service}\""))
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .filter_map(|l| l.rsplit(' ').next())
            .collect()
    };
    assert_eq!(
        count("echo.default.svc.cluster.local", "200"),
        ["3"],
        "{metrics}"
    );
    assert_eq!(
        count("echo.default.svc.cluster.local", "503"),
        ["1"],
        "{metrics}"
    );
    assert_eq!(
        count("other.default.svc.cluster.local", "200"),
        ["2"],
        "{metrics}"
    );
    assert!(
        metrics.contains("destination_workload=\"other-v1\""),
        "{metrics}"
    );
}

const OTHER: &str = "outbound|80||other.default.svc.cluster.local";
const ECHO: &str = "outbound|80||echo.default.svc.cluster.local";

/// A cluster of one endpoint with Istio's `workload` metadata.
fn istio_cluster(name: &str, at: std::net::SocketAddr, workload: &str) -> String {
    format!(
        r#"  - name: "{name}"
    load_assignment:
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: "{}", port_value: {}}}}}}}
              metadata: {{workload: "{workload}"}}
"#,
        at.ip(),
        at.port()
    )
}

fn has_istio_labels(line: &str) {
    for want in [
        "source_workload=\"client\"",
        "source_canonical_service=\"unknown\"",
        "source_canonical_revision=\"latest\"",
        "source_app=\"unknown\"",
        "source_version=\"unknown\"",
        "source_cluster=\"unknown\"",
        "destination_workload=\"echo-v1\"",
        "destination_workload_namespace=\"default\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "destination_service_name=\"echo\"",
        "destination_service_namespace=\"default\"",
        "destination_canonical_service=\"echo\"",
        "destination_canonical_revision=\"v1\"",
        "destination_app=\"unknown\"",
        "destination_version=\"unknown\"",
    ] {
        assert!(line.contains(want), "{want} in {line}");
    }
}

#[tokio::test]
async fn opaque_tcp_is_counted_with_istios_labels() {
    let ca = ca();
    let echo = backend("echo").await;
    let yaml = format!(
        r#"listeners:
  - name: waypoint
    filter_chains:
      - filter_chain_match: {{destination_port: {port}, prefix_ranges: ["{ip}/32"]}}
        tcp_proxy: {{cluster: "{ECHO}"}}
clusters:
{cluster}"#,
        port = echo.addr.port(),
        ip = echo.addr.ip(),
        cluster = istio_cluster(ECHO, echo.addr, "echo-v1;default;echo;v1;Kubernetes"),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let io = c.tunnel(&echo.addr.to_string()).await.unwrap();
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
    let metrics = admin_get(&wp, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .expect("istio_tcp_connections_opened_total");
    assert!(line.contains("request_protocol=\"tcp\""), "{line}");
    has_istio_labels(line);
}

#[tokio::test]
async fn weighted_split_is_about_80_20() {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let routes = "          - match: {prefix: /}
            route:
              weighted_clusters:
                clusters: [{name: v1, weight: 80}, {name: v2, weight: 20}]
";
    let clusters = cluster("v1", &[v1.addr], "") + &cluster("v2", &[v2.addr], "");
    let wp = waypoint(ca.clone(), &config("[]", routes, &clusters), "waypoint").await;
    let c = client(ca, "client", &wp);
    // One HTTP/2 connection, many requests: the split is per request.
    let mut h2 = c.h2(VIP).await;
    let n = 400;
    for _ in 0..n {
        let req = http::Request::builder()
            .uri("http://echo.default.svc.cluster.local/split")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let share = v1.hits() as f64 / n as f64;
    assert_eq!(v1.hits() + v2.hits(), n);
    assert!((0.70..=0.90).contains(&share), "v1 got {share}");
}

#[tokio::test]
async fn header_method_and_query_matches_pick_the_route() {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let v3 = backend("v3").await;
    let v4 = backend("v4").await;
    let routes = "          - match:
              prefix: /
              headers: [{name: x-version, string_match: {exact: v2}}]
            route: {cluster: v2}
          - match:
              prefix: /
              headers: [{name: ':method', string_match: {exact: POST}}]
            route: {cluster: v3}
          - match:
              safe_regex: {regex: '/items/[0-9]+'}
              query_parameters: [{name: debug, string_match: {exact: 'on'}}]
            route: {cluster: v4}
          - match: {prefix: /}
            route: {cluster: v1}
";
    let clusters = cluster("v1", &[v1.addr], "")
        + &cluster("v2", &[v2.addr], "")
        + &cluster("v3", &[v3.addr], "")
        + &cluster("v4", &[v4.addr], "");
    let wp = waypoint(ca.clone(), &config("[]", routes, &clusters), "waypoint").await;
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/a", &[("x-version", "v2")]).await.body, "v2 /a");
    assert_eq!(c.get("/a", &[("x-version", "v3")]).await.body, "v1 /a");
    assert_eq!(c.request("POST", "/a", &[], "x").await.body, "v3 /a");
    assert_eq!(
        c.get("/items/42?debug=on", &[]).await.body,
        "v4 /items/42?debug=on"
    );
    assert_eq!(
        c.get("/items/42x?debug=on", &[]).await.body,
        "v1 /items/42x?debug=on"
    );
    assert_eq!(
        c.get("/items/42?debug=off", &[]).await.body,
        "v1 /items/42?debug=off"
    );
}

#[tokio::test]
async fn unmatched_gets_404_and_direct_response_answers() {
    let ca = ca();
    let v1 = backend("v1").await;
    let routes = "          - match: {path: /exact}
            route: {cluster: v1}
          - match: {prefix: /health}
            direct_response: {status: 200, body: ok}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("v1", &[v1.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/exact", &[]).await.status, 200);
    assert_eq!(c.get("/exact/more", &[]).await.status, 404);
    let r = c.get("/healthz", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    assert_eq!(v1.hits(), 1);
}

#[tokio::test]
async fn rewrite_and_header_modifiers() {
    let ca = ca();
    let v1 = backend("v1").await;
    let routes = "          - match: {prefix: /api/}
            route: {cluster: v1, prefix_rewrite: /v1/, host_rewrite_literal: backend.internal}
            request_headers_to_add:
              - header: {key: x-added, value: yes}
              - header: {key: x-env, value: prod}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
            request_headers_to_remove: [x-secret]
            response_headers_to_add:
              - header: {key: x-served-by, value: waypoint}
            response_headers_to_remove: [x-backend]
          - match: {prefix: /full/}
            route:
              cluster: v1
              regex_rewrite: {pattern: {regex: '^/full/(.*)$'}, substitution: '/replaced/$1'}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("v1", &[v1.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let r = c
        .get("/api/users?id=1", &[("x-secret", "s"), ("x-env", "dev")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "v1 /v1/users?id=1");
    assert_eq!(r.headers["x-served-by"], "waypoint");
    assert!(r.headers.get("x-backend").is_none());
    let h = v1.last_headers();
    assert_eq!(h["x-added"], "yes");
    assert_eq!(h["x-env"], "prod");
    assert_eq!(h["host"], "backend.internal");
    assert!(h.get("x-secret").is_none());
    assert_eq!(c.get("/full/a/b", &[]).await.body, "v1 /replaced/a/b");
}

#[tokio::test]
async fn redirect_and_fault_abort_never_reach_the_backend() {
    let ca = ca();
    let v1 = backend("v1").await;
    let routes = "          - match: {prefix: /old/}
            redirect: {prefix_rewrite: /new/, response_code: FOUND}
          - match: {prefix: /elsewhere}
            redirect: {scheme_redirect: https, host_redirect: example.com, path_redirect: /x, strip_query: true}
          - match: {prefix: /broken}
            route: {cluster: v1}
            fault: {abort: {http_status: 503, percentage: {numerator: 100}}}
          - match: {prefix: /slow}
            route: {cluster: v1}
            fault: {delay: {fixed_delay: 10ms, percentage: {numerator: 100}}}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("v1", &[v1.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let r = c.get("/old/page?q=1", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers["location"],
        "http://echo.default.svc.cluster.local/new/page?q=1"
    );
    let r = c.get("/elsewhere?q=1", &[]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://example.com/x");
    assert_eq!(c.get("/broken", &[]).await.status, 503);
    assert_eq!(v1.hits(), 0);
    assert_eq!(c.get("/slow", &[]).await.status, 200);
    assert_eq!(v1.hits(), 1);
}

#[tokio::test]
async fn mirror_sends_a_copy_to_the_shadow_cluster() {
    let ca = ca();
    let v1 = backend("v1").await;
    let shadow = backend("shadow").await;
    let routes = "          - match: {prefix: /}
            route:
              cluster: v1
              request_mirror_policies: [{cluster: shadow}]
";
    let clusters = cluster("v1", &[v1.addr], "") + &cluster("shadow", &[shadow.addr], "");
    let wp = waypoint(ca.clone(), &config("[]", routes, &clusters), "waypoint").await;
    let c = client(ca, "client", &wp);
    let r = c.request("POST", "/m", &[], "payload").await;
    assert_eq!(r.body, "v1 /m");
    // The copy is sent in the background: wait for it.
    for _ in 0..500 {
        if shadow.hits() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(shadow.hits(), 1);
    assert_eq!(
        shadow.last_headers()["host"],
        "echo.default.svc.cluster.local-shadow"
    );
}

#[tokio::test]
async fn the_plaintext_listener_routes_without_identity() {
    let ca = ca();
    let v1 = backend("v1").await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let yaml = config(
        "[{action: ALLOW, policies: {anyone-may-get: {permissions: [{methods: [GET]}]}}}]",
        "          - match: {prefix: /}\n            route: {cluster: v1}\n",
        &cluster("v1", &[v1.addr], ""),
    )
    .replace(
        "{destination_port: 80, prefix_ranges: [\"10.96.0.10/32\"]}",
        &format!("{{destination_port: {port}}}"),
    );
    let wp = waypoint(ca, &yaml, "waypoint").await;
    tokio::spawn(waypoint::plaintext::run(wp.proxy.clone(), l));
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = |m: &str| {
        http::Request::builder()
            .method(m)
            .uri("/plain")
            .header("host", "x")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    assert_eq!(send(&mut sender, req("GET")).await.body, "v1 /plain");
    assert_eq!(send(&mut sender, req("DELETE")).await.status, 403);
}

#[tokio::test]
async fn codec_type_fixes_the_protocol_like_app_protocol() {
    let ca = ca();
    let v1 = backend("v1").await;
    let yaml = config(
        "[]",
        "          - match: {prefix: /}\n            route: {cluster: v1}\n",
        &cluster("v1", &[v1.addr], ""),
    )
    .replace(
        "route_config_name: echo\n",
        "route_config_name: echo\n          codec_type: HTTP2\n",
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    // HTTP/2 (prior knowledge) is served...
    let mut h2 = c.h2(VIP).await;
    let req = http::Request::builder()
        .uri("http://echo/two")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    // ...HTTP/1.1 is not: the connection fails instead of being routed.
    let mut h1 = c.h1(VIP).await;
    let req = http::Request::builder()
        .uri("/one")
        .header("host", "echo")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert!(h1.send_request(req).await.is_err());
    assert_eq!(v1.hits(), 1);
}
