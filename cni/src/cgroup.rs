//! The pod's cgroup v2 directory, from what the runtime passes.
//!
//! ztunnel attaches the pod's outbound capture (`cgroup/connect4|6`,
//! `sockops`) to one cgroup with BPF links, and a cgroup program applies to
//! every cgroup below the one it is attached to. So the capture needs the
//! **pod-level** cgroup: every container of the pod (the sandbox, init and
//! app containers) is a child of it. The sandbox container's own cgroup
//! (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `/kubepods/.../pod<uid>/<id>`)
//! holds only the pause process, so capture attached there would see none
//! of the app's connections.
//!
//! What the runtime passes as `runtimeConfig.cgroupPath` (the `cgroupPath`
//! capability) is the pod sandbox's `CgroupParent`, which *is* the
//! pod-level cgroup; its form depends on the runtime and on the kubelet's
//! cgroup driver:
//!
//! - containerd's CRI passes the kubelet's value unchanged
//!   (`cniNamespaceOpts`: `WithCapabilityCgroupPath(config.Linux.CgroupParent)`),
//!   a path from the cgroup2 mount's root under either driver:
//!   `/kubepods/besteffort/pod<uid>` (`cgroupfs`; Guaranteed pods:
//!   `/kubepods/pod<uid>`), or the expanded slices
//!   `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _ for ->.slice`
//!   (`systemd`: the kubelet's `CgroupName.ToSystemd` expands them);
//! - CRI-O (`newPodNetwork`: `RuntimeConfig.CgroupPath: sb.CgroupParent()`)
//!   passes the same path with `cgroupfs`, but with its `systemd` manager
//!   only the last element, the slice name
//!   (`kubepods-besteffort-pod<uid>.slice`: `convertCgroupFsNameToSystemd`
//!   is `path.Base`), which systemd nests by its dashes:
//!   `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`
//!   under the mount.
//!
//! runc's systemd form of a *container's* cgroup, `slice:prefix:name`
//! (e.g. `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`), is
//! accepted too and resolved to its slice, the pod-level cgroup. An absolute
//! path that already is a cgroup2 directory (it has `cgroup.controllers`;
//! the test bed's pods) is taken as it is.
//!
//! The netns cannot stand in for the path at `ADD`: containerd and CRI-O
//! create the netns and call CNI before they start the sandbox, so no
//! process is in it yet. (Running pods, which have processes, are found the
//! other way round, from `/proc`: see `procfs.rs`.)

use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context};

/// Where a cgroup2 hierarchy is mounted when `/proc/self/mountinfo` does
/// not say otherwise.
const DEFAULT_MOUNT: &str = "/sys/fs/cgroup";

/// The cgroup2 mount point: the first `cgroup2` filesystem in
/// `/proc/self/mountinfo` (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid host).
pub fn mount() -> PathBuf {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|t| mount_in(&t))
        .unwrap_or_else(|| DEFAULT_MOUNT.into())
}

