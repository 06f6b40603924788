//! Two nodes, one ztunnel each, traffic over HBONE: routing, identities,
//! encryption on the wire, policy, metrics and `/config_dump`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

const DENY_CLIENT_TO_ECHO: &str = r#"policies:
  - name: deny-client
    namespace: default
    scope: WorkloadSelector
    selector: {app: echo}
    action: Deny
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/default/sa/client"]
"#;

#[test]
fn service_vip_reaches_server_over_hbone_with_identities() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let mut s = c.socks(&c.client, c.vip()).expect("tunnel to the VIP");
    echo_roundtrip(&mut s, b"hello through the mesh").unwrap();
    drop(s);
    // IPv6 VIP and direct pod address work as well.
    let v6 = SocketAddr::new("fd00:96::10".parse().unwrap(), SERVICE_PORT);
    let mut s = c.socks(&c.client, v6).expect("tunnel to the v6 VIP");
    echo_roundtrip(&mut s, b"v6").unwrap();
    drop(s);
    let mut s = c
        .socks(&c.client, c.echo_addr())
        .expect("tunnel to the pod");
    echo_roundtrip(&mut s, b"pod").unwrap();
    drop(s);

    // Both ends saw the same two identities over mutual TLS.
    let client_id = "spiffe://cluster.local/ns/default/sa/client";
    let echo_id = "spiffe://cluster.local/ns/default/sa/echo";
    let opened = "istio_tcp_connections_opened_total";
    wait_until(Duration::from_secs(5), "metrics on both nodes", || {
        let src_p = format!("source_principal=\"{client_id}\"");
        let dst_p = format!("destination_principal=\"{echo_id}\"");
        let labels_src = [
            "reporter=\"source\"",
            &src_p,
            &dst_p,
            "connection_security_policy=\"mutual_tls\"",
        ];
        let labels_dst = [
            "reporter=\"destination\"",
            &src_p,
            &dst_p,
            "destination_workload=\"echo\"",
        ];
        counter(&c.metrics(&c.a), opened, &labels_src) == 3
            && counter(&c.metrics(&c.b), opened, &labels_dst) == 3
            && counter(
                &c.metrics(&c.b),
                "istio_tcp_connections_closed_total",
                &["reporter=\"destination\""],
            ) == 3
    });
    let m = c.metrics(&c.a);
    assert!(
        counter(
            &m,
            "istio_tcp_received_bytes_total",
            &["reporter=\"source\""]
        ) >= 27,
        "{m}"
    );
    assert!(
        counter(
            &m,
            "istio_tcp_connections_opened_total",
            &["destination_service=\"echo.default.svc.cluster.local\""]
        ) >= 2
    );
    // The receiving side names the service too (the workload's service
    // that maps to the port), as Istio's destination reporting does.
    assert_eq!(
        counter(
            &c.metrics(&c.b),
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "destination_service=\"echo.default.svc.cluster.local\"",
                "destination_service_name=\"echo\"",
            ]
        ),
        3
    );
    // One access-log line per connection, naming both identities.
    let log = c.zb().log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection complete") && l.contains("inbound"))
        .collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(
        lines[0].contains(client_id) && lines[0].contains(echo_id),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("bytes_sent=22") && lines[0].contains("bytes_recv=22"),
        "{}",
        lines[0]
    );
}

#[test]
fn access_log_counts_bytes_of_a_reset_connection() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let mut s = c.socks(&c.client, c.vip()).unwrap();
    echo_roundtrip(&mut s, b"12345").unwrap();
    // Close with an RST: the connection ends in an error, but the bytes it
    // moved are still reported.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    wait_until(Duration::from_secs(5), "access log line", || {
        c.za().log().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("bytes_sent=5")
                && l.contains("bytes_recv=5")
                && !l.contains("error=\"-\"")
        })
    });
}

