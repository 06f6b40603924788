//! Entering namespaces and running one-off commands.
//!
//! Network namespace membership is per *thread* on Linux, and `setns` on a
//! thread does not affect the rest of the process. So instead of switching the
//! caller's thread (which would leak the namespace into whatever the thread
//! runs next, e.g. a tokio worker), [`in_netns`] runs the closure on a fresh,
//! short-lived thread that enters the namespace first and then exits.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// How long the `tcp_connect*` helpers wait for a connection: long enough
/// for a slow CI machine, short enough that a broken route fails a test
/// quickly instead of waiting for the kernel's ~2 minute SYN retry budget.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of a named namespace: `/run/netns/<name>` (what `ip netns add`
/// creates). A value containing `/` is used as a path as-is, so
/// `/proc/<pid>/ns/net` works too.
pub(crate) fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        PathBuf::from("/run/netns").join(netns)
    }
}

/// Runs `f` on a new OS thread that has entered network namespace `netns`
/// (a name from `ip netns list`, or a path such as `/proc/<pid>/ns/net`), and
/// returns its result. Errors only if the namespace can't be entered.
///
/// Sockets (and child processes, and anything else that captures the
/// namespace at creation) made inside `f` stay in that namespace after `f`
/// returns and can be used from any thread.
pub fn try_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let path = netns_path(netns);
    // Open before spawning so a missing namespace is reported to the caller.
    let file = File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening network namespace {}: {e}", path.display()),
        )
    })?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("setns into {}: {e}", path.display()),
                )
            })?;
            drop(file);
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Like [`try_in_netns`] but panics if the namespace can't be entered, which
/// in a test is a bug in the test bed or the test, not a condition to handle.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    match try_in_netns(netns, f) {
        Ok(v) => v,
        Err(e) => panic!("in_netns({netns}): {e}"),
    }
}

fn flatten<T>(r: io::Result<io::Result<T>>) -> io::Result<T> {
    r.and_then(|x| x)
}

/// Connects to `remote` from inside `netns` (with a 10 s connect timeout).
pub fn tcp_connect_in(netns: &str, remote: SocketAddr) -> io::Result<TcpStream> {
    flatten(try_in_netns(netns, || {
        TcpStream::connect_timeout(&remote, CONNECT_TIMEOUT)
    }))
}

/// Connects to `remote` from inside `netns` with source address `local`
/// (ephemeral port). Host pods need this: their address is one of several
/// on the node, and the kernel would otherwise pick the node's `eth0` address.
pub fn tcp_connect_from_in(
    netns: &str,
    local: IpAddr,
    remote: SocketAddr,
) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    flatten(try_in_netns(netns, || {
        let sock = Socket::new(
            Domain::for_address(remote),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        sock.bind(&SocketAddr::new(local, 0).into())?;
        sock.connect_timeout(&remote.into(), CONNECT_TIMEOUT)?;
        Ok(sock.into())
    }))
}

/// Binds a TCP listener on `addr` inside `netns` (port 0 picks a free port;
/// read it back with `local_addr()`).
pub fn tcp_listen_in(netns: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    flatten(try_in_netns(netns, || TcpListener::bind(addr)))
}

/// Renders a command line for error messages, shell-like.
pub(crate) fn cmdline<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        let a = a.as_ref().to_string_lossy();
        s.push(' ');
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `program args...`, returning its output; fails (with the full command
/// line and its stderr) if it can't start or exits unsuccessfully.
pub(crate) fn run_checked<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output> {
    let line = cmdline(program, args);
    tracing::debug!(cmd = %line, "e2e: running");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `ip args...`, failing with the command line and stderr on error.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run_checked("ip", args).map(drop)
}

/// Runs `ip netns exec <netns> args...` and returns its output whatever its
/// exit status (check `output.status` yourself); fails only if it can't run.
/// Unlike [`Testbed::spawn`](crate::Testbed::spawn), `ip netns exec` also
/// remounts `/sys` so tools that read `/sys/class/net` see the namespace's
/// interfaces.
pub fn ip_netns_exec_output<S: AsRef<OsStr>>(netns: &str, args: &[S]) -> Result<Output> {
    let mut full: Vec<&OsStr> = vec![OsStr::new("netns"), OsStr::new("exec"), OsStr::new(netns)];
    full.extend(args.iter().map(|a| a.as_ref()));
    let line = cmdline("ip", &full);
    tracing::debug!(cmd = %line, "e2e: running");
    Command::new("ip")
        .args(&full)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))
}

/// Runs `ip netns exec <netns> args...` and returns its stdout; fails with the
/// full command line and stderr if it exits unsuccessfully.
pub fn ip_netns_exec<S: AsRef<OsStr>>(netns: &str, args: &[S]) -> Result<String> {
    let out = ip_netns_exec_output(netns, args)?;
    if !out.status.success() {
        let mut full = vec![netns.to_string()];
        full.extend(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        );
        bail!(
            "`{}` failed ({}): {}",
            cmdline("ip netns exec", &full),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside `netns`.
///
/// `/proc/sys/net` resolves against the namespace of the *thread* doing the
/// lookup, so writing from an [`in_netns`] thread configures that namespace
/// without spawning `sysctl`.
pub(crate) fn set_sysctls(netns: &str, kv: &[(&str, &str)]) -> Result<()> {
    try_in_netns(netns, || -> Result<()> {
        for (k, v) in kv {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::write(&path, v)
                .with_context(|| format!("setting sysctl {k}={v} in netns {netns}"))?;
        }
        Ok(())
    })
    .with_context(|| format!("entering netns {netns}"))?
}
