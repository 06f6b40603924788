//! `bench all`: every benchmark of the project in one run, one after the
//! other on the same machine (ztunnel, capture, xds, waypoint), each with
//! its own files in `--out-dir` as when run alone, plus `all.md` and
//! `all.json`: one table of every scenario (baseline, mesh figure, ratio)
//! and one of every mesh process (idle and peak RSS, CPU seconds) as the
//! sub-benchmarks report them.
//!
//! The sub-reports keep the shared shape (`report.rs`) and are embedded
//! whole in `all.json`; the control-plane benchmark reports absolute
//! figures (there is no "direct" control plane to compare with), so its
//! rows have no baseline and no ratio. A benchmark that fails is listed
//! with its error and the others still run; the command then exits with
//! an error.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::report::{self, Better, Machine, Report};
use crate::{capture, load, waypoint, xds, ztunnel, Bench, Cli};

#[derive(clap::Args, Debug)]
pub struct AllArgs {
    /// Where every benchmark's files and the combined `all.{md,json}` go.
    #[arg(long, default_value = "bench-results")]
    pub out_dir: PathBuf,
    /// Seconds per measured scenario, passed to ztunnel and capture. The
    /// waypoint benchmark keeps its own (10 rounds of 3 s per target): its
    /// comparison with nginx needs that many to rise above the noise.
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Run only these benchmarks (repeatable): ztunnel, capture, xds,
    /// waypoint. Default: all four.
    #[arg(long = "only", value_parser = ["ztunnel", "capture", "xds", "waypoint"])]
    pub only: Vec<String>,
}

/// One line of the combined table.
#[derive(Debug, Clone, Serialize)]
pub struct FlatRow {
    pub benchmark: String,
    pub scenario: String,
    pub unit: String,
    pub baseline_label: String,
    /// `None` where the benchmark has no baseline (control plane).
    pub baseline: Option<f64>,
    pub mesh_label: String,
    pub mesh: f64,
    pub ratio: Option<f64>,
    /// `higher` / `lower`, or `None` when not applicable.
    pub better: Option<String>,
}

/// One mesh process of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct FlatProcess {
    pub benchmark: String,
    pub name: String,
    pub idle_rss_mb: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    /// CPU seconds during the mesh measurements, where reported.
    pub cpu_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub benchmark: String,
    pub ok: bool,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Combined {
    pub schema_version: u32,
    pub benchmark: &'static str,
    pub timestamp_unix: u64,
    pub machine: Machine,
    pub runs: Vec<RunStatus>,
    pub rows: Vec<FlatRow>,
    pub processes: Vec<FlatProcess>,
    /// The sub-benchmarks' own reports, in the shared shape.
    pub reports: Vec<Report>,
    /// The control-plane benchmark's own JSON (`xds.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<serde_json::Value>,
}

/// Parses a sub-benchmark's arguments exactly as its own subcommand would.
fn sub(args: &[String]) -> Result<Bench> {
    let mut argv = vec!["bench".to_string()];
    argv.extend_from_slice(args);
    <Cli as clap::Parser>::try_parse_from(argv)
        .map(|c| c.bench)
        .map_err(|e| anyhow!("arguments {args:?}: {e}"))
}

fn flatten_report(r: &Report, rows: &mut Vec<FlatRow>, procs: &mut Vec<FlatProcess>) {
    for row in &r.results {
        rows.push(FlatRow {
            benchmark: r.benchmark.clone(),
            scenario: format!("{} {}", row.scenario, row.metric),
            unit: row.unit.clone(),
            baseline_label: r.baseline_label.clone(),
            baseline: Some(row.baseline),
            mesh_label: r.mesh_label.clone(),
            mesh: row.mesh,
            ratio: row.ratio,
            better: Some(
                match row.better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                }
                .into(),
            ),
        });
    }
    for p in &r.processes {
        procs.push(FlatProcess {
            benchmark: r.benchmark.clone(),
            name: p.name.clone(),
            // 0 is what a benchmark that does not sample idle RSS reports.
            idle_rss_mb: (p.idle_rss_mb > 0.0).then_some(p.idle_rss_mb),
            peak_rss_mb: Some(p.peak_rss_mb),
            cpu_seconds: Some(p.cpu_seconds),
        });
    }
}

