//! `bench ztunnel`: the data path through two ztunnels (client pod on node
//! `a` -> iptables REDIRECT -> ztunnel a -> HBONE -> ztunnel b -> server pod
//! on node `b`) against the same client and server talking directly over the
//! same node-to-node link.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use e2e::mesh::http_get;
use e2e::{ChildGuard, Node, Testbed};
use serde_json::{json, Map, Value};

use crate::load::{self, stopped, Servers};
use crate::procstat;
use crate::relay;
use crate::report::{self, Better, Machine, Process, Report, Row, Target, SCHEMA_VERSION};

/// First of the three server ports (bulk, echo, churn).
const SERVER_BASE_PORT: u16 = 5001;
/// The mark ztunnel puts on its own sockets (its `--socket-mark` default).
const OUTBOUND_PORT: &str = "15001";
const READY_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);
const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const EPHEMERAL_PORTS: &str = "20000 65000";
const PAUSE: Duration = Duration::from_millis(500);
/// Port of the plain relays on both nodes (see `relay.rs`).
const RELAY_PORT: u16 = 5101;

#[derive(clap::Args, Debug, Clone)]
pub struct ZtunnelArgs {
    /// Seconds per measurement (bulk, request/response and connection churn,
    /// each for direct and for mesh).
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Write `ztunnel.json` and `ztunnel.md` to this directory.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The ztunnel binary [default: `ztunnel` next to this executable].
    #[arg(long, env = "ZTUNNEL_BIN")]
    pub ztunnel: Option<PathBuf>,
    /// Rounds of every scenario (alternating which path goes first); the
    /// medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Concurrent workers of the connection-churn load.
    #[arg(long, default_value_t = 4)]
    pub cps_workers: usize,
    /// How connection-churn connections end.
    #[arg(long, value_enum, default_value = "rst")]
    pub churn_close: load::Close,
    /// At most this many request/response round trips are recorded.
    #[arg(long, default_value_t = 50_000)]
    pub rr_max_round_trips: usize,
    /// ztunnel's `--worker-threads` [default: ztunnel's own].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Hold /dev/cpu_dma_latency at 0 during the run (machine-wide, released
    /// at exit), so idle CPUs poll instead of halting. On VMs a halted vCPU
    /// takes tens of microseconds to wake, which otherwise dominates and
    /// destabilises the latency figures, the direct ones most.
    #[arg(long)]
    pub no_deep_idle: bool,
    /// Copy both ztunnel logs to this directory at the end (also on failure).
    #[arg(long)]
    pub logs_dir: Option<PathBuf>,
}

pub(crate) fn locate_ztunnel(arg: Option<&Path>) -> Result<PathBuf> {
    const HINT: &str =
        "build it with `cargo build --release -p ztunnel` (or pass --ztunnel PATH / set ZTUNNEL_BIN)";
    let path = match arg {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("finding the bench executable")?
            .parent()
            .ok_or_else(|| anyhow!("the bench executable has no parent directory"))?
            .join("ztunnel"),
    };
    if !path.is_file() {
        bail!("ztunnel binary not found at {}: {HINT}", path.display());
    }
    if path.components().any(|c| c.as_os_str() == "debug") {
        eprintln!(
            "bench: WARNING: {} looks like a debug build; figures will not be representative",
            path.display()
        );
    }
    Ok(path)
}

/// PM QoS: while the returned file is open, CPUs stay out of idle states
/// with a wake-up latency above 0 us.
pub(crate) fn hold_cpu_dma_latency_zero() -> Result<std::fs::File> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .context("opening /dev/cpu_dma_latency (for --no-deep-idle)")?;
    f.write_all(&0i32.to_ne_bytes())
        .context("writing /dev/cpu_dma_latency")?;
    eprintln!("bench: holding /dev/cpu_dma_latency at 0 us for the run");
    Ok(f)
}

pub(crate) fn check_stop() -> Result<()> {
    if stopped() {
        Err(load::interrupted_error())
    } else {
        Ok(())
    }
}

/// Interruptible sleep.
pub(crate) fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_stop()?;
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
    check_stop()
}

/// Sum of a counter's samples over all label sets.
pub(crate) fn counter_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

#[derive(Debug, Clone, Copy)]
struct Conns {
    opened: f64,
    closed: f64,
}

