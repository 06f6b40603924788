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
    // Removed with the test bed (and by a later run's stale cleanup).
    tb.bpf_dir("loader")
}

/// Removes a pin directory, and with `.1` its parent too.
struct Cleanup(PathBuf, bool);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = remove(&self.0);
        if self.1 {
            let _ = std::fs::remove_dir(self.0.parent().unwrap());
        }
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
    let _cleanup = Cleanup(dir.clone(), true);
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

    // ztunnel's mark exempts a socket even inside the pod's cgroup; the
    // same connect without it is captured.
    let target: SocketAddr = SocketAddr::new(pod.ipv4().into(), 4567);
    let direct: TcpListener = e2e::in_netns(pod.netns(), || TcpListener::bind(target).unwrap());
    let (marked_peer, unmarked) = {
        let _in_pod = InCgroup::enter(pod.cgroup().unwrap());
        let connect = |mark: u32| {
            e2e::in_netns(pod.netns(), || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                if mark != 0 {
                    s.set_mark(mark).unwrap();
                }
                s.connect(&target.into()).unwrap();
                std::net::TcpStream::from(s)
            })
        };
        let marked = connect(0x539);
        let unmarked = connect(0);
        (marked.local_addr().unwrap(), unmarked)
    };
    let (_, peer) = direct.accept().unwrap();
    assert_eq!(
        peer, marked_peer,
        "the marked connect went straight to its destination"
    );
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(
        cap.take_original_destination(peer),
        Some(target),
        "the unmarked one was captured"
    );
    drop(unmarked);

    remove(&dir).unwrap();
    assert!(!dir.exists());
}

#[test]
fn verifier_rejection_names_program_and_log() {
    if !e2e::require_root() {
        return;
    }
    let dir =
        PathBuf::from("/sys/fs/bpf").join(format!("ztunnel-ebpf-selftest-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone(), false);
    let e = ztunnel_ebpf::selftest_load_rejected(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("zt_selftest_rejected"), "{msg}");
    assert!(msg.contains("Verifier output"), "{msg}");
    assert!(
        msg.contains("ctx"),
        "the verifier's reason is included: {msg}"
    );
}

/// Moves this whole process into a cgroup (cgroup v2 moves every thread)
/// and back when dropped. (The other test here only loads programs, so
/// it does not mind where this process runs.)
struct InCgroup(PathBuf);

impl InCgroup {
    fn enter(cg: &std::path::Path) -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let back = e2e::cgroup_root()
            .unwrap()
            .join(rel.trim_start_matches('/'));
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        InCgroup(back)
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.procs"), std::process::id().to_string());
    }
}
