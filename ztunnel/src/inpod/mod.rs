//! In-pod mode: pods are enrolled over a Unix socket, and ztunnel serves
//! each one from listeners *inside* that pod's network namespace, fed by
//! per-pod eBPF capture.
//!
//! # Enrolling a pod
//!
//! The node agent (our CNI plugin, `cni/`) connects to `--inpod-socket` and
//! speaks [`zds`] (Istio's ZDS shape): `add` with the pod's uid, name,
//! namespace, service account, netns (as an fd), netns path and cgroup. On
//! `add` ztunnel
//!
//! 1. opens 15001 (outbound), 15006 (inbound plaintext) and 15008 (HBONE)
//!    in the pod's netns ([`Netns`]),
//! 2. loads and attaches the pod's capture (`ztunnel_ebpf`), pinned under
//!    `--inpod-bpf-dir/<uid>/`, and puts the 15006 listener in its sockmap,
//! 3. writes a small record `--inpod-state-dir/<uid>.json` (what it needs to
//!    find the pod again after a restart),
//! 4. serves the three listeners with a copy of the node's [`ProxyInputs`]
//!    whose upstream connections (to the app, passthrough, and HBONE to
//!    other nodes through a pool of the pod's own) start in the pod's netns.
//!
//! `del` stops the listeners and removes the pins and the record, after which
//! the pod's traffic is untouched again.
//!
//! # Restarts
//!
//! Capture is pinned, so while ztunnel is away it stays in force: outbound
//! connects are still rewritten to the (now closed) 15001, and `sk_lookup`
//! drops inbound SYNs, so nothing bypasses the mesh. At start, ztunnel reads
//! its records, reopens each pod's netns by path (checking the inode so a
//! reused path is not mistaken for the pod), adopts the pinned maps and
//! reopens the listeners: pods are served again without the agent's help.
//! Records whose netns is gone, and pin directories without a record, are
//! removed. An agent that reconnects may also resync: `add`/`keep` for every
//! pod, then `snapshot_sent`, and ztunnel drops the pods it did not name.
//!
//! # Outbound source
//!
//! The connect hook rewrites to the pod's loopback, so ztunnel sees the app's
//! connection coming from `127.0.0.1`/`::1`; the source workload is the
//! enrolled pod itself, looked up by name and namespace.

pub mod netns;
pub mod zds;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use ztunnel_ebpf::{CaptureSpec, PodCapture};

pub use netns::Netns;

use crate::proxy::connection::log_refused;
use crate::proxy::{
    accept_loop, inbound, inbound_plaintext, outbound, OriginalDestination, ProxyInputs,
    SocketOriginalDst,
};
use crate::socket::canonical;
use crate::state::Snapshot;
use zds::workload_request::Payload;

/// Ports inside the pod, as Istio's.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

#[derive(Clone, Debug)]
pub struct InPodConfig {
    /// The enrollment socket.
    pub socket: PathBuf,
    /// Root of the per-pod pin directories on a bpffs.
    pub bpf_dir: PathBuf,
    /// Where pod records are kept across restarts.
    pub state_dir: PathBuf,
    /// Source CIDRs never captured inbound (kubelet probes).
    pub exempt: Vec<IpNet>,
}

/// What ztunnel remembers of an enrolled pod (`<state dir>/<uid>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns_path: PathBuf,
    pub netns_inode: u64,
    pub cgroup_path: PathBuf,
}

struct Pod {
    record: PodRecord,
    stop: CancellationToken,
}

/// The enrolled pods.
pub struct Manager {
    cfg: InPodConfig,
    node: Arc<ProxyInputs>,
    pods: Mutex<HashMap<String, Pod>>,
    /// Held through each add and remove, so two requests for one pod (two
    /// agent connections) cannot interleave their set-up and tear-down.
    ops: Mutex<()>,
    rt: tokio::runtime::Handle,
}

/// A pod uid becomes a file name: keep it to what Kubernetes uses.
fn check_uid(uid: &str) -> Result<(), String> {
    let ok = !uid.is_empty()
        && uid.len() <= 128
        && uid != "."
        && uid != ".."
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid pod uid {uid:?}: expected 1-128 of [A-Za-z0-9._-]"
        ))
    }
}