fn conn_metrics(node: &Node) -> Result<Conns> {
    let (code, body) = http_get(node.netns(), METRICS_ADDR, "/metrics")
        .with_context(|| format!("reading ztunnel {}'s metrics", node.name()))?;
    if code != 200 {
        bail!("ztunnel {}'s /metrics answered {code}", node.name());
    }
    Ok(Conns {
        opened: counter_sum(&body, OPENED),
        closed: counter_sum(&body, CLOSED),
    })
}

pub(crate) fn log_tail(child: &ChildGuard, lines: usize) -> String {
    let log = child.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One ztunnel of the bed.
struct Zt<'a> {
    node: Node,
    child: &'a ChildGuard,
    idle_rss_mib: f64,
    cpu_by_scenario: Map<String, Value>,
    cpu_total: f64,
}

impl Zt<'_> {
    fn name(&self) -> String {
        format!("ztunnel-{}", self.node.name())
    }

    fn ensure_running(&self) -> Result<()> {
        if self.child.is_running() {
            Ok(())
        } else {
            bail!(
                "{} exited; last log lines:\n{}",
                self.name(),
                log_tail(self.child, 40)
            )
        }
    }

    fn cpu(&self) -> Result<f64> {
        procstat::cpu_seconds(self.child.pid())
    }
}

