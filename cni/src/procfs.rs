//! Finding a running pod's process through the host's `/proc`, for the
//! node agent that enrolls pods already running (see
//! `follow.rs`): its network namespace is that process's
//! (`/proc/<pid>/ns/net`), its cgroup is read from `/proc/<pid>/cgroup`.
//!
//! This is Istio's node agent's way (`podNetnsProcFinder`): a pod's
//! processes are the ones whose cgroup v2 path has the pod's own cgroup in
//! it (`pod<uid>` or `...-pod<uid with _>.slice`, see `cgroup.rs`), which
//! holds from inside a cgroup namespace too. Processes in the host's
//! network namespace are skipped: a host-network pod has no namespace of
//! its own to capture. The host's is the agent's own (it runs with
//! `hostNetwork`; see [`own_netns`]), which needs no access to pid 1. Of the pod's processes the oldest
//! (lowest pid: the sandbox's pause process, started first and living as
//! long as the pod) is taken, so the path stays valid for ztunnel to
//! reopen after a restart.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// One process of a pod, as the host's procfs shows it.
#[derive(Debug, PartialEq, Eq)]
pub struct PodProcess {
    pub pid: u32,
    /// Its cgroup v2 path (`/proc/<pid>/cgroup`'s `0::` line).
    pub cgroup: String,
}

impl PodProcess {
    /// Its network namespace, under the procfs it was found in.
    pub fn netns(&self, proc: &Path) -> PathBuf {
        proc.join(self.pid.to_string()).join("ns/net")
    }
}

/// The inode of this process's network namespace: the host's, for an
/// agent on the host's network.
pub fn own_netns() -> anyhow::Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .ino())
}

/// The oldest process of pod `uid` outside network namespace `host_netns`
/// (an inode), under the procfs mounted at `proc` (the host's: the agent
/// runs with `hostPID` or the host's `/proc` mounted); `None` when there is
/// none (the pod has no process yet, or is gone).
pub fn find_pod(proc: &Path, uid: &str, host_netns: u64) -> anyhow::Result<Option<PodProcess>> {
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .with_context(|| format!("listing {}", proc.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc.join(pid.to_string());
        // Processes come and go while we look: skip the ones that went.
        let Ok(text) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(cgroup) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        if !cgroup
            .split('/')
            .any(|c| crate::cgroup::is_pod_component(c, uid))
        {
            continue;
        }
        match std::fs::metadata(dir.join("ns/net")) {
            Ok(m) if m.ino() != host_netns => {
                return Ok(Some(PodProcess {
                    pid,
                    cgroup: cgroup.to_string(),
                }))
            }
            _ => continue,
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A process in a new network namespace and a pod-like cgroup under
    /// the host's cgroup2 mount (uniquely named, removed on drop): what a
    /// running pod's sandbox is on a node.
    struct Pod {
        child: Child,
        dirs: Vec<PathBuf>,
    }
    impl Drop for Pod {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            for d in self.dirs.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    #[test]
    fn finds_a_running_pods_process_netns_and_cgroup() {
        let mount = crate::cgroup::mount();
        let top = format!("ztcniprocfs{}", std::process::id());
        let uid = format!("{:08x}-1111-2222-3333-444455556666", std::process::id());
        let pod_dir = mount.join(&top).join(format!("pod{uid}"));
        let ctr = pod_dir.join("sandbox");
        std::fs::create_dir_all(&ctr).unwrap();
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .unwrap();
        let mut pod = Pod {
            child,
            dirs: vec![mount.join(&top), pod_dir.clone(), ctr.clone()],
        };
        std::fs::write(ctr.join("cgroup.procs"), pod.child.id().to_string()).unwrap();
        // unshare execs sleep once the namespace is made: wait for it.
        let proc = Path::new("/proc");
        let own_ns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let pid = pod.child.id();
        let mut found = None;
        for _ in 0..100 {
            let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
            if ns.is_ok_and(|i| i != own_ns) {
                found = find_pod(proc, &uid, own_ns).unwrap();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let found = found.expect("the pod's process");
        assert_eq!(found.pid, pid);
        let netns_inode = std::fs::metadata(found.netns(proc)).unwrap().ino();
        assert_ne!(netns_inode, own_ns);
        assert_eq!(
            crate::cgroup::pod_dir_of_process(&found.cgroup, &uid, &mount).unwrap(),
            pod_dir
        );

        // Another uid: nothing. The process gone: nothing.
        assert_eq!(find_pod(proc, "no-such-uid", own_ns).unwrap(), None);
        pod.child.kill().unwrap();
        pod.child.wait().unwrap();
        assert_eq!(find_pod(proc, &uid, own_ns).unwrap(), None);
    }

    #[test]
    fn host_network_processes_are_skipped() {
        // A fake procfs: the pod's process in the host's namespace, then in
        // one of its own (any other inode).
        let proc = tempfile::tempdir().unwrap();
        let p = proc.path();
        let uid = "5d6e7f80-aaaa-bbbb-cccc-dddddddddddd";
        std::fs::create_dir_all(p.join("40/ns")).unwrap();
        std::fs::create_dir_all(p.join("7/ns")).unwrap();
        std::fs::write(p.join("7/cgroup"), "0::/system.slice/x.service\n").unwrap();
        std::fs::write(p.join("7/ns/net"), "").unwrap();
        let cgroup = format!("/kubepods/besteffort/pod{uid}/x");
        std::fs::write(
            p.join("40/cgroup"),
            format!("1:name=systemd:/\n0::{cgroup}\n"),
        )
        .unwrap();
        std::fs::write(p.join("40/ns/net"), "").unwrap();
        let pod_ns = std::fs::metadata(p.join("40/ns/net")).unwrap().ino();
        assert_eq!(find_pod(p, uid, pod_ns).unwrap(), None, "host network");
        assert_eq!(
            find_pod(p, uid, 1).unwrap(),
            Some(PodProcess { pid: 40, cgroup })
        );
    }
}
