//! Opting in to a waypoint, on the test bed: the real `waypoint` binary
//! runs as two replicas (nodes `w1` and `w2`) and forwards the echo
//! service's TCP to its endpoint on node b over HBONE. Before the echo
//! service names the waypoint, node a's ztunnel reaches it directly; after
//! the state file gains `waypoint:` (no restart), connections go to the
//! waypoint replicas, both of which take traffic, and the echo pod sees
//! the waypoint's identity. When one replica dies, new connections still
//! all succeed (ztunnel tries the other replica).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use e2e::{ChildGuard, Node, Pod};

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const WAYPOINT_VIP: &str = "10.96.0.20";

/// The `waypoint` binary, built next to this package's `ztunnel` binary
/// (`cargo build --workspace`, which `scripts/test.sh` runs first); it
/// cannot be a dependency (it depends on ztunnel).
fn waypoint_bin() -> Option<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ztunnel")).with_file_name("waypoint");
    bin.exists().then_some(bin)
}

/// Waypoint configuration: TCP to the echo VIP goes to the echo pod,
/// through node b's ztunnel over HBONE, accepting only echo's identity.
fn waypoint_yaml(echo_ip: IpAddr) -> String {
    format!(
        r#"listeners:
  - name: waypoint
    filter_chains:
      - name: echo
        filter_chain_match: {{destination_port: {SERVICE_PORT}, prefix_ranges: ["{VIP}/32"]}}
        tcp_proxy: {{cluster: echo}}
clusters:
  - name: echo
    load_assignment:
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: "{echo_ip}", port_value: {ECHO_PORT}}}}}}}
              metadata: {{identity: "spiffe://cluster.local/ns/default/sa/echo", workload: echo, namespace: default}}
"#
    )
}

fn start_waypoint(
    c: &Cluster,
    bin: &std::path::Path,
    node: &Node,
    pod: &Pod,
    config: &std::path::Path,
) -> ChildGuard {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(["--identity", WAYPOINT_ID])
        .arg("--ca-cert")
        .arg(&c.ca_cert)
        .arg("--ca-key")
        .arg(&c.ca_key)
        .arg("--hbone-addr")
        .arg(format!("{}:15008", pod.ipv4()))
        .args(["--socket-mark", "0"])
        .env("RUST_LOG", "info");
    let child = c.tb.spawn(node.netns(), cmd).expect("spawn waypoint");
    let ns = node.netns().to_string();
    wait_until(Duration::from_secs(15), "waypoint readiness", || {
        http_get(&ns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
            .map(|(code, _)| code == 200)
            .unwrap_or(false)
    });
    child
}

/// The cluster's state plus the two waypoint replicas and their service;
/// with `opted_in`, the echo service names the waypoint.
fn state_with_waypoint(c: &Cluster, wps: &[&Pod], opted_in: bool) -> String {
    let base = c.state_yaml("echo", "");
    let mut replicas = String::new();
    for (i, p) in wps.iter().enumerate() {
        replicas += &format!(
            "  - {{name: wp-{n}, namespace: default, serviceAccount: waypoint, node: w{n}, addresses: [{ip}], labels: {{app: waypoint}}, services: [default/waypoint]}}\n",
            n = i + 1,
            ip = p.ipv4()
        );
    }
    let echo_ports = format!("    ports: [{{port: {SERVICE_PORT}, targetPort: {ECHO_PORT}}}]\n");
    let mut services = echo_ports.clone();
    if opted_in {
        services += "    waypoint: {service: default/waypoint}\n";
    }
    services += &format!(
        "  - {{name: waypoint, namespace: default, addresses: [{WAYPOINT_VIP}], ports: [{{port: 15008}}]}}\n"
    );
    base.replacen("services:\n", &format!("{replicas}services:\n"), 1)
        .replacen(&echo_ports, &services, 1)
}

fn write_both(c: &Cluster, yaml: &str) {
    let before = [c.state_version(&c.a), c.state_version(&c.b)];
    write_atomic(&c.state_path("a"), yaml);
    write_atomic(&c.state_path("b"), yaml);
    wait_until(Duration::from_secs(10), "state reload", || {
        c.state_version(&c.a) > before[0] && c.state_version(&c.b) > before[1]
    });
}

/// Connections from the client to the echo VIP that node a's ztunnel
/// reported as going to `workload`.
fn opened_to(c: &Cluster, workload: &str) -> u64 {
    counter(
        &c.metrics(&c.a),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            &format!("destination_workload=\"{workload}\""),
        ],
    )
}

