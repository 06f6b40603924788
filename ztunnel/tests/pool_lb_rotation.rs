//! The HBONE connection pool, service load balancing, passthrough, and
//! certificate rotation under traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;

fn pool_connections(c: &Cluster) -> u64 {
    c.config_dump(&c.a)["hbonePoolConnections"]
        .as_u64()
        .unwrap()
}

#[test]
fn pool_shares_one_handshake_limits_streams_and_evicts_idle() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        extra_args: vec![
            "--pool-max-streams".into(),
            "4".into(),
            "--pool-idle-timeout".into(),
            "1s".into(),
        ],
        ..Default::default()
    });
    // A burst of 4 tunnels started at the same instant: one handshake.
    let barrier = Arc::new(Barrier::new(4));
    let c = Arc::new(c);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (c, barrier) = (c.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut s = c.socks(&c.client, c.vip()).unwrap();
                echo_roundtrip(&mut s, b"burst").unwrap();
                s
            })
        })
        .collect();
    let mut open: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(pool_connections(&c), 1, "a burst must share one handshake");
    // Past the stream limit, a second connection opens.
    for _ in 0..3 {
        let mut s = c.socks(&c.client, c.vip()).unwrap();
        echo_roundtrip(&mut s, b"more").unwrap();
        open.push(s);
    }
    assert_eq!(pool_connections(&c), 2);
    // Another source identity never shares a connection.
    let mut s = c.socks(&c.other, c.vip()).unwrap();
    echo_roundtrip(&mut s, b"other").unwrap();
    assert_eq!(pool_connections(&c), 3);
    drop(s);
    drop(open);
    wait_until(Duration::from_secs(10), "idle eviction", || {
        pool_connections(&c) == 0
    });
    // And it comes back on demand.
    echo_roundtrip(&mut c.socks(&c.client, c.vip()).unwrap(), b"again").unwrap();
}

#[test]
fn service_balances_over_healthy_endpoints_and_unknown_destinations_pass_through() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options::default());
    let e1 = c.tb.add_host_pod(&c.b, "e1").unwrap();
    let e2 = c.tb.add_host_pod(&c.b, "e2").unwrap();
    let e3 = c.tb.add_host_pod(&c.b, "e3").unwrap();
    for (pod, name) in [(&e1, "e1"), (&e2, "e2"), (&e3, "e3")] {
        spawn_named(
            c.b.netns(),
            SocketAddr::new(IpAddr::V4(pod.ipv4()), 9000),
            name,
        );
    }
    let extra = format!(
        r#"
  - {{name: e1, namespace: default, serviceAccount: echo, node: b, addresses: [{}], services: [default/named]}}
  - {{name: e2, namespace: default, serviceAccount: echo, node: b, addresses: [{}], services: [default/named]}}
  - {{name: e3, namespace: default, serviceAccount: echo, node: b, addresses: [{}], services: [default/named], status: Unhealthy}}
"#,
        e1.ipv4(),
        e2.ipv4(),
        e3.ipv4()
    );
    let named = "\n  - {name: named, namespace: default, addresses: [10.96.0.11], ports: [{port: 90, targetPort: 9000}]}\n";
    for node in ["a", "b"] {
        let yaml = c.state_yaml("echo", "").replacen(
            "services:\n",
            &format!("{extra}services:{named}"),
            1,
        );
        let before = c.state_version(if node == "a" { &c.a } else { &c.b });
        write_atomic(&c.state_path(node), &yaml);
        wait_until(Duration::from_secs(5), "reload", || {
            c.state_version(if node == "a" { &c.a } else { &c.b }) > before
        });
    }
    let vip: SocketAddr = "10.96.0.11:90".parse().unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let mut s = c.socks(&c.client, vip).unwrap();
        *seen.entry(read_all(&mut s)).or_default() += 1;
    }
    assert!(
        !seen.contains_key("e3"),
        "unhealthy endpoint got traffic: {seen:?}"
    );
    assert!(seen.get("e1").copied().unwrap_or(0) >= 5, "{seen:?}");
    assert!(seen.get("e2").copied().unwrap_or(0) >= 5, "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 40, "{seen:?}");
    // A port the service does not expose has no route.
    assert_eq!(
        c.socks(&c.client, "10.96.0.11:91".parse().unwrap())
            .unwrap_err(),
        4
    );
    // An address the mesh does not know is passed through unchanged.
    spawn_named(
        c.b.netns(),
        SocketAddr::new(IpAddr::V4(c.b.ipv4()), 9100),
        "outside",
    );
    let mut s = c
        .socks(&c.client, SocketAddr::new(IpAddr::V4(c.b.ipv4()), 9100))
        .unwrap();
    assert_eq!(read_all(&mut s), "outside");
}

#[test]
fn certificates_rotate_under_a_long_lived_connection() {
    if !root_or_skip() {
        return;
    }
    let c = Cluster::start(Options {
        extra_args: vec!["--cert-ttl".into(), "4s".into()],
        ..Default::default()
    });
    let serial = |node| -> Option<String> {
        let d = c.config_dump(node);
        d["certificates"].as_array()?.iter().find(|x| {
            x["identity"]
                .as_str()
                .is_some_and(|i| i.ends_with("/sa/client"))
        })?["serial"]
            .as_str()
            .map(String::from)
    };
    let mut long = c.socks(&c.client, c.vip()).unwrap();
    echo_roundtrip(&mut long, b"before rotation").unwrap();
    let first = serial(&c.a).unwrap();
    wait_until(Duration::from_secs(10), "rotation", || {
        serial(&c.a).is_some_and(|s| s != first)
    });
    // Past the first certificate's expiry the old connection still flows...
    thread::sleep(Duration::from_secs(3));
    echo_roundtrip(&mut long, b"after rotation").unwrap();
    // ...and new tunnels go over a new connection with the new certificate.
    echo_roundtrip(&mut c.socks(&c.client, c.vip()).unwrap(), b"new").unwrap();
    assert!(
        pool_connections(&c) >= 2,
        "new tunnel reused the old certificate's connection"
    );
}
