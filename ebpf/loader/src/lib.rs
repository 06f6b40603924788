//! Per-pod eBPF capture for ztunnel: load, attach, pin, re-adopt, remove.
//!
//! # What happens to a pod's traffic
//!
//! Capture lives entirely inside the pod's own cgroup and network
//! namespace, never on node interfaces, so it coexists with any CNI. ztunnel
//! opens its listeners *inside* the pod's netns (15001 outbound, 15006
//! inbound plaintext, 15008 HBONE), and four small programs steer traffic
//! to them:
//!
//! ```text
//!  app connect(10.244.2.11:8080)
//!    └─ cgroup/connect4|6 (pod cgroup): remember dst by socket cookie,
//!       rewrite to 127.0.0.1:15001 / [::1]:15001 (pod netns)
//!    └─ sockops TCP_CONNECT_CB: local addr now known -> ORIG_DST[app addr] = dst
//!  ztunnel accepts on the pod's 15001, peer = app addr -> ORIG_DST -> 10.244.2.11:8080
//!
//!  SYN to pod_ip:8080 (from anywhere)
//!    └─ sk_lookup (pod netns): hand to ztunnel's in-pod 15006 listener
//!       (local address stays pod_ip:8080 = the original destination)
//!       except: 15001/15008, loopback, pod-to-itself, exempt source CIDRs
//! ```
//!
//! ztunnel delivers inbound connections to the app from inside the pod's
//! netns, to the pod's own address: the kernel then uses the pod address as
//! source too, which `sk_lookup` passes ("pod to itself"). ztunnel's sockets
//! are not in the pod's cgroup, and carry `SO_MARK` (checked as well), so the
//! connect hooks never see them.
//!
//! # Why these hooks
//!
//! - **Outbound: `cgroup/connect4|6` + `sockops`**, not `sk_lookup` with
//!   policy routing or TPROXY: rewriting the destination at `connect()` costs
//!   one map update per connection and no per-packet work; there is no NAT,
//!   no conntrack entry and no routing change. The original destination is
//!   kept in an LRU map keyed by the app socket's local address (the peer
//!   address ztunnel sees), filled at `TCP_CONNECT_CB`, i.e. before the SYN
//!   leaves, so it is always there when ztunnel accepts.
//! - **Inbound: `sk_lookup`** on the pod's netns: it runs only when the
//!   kernel looks for a listener for a new connection (a SYN), not per
//!   packet, and the accepted socket keeps the original destination as its
//!   local address, so nothing needs recording. It fails closed: while
//!   ztunnel's listener is gone (restart) SYNs to the pod are dropped, never
//!   delivered around the policy.
//!
//! Measured (`bench capture`, release build, 2 vCPUs shared with other
//! builds, kernel 6.18; per-run costs from `kernel.bpf_stats_enabled`):
//!
//! | what | cost |
//! |------|------|
//! | `connect4` (cookie map insert + rewrite) | ~0.7 us per connect |
//! | `sockops` | ~0.2 us per callback, 5 callbacks per connection (only `TCP_CONNECT_CB` does work) |
//! | `sk_lookup` | ~0.1 us per SYN into the pod |
//! | ztunnel's lookup on accept | two map syscalls (get, delete), against one `getsockopt(SO_ORIGINAL_DST)` |
//! | set-up for one pod | p50 ~13-21 ms inside ztunnel (listeners, load, verify, attach, pin), ~15-27 ms for the CNI ADD end to end |
//!
//! Against Istio's in-pod iptables REDIRECT feeding the very same ztunnel
//! listener (medians of 5 alternating rounds): throughput 1.22x, p50
//! latency -10.6 us, connections/s 1.08x. Single rounds swing either way on
//! a shared 2-vCPU machine: the capture layer is not what a connection's
//! cost is made of (ztunnel's TLS and copies are), but unlike REDIRECT it
//! adds no per-packet conntrack/NAT work. Candidates not taken:
//! `sk_lookup` for outbound needs policy routing of every pod packet
//! (per-packet cost, a routing change inside the pod); a `cgroup/getsockopt`
//! answer to `SO_ORIGINAL_DST` runs in ztunnel's cgroup, not the pod's, so it
//! would need a map shared across pods; socket-local storage instead of the
//! cookie map would save a little of `connect4`'s cost but aya-ebpf 0.1 has
//! no map type for it.
//!
//! # Pinning and restarts
//!
//! Everything for one pod is pinned under `<root>/<pod uid>/`: the maps
//! (names in [`ztunnel_ebpf_common::maps`]) and one link per program
//! (`link_connect4`, `link_connect6`, `link_sockops`, `link_sk_lookup`). A
//! ztunnel that dies keeps capture in place; a new one [`PodCapture::adopt`]s
//! the pinned maps and puts its new listener in the sockmap. [`remove`]
//! deletes the directory, which detaches the links and frees the maps.
#![allow(unsafe_code)] // Only in `sys`: two bpf(2) calls aya 0.13 has no public API for.

