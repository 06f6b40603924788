//! Protocol sniffing: one destination, an HTTP chain for sniffed HTTP and
//! a TCP chain for everything else (Envoy's `application_protocols`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// A TCP server that greets, then echoes.
async fn greeter() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.write_all(b"hello from tcp\n").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if &buf[..n] == b"reset" {
                        // Dropped with a zero linger: a TCP reset.
                        let _ = s.set_zero_linger();
                        break;
                    }
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn http_and_opaque_tcp_share_a_destination() {
    let ca = ca();
    let v1 = backend("v1").await;
    let tcp = greeter().await;
    let yaml = format!(
        r#"listeners:
  - name: waypoint
    filter_chains:
      - name: http
        filter_chain_match: {{destination_port: 80, application_protocols: [http/1.1, h2c]}}
        http_connection_manager: {{route_config_name: r}}
      - name: tcp
        filter_chain_match: {{destination_port: 80}}
        tcp_proxy: {{cluster: tcp}}
route_configurations:
  - name: r
    virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: v1}}}}]}}]
clusters:
{}{}"#,
        cluster("v1", &[v1.addr], ""),
        cluster("tcp", &[tcp], "")
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    // HTTP/1.1 and HTTP/2 are recognised and routed.
    assert_eq!(c.get("/h1", &[]).await.body, "v1 /h1");
    let mut h2 = c.h2(VIP).await;
    let req = http::Request::builder()
        .uri("http://echo/h2")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    assert_eq!(v1.hits(), 2);
    // Client-first bytes that are not HTTP go to the TCP cluster.
    let mut io = c.tunnel(VIP).await.unwrap();
    io.write_all(b"\x00\x01binary").await.unwrap();
    let mut got = vec![0u8; b"hello from tcp\n\x00\x01binary".len()];
    io.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b"hello from tcp\n\x00\x01binary");
    // A server-first protocol: the client waits, sniffing gives up, TCP.
    let mut io = c.tunnel(VIP).await.unwrap();
    let mut greeting = vec![0u8; b"hello from tcp\n".len()];
    io.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello from tcp\n");
    assert_eq!(v1.hits(), 2);
    // The backend's reset reaches the client as a reset of its stream, not
    // as an orderly end, which it could not tell from a complete exchange.
    io.write_all(b"reset").await.unwrap();
    let mut rest = Vec::new();
    let end = io.read_to_end(&mut rest).await;
    assert!(end.is_err(), "reset read as an end: {end:?}");
}

#[test]
fn only_sniffable_protocols_are_accepted() {
    let yaml = "listeners: [{name: l, filter_chains: [{filter_chain_match: {application_protocols: [mysql]}, tcp_proxy: {cluster: a}}]}]\nclusters: [{name: a}]";
    let b = waypoint::config::parse_yaml(yaml).unwrap();
    let e = waypoint::config::Store::empty().apply(&b).unwrap_err();
    assert_eq!(
        e.path,
        "listeners[0].filter_chains[0].filter_chain_match.application_protocols[0]"
    );
}