#[test]
fn opted_in_service_goes_through_waypoint_replicas_without_restart() {
    if !root_or_skip() {
        return;
    }
    let Some(bin) = waypoint_bin() else {
        eprintln!("skipping: no waypoint binary next to ztunnel (cargo build --workspace)");
        return;
    };
    let c = Cluster::start(Options::default());
    let w1 = c.tb.add_node("w1").unwrap();
    let w2 = c.tb.add_node("w2").unwrap();
    let wp1 = c.tb.add_host_pod(&w1, "wp-1").unwrap();
    let wp2 = c.tb.add_host_pod(&w2, "wp-2").unwrap();
    let config = c.tb.dir().join("waypoint.yaml");
    std::fs::write(&config, waypoint_yaml(IpAddr::V4(c.echo.ipv4()))).unwrap();
    let _g1 = start_waypoint(&c, &bin, &w1, &wp1, &config);
    let g2 = start_waypoint(&c, &bin, &w2, &wp2, &config);

    // Not opted in: straight to the echo pod at L4.
    write_both(&c, &state_with_waypoint(&c, &[&wp1, &wp2], false));
    for i in 0..5 {
        let mut s = c.socks(&c.client, c.vip()).expect("direct");
        echo_roundtrip(&mut s, format!("direct {i}").as_bytes()).unwrap();
    }
    wait_until(Duration::from_secs(5), "direct metrics", || {
        opened_to(&c, "echo") >= 5
    });
    assert_eq!(opened_to(&c, "wp-1") + opened_to(&c, "wp-2"), 0);

    // Opted in by editing the state only: through the waypoint replicas.
    write_both(&c, &state_with_waypoint(&c, &[&wp1, &wp2], true));
    let n = 40;
    for i in 0..n {
        let mut s = c.socks(&c.client, c.vip()).expect("through the waypoint");
        echo_roundtrip(&mut s, format!("via waypoint {i}").as_bytes()).unwrap();
    }
    wait_until(Duration::from_secs(5), "waypoint metrics", || {
        opened_to(&c, "wp-1") + opened_to(&c, "wp-2") >= n
    });
    let (to1, to2) = (opened_to(&c, "wp-1"), opened_to(&c, "wp-2"));
    assert!(
        to1 > 0 && to2 > 0,
        "both replicas take traffic: {to1} / {to2}"
    );
    // Node b saw the waypoint, not the client, as the source.
    let b = c.metrics(&c.b);
    assert!(
        counter(
            &b,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                &format!("source_principal=\"{WAYPOINT_ID}\""),
            ],
        ) > 0,
        "{b}"
    );

    // A replica that dies while the state still lists it (nothing has told
    // the control plane yet) costs no new connection: ztunnel finds it
    // unreachable and tries the other replica before failing the client.
    g2.kill9().unwrap();
    let before1 = opened_to(&c, "wp-1");
    let m = 20;
    for i in 0..m {
        let mut s = c
            .socks(&c.client, c.vip())
            .unwrap_or_else(|e| panic!("connection {i} with replica 2 dead: {e}"));
        echo_roundtrip(&mut s, format!("one dead {i}").as_bytes()).unwrap();
    }
    wait_until(Duration::from_secs(5), "failover metrics", || {
        opened_to(&c, "wp-1") >= before1 + m
    });

    // A replica gone from the state is no longer used.
    write_both(&c, &state_with_waypoint(&c, &[&wp1], true));
    let before2 = opened_to(&c, "wp-2");
    for i in 0..10 {
        let mut s = c.socks(&c.client, c.vip()).expect("one replica left");
        echo_roundtrip(&mut s, format!("one left {i}").as_bytes()).unwrap();
    }
    assert_eq!(opened_to(&c, "wp-2"), before2);
}