mod sys;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, SockMap};
use aya::programs::links::FdLink;
use aya::programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use tracing::debug;
use ztunnel_ebpf_common::{globals, maps, programs, SockAddr, AF_INET, AF_INET6};

/// The compiled programs, built by `build.rs`.
/// (`object` parses in place and needs the bytes aligned.)
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture"));

/// Kernel attach types (`enum bpf_attach_type`) used with [`sys::link_create`].
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_SOCK_OPS: u32 = 3;

const LINK_CONNECT4: &str = "link_connect4";
const LINK_CONNECT6: &str = "link_connect6";
const LINK_SOCKOPS: &str = "link_sockops";
const LINK_SK_LOOKUP: &str = "link_sk_lookup";
const ALL_LINKS: [&str; 4] = [LINK_CONNECT4, LINK_CONNECT6, LINK_SOCKOPS, LINK_SK_LOOKUP];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The verifier's log is part of `source`'s message.
    #[error("loading eBPF program {program}: {source}")]
    Load {
        program: &'static str,
        source: ProgramError,
    },
    #[error("attaching eBPF program {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        source: io::Error,
    },
    #[error("eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("eBPF object has no {kind} {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pinned capture in {0} is incomplete (missing {1}); remove it and attach again")]
    Incomplete(PathBuf, &'static str),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What to capture for one pod.
pub struct CaptureSpec<'a> {
    /// Pin directory for this pod (`<root>/<pod uid>`); created.
    pub pin_dir: &'a Path,
    /// The pod's cgroup v2 directory (outbound hooks).
    pub cgroup: &'a Path,
    /// The pod's network namespace (inbound hook).
    pub netns: BorrowedFd<'a>,
    /// `SO_MARK` of ztunnel's own sockets.
    pub mark: u32,
    /// ztunnel's in-pod outbound and HBONE ports (15001, 15008).
    pub outbound_port: u16,
    pub hbone_port: u16,
    /// Source CIDRs whose inbound connections pass untouched (probes).
    pub exempt: &'a [IpNet],
}

/// The userspace handle on one pod's capture: the maps ztunnel reads and
/// writes while the pod is enrolled. Dropping it leaves capture in place
/// (it is pinned); [`remove`] takes it away.
pub struct PodCapture {
    dir: PathBuf,
    orig_dst: Mutex<HashMap<MapData, SockAddr, SockAddr>>,
    inbound: Mutex<SockMap<MapData>>,
}

impl std::fmt::Debug for PodCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCapture")
            .field("dir", &self.dir)
            .finish()
    }
}

impl PodCapture {
    /// Loads a fresh copy of the programs for one pod, pins its maps and
    /// attaches (and pins) the four links. On error nothing is left behind.
    pub fn attach(spec: &CaptureSpec<'_>) -> Result<PodCapture, Error> {
        let started = Instant::now();
        let dir = spec.pin_dir;
        if dir.exists() {
            remove(dir)?;
        }
        std::fs::create_dir_all(dir).map_err(io_err("creating pin directory", dir))?;
        match Self::attach_inner(spec) {
            Ok(c) => {
                debug!(dir = %dir.display(), elapsed = ?started.elapsed(), "eBPF capture attached");
                Ok(c)
            }
            Err(e) => {
                let _ = remove(dir);
                Err(e)
            }
        }
    }

