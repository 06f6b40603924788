//! Removing what test beds leave behind: cgroups, namespaces, processes,
//! pinned eBPF objects.
//!
//! Names carry the owner's pid (`ztb<pid>x<counter>...`), which is how a later
//! run knows that a leftover is stale: its owner process is gone, so nobody
//! will ever clean it up otherwise.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::netns_path;

/// Every name a test bed creates starts with this.
pub(crate) const PREFIX_TAG: &str = "ztb";

/// Parses `ztb<pid>x<counter>` at the start of `name`, optionally followed by
/// `-...`. Returns the pid and the prefix.
pub(crate) fn parse_prefix(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(PREFIX_TAG)?;
    let pid_len = rest.find(|c: char| !c.is_ascii_digit())?;
    let pid: u32 = rest[..pid_len].parse().ok()?;
    let rest = rest[pid_len..].strip_prefix('x')?;
    let ctr_len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if ctr_len == 0 {
        return None;
    }
    let tail = &rest[ctr_len..];
    if !(tail.is_empty() || tail.starts_with('-')) {
        return None;
    }
    let prefix_len = PREFIX_TAG.len() + pid_len + 1 + ctr_len;
    Some((pid, &name[..prefix_len]))
}

fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

/// True if `name` belongs to a test bed whose process is gone.
fn is_stale(name: &str) -> bool {
    matches!(parse_prefix(name), Some((pid, _)) if !pid_alive(pid))
}

/// The cgroup v2 hierarchy pods' cgroups are created in.
///
/// `E2E_CGROUP_ROOT` if set; else `/sys/fs/cgroup/unified` (hybrid hosts, as
/// here) if it is a cgroup2 mount; else `/sys/fs/cgroup` if that is cgroup2
/// (pure v2 hosts); else cgroup2 is mounted at `/sys/fs/cgroup/unified`.
pub fn cgroup_root() -> Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(r) = ROOT.get() {
        return Ok(r.clone());
    }
    let root = find_or_mount_cgroup_root()?;
    Ok(ROOT.get_or_init(|| root).clone())
}

fn find_or_mount_cgroup_root() -> Result<PathBuf> {
    if let Some(r) = std::env::var_os("E2E_CGROUP_ROOT") {
        return Ok(PathBuf::from(r));
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    for p in [unified, Path::new("/sys/fs/cgroup")] {
        if p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists() {
            return Ok(p.to_path_buf());
        }
    }
    std::fs::create_dir_all(unified).with_context(|| format!("creating {}", unified.display()))?;
    nix::mount::mount(
        Some("none"),
        unified,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t cgroup2 none {}", unified.display()))?;
    Ok(unified.to_path_buf())
}

/// Kills every process in the cgroup subtree at `dir` and removes the
/// directories, deepest first. A cgroup can't be removed while it has
/// processes; killing them (rather than moving them out) is right here because
/// they can only be test processes whose test is over.
pub(crate) fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, including
    // processes forking at that moment. Fall back to killing pid by pid.
    let kill_file = dir.join("cgroup.kill");
    if !(kill_file.exists() && std::fs::write(&kill_file, "1").is_ok()) {
        kill_cgroup_procs(dir);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rmdir_tree(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()))
            }
            // EBUSY until the killed processes are actually gone.
            Err(_) => {
                kill_cgroup_procs(dir);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn kill_cgroup_procs(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if pid as u32 != std::process::id() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_cgroup_procs(&e.path());
            }
        }
    }
}

fn rmdir_tree(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path())?;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("rmdir {}", dir.display())),
    }
}

