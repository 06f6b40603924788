//! `bench capture`: eBPF capture against iptables REDIRECT, both feeding
//! the same ztunnel's in-pod listeners.
//!
//! ```text
//!  node a                                                  node b
//!  pod "ebpf" (netns+cgroup) --connect4 rewrite--> \
//!                                                    ztunnel a (in-pod 15001 of each pod)
//!  pod "ipt"  (netns)  --iptables REDIRECT in pod--> /        == HBONE ==> ztunnel b :15008 -> server
//! ```
//!
//! Both pods are enrolled through the CNI plugin, so ztunnel a listens
//! inside each. The load runs as threads of the bench: for the eBPF path
//! the bench process joins pod "ebpf"'s cgroup (so its `connect()`s are the
//! pod's), for the iptables path it stays outside every pod cgroup and pod
//! "ipt"'s netns has Istio's REDIRECT rule (original destination from
//! `SO_ORIGINAL_DST`). Everything after ztunnel a's accept is the same code.
//!
//! Also measured: the time to set up capture for one pod, as the runtime
//! sees it (the CNI plugin's ADD, process start included) and as ztunnel
//! logs it (listeners + load/attach/pin of the programs + record).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use e2e::mesh::http_get;
use e2e::{ChildGuard, Node, Pod, Testbed};
use serde_json::{json, Map};

use crate::load::{self, stopped};
use crate::procstat;
use crate::report::{self, Better, Machine, Process, Report, Row, Target, SCHEMA_VERSION};
use crate::ztunnel::{
    check_stop, counter_sum, hold_cpu_dma_latency_zero, locate_ztunnel, log_tail, pause, round3,
    scan_log, tune_netns,
};

const SERVER_BASE_PORT: u16 = 5001;
const READY: &str = "127.0.0.1:15021";
const METRICS: &str = "127.0.0.1:15020";
const OPENED: &str = "istio_tcp_connections_opened_total";

#[derive(clap::Args, Debug, Clone)]
pub struct CaptureArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Write `capture.json` and `capture.md` to this directory.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The ztunnel binary [default: next to this executable]; the CNI
    /// plugin `ztunnel-cni` is taken from the same directory.
    #[arg(long, env = "ZTUNNEL_BIN")]
    pub ztunnel: Option<PathBuf>,
    /// Pod set-ups (CNI ADD, then DEL) timed.
    #[arg(long, default_value_t = 20)]
    pub setups: usize,
    /// Concurrent workers of the connection-churn load.
    #[arg(long, default_value_t = 4)]
    pub cps_workers: usize,
    #[arg(long, default_value_t = 50_000)]
    pub rr_max_round_trips: usize,
    /// Rounds of each measurement per path (alternating which path goes
    /// first); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Hold /dev/cpu_dma_latency at 0 during the run (see `bench ztunnel`).
    #[arg(long)]
    pub no_deep_idle: bool,
}

/// While alive, this whole process is in `pod`'s cgroup (cgroup v2 moves
/// every thread), so its `connect()`s meet the pod's eBPF hooks. Dropping
/// moves it back.
struct InPodCgroup {
    back: PathBuf,
}

impl InPodCgroup {
    fn enter(pod: &Pod) -> Result<InPodCgroup> {
        let cg = pod
            .cgroup()
            .ok_or_else(|| anyhow!("pod {} has no cgroup", pod.name()))?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("no cgroup v2 entry in /proc/self/cgroup"))?;
        let back = e2e::cgroup_root()?.join(rel.trim_start_matches('/'));
        move_self(cg)?;
        Ok(InPodCgroup { back })
    }
}

impl Drop for InPodCgroup {
    fn drop(&mut self) {
        if let Err(e) = move_self(&self.back) {
            eprintln!(
                "bench: WARNING: cannot move back to {}: {e:#}",
                self.back.display()
            );
        }
    }
}

fn move_self(cg: &Path) -> Result<()> {
    let procs = cg.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("moving the bench into {}", procs.display()))
}

struct Bed {
    cni: PathBuf,
    socket: PathBuf,
    labels: PathBuf,
}

impl Bed {
    /// CNI ADD or DEL for `pod`, the way a runtime calls it. Returns the
    /// wall time of the plugin process.
    fn cni(&self, command: &str, pod: &Pod, uid: &str) -> Result<Duration> {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": "ztunnel-cni",
            "ztunnelSocket": self.socket,
            "labelsFile": self.labels,
            "runtimeConfig": {"cgroupPath": pod.cgroup()},
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [], "ips": []},
        });
        let started = Instant::now();
        let mut child = Command::new(&self.cni)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", uid)
            .env("CNI_NETNS", format!("/run/netns/{}", pod.netns()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_UID={uid}",
                    pod.name()
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.cni.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "ztunnel-cni {command} {}: {}{}",
                pod.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }
}

