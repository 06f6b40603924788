//! Tests of the namespace test bed itself: addressing, routing between nodes
//! and pods, processes, captures and cleanup. They need root; without it they
//! print why and pass vacuously.

// Helpers outside #[test] fns aren't covered by clippy.toml's
// allow-unwrap-in-tests; panicking is how a test helper fails.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use e2e::{Pod, PodKind, Testbed};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one connection, echoes everything back until EOF, and returns the
/// peer address the server saw (to check that no NAT or wrong source address
/// is involved).
fn echo_once(listener: TcpListener) -> JoinHandle<std::io::Result<SocketAddr>> {
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept()?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(peer);
            }
            s.write_all(&buf[..n])?;
        }
    })
}

/// Sends `msg`, half-closes, and reads back everything.
fn roundtrip(mut s: TcpStream, msg: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(msg).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got
}

/// Echo from `client` pod to `server` pod over v4 or v6, asserting the reply
/// and the source address seen by the server.
fn echo_between(client: &Pod, server: &Pod, v6: bool) {
    let (cip, sip): (IpAddr, IpAddr) = if v6 {
        (client.ipv6().into(), server.ipv6().into())
    } else {
        (client.ipv4().into(), server.ipv4().into())
    };
    let listener = e2e::tcp_listen_in(server.netns(), SocketAddr::new(sip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let server_thread = echo_once(listener);
    let stream = match client.kind() {
        // A host pod shares the node namespace: it must pick its source.
        PodKind::Host => e2e::tcp_connect_from_in(client.netns(), cip, addr),
        PodKind::Netns => e2e::tcp_connect_in(client.netns(), addr),
    }
    .unwrap_or_else(|e| panic!("connect {} -> {addr}: {e}", client.name()));
    let msg = format!("hello from {} to {}", cip, sip);
    assert_eq!(roundtrip(stream, msg.as_bytes()), msg.as_bytes());
    let peer = server_thread.join().unwrap().unwrap();
    assert_eq!(peer.ip(), cip, "server saw the wrong source address");
}

#[test]
fn host_pods_on_two_nodes_echo_v4_and_v6() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let n1 = tb.add_node("node1").unwrap();
    let n2 = tb.add_node("node2").unwrap();
    assert_eq!(n2.index(), 2);
    assert_eq!(n2.ipv4().to_string(), "172.30.0.2");
    assert_eq!(n2.ipv6().to_string(), "fd00:30::2");
    let a = tb.add_host_pod(&n1, "a").unwrap();
    let b = tb.add_host_pod(&n2, "b").unwrap();
    assert_eq!(a.ipv4().to_string(), "10.244.1.10");
    assert_eq!(b.ipv6().to_string(), "fd00:244:2::10");
    assert_eq!(a.netns(), n1.netns());
    assert!(a.cgroup().is_none());
    echo_between(&a, &b, false);
    echo_between(&a, &b, true);
    echo_between(&b, &a, true);
}

#[test]
fn netns_pods_on_two_nodes_echo_v4_and_v6() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let n1 = tb.add_node("node1").unwrap();
    let n2 = tb.add_node("node2").unwrap();
    let a = tb.add_netns_pod(&n1, "a").unwrap();
    let b = tb.add_netns_pod(&n2, "b").unwrap();
    // A third node added later must get (and give) routes too.
    let n3 = tb.add_node("node3").unwrap();
    let h1 = tb.add_host_pod(&n1, "h1").unwrap();
    let c = tb.add_netns_pod(&n3, "c").unwrap();
    assert_eq!(a.netns(), format!("{}-node1-a", tb.prefix()));
    assert_eq!(h1.ipv4().to_string(), "10.244.1.11", "per-node counter");
    for v6 in [false, true] {
        echo_between(&a, &b, v6);
        echo_between(&b, &a, v6);
        echo_between(&c, &a, v6);
        echo_between(&b, &c, v6);
        // Pod and host pod on the same node.
        echo_between(&h1, &a, v6);
    }
}