    fn attach_inner(spec: &CaptureSpec<'_>) -> Result<PodCapture, Error> {
        let dir = spec.pin_dir;
        let outbound_port = u32::from(spec.outbound_port);
        let hbone_port = u32::from(spec.hbone_port);
        // No CO-RE relocations in these programs, so skip parsing the
        // kernel's BTF (megabytes; most of the set-up time otherwise).
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_pin_path(dir)
            .set_global(globals::MARK, &spec.mark, true)
            .set_global(globals::OUTBOUND_PORT, &outbound_port, true)
            .set_global(globals::HBONE_PORT, &hbone_port, true)
            .load(OBJECT)?;

        let cgroup =
            std::fs::File::open(spec.cgroup).map_err(io_err("opening cgroup", spec.cgroup))?;
        let cg_name = spec.cgroup.display().to_string();
        for (program, attach_type, link) in [
            (programs::CONNECT4, BPF_CGROUP_INET4_CONNECT, LINK_CONNECT4),
            (programs::CONNECT6, BPF_CGROUP_INET6_CONNECT, LINK_CONNECT6),
        ] {
            let prog: &mut CgroupSockAddr = program_mut(&mut ebpf, program)?;
            prog.load()
                .map_err(|source| Error::Load { program, source })?;
            let fd = prog
                .fd()
                .map_err(|source| Error::Load { program, source })?;
            pin_cgroup_link(
                fd.as_fd(),
                &cgroup,
                attach_type,
                program,
                &cg_name,
                &dir.join(link),
            )?;
        }
        {
            let program = programs::SOCKOPS;
            let prog: &mut SockOps = program_mut(&mut ebpf, program)?;
            prog.load()
                .map_err(|source| Error::Load { program, source })?;
            let fd = prog
                .fd()
                .map_err(|source| Error::Load { program, source })?;
            pin_cgroup_link(
                fd.as_fd(),
                &cgroup,
                BPF_CGROUP_SOCK_OPS,
                program,
                &cg_name,
                &dir.join(LINK_SOCKOPS),
            )?;
        }
        {
            let program = programs::SK_LOOKUP;
            let prog: &mut SkLookup = program_mut(&mut ebpf, program)?;
            prog.load()
                .map_err(|source| Error::Load { program, source })?;
            let attach_err = |source: ProgramError| Error::Attach {
                program,
                target: "the pod's network namespace".into(),
                source: io::Error::other(source),
            };
            let id = prog.attach(spec.netns).map_err(attach_err)?;
            let link: FdLink = prog.take_link(id).map_err(attach_err)?.into();
            let path = dir.join(LINK_SK_LOOKUP);
            link.pin(&path).map_err(|e| Error::Io {
                what: "pinning link",
                path,
                source: io::Error::other(e),
            })?;
        }

        let mut v4: LpmTrie<_, [u8; 4], u8> = take_map(&mut ebpf, maps::EXEMPT_V4)?;
        let mut v6: LpmTrie<_, [u8; 16], u8> = take_map(&mut ebpf, maps::EXEMPT_V6)?;
        for net in spec.exempt {
            let r = match net.trunc() {
                IpNet::V4(n) => {
                    v4.insert(&Key::new(n.prefix_len().into(), n.addr().octets()), 1, 0)
                }
                IpNet::V6(n) => {
                    v6.insert(&Key::new(n.prefix_len().into(), n.addr().octets()), 1, 0)
                }
            };
            r.map_err(|source| Error::Map {
                name: if net.addr().is_ipv4() {
                    maps::EXEMPT_V4
                } else {
                    maps::EXEMPT_V6
                },
                source,
            })?;
        }
        Ok(PodCapture {
            dir: dir.to_path_buf(),
            orig_dst: Mutex::new(take_map(&mut ebpf, maps::ORIG_DST)?),
            inbound: Mutex::new(take_map(&mut ebpf, maps::INBOUND)?),
        })
        // `ebpf` drops here: the kernel objects live on through their pins.
    }