#[test]
fn link_between_nodes_never_carries_payload_in_clear() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let secret = b"TOP-SECRET-PAYLOAD-7f3a9c";
    let cap = c.tb.capture(c.a.netns(), "eth0").unwrap();
    let mut s = c.socks(&c.client, c.vip()).unwrap();
    for _ in 0..20 {
        echo_roundtrip(&mut s, secret).unwrap();
    }
    drop(s);
    // Control: the same bytes to a destination outside the mesh do cross in
    // clear, so the capture would have seen them.
    let plain = SocketAddr::new(IpAddr::V4(c.plain.ipv4()), ECHO_PORT);
    let mut s = c
        .socks(&c.client, plain)
        .expect("plaintext to a non-mesh pod");
    echo_roundtrip(&mut s, b"CONTROL-IN-CLEAR").unwrap();
    drop(s);
    let pcap = cap.stop().unwrap();
    assert!(
        e2e::contains(&pcap, b"CONTROL-IN-CLEAR"),
        "capture saw nothing"
    );
    assert!(
        !e2e::contains(&pcap, secret),
        "payload crossed the link in clear"
    );
    // And the tunnel really crossed this link (TLS on 15008 is there).
    assert!(
        pcap.len() > 20 * secret.len(),
        "too little traffic captured"
    );
}

#[test]
fn peer_with_wrong_identity_is_refused() {
    if !root_or_skip() {
        return;
    }
    // Node a expects the echo pod to run as `expected`; node b presents the
    // certificate of its real account `echo`.
    let c = Cluster::start(Options {
        echo_sa_seen_by_a: "expected".into(),
        ..Default::default()
    });
    let err = c.socks(&c.client, c.echo_addr()).unwrap_err();
    assert_eq!(err, 1, "general failure expected");
    wait_until(Duration::from_secs(5), "log of the refusal", || {
        c.za().log().contains("is not one of the expected")
    });
}

#[test]
fn certificate_from_another_root_is_refused() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        b_has_own_root: true,
        ..Default::default()
    });
    assert!(c.socks(&c.client, c.echo_addr()).is_err());
    wait_until(Duration::from_secs(5), "log of the refusal", || {
        c.za().log().contains("not signed by a trusted root")
    });
    // Node a's ztunnel still serves traffic that does not need node b.
    let plain = SocketAddr::new(IpAddr::V4(c.plain.ipv4()), ECHO_PORT);
    echo_roundtrip(&mut c.socks(&c.client, plain).unwrap(), b"ok").unwrap();
}

#[test]
fn allow_and_deny_policies_hold() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        policies: r#"policies:
  - name: only-client
    namespace: default
    scope: Namespace
    action: Allow
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/default/sa/client"]
  - name: no-v6
    namespace: default
    scope: WorkloadSelector
    selector: {app: echo}
    action: Deny
    rules:
      - clauses:
          - matches:
              - destinationIps: ["fd00::/16"]
"#
        .into(),
        ..Default::default()
    });
    echo_roundtrip(&mut c.socks(&c.client, c.vip()).unwrap(), b"allowed").unwrap();
    assert_eq!(
        c.socks(&c.other, c.vip()).unwrap_err(),
        2,
        "other must be denied"
    );
    let v6 = SocketAddr::new(IpAddr::V6(c.echo.ipv6()), ECHO_PORT);
    assert_eq!(
        c.socks(&c.client, v6).unwrap_err(),
        2,
        "DENY must win over ALLOW"
    );
    let log = c.zb().log();
    assert!(log.contains("no ALLOW policy matched"), "{log}");
    assert!(log.contains("denied by policy default/no-v6"), "{log}");
}

