//! The results of one benchmark, in one shape shared by every benchmark
//! (`ztunnel`, and later capture, control plane, waypoint): rows of
//! `{scenario, metric, unit, baseline, mesh, ratio}`, a `processes` section,
//! informational targets and the machine. Rendered as a text table, a
//! Markdown table and JSON (`<out-dir>/<benchmark>.{json,md}`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Bumped when the JSON shape changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    /// `ztunnel`, `capture`, `control-plane`, `waypoint`, ...
    pub benchmark: String,
    /// What "baseline" and "mesh" mean in this benchmark.
    pub baseline_label: String,
    pub mesh_label: String,
    /// Seconds since the Unix epoch when the report was made.
    pub timestamp_unix: u64,
    pub machine: Machine,
    /// Free-form run parameters (durations, sizes, worker counts...).
    pub config: serde_json::Map<String, serde_json::Value>,
    pub results: Vec<Row>,
    pub processes: Vec<Process>,
    pub targets: Vec<Target>,
    /// Things a reader should know (methodology, warnings, anomalies).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    /// `net.ipv4.tcp_congestion_control`, which the test bed's namespaces
    /// inherit. It moves the figures: BBR without an `fq` qdisc paces every
    /// socket with kernel timers, and a tunnelled stream has three sockets
    /// sending where a direct one has one.
    pub tcp_congestion_control: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let tcp_congestion_control =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
        Machine {
            nproc,
            kernel,
            cpu_model,
            tcp_congestion_control,
        }
    }
}

/// Which direction is better for a metric.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub baseline: f64,
    pub mesh: f64,
    /// mesh / baseline; null if the baseline is 0.
    pub ratio: Option<f64>,
    /// mesh - baseline, for metrics where the difference is what matters
    /// (latency: the added microseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    pub better: Better,
}

impl Row {
    pub fn new(
        scenario: &str,
        metric: &str,
        unit: &str,
        baseline: f64,
        mesh: f64,
        better: Better,
    ) -> Row {
        Row {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            baseline: round4(baseline),
            mesh: round4(mesh),
            ratio: (baseline != 0.0).then(|| round4(mesh / baseline)),
            delta: None,
            better,
        }
    }