/// `kernel.bpf_stats_enabled=1` while alive (run time and count per
/// program), restored after. Machine-wide, so only for the run.
struct BpfStats {
    old: String,
}

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(Self::PATH)?.trim().to_string();
        std::fs::write(Self::PATH, "1")?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.old);
    }
}

/// (link, runs, mean ns per run) of each program pinned for one pod, read
/// with bpftool; empty if bpftool is missing.
fn hook_costs(pin_dir: &Path) -> Vec<(String, u64, f64)> {
    let bpftool = |args: &[&str]| -> Option<serde_json::Value> {
        let out = Command::new("bpftool").args(args).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let mut v = Vec::new();
    for link in ["link_connect4", "link_sockops", "link_sk_lookup"] {
        let path = pin_dir.join(link).display().to_string();
        let Some(prog_id) =
            bpftool(&["-j", "link", "show", "pinned", &path]).and_then(|l| l["prog_id"].as_u64())
        else {
            continue;
        };
        let Some(p) = bpftool(&["-j", "prog", "show", "id", &prog_id.to_string()]) else {
            continue;
        };
        let runs = p["run_cnt"].as_u64().unwrap_or(0);
        let ns = p["run_time_ns"].as_u64().unwrap_or(0);
        if runs > 0 {
            v.push((
                link.trim_start_matches("link_").to_string(),
                runs,
                ns as f64 / runs as f64,
            ));
        }
    }
    v
}

fn opened(node: &Node) -> Result<f64> {
    let (code, body) = http_get(node.netns(), METRICS.parse()?, "/metrics")?;
    if code != 200 {
        bail!("ztunnel {}'s /metrics answered {code}", node.name());
    }
    Ok(counter_sum(&body, OPENED))
}

fn spawn_ztunnel(tb: &Testbed, node: &Node, bin: &Path, extra: &[String]) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.args(["--node", node.name()])
        .arg("--local-state")
        .arg(tb.dir().join("state.yaml"))
        .arg("--ca-cert")
        .arg(tb.dir().join("ca.crt"))
        .arg("--ca-key")
        .arg(tb.dir().join("ca.key"))
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    let child = tb.spawn(node.netns(), cmd)?;
    let start = Instant::now();
    loop {
        check_stop()?;
        if !child.is_running() {
            bail!(
                "ztunnel {} exited; log:\n{}",
                node.name(),
                log_tail(&child, 40)
            );
        }
        if matches!(
            http_get(node.netns(), READY.parse()?, "/healthz/ready"),
            Ok((200, _))
        ) {
            return Ok(child);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "ztunnel {} not ready; log:\n{}",
                node.name(),
                log_tail(&child, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `elapsed=` of ztunnel's "pod enrolled" line for `uid`, in ms.
fn enrolled_ms(log: &str, uid: &str) -> Option<f64> {
    let line = log
        .lines()
        .find(|l| l.contains("pod enrolled") && l.contains(&format!("uid={uid} ")))?;
    let v = line.split("elapsed=").nth(1)?.split_whitespace().next()?;
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("µs") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

pub fn run(args: &CaptureArgs) -> Result<Report> {
    let bin = locate_ztunnel(args.ztunnel.as_deref())?;
    let cni = bin.with_file_name("ztunnel-cni");
    if !cni.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p ztunnel-cni`",
            cni.display()
        );
    }
    let _pm_qos = if args.no_deep_idle {
        Some(hold_cpu_dma_latency_zero()?)
    } else {
        None
    };
    let tb = Testbed::new().context("creating the test bed")?;
    let pins = tb.bpf_dir("inpod");
    let mut zts = Vec::new();
    let r = run_in(&tb, &bin, &cni, &pins, args, &mut zts);
    if r.is_err() && !stopped() {
        for z in &zts {
            eprintln!(
                "bench: ztunnel log tail ({}):\n{}\n",
                z.log_path().display(),
                log_tail(z, 25)
            );
        }
    }
    drop(zts);
    // The test bed unpins everything under `pins` when dropped.
    drop(tb);
    r
}

fn run_in(
    tb: &Testbed,
    bin: &Path,
    cni: &Path,
    pins: &Path,
    args: &CaptureArgs,
    guards: &mut Vec<ChildGuard>,
) -> Result<Report> {
    let duration = Duration::from_secs(args.duration_secs.max(1));
    let a = tb.add_node("a")?;
    let b = tb.add_node("b")?;
    let ebpf = tb.add_netns_pod(&a, "ebpf")?;
    let ipt = tb.add_netns_pod(&a, "ipt")?;
    let setup = tb.add_netns_pod(&a, "setup")?;
    let server = tb.add_host_pod(&b, "server")?;
    tune_netns(&a)?;
    tune_netns(&b)?;
    for p in [&ebpf, &ipt] {
        e2e::try_in_netns(p.netns(), || {
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")
        })??;
    }
    let wl = |p: &Pod, node: &str| {
        format!(
            "  - {{name: {n}, namespace: default, serviceAccount: {n}, node: {node}, addresses: [{ip}]}}\n",
            n = p.name(),
            ip = p.ipv4()
        )
    };
    std::fs::write(
        tb.dir().join("state.yaml"),
        format!(
            "workloads:\n{}{}{}{}",
            wl(&ebpf, "a"),
            wl(&ipt, "a"),
            wl(&setup, "a"),
            wl(&server, "b")
        ),
    )?;
    let labels = tb.dir().join("labels.json");
    std::fs::write(
        &labels,
        json!({"namespaces": {"default": {"istio.io/dataplane-mode": "ambient"}}}).to_string(),
    )?;
    let servers = load::start_servers(
        b.netns(),
        IpAddr::V4(server.ipv4()),
        SERVER_BASE_PORT,
        args.cps_workers + 2,
    )?;
    let socket = tb.dir().join("ztunnel.sock");
    let inpod = vec![
        "--inpod-socket".to_string(),
        socket.display().to_string(),
        "--inpod-bpf-dir".into(),
        pins.display().to_string(),
        "--inpod-state-dir".into(),
        tb.dir().join("pods").display().to_string(),
    ];
    guards.push(spawn_ztunnel(tb, &a, bin, &inpod)?);
    guards.push(spawn_ztunnel(tb, &b, bin, &[])?);
    let bed = Bed {
        cni: cni.to_path_buf(),
        socket,
        labels,
    };

    // --- set-up time for one pod: ADD, then DEL to start over.
    let (mut wall, mut inside) = (Vec::new(), Vec::new());
    for i in 0..args.setups.max(1) {
        check_stop()?;
        let uid = format!("setup-{i}");
        wall.push(bed.cni("ADD", &setup, &uid)?.as_secs_f64() * 1e3);
        bed.cni("DEL", &setup, &uid)?;
        if let Some(ms) = enrolled_ms(&guards[0].log(), &uid) {
            inside.push(ms);
        }
    }
    let setup_wall_p50 = report::percentile(&mut wall, 0.5);
    let setup_inside_p50 = report::percentile(&mut inside, 0.5);
    eprintln!(
        "bench: pod set-up p50: {setup_wall_p50:.1} ms (CNI ADD, process included), {setup_inside_p50:.1} ms inside ztunnel; max {:.1} / {:.1} ms",
        wall.last().copied().unwrap_or(0.0),
        inside.last().copied().unwrap_or(0.0)
    );

    // --- the two pods of the comparison
    bed.cni("ADD", &ebpf, "pod-ebpf")?;
    bed.cni("ADD", &ipt, "pod-ipt")?;
    e2e::mesh::capture_outbound(ipt.netns(), IpAddr::V4(ipt.ipv4()))?;

    let zt_a = &guards[0];
    let zt_b = &guards[1];
    let ebpf_src = IpAddr::V4(ebpf.ipv4());
    let ipt_src = IpAddr::V4(ipt.ipv4());
    let mut notes = Vec::new();

    // Each path must really go through ztunnel a (one more opened connection).
    for (label, pod, src) in [("ebpf", &ebpf, ebpf_src), ("iptables", &ipt, ipt_src)] {
        let before = opened(&a)?;
        {
            let _cg = (label == "ebpf")
                .then(|| InPodCgroup::enter(pod))
                .transpose()?;
            ping(pod.netns(), src, servers.echo)?;
        }
        pause(Duration::from_millis(200))?;
        if opened(&a)? <= before {
            bail!("the {label} path did not go through ztunnel a");
        }
        notes.push(format!(
            "verified: the {label} path opened a connection in ztunnel a"
        ));
    }

    let stats = match BpfStats::enable() {
        Ok(s) => Some(s),
        Err(e) => {
            notes.push(format!("no per-hook costs: cannot enable bpf stats: {e}"));
            None
        }
    };

    // --- bulk, request/response, churn: `rounds` rounds, iptables and
    // eBPF alternating which goes first; the median of each is reported.
    let cpu0 = (
        procstat::cpu_seconds(zt_a.pid())?,
        procstat::cpu_seconds(zt_b.pid())?,
    );
    let max = args.rr_max_round_trips.max(1);
    let workers = args.cps_workers.max(1);
    let mut m: [Samples; 2] = Default::default(); // [iptables, eBPF]
    for round in 0..args.rounds.max(1) {
        for kind in [Kind::Bulk, Kind::Rr, Kind::Churn] {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                pause(Duration::from_millis(300))?;
                let (pod, src) = if which == 0 {
                    (&ipt, ipt_src)
                } else {
                    (&ebpf, ebpf_src)
                };
                let _cg = (which == 1)
                    .then(|| InPodCgroup::enter(&ebpf))
                    .transpose()?;
                let label = ["iptables", "eBPF"][which];
                let ns = pod.netns();
                let s = &mut m[which];
                match kind {
                    Kind::Bulk => s.gbit.push(
                        load::bulk(ns, src, &servers, duration)
                            .with_context(|| format!("bulk, {label}"))?
                            .gbit_per_s(),
                    ),
                    Kind::Rr => {
                        let r = load::request_response(ns, src, servers.echo, duration, max)
                            .with_context(|| format!("request/response, {label}"))?;
                        s.p50.push(r.p50_us);
                        s.p99.push(r.p99_us);
                    }
                    Kind::Churn => {
                        let r = load::churn(ns, src, &servers, load::Close::Rst, duration, workers)
                            .with_context(|| format!("connections, {label}"))?;
                        if r.errors > 0 {
                            notes.push(format!(
                                "connection churn ({label}, round {round}): {} of {} failed; first error: {}",
                                r.errors,
                                r.errors + r.connections,
                                r.first_error.as_deref().unwrap_or("?")
                            ));
                        }
                        s.cps.push(r.per_second());
                    }
                }
            }
        }
        eprintln!(
            "bench: round {round}: bulk {:.2} / {:.2} Gbit/s, rr p50 {:.1} / {:.1} us, cps {:.0} / {:.0} (iptables / eBPF)",
            m[0].gbit.last().copied().unwrap_or(0.0),
            m[1].gbit.last().copied().unwrap_or(0.0),
            m[0].p50.last().copied().unwrap_or(0.0),
            m[1].p50.last().copied().unwrap_or(0.0),
            m[0].cps.last().copied().unwrap_or(0.0),
            m[1].cps.last().copied().unwrap_or(0.0),
        );
    }
    let [mut mi, mut me] = m;

    let costs = hook_costs(&pins.join("pod-ebpf"));
    drop(stats);
    for (hook, runs, ns) in &costs {
        eprintln!("bench: hook {hook}: {runs} runs, {ns:.0} ns per run");
    }
    if !costs.is_empty() {
        notes.push(format!(
            "eBPF cost per run (kernel.bpf_stats_enabled, pod \"ebpf\" over the whole run): {}",
            costs
                .iter()
                .map(|(h, r, ns)| format!("{h} {ns:.0} ns ({r} runs)"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    let mut processes = Vec::new();
    for (z, name, cpu_start) in [(zt_a, "ztunnel-a", cpu0.0), (zt_b, "ztunnel-b", cpu0.1)] {
        let (warns, errors, samples) = scan_log(&z.log());
        if warns + errors > 0 {
            notes.push(format!(
                "{name} logged {warns} WARN and {errors} ERROR lines; first: {}",
                samples.first().cloned().unwrap_or_default()
            ));
        }
        processes.push(Process {
            name: name.into(),
            idle_rss_mb: 0.0,
            peak_rss_mb: round3(procstat::hwm_mib(z.pid())?),
            cpu_seconds: round3(procstat::cpu_seconds(z.pid())? - cpu_start),
            cpu_seconds_by_scenario: Map::new(),
            log_warnings: warns,
            log_errors: errors,
        });
    }

    let results = vec![
        Row::new(
            "bulk",
            "throughput",
            "Gbit/s",
            report::percentile(&mut mi.gbit, 0.5),
            report::percentile(&mut me.gbit, 0.5),
            Better::Higher,
        ),
        Row::new(
            "request_response",
            "latency_p50",
            "us",
            report::percentile(&mut mi.p50, 0.5),
            report::percentile(&mut me.p50, 0.5),
            Better::Lower,
        )
        .with_delta(),
        Row::new(
            "request_response",
            "latency_p99",
            "us",
            report::percentile(&mut mi.p99, 0.5),
            report::percentile(&mut me.p99, 0.5),
            Better::Lower,
        )
        .with_delta(),
        Row::new(
            "connections",
            "rate",
            "conn/s",
            report::percentile(&mut mi.cps, 0.5),
            report::percentile(&mut me.cps, 0.5),
            Better::Higher,
        ),
        Row::new(
            "pod_setup",
            "cni_add_p50",
            "ms",
            0.0,
            setup_wall_p50,
            Better::Lower,
        ),
        Row::new(
            "pod_setup",
            "ztunnel_p50",
            "ms",
            0.0,
            setup_inside_p50,
            Better::Lower,
        ),
    ];
    let ratio = |i: usize| results.get(i).and_then(|r| r.ratio).unwrap_or(0.0);
    let delta = |i: usize| {
        results
            .get(i)
            .and_then(|r| r.delta)
            .unwrap_or(f64::INFINITY)
    };
    let targets = vec![
        Target::new("bulk throughput eBPF/iptables", ratio(0), "x", ">=", 1.0),
        Target::new(
            "request/response p50 eBPF - iptables",
            delta(1),
            "us",
            "<=",
            0.0,
        ),
        Target::new("connections/s eBPF/iptables", ratio(3), "x", ">=", 1.0),
        Target::new(
            "pod capture set-up p50 (CNI ADD)",
            setup_wall_p50,
            "ms",
            "<",
            50.0,
        ),
    ];
    let mut config = Map::new();
    config.insert("duration_secs".into(), json!(duration.as_secs()));
    config.insert("setups".into(), json!(args.setups));
    config.insert("cps_workers".into(), json!(workers));
    config.insert("rounds".into(), json!(args.rounds.max(1)));
    config.insert(
        "samples_sorted".into(),
        json!({
            "iptables": {"gbit": mi.gbit, "p50_us": mi.p50, "p99_us": mi.p99, "cps": mi.cps},
            "ebpf": {"gbit": me.gbit, "p50_us": me.p50, "p99_us": me.p99, "cps": me.cps},
        }),
    );
    config.insert("ztunnel_bin".into(), json!(bin.display().to_string()));
    config.insert(
        "setup_ms".into(),
        json!({"cni_add": wall.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
               "inside_ztunnel": inside.iter().map(|v| round3(*v)).collect::<Vec<_>>()}),
    );
    config.insert("no_deep_idle".into(), json!(args.no_deep_idle));
    config.insert(
        "hook_ns_per_run".into(),
        json!(costs
            .iter()
            .map(|(h, r, ns)| (h.clone(), json!({"runs": r, "ns": round3(*ns)})))
            .collect::<Map<_, _>>()),
    );
    notes.insert(
        0,
        "baseline = pod \"ipt\": iptables -t nat OUTPUT REDIRECT to 15001 inside the pod's netns \
         (Istio's in-pod capture), original destination from SO_ORIGINAL_DST; mesh = pod \"ebpf\": \
         cgroup/connect4 rewrite to 127.0.0.1:15001 + sockops map. Both land on ztunnel a's \
         in-pod 15001, then HBONE to ztunnel b :15008 and the server on node b. pod_setup rows \
         have no baseline: CNI ADD wall time (plugin process included) and ztunnel's own time \
         (listeners in the netns, load + attach + pin of the programs, record)."
            .into(),
    );
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        benchmark: "capture".into(),
        baseline_label: "iptables".into(),
        mesh_label: "ebpf".into(),
        timestamp_unix: report::unix_now(),
        machine: Machine::detect(),
        config,
        results,
        processes,
        targets,
        notes,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Bulk,
    Rr,
    Churn,
}

/// One path's results, one entry per round.
#[derive(Default)]
struct Samples {
    gbit: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cps: Vec<f64>,
}

fn ping(netns: &str, src: IpAddr, dst: SocketAddr) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = load::connect(netns, src, dst)?;
    let msg = *b"bench-capture-verify";
    s.write_all(&msg)?;
    let mut back = [0u8; 20];
    s.read_exact(&mut back)
        .with_context(|| format!("reading the echo {src} -> {dst}"))?;
    if back != msg {
        bail!("echo {src} -> {dst} returned different bytes");
    }
    Ok(())
}
