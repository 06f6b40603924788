//! The test bed: nodes, pods, processes and captures. See the crate docs for
//! the topology.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::cleanup::{self, PREFIX_TAG};
use crate::netns::{ip, set_sysctls, try_in_netns};
use crate::process::{lock, Capture, ChildGuard, ChildInner};

/// Name of the bridge in the switch namespace.
const BRIDGE: &str = "br0";
/// First per-node pod number (10.244.N.10), as in the addressing plan.
const FIRST_POD: u32 = 10;
/// Node-side gateway addresses of netns pods (CNI "ptp" style).
const POD_GW_V4: &str = "169.254.1.1";
const POD_GW_V6: &str = "fe80::1";

/// Serialises `ip netns add/del` within the process. The first `ip netns add`
/// on a machine sets up the shared `/run/netns` mount, and concurrent first
/// calls can trip over each other.
pub(crate) fn netns_lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    lock(&L)
}

/// Renders `n` (decimal) as an IPv6 group that reads the same, e.g. 10 ->
/// 0x10, so `fd00:244:1::10` is pod 10.244.1.10's v6 address.
fn v6_group(n: u32) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).unwrap_or(0)
}

fn node_ipv4(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, n as u8)
}
fn node_ipv6(n: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, v6_group(n))
}
fn pod_ipv4(n: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n as u8, k as u8)
}
fn pod_ipv6(n: u32, k: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, v6_group(n), 0, 0, 0, 0, v6_group(k))
}

/// Names become parts of namespace names, interface-free, and cgroup dirs.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if !ok {
        bail!("invalid {what} name {name:?}: use 1-40 of [A-Za-z0-9._-], not starting with '.'");
    }
    Ok(())
}

/// A node: a network namespace with `eth0` on the shared bridge. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Node(Arc<NodeInfo>);

#[derive(Debug)]
struct NodeInfo {
    name: String,
    netns: String,
    index: u32,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Node {
    /// The name given to [`Testbed::add_node`].
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// The node's network namespace name (`<prefix>-<name>`).
    pub fn netns(&self) -> &str {
        &self.0.netns
    }
    /// 1-based index N; addresses are derived from it.
    pub fn index(&self) -> u32 {
        self.0.index
    }
    /// `172.30.0.N` on `eth0`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.0.ipv4
    }
    /// `fd00:30::N` on `eth0`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.0.ipv6
    }
    /// `10.244.N.0/24`, routed to this node from every other node.
    pub fn pod_cidr_v4(&self) -> Ipv4Net {
        Ipv4Net::new(pod_ipv4(self.0.index, 0), 24).unwrap_or_default()
    }
    /// `fd00:244:N::/64`, routed to this node from every other node.
    pub fn pod_cidr_v6(&self) -> Ipv6Net {
        Ipv6Net::new(pod_ipv6(self.0.index, 0), 64).unwrap_or_default()
    }
}

/// The two ways a pod can exist; see [`Testbed::add_host_pod`] and
/// [`Testbed::add_netns_pod`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodKind {
    /// Addresses on the node's `lo`; processes run in the node namespace.
    Host,
    /// Own namespace, veth to the node, own cgroup.
    Netns,
}

/// A pod. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Pod(Arc<PodInfo>);

#[derive(Debug)]
struct PodInfo {
    name: String,
    node: String,
    node_netns: String,
    netns: String,
    kind: PodKind,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    cgroup: Option<PathBuf>,
    host_veth: Option<String>,
}