impl Manager {
    /// Starts in-pod mode: re-adopts the pods of an earlier run, then
    /// serves the enrollment socket.
    pub async fn start(cfg: InPodConfig, node: Arc<ProxyInputs>) -> anyhow::Result<Arc<Manager>> {
        netns::remember_host_netns().context("opening ztunnel's own network namespace")?;
        for dir in [&cfg.bpf_dir, &cfg.state_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = zds::bind(&cfg.socket)?;
        let mgr = Arc::new(Manager {
            cfg,
            node,
            pods: Mutex::new(HashMap::new()),
            ops: Mutex::new(()),
            rt: tokio::runtime::Handle::current(),
        });
        let m = mgr.clone();
        tokio::task::spawn_blocking(move || m.restore())
            .await
            .context("restoring enrolled pods")?;
        tokio::spawn(zds::serve(listener, mgr.clone()));
        info!(socket = %mgr.cfg.socket.display(), "in-pod enrollment socket ready");
        Ok(mgr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pod>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{uid}.json"))
    }

    fn pin_dir(&self, uid: &str) -> PathBuf {
        self.cfg.bpf_dir.join(uid)
    }

    /// Uids of the enrolled pods.
    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Enrolls a pod (idempotent for the same uid and netns).
    pub fn add(&self, mut record: PodRecord, netns: Netns) -> anyhow::Result<()> {
        check_uid(&record.uid).map_err(|e| anyhow!(e))?;
        let _op = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        record.netns_inode = netns.inode();
        if let Some(p) = self.lock().get(&record.uid) {
            if p.record.netns_inode == record.netns_inode {
                return Ok(());
            }
        }
        // Same uid, another netns (sandbox recreated): start over.
        self.remove_locked(&record.uid)?;
        let started = Instant::now();
        let pod = self.serve(&record, netns, false)?;
        let json = serde_json::to_vec_pretty(&record)?;
        let path = self.record_path(&record.uid);
        // Written aside then renamed: a crash never leaves half a record.
        let tmp = path.with_extension("json.tmp");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path)) {
            pod.stop.cancel();
            let _ = ztunnel_ebpf::remove(&self.pin_dir(&record.uid));
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
        info!(uid = %record.uid, pod = %format!("{}/{}", record.namespace, record.name),
              elapsed = ?started.elapsed(), "pod enrolled");
        self.lock().insert(record.uid.clone(), pod);
        Ok(())
    }

    /// Un-enrolls a pod: listeners closed, capture and record removed.
    /// Unknown uids are fine (idempotent).
    pub fn remove(&self, uid: &str) -> anyhow::Result<()> {
        check_uid(uid).map_err(|e| anyhow!(e))?;
        let _op = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        self.remove_locked(uid)
    }

    fn remove_locked(&self, uid: &str) -> anyhow::Result<()> {
        if let Some(p) = self.lock().remove(uid) {
            p.stop.cancel();
            info!(uid, "pod removed");
        }
        ztunnel_ebpf::remove(&self.pin_dir(uid))?;
        match std::fs::remove_file(self.record_path(uid)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("removing pod record"),
        }
    }

    /// Opens the pod's listeners and its capture (fresh, or adopted from
    /// pins), and starts serving.
    fn serve(&self, record: &PodRecord, netns: Netns, adopt: bool) -> anyhow::Result<Pod> {
        let _rt = self.rt.enter();
        let in_pod = |port: u16| {
            netns
                .listen(port)
                .with_context(|| format!("listening on [::]:{port} in the pod's network namespace"))
        };
        let outbound_l = in_pod(OUTBOUND_PORT)?;
        let plaintext_l = in_pod(INBOUND_PLAINTEXT_PORT)?;
        let hbone_l = in_pod(HBONE_PORT)?;
        let dir = self.pin_dir(&record.uid);
        let capture = match adopt.then(|| PodCapture::adopt(&dir)) {
            Some(Ok(c)) => c,
            other => {
                if let Some(Err(e)) = other {
                    warn!(uid = %record.uid, error = %e, "cannot adopt pinned capture; attaching anew");
                }
                PodCapture::attach(&CaptureSpec {
                    pin_dir: &dir,
                    cgroup: &record.cgroup_path,
                    netns: netns.file().as_fd(),
                    mark: self.node.mark,
                    outbound_port: OUTBOUND_PORT,
                    hbone_port: HBONE_PORT,
                    exempt: &self.cfg.exempt,
                })
                .with_context(|| format!("setting up capture for pod {}", record.uid))?
            }
        };
        capture
            .set_inbound_listener(&plaintext_l)
            .context("registering the inbound listener")?;
        let capture = Arc::new(capture);
        let n = &self.node;
        let netns = Arc::new(netns);
        let pi = Arc::new(ProxyInputs {
            node: n.node.clone(),
            store: n.store.clone(),
            secrets: n.secrets.clone(),
            metrics: n.metrics.clone(),
            pool: n.pool.in_netns(netns.clone()),
            tracker: n.tracker.clone(),
            orig_dst: Arc::new(EbpfOriginalDst(capture.clone())),
            mark: n.mark,
            hbone_port: n.hbone_port,
            max_streams: n.max_streams,
            drain: n.drain.clone(),
            netns: Some(netns),
        });
        let stop = CancellationToken::new();
        let who = Arc::new((record.namespace.clone(), record.name.clone()));
        spawn_until(&stop, outbound_loop(pi.clone(), outbound_l, who));
        spawn_until(&stop, inbound_plaintext::run(pi.clone(), plaintext_l));
        spawn_until(&stop, inbound::run(pi, hbone_l));
        Ok(Pod {
            record: record.clone(),
            stop,
        })
    }

    /// Re-adopts the pods of an earlier run from their records; removes
    /// what no longer has a pod.
    fn restore(&self) {
        let mut known = std::collections::HashSet::new();
        let entries = match std::fs::read_dir(&self.cfg.state_dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.cfg.state_dir.display(), error = %e, "cannot read pod records");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => {}
                Some("tmp") => {
                    // A record being written when ztunnel died.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                _ => continue,
            }
            let record: PodRecord = match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(record = %path.display(), error = %e, "unreadable pod record; removing it");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if check_uid(&record.uid).is_err() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let uid = record.uid.clone();
            let netns = Netns::open(&record.netns_path).and_then(|ns| {
                if ns.inode() == record.netns_inode {
                    Ok(ns)
                } else {
                    Err(io::Error::other("the path now names another namespace"))
                }
            });
            let result = netns
                .map_err(anyhow::Error::from)
                .and_then(|ns| self.serve(&record, ns, true));
            match result {
                Ok(pod) => {
                    info!(uid = %uid, "pod re-adopted after restart");
                    known.insert(uid.clone());
                    self.lock().insert(uid, pod);
                }
                Err(e) => {
                    warn!(uid = %uid, error = %format!("{e:#}"), "pod from an earlier run is gone; removing its capture");
                    let _ = self.remove(&uid);
                }
            }
        }
        // Pin directories nobody has a record for.
        if let Ok(entries) = std::fs::read_dir(&self.cfg.bpf_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    warn!(dir = %entry.path().display(), "removing stale pinned capture");
                    let _ = ztunnel_ebpf::remove(&entry.path());
                }
            }
        }
    }

    /// The resync's end: drop every pod the agent did not name.
    fn finish_resync(&self, named: &[String]) {
        let stale: Vec<String> = self
            .lock()
            .keys()
            .filter(|u| !named.contains(u))
            .cloned()
            .collect();
        for uid in stale {
            if let Err(e) = self.remove(&uid) {
                warn!(uid = %uid, error = %e, "removing pod after resync");
            }
        }
    }
}