/// The control-plane figures from `xds.json`: sync and change latency
/// against the same with a single client (the cost of the fan-out).
fn flatten_xds(v: &serde_json::Value, rows: &mut Vec<FlatRow>, procs: &mut Vec<FlatProcess>) {
    let clients = v["clients"].as_u64().unwrap_or(0);
    let scenarios = [
        (
            "first full sync",
            Some("first_full_sync_single_client_ms"),
            "first_full_sync_all_clients_ms",
        ),
        (
            "change -> all acked p50",
            Some("change_to_one_acked_p50_ms"),
            "change_to_all_acked_p50_ms",
        ),
        (
            "change -> all acked p99",
            Some("change_to_one_acked_p99_ms"),
            "change_to_all_acked_p99_ms",
        ),
        ("ztunnel start -> first sync", None, "ztunnel_first_sync_ms"),
    ];
    let label = format!(
        "{} pods, {} services, {} policies, {clients} clients",
        v["pods"], v["services"], v["policies"]
    );
    for (name, base_key, key) in scenarios {
        if let Some(ms) = v[key].as_f64() {
            let baseline = base_key.and_then(|k| v[k].as_f64());
            rows.push(FlatRow {
                benchmark: "xds".into(),
                scenario: name.into(),
                unit: "ms".into(),
                baseline_label: if baseline.is_some() {
                    "1 client".into()
                } else {
                    "-".into()
                },
                baseline,
                mesh_label: label.clone(),
                mesh: ms,
                ratio: baseline.filter(|b| *b > 0.0).map(|b| ms / b),
                better: Some("lower".into()),
            });
        }
    }
    procs.push(FlatProcess {
        benchmark: "xds".into(),
        name: "xds".into(),
        idle_rss_mb: v["server_rss_mib"].as_f64(),
        peak_rss_mb: v["server_peak_rss_mib"].as_f64(),
        cpu_seconds: None,
    });
    procs.push(FlatProcess {
        benchmark: "xds".into(),
        name: "ztunnel (holding the whole state)".into(),
        idle_rss_mb: v["ztunnel_rss_mib"].as_f64(),
        peak_rss_mb: None,
        cpu_seconds: None,
    });
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn opt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit.is_empty() => num(v),
        Some(v) => format!("{} {unit}", num(v)),
        None => "-".into(),
    }
}

impl Combined {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Benchmarks: all\n");
        let _ = writeln!(
            out,
            "Machine: {} CPU(s), {}, kernel {}, TCP congestion control {}. Every benchmark ran in this one invocation, one after the other; each one's baseline and mesh figures come from the same run. Details per benchmark: `<name>.md`.\n",
            self.machine.nproc,
            self.machine.cpu_model,
            self.machine.kernel,
            self.machine.tcp_congestion_control
        );
        let _ = writeln!(out, "| benchmark | ran | time |\n| --- | --- | ---: |");
        for r in &self.runs {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} s |",
                r.benchmark,
                match &r.error {
                    None => "ok".to_string(),
                    Some(e) => format!("FAILED: {}", e.replace('|', "\\|").replace('\n', " ")),
                },
                r.seconds
            );
        }
        let _ = writeln!(
            out,
            "\n## Scenarios\n\n| benchmark | scenario | baseline | mesh | mesh/baseline | better |\n| --- | --- | ---: | ---: | ---: | --- |"
        );
        for r in &self.rows {
            let base = match r.baseline {
                Some(b) => format!("{} ({})", opt(Some(b), &r.unit), r.baseline_label),
                None => "-".into(),
            };
            let (scenario, mesh) = match r.baseline {
                Some(_) => (
                    r.scenario.clone(),
                    format!("{} ({})", opt(Some(r.mesh), &r.unit), r.mesh_label),
                ),
                // No baseline: the label says what was measured.
                None => (
                    format!("{} ({})", r.scenario, r.mesh_label),
                    opt(Some(r.mesh), &r.unit),
                ),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.benchmark,
                scenario,
                base,
                mesh,
                r.ratio
                    .map(|x| format!("{}x", num(x)))
                    .unwrap_or("-".into()),
                r.better.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(
            out,
            "\n## Mesh processes\n\n| benchmark | process | idle RSS (MiB) | peak RSS (MiB) | CPU s during mesh runs |\n| --- | --- | ---: | ---: | ---: |"
        );
        for p in &self.processes {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                p.benchmark,
                p.name,
                opt(p.idle_rss_mb, ""),
                opt(p.peak_rss_mb, ""),
                opt(p.cpu_seconds, "")
            );
        }
        out
    }

    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("all.json");
        let md = dir.join("all.md");
        let mut body = serde_json::to_string_pretty(self)?;
        body.push('\n');
        std::fs::write(&json, body).with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        eprintln!("bench: wrote {} and {}", json.display(), md.display());
        Ok(())
    }
}