/// The first cgroup2 mount point in the text of a `mountinfo` file:
/// `id parent major:minor root mountpoint options [optional...] - fstype ...`.
pub fn mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(|p| unescape(p).into())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The pod's cgroup directory that `value` (`runtimeConfig.cgroupPath`)
/// names, under the cgroup2 hierarchy mounted at `mount`; it must exist
/// (the kubelet creates the pod's cgroup before it asks for the sandbox).
pub fn resolve(value: &str, mount: &Path) -> anyhow::Result<PathBuf> {
    let full = Path::new(value);
    if full.is_absolute()
        && full
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && full.join("cgroup.controllers").is_file()
    {
        // A cgroup2 directory already, on whatever mount (the test bed's).
        return Ok(full.to_path_buf());
    }
    let rel = relative(value, mount).map_err(|why| anyhow!("cgroupPath {value:?}: {why}"))?;
    let dir = mount.join(rel);
    let meta = std::fs::metadata(&dir).with_context(|| {
        format!(
            "cgroupPath {value:?}: the pod's cgroup {} is not there",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        bail!(
            "cgroupPath {value:?}: {} is not a cgroup directory",
            dir.display()
        );
    }
    Ok(dir)
}

/// `value` as a path relative to the cgroup2 mount (see the module docs
/// for the forms), or why it is none of them.
fn relative(value: &str, mount: &Path) -> Result<PathBuf, String> {
    let rel = if value.is_empty() {
        return Err("empty".into());
    } else if let Ok(under) = Path::new(value).strip_prefix(mount) {
        under.to_path_buf() // already a full path under the mount
    } else if let Some(from_root) = value.strip_prefix('/') {
        PathBuf::from(from_root) // cgroupfs driver
    } else if let Some((slice, _)) = value.split_once(':') {
        // runc's systemd `slice:prefix:name`: the slice is the pod's.
        if value.split(':').count() != 3 {
            return Err("not `slice:prefix:name`".into());
        }
        expand_slice(slice)?
    } else if value.ends_with(".slice") {
        expand_slice(value)? // systemd driver
    } else {
        return Err(
            "neither a path from the cgroup root (/kubepods...) nor a systemd slice (kubepods-...-pod<uid>.slice)"
                .into(),
        );
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err("has `.`, `..` or empty components".into());
    }
    Ok(rel)
}

/// systemd's slice nesting: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`
/// (`-.slice` is the root), as systemd and runc expand it.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let stem = slice
        .strip_suffix(".slice")
        .ok_or_else(|| format!("{slice:?} is not a systemd slice (no .slice)"))?;
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    if stem.is_empty()
        || stem.contains('/')
        || stem.starts_with('-')
        || stem.ends_with('-')
        || stem.contains("--")
    {
        return Err(format!("{slice:?} is not a valid systemd slice name"));
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// Whether `component` of a cgroup path is pod `uid`'s own cgroup:
/// `pod<uid>` (cgroupfs) or `...-pod<uid, _ for ->.slice` (systemd).
pub fn is_pod_component(component: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false; // `pod` alone names no pod
    }
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    component == format!("pod{uid}")
        || component == systemd
        || component
            .strip_suffix(&systemd)
            .is_some_and(|rest| rest.ends_with('-'))
}

/// Pod `uid`'s cgroup directory under `mount`, from the cgroup v2 path of
/// one of its processes (`/proc/<pid>/cgroup`'s `0::` line, which names a
/// container's cgroup below the pod's). Read from inside a cgroup
/// namespace (a DaemonSet's container on cgroup v2) that path is relative
/// to the reader's own cgroup (`/../../kubepods-...`), so the pod's place
/// is rebuilt: a systemd slice from its name, a cgroupfs `pod<uid>` from
/// the kubelet's layout (`kubepods/[besteffort|burstable/]pod<uid>`).
pub fn pod_dir_of_process(path: &str, uid: &str, mount: &Path) -> anyhow::Result<PathBuf> {
    let parts: Vec<Component> = Path::new(path).components().collect();
    let at = parts
        .iter()
        .position(|c| matches!(c, Component::Normal(n) if n.to_str().is_some_and(|n| is_pod_component(n, uid))))
        .ok_or_else(|| anyhow!("cgroup {path:?} is not under pod {uid}'s"))?;
    let clean = parts[..=at]
        .iter()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let pod = parts[at].as_os_str().to_string_lossy();
    let candidates: Vec<PathBuf> = if clean {
        vec![parts[..=at].iter().skip(1).collect()]
    } else if pod.ends_with(".slice") {
        vec![expand_slice(&pod).map_err(|e| anyhow!("cgroup {path:?}: {e}"))?]
    } else {
        ["", "besteffort", "burstable"]
            .iter()
            .map(|qos| Path::new("kubepods").join(qos).join(&*pod))
            .collect()
    };
    candidates
        .iter()
        .map(|rel| mount.join(rel))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| {
            anyhow!(
                "pod {uid}'s cgroup (from {path:?}) is not under {}",
                mount.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f9a5e3c-5c4b-4a53-9d7e-2b1c3e4d5f60";
    const UID_: &str = "0f9a5e3c_5c4b_4a53_9d7e_2b1c3e4d5f60";

    #[test]
    fn slices_nest_by_dashes() {
        assert_eq!(
            expand_slice(&format!("kubepods-besteffort-pod{UID_}.slice")).unwrap(),
            PathBuf::from(format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        assert_eq!(
            expand_slice(&format!("kubepods-pod{UID_}.slice")).unwrap(),
            PathBuf::from(format!("kubepods.slice/kubepods-pod{UID_}.slice"))
        );
        assert_eq!(expand_slice("-.slice").unwrap(), PathBuf::new());
        for bad in [
            "a--b.slice",
            "-a.slice",
            "a-.slice",
            ".slice",
            "a/b.slice",
            "a.scope",
        ] {
            assert!(expand_slice(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_driver_form() {
        let m = Path::new("/sys/fs/cgroup");
        let rel = |v: &str| relative(v, m);
        let pod =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        // systemd driver: the expanded path (containerd), the slice name
        // (CRI-O), or runc's form of a container's cgroup.
        assert_eq!(rel(&format!("/{pod}")).unwrap(), PathBuf::from(&pod));
        assert_eq!(
            rel(&format!("kubepods-burstable-pod{UID_}.slice")).unwrap(),
            PathBuf::from(&pod)
        );
        assert_eq!(
            rel(&format!(
                "kubepods-burstable-pod{UID_}.slice:cri-containerd:abc123"
            ))
            .unwrap(),
            PathBuf::from(&pod)
        );
        // cgroupfs driver: from the mount's root.
        assert_eq!(
            rel(&format!("/kubepods/burstable/pod{UID}")).unwrap(),
            PathBuf::from(format!("kubepods/burstable/pod{UID}"))
        );
        // Already under the mount.
        assert_eq!(
            rel(&format!("/sys/fs/cgroup/kubepods/pod{UID}")).unwrap(),
            PathBuf::from(format!("kubepods/pod{UID}"))
        );
        assert_eq!(rel("/").unwrap(), PathBuf::new());
        for bad in [
            "",
            "kubepods",
            "a:b",
            "a.slice:b:c:d",
            "/kubepods/../../etc",
            "/sys/fs/cgroup/../../etc",
        ] {
            assert!(rel(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolves_under_a_mount() {
        let mount = tempfile::tempdir().unwrap();
        let pod = mount.path().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        ));
        std::fs::create_dir_all(&pod).unwrap();
        let slice = format!("kubepods-besteffort-pod{UID_}.slice");
        assert_eq!(resolve(&slice, mount.path()).unwrap(), pod);
        let full = pod.display().to_string();
        assert_eq!(resolve(&full, mount.path()).unwrap(), pod);
        // A cgroup2 directory on another mount is taken as it is.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("cgroup.controllers"), "").unwrap();
        let value = other.path().display().to_string();
        assert_eq!(resolve(&value, mount.path()).unwrap(), other.path());
        // Without that file, an absolute path is the cgroupfs form.
        std::fs::remove_file(other.path().join("cgroup.controllers")).unwrap();
        assert!(resolve(&value, mount.path()).is_err());

        let cgroupfs = mount.path().join(format!("kubepods/besteffort/pod{UID}"));
        std::fs::create_dir_all(&cgroupfs).unwrap();
        assert_eq!(
            resolve(&format!("/kubepods/besteffort/pod{UID}"), mount.path()).unwrap(),
            cgroupfs
        );

        // A pod whose cgroup is not there: the error names the value.
        let missing = format!("kubepods-burstable-pod{UID_}.slice");
        let e = format!("{:#}", resolve(&missing, mount.path()).unwrap_err());
        assert!(e.contains(&missing) && e.contains("not there"), "{e}");
        let e = format!("{:#}", resolve("weird", mount.path()).unwrap_err());
        assert!(
            e.contains("\"weird\"") && e.contains("systemd slice"),
            "{e}"
        );
        std::fs::write(mount.path().join("file"), "").unwrap();
        let e = format!("{:#}", resolve("/file", mount.path()).unwrap_err());
        assert!(e.contains("not a cgroup directory"), "{e}");
    }

    #[test]
    fn pod_dir_from_a_process_cgroup() {
        let mount = tempfile::tempdir().unwrap();
        let m = mount.path();
        let slice =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        let fs = format!("kubepods/besteffort/pod{UID}");
        std::fs::create_dir_all(m.join(&slice)).unwrap();
        std::fs::create_dir_all(m.join(&fs)).unwrap();
        let got = |p: &str| pod_dir_of_process(p, UID, m);
        // Read from the root cgroup namespace: the path as it is.
        assert_eq!(
            got(&format!("/{slice}/cri-containerd-abc.scope")).unwrap(),
            m.join(&slice)
        );
        assert_eq!(got(&format!("/{fs}/abc")).unwrap(), m.join(&fs));
        // From inside a cgroup namespace: rebuilt from the pod's name.
        assert_eq!(
            got(&format!(
                "/../../kubepods-burstable-pod{UID_}.slice/crio-abc.scope"
            ))
            .unwrap(),
            m.join(&slice)
        );
        assert_eq!(
            got(&format!("/../../besteffort/pod{UID}/abc")).unwrap(),
            m.join(&fs)
        );
        // Another pod's process, or a pod whose cgroup is gone.
        assert!(got("/kubepods.slice/kubepods-podother.slice/x.scope").is_err());
        let e = pod_dir_of_process(&format!("/kubepods/pod{UID}/x"), UID, m).unwrap_err();
        assert!(e.to_string().contains("is not under"), "{e}");
        assert!(is_pod_component(&format!("kubepods-pod{UID_}.slice"), UID));
        assert!(!is_pod_component(
            &format!("kubepods-xpod{UID_}.slice"),
            UID
        ));
        assert!(!is_pod_component("pod", ""));
        assert!(!is_pod_component("kubepods-pod.slice", ""));
    }

    #[test]
    fn mount_from_mountinfo() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(mount_in(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified =
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(mount_in(unified), Some("/sys/fs/cgroup".into()));
        let escaped = "35 24 0:30 / /mnt/cg\\040two rw - cgroup2 none rw";
        assert_eq!(mount_in(escaped), Some("/mnt/cg two".into()));
        assert_eq!(
            mount_in("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw"),
            None
        );
    }
}
