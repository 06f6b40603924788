//! Traffic: the servers (threads in the bench process, listening inside the
//! server node's namespace) and the three client loads (bulk stream,
//! request/response ping-pong, connection churn).
//!
//! Everything uses blocking std sockets. The hot loops reuse one buffer per
//! connection and never allocate. Every socket has a short I/O timeout so a
//! stalled path turns into a precise error ("no progress for 10 s in ...")
//! instead of a hang, and so that Ctrl-C ([`STOP`]) is noticed promptly.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Set by the signal thread on SIGINT/SIGTERM; every loop checks it.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Socket read/write timeout: how often a blocked loop wakes up to check
/// [`STOP`] and its stall clock. Also the connect timeout of churn sockets
/// (Linux `connect()` honours `SO_SNDTIMEO`).
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// No progress for this long on a connection is reported as a stall.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Size of each write of the bulk stream.
pub const BULK_WRITE: usize = 256 * 1024;
/// Request and response size of the ping-pong.
pub const RR_SIZE: usize = 64;
/// Round trips before the ping-pong starts recording.
pub const RR_WARMUP: usize = 200;

pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

pub fn interrupted_error() -> anyhow::Error {
    anyhow::anyhow!("interrupted")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Called when a blocking call timed out: fails on Ctrl-C, or once nothing
/// has moved since `since` for [`STALL_LIMIT`].
fn on_timeout(what: &str, since: Instant) -> io::Result<()> {
    if stopped() {
        return Err(io::Error::other("interrupted"));
    }
    if since.elapsed() >= STALL_LIMIT {
        return Err(io::Error::new(
            ErrorKind::TimedOut,
            format!("{what}: stalled, no progress for {STALL_LIMIT:?}"),
        ));
    }
    Ok(())
}

/// `write_all` that survives socket timeouts until [`STALL_LIMIT`].
fn write_all_patient(s: &mut TcpStream, mut buf: &[u8], what: &str) -> io::Result<()> {
    let mut since: Option<Instant> = None;
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, what.to_string())),
            Ok(n) => {
                buf = &buf[n..];
                since = None;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => on_timeout(
                what,
                *since.get_or_insert_with(|| Instant::now() - IO_TIMEOUT),
            )?,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{what}: {e}"))),
        }
    }
    Ok(())
}

/// `read_exact` that survives socket timeouts until [`STALL_LIMIT`].
fn read_exact_patient(s: &mut TcpStream, buf: &mut [u8], what: &str) -> io::Result<()> {
    let mut got = 0;
    let mut since: Option<Instant> = None;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "{what}: connection closed by the peer after {got} of {} bytes",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => {
                got += n;
                since = None;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => on_timeout(
                what,
                *since.get_or_insert_with(|| Instant::now() - IO_TIMEOUT),
            )?,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{what}: {e}"))),
        }
    }
    Ok(())
}

