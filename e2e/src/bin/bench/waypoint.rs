//! `bench waypoint`: HTTP/1.1 and HTTP/2 requests per second and latency
//! at a fixed concurrency, on one test bed, in one run:
//!
//! | target          | path                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | direct          | client (node a) -> server (node b)                                |
//! | nginx           | client -> nginx (node w) -> server                                |
//! | waypoint        | client -> waypoint's plaintext listener (node w) -> server        |
//! | L4 mesh         | client -> ztunnel a -> HBONE -> ztunnel b -> server               |
//! | waypoint mesh   | client -> ztunnel a -> HBONE -> waypoint -> HBONE -> ztunnel b -> server |
//!
//! nginx and the waypoint run with the same number of workers
//! (`--workers`) and the same upstream keep-alive, and send the backend
//! the same request (the same forwarding headers; checked before the
//! measurement), so "nginx vs waypoint" compares the two L7 engines on
//! the same footing, doing the same job; the mesh rows show
//! what the whole waypoint path costs over L4 only and over direct.
//!
//! Every process shares the machine's cores with whatever else runs there,
//! so each target is measured in `--rounds` rounds taken in turn with the
//! others (a burst of load from elsewhere falls on all targets alike), and
//! the CPU time nginx and the waypoint spend per request is reported too:
//! unlike requests per second, it hardly depends on what else is running.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use e2e::mesh::http_get;
use e2e::{ChildGuard, Testbed};
use serde_json::{json, Map};

use crate::httpload::{self, LoadResult, Proto, Samples};
use crate::load::stopped;
use crate::procstat;
use crate::report::{self, Better, Machine, Process, Report, Row, Target, SCHEMA_VERSION};

const SERVER_PORT: u16 = 8080;
const PLAIN_PORT: u16 = 8090;
const NGINX_H1: u16 = 8081;
const NGINX_H2: u16 = 8082;
const VIP_L4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const VIP_L7: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
const READY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);

#[derive(clap::Args, Debug, Clone)]
pub struct WaypointArgs {
    /// Seconds measured per target and protocol, split over the rounds
    /// (each after a 1 s warm-up).
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,
    /// Rounds per protocol; each measures every target in turn. On a
    /// 2-vCPU machine one round's req/s moves by up to 15% either way, so
    /// a comparison with nginx within that needs about ten.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Requests in flight at any time.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// HTTP/2 connections the concurrent streams are spread over.
    #[arg(long, default_value_t = 4)]
    pub h2_connections: usize,
    /// Worker threads of the waypoint, worker processes of nginx.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Pin both proxies' workers, one per CPU: nginx's
    /// `worker_cpu_affinity auto`, the waypoint's `--pin-workers`. Where
    /// the kernel puts two workers that share the CPUs with the load
    /// generator and the backend moves p99 more than either proxy does;
    /// pinned, that placement is the same for both.
    #[arg(long)]
    pub pin_workers: bool,
    /// Write `waypoint.json` and `waypoint.md` to this directory.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Directory holding the `waypoint` and `ztunnel` binaries [default:
    /// next to this executable].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx: PathBuf,
    /// Measure only nginx against the waypoint's plaintext listener (no
    /// direct or mesh targets), for quick before/after runs of the L7
    /// engine; the report then has the reverse-proxy rows only.
    #[arg(long)]
    pub reverse_proxy_only: bool,
    /// Measure only this protocol (`http1` or `http2`) [default: both].
    #[arg(long, value_parser = ["http1", "http2"])]
    pub protocol: Option<String>,
}

