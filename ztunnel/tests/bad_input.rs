//! Bad input never takes ztunnel down: each gets a clear error or status
//! and ztunnel keeps serving with its last good state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};

fn still_serving(c: &Cluster) {
    let mut s = c
        .socks(&c.client, c.vip())
        .expect("ztunnel must keep serving");
    echo_roundtrip(&mut s, b"still here").unwrap();
}

#[test]
fn garbage_on_hbone_port_is_rejected_and_serving_continues() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let mut s = e2e::tcp_connect_in(c.a.netns(), hbone_addr(&c)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage")
        .unwrap();
    let mut buf = Vec::new();
    // TLS alert or close; never an HTTP answer.
    let _ = s.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/"), "{buf:?}");
    wait_until(Duration::from_secs(5), "log", || {
        c.zb().log().contains("TLS handshake failed")
    });
    still_serving(&c);
}

#[tokio::test]
async fn tls_client_without_certificate_is_refused() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    // ALPN h2 like a real peer, but no client certificate.
    let provider = ztunnel::tls::provider();
    let mut no_cert = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    // TLS 1.3 reports client-auth failure after the client's Finished: the
    // first read then fails with the server's alert.
    let result = async {
        let tls = connect_tls(&c, no_cert).await?;
        let (_send, conn) = h2::client::handshake(tls)
            .await
            .map_err(std::io::Error::other)?;
        conn.await.map_err(std::io::Error::other)
    }
    .await;
    assert!(result.is_err(), "handshake without a certificate succeeded");
    wait_until(Duration::from_secs(5), "log", || {
        let log = c.zb().log();
        log.contains("TLS handshake failed") && log.contains("peer sent no certificates")
    });
    still_serving(&c);
}

#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ztunnel::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn bad_requests_on_an_authenticated_connection_get_400() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let tls = connect_tls(&c, client_config(&c).await).await.unwrap();
    let (mut sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut status = |req: Request<()>| {
        let fut = sender.send_request(req, true).map(|(resp, _)| resp);
        async move { fut.unwrap().await.unwrap().status() }
    };
    let echo = c.echo_addr().to_string();
    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{echo}/"))
        .body(())
        .unwrap();
    assert_eq!(status(get).await, StatusCode::BAD_REQUEST);
    let not_an_address = Request::builder()
        .method(Method::CONNECT)
        .uri("echo.default:8080")
        .body(())
        .unwrap();
    assert_eq!(status(not_an_address).await, StatusCode::BAD_REQUEST);
    let not_this_workload = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{}:8080", c.plain.ipv4()))
        .body(())
        .unwrap();
    assert_eq!(status(not_this_workload).await, StatusCode::BAD_REQUEST);
    let closed_port = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{}:9", c.echo.ipv4()))
        .body(())
        .unwrap();
    assert_eq!(status(closed_port).await, StatusCode::SERVICE_UNAVAILABLE);
    // The same connection still carries a good request.
    let good = Request::builder()
        .method(Method::CONNECT)
        .uri(echo)
        .body(())
        .unwrap();
    let (resp, mut send) = sender.send_request(good, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    send.send_data(Bytes::from_static(b"ping"), false).unwrap();
    let mut body = resp.into_body();
    let got = body.data().await.unwrap().unwrap();
    assert_eq!(&got[..], b"ping");
    let log = c.zb().log();
    assert!(log.contains("is not an ip:port"), "{log}");
    assert!(log.contains("upstream connect failed"), "{log}");
}

#[test]
fn malformed_state_file_keeps_last_good_state() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let good = c.state_yaml("echo", "");
    let version = c.state_version(&c.a);
    for (bad, expect) in [
        (
            good.replace("serviceAccount: client", "serviceAccount: [oops"),
            "invalid",
        ),
        (good.replace(VIP, "10.96.0.300"), "services[0].addresses[0]"),
        (
            good.replace("services: [default/echo]", "services: [default/nope]"),
            "default/nope",
        ),
    ] {
        write_atomic(&c.state_path("a"), &bad);
        wait_until(Duration::from_secs(5), "rejection", || {
            c.config_dump(&c.a)["localStateError"]
                .as_str()
                .is_some_and(|e| e.contains(expect))
        });
        assert_eq!(c.state_version(&c.a), version, "bad state was applied");
        still_serving(&c);
    }
    write_atomic(&c.state_path("a"), &good);
    wait_until(Duration::from_secs(5), "recovery", || {
        c.config_dump(&c.a)["localStateError"].is_null()
    });
    assert!(c.za().log().contains("rejected local state change"));
}

#[test]
fn malformed_state_file_at_start_fails_with_a_clear_error() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let path = c.tb.dir().join("broken.yaml");
    std::fs::write(
        &path,
        "workloads:\n  - name: x\n    namespace: y\n    node: a\n    addresses: [nope]\n",
    )
    .unwrap();
    let out = e2e::ip_netns_exec_output(
        c.a.netns(),
        &[
            env!("CARGO_BIN_EXE_ztunnel"),
            "--node",
            "z",
            "--local-state",
            path.to_str().unwrap(),
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
            "--inbound-plaintext-addr",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.yaml") && err.contains("workloads[0].addresses[0]"),
        "{err}"
    );
}

/// An admin server on loopback answering 200 to everything.
async fn admin_on_loopback(limits: ztunnel::admin::Limits) -> SocketAddr {
    let l = ztunnel::admin::bind("127.0.0.1:0".parse().unwrap(), "test admin")
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let handler: ztunnel::admin::Handler =
        Arc::new(|_| http::Response::new(http_body_util::Full::new(Bytes::from_static(b"ok"))));
    ztunnel::admin::serve_with(l, handler, limits);
    addr
}

/// Whether the server ends the connection (EOF or reset) within `within`,
/// whatever it answers first.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut buf))
        .await
        .is_ok()
}

#[tokio::test]
async fn admin_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let addr = admin_on_loopback(ztunnel::admin::Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 4,
    })
    .await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Headers without their final empty line.
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "a client that never finished its headers kept its connection"
    );
    // One that sends nothing at all goes the same way.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn admin_connections_beyond_the_limit_are_closed() {
    use tokio::io::AsyncWriteExt;
    let addr = admin_on_loopback(ztunnel::admin::Limits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 2,
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)).await,
        "a connection beyond the limit was kept"
    );
    // A slot frees when a held connection ends; a real request is served.
    drop(held.pop());
    wait_until_async(Duration::from_secs(5), || async {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut buf = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), read).await,
            Ok(Ok(_))
        ) && String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
    })
    .await;
}

async fn wait_until_async<F, Fut>(timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out");
}