impl Pod {
    /// The name given when adding the pod.
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// The name of the node the pod is on.
    pub fn node(&self) -> &str {
        &self.0.node
    }
    /// The namespace the pod's processes run in: its own for netns pods, the
    /// node's for host pods.
    pub fn netns(&self) -> &str {
        &self.0.netns
    }
    /// The node's namespace (where ztunnel runs).
    pub fn node_netns(&self) -> &str {
        &self.0.node_netns
    }
    /// Host or netns pod.
    pub fn kind(&self) -> PodKind {
        self.0.kind
    }
    /// `10.244.N.K`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.0.ipv4
    }
    /// `fd00:244:N::K`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.0.ipv6
    }
    /// The pod's cgroup v2 directory (netns pods only); processes spawned with
    /// [`Testbed::spawn_in_pod`] are in it, so cgroup-attached eBPF sees them.
    pub fn cgroup(&self) -> Option<&Path> {
        self.0.cgroup.as_deref()
    }
    /// The node-side veth name (netns pods only), e.g. `pod10`.
    pub fn host_veth(&self) -> Option<&str> {
        self.0.host_veth.as_deref()
    }
}

#[derive(Default)]
struct State {
    nodes: Vec<Node>,
    /// Next pod number per node, indexed like `nodes`.
    next_pod: Vec<u32>,
    pods: Vec<Pod>,
    /// Every namespace created, in creation order (deleted in reverse).
    netns: Vec<String>,
    /// Set once the `<root>/<prefix>` cgroup dir exists.
    cgroup_dir: Option<PathBuf>,
    children: Vec<Arc<ChildInner>>,
    seq: u32,
}