#[test]
fn spawn_runs_in_pod_netns_and_cgroup() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let n1 = tb.add_node("node1").unwrap();
    let pod = tb.add_netns_pod(&n1, "p").unwrap();
    let cg = pod.cgroup().unwrap().to_path_buf();
    assert!(cg.ends_with(format!("{}/node1/p", tb.prefix())));

    // The child sees the pod's interface and addresses.
    let child = tb
        .spawn_in_pod(&pod, {
            let mut c = Command::new("ip");
            c.args(["-o", "addr", "show", "dev", "eth0"]);
            c
        })
        .unwrap();
    child.wait_success(IO_TIMEOUT).unwrap();
    let log = child.log();
    assert!(log.contains(&pod.ipv4().to_string()), "log: {log}");
    assert!(log.contains(&pod.ipv6().to_string()), "log: {log}");
    assert!(child.log_path().starts_with(tb.dir()));

    // A long-running child is in the pod cgroup and the pod netns.
    let sleeper = tb
        .spawn_in_pod(&pod, {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        })
        .unwrap();
    let pid = sleeper.pid();
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "pid {pid} not in {procs}"
    );
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        ns_inode(&format!("/run/netns/{}", pod.netns()))
    );
    assert!(sleeper.is_running());
    let status = sleeper.kill9().unwrap();
    assert!(!status.success());
    assert!(!sleeper.is_running());

    // Dropping a guard stops the process (SIGTERM is enough for sleep).
    let node_child = tb
        .spawn(n1.netns(), {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        })
        .unwrap();
    let pid = node_child.pid();
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        ns_inode(&format!("/run/netns/{}", n1.netns()))
    );
    drop(node_child);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

fn ns_inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

#[test]
fn capture_on_node_eth0_sees_cleartext_marker() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let n1 = tb.add_node("node1").unwrap();
    let n2 = tb.add_node("node2").unwrap();
    let a = tb.add_netns_pod(&n1, "a").unwrap();
    let b = tb.add_netns_pod(&n2, "b").unwrap();
    let cap = tb.capture(n1.netns(), "eth0").unwrap();
    let marker = format!("MARKER-{}-{}", tb.prefix(), fastrand_suffix());
    let listener = e2e::tcp_listen_in(b.netns(), SocketAddr::new(b.ipv4().into(), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = echo_once(listener);
    let s = e2e::tcp_connect_in(a.netns(), addr).unwrap();
    assert_eq!(roundtrip(s, marker.as_bytes()), marker.as_bytes());
    server.join().unwrap().unwrap();
    let path = cap.path().to_path_buf();
    let pcap = cap.stop().unwrap();
    // pcap magic, either byte order.
    assert!(
        pcap.starts_with(&[0xd4, 0xc3, 0xb2, 0xa1]) || pcap.starts_with(&[0xa1, 0xb2, 0xc3, 0xd4]),
        "not a pcap file"
    );
    assert!(
        e2e::contains(&pcap, marker.as_bytes()),
        "marker not captured"
    );
    assert!(!e2e::contains(&pcap, b"NEVER-SENT-MARKER"));
    assert!(path.exists(), "capture file is kept");
}

fn fastrand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[test]
fn parallel_testbeds_are_isolated() {
    if !e2e::require_root() {
        return;
    }
    // Same node names, same addresses: must not collide.
    let tb1 = Testbed::new().unwrap();
    let tb2 = Testbed::new().unwrap();
    assert_ne!(tb1.prefix(), tb2.prefix());
    let a1 = tb1.add_node("node1").unwrap();
    let a2 = tb2.add_node("node1").unwrap();
    assert_eq!(a1.ipv4(), a2.ipv4());
    assert_ne!(a1.netns(), a2.netns());
    let p1 = tb1.add_host_pod(&a1, "p").unwrap();
    // Only tb2 has a node2 with pod 10.244.2.10: tb1 must not reach it.
    let b2 = tb2.add_node("node2").unwrap();
    let q2 = tb2.add_host_pod(&b2, "q").unwrap();
    let _l = e2e::tcp_listen_in(b2.netns(), SocketAddr::new(q2.ipv4().into(), 7777)).unwrap();
    let r = e2e::tcp_connect_from_in(
        a1.netns(),
        p1.ipv4().into(),
        SocketAddr::new(q2.ipv4().into(), 7777),
    );
    assert!(r.is_err(), "tb1 reached tb2's pod");
    // tb2 itself can.
    let p2 = tb2.add_host_pod(&a2, "p").unwrap();
    e2e::tcp_connect_from_in(
        a2.netns(),
        p2.ipv4().into(),
        SocketAddr::new(q2.ipv4().into(), 7777),
    )
    .unwrap();
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn drop_removes_netns_cgroups_processes_and_dir() {
    if !e2e::require_root() {
        return;
    }
    let tb = Testbed::new().unwrap();
    let n1 = tb.add_node("node1").unwrap();
    let h = tb.add_host_pod(&n1, "h").unwrap();
    let p = tb.add_netns_pod(&n1, "p").unwrap();
    // A process that ignores SIGTERM and a forked grandchild: both must go.
    let stubborn = tb
        .spawn_in_pod(&p, {
            let mut c = Command::new("sh");
            c.args(["-c", "trap '' TERM; sleep 60 & wait"]);
            c
        })
        .unwrap();
    let in_node = tb
        .spawn_in_pod(&h, {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        })
        .unwrap();
    let pids = [stubborn.pid(), in_node.pid()];
    // Guards may outlive the test bed; dropping them later is harmless.
    let cg = p.cgroup().unwrap().to_path_buf();
    let top_cg: PathBuf = e2e::cgroup_root().unwrap().join(tb.prefix());
    let names = [
        tb.switch_netns().to_string(),
        n1.netns().to_string(),
        p.netns().to_string(),
    ];
    let dir = tb.dir().to_path_buf();
    for n in &names {
        assert!(netns_exists(n), "{n} missing");
    }
    assert!(cg.exists() && dir.exists());
    let capture = tb.capture(n1.netns(), "eth0").unwrap();
    let prefix = tb.prefix().to_string();

    let t = std::time::Instant::now();
    drop(tb);
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "drop took {:?}",
        t.elapsed()
    );

    for n in &names {
        assert!(!netns_exists(n), "{n} left behind");
    }
    assert!(!cg.exists() && !top_cg.exists(), "cgroup left behind");
    if std::env::var("E2E_KEEP").as_deref() != Ok("1") {
        assert!(!dir.exists(), "temp dir left behind");
    }
    assert!(!stubborn.is_running() && !in_node.is_running() && !capture.is_running());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} alive"
        );
    }
    // Nothing with our prefix anywhere.
    let leftovers: Vec<_> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop((stubborn, in_node, capture));
}