#[test]
fn denied_and_failed_connections_are_counted_with_response_flags() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        policies: DENY_CLIENT_TO_ECHO.into(),
        ..Default::default()
    });
    // Denied by node b's policy.
    assert_eq!(c.socks(&c.client, c.vip()).unwrap_err(), 2);
    // Nothing listens on the echo pod's port 9: node b cannot connect.
    let closed_port = SocketAddr::new(IpAddr::V4(c.echo.ipv4()), 9);
    assert!(c.socks(&c.other, closed_port).is_err());
    // Nor can node a reach a plain (non-mesh) pod's closed port.
    let plain_closed = SocketAddr::new(IpAddr::V4(c.plain.ipv4()), 9);
    assert!(c.socks(&c.other, plain_closed).is_err());

    let closed = "istio_tcp_connections_closed_total";
    let (src, dst) = ("reporter=\"source\"", "reporter=\"destination\"");
    let (deny, connect) = ("response_flags=\"DENY\"", "response_flags=\"CONNECT\"");
    let client_p = "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"";
    let other_p = "source_principal=\"spiffe://cluster.local/ns/default/sa/other\"";
    let echo_p = "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"";
    let echo_svc = "destination_service=\"echo.default.svc.cluster.local\"";
    let plain_w = "destination_workload=\"plain\"";
    let expected: [(&str, &[&str]); 5] = [
        // The receiving side, with the labels it knew at that point.
        ("b", &[dst, deny, client_p, echo_p, echo_svc]),
        ("b", &[dst, connect, other_p, echo_p]),
        // The sending side: the peer's refusal, and both failures to
        // connect (through the tunnel, and plain TCP, which has no
        // identities).
        ("a", &[src, deny, client_p, echo_p, echo_svc]),
        ("a", &[src, connect, other_p, echo_p]),
        ("a", &[src, connect, "source_workload=\"other\"", plain_w]),
    ];
    wait_until(
        Duration::from_secs(5),
        "refusals in both nodes' metrics",
        || {
            let (ma, mb) = (c.metrics(&c.a), c.metrics(&c.b));
            expected.iter().all(|(node, needles)| {
                let m = if *node == "a" { &ma } else { &mb };
                counter(m, closed, needles) == 1
            })
        },
    );
    // Opened as Istio counts them, without a flag; nothing opened or closed
    // is left without its close.
    for (m, reporter) in [
        (c.metrics(&c.a), "source"),
        (c.metrics(&c.b), "destination"),
    ] {
        let r = format!("reporter=\"{reporter}\"");
        let opened = counter(&m, "istio_tcp_connections_opened_total", &[&r]);
        assert_eq!(opened, counter(&m, closed, &[&r]), "{m}");
        assert_eq!(
            counter(
                &m,
                "istio_tcp_connections_opened_total",
                &[&r, "response_flags=\"DENY\""]
            ),
            0
        );
    }
    // Each refusal keeps its access-log line, now naming both parties.
    let log = c.zb().log();
    assert!(
        log.lines().any(|l| l.contains("connection refused")
            && l.contains("response_flags=\"DENY\"")
            && l.contains("spiffe://cluster.local/ns/default/sa/client")
            && l.contains("denied by policy default/deny-client")),
        "{log}"
    );
    let log = c.za().log();
    assert!(
        log.lines().any(|l| l.contains("connection refused")
            && l.contains("response_flags=\"CONNECT\"")
            && l.contains(&plain_closed.to_string())),
        "{log}"
    );
}

#[tokio::test]
async fn inbound_access_log_names_the_real_client_address() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let tls = connect_tls(&c, client_config(&c).await).await.unwrap();
    let peer = tls.get_ref().0.local_addr().unwrap();
    let (mut sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    // One tunnel with no Forwarded header, one whose header has a port.
    for forwarded in [None, Some("for=\"10.244.1.77:4711\"")] {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(c.echo_addr().to_string());
        if let Some(f) = forwarded {
            req = req.header("forwarded", f);
        }
        let (resp, mut send) = sender.send_request(req.body(()).unwrap(), false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        send.send_data(bytes::Bytes::from_static(b"hi"), true)
            .unwrap();
        let mut body = resp.into_body();
        while let Some(d) = body.data().await {
            if d.is_err() {
                break;
            }
        }
    }
    // The HBONE connection's own address when nothing else is known; the
    // forwarded address and port when the peer sent them.
    for addr in [peer.to_string(), "10.244.1.77:4711".to_string()] {
        let needle = format!("src.addr={addr} ");
        wait_until(Duration::from_secs(5), &needle, || {
            c.zb()
                .log()
                .lines()
                .any(|l| l.contains("connection complete") && l.contains(&needle))
        });
    }
    assert!(!c.zb().log().contains(&format!("src.addr={}:0 ", peer.ip())));
}

#[test]
fn policy_change_closes_open_connections_it_no_longer_allows() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let mut open = c.socks(&c.client, c.vip()).unwrap();
    echo_roundtrip(&mut open, b"before").unwrap();
    let mut other = c.socks(&c.other, c.vip()).unwrap();
    echo_roundtrip(&mut other, b"before").unwrap();

    c.set_policies(DENY_CLIENT_TO_ECHO);

    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    match open.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("connection still open, read {n} bytes"),
    }
    // The unaffected connection keeps flowing; new ones from client are
    // refused.
    echo_roundtrip(&mut other, b"after").unwrap();
    assert_eq!(c.socks(&c.client, c.vip()).unwrap_err(), 2);
    assert!(c.zb().log().contains("closed: no longer allowed by policy"));
}