    /// Takes over a pod's capture pinned by an earlier ztunnel.
    pub fn adopt(dir: &Path) -> Result<PodCapture, Error> {
        for link in ALL_LINKS {
            if !dir.join(link).exists() {
                return Err(Error::Incomplete(dir.to_path_buf(), link));
            }
        }
        let open = |name: &'static str| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(Error::Incomplete(dir.to_path_buf(), name));
            }
            MapData::from_pin(&path).map_err(|source| Error::Map { name, source })
        };
        let orig_dst =
            HashMap::try_from(Map::LruHashMap(open(maps::ORIG_DST)?)).map_err(|source| {
                Error::Map {
                    name: maps::ORIG_DST,
                    source,
                }
            })?;
        let inbound =
            SockMap::try_from(Map::SockMap(open(maps::INBOUND)?)).map_err(|source| Error::Map {
                name: maps::INBOUND,
                source,
            })?;
        Ok(PodCapture {
            dir: dir.to_path_buf(),
            orig_dst: Mutex::new(orig_dst),
            inbound: Mutex::new(inbound),
        })
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `listener` (ztunnel's inbound plaintext listener, created in
    /// the pod's netns) the socket `sk_lookup` hands inbound connections to.
    pub fn set_inbound_listener(&self, listener: &impl AsRawFd) -> Result<(), Error> {
        let mut m = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        m.set(0, listener, 0).map_err(|source| Error::Map {
            name: maps::INBOUND,
            source,
        })
    }

    /// Where the app socket at `app` (the peer address of a connection
    /// accepted on the in-pod outbound listener) was connecting to. The
    /// record is consumed.
    pub fn take_original_destination(&self, app: SocketAddr) -> Option<SocketAddr> {
        let key = to_sock_addr(app);
        let mut m = self.orig_dst.lock().unwrap_or_else(|p| p.into_inner());
        let orig = m.get(&key, 0).ok()?;
        let _ = m.remove(&key);
        from_sock_addr(&orig)
    }
}

/// Loads the program the verifier rejects on purpose (maps pinned under
/// `pin_dir`, which the caller removes): the error a rejection produces.
#[doc(hidden)]
pub fn selftest_load_rejected(pin_dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(pin_dir).map_err(io_err("creating pin directory", pin_dir))?;
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .map_pin_path(pin_dir)
        .load(OBJECT)?;
    let program = programs::SELFTEST_REJECTED;
    let prog: &mut SockOps = program_mut(&mut ebpf, program)?;
    prog.load()
        .map_err(|source| Error::Load { program, source })
}

/// Removes everything pinned for one pod: links (detaching the programs)
/// and maps. Missing files are fine: removal is idempotent.
pub fn remove(dir: &Path) -> Result<(), Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("reading pin directory", dir)(e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("unpinning", &path)(e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing pin directory", dir)(e)),
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(|source| Error::Load {
        program: name,
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// Attaches a cgroup program with a BPF link and pins the link, so the
/// attachment outlives this process. (aya 0.13 creates the same link but
/// does not let it be pinned.)
fn pin_cgroup_link(
    prog: BorrowedFd<'_>,
    cgroup: &std::fs::File,
    attach_type: u32,
    program: &'static str,
    cg_name: &str,
    path: &Path,
) -> Result<(), Error> {
    let link =
        sys::link_create(prog, cgroup.as_fd(), attach_type).map_err(|source| Error::Attach {
            program,
            target: format!("cgroup {cg_name}"),
            source,
        })?;
    sys::obj_pin(link.as_fd(), path).map_err(io_err("pinning link", path))
}

fn to_sock_addr(a: SocketAddr) -> SockAddr {
    let a = SocketAddr::new(a.ip().to_canonical(), a.port());
    match a.ip() {
        IpAddr::V4(ip) => SockAddr {
            family: AF_INET,
            port: a.port().into(),
            ip: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
        },
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr {
                family: AF_INET6,
                port: a.port().into(),
                ip: [w(0), w(4), w(8), w(12)],
            }
        }
    }
}

fn from_sock_addr(s: &SockAddr) -> Option<SocketAddr> {
    let port = u16::try_from(s.port).ok()?;
    let ip = match s.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(s.ip[0].to_ne_bytes())),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in s.ip.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for a in ["10.244.1.10:8080", "[fd00:244:1::10]:443", "[::1]:15001"] {
            let a: SocketAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
            assert_eq!(from_sock_addr(&to_sock_addr(a)), Some(a));
        }
        // The programs store IPv4 in network byte order in word 0.
        let s = to_sock_addr("127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(s.ip[0].to_ne_bytes(), [127, 0, 0, 1]);
    }

    #[test]
    fn removing_a_missing_dir_is_fine() {
        assert!(remove(Path::new("/nonexistent/ztunnel-ebpf-test")).is_ok());
    }
}
