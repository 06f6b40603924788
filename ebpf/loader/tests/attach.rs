//! Attaching, re-adopting and removing one pod's capture on a real pod
//! (a netns + cgroup from the e2e test bed), and the outbound rewrite as an
//! unmodified client sees it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use e2e::Testbed;
use ztunnel_ebpf::{remove, CaptureSpec, PodCapture};

fn pin_root(tb: &Testbed) -> PathBuf {
    // Unique per test bed; the test bed's stale cleanup does not know bpffs,
    // so the test removes it on every path (remove() is idempotent).
    PathBuf::from("/sys/fs/bpf").join(format!("{}-loader", tb.prefix()))
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = remove(&self.0);
        let _ = std::fs::remove_dir(self.0.parent().unwrap());
    }
}

#[test]
fn attach_adopt_redirect_remove() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let node = tb.add_node("n").unwrap();
    let pod = tb.add_netns_pod(&node, "p").unwrap();
    let dir = pin_root(&tb).join("pod-uid-1");
    let _cleanup = Cleanup(dir.clone());
    let netns = std::fs::File::open(format!("/run/netns/{}", pod.netns())).unwrap();

    let started = Instant::now();
    let cap = PodCapture::attach(&CaptureSpec {
        pin_dir: &dir,
        cgroup: pod.cgroup().unwrap(),
        netns: netns.as_fd(),
        mark: 0x539,
        outbound_port: 15001,
        hbone_port: 15008,
        exempt: &["169.254.7.1/32".parse().unwrap()],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("capture set up in {:?}", started.elapsed());
    for f in [
        "link_connect4",
        "link_connect6",
        "link_sockops",
        "link_sk_lookup",
        "ZT_ORIG_DST",
        "ZT_INBOUND",
    ] {
        assert!(dir.join(f).exists(), "{f} pinned");
    }
    drop(cap);

    // A new process (here: a new handle) adopts the pinned state.
    let cap = PodCapture::adopt(&dir).unwrap_or_else(|e| panic!("{e}"));

    // An outbound connect from a process in the pod's cgroup lands on the
    // in-pod 15001 listener, and the original destination is recoverable.
    let listener: TcpListener =
        e2e::in_netns(pod.netns(), || TcpListener::bind("[::]:15001").unwrap());
    let child = {
        let mut cmd = std::process::Command::new("bash");
        cmd.args([
            "-c",
            "exec 3<>/dev/tcp/10.1.2.3/4567; echo -n hi >&3; cat <&3",
        ]);
        tb.spawn_in_pod(&pod, cmd).unwrap()
    };
    let (mut s, peer) = listener.accept().unwrap();
    let orig = cap.take_original_destination(peer);
    assert_eq!(orig, Some("10.1.2.3:4567".parse::<SocketAddr>().unwrap()));
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
    s.write_all(b"").unwrap();
    drop(s);
    let _ = child.kill9();

    remove(&dir).unwrap();
    assert!(!dir.exists());
}