#[test]
fn config_dump_and_readiness_reflect_state() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let dump = c.config_dump(&c.b);
    assert_eq!(dump["node"], "b");
    let names: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["client", "echo", "other", "plain"]);
    assert_eq!(
        dump["services"][0]["hostname"],
        "echo.default.svc.cluster.local"
    );
    // Node b holds a certificate for its own workload only.
    wait_until(Duration::from_secs(5), "certificate", || {
        let d = c.config_dump(&c.b);
        d["certificates"].as_array().is_some_and(|certs| {
            certs.len() == 1
                && certs[0]["identity"] == "spiffe://cluster.local/ns/default/sa/echo"
                && certs[0]["state"] == "Available"
                && certs[0]["not_after"].is_string()
        })
    });
    let certs_a = c.config_dump(&c.a)["certificates"].clone();
    let ids: Vec<&str> = certs_a
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap())
        .collect();
    assert!(!ids.iter().any(|i| i.ends_with("/sa/echo")), "{ids:?}");
    // A policy shows up once written.
    c.set_policies(DENY_CLIENT_TO_ECHO);
    assert_eq!(c.config_dump(&c.b)["policies"][0]["name"], "deny-client");
}

#[test]
fn plaintext_inbound_and_outbound_capture_with_redirect() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        policies: r#"policies:
  - name: from-node-a-pods-only
    namespace: default
    scope: WorkloadSelector
    selector: {app: echo}
    action: Allow
    rules:
      - clauses:
          - matches:
              - sourceIps: ["10.244.1.0/24"]
                notPrincipals: ["cluster.local/ns/default/sa/other"]
"#
        .into(),
        ..Default::default()
    });
    // Node b captures inbound traffic for its pods onto 15006 (the way
    // Istio's iptables mode does), except HBONE and ztunnel's own sockets.
    e2e::mesh::capture_inbound(c.b.netns(), IpAddr::V4(c.echo.ipv4())).unwrap();
    // Node a captures its client pod's outbound traffic onto 15001.
    e2e::mesh::capture_outbound(c.a.netns(), IpAddr::V4(c.client.ipv4())).unwrap();

    // The outsider (not in the mesh, not captured on a) reaches echo in
    // plaintext; node b captures it on 15006 and the policy allows its IP.
    let mut s = e2e::tcp_connect_from_in(c.a.netns(), IpAddr::V4(c.outsider.ipv4()), c.echo_addr())
        .unwrap();
    echo_roundtrip(&mut s, b"plaintext inbound").unwrap();
    drop(s);
    // The captured client goes through 15001 and HBONE, unchanged client
    // code. REDIRECT happens after routing, so the VIP needs a route, as a
    // node's default route would give it.
    e2e::ip_netns_exec(
        c.a.netns(),
        &["ip", "route", "add", "10.96.0.0/16", "dev", "eth0"],
    )
    .unwrap();
    let mut s =
        e2e::tcp_connect_from_in(c.a.netns(), IpAddr::V4(c.client.ipv4()), c.vip()).unwrap();
    echo_roundtrip(&mut s, b"captured outbound").unwrap();
    drop(s);
    wait_until(Duration::from_secs(5), "both paths in the metrics", || {
        let m = c.metrics(&c.b);
        counter(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "connection_security_policy=\"unknown\"",
            ],
        ) == 1
            && counter(
                &m,
                "istio_tcp_connections_opened_total",
                &[
                    "reporter=\"destination\"",
                    "connection_security_policy=\"mutual_tls\"",
                ],
            ) == 1
    });
    // A source outside the allowed range (node a's own address) is denied
    // on the plaintext path.
    let mut s = e2e::tcp_connect_in(c.a.netns(), c.echo_addr()).unwrap();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = std::io::Write::write_all(&mut s, b"x");
    let mut buf = [0u8; 1];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "source outside the ALLOW range must be denied"
    );
    wait_until(Duration::from_secs(5), "denial in the log", || {
        c.zb().log().contains("src.addr=172.30.0.1")
    });
    // ...and counted as Istio does: closed with response_flags DENY.
    wait_until(Duration::from_secs(5), "denial in the metrics", || {
        counter(
            &c.metrics(&c.b),
            "istio_tcp_connections_closed_total",
            &[
                "reporter=\"destination\"",
                "response_flags=\"DENY\"",
                "connection_security_policy=\"unknown\"",
                "destination_workload=\"echo\"",
            ],
        ) == 1
    });
}

