//! ztunnel's capture programs, one copy loaded per enrolled pod.
//!
//! - `zt_connect4` / `zt_connect6` (`cgroup/connect4|6`, on the pod's
//!   cgroup): an app's TCP `connect()` to anything but loopback is rewritten
//!   to ztunnel's in-pod outbound listener (`127.0.0.1:15001` / `[::1]:15001`
//!   in the pod's own netns); the original destination is remembered by
//!   socket cookie.
//! - `zt_sockops` (`sockops`, same cgroup): when such a socket sends its SYN
//!   its local address is known, so the original destination moves to a map
//!   keyed by that address: exactly the peer address ztunnel sees on accept.
//! - `zt_sk_lookup` (`sk_lookup`, on the pod's netns): an inbound TCP
//!   connection to the pod is handed to ztunnel's in-pod 15006 listener,
//!   except ztunnel's own ports, loopback, the pod talking to itself (how
//!   ztunnel delivers to the app) and exempt sources.
//!
//! The userspace side is `../loader`; its crate docs explain the choices.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{sk_action, BPF_SOCK_OPS_TCP_CONNECT_CB};
use aya_ebpf::helpers::gen::bpf_get_socket_cookie;
use aya_ebpf::macros::{cgroup_sock_addr, map, sk_lookup, sock_ops};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{LpmTrie, LruHashMap, SockMap};
use aya_ebpf::programs::{SkLookupContext, SockAddrContext, SockOpsContext};
use aya_ebpf::EbpfContext;
use ztunnel_ebpf_common::{SockAddr, AF_INET, AF_INET6};

const IPPROTO_TCP: u32 = 6;

/// Reads a context's `[u32; 4]` address one word at a time: the verifier
/// only accepts context loads at constant offsets from the context pointer.
macro_rules! ip6 {
    ($field:expr) => {
        [
            core::ptr::read_volatile(&$field[0]),
            core::ptr::read_volatile(&$field[1]),
            core::ptr::read_volatile(&$field[2]),
            core::ptr::read_volatile(&$field[3]),
        ]
    };
}

#[no_mangle]
static ZT_MARK: u32 = 0x539;
#[no_mangle]
static ZT_OUTBOUND_PORT: u32 = 15001;
#[no_mangle]
static ZT_HBONE_PORT: u32 = 15008;

#[map(name = "ZT_ORIG_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(16384, 0);
#[map(name = "ZT_ORIG_DST")]
static ORIG_DST: LruHashMap<SockAddr, SockAddr> = LruHashMap::pinned(16384, 0);
#[map(name = "ZT_INBOUND")]
static mut INBOUND: SockMap = SockMap::pinned(1, 0);
#[map(name = "ZT_EXEMPT_V4")]
static EXEMPT_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(64, 1);
#[map(name = "ZT_EXEMPT_V6")]
static EXEMPT_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(64, 1);

fn global(v: &'static u32) -> u32 {
    // Globals live in .rodata, which the loader rewrites before loading;
    // a volatile read keeps the compiler from folding the default in.
    unsafe { core::ptr::read_volatile(v) }
}

/// 127.0.0.0/8 with `ip` in network byte order.
fn loopback4(ip: u32) -> bool {
    u32::from_be(ip) >> 24 == 127
}