fn spawn_ztunnel(
    tb: &Testbed,
    node: &Node,
    bin: &Path,
    state: &Path,
    ca: (&Path, &Path),
    worker_threads: Option<usize>,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.args(["--node", node.name()])
        .arg("--local-state")
        .arg(state)
        .arg("--ca-cert")
        .arg(ca.0)
        .arg("--ca-key")
        .arg(ca.1)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    if let Some(n) = worker_threads {
        cmd.args(["--worker-threads", &n.to_string()]);
    }
    let child = tb
        .spawn(node.netns(), cmd)
        .with_context(|| format!("starting ztunnel on node {}", node.name()))?;
    let start = Instant::now();
    loop {
        check_stop()?;
        if !child.is_running() {
            bail!(
                "ztunnel on node {} exited before becoming ready; log:\n{}",
                node.name(),
                log_tail(&child, 40)
            );
        }
        if matches!(
            http_get(node.netns(), READY_ADDR, "/healthz/ready"),
            Ok((200, _))
        ) {
            eprintln!(
                "bench: ztunnel {} (pid {}) ready after {:?}",
                node.name(),
                child.pid(),
                start.elapsed()
            );
            return Ok(child);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "ztunnel on node {} not ready after 20 s; log:\n{}",
                node.name(),
                log_tail(&child, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Per-namespace TCP settings for connection churn (see the notes).
pub(crate) fn tune_netns(node: &Node) -> Result<()> {
    e2e::try_in_netns(node.netns(), || -> Result<()> {
        for (k, v) in [
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/ipv4/ip_local_port_range", EPHEMERAL_PORTS),
        ] {
            std::fs::write(format!("/proc/sys/{k}"), v)
                .with_context(|| format!("setting {k}={v} in {}", node.netns()))?;
        }
        Ok(())
    })?
}

/// Packets that hit the REDIRECT rule so far.
fn redirect_packets(node: &Node) -> Result<u64> {
    let out = e2e::ip_netns_exec(
        node.netns(),
        &["iptables", "-t", "nat", "-L", "OUTPUT", "-v", "-n", "-x"],
    )?;
    out.lines()
        .find(|l| l.contains("REDIRECT"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "no REDIRECT rule in node {}'s nat OUTPUT chain:\n{out}",
                node.name()
            )
        })
}

struct Paths {
    client: IpAddr,
    direct: IpAddr,
}

fn ping_echo(netns: &str, src: IpAddr, dst: SocketAddr) -> Result<()> {
    let mut s = load::connect(netns, src, dst)?;
    let msg = *b"bench-verify-0123456789abcdef";
    s.write_all(&msg)?;
    let mut back = [0u8; 29];
    s.read_exact(&mut back)
        .with_context(|| format!("reading the echo {src} -> {dst}"))?;
    if back != msg {
        bail!("echo {src} -> {dst} returned different bytes");
    }
    Ok(())
}

/// Proves that the mesh path goes through both ztunnels and the direct one
/// through neither. Returns human-readable evidence.
fn verify_paths(a: &Zt, b: &Zt, servers: &Servers, p: &Paths) -> Result<Vec<String>> {
    let mut evidence = Vec::new();
    let last_peer =
        || -> Option<SocketAddr> { servers.echo_last_peer.lock().ok().and_then(|g| *g) };

    // Direct: no ztunnel may see it.
    let (ma0, mb0, r0) = (
        conn_metrics(&a.node)?,
        conn_metrics(&b.node)?,
        redirect_packets(&a.node)?,
    );
    ping_echo(a.node.netns(), p.direct, servers.echo).context("direct path check")?;
    pause(Duration::from_millis(300))?;
    let (ma1, mb1, r1) = (
        conn_metrics(&a.node)?,
        conn_metrics(&b.node)?,
        redirect_packets(&a.node)?,
    );
    let peer = last_peer();
    if ma1.opened != ma0.opened || mb1.opened != mb0.opened || r1 != r0 {
        bail!(
            "the DIRECT path is not direct: ztunnel a opened {} -> {}, ztunnel b {} -> {}, \
             REDIRECT rule packets {r0} -> {r1}",
            ma0.opened,
            ma1.opened,
            mb0.opened,
            mb1.opened
        );
    }
    if peer.map(|s| s.ip()) != Some(p.direct) {
        bail!(
            "the DIRECT path is not direct: the server saw peer {peer:?}, expected {}",
            p.direct
        );
    }
    evidence.push(format!(
        "direct path: server saw peer {}, ztunnel counters unchanged, REDIRECT rule not hit",
        peer.map(|s| s.to_string()).unwrap_or_default()
    ));

    // Mesh: both ztunnels must count it, and the capture rule must fire.
    ping_echo(a.node.netns(), p.client, servers.echo).context(
        "mesh path check (client pod -> REDIRECT -> ztunnel a -> HBONE -> ztunnel b -> server)",
    )?;
    let start = Instant::now();
    let (ma2, mb2, r2) = loop {
        let m = (
            conn_metrics(&a.node)?,
            conn_metrics(&b.node)?,
            redirect_packets(&a.node)?,
        );
        if (m.0.opened > ma1.opened && m.1.opened > mb1.opened && m.2 > r1)
            || start.elapsed() > Duration::from_secs(3)
        {
            break m;
        }
        pause(Duration::from_millis(50))?;
    };
    let peer = last_peer();
    if !(ma2.opened > ma1.opened && mb2.opened > mb1.opened && r2 > r1) {
        bail!(
            "the MESH path does not go through both ztunnels: {OPENED} of ztunnel a {} -> {}, \
             of ztunnel b {} -> {}; REDIRECT rule packets {r1} -> {r2}; server saw peer {peer:?}",
            ma1.opened,
            ma2.opened,
            mb1.opened,
            mb2.opened
        );
    }
    if peer.map(|s| s.ip()) == Some(p.direct) {
        bail!("the MESH connection reached the server from the direct source address: {peer:?}");
    }
    evidence.push(format!(
        "mesh path: the REDIRECT rule's packet counter went {r1} -> {r2}, {OPENED} grew on ztunnel a \
         ({} -> {}) and b ({} -> {}), server saw peer {}",
        ma1.opened,
        ma2.opened,
        mb1.opened,
        mb2.opened,
        peer.map(|s| s.to_string()).unwrap_or_default()
    ));
    Ok(evidence)
}

/// Runs `f` for the mesh, attributing the CPU both ztunnels use meanwhile to
/// `scenario`.
fn with_cpu<T>(
    zts: &mut [&mut Zt<'_>],
    scenario: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let before: Vec<f64> = zts.iter().map(|z| z.cpu()).collect::<Result<_>>()?;
    let r = f();
    for (z, b) in zts.iter_mut().zip(before) {
        let used = z.cpu()? - b;
        z.cpu_total += used;
        let total = z
            .cpu_by_scenario
            .get(scenario)
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
            + used;
        z.cpu_by_scenario
            .insert(scenario.into(), json!((total * 1000.0).round() / 1000.0));
    }
    for z in zts.iter() {
        z.ensure_running()?;
    }
    r
}

/// WARN and ERROR lines of a log, and a few samples of them.
pub(crate) fn scan_log(log: &str) -> (usize, usize, Vec<String>) {
    let (mut warns, mut errors, mut samples) = (0, 0, Vec::new());
    for l in log.lines() {
        let is_err = l.contains(" ERROR ") || l.contains("\"level\":\"ERROR\"");
        let is_warn = l.contains(" WARN ") || l.contains("\"level\":\"WARN\"");
        if is_err {
            errors += 1;
        } else if is_warn {
            warns += 1;
        }
        if (is_err || is_warn) && samples.len() < 5 {
            samples.push(l.chars().take(300).collect());
        }
    }
    (warns, errors, samples)
}

pub fn run(args: &ZtunnelArgs) -> Result<Report> {
    let bin = locate_ztunnel(args.ztunnel.as_deref())?;
    eprintln!("bench: using {}", bin.display());
    let _pm_qos = if args.no_deep_idle {
        Some(hold_cpu_dma_latency_zero()?)
    } else {
        None
    };
    let tb = Testbed::new().context("creating the test bed")?;
    let mut zts: Vec<ChildGuard> = Vec::new();
    let r = run_in(&tb, &bin, args, &mut zts).map(|mut report| {
        report
            .config
            .insert("ztunnel_bin".into(), json!(bin.display().to_string()));
        report
    });
    if let Some(dir) = &args.logs_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("bench: cannot create {}: {e}", dir.display());
        }
        for (z, n) in zts.iter().zip(["a", "b"]) {
            let to = dir.join(format!("ztunnel-{n}.log"));
            match std::fs::copy(z.log_path(), &to) {
                Ok(_) => eprintln!("bench: copied ztunnel {n}'s log to {}", to.display()),
                Err(e) => eprintln!("bench: copying {}: {e}", z.log_path().display()),
            }
        }
    }
    if r.is_err() && !stopped() {
        for (z, n) in zts.iter().zip(["a", "b"]) {
            eprintln!(
                "bench: last lines of ztunnel {n}'s log ({}):\n{}\n",
                z.log_path().display(),
                log_tail(z, 25)
            );
        }
    }
    eprintln!("bench: tearing down the test bed");
    drop(zts);
    drop(tb);
    r
}

fn run_in(
    tb: &Testbed,
    bin: &Path,
    args: &ZtunnelArgs,
    guards: &mut Vec<ChildGuard>,
) -> Result<Report> {
    let duration = Duration::from_secs(args.duration_secs.max(1));

    // --- test bed
    let a = tb.add_node("a")?;
    let b = tb.add_node("b")?;
    let client = tb.add_host_pod(&a, "client")?;
    let direct = tb.add_host_pod(&a, "direct")?;
    let server = tb.add_host_pod(&b, "server")?;
    check_stop()?;
    tune_netns(&a)?;
    tune_netns(&b)?;
    let state = tb.dir().join("state.yaml");
    std::fs::write(
        &state,
        format!(
            "workloads:\n  \
             - {{name: client, namespace: default, serviceAccount: client, node: a, addresses: [{}]}}\n  \
             - {{name: server, namespace: default, serviceAccount: server, node: b, addresses: [{}]}}\n",
            client.ipv4(),
            server.ipv4()
        ),
    )
    .context("writing the state file")?;
    let ca_cert = tb.dir().join("ca.crt");
    let ca_key = tb.dir().join("ca.key");

    let servers = load::start_servers(
        b.netns(),
        IpAddr::V4(server.ipv4()),
        SERVER_BASE_PORT,
        args.cps_workers + 2,
    )?;

    // --- ztunnels: a first (it creates the CA), then b with the same CA
    let ca = (ca_cert.as_path(), ca_key.as_path());
    let za = spawn_ztunnel(tb, &a, bin, &state, ca, args.worker_threads)?;
    guards.push(za);
    if !ca_cert.is_file() || !ca_key.is_file() {
        bail!(
            "ztunnel a is ready but did not create {} / {}",
            ca_cert.display(),
            ca_key.display()
        );
    }
    let zb = spawn_ztunnel(tb, &b, bin, &state, ca, args.worker_threads)?;
    guards.push(zb);
    let guards: &[ChildGuard] = guards;
    let mut zs = Vec::new();
    for (g, node) in guards.iter().zip([&a, &b]) {
        zs.push(Zt {
            node: node.clone(),
            child: g,
            idle_rss_mib: procstat::rss_mib(g.pid())?,
            cpu_by_scenario: Map::new(),
            cpu_total: 0.0,
        });
    }
    measure(&a, &b, &client, &direct, &servers, args, duration, &mut zs)
}

/// Which way a scenario's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Direct = 0,
    Mesh = 1,
    /// Two plain TCP relays on the mesh's path (`relay.rs`), bulk only.
    Relays = 2,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Mesh => "mesh",
            Via::Relays => "plain relays",
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    report::percentile(&mut v, 0.5)
}

/// A path's bulk streams over the rounds: the median rate, total bytes.
struct Bulk {
    gbit_per_s: f64,
    bytes: u64,
}

impl Bulk {
    fn of(v: &[load::BulkResult]) -> Bulk {
        Bulk {
            gbit_per_s: median(v.iter().map(|r| r.gbit_per_s()).collect()),
            bytes: v.iter().map(|r| r.bytes).sum(),
        }
    }
}

/// A path's ping-pongs over the rounds: median of each round's figures.
struct Rr {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    max_us: f64,
    round_trips: usize,
}

impl Rr {
    fn of(v: &[load::RrResult]) -> Rr {
        let med = |f: fn(&load::RrResult) -> f64| median(v.iter().map(f).collect());
        Rr {
            p50_us: med(|r| r.p50_us),
            p99_us: med(|r| r.p99_us),
            mean_us: med(|r| r.mean_us),
            max_us: v.iter().map(|r| r.max_us).fold(0.0, f64::max),
            round_trips: v.iter().map(|r| r.round_trips).sum(),
        }
    }
}

/// A path's connection churn over the rounds: the median rate, totals.
struct Churn {
    per_second: f64,
    connections: u64,
    errors: u64,
}

impl Churn {
    fn of(v: &[load::ChurnResult]) -> Churn {
        Churn {
            per_second: median(v.iter().map(|r| r.per_second()).collect()),
            connections: v.iter().map(|r| r.connections).sum(),
            errors: v.iter().map(|r| r.errors).sum(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    a: &Node,
    b: &Node,
    client: &e2e::Pod,
    direct: &e2e::Pod,
    servers: &Servers,
    args: &ZtunnelArgs,
    duration: Duration,
    zs: &mut [Zt<'_>],
) -> Result<Report> {
    let mut notes: Vec<String> = Vec::new();
    for z in zs.iter() {
        eprintln!("bench: {} idle RSS {:.2} MiB", z.name(), z.idle_rss_mib);
    }

    // --- capture: the client pod's traffic goes to ztunnel a, as in Istio
    e2e::mesh::capture_outbound(a.netns(), IpAddr::V4(client.ipv4()))?;

    let paths = Paths {
        client: IpAddr::V4(client.ipv4()),
        direct: IpAddr::V4(direct.ipv4()),
    };
    let [za, zb] = zs else {
        bail!("expected two ztunnels");
    };
    let evidence = verify_paths(za, zb, servers, &paths)?;
    for e in &evidence {
        eprintln!("bench: verified {e}");
    }
    notes.extend(evidence);
    let ns = a.netns();
    let load_at_start = procstat::loadavg_1m();
    let ours = |zs: &[&Zt<'_>]| -> Result<f64> {
        let mut t = procstat::cpu_seconds(std::process::id())?;
        for z in zs {
            t += z.cpu()?;
        }
        Ok(t)
    };
    let window_start = Instant::now();
    let (busy0, ours0) = (procstat::system_busy_seconds()?, ours(&[&*za, &*zb])?);

    // --- the scenarios, `rounds` times, alternating which path goes first
    let relay_b = SocketAddr::new(IpAddr::V4(b.ipv4()), RELAY_PORT);
    let relay_a = SocketAddr::new(paths.direct, RELAY_PORT);
    relay::start(b.netns(), relay_b, servers.bulk)?;
    relay::start(ns, relay_a, relay_b)?;
    let max = args.rr_max_round_trips.max(1);
    let workers = args.cps_workers.max(1);
    let rounds = args.rounds.max(1);
    let mb_before = conn_metrics(&zb.node)?;
    let mut mesh_churn_served = 0;
    let mut bulk: [Vec<load::BulkResult>; 3] = Default::default();
    let mut rr: [Vec<load::RrResult>; 2] = Default::default();
    let mut cps: [Vec<load::ChurnResult>; 2] = Default::default();
    for round in 1..=rounds {
        let in_order = |vias: &[Via]| -> Vec<Via> {
            let mut v = vias.to_vec();
            if round % 2 == 0 {
                v.reverse();
            }
            v
        };
        for via in in_order(&[Via::Direct, Via::Mesh, Via::Relays]) {
            pause(PAUSE)?;
            let what = format!("bulk, {}", via.label());
            let r = match via {
                Via::Direct => load::bulk(ns, paths.direct, servers, duration),
                Via::Mesh => with_cpu(&mut [&mut *za, &mut *zb], "bulk", || {
                    load::bulk(ns, paths.client, servers, duration)
                }),
                Via::Relays => load::bulk_to(ns, paths.direct, relay_a, servers, duration),
            }
            .context(what)?;
            eprintln!(
                "bench: round {round}/{rounds}: bulk {}: {:.2} Gbit/s ({} MB in {:.2?})",
                via.label(),
                r.gbit_per_s(),
                r.bytes / 1_000_000,
                r.elapsed
            );
            bulk[via as usize].push(r);
        }
        for via in in_order(&[Via::Direct, Via::Mesh]) {
            pause(PAUSE)?;
            let what = format!("request/response, {}", via.label());
            let r = match via {
                Via::Mesh => with_cpu(&mut [&mut *za, &mut *zb], "request_response", || {
                    load::request_response(ns, paths.client, servers.echo, duration, max)
                }),
                _ => load::request_response(ns, paths.direct, servers.echo, duration, max),
            }
            .context(what)?;
            eprintln!(
                "bench: round {round}/{rounds}: rr {}: p50 {:.1} us, p99 {:.1} us ({} round trips)",
                via.label(),
                r.p50_us,
                r.p99_us,
                r.round_trips
            );
            rr[via as usize].push(r);
        }
        for via in in_order(&[Via::Direct, Via::Mesh]) {
            pause(PAUSE)?;
            let what = format!("connections, {}", via.label());
            let served_before = servers.churn_served.load(Ordering::Relaxed);
            let churn = |src| load::churn(ns, src, servers, args.churn_close, duration, workers);
            let r = match via {
                Via::Mesh => with_cpu(&mut [&mut *za, &mut *zb], "connections", || {
                    churn(paths.client)
                }),
                _ => churn(paths.direct),
            }
            .context(what)?;
            if via == Via::Mesh {
                mesh_churn_served += servers.churn_served.load(Ordering::Relaxed) - served_before;
            }
            eprintln!(
                "bench: round {round}/{rounds}: cps {}: {:.0} conn/s ({} ok, {} errors)",
                via.label(),
                r.per_second(),
                r.connections,
                r.errors
            );
            if r.errors > 0 {
                let n = format!(
                    "connection churn ({}, round {round}): {} of {} connections failed; first error: {}",
                    via.label(),
                    r.errors,
                    r.errors + r.connections,
                    r.first_error.as_deref().unwrap_or("?")
                );
                eprintln!("bench: WARNING: {n}");
                notes.push(n);
            }
            cps[via as usize].push(r);
        }
    }
    let [bulk_d, bulk_m, bulk_r] = bulk.map(|v| Bulk::of(&v));
    let [rr_d, rr_m] = rr.map(|v| Rr::of(&v));
    let [cps_d, cps_m] = cps.map(|v| Churn::of(&v));

    // Everything else that ran meanwhile (other users of the machine, but
    // also kernel threads doing our softirq work) - a noise indicator.
    let window = window_start.elapsed().as_secs_f64();
    let other_cpu =
        ((procstat::system_busy_seconds()? - busy0) - (ours(&[&*za, &*zb])? - ours0)).max(0.0);
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    if other_cpu > 0.1 * window * nproc {
        let n = format!(
            "noisy host: other processes used {other_cpu:.1} CPU-seconds during the {window:.0} s of \
             measurements ({:.0}% of the machine; 1-min load average {load_at_start:.2} at the start); \
             figures are less reliable",
            100.0 * other_cpu / (window * nproc)
        );
        eprintln!("bench: WARNING: {n}");
        notes.push(n);
    }

    // --- after the run: leaks, peak memory, logs
    pause(Duration::from_secs(1))?;
    let mb_after = conn_metrics(&zb.node)?;
    notes.push(format!(
        "mesh churn: the client completed {} connections (+{} failed), the server answered {}, \
         ztunnel b counted {:.0} opened (besides each round's bulk stream and ping-pong)",
        cps_m.connections,
        cps_m.errors,
        mesh_churn_served,
        mb_after.opened - mb_before.opened - 2.0 * rounds as f64,
    ));
    let mut processes = Vec::new();
    for z in [&*za, &*zb] {
        z.ensure_running()?;
        let m = conn_metrics(&z.node)?;
        let open = m.opened - m.closed;
        if open > 0.0 {
            let n = format!(
                "{}: {OPENED} - {CLOSED} = {open:.0} one second after the last test (connections not closed?)",
                z.name()
            );
            eprintln!("bench: WARNING: {n}");
            notes.push(n);
        }
        let (warns, errors, samples) = scan_log(&z.child.log());
        if warns + errors > 0 {
            eprintln!(
                "bench: {} logged {warns} WARN and {errors} ERROR lines, e.g.:",
                z.name()
            );
            for s in &samples {
                eprintln!("    {s}");
            }
            notes.push(format!(
                "{} logged {warns} WARN and {errors} ERROR lines; first: {}",
                z.name(),
                samples.first().cloned().unwrap_or_default()
            ));
        }
        processes.push(Process {
            name: z.name(),
            idle_rss_mb: round3(z.idle_rss_mib),
            peak_rss_mb: round3(procstat::hwm_mib(z.child.pid())?),
            cpu_seconds: round3(z.cpu_total),
            cpu_seconds_by_scenario: z.cpu_by_scenario.clone(),
            log_warnings: warns,
            log_errors: errors,
        });
    }

    // --- report
    let results = vec![
        Row::new(
            "bulk",
            "throughput",
            "Gbit/s",
            bulk_d.gbit_per_s,
            bulk_m.gbit_per_s,
            Better::Higher,
        ),
        Row::new(
            "request_response",
            "latency_p50",
            "us",
            rr_d.p50_us,
            rr_m.p50_us,
            Better::Lower,
        )
        .with_delta(),
        Row::new(
            "request_response",
            "latency_p99",
            "us",
            rr_d.p99_us,
            rr_m.p99_us,
            Better::Lower,
        )
        .with_delta(),
        Row::new(
            "request_response",
            "latency_mean",
            "us",
            rr_d.mean_us,
            rr_m.mean_us,
            Better::Lower,
        )
        .with_delta(),
        Row::new(
            "connections",
            "rate",
            "conn/s",
            cps_d.per_second,
            cps_m.per_second,
            Better::Higher,
        ),
    ];
    let ratio = |i: usize| results.get(i).and_then(|r| r.ratio).unwrap_or(0.0);
    let added_p50 = results
        .get(1)
        .and_then(|r| r.delta)
        .unwrap_or(f64::INFINITY);
    let max_idle = processes.iter().map(|p| p.idle_rss_mb).fold(0.0, f64::max);
    let targets = vec![
        Target::new(
            "bulk throughput ratio mesh/direct",
            ratio(0),
            "x",
            ">=",
            0.50,
        ),
        Target::new(
            "request/response p50 added latency",
            added_p50,
            "us",
            "<=",
            65.0,
        ),
        Target::new("connections/s ratio mesh/direct", ratio(4), "x", ">=", 0.25),
        Target::new("ztunnel idle RSS (largest)", max_idle, "MiB", "<", 7.0),
    ];

    let mut config = Map::new();
    config.insert("duration_secs".into(), json!(duration.as_secs()));
    config.insert("rounds".into(), json!(rounds));
    config.insert("bulk_write_bytes".into(), json!(load::BULK_WRITE));
    config.insert("rr_message_bytes".into(), json!(load::RR_SIZE));
    config.insert("rr_warmup_round_trips".into(), json!(load::RR_WARMUP));
    config.insert("rr_max_round_trips".into(), json!(max));
    config.insert(
        "rr_round_trips".into(),
        json!({"baseline": rr_d.round_trips, "mesh": rr_m.round_trips}),
    );
    config.insert(
        "rr_max_us".into(),
        json!({"baseline": round3(rr_d.max_us), "mesh": round3(rr_m.max_us)}),
    );
    config.insert(
        "bulk_bytes".into(),
        json!({"baseline": bulk_d.bytes, "mesh": bulk_m.bytes, "plain_relays": bulk_r.bytes}),
    );
    config.insert(
        "bulk_plain_relays_gbit_per_s".into(),
        json!(round3(bulk_r.gbit_per_s)),
    );
    config.insert("cps_workers".into(), json!(workers));
    config.insert(
        "cps_connections".into(),
        json!({"baseline": cps_d.connections, "mesh": cps_m.connections}),
    );
    config.insert(
        "cps_errors".into(),
        json!({"baseline": cps_d.errors, "mesh": cps_m.errors}),
    );
    config.insert(
        "host_noise".into(),
        json!({
            "loadavg_1m_at_start": load_at_start,
            "other_cpu_seconds": round3(other_cpu),
            "measurement_window_seconds": round3(window),
        }),
    );
    config.insert("no_deep_idle".into(), json!(args.no_deep_idle));
    config.insert(
        "ztunnel_worker_threads".into(),
        match args.worker_threads {
            Some(n) => json!(n),
            None => json!("ztunnel's default (half the CPUs, at least 1)"),
        },
    );
    config.insert(
        "capture".into(),
        json!(format!(
            "iptables -t nat -A OUTPUT -p tcp -s <client> -m mark ! --mark {} -j REDIRECT --to-ports {OUTBOUND_PORT}",
            e2e::mesh::ZTUNNEL_MARK
        )),
    );
    config.insert(
        "churn_close".into(),
        json!(match args.churn_close {
            load::Close::Rst => "rst: the client closes with SO_LINGER 0 (RST) after the response",
            load::Close::Fin =>
                "fin: the server closes after its response, the client closes after the EOF",
        }),
    );
    config.insert(
        "tcp_tuning".into(),
        json!(format!(
            "nodes a and b: net.ipv4.tcp_tw_reuse=1, ip_local_port_range={EPHEMERAL_PORTS} \
             (for ztunnel b's upstream connections); the churn client never leaves TIME_WAIT"
        )),
    );

    notes.insert(
        0,
        format!(
            "baseline = client bound to {} (not captured, not in the mesh) -> server {} over the \
             node-to-node veth/bridge; mesh = client bound to pod {} -> iptables REDIRECT -> \
             ztunnel a :15001 -> HBONE (mTLS, HTTP/2 CONNECT) -> ztunnel b :15008 -> server. \
             Client and server are threads of the bench, sharing the CPUs with both ztunnels.",
            paths.direct,
            servers.echo.ip(),
            paths.client
        ),
    );
    notes.insert(
        1,
        format!(
            "each figure is the median of {rounds} round(s), alternating which path goes first. \
             bulk: bytes the server received after its first read / time from first to last read. \
             request/response: 64-byte ping-pong on one TCP_NODELAY connection after 200 warm-up \
             round trips. connections: connect, 1 byte each way, close; conn/s = completed / wall \
             time. RSS in MiB (2^20 bytes); CPU = utime+stime during the mesh measurements."
        ),
    );
    let per = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
    notes.insert(
        2,
        format!(
            "bulk ceiling: the same stream through two plain TCP relays on the mesh's path \
             (one per node, read/write of up to 256 KiB, no TLS, no HTTP/2) ran at {:.2} Gbit/s, \
             {:.3}x direct; the mesh reached {:.3}x of the relays",
            bulk_r.gbit_per_s,
            per(bulk_r.gbit_per_s, bulk_d.gbit_per_s),
            per(bulk_m.gbit_per_s, bulk_r.gbit_per_s),
        ),
    );

    Ok(Report {
        schema_version: SCHEMA_VERSION,
        benchmark: "ztunnel".into(),
        baseline_label: "direct".into(),
        mesh_label: "mesh".into(),
        timestamp_unix: report::unix_now(),
        machine: Machine::detect(),
        config,
        results,
        processes,
        targets,
        notes,
    })
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