/// Runs the selected benchmarks in sequence and writes the combined files.
/// Returns the Markdown, or an error naming the benchmarks that failed
/// (after writing what the others measured).
pub fn run(a: &AllArgs) -> Result<String> {
    let names: Vec<&str> = ["ztunnel", "capture", "xds", "waypoint"]
        .into_iter()
        .filter(|n| a.only.is_empty() || a.only.iter().any(|o| o == n))
        .collect();
    let dir = a.out_dir.display().to_string();
    let secs = a.duration_secs.to_string();
    let mut combined = Combined {
        schema_version: crate::report::SCHEMA_VERSION,
        benchmark: "all",
        timestamp_unix: report::unix_now(),
        machine: Machine::detect(),
        runs: Vec::new(),
        rows: Vec::new(),
        processes: Vec::new(),
        reports: Vec::new(),
        control_plane: None,
    };
    for name in names {
        if load::stopped() {
            break;
        }
        eprintln!("bench all: running {name}");
        let t0 = Instant::now();
        let mut argv = vec![name.to_string(), "--out-dir".into(), dir.clone()];
        if name == "ztunnel" || name == "capture" {
            argv.extend(["--duration-secs".to_string(), secs.clone()]);
        }
        let res = sub(&argv).and_then(|b| match b {
            Bench::Ztunnel(x) => ztunnel::run(&x).map(Some),
            Bench::Capture(x) => capture::run(&x).map(Some),
            Bench::Waypoint(x) => waypoint::run(&x).map(Some),
            Bench::Xds(x) => xds::run(&x).map(|_| None),
            Bench::All(_) => Err(anyhow!("`all` does not nest")),
        });
        let res = res.and_then(|report| match report {
            Some(r) => {
                r.write(&a.out_dir)?;
                Ok(Some(r))
            }
            None => Ok(None),
        });
        let seconds = t0.elapsed().as_secs_f64();
        match res {
            Ok(Some(r)) => {
                println!("{}", r.text());
                flatten_report(&r, &mut combined.rows, &mut combined.processes);
                combined.reports.push(r);
                combined.runs.push(RunStatus {
                    benchmark: name.into(),
                    ok: true,
                    seconds,
                    error: None,
                });
            }
            Ok(None) => {
                // The xds benchmark writes its own JSON; read it back.
                let path = a.out_dir.join("xds.json");
                let v: Result<serde_json::Value> = std::fs::read(&path)
                    .with_context(|| format!("reading {}", path.display()))
                    .and_then(|b| {
                        serde_json::from_slice(&b)
                            .with_context(|| format!("parsing {}", path.display()))
                    });
                let (ok, error) = match v {
                    Ok(v) => {
                        flatten_xds(&v, &mut combined.rows, &mut combined.processes);
                        combined.control_plane = Some(v);
                        (true, None)
                    }
                    Err(e) => (false, Some(format!("{e:#}"))),
                };
                combined.runs.push(RunStatus {
                    benchmark: name.into(),
                    ok,
                    seconds,
                    error,
                });
            }
            Err(e) => {
                eprintln!("bench all: {name} failed: {e:#}");
                combined.runs.push(RunStatus {
                    benchmark: name.into(),
                    ok: false,
                    seconds,
                    error: Some(format!("{e:#}")),
                });
            }
        }
    }
    combined.write(&a.out_dir)?;
    let md = combined.markdown();
    let failed: Vec<&str> = combined
        .runs
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.benchmark.as_str())
        .collect();
    if load::stopped() {
        return Err(anyhow!("interrupted"));
    }
    if !failed.is_empty() {
        println!("{md}");
        return Err(anyhow!(
            "failed: {} (the others are in all.md)",
            failed.join(", ")
        ));
    }
    Ok(md)
}