/// Connects from `src` (bound, ephemeral port) to `dst`, inside `netns`, with
/// `TCP_NODELAY` and the I/O timeouts set.
pub fn connect(netns: &str, src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    let s = e2e::tcp_connect_from_in(netns, src, dst)
        .with_context(|| format!("connecting {src} -> {dst} in {netns}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

// ---------------------------------------------------------------------------
// Servers

/// What the bulk sink measured on one connection.
#[derive(Debug, Clone)]
pub struct BulkResult {
    /// Bytes received after the first read (the first read starts the clock).
    pub bytes: u64,
    /// From the end of the first read to the end of the last one that
    /// returned data, so a late or missing EOF does not skew the rate.
    pub elapsed: Duration,
    /// Why the connection ended, if not by a clean EOF.
    pub error: Option<String>,
}

impl BulkResult {
    pub fn gbit_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.bytes as f64 * 8.0 / secs / 1e9
        }
    }
}

/// The running servers. Their threads are detached; they die with the
/// process (their sockets keep the namespace alive until then, harmlessly).
pub struct Servers {
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    /// Churn server for [`Close::Rst`]: waits for the client to close.
    pub churn: SocketAddr,
    /// Churn server for [`Close::Fin`]: closes right after its response.
    pub churn_fin: SocketAddr,
    /// One result per bulk connection, when it ends.
    pub bulk_results: Mutex<mpsc::Receiver<BulkResult>>,
    /// Bytes received by the current bulk connection so far.
    pub bulk_progress: Arc<AtomicU64>,
    /// Peer address of the last connection the echo server accepted.
    pub echo_last_peer: Arc<Mutex<Option<SocketAddr>>>,
    /// Connections the churn server completed (request read, response
    /// written).
    pub churn_served: Arc<AtomicU64>,
}

/// Starts the bulk sink, the echo server and the two churn servers on
/// `ip:base_port`, `+1`, `+2` and `+3` inside `netns`.
pub fn start_servers(
    netns: &str,
    ip: IpAddr,
    base_port: u16,
    churn_threads: usize,
) -> Result<Servers> {
    let listen = |port: u16| {
        let addr = SocketAddr::new(ip, port);
        e2e::tcp_listen_in(netns, addr).with_context(|| format!("listening on {addr} in {netns}"))
    };
    let bulk_l = listen(base_port)?;
    let echo_l = listen(base_port + 1)?;
    let churn_l = listen(base_port + 2)?;
    let churn_fin_l = listen(base_port + 3)?;
    let churn_fin = churn_fin_l.local_addr()?;
    let servers_addrs = (
        bulk_l.local_addr()?,
        echo_l.local_addr()?,
        churn_l.local_addr()?,
    );

    let (tx, rx) = mpsc::channel();
    let progress = Arc::new(AtomicU64::new(0));
    {
        let progress = progress.clone();
        std::thread::Builder::new()
            .name("bulk-accept".into())
            .spawn(move || {
                accept_loop(bulk_l, |s| {
                    let tx = tx.clone();
                    let progress = progress.clone();
                    spawn_named("bulk-conn", move || {
                        let r = bulk_sink(s, &progress);
                        let _ = tx.send(r);
                    });
                })
            })?;
    }

    let last_peer = Arc::new(Mutex::new(None));
    {
        let last_peer = last_peer.clone();
        std::thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                accept_loop(echo_l, |s| {
                    if let (Ok(peer), Ok(mut g)) = (s.peer_addr(), last_peer.lock()) {
                        *g = Some(peer);
                    }
                    spawn_named("echo-conn", move || echo_conn(s));
                })
            })?;
    }

    let served = Arc::new(AtomicU64::new(0));
    for (l, close) in [(churn_l, Close::Rst), (churn_fin_l, Close::Fin)] {
        for i in 0..churn_threads.max(1) {
            let l = l.try_clone()?;
            let served = served.clone();
            std::thread::Builder::new()
                .name(format!("churn-{close:?}-{i}"))
                .spawn(move || churn_server(l, &served, close))?;
        }
    }

    Ok(Servers {
        bulk: servers_addrs.0,
        echo: servers_addrs.1,
        churn: servers_addrs.2,
        churn_fin,
        bulk_results: Mutex::new(rx),
        bulk_progress: progress,
        echo_last_peer: last_peer,
        churn_served: served,
    })
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        eprintln!("bench: cannot spawn a {name} thread: {e}");
    }
}

