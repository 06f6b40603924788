//! WebSocket (HTTP/1.1 `Upgrade`) through the waypoint: the upgrade request
//! passes policy and routing, goes upstream over HTTP/1.1 with its upgrade
//! headers, and after the backend's 101 bytes flow both ways; refusals
//! (RBAC, or the backend's) are plain responses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the backend saw: each request's path, version and headers.
type Seen = Arc<Mutex<Vec<(String, Version, HeaderMap)>>>;

/// An HTTP/1.1-only backend: `/ws...` asked to upgrade to WebSocket answers
/// 101, then sends `hello ` and echoes every byte; `/refuse` answers 400;
/// anything else 200 (an upgrade asked for is ignored).
async fn ws_backend() -> (SocketAddr, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Seen::default();
    let st = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(ws_answer(&st, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

fn ws_answer(seen: &Seen, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    seen.lock()
        .unwrap()
        .push((path.clone(), req.version(), req.headers().clone()));
    let asks = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let reply = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match path.as_str() {
        p if p.starts_with("/ws") && asks => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                io.write_all(b"hello ").await.unwrap();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(Full::default())
                .unwrap()
        }
        "/refuse" => reply(400, "no upgrade here".into()),
        _ => reply(200, format!("plain {path}")),
    }
}

/// An HTTP/1.1 connection through the waypoint that can switch protocols.
async fn h1_upgradable(c: &Client) -> SendRequest<Full<Bytes>> {
    let io = c.tunnel(VIP).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

fn upgrade_request(path: &str, connection: &str, upgrade: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "echo.default.svc.cluster.local")
        .header("connection", connection)
        .header("upgrade", upgrade)
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(Full::default())
        .unwrap()
}

fn route_to(cluster: &str) -> String {
    format!("          - name: all\n            match: {{prefix: /}}\n            route: {{cluster: {cluster}}}\n")
}

/// Over a switched connection: the backend's greeting, then echoes both
/// ways (a small message and one larger than any buffer), then a clean
/// close from the client's side ends the tunnel.
async fn exchange(resp: Response<Incoming>) {
    let io = tokio::time::timeout(Duration::from_secs(5), hyper::upgrade::on(resp))
        .await
        .expect("switched in time")
        .unwrap();
    let mut io = TokioIo::new(io);
    let mut greeting = [0u8; 6];
    io.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello ");
    io.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    io.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(io);
    let expected = big.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&big).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back))
        .await
        .expect("the tunnel ends after the client closes")
        .unwrap();
    writer.await.unwrap();
    assert!(back == expected, "echoed {} bytes", back.len());
}

async fn websocket_through(cluster_extra: &str) {
    let ca = ca();
    let (addr, seen) = ws_backend().await;
    let yaml = config(
        "[]",
        &route_to("ws"),
        &cluster("ws", &[addr], cluster_extra),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    // Keep-alive tokens and case do not matter; only the upgrade goes on.
    let req = upgrade_request("/ws", "keep-alive, Upgrade", "WebSocket");
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let h = resp.headers();
    assert_eq!(h["upgrade"], "websocket");
    assert!(h["connection"].as_bytes().eq_ignore_ascii_case(b"upgrade"));
    assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    exchange(resp).await;

    let (path, version, h) = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!((path.as_str(), version), ("/ws", Version::HTTP_11));
    assert_eq!(h["connection"], "upgrade");
    assert_eq!(h["upgrade"], "WebSocket");
    assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(h["sec-websocket-version"], "13");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");

    // Recorded as any request, with the 101, once the tunnel has ended:
    // its bytes count (the greeting, the ping and the large echo).
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = admin_get(&wp, "/metrics").await;
        if metrics.contains("response_code=\"101\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"101\"")),
        "{metrics}"
    );
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("response_code=\"101\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} for the 101:\n{metrics}"))
    };
    assert_eq!(sum("istio_request_bytes_sum{"), 200_004.0);
    assert_eq!(sum("istio_response_bytes_sum{"), 200_010.0);
}

#[tokio::test]
async fn websocket_is_proxied_and_bytes_flow_both_ways() {
    websocket_through("").await;
}

#[tokio::test]
async fn an_upgrade_to_an_http2_cluster_goes_over_http1() {
    // The backend speaks HTTP/1.1 only: HTTP/2 would not even connect.
    websocket_through("    upstream_protocol: HTTP2\n").await;
}

