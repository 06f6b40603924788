//! Memory and CPU of a process, from `/proc/<pid>/status` and `/proc/<pid>/stat`.

use anyhow::{anyhow, Context, Result};

/// A `Vm*:` field of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in {path}"))
}

/// Current resident set (VmRSS), MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmRSS")? as f64 / 1024.0)
}

/// Peak resident set (VmHWM), MiB.
pub fn hwm_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmHWM")? as f64 / 1024.0)
}

fn clk_tck() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// utime + stime so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after the last ')'. Field 3 (state) is index 0 there,
    // utime (14) index 11, stime (15) index 12.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("malformed {path}: field {}", i + 3))
    };
    Ok((tick(11)? + tick(12)?) as f64 / clk_tck())
}

/// utime + stime so far of `pid` and its descendants (nginx's workers are
/// children of its master), in seconds.
pub fn tree_cpu_seconds(pid: u32) -> Result<f64> {
    let mut total = cpu_seconds(pid)?;
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let children = task?.path().join("children");
        // A thread that ended meanwhile has no children file any more.
        let Ok(list) = std::fs::read_to_string(&children) else {
            continue;
        };
        for child in list.split_whitespace().filter_map(|c| c.parse().ok()) {
            // A child that exited meanwhile counts no more.
            total += tree_cpu_seconds(child).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// CPU time all processes spent in user and system mode so far (the `cpu`
/// line of `/proc/stat`: user + nice + system), in seconds.
pub fn system_busy_seconds() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Ok(ticks as f64 / clk_tck())
}

/// The 1-minute load average.
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
