//! The pod's cgroup as containerd and CRI-O pass it under each kubelet
//! cgroup driver, resolved by the plugin to the directory ztunnel gets
//! (against the host's real cgroup2 mount, in a uniquely named slice that
//! the test removes), and a value naming no cgroup failing the `ADD`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;

use serde_json::json;
use support::{prev_result, run_plugin, FakeZtunnel};

/// The first cgroup2 mount in /proc/self/mountinfo, as the plugin finds it.
fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// Removes the test's cgroups (empty directories), deepest first.
struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_and_cgroupfs_values_reach_ztunnel_as_the_pod_directory() {
    let mount = cgroup2_mount();
    let top = format!("ztcnitest{}", std::process::id());
    let uid = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let uid_ = uid.replace('-', "_");
    // systemd: `<top>-besteffort-pod<uid_>.slice`, nested by dashes.
    let slice = format!("{top}-besteffort-pod{uid_}.slice");
    let slice_dir = mount
        .join(format!("{top}.slice"))
        .join(format!("{top}-besteffort.slice"))
        .join(&slice);
    // cgroupfs: `/<top>/besteffort/pod<uid>` from the mount's root.
    let fs_value = format!("/{top}/besteffort/pod{uid}");
    let fs_dir = mount.join(&fs_value[1..]);
    let _cleanup = Cleanup(vec![
        mount.join(format!("{top}.slice")),
        mount.join(format!("{top}.slice/{top}-besteffort.slice")),
        slice_dir.clone(),
        mount.join(&top),
        mount.join(format!("{top}/besteffort")),
        fs_dir.clone(),
    ]);
    std::fs::create_dir_all(&slice_dir).unwrap();
    std::fs::create_dir_all(&fs_dir).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let zt = FakeZtunnel::start(&socket);
    let labels = dir.path().join("labels.json");
    std::fs::write(
        &labels,
        r#"{"namespaces": {"mesh": {"istio.io/dataplane-mode": "ambient"}}}"#,
    )
    .unwrap();
    let add = |value: String| {
        let conf = json!({"cniVersion": "1.0.0", "type": "ztunnel-cni",
                          "ztunnelSocket": socket, "labelsFile": labels,
                          "capabilities": {"cgroupPath": true},
                          "runtimeConfig": {"cgroupPath": value},
                          "prevResult": prev_result()});
        let args = format!("K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=app;K8S_POD_UID={uid}");
        tokio::task::spawn_blocking(move || {
            run_plugin(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_NETNS", "/proc/self/ns/net"),
                    ("CNI_ARGS", &args),
                ],
                &conf.to_string(),
            )
        })
    };

    let expanded = format!("/{top}.slice/{top}-besteffort.slice/{slice}");
    for (value, want) in [
        // containerd: the kubelet's expanded slices.
        (expanded, &slice_dir),
        // CRI-O: the slice name.
        (slice.clone(), &slice_dir),
        // runc's form of a container's cgroup: its slice is the pod's.
        (format!("{slice}:cri-containerd:0123abcd"), &slice_dir),
        (fs_value.clone(), &fs_dir),
        // A full path under the mount (the test bed's form).
        (fs_dir.display().to_string(), &fs_dir),
    ] {
        let (ok, out) = add(value.clone()).await.unwrap();
        assert!(ok, "{value}: {out}");
        let got = zt.adds.lock().unwrap().pop().expect("enrolled");
        assert_eq!(PathBuf::from(&got.cgroup_path), *want, "{value}");
    }

    // A pod whose slice is not there: a CNI error naming the value, and
    // ztunnel never asked.
    let absent = format!("{top}-burstable-pod{uid_}.slice");
    let (ok, out) = add(absent.clone()).await.unwrap();
    assert!(!ok);
    assert_eq!(out["code"], 7, "{out}");
    assert!(out["details"].as_str().unwrap().contains(&absent), "{out}");
    let (ok, out) = add("not-a-cgroup".into()).await.unwrap();
    assert!(!ok);
    assert!(
        out["details"].as_str().unwrap().contains("not-a-cgroup"),
        "{out}"
    );
    assert!(zt.adds.lock().unwrap().is_empty());
}