impl zds::Handler for Manager {
    fn handle(
        &self,
        req: Payload,
        netns: Option<OwnedFd>,
        resync: &mut Option<Vec<String>>,
    ) -> Result<(), String> {
        match req {
            Payload::Add(add) => {
                let info = add.workload_info.unwrap_or_default();
                let netns = netns
                    .ok_or("add without a network namespace fd")
                    .and_then(|fd| {
                        Netns::from_file(std::fs::File::from(fd))
                            .map_err(|_| "cannot stat the network namespace fd")
                    })?;
                if add.cgroup_path.is_empty() {
                    return Err("add without cgroup_path (the pod's cgroup v2 directory)".into());
                }
                let record = PodRecord {
                    uid: add.uid,
                    name: info.name,
                    namespace: info.namespace,
                    service_account: info.service_account,
                    netns_path: add.netns_path.into(),
                    netns_inode: 0,
                    cgroup_path: add.cgroup_path.into(),
                };
                let uid = record.uid.clone();
                self.add(record, netns).map_err(|e| format!("{e:#}"))?;
                if let Some(named) = resync {
                    named.push(uid);
                }
                Ok(())
            }
            Payload::Keep(keep) => {
                check_uid(&keep.uid)?;
                if !self.lock().contains_key(&keep.uid) {
                    return Err(format!("keep: pod {} is not enrolled", keep.uid));
                }
                resync.get_or_insert_with(Vec::new).push(keep.uid);
                Ok(())
            }
            Payload::Del(del) => self.remove(&del.uid).map_err(|e| format!("{e:#}")),
            Payload::SnapshotSent(_) => {
                let named = resync.take().unwrap_or_default();
                self.finish_resync(&named);
                Ok(())
            }
        }
    }
}