/// SIGKILLs every process (other than ourselves) living in one of the named
/// network namespaces. Deleting a named namespace only removes its name; a
/// process still inside would keep it (and its veths) alive, invisible.
pub(crate) fn kill_procs_in_netns(names: &[String]) {
    let targets: HashSet<(u64, u64)> = names
        .iter()
        .filter_map(|n| std::fs::metadata(netns_path(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if targets.is_empty() {
        return;
    }
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path().join("ns/net")) {
            if targets.contains(&(m.dev(), m.ino())) {
                tracing::debug!(pid, "e2e: killing process left in a test bed netns");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// Deletes a named namespace (`ip netns del`); missing is fine.
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    let _g = crate::testbed::netns_lock();
    match crate::netns::ip(&["netns", "del", name]) {
        Ok(()) => Ok(()),
        Err(_) if !netns_path(name).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `E2E_KEEP=1` asks to keep temp dirs for inspection.
pub(crate) fn keep_files() -> bool {
    std::env::var("E2E_KEEP").is_ok_and(|v| v == "1")
}

/// See [`Testbed::cleanup_stale`](crate::Testbed::cleanup_stale).
pub(crate) fn cleanup_stale() -> Result<Vec<String>> {
    remove_matching(is_stale)
}

/// Removes leftovers carrying exactly `prefix`. A fresh test bed calls this
/// for its own new prefix: it has never been used in this process (the
/// counter only grows), so anything already named with it was left by an
/// earlier process that crashed and happened to have our pid (pids are
/// reused, and containers tend to hand out the same small ones).
pub(crate) fn remove_prefix(prefix: &str) -> Result<Vec<String>> {
    remove_matching(|name| parse_prefix(name).is_some_and(|(_, p)| p == prefix))
}

/// Removes every test bed of this process: what a stop signal handler
/// does before exiting, when no destructor will run.
pub(crate) fn remove_own() -> Result<Vec<String>> {
    let me = std::process::id();
    remove_matching(|name| parse_prefix(name).is_some_and(|(pid, _)| pid == me))
}

fn remove_matching(is_stale: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();

    // Namespaces: kill what still runs inside, then delete.
    let stale_ns: Vec<String> = match std::fs::read_dir("/run/netns") {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_stale(n))
            .collect(),
        Err(_) => Vec::new(),
    };
    kill_procs_in_netns(&stale_ns);
    for n in stale_ns {
        match delete_netns(&n) {
            Ok(()) => removed.push(format!("netns {n}")),
            Err(e) => errors.push(e),
        }
    }

    // Cgroups.
    if let Ok(root) = cgroup_root() {
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_stale(&name) && e.file_type().is_ok_and(|t| t.is_dir()) {
                    match remove_cgroup_tree(&e.path()) {
                        Ok(()) => removed.push(format!("cgroup {}", e.path().display())),
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
    }

    // Pinned eBPF objects (in-pod capture) that tests and benchmarks put
    // under `/sys/fs/bpf/<prefix>-...`: they outlive every namespace and
    // cgroup (only their pins keep them), so they go explicitly.
    for (name, path) in bpf_pins() {
        if is_stale(&name) {
            match remove_pins(&path) {
                Ok(()) => removed.push(format!("bpf pins {}", path.display())),
                Err(e) => errors.push(e),
            }
        }
    }

    // Temp dirs (logs, pcaps), unless the user is keeping them to look at.
    if !keep_files() {
        if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_stale(&name) && e.file_type().is_ok_and(|t| t.is_dir()) {
                    match std::fs::remove_dir_all(e.path()) {
                        Ok(()) => removed.push(format!("dir {}", e.path().display())),
                        Err(e) => errors.push(e.into()),
                    }
                }
            }
        }
    }

    for r in &removed {
        tracing::info!("e2e: removed leftover {r}");
    }
    if let Some(e) = errors.into_iter().next() {
        bail!("cleaning up leftovers of old test beds (removed {removed:?}): {e:#}");
    }
    Ok(removed)
}

/// Where test beds pin eBPF objects.
pub(crate) const BPF_FS: &str = "/sys/fs/bpf";

/// `(name, path)` of each entry at the top of the bpffs.
pub(crate) fn bpf_pins() -> Vec<(String, PathBuf)> {
    match std::fs::read_dir(BPF_FS) {
        Ok(rd) => rd
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Unpins a file or a tree of pins (unlinking a pin drops the kernel
/// object once nothing else holds it; a pinned link detaches).
pub(crate) fn remove_pins(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unpinning {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_prefix;

    #[test]
    fn parses_prefixes() {
        assert_eq!(parse_prefix("ztb123x4"), Some((123, "ztb123x4")));
        assert_eq!(parse_prefix("ztb123x4-node1-p"), Some((123, "ztb123x4")));
        assert_eq!(parse_prefix("ztb123x"), None);
        assert_eq!(parse_prefix("ztbx4"), None);
        assert_eq!(parse_prefix("ztb123x4y"), None);
        assert_eq!(parse_prefix("other"), None);
        assert_eq!(parse_prefix("ztb123"), None);
    }
}
