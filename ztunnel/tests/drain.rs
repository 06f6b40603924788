//! SIGTERM drains: ztunnel reports not ready, stops accepting, lets open
//! connections finish, and exits as soon as the last one closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn sigterm_drains_open_connections_then_exits() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        extra_args: vec!["--drain-timeout".into(), "30s".into()],
        ..Default::default()
    });
    let mut open = c.socks(&c.client, c.vip()).unwrap();
    echo_roundtrip(&mut open, b"before").unwrap();
    // Node b's side of that tunnel is draining too: its HBONE connection
    // gets GOAWAY but the open stream keeps flowing.
    let mut open_b = c.socks(&c.other, c.vip()).unwrap();
    echo_roundtrip(&mut open_b, b"before").unwrap();

    c.za().signal(Signal::SIGTERM).unwrap();
    c.zb().signal(Signal::SIGTERM).unwrap();
    let ready: SocketAddr = "127.0.0.1:15021".parse().unwrap();
    wait_until(Duration::from_secs(5), "readiness to drop", || {
        http_get(c.a.netns(), ready, "/healthz/ready").is_ok_and(|(code, _)| code == 503)
    });
    // No new connections: the listeners close right after readiness drops
    // (polled, as the two happen one after the other).
    let socks: SocketAddr = SOCKS.parse().unwrap();
    wait_until(
        Duration::from_secs(5),
        "a draining ztunnel to stop accepting",
        || e2e::tcp_connect_from_in(c.a.netns(), c.client.ipv4().into(), socks).is_err(),
    );
    // ...but the open ones keep working, through both draining ztunnels.
    std::thread::sleep(Duration::from_millis(500));
    echo_roundtrip(&mut open, b"during drain").unwrap();
    echo_roundtrip(&mut open_b, b"during drain").unwrap();
    assert!(c.za().is_running() && c.zb().is_running());

    // Once the last connection closes, both exit cleanly, long before the
    // 30 s drain timeout.
    drop(open);
    drop(open_b);
    for z in [c.za(), c.zb()] {
        let status = z
            .wait_exit_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("ztunnel did not exit after its connections closed");
        assert!(status.success(), "{status:?}\n{}", z.log());
    }
    assert!(c.za().log().contains("draining"));
}

#[test]
fn connections_cut_by_the_drain_timeout_are_still_logged() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        extra_args: vec!["--drain-timeout".into(), "1s".into()],
        ..Default::default()
    });
    let mut open = c.socks(&c.client, c.vip()).unwrap();
    echo_roundtrip(&mut open, b"before").unwrap();
    for z in [c.za(), c.zb()] {
        z.signal(Signal::SIGTERM).unwrap();
    }
    // The connection stays open past the timeout: both ztunnels cut it.
    for z in [c.za(), c.zb()] {
        z.wait_exit_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("ztunnel did not exit after the drain timeout");
    }
    for (z, direction) in [(c.za(), "outbound"), (c.zb(), "inbound")] {
        let log = z.log();
        assert!(
            log.lines().any(|l| l.contains("connection complete")
                && l.contains(direction)
                && l.contains("bytes_sent=6")
                && l.contains("cut by the drain timeout")),
            "{log}"
        );
    }
    drop(open);
}