fn accept_loop(l: TcpListener, mut on_conn: impl FnMut(TcpStream)) {
    loop {
        match l.accept() {
            Ok((s, _)) => on_conn(s),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("bench: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Reads and discards until EOF (or an error, or a stall).
fn bulk_sink(mut s: TcpStream, progress: &AtomicU64) -> BulkResult {
    progress.store(0, Ordering::Relaxed);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; BULK_WRITE];
    let mut start: Option<Instant> = None;
    let mut last = Instant::now();
    let mut bytes = 0u64;
    let mut since: Option<Instant> = None;
    let error = loop {
        match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                last = Instant::now();
                since = None;
                if start.is_none() {
                    start = Some(last);
                } else {
                    bytes += n as u64;
                    progress.store(bytes, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if let Err(e) = on_timeout(
                    "bulk server read",
                    *since.get_or_insert_with(|| Instant::now() - IO_TIMEOUT),
                ) {
                    break Some(e.to_string());
                }
            }
            Err(e) => break Some(format!("bulk server read: {e}")),
        }
    };
    BulkResult {
        bytes,
        elapsed: start.map(|t| last - t).unwrap_or_default(),
        error,
    }
}

/// Echoes everything back until EOF.
fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// One of several threads accepting churn connections: read 1 byte, write 1
/// byte, then either wait for the client to close ([`Close::Rst`]) or close
/// at once ([`Close::Fin`]).
fn churn_server(l: TcpListener, served: &AtomicU64, close: Close) {
    let mut b = [0u8; 1];
    loop {
        let mut s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("bench: churn accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // A lost client must not hold this thread forever.
        let _ = s.set_read_timeout(Some(5 * IO_TIMEOUT));
        if !matches!(s.read(&mut b), Ok(1)) || s.write_all(&b).is_err() {
            continue;
        }
        served.fetch_add(1, Ordering::Relaxed);
        if close == Close::Rst {
            // Wait for the client's close (EOF or reset).
            let _ = s.read(&mut b);
        }
    }
}

// ---------------------------------------------------------------------------
// Client loads

/// One stream for `duration`, `BULK_WRITE`-byte writes; the server's measure.
pub fn bulk(netns: &str, src: IpAddr, servers: &Servers, duration: Duration) -> Result<BulkResult> {
    bulk_to(netns, src, servers.bulk, servers, duration)
}

/// [`bulk`] to `dst`, something that passes the stream on to the bulk
/// server (a relay).
pub fn bulk_to(
    netns: &str,
    src: IpAddr,
    dst: SocketAddr,
    servers: &Servers,
    duration: Duration,
) -> Result<BulkResult> {
    let rx = servers
        .bulk_results
        .lock()
        .map_err(|_| anyhow::anyhow!("bulk results lock poisoned"))?;
    while rx.try_recv().is_ok() {}
    let mut s = connect(netns, src, dst)?;
    let buf = vec![0x5au8; BULK_WRITE];
    let deadline = Instant::now() + duration;
    let mut writes = 0u64;
    loop {
        write_all_patient(&mut s, &buf, "bulk client write")
            .with_context(|| format!("after {writes} writes of {BULK_WRITE} bytes"))?;
        writes += 1;
        if stopped() {
            return Err(interrupted_error());
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let sent = writes * BULK_WRITE as u64;
    s.shutdown(Shutdown::Write)
        .context("bulk client shutdown(write)")?;
    // The server reports at EOF. A proxy that does not pass the half-close
    // on would leave it waiting: then close fully, and say so.
    let mut closed_fully = false;
    let wait_start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => {
                if !closed_fully && wait_start.elapsed() > Duration::from_secs(2) {
                    eprintln!(
                        "bench: note: bulk server saw EOF {:?} after the client's half-close",
                        wait_start.elapsed()
                    );
                }
                if let Some(e) = &r.error {
                    bail!(
                        "bulk server: {e} (received {} of {sent} bytes sent)",
                        r.bytes
                    );
                }
                return Ok(r);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("bulk server thread is gone"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stopped() {
            return Err(interrupted_error());
        }
        let waited = wait_start.elapsed();
        if !closed_fully && waited > Duration::from_secs(3) {
            eprintln!(
                "bench: WARNING: bulk server has not seen EOF 3 s after the client's \
                 shutdown(write) ({} of {sent} bytes received): closing the client socket",
                servers.bulk_progress.load(Ordering::Relaxed)
            );
            closed_fully = true;
            let _ = s.shutdown(Shutdown::Both);
        }
        if waited > STALL_LIMIT + Duration::from_secs(3) {
            bail!(
                "bulk server never saw the end of the stream: {} of {sent} bytes received \
                 {waited:?} after the client finished",
                servers.bulk_progress.load(Ordering::Relaxed)
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct RrResult {
    pub round_trips: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

/// Ping-pong of `RR_SIZE` bytes on one connection for `duration` or
/// `max_round_trips`, whichever comes first (after a warm-up).
pub fn request_response(
    netns: &str,
    src: IpAddr,
    dst: SocketAddr,
    duration: Duration,
    max_round_trips: usize,
) -> Result<RrResult> {
    let mut s = connect(netns, src, dst)?;
    let req = [0x42u8; RR_SIZE];
    let mut resp = [0u8; RR_SIZE];
    for _ in 0..RR_WARMUP {
        write_all_patient(&mut s, &req, "request write (warm-up)")?;
        read_exact_patient(&mut s, &mut resp, "response read (warm-up)")?;
    }
    let mut samples: Vec<u64> = Vec::with_capacity(max_round_trips);
    let deadline = Instant::now() + duration;
    while samples.len() < max_round_trips {
        let t0 = Instant::now();
        write_all_patient(&mut s, &req, "request write")
            .with_context(|| format!("round trip {}", samples.len()))?;
        read_exact_patient(&mut s, &mut resp, "response read")
            .with_context(|| format!("round trip {}", samples.len()))?;
        let t1 = Instant::now();
        samples.push((t1 - t0).as_nanos() as u64);
        if t1 >= deadline || stopped() {
            break;
        }
    }
    if stopped() {
        return Err(interrupted_error());
    }
    drop(s);
    if samples.is_empty() {
        bail!("no round trips completed");
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        let i = ((samples.len() - 1) as f64 * p).round() as usize;
        samples[i.min(samples.len() - 1)] as f64 / 1e3
    };
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1e3;
    Ok(RrResult {
        round_trips: samples.len(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        mean_us: mean,
        max_us: pct(1.0),
    })
}

#[derive(Debug, Clone)]
pub struct ChurnResult {
    pub connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl ChurnResult {
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.connections as f64 / secs
        }
    }
}

/// How churn connections end. Either way the client never does the active
/// close with a FIN, so it leaves no TIME_WAIT behind and a few seconds of
/// churn cannot exhaust the ephemeral ports of its one source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Close {
    /// The client closes with `SO_LINGER 0`: an RST right after the response.
    Rst,
    /// The server closes right after its response (like an HTTP/1.0 server);
    /// the client reads the EOF and then closes. TIME_WAIT stays with the
    /// server's socket, whose port is fixed.
    Fin,
}

/// `workers` threads (in `netns`) that each, for `duration`: connect from
/// `src`, send 1 byte, read 1 byte back, close (see [`Close`]).
pub fn churn(
    netns: &str,
    src: IpAddr,
    servers: &Servers,
    close: Close,
    duration: Duration,
    workers: usize,
) -> Result<ChurnResult> {
    let dst = match close {
        Close::Rst => servers.churn,
        Close::Fin => servers.churn_fin,
    };
    let src_sa = SockAddr::from(SocketAddr::new(src, 0));
    let dst_sa = SockAddr::from(dst);
    let start = Instant::now();
    let deadline = start + duration;
    let per_worker: Vec<io::Result<(u64, u64, Option<String>)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                let (src_sa, dst_sa) = (&src_sa, &dst_sa);
                sc.spawn(move || {
                    e2e::try_in_netns(netns, || churn_worker(src_sa, dst_sa, close, deadline))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("churn worker panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    if stopped() {
        return Err(interrupted_error());
    }
    let mut total = ChurnResult {
        connections: 0,
        errors: 0,
        first_error: None,
        elapsed,
    };
    for r in per_worker {
        let (ok, errs, first) = r.context("churn worker")?;
        total.connections += ok;
        total.errors += errs;
        if total.first_error.is_none() {
            total.first_error = first;
        }
    }
    Ok(total)
}

fn churn_worker(
    src: &SockAddr,
    dst: &SockAddr,
    close: Close,
    deadline: Instant,
) -> (u64, u64, Option<String>) {
    let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
    while Instant::now() < deadline && !stopped() {
        match churn_one(src, dst, close) {
            Ok(()) => ok += 1,
            Err(e) => {
                errors += 1;
                if first.is_none() {
                    first = Some(e.to_string());
                }
                // Don't spin on a persistent failure.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    (ok, errors, first)
}

fn churn_one(src: &SockAddr, dst: &SockAddr, close: Close) -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if close == Close::Rst {
        s.set_linger(Some(Duration::ZERO))?;
    }
    s.set_read_timeout(Some(5 * IO_TIMEOUT))?;
    s.set_write_timeout(Some(5 * IO_TIMEOUT))?;
    s.bind(src)?;
    s.connect(dst)?;
    let mut b = [7u8; 1];
    if (&s).write(&b)? != 1 {
        return Err(io::Error::new(ErrorKind::WriteZero, "churn write"));
    }
    if (&s).read(&mut b)? != 1 {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "churn: closed before the 1-byte response",
        ));
    }
    if close == Close::Fin {
        // Wait for the server's FIN so that our close is the passive one.
        if (&s).read(&mut b)? != 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "churn: more than the 1-byte response",
            ));
        }
    }
    Ok(())
    // Dropping `s` closes: an RST with SO_LINGER 0, else a FIN.
}