    pub fn with_delta(mut self) -> Row {
        self.delta = Some(round4(self.mesh - self.baseline));
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Process {
    pub name: String,
    /// Resident set (VmRSS) once ready, before any traffic; MiB.
    pub idle_rss_mb: f64,
    /// Peak resident set (VmHWM) at the end of the run; MiB.
    pub peak_rss_mb: f64,
    /// User + system CPU time consumed during the mesh measurements.
    pub cpu_seconds: f64,
    /// The same, per mesh scenario.
    pub cpu_seconds_by_scenario: serde_json::Map<String, serde_json::Value>,
    /// WARN / ERROR lines in its log during the run.
    pub log_warnings: usize,
    pub log_errors: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// `>=`, `<=`, `<` or `>`.
    pub op: String,
    pub threshold: f64,
    pub met: bool,
}

impl Target {
    pub fn new(name: &str, value: f64, unit: &str, op: &str, threshold: f64) -> Target {
        let met = match op {
            ">=" => value >= threshold,
            "<=" => value <= threshold,
            "<" => value < threshold,
            ">" => value > threshold,
            _ => false,
        };
        Target {
            name: name.into(),
            value,
            unit: unit.into(),
            op: op.into(),
            threshold,
            met,
        }
    }
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

/// Numbers with a sensible number of digits for their size.
fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn opt_num(v: Option<f64>, suffix: &str) -> String {
    v.map(|v| format!("{}{suffix}", num(v)))
        .unwrap_or_else(|| "-".into())
}

fn signed(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 0.0 => format!("+{}", num(v)),
        Some(v) => num(v),
        None => "-".into(),
    }
}

/// Seconds since the Unix epoch, for [`Report::timestamp_unix`].
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Report {
    fn results_rows(&self) -> Vec<[String; 6]> {
        self.results
            .iter()
            .map(|r| {
                [
                    format!("{} {}", r.scenario, r.metric),
                    format!("{} {}", num(r.baseline), r.unit),
                    format!("{} {}", num(r.mesh), r.unit),
                    opt_num(r.ratio, "x"),
                    r.delta
                        .map(|_| format!("{} {}", signed(r.delta), r.unit))
                        .unwrap_or_else(|| "".into()),
                    match r.better {
                        Better::Higher => "higher".into(),
                        Better::Lower => "lower".into(),
                    },
                ]
            })
            .collect()
    }

    fn process_rows(&self) -> Vec<[String; 5]> {
        self.processes
            .iter()
            .map(|p| {
                [
                    p.name.clone(),
                    num(p.idle_rss_mb),
                    num(p.peak_rss_mb),
                    format!("{:.2}", p.cpu_seconds),
                    format!("{} / {}", p.log_warnings, p.log_errors),
                ]
            })
            .collect()
    }

    fn target_rows(&self) -> Vec<[String; 3]> {
        self.targets
            .iter()
            .map(|t| {
                [
                    format!(
                        "{} {} {}{}",
                        t.name,
                        t.op,
                        num(t.threshold),
                        unit_sfx(&t.unit)
                    ),
                    format!("{}{}", num(t.value), unit_sfx(&t.unit)),
                    if t.met {
                        "met".into()
                    } else {
                        "NOT met".into()
                    },
                ]
            })
            .collect()
    }

    /// A plain-text rendering for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} benchmark ({} vs {}) on {} x {}, kernel {}, TCP congestion control {}",
            self.benchmark,
            self.mesh_label,
            self.baseline_label,
            self.machine.nproc,
            self.machine.cpu_model,
            self.machine.kernel,
            self.machine.tcp_congestion_control
        );
        out.push('\n');
        let headers = [
            "scenario",
            &self.baseline_label,
            &self.mesh_label,
            "mesh/base",
            "mesh-base",
            "better",
        ];
        text_table(&mut out, &headers, &self.results_rows());
        out.push('\n');
        text_table(
            &mut out,
            &[
                "process",
                "idle RSS MiB",
                "peak RSS MiB",
                "CPU s (mesh runs)",
                "log warn/err",
            ],
            &self.process_rows(),
        );
        out.push('\n');
        let _ = writeln!(
            out,
            "targets (informational, the bench never fails on them):"
        );
        text_table(
            &mut out,
            &["target", "value", "status"],
            &self.target_rows(),
        );
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "note: {n}");
            }
        }
        out
    }

    /// The same as a Markdown document.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Benchmark: {}\n", self.benchmark);
        let _ = writeln!(
            out,
            "Machine: {} CPU(s), {}, kernel {}, TCP congestion control {}. Baseline: {}. Mesh: {}.\n",
            self.machine.nproc,
            self.machine.cpu_model,
            self.machine.kernel,
            self.machine.tcp_congestion_control,
            self.baseline_label,
            self.mesh_label
        );
        if !self.config.is_empty() {
            let _ = writeln!(out, "Parameters:\n");
            for (k, v) in &self.config {
                let _ = writeln!(out, "- `{k}`: `{v}`");
            }
            out.push('\n');
        }
        let _ = writeln!(out, "## Results\n");
        md_table(
            &mut out,
            &[
                "scenario",
                &self.baseline_label,
                &self.mesh_label,
                "mesh/base",
                "mesh-base",
                "better",
            ],
            &self.results_rows(),
        );
        let _ = writeln!(out, "\n## Processes\n");
        md_table(
            &mut out,
            &[
                "process",
                "idle RSS (MiB)",
                "peak RSS (MiB)",
                "CPU s during mesh runs",
                "log warn / err",
            ],
            &self.process_rows(),
        );
        let _ = writeln!(out, "\n## Targets (informational)\n");
        md_table(
            &mut out,
            &["target", "value", "status"],
            &self.target_rows(),
        );
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Writes `<dir>/<benchmark>.json` and `<dir>/<benchmark>.md`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.benchmark));
        let md = dir.join(format!("{}.md", self.benchmark));
        let mut body = serde_json::to_string_pretty(self)?;
        body.push('\n');
        std::fs::write(&json, body).with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        eprintln!("bench: wrote {} and {}", json.display(), md.display());
        Ok(())
    }
}

fn unit_sfx(unit: &str) -> String {
    match unit {
        "" => String::new(),
        "x" => "x".into(),
        u => format!(" {u}"),
    }
}

fn text_table<const N: usize>(out: &mut String, headers: &[&str; N], rows: &[[String; N]]) {
    let mut w = [0usize; N];
    for (i, h) in headers.iter().enumerate() {
        w[i] = h.chars().count();
    }
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<width$}", width = w[i]);
            } else {
                let _ = write!(s, "  {c:>width$}", width = w[i]);
            }
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(out, headers);
    let total: usize = w.iter().sum::<usize>() + 2 * (N - 1);
    let _ = writeln!(out, "{}", "-".repeat(total));
    for r in rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(out, &cells);
    }
}

fn md_table<const N: usize>(out: &mut String, headers: &[&str; N], rows: &[[String; N]]) {
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let seps: Vec<&str> = (0..N)
        .map(|i| if i == 0 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "| {} |", seps.join(" | "));
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
}

/// The `p` quantile of `v` by nearest rank (sorts `v`); 0 if empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}
