//! A small multi-node "cluster" made of Linux network namespaces, for ztunnel
//! integration tests and benchmarks.
//!
//! # Why namespaces
//!
//! ztunnel is a per-node proxy: pods on node A talk to pods on node B through
//! A's ztunnel, an HBONE tunnel (HTTP/2 CONNECT over mTLS) across the node
//! network, and B's ztunnel. To test that for real we need several "nodes" with
//! their own addresses, routes and sockets, plus "pods" behind them, all on one
//! machine and without touching the host's network. Network namespaces give us
//! exactly that, cheaply (milliseconds to create) and as root only.
//!
//! # Topology
//!
//! ```text
//!                      netns <prefix>-switch
//!                   +-------------------------+
//!                   |  br0 (Linux bridge)     |
//!                   |   n1 ------- n2 ---...  |
//!                   +----|---------|----------+
//!                    veth|         |veth
//!   netns <prefix>-node1 |         | netns <prefix>-node2
//!   +--------------------|--+   +--|-------------------+
//!   | eth0 172.30.0.1/24    |   | eth0 172.30.0.2/24   |
//!   |      fd00:30::1/64    |   |      fd00:30::2/64   |
//!   | lo: host pods         |   | route 10.244.1.0/24  |
//!   |   10.244.1.10/32 ...  |   |   via 172.30.0.1 ... |
//!   | pod10 (veth) ----+    |   |                      |
//!   +------------------|----+   +----------------------+
//!                      | 169.254.1.1 / fe80::1 on the node side
//!   netns <prefix>-node1-<pod>
//!   +------------------|----+
//!   | eth0 10.244.1.11/32   |  default via 169.254.1.1 dev eth0 onlink
//!   |      fd00:244:1::11   |  default via fe80::1 dev eth0
//!   +-----------------------+
//! ```
//!
//! * The **switch** namespace only holds a bridge, so the node-to-node "wire"
//!   is a real L2 segment that can be captured with tcpdump on any node's
//!   `eth0` (see [`Testbed::capture`]).
//! * Every **node** N (1-based) is a namespace with `eth0` = `172.30.0.N/24`
//!   and `fd00:30::N/64`, forwarding enabled, and a route to every other node's
//!   pod CIDRs (`10.244.M.0/24`, `fd00:244:M::/64`) via that node's address.
//! * A **host pod** ([`Testbed::add_host_pod`]) is just an address on the node's
//!   `lo`: a process in the node namespace can bind it as its source address.
//!   It needs no redirection, so it is what tests use before traffic capture
//!   (eBPF / iptables) exists.
//! * A **netns pod** ([`Testbed::add_netns_pod`]) is a namespace of its own
//!   wired to its node like the CNI "ptp" plugin does it (a veth pair, /32 and
//!   /128 addresses, default routes via a link-local gateway on the node side),
//!   plus a cgroup v2 directory, so that ztunnel's traffic redirection can be
//!   tested against something shaped like a real Kubernetes pod.
//!
//! Pod addresses are `10.244.N.K` / `fd00:244:N::K` with a per-node counter K
//! (shared by both kinds of pod) starting at 10 (hex digits in the v6 address are the decimal K, e.g. K=10
//! gives `fd00:244:1::10`).
//!
//! # Isolation and cleanup
//!
//! Each [`Testbed`] picks a prefix `ztb<pid>x<counter>` that is used for all of
//! its namespace names, its cgroup directory and its temp dir, so test beds in
//! parallel test threads and in parallel processes never collide. Interface
//! names are only unique *within* a namespace (veths are created directly
//! inside the namespaces, never in the host one), and addresses are the same in
//! every test bed, which is fine because they live in different namespaces.
//!
//! Dropping a `Testbed` (also during a panic's unwinding) kills its processes,
//! deletes its namespaces and cgroups and removes its temp dir (unless
//! `E2E_KEEP=1`). A test that calls [`cleanup_on_stop_signal`] also cleans
//! up on Ctrl-C. If a test process dies without unwinding (SIGKILL, abort),
//! the next `Testbed::new()` anywhere on the machine removes its leftovers: a
//! prefix whose pid is no longer alive is stale ([`Testbed::cleanup_stale`]).
//!
//! # Running code inside a namespace
//!
//! * [`Testbed::spawn`] / [`Testbed::spawn_in_pod`] run a [`std::process::Command`]
//!   inside a namespace (and pod cgroup), logging to a file, and return a
//!   [`ChildGuard`] that kills the process when dropped.
//! * [`in_netns`] runs a closure on a fresh thread that has entered a
//!   namespace. A socket belongs to the namespace it was *created* in, forever,
//!   so a test can create a `TcpStream`/`TcpListener` there and then use it from
//!   any thread, or hand it to tokio (`set_nonblocking(true)` then `from_std`).
//!   [`tcp_connect_in`], [`tcp_connect_from_in`] and [`tcp_listen_in`] are the
//!   common cases.
//!
//! # The mesh on top
//!
//! [`cluster::Cluster`] runs the mesh's real binaries on a test bed (control
//! plane on a manifest directory, a ztunnel per node, CNI enrollment,
//! waypoints over xDS), and [`apps`] has the sample servers its tests and
//! the demo use.
//!
//! # Requirements
//!
//! Root, iproute2 (`ip`), tcpdump for captures, and cgroup v2 (mounted at
//! `/sys/fs/cgroup/unified` on hybrid hosts; it is mounted there if missing)
//! for netns pods. Tests should start with `if !e2e::require_root() { return; }`.

mod cleanup;
mod netns;
mod process;
mod testbed;

pub mod apps;
pub mod cluster;
pub mod mesh;
mod signals;

pub use cleanup::cgroup_root;
pub use netns::{
    in_netns, ip_netns_exec, ip_netns_exec_output, tcp_connect_from_in, tcp_connect_in,
    tcp_listen_in, try_in_netns,
};
pub use process::{Capture, ChildGuard};
pub use signals::{cleanup_on_stop_signal, on_stop_signal, request_stop, stop_requested};
pub use testbed::{Node, Pod, PodKind, Testbed};

/// Returns true when running as root. Otherwise prints why the caller should
/// skip (everything here needs `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and returns
/// false, so a test can `return` early instead of failing on a laptop.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!(
            "e2e: skipping, the namespace test bed needs root (network namespaces, veths, cgroups)"
        );
        false
    }
}

/// Returns true if `needle` occurs anywhere in `haystack` (an empty needle
/// always does). Used to look for clear-text markers in pcap bytes.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::contains;

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Testbed>();
        assert_send_sync::<super::Node>();
        assert_send_sync::<super::Pod>();
        assert_send_sync::<super::ChildGuard>();
        assert_send_sync::<super::Capture>();
    }

    #[test]
    fn contains_works() {
        assert!(contains(b"hello world", b"lo w"));
        assert!(contains(b"abc", b""));
        assert!(!contains(b"abc", b"abcd"));
        assert!(!contains(b"hello", b"world"));
    }
}