fn bin(dir: Option<&Path>, name: &str) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("the bench executable has no directory"))?
            .to_path_buf(),
    };
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p {name}` (or pass --bin-dir)",
            p.display()
        );
    }
    Ok(p)
}

fn wait_ready(child: &ChildGuard, netns: &str, what: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        if stopped() {
            return Err(crate::load::interrupted_error());
        }
        if !child.is_running() {
            bail!("{what} exited before becoming ready; log:\n{}", child.log());
        }
        if matches!(http_get(netns, READY, "/healthz/ready"), Ok((200, _))) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} not ready after 30 s; log:\n{}", child.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Ips {
    client: IpAddr,
    direct: IpAddr,
    server: IpAddr,
    waypoint: IpAddr,
    nginx: IpAddr,
}

fn state_yaml(ip: &Ips) -> String {
    format!(
        "workloads:\n\
         \x20 - {{name: client, namespace: default, serviceAccount: client, node: a, addresses: [{}]}}\n\
         \x20 - {{name: server, namespace: default, serviceAccount: server, node: b, addresses: [{}], services: [default/server]}}\n\
         \x20 - {{name: waypoint, namespace: default, serviceAccount: waypoint, node: w, addresses: [{}], services: [default/server-l7]}}\n\
         services:\n\
         \x20 - {{name: server, namespace: default, addresses: [{VIP_L4}], ports: [{{port: 80, targetPort: {SERVER_PORT}}}]}}\n\
         \x20 - {{name: server-l7, namespace: default, addresses: [{VIP_L7}], ports: [{{port: 80, targetPort: {SERVER_PORT}}}]}}\n",
        ip.client, ip.server, ip.waypoint
    )
}

fn waypoint_yaml(ip: &Ips) -> String {
    let endpoint = |meta: &str| {
        format!(
            "    load_assignment: {{endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {SERVER_PORT}}}}}}}{meta}}}]}}]}}\n",
            ip.server
        )
    };
    format!(
        r#"listeners:
  - name: waypoint
    filter_chains:
      - name: mesh
        filter_chain_match: {{destination_port: {SERVER_PORT}, prefix_ranges: ["{wp}/32"]}}
        http_connection_manager: {{route_config_name: mesh}}
      - name: plain
        filter_chain_match: {{destination_port: {PLAIN_PORT}}}
        http_connection_manager: {{route_config_name: plain}}
route_configurations:
  - name: mesh
    virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: server-mesh}}}}]}}]
  - name: plain
    virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: server-plain}}}}]}}]
clusters:
  - name: server-mesh
{mesh}  - name: server-plain
{plain}"#,
        wp = ip.waypoint,
        mesh = endpoint(", metadata: {identity: \"spiffe://cluster.local/ns/default/sa/server\"}"),
        plain = endpoint(""),
    )
}

/// nginx as a reverse proxy doing what the waypoint does to each request
/// (as Envoy does): the client's `Host` kept, its address appended to
/// `X-Forwarded-For`, and `X-Forwarded-Proto` and `X-Request-Id` added
/// unless the client sent them. `run` checks that the backend gets the
/// same from both.
fn nginx_conf(dir: &Path, ip: &Ips, workers: usize, pin: bool) -> String {
    let d = dir.display();
    let affinity = if pin {
        "worker_cpu_affinity auto;\n"
    } else {
        ""
    };
    format!(
        r#"worker_processes {workers};
{affinity}daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fastcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  # A client's own X-Forwarded-Proto and X-Request-Id are kept.
  map $http_x_forwarded_proto $forwarded_proto {{ "" $scheme; default $http_x_forwarded_proto; }}
  map $http_x_request_id $forwarded_request_id {{ "" $request_id; default $http_x_request_id; }}
  upstream backend {{ server {server}:{SERVER_PORT}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen {ng}:{NGINX_H1};
    listen {ng}:{NGINX_H2} http2;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $forwarded_proto;
      proxy_set_header X-Request-Id $forwarded_request_id;
    }}
  }}
}}
"#,
        server = ip.server,
        ng = ip.nginx,
    )
}

pub fn run(args: &WaypointArgs) -> Result<Report> {
    let waypoint_bin = bin(args.bin_dir.as_deref(), "waypoint")?;
    let ztunnel_bin = bin(args.bin_dir.as_deref(), "ztunnel")?;
    if !args.nginx.is_file() {
        bail!(
            "nginx not found at {} (scripts/setup.sh installs Debian's)",
            args.nginx.display()
        );
    }
    let tb = Testbed::new().context("creating the test bed")?;
    let a = tb.add_node("a")?;
    let b = tb.add_node("b")?;
    let w = tb.add_node("w")?;
    let v4 = |p: &e2e::Pod| IpAddr::V4(p.ipv4());
    let ip = Ips {
        client: v4(&tb.add_host_pod(&a, "client")?),
        direct: v4(&tb.add_host_pod(&a, "direct")?),
        server: v4(&tb.add_host_pod(&b, "server")?),
        waypoint: v4(&tb.add_host_pod(&w, "waypoint")?),
        nginx: v4(&tb.add_host_pod(&w, "nginx")?),
    };
    let dir = tb.dir().to_path_buf();
    let (ca_cert, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let state = dir.join("state.yaml");
    std::fs::write(&state, state_yaml(&ip))?;
    let wp_conf = dir.join("waypoint.yaml");
    std::fs::write(&wp_conf, waypoint_yaml(&ip))?;
    let ng_conf = dir.join("nginx.conf");
    std::fs::write(
        &ng_conf,
        nginx_conf(&dir, &ip, args.workers, args.pin_workers),
    )?;

    // Server on node b, load from node a: threads of this process.
    let server_rt = httpload::runtime_in(b.netns(), 1)?;
    httpload::start_server(&server_rt, SocketAddr::new(ip.server, SERVER_PORT))?;
    let client_rt = httpload::runtime_in(a.netns(), 2)?;
    e2e::mesh::capture_outbound(a.netns(), ip.client)?;
    // A route for the service VIPs, so connects to them reach the capture.
    e2e::ip_netns_exec(
        a.netns(),
        &["ip", "route", "add", "10.96.0.0/16", "dev", "eth0"],
    )?;

    let mut guards: Vec<ChildGuard> = Vec::new();
    for node in [&a, &b] {
        let mut cmd = Command::new(&ztunnel_bin);
        cmd.args(["--node", node.name()])
            .arg("--local-state")
            .arg(&state)
            .arg("--ca-cert")
            .arg(&ca_cert)
            .arg("--ca-key")
            .arg(&ca_key)
            .env("RUST_LOG", "warn");
        let z = tb.spawn(node.netns(), cmd)?;
        wait_ready(&z, node.netns(), &format!("ztunnel {}", node.name()))?;
        guards.push(z);
    }
    let mut cmd = Command::new(&waypoint_bin);
    cmd.arg("--config")
        .arg(&wp_conf)
        .args([
            "--identity",
            "spiffe://cluster.local/ns/default/sa/waypoint",
        ])
        .arg("--ca-cert")
        .arg(&ca_cert)
        .arg("--ca-key")
        .arg(&ca_key)
        .args([
            "--hbone-addr",
            &SocketAddr::new(ip.waypoint, 15008).to_string(),
        ])
        .args([
            "--plaintext-addr",
            &SocketAddr::new(ip.waypoint, PLAIN_PORT).to_string(),
        ])
        .args(["--own-ip", &ip.waypoint.to_string()])
        .args(["--worker-threads", &args.workers.to_string()])
        .env("RUST_LOG", "warn");
    if args.pin_workers {
        cmd.arg("--pin-workers");
    }
    let wp = tb.spawn(w.netns(), cmd)?;
    wait_ready(&wp, w.netns(), "waypoint")?;
    let wp_idle = procstat::rss_mib(wp.pid())?;
    let mut cmd = Command::new(&args.nginx);
    cmd.arg("-c").arg(&ng_conf).arg("-p").arg(&dir);
    let ng = tb.spawn(w.netns(), cmd)?;
    let start = Instant::now();
    while e2e::tcp_connect_in(w.netns(), SocketAddr::new(ip.nginx, NGINX_H1)).is_err() {
        if start.elapsed() > Duration::from_secs(10) || !ng.is_running() {
            bail!("nginx did not start; log:\n{}", ng.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let host = "server.default.svc.cluster.local";
    // The two L7 engines are compared doing the same job: the backend gets
    // the same request from either.
    let [via_nginx, via_waypoint] = [
        SocketAddr::new(ip.nginx, NGINX_H1),
        SocketAddr::new(ip.waypoint, PLAIN_PORT),
    ]
    .map(|dst| httpload::forwarded_by(&client_rt, ip.direct, dst, host));
    let (via_nginx, via_waypoint) = (via_nginx?, via_waypoint?);
    if via_nginx != via_waypoint {
        bail!(
            "nginx and the waypoint do not send the backend the same request:\n  nginx:    {via_nginx}\n  waypoint: {via_waypoint}"
        );
    }

    let rounds = args.rounds.max(1);
    let duration = Duration::from_secs(args.duration_secs.max(1)) / rounds;
    let warmup = Duration::from_secs(1);
    let targets = [
        (
            "direct",
            ip.direct,
            SocketAddr::new(ip.server, SERVER_PORT),
            SocketAddr::new(ip.server, SERVER_PORT),
        ),
        (
            "nginx",
            ip.direct,
            SocketAddr::new(ip.nginx, NGINX_H1),
            SocketAddr::new(ip.nginx, NGINX_H2),
        ),
        (
            "waypoint",
            ip.direct,
            SocketAddr::new(ip.waypoint, PLAIN_PORT),
            SocketAddr::new(ip.waypoint, PLAIN_PORT),
        ),
        (
            "L4 mesh",
            ip.client,
            SocketAddr::new(IpAddr::V4(VIP_L4), 80),
            SocketAddr::new(IpAddr::V4(VIP_L4), 80),
        ),
        (
            "waypoint mesh",
            ip.client,
            SocketAddr::new(IpAddr::V4(VIP_L7), 80),
            SocketAddr::new(IpAddr::V4(VIP_L7), 80),
        ),
    ];
    let targets: Vec<_> = targets
        .into_iter()
        .filter(|(name, ..)| !args.reverse_proxy_only || matches!(*name, "nginx" | "waypoint"))
        .collect();
    let protocols: Vec<Proto> = [Proto::Http1, Proto::Http2]
        .into_iter()
        .filter(|p| match args.protocol.as_deref() {
            Some("http1") => *p == Proto::Http1,
            Some("http2") => *p == Proto::Http2,
            _ => true,
        })
        .collect();
    let load_start = procstat::loadavg_1m();
    // (protocol, target) -> samples of every round, and the CPU seconds the
    // L7 engine serving the target (nginx or the waypoint) spent on them.
    let mut measured: Vec<(Proto, &str, Samples, f64)> = Vec::new();
    let mut wp_cpu = 0.0;
    for &proto in &protocols {
        for round in 0..rounds {
            for &(name, src, h1, h2) in &targets {
                let dst = if proto == Proto::Http1 { h1 } else { h2 };
                let engine = match name {
                    "nginx" => Some(ng.pid()),
                    "waypoint" | "waypoint mesh" => Some(wp.pid()),
                    _ => None,
                };
                let cpu = |pid: Option<u32>| pid.map(procstat::tree_cpu_seconds).transpose();
                let cpu0 = cpu(engine)?;
                let load = httpload::Load {
                    proto,
                    src,
                    dst,
                    host: host.into(),
                    concurrency: args.concurrency,
                    h2_connections: args.h2_connections,
                    warmup,
                    duration,
                };
                let s = httpload::run(&client_rt, &load)
                    .with_context(|| format!("{} load via {name}", proto.name()))?;
                let spent = match (cpu(engine)?, cpu0) {
                    (Some(c1), Some(c0)) => c1 - c0,
                    _ => 0.0,
                };
                if name.starts_with("waypoint") {
                    wp_cpu += spent;
                }
                let r = s.summary();
                eprintln!(
                    "bench: {:8} {:14} round {}/{rounds} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  errors {}  load {:.1}",
                    proto.name(),
                    name,
                    round + 1,
                    r.rps,
                    r.p50_us,
                    r.p99_us,
                    r.errors,
                    procstat::loadavg_1m(),
                );
                if r.requests == 0 {
                    bail!("{} via {name}: no request succeeded", proto.name());
                }
                match measured
                    .iter_mut()
                    .find(|(p, n, _, _)| *p == proto && *n == name)
                {
                    Some((_, _, all, c)) => {
                        all.merge(s);
                        *c += spent;
                    }
                    None => measured.push((proto, name, s, spent)),
                }
            }
        }
    }
    let load_end = procstat::loadavg_1m();
    let results: Vec<(Proto, &str, LoadResult)> = measured
        .iter()
        .map(|(p, n, s, _)| (*p, *n, s.summary()))
        .collect();
    for (p, n, r) in &results {
        eprintln!(
            "bench: {:8} {:14} all rounds {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  errors {}",
            p.name(),
            n,
            r.rps,
            r.p50_us,
            r.p99_us,
            r.errors
        );
    }
    // CPU time of the L7 engine per request answered, in µs.
    let cpu_per_request = |p: Proto, n: &str| {
        measured
            .iter()
            .find(|(rp, rn, _, _)| *rp == p && *rn == n)
            .map(|(_, _, s, c)| c / s.completed.max(1) as f64 * 1e6)
            .expect("measured")
    };

    let get = |p: Proto, n: &str| {
        results
            .iter()
            .find(|(rp, rn, _)| *rp == p && *rn == n)
            .map(|(_, _, r)| r.clone())
    };
    let mut rows = Vec::new();
    let mut targets_met = Vec::new();
    for &proto in &protocols {
        for (base, mesh, label) in [
            ("nginx", "waypoint", "reverse proxy nginx vs waypoint"),
            ("L4 mesh", "waypoint mesh", "mesh L4-only vs via waypoint"),
            ("direct", "waypoint mesh", "direct vs mesh via waypoint"),
        ] {
            // Targets left out (`--reverse-proxy-only`) have no rows.
            let (Some(b), Some(m)) = (get(proto, base), get(proto, mesh)) else {
                continue;
            };
            let sc = format!("{} {label}", proto.name());
            rows.push(Row::new(&sc, "rps", "req/s", b.rps, m.rps, Better::Higher));
            rows.push(Row::new(&sc, "p50", "us", b.p50_us, m.p50_us, Better::Lower).with_delta());
            rows.push(Row::new(&sc, "p99", "us", b.p99_us, m.p99_us, Better::Lower).with_delta());
            if base == "nginx" {
                eprintln!(
                    "bench: {:8} CPU per request: nginx {:.1} us, waypoint {:.1} us",
                    proto.name(),
                    cpu_per_request(proto, base),
                    cpu_per_request(proto, mesh),
                );
                rows.push(Row::new(
                    &sc,
                    "cpu_per_request",
                    "us",
                    cpu_per_request(proto, base),
                    cpu_per_request(proto, mesh),
                    Better::Lower,
                ));
            }
        }
        let (Some(n), Some(wpr)) = (get(proto, "nginx"), get(proto, "waypoint")) else {
            continue;
        };
        targets_met.push(Target::new(
            &format!("{} waypoint rps / nginx rps", proto.name()),
            (wpr.rps / n.rps * 1000.0).round() / 1000.0,
            "x",
            ">=",
            1.0,
        ));
        targets_met.push(Target::new(
            &format!("{} waypoint p99 / nginx p99", proto.name()),
            (wpr.p99_us / n.p99_us * 1000.0).round() / 1000.0,
            "x",
            "<=",
            1.0,
        ));
    }
    let log = wp.log();
    let mut config = Map::new();
    config.insert("duration_secs".into(), json!(args.duration_secs));
    config.insert("rounds".into(), json!(rounds));
    config.insert("concurrency".into(), json!(args.concurrency));
    config.insert("h2_connections".into(), json!(args.h2_connections));
    config.insert("workers".into(), json!(args.workers));
    config.insert("reverse_proxy_only".into(), json!(args.reverse_proxy_only));
    config.insert("pin_workers".into(), json!(args.pin_workers));
    let mut by = Map::new();
    by.insert("waypoint targets".into(), json!(wp_cpu));
    let report = Report {
        schema_version: SCHEMA_VERSION,
        benchmark: "waypoint".into(),
        baseline_label: "baseline".into(),
        mesh_label: "waypoint".into(),
        timestamp_unix: report::unix_now(),
        machine: Machine::detect(),
        config,
        results: rows,
        processes: vec![Process {
            name: "waypoint".into(),
            idle_rss_mb: wp_idle,
            peak_rss_mb: procstat::hwm_mib(wp.pid())?,
            cpu_seconds: wp_cpu,
            cpu_seconds_by_scenario: by,
            log_warnings: log.matches(" WARN ").count(),
            log_errors: log.matches(" ERROR ").count(),
        }],
        targets: targets_met,
        notes: vec![
            format!(
                "{} requests in flight; HTTP/2 over {} connections; nginx {} worker processes, waypoint {} worker threads{}; upstream keep-alive for both.",
                args.concurrency,
                args.h2_connections,
                args.workers,
                args.workers,
                if args.pin_workers {
                    ", each pinned to a CPU"
                } else {
                    ""
                }
            ),
            format!(
                "Client, server, ztunnels, waypoint and nginx share the machine's cores; compare rows of one run. Each target was measured in {rounds} rounds taken in turn; 1-minute load average {load_start:.1} at the start, {load_end:.1} at the end."
            ),
            "cpu_per_request: CPU time (user + system) of nginx's processes or the waypoint's over the measurement, per request answered.".into(),
        ],
    };
    drop(ng);
    drop(wp);
    drop(guards);
    drop(client_rt);
    drop(server_rt);
    drop(tb);
    Ok(report)
}