/// A set of nodes and pods made of network namespaces; everything is removed
/// on drop. See the crate docs.
///
/// All methods take `&self`, so a test bed can be shared (e.g. in an `Arc`)
/// between threads and async tasks.
pub struct Testbed {
    prefix: String,
    switch: String,
    dir: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("prefix", &self.prefix)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// Creates an empty test bed (just the switch namespace with its bridge),
    /// after removing stale leftovers of dead test processes.
    pub fn new() -> Result<Testbed> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if let Err(e) = cleanup::cleanup_stale() {
            // Leftovers never collide with us (their pids differ), so this is
            // worth a warning, not a failure.
            eprintln!("e2e: warning: {e:#}");
        }
        let prefix = format!(
            "{PREFIX_TAG}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        // Usually a no-op; see remove_prefix. Must succeed, or creating
        // our namespaces would fail with "File exists" further down.
        cleanup::remove_prefix(&prefix)?;
        // From here on, `tb` going out of scope on an error cleans up.
        let tb = Testbed {
            switch: format!("{prefix}-switch"),
            dir,
            prefix,
            state: Mutex::new(State::default()),
        };
        if tb.dir.exists() {
            std::fs::remove_dir_all(&tb.dir)
                .with_context(|| format!("removing old {}", tb.dir.display()))?;
        }
        std::fs::create_dir_all(&tb.dir)
            .with_context(|| format!("creating {}", tb.dir.display()))?;
        {
            let mut st = tb.lock();
            tb.create_netns(&mut st, &tb.switch)?;
        }
        let sw = tb.switch.as_str();
        // No IPv6 on the switch: its bridge ports would only add
        // router/multicast chatter to captures.
        set_sysctls(
            sw,
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;
        ip(&["-n", sw, "link", "set", "lo", "up"])?;
        ip(&["-n", sw, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", BRIDGE, "up"])?;
        tracing::debug!(prefix = %tb.prefix, "e2e: test bed created");
        Ok(tb)
    }

    /// Removes leftovers of test beds whose process is no longer alive:
    /// namespaces in `/run/netns` (after killing processes still inside),
    /// cgroups under [`cgroup_root`](crate::cgroup_root), and temp dirs
    /// (unless `E2E_KEEP=1`). Returns what was removed. [`Testbed::new`] calls
    /// it, so a crashed run is cleaned up by the next one.
    pub fn cleanup_stale() -> Result<Vec<String>> {
        cleanup::cleanup_stale()
    }

    /// The unique prefix of all names (`ztb<pid>x<counter>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace holding the bridge.
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    /// Per-test-bed temp dir (`/tmp/<prefix>`) for logs and captures; removed
    /// on drop unless `E2E_KEEP=1`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A bpffs directory for this test bed's pinned eBPF objects,
    /// `/sys/fs/bpf/<prefix>-<name>` (not created). Removed on drop, and by a
    /// later run's stale cleanup if this process dies first.
    pub fn bpf_dir(&self, name: &str) -> PathBuf {
        Path::new(cleanup::BPF_FS).join(format!("{}-{name}", self.prefix))
    }

    /// All nodes, in creation order.
    pub fn nodes(&self) -> Vec<Node> {
        self.lock().nodes.clone()
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.lock().pods.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn create_netns(&self, st: &mut State, name: &str) -> Result<()> {
        if st.netns.iter().any(|n| n == name) {
            bail!("namespace {name} already exists in this test bed");
        }
        let _g = netns_lock();
        ip(&["netns", "add", name])?;
        st.netns.push(name.to_string());
        Ok(())
    }

    /// Adds node N = number of nodes + 1: namespace `<prefix>-<name>`, `eth0`
    /// on the bridge with `172.30.0.N/24` and `fd00:30::N/64`, forwarding on,
    /// and routes between its pod CIDRs and every other node's.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        check_name("node", name)?;
        let mut st = self.lock();
        if st.nodes.iter().any(|n| n.name() == name) {
            bail!("node {name} already exists");
        }
        let index = st.nodes.len() as u32 + 1;
        if index > 254 {
            bail!("at most 254 nodes");
        }
        let netns = format!("{}-{name}", self.prefix);
        self.create_netns(&mut st, &netns)?;
        let ns = netns.as_str();
        set_sysctls(
            ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                // Addresses usable immediately, no 1-2 s of "tentative".
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                // New namespaces may copy the host's rp_filter; redirection
                // (tproxy, eBPF) tends to trip over it. Tests want plain routing.
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
        let node = Node(Arc::new(NodeInfo {
            name: name.to_string(),
            netns: netns.clone(),
            index,
            ipv4: node_ipv4(index),
            ipv6: node_ipv6(index),
        }));
        let port = format!("n{index}");
        let v4 = format!("{}/24", node.ipv4());
        let v6 = format!("{}/64", node.ipv6());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // Created inside the node's namespace with the peer going straight
        // into the switch's: nothing ever appears in the host namespace, so
        // names can't collide with other test beds.
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.switch,
        ])?;
        ip(&["-n", &self.switch, "link", "set", &port, "master", BRIDGE])?;
        ip(&["-n", &self.switch, "link", "set", &port, "up"])?;
        ip(&["-n", ns, "addr", "add", &v4, "dev", "eth0"])?;
        ip(&["-n", ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        for other in &st.nodes {
            add_pod_routes(&node, other)?;
            add_pod_routes(other, &node)?;
        }
        st.nodes.push(node.clone());
        st.next_pod.push(FIRST_POD);
        Ok(node)
    }

    fn next_pod_addr(&self, st: &mut State, node: &Node, name: &str) -> Result<u32> {
        let i = st
            .nodes
            .iter()
            .position(|n| Arc::ptr_eq(&n.0, &node.0))
            .ok_or_else(|| {
                anyhow!(
                    "node {} is not part of test bed {}",
                    node.name(),
                    self.prefix
                )
            })?;
        if st
            .pods
            .iter()
            .any(|p| p.node() == node.name() && p.name() == name)
        {
            bail!("pod {name} already exists on node {}", node.name());
        }
        let k = st.next_pod[i];
        if k > 254 {
            bail!("node {} is out of pod addresses", node.name());
        }
        st.next_pod[i] += 1;
        Ok(k)
    }

    /// Adds a pod that is only a pair of addresses, `10.244.N.K/32` and
    /// `fd00:244:N::K/128`, on the node's `lo`. Processes for it run in the
    /// node namespace and bind the pod address as their source (e.g.
    /// [`tcp_connect_from_in`](crate::tcp_connect_from_in)).
    pub fn add_host_pod(&self, node: &Node, name: &str) -> Result<Pod> {
        check_name("pod", name)?;
        let mut st = self.lock();
        let k = self.next_pod_addr(&mut st, node, name)?;
        let n = node.index();
        let (v4, v6) = (pod_ipv4(n, k), pod_ipv6(n, k));
        let ns = node.netns();
        ip(&["-n", ns, "addr", "add", &format!("{v4}/32"), "dev", "lo"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{v6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        let pod = Pod(Arc::new(PodInfo {
            name: name.to_string(),
            node: node.name().to_string(),
            node_netns: ns.to_string(),
            netns: ns.to_string(),
            kind: PodKind::Host,
            ipv4: v4,
            ipv6: v6,
            cgroup: None,
            host_veth: None,
        }));
        st.pods.push(pod.clone());
        Ok(pod)
    }

    /// Adds a pod with its own namespace `<prefix>-<node>-<name>`, wired like
    /// the CNI "ptp" plugin: `eth0` with `10.244.N.K/32` and
    /// `fd00:244:N::K/128`, default routes via `169.254.1.1` (onlink) and
    /// `fe80::1`, which live on the node side of the veth (`pod<K>`); the
    /// node routes the pod's /32 and /128 to that veth. Also creates the pod's
    /// cgroup, `<cgroup root>/<prefix>/<node>/<name>`.
    pub fn add_netns_pod(&self, node: &Node, name: &str) -> Result<Pod> {
        check_name("pod", name)?;
        let mut st = self.lock();
        let k = self.next_pod_addr(&mut st, node, name)?;
        let n = node.index();
        let (v4, v6) = (pod_ipv4(n, k), pod_ipv6(n, k));
        let node_ns = node.netns();
        let pod_ns = format!("{}-{}-{name}", self.prefix, node.name());
        let veth = format!("pod{k}");

        // cgroup first: it is the likeliest thing to be unavailable.
        let cg = self.pod_cgroup(&mut st, node.name(), name)?;

        self.create_netns(&mut st, &pod_ns)?;
        let ns = pod_ns.as_str();
        set_sysctls(
            ns,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &veth, "netns",
            node_ns,
        ])?;
        // Node side first, so the pod's gateway exists when routes go in.
        ip(&["-n", node_ns, "link", "set", &veth, "up"])?;
        ip(&[
            "-n",
            node_ns,
            "addr",
            "add",
            &format!("{POD_GW_V4}/32"),
            "dev",
            &veth,
        ])?;
        ip(&[
            "-n",
            node_ns,
            "addr",
            "add",
            &format!("{POD_GW_V6}/64"),
            "dev",
            &veth,
            "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n", ns, "route", "add", "default", "via", POD_GW_V4, "dev", "eth0", "onlink",
        ])?;
        ip(&[
            "-n", ns, "-6", "route", "add", "default", "via", POD_GW_V6, "dev", "eth0",
        ])?;
        ip(&[
            "-n",
            node_ns,
            "route",
            "add",
            &format!("{v4}/32"),
            "dev",
            &veth,
        ])?;
        ip(&[
            "-n",
            node_ns,
            "-6",
            "route",
            "add",
            &format!("{v6}/128"),
            "dev",
            &veth,
        ])?;
        let pod = Pod(Arc::new(PodInfo {
            name: name.to_string(),
            node: node.name().to_string(),
            node_netns: node_ns.to_string(),
            netns: pod_ns,
            kind: PodKind::Netns,
            ipv4: v4,
            ipv6: v6,
            cgroup: Some(cg),
            host_veth: Some(veth),
        }));
        st.pods.push(pod.clone());
        Ok(pod)
    }

    fn pod_cgroup(&self, st: &mut State, node: &str, pod: &str) -> Result<PathBuf> {
        let top = match &st.cgroup_dir {
            Some(d) => d.clone(),
            None => {
                let d = cleanup::cgroup_root()?.join(&self.prefix);
                std::fs::create_dir(&d)
                    .with_context(|| format!("creating cgroup {}", d.display()))?;
                st.cgroup_dir = Some(d.clone());
                d
            }
        };
        let dir = top.join(node).join(pod);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(dir)
    }

    /// Runs `cmd` inside network namespace `netns` (any name, e.g. a node's
    /// or pod's `netns()`). stdin is /dev/null; stdout and stderr go to a log
    /// file in [`Testbed::dir`]. The process leads its own process group,
    /// and is stopped when the returned guard or the test bed is dropped.
    ///
    /// The child inherits the namespace from the spawning thread (see
    /// [`in_netns`](crate::in_netns)); unlike `ip netns exec`, `/sys` is not
    /// remounted, so `/sys/class/net` still shows the host's interfaces (use
    /// netlink, or [`ip_netns_exec`](crate::ip_netns_exec), if that matters).
    pub fn spawn(&self, netns: &str, cmd: Command) -> Result<ChildGuard> {
        self.spawn_inner(netns, None, cmd)
    }

    /// Runs `cmd` as a process of `pod`: in its namespace and, for netns pods,
    /// in its cgroup from the first instruction on (so cgroup-attached eBPF
    /// programs see all of its traffic).
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> Result<ChildGuard> {
        self.spawn_inner(pod.netns(), pod.cgroup(), cmd)
    }

    fn spawn_inner(
        &self,
        netns: &str,
        cgroup: Option<&Path>,
        mut cmd: Command,
    ) -> Result<ChildGuard> {
        let desc = format!("{cmd:?} in netns {netns}");
        let program = Path::new(cmd.get_program())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let seq = {
            let mut st = self.lock();
            st.seq += 1;
            st.seq
        };
        let log = self
            .dir
            .join(sanitize(&format!("{seq:03}-{netns}-{program}.log")));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        if let Some(cg) = cgroup {
            let procs = cg.join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&procs)
                .with_context(|| format!("opening {}", procs.display()))?;
            join_cgroup_before_exec(&mut cmd, f);
        }
        let child = try_in_netns(netns, move || cmd.spawn())
            .and_then(|r| r)
            .with_context(|| format!("spawning {desc}"))?;
        tracing::debug!(pid = child.id(), "e2e: spawned {desc}");
        let inner = Arc::new(ChildInner::new(child, log, desc));
        let mut st = self.lock();
        // Forget children that are already gone, so long benchmarks that
        // spawn a lot don't accumulate them.
        st.children.retain(|c| Arc::strong_count(c) > 1);
        st.children.push(inner.clone());
        Ok(ChildGuard { inner })
    }

    /// Starts `tcpdump -i <iface> -w <file> -U -s 0 --immediate-mode` in
    /// `netns` and returns
    /// once it is capturing. For the node-to-node wire, capture a node's
    /// `eth0`.
    pub fn capture(&self, netns: &str, iface: &str) -> Result<Capture> {
        let seq = {
            let mut st = self.lock();
            st.seq += 1;
            st.seq
        };
        let file = self
            .dir
            .join(sanitize(&format!("{seq:03}-{netns}-{iface}.pcap")));
        let mut cmd = Command::new("tcpdump");
        // -Z root: Debian's tcpdump otherwise drops to user "tcpdump" before
        // opening the output file, which it then may not be allowed to write.
        // --immediate-mode: otherwise libpcap's TPACKET_V3 ring hands packets
        // over only when a block fills or times out, and packets still in
        // the ring when we SIGINT are lost ("12 received by filter, 0
        // captured"); -U alone only affects writing the file.
        cmd.args(["-i", iface, "-w"]).arg(&file).args([
            "-U",
            "-s",
            "0",
            "-n",
            "--immediate-mode",
            "-Z",
            "root",
        ]);
        let child = self.spawn(netns, cmd)?;
        // tcpdump prints "listening on ..." once the capture is active.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.log().contains("listening on") {
                break;
            }
            if !child.is_running() {
                bail!("tcpdump on {netns}/{iface} exited; log:\n{}", child.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "tcpdump on {netns}/{iface} not capturing after 10s; log:\n{}",
                    child.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Capture { child, file })
    }
}

/// Makes a string safe as a file name.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Makes `cmd`'s child write "0" (= itself) to the pod's `cgroup.procs`
/// between fork and exec, so that it never runs outside the cgroup. Writing
/// the pid from the parent after spawn would leave a window in which the
/// program already runs (and makes connections) in the wrong cgroup.
#[allow(unsafe_code)]
fn join_cgroup_before_exec(cmd: &mut Command, procs: File) {
    // SAFETY: `pre_exec` is unsafe because the closure runs in the forked
    // child of a possibly multi-threaded parent, where only async-signal-safe
    // operations are allowed. The closure does a single write(2) on an fd
    // opened beforehand, allocating nothing and taking no locks. The fd is
    // O_CLOEXEC (std opens files that way), so the program never sees it.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::write(&procs, b"0")
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
}

fn add_pod_routes(on: &Node, to: &Node) -> Result<()> {
    ip(&[
        "-n",
        on.netns(),
        "route",
        "add",
        &to.pod_cidr_v4().to_string(),
        "via",
        &to.ipv4().to_string(),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        on.netns(),
        "-6",
        "route",
        "add",
        &to.pod_cidr_v6().to_string(),
        "via",
        &to.ipv6().to_string(),
        "dev",
        "eth0",
    ])
}

impl Drop for Testbed {
    /// Kills processes, removes cgroups, namespaces, and the temp dir (unless
    /// `E2E_KEEP=1`). Runs during unwinding too, so failing tests clean up.
    /// Errors are printed, not raised: there is nobody to return them to.
    fn drop(&mut self) {
        let st = std::mem::take(&mut *self.lock());
        let children: Vec<&ChildInner> = st.children.iter().map(|c| c.as_ref()).collect();
        if let Err(e) = crate::process::terminate_all(&children) {
            eprintln!("e2e: {}: stopping processes: {e:#}", self.prefix);
        }
        if let Some(cg) = &st.cgroup_dir {
            if let Err(e) = cleanup::remove_cgroup_tree(cg) {
                eprintln!("e2e: {}: {e:#}", self.prefix);
            }
        }
        // Anything else still inside (e.g. daemonized grandchildren) would
        // keep the namespaces alive after their names are gone.
        cleanup::kill_procs_in_netns(&st.netns);
        for ns in st.netns.iter().rev() {
            if let Err(e) = cleanup::delete_netns(ns) {
                eprintln!("e2e: {}: {e:#}", self.prefix);
            }
        }
        // eBPF objects pinned under this test bed's prefix (see
        // [`Testbed::bpf_dir`]).
        for (name, path) in cleanup::bpf_pins() {
            if cleanup::parse_prefix(&name).is_some_and(|(_, p)| p == self.prefix) {
                if let Err(e) = cleanup::remove_pins(&path) {
                    eprintln!("e2e: {}: {e:#}", self.prefix);
                }
            }
        }
        if cleanup::keep_files() {
            eprintln!("e2e: E2E_KEEP=1, keeping {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("e2e: removing {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_plan() {
        assert_eq!(node_ipv4(2).to_string(), "172.30.0.2");
        assert_eq!(node_ipv6(2).to_string(), "fd00:30::2");
        assert_eq!(pod_ipv4(1, 10).to_string(), "10.244.1.10");
        assert_eq!(pod_ipv6(1, 10).to_string(), "fd00:244:1::10");
        assert_eq!(pod_ipv6(12, 254).to_string(), "fd00:244:12::254");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("node", "node-1").is_ok());
        assert!(check_name("node", "").is_err());
        assert!(check_name("node", "a/b").is_err());
        assert!(check_name("node", "..").is_err());
    }
}