#[tokio::test]
async fn websocket_on_a_chain_fixed_to_http1() {
    let ca = ca();
    let (addr, _) = ws_backend().await;
    let yaml = config("[]", &route_to("ws"), &cluster("ws", &[addr], "")).replace(
        "route_config_name: echo\n",
        "route_config_name: echo\n          codec_type: HTTP1\n",
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    let resp = s
        .send_request(upgrade_request("/ws", "Upgrade", "websocket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    exchange(resp).await;
    // Still HTTP/1.1 only: HTTP/2 is not served.
    let mut h2 = c.h2(VIP).await;
    let req = Request::builder()
        .uri("http://echo/two")
        .body(Full::default())
        .unwrap();
    assert!(h2.send_request(req).await.is_err());
}

#[tokio::test]
async fn an_upgrade_after_requests_on_the_same_connection() {
    let ca = ca();
    let (addr, seen) = ws_backend().await;
    let yaml = config("[]", &route_to("ws"), &cluster("ws", &[addr], ""));
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    // The upgrade goes on the upstream connection these requests used.
    for _ in 0..2 {
        let req = Request::builder()
            .uri("/plain")
            .header("host", "echo")
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&mut s, req).await.body, "plain /plain");
    }
    let resp = s
        .send_request(upgrade_request("/ws", "Upgrade", "websocket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    exchange(resp).await;
    assert_eq!(seen.lock().unwrap().len(), 3);
    // The waypoint still serves new connections as before.
    let mut s = h1_upgradable(&c).await;
    let req = Request::builder()
        .uri("/after")
        .header("host", "echo")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&mut s, req).await.body, "plain /after");
}

#[tokio::test]
async fn an_l7_deny_refuses_an_upgrade_with_403() {
    let ca = ca();
    let (addr, seen) = ws_backend().await;
    let deny_private = r#"
            - action: DENY
              policies:
                no-private: {permissions: [{paths: [{prefix: /ws/private}]}]}"#;
    let yaml = config(deny_private, &route_to("ws"), &cluster("ws", &[addr], ""));
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    let r = send(
        &mut s,
        upgrade_request("/ws/private", "Upgrade", "websocket"),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.headers.get("upgrade").is_none());
    assert!(seen.lock().unwrap().is_empty());
    // What the policy allows switches, on the same client connection.
    let resp = s
        .send_request(upgrade_request("/ws/public", "Upgrade", "websocket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    exchange(resp).await;
    assert_eq!(seen.lock().unwrap()[0].0, "/ws/public");
}

#[tokio::test]
async fn a_backend_refusing_the_upgrade_is_passed_back() {
    let ca = ca();
    let (addr, seen) = ws_backend().await;
    let yaml = config("[]", &route_to("ws"), &cluster("ws", &[addr], ""));
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    let r = send(&mut s, upgrade_request("/refuse", "Upgrade", "websocket")).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (400, "no upgrade here")
    );
    // It did reach the backend as an upgrade request.
    assert_eq!(seen.lock().unwrap()[0].2["upgrade"], "websocket");
    // A backend ignoring the upgrade answers as usual.
    let r = send(&mut s, upgrade_request("/ignored", "Upgrade", "websocket")).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (200, "plain /ignored")
    );
    // The client's connection is still an HTTP one.
    let req = Request::builder()
        .uri("/next")
        .header("host", "echo")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&mut s, req).await.body, "plain /next");
}

#[tokio::test]
async fn an_h2c_upgrade_is_dropped_and_other_upgrades_are_refused() {
    let ca = ca();
    let (addr, seen) = ws_backend().await;
    let yaml = config("[]", &route_to("ws"), &cluster("ws", &[addr], ""));
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    let mut req = upgrade_request("/ws", "Upgrade, HTTP2-Settings", "h2c");
    req.headers_mut().insert(
        "http2-settings",
        "AAMAAABkAARAAAAAAAIAAAAA".parse().unwrap(),
    );
    let r = send(&mut s, req).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "plain /ws"));
    let h = seen.lock().unwrap()[0].2.clone();
    for gone in ["upgrade", "connection", "http2-settings"] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h:?}");
    }
    // Any other protocol: 403, as Envoy answers, without reaching the
    // backend, and the connection closes (what follows may not be HTTP).
    let mut s = h1_upgradable(&c).await;
    let r = send(&mut s, upgrade_request("/ws", "Upgrade", "foo/2")).await;
    assert_eq!(r.status.as_u16(), 403);
    assert_eq!(r.headers["connection"], "close");
    let closed = tokio::time::timeout(Duration::from_secs(5), s.ready()).await;
    assert!(matches!(closed, Ok(Err(_))), "connection still open");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A destination-side HBONE terminator passing TCP for `backend` through.
fn terminator(backend: SocketAddr) -> String {
    format!(
        r#"listeners:
  - name: hbone
    filter_chains:
      - filter_chain_match: {{destination_port: {port}, prefix_ranges: ["{ip}/32"]}}
        tcp_proxy: {{cluster: local}}
clusters:
{cluster}"#,
        port = backend.port(),
        ip = backend.ip(),
        cluster = cluster("local", &[backend], ""),
    )
}

#[tokio::test]
async fn websocket_to_a_mesh_endpoint_over_hbone() {
    let ca = ca();
    let (addr, seen) = ws_backend().await;
    let dest = waypoint(ca.clone(), &terminator(addr), "echo").await;
    let mesh = format!(
        r#"  - name: mesh
    load_assignment:
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: "{}", port_value: {}}}}}}}
              metadata: {{identity: "spiffe://cluster.local/ns/default/sa/echo", hbone_port: {}}}
"#,
        addr.ip(),
        addr.port(),
        dest.hbone_addr.port()
    );
    let wp = waypoint(
        ca.clone(),
        &config("[]", &route_to("mesh"), &mesh),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let mut s = h1_upgradable(&c).await;
    let resp = s
        .send_request(upgrade_request("/ws", "Upgrade", "websocket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    exchange(resp).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
}