#[test]
fn captured_client_speaking_first_arrives_whole_in_order_and_counted() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    e2e::mesh::capture_outbound(c.a.netns(), IpAddr::V4(c.client.ipv4())).unwrap();
    // The client writes right after connecting, so ztunnel a usually finds
    // the first bytes waiting and sends them with the CONNECT; the message
    // is larger than what goes early, so the rest must follow in order.
    let msg: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        let mut s =
            e2e::tcp_connect_from_in(c.a.netns(), IpAddr::V4(c.client.ipv4()), c.echo_addr())
                .unwrap();
        echo_roundtrip(&mut s, &msg).unwrap();
        echo_roundtrip(&mut s, b"and more").unwrap();
    }
    let total = msg.len() + b"and more".len();
    wait_until(Duration::from_secs(5), "three access-log lines", || {
        c.za()
            .log()
            .lines()
            .filter(|l| {
                l.contains("connection complete")
                    && l.contains("outbound")
                    && l.contains(&format!("bytes_recv={total} "))
                    && l.contains(&format!("bytes_sent={total} "))
            })
            .count()
            == 3
    });
    let received = |m: &str, reporter: &str| {
        counter(
            m,
            "istio_tcp_received_bytes_total",
            &[&format!("reporter=\"{reporter}\"")],
        )
    };
    assert_eq!(received(&c.metrics(&c.a), "source"), 3 * total as u64);
    wait_until(Duration::from_secs(5), "bytes on node b", || {
        received(&c.metrics(&c.b), "destination") == 3 * total as u64
    });
}

/// Reads until the peer ends the connection: `Ok` for a clean close (EOF),
/// the error for a reset.
fn read_until_end(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut b = [0u8; 64];
    loop {
        if s.read(&mut b)? == 0 {
            return Ok(());
        }
    }
}

#[test]
fn a_reset_crosses_the_tunnel_as_a_reset_and_a_close_as_a_close() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let addr = SocketAddr::new(IpAddr::V4(c.echo.ipv4()), 7001);
    let listener = e2e::tcp_listen_in(c.b.netns(), addr).unwrap();
    let reset = |s: std::net::TcpStream| {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    };
    let connect = || {
        let mut s = c.socks(&c.client, addr).unwrap();
        s.write_all(b"hi").unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut b = [0u8; 2];
        server.read_exact(&mut b).unwrap();
        (s, server)
    };

    // The client aborts: the server must see a reset, not a clean end.
    let (client, mut server) = connect();
    reset(client);
    let e = read_until_end(&mut server).expect_err("the server saw a clean close");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");

    // The server aborts: so does the client's connection.
    let (mut client, server) = connect();
    reset(server);
    let e = read_until_end(&mut client).expect_err("the client saw a clean close");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");

    // A clean close stays clean both ways.
    let (client, mut server) = connect();
    drop(client);
    read_until_end(&mut server).unwrap();
    let (mut client, server) = connect();
    drop(server);
    read_until_end(&mut client).unwrap();
}
