//! Layouts shared by ztunnel's eBPF programs and their userspace loader.
//!
//! Everything here is `#[repr(C)]` plain data: the programs write these
//! values into maps, the loader reads them back, so both sides must agree
//! byte for byte. Addresses are kept exactly as the kernel hands them to
//! the programs (network byte order, IPv4 in the first word), ports in host
//! byte order.
#![no_std]

/// Address family values as the kernel reports them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// A TCP endpoint: where an app's `connect()` was going, or the app
/// socket's own local address once the kernel picked it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    /// The address's 32-bit words in network byte order; IPv4 uses `ip[0]`.
    pub ip: [u32; 4],
}

/// Pinned map names (the loader opens them by these names under a pod's
/// pin directory).
pub mod maps {
    /// `LRU_HASH<u64 socket cookie, SockAddr>`: original destinations of
    /// connects rewritten by `cgroup/connect4|6`, until `sockops` knows the
    /// socket's local address.
    pub const ORIG_BY_COOKIE: &str = "ZT_ORIG_COOKIE";
    /// `LRU_HASH<SockAddr app-local, SockAddr original destination>`: read
    /// (and deleted) by ztunnel when it accepts the connection on 15001.
    pub const ORIG_DST: &str = "ZT_ORIG_DST";
    /// `SOCKMAP[1]`: ztunnel's in-pod inbound (15006) listener.
    pub const INBOUND: &str = "ZT_INBOUND";
    /// `LPM_TRIE<[u8; 4]>` / `LPM_TRIE<[u8; 16]>`: source CIDRs whose
    /// inbound connections are never captured (kubelet probes).
    pub const EXEMPT_V4: &str = "ZT_EXEMPT_V4";
    pub const EXEMPT_V6: &str = "ZT_EXEMPT_V6";
}

/// Program names (the functions in the eBPF object).
pub mod programs {
    pub const CONNECT4: &str = "zt_connect4";
    pub const CONNECT6: &str = "zt_connect6";
    pub const SOCKOPS: &str = "zt_sockops";
    pub const SK_LOOKUP: &str = "zt_sk_lookup";
    /// Rejected by the verifier on purpose; only tests load it.
    pub const SELFTEST_REJECTED: &str = "zt_selftest_rejected";
}

/// Globals the loader sets before loading (read-only data).
pub mod globals {
    /// `SO_MARK` of ztunnel's own sockets.
    pub const MARK: &str = "ZT_MARK";
    /// ztunnel's in-pod outbound port (15001).
    pub const OUTBOUND_PORT: &str = "ZT_OUTBOUND_PORT";
    /// ztunnel's in-pod HBONE port (15008).
    pub const HBONE_PORT: &str = "ZT_HBONE_PORT";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `repr(C)`, no padding (four-byte fields only).
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SockAddr {}
}