/// `::1`, or `::ffff:127.x.y.z`.
fn loopback6(ip: &[u32; 4]) -> bool {
    let (a, b, c, d) = (ip[0], ip[1], u32::from_be(ip[2]), u32::from_be(ip[3]));
    a == 0 && b == 0 && ((c == 0 && d == 1) || (c == 0xffff && d >> 24 == 127))
}

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        if (*sa).protocol != IPPROTO_TCP || marked(&ctx) {
            return 1;
        }
        let ip = (*sa).user_ip4;
        if loopback4(ip) {
            return 1;
        }
        let orig = SockAddr {
            family: AF_INET,
            port: u16::from_be((*sa).user_port as u16) as u32,
            ip: [ip, 0, 0, 0],
        };
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
            // Without a record ztunnel could not serve it: leave it alone
            // rather than capture a connection nobody can forward.
            return 1;
        }
        (*sa).user_ip4 = u32::to_be(0x7f00_0001);
        (*sa).user_port = u16::to_be(global(&ZT_OUTBOUND_PORT) as u16) as u32;
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        if (*sa).protocol != IPPROTO_TCP || marked(&ctx) {
            return 1;
        }
        let ip = ip6!((*sa).user_ip6);
        if loopback6(&ip) {
            return 1;
        }
        let orig = SockAddr {
            family: AF_INET6,
            port: u16::from_be((*sa).user_port as u16) as u32,
            ip,
        };
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
            return 1;
        }
        (*sa).user_ip6 = [0, 0, 0, u32::to_be(1)];
        (*sa).user_port = u16::to_be(global(&ZT_OUTBOUND_PORT) as u16) as u32;
    }
    1
}

/// ztunnel's sockets carry its mark. They are not in the pod's cgroup in the
/// first place; this keeps them safe if a ztunnel ever runs in one.
unsafe fn marked(ctx: &SockAddrContext) -> bool {
    let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
    !sk.is_null() && (*sk).mark == global(&ZT_MARK)
}

#[sock_ops]
pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    unsafe {
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        let Some(orig) = ORIG_BY_COOKIE.get(&cookie) else {
            return 1;
        };
        let orig = *orig;
        let family = ctx.family();
        let ops = ctx.ops;
        let local = if family == AF_INET {
            SockAddr {
                family,
                port: ctx.local_port(),
                ip: [ctx.local_ip4(), 0, 0, 0],
            }
        } else {
            SockAddr {
                family,
                port: ctx.local_port(),
                ip: ip6!((*ops).local_ip6),
            }
        };
        let _ = ORIG_DST.insert(&local, &orig, 0);
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
    1
}

#[sk_lookup]
pub fn zt_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    unsafe {
        if (*l).protocol != IPPROTO_TCP {
            return sk_action::SK_PASS;
        }
        let port = (*l).local_port;
        if port == global(&ZT_HBONE_PORT) || port == global(&ZT_OUTBOUND_PORT) {
            return sk_action::SK_PASS;
        }
        if (*l).family == AF_INET {
            let (local, remote) = ((*l).local_ip4, (*l).remote_ip4);
            if loopback4(local) || loopback4(remote) || local == remote {
                return sk_action::SK_PASS;
            }
            let key = Key::new(32, remote.to_ne_bytes());
            if EXEMPT_V4.get(&key).is_some() {
                return sk_action::SK_PASS;
            }
        } else if (*l).family == AF_INET6 {
            let (local, remote) = (ip6!((*l).local_ip6), ip6!((*l).remote_ip6));
            if loopback6(&local) || loopback6(&remote) || local == remote {
                return sk_action::SK_PASS;
            }
            let mut bytes = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let w = remote[i].to_ne_bytes();
                bytes[i * 4] = w[0];
                bytes[i * 4 + 1] = w[1];
                bytes[i * 4 + 2] = w[2];
                bytes[i * 4 + 3] = w[3];
                i += 1;
            }
            if EXEMPT_V6.get(&Key::new(128, bytes)).is_some() {
                return sk_action::SK_PASS;
            }
        } else {
            return sk_action::SK_PASS;
        }
    }
    // Fail closed: with ztunnel's listener gone (restarting) the connection
    // is dropped, never delivered around the policy.
    // SAFETY: the map handle is only read; `&mut` is what aya-ebpf's
    // signature asks for.
    let inbound = unsafe { &mut *core::ptr::addr_of_mut!(INBOUND) };
    match inbound.redirect_sk_lookup(&ctx, 0, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Never attached: the verifier rejects it on purpose (it reads a context
/// array through a computed pointer), so the loader's tests can check that
/// a rejection names the program and carries the verifier's log.
#[sock_ops]
pub fn zt_selftest_rejected(ctx: SockOpsContext) -> u32 {
    let ip = ctx.local_ip6();
    ip[0] ^ ip[1] ^ ip[2] ^ ip[3]
}
