//! Bad input: malformed HTTP, oversized headers, a misbehaving HTTP/2
//! client, invalid configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint::config::{parse_yaml, watch_file, Store};

use common::*;

fn simple(backend: std::net::SocketAddr) -> String {
    config(
        "[]",
        "          - match: {prefix: /}\n            route: {cluster: v1}\n",
        &cluster("v1", &[backend], ""),
    )
}

async fn raw_exchange(c: &Client, bytes: &[u8]) -> String {
    let mut io = c.tunnel(VIP).await.unwrap();
    io.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_http1_gets_400() {
    let ca = ca();
    let v1 = backend("v1").await;
    let wp = waypoint(ca.clone(), &simple(v1.addr), "waypoint").await;
    let c = client(ca, "client", &wp);
    let out = raw_exchange(&c, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    let out = raw_exchange(&c, b"\x01\x02garbage that is not http\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    // A host that is not one gets a clear answer, not a crash.
    let out = raw_exchange(
        &c,
        b"GET / HTTP/1.1\r\nHost: [abc\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    assert_eq!(v1.hits(), 0);
    // The waypoint is fine afterwards.
    assert_eq!(c.get("/", &[]).await.status, 200);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let ca = ca();
    let v1 = backend("v1").await;
    let wp = waypoint(ca.clone(), &simple(v1.addr), "waypoint").await;
    let c = client(ca, "client", &wp);
    let big = "a".repeat(64 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let out = raw_exchange(&c, req.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{:?}",
        &out[..out.len().min(100)]
    );
    assert_eq!(v1.hits(), 0);
    // Over HTTP/2 the stream is refused; the connection keeps working.
    let mut h2 = c.h2(VIP).await;
    let req = http::Request::builder()
        .uri("http://echo/")
        .header("x-big", big.as_str())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    match h2.send_request(req).await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(!e.is_closed(), "{e}"),
    }
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn a_misbehaving_http2_client_does_not_hurt_other_streams() {
    let ca = ca();
    let v1 = backend("v1").await;
    let wp = waypoint(ca.clone(), &simple(v1.addr), "waypoint").await;
    let c = client(ca, "client", &wp);
    // A good HTTP/2 client inside one tunnel...
    let mut good = c.h2(VIP).await;
    let get = || {
        http::Request::builder()
            .uri("http://echo/ok")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    assert_eq!(good.send_request(get()).await.unwrap().status(), 200);
    // ...while on the same HBONE connection another tunnel sends the
    // preface, then a HEADERS frame whose HPACK block is garbage, then
    // a frame on stream 0 of an unknown type with a bogus length.
    let mut bad = c.tunnel(VIP).await.unwrap();
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
    frames.extend_from_slice(&[0, 0, 4, 1, 5, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
    frames.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0, 0, 0, 0, 0]);
    bad.write_all(&frames).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), bad.read_to_end(&mut out)).await;
    // The waypoint answered with a GOAWAY (frame type 7).
    assert!(frame_types(&out).contains(&7), "{out:?}");
    for _ in 0..5 {
        assert_eq!(good.send_request(get()).await.unwrap().status(), 200);
    }
    assert_eq!(c.get("/", &[]).await.status, 200);
}

#[tokio::test]
async fn a_bad_regex_is_rejected_and_the_previous_config_stays() {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let good = simple(v1.addr);
    let wp = waypoint(ca.clone(), &good, "waypoint").await;
    let c = client(ca, "client", &wp);
    let bad = config(
        "[]",
        "          - match: {safe_regex: {regex: '/(unclosed'}}\n            route: {cluster: v2}\n",
        &cluster("v2", &[v2.addr], ""),
    );
    let err = wp
        .proxy
        .store
        .apply(&parse_yaml(&bad).unwrap())
        .unwrap_err();
    assert_eq!(
        err.path,
        "route_configurations[0].virtual_hosts[0].routes[0].match.safe_regex.regex"
    );
    assert!(err.message.contains("invalid regex"), "{}", err.message);
    assert_eq!(wp.proxy.store.last_error(), Some(err.to_string()));
    assert_eq!(c.get("/still", &[]).await.body, "v1 /still");
    let dump = admin_get(&wp, "/config_dump").await;
    assert!(dump.contains("invalid regex"), "{dump}");
}

#[tokio::test]
async fn the_file_is_reloaded_and_bad_edits_are_ignored() {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("waypoint.yaml");
    std::fs::write(&path, simple(v1.addr)).unwrap();
    let wp = waypoint(ca.clone(), &simple(v1.addr), "waypoint").await;
    let store = wp.proxy.store.clone();
    watch_file(path.clone(), store.clone(), Duration::from_millis(20))
        .await
        .unwrap();
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/", &[]).await.body, "v1 /");
    // A bad edit: unknown cluster. Rejected, v1 still serves.
    let bad = config(
        "[]",
        "          - match: {prefix: /}\n            route: {cluster: nope}\n",
        &cluster("v2", &[v2.addr], ""),
    );
    std::fs::write(&path, bad).unwrap();
    wait_for(|| store.last_error().is_some()).await;
    assert!(store
        .last_error()
        .unwrap()
        .contains("unknown cluster \"nope\""));
    assert_eq!(c.get("/", &[]).await.body, "v1 /");
    // A YAML syntax error is also just recorded.
    std::fs::write(&path, "listeners: [").unwrap();
    wait_for(|| !store.last_error().unwrap().contains("nope")).await;
    assert_eq!(c.get("/", &[]).await.body, "v1 /");
    // A good edit goes live without a restart.
    std::fs::write(&path, simple(v2.addr).replace("v1", "v2")).unwrap();
    wait_for(|| store.last_error().is_none()).await;
    assert_eq!(c.get("/", &[]).await.body, "v2 /");
}

/// The types of the HTTP/2 frames in `b` (9-byte headers, 24-bit length).
fn frame_types(mut b: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while b.len() >= 9 {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        types.push(b[3]);
        b = &b[(9 + len).min(b.len())..];
    }
    types
}

async fn wait_for(f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never became true");
}

#[test]
fn validation_names_the_field() {
    let cases = [
        (
            "clusters: [{name: a}, {name: a}]",
            "clusters[1]",
            "duplicate cluster",
        ),
        (
            "route_configurations: [{name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /, path: /x}, route: {cluster: a}}]}]}]\nclusters: [{name: a}]",
            "route_configurations[0].virtual_hosts[0].routes[0].match",
            "exactly one of prefix",
        ),
        (
            "route_configurations: [{name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: a, timeout: soon}}]}]}]\nclusters: [{name: a}]",
            "route_configurations[0].virtual_hosts[0].routes[0].route.timeout",
            "needs a unit",
        ),
        (
            "route_configurations: [{name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, route: {weighted_clusters: {clusters: [{name: a, weight: 4294967295}, {name: a, weight: 1}]}}}]}]}]\nclusters: [{name: a}]",
            "route_configurations[0].virtual_hosts[0].routes[0].route.weighted_clusters",
            "add up to more than",
        ),
        (
            "listeners: [{name: l, filter_chains: [{http_connection_manager: {route_config_name: missing}}]}]",
            "listeners[0].filter_chains[0].http_connection_manager.route_config_name",
            "unknown route configuration",
        ),
        (
            "clusters: [{name: a, load_assignment: {endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: nohost, port_value: 1}}}}]}]}}]",
            "clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
            "not an IP",
        ),
    ];
    for (yaml, path, msg) in cases {
        let b = parse_yaml(yaml).unwrap();
        let e = Store::empty().apply(&b).unwrap_err();
        assert_eq!(e.path, path, "{yaml}");
        assert!(e.message.contains(msg), "{}: {}", e.path, e.message);
    }
    // Unknown fields are a parse error naming the place.
    let e = parse_yaml("clusters: [{name: a, colour: blue}]").unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
}

/// istiod's default retry policy names conditions this proxy does not act
/// on (`refused-stream`, gRPC's); like Envoy it takes the route and skips
/// them, rather than refusing every route istiod sends.
#[test]
fn istiods_default_retry_policy_is_taken() {
    let b = parse_yaml(
        "route_configurations: [{name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: a, retry_policy: {retry_on: 'connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes', retriable_status_codes: [503], num_retries: 2}}}]}]}]\nclusters: [{name: a}]",
    )
    .unwrap();
    Store::empty().apply(&b).unwrap();
}

#[test]
fn the_readme_example_is_valid() {
    let readme = include_str!("../README.md");
    let start = readme.find("```yaml\n").unwrap() + 8;
    let end = start + readme[start..].find("```").unwrap();
    let b = parse_yaml(&readme[start..end]).unwrap();
    Store::empty().apply(&b).unwrap();
}