/// Removes hand-made "stale" leftovers even if the test fails.
struct StaleFixture {
    netns: Vec<String>,
    cgroup: PathBuf,
}

impl Drop for StaleFixture {
    fn drop(&mut self) {
        for n in self.netns.iter().filter(|n| netns_exists(n)) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_dir(self.cgroup.join("a"));
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[test]
fn new_removes_stale_leftovers_of_dead_pids_only() {
    if !e2e::require_root() {
        return;
    }
    // A pid that can't be alive (above the default pid_max, and checked).
    let dead_pid = (4_000_000..4_100_000)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let ctr = fastrand_suffix() % 1_000_000;
    let stale_prefix = format!("ztb{dead_pid}x{ctr}");
    // Looks like ours (live pid) but with a counter we'll never reach.
    let live_prefix = format!("ztb{}x{}", std::process::id(), 900_000_000 + ctr);
    let stale_ns = format!("{stale_prefix}-node1");
    let live_ns = format!("{live_prefix}-node1");
    let cgroup = e2e::cgroup_root().unwrap().join(&stale_prefix);
    let fixture = StaleFixture {
        netns: vec![stale_ns.clone(), live_ns.clone()],
        cgroup: cgroup.clone(),
    };
    for n in &fixture.netns {
        let st = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::create_dir_all(cgroup.join("a")).unwrap();

    let tb = Testbed::new().unwrap();
    assert!(!netns_exists(&stale_ns), "stale netns not removed");
    assert!(!cgroup.exists(), "stale cgroup not removed");
    assert!(netns_exists(&live_ns), "netns of a live pid was removed");
    // And the test bed works after cleaning up.
    tb.add_node("node1").unwrap();
    drop(tb);
    drop(fixture);
    assert!(!netns_exists(&live_ns));
}

#[test]
fn bpf_pins_go_with_the_testbed_and_stale_ones_with_the_next() {
    if !e2e::require_root() {
        return;
    }
    // A pin tree left by a process that is gone (pid above any pid_max).
    let stale = Path::new("/sys/fs/bpf").join("ztb4194399x1-inpod-stale");
    std::fs::create_dir_all(stale.join("pod-uid")).unwrap();
    let tb = Testbed::new().unwrap();
    assert!(!stale.exists(), "stale pins removed by a new test bed");
    let mine = tb.bpf_dir("inpod-a");
    std::fs::create_dir_all(mine.join("pod-uid")).unwrap();
    drop(tb);
    assert!(!mine.exists(), "the test bed's own pins removed on drop");
}