fn spawn_until<F>(stop: &CancellationToken, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = fut => {}
        }
    });
}

/// The original destination from the pod's capture map (outbound); else
/// what the socket says: `SO_ORIGINAL_DST` if iptables REDIRECT inside the
/// pod sent it (how Istio captures, and how `bench capture` compares), or
/// the accepted socket's local address (inbound via `sk_lookup`).
pub struct EbpfOriginalDst(pub Arc<PodCapture>);

impl OriginalDestination for EbpfOriginalDst {
    fn original_destination(&self, stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
        if let Some(d) = self.0.take_original_destination(peer) {
            return Ok(canonical(d));
        }
        SocketOriginalDst.original_destination(stream, peer)
    }
}

fn find_pod_address(snap: &Snapshot, who: &(String, String), like: IpAddr) -> Option<IpAddr> {
    let w = snap
        .workloads
        .values()
        .find(|w| w.namespace == who.0 && w.name == who.1)?;
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or(w.addresses.first())
        .copied()
}

/// The pod's 15001: the app's connects, rewritten by `cgroup/connect4|6`.
async fn outbound_loop(pi: Arc<ProxyInputs>, listener: TcpListener, who: Arc<(String, String)>) {
    let local = listener.local_addr().ok().map(canonical);
    let drain = pi.drain.clone();
    accept_loop(
        listener,
        "in-pod outbound",
        drain,
        move |mut stream, peer| {
            let pi = pi.clone();
            let who = who.clone();
            async move {
                let dst = match pi.orig_dst.original_destination(&stream, peer) {
                    Ok(d) if Some(d) != local && d.port() != OUTBOUND_PORT => d,
                    _ => {
                        return log_refused(
                            "outbound",
                            peer,
                            peer,
                            "connection was not captured: no original destination",
                        )
                    }
                };
                let Some(ip) = find_pod_address(&pi.store.snapshot(), &who, dst.ip()) else {
                    return log_refused(
                        "outbound",
                        peer,
                        dst,
                        &format!(
                            "enrolled pod {}/{} is not in the workload state",
                            who.0, who.1
                        ),
                    );
                };
                let src = SocketAddr::new(ip, peer.port());
                // A failure has been logged (and counted) by `connect_captured`.
                if let Ok(out) = outbound::connect_captured(&pi, src, dst, &stream).await {
                    out.serve(&mut stream).await;
                }
            }
        },
    )
    .await;
}

/// Parses `--inpod-exempt` values.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (like 10.0.0.0/8) or an address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        assert!(check_uid("3f2a-11ee-b962_0242ac120002").is_ok());
        for bad in ["", "..", "a/b", "x y", &"a".repeat(129)] {
            assert!(check_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().prefix_len(), 8);
        assert_eq!(parse_cidr("fd00::1").unwrap().prefix_len(), 128);
        assert!(parse_cidr("nope").is_err());
    }
}
