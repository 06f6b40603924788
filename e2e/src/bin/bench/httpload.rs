//! HTTP load at a fixed concurrency, with hyper (client and server), on
//! tokio runtimes whose threads live in a node's network namespace.
//!
//! HTTP/1.1: one connection per concurrent request loop. HTTP/2 (prior
//! knowledge, h2c): a few connections, several concurrent streams each.
//! Each loop sends `GET /` and reads the whole answer; latencies are
//! recorded per request after a warm-up.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;

/// The answer body: small, as in a typical API call.
const BODY: &[u8] = b"hello from the benchmark server\n";

/// A runtime whose worker threads are in `netns`, so the sockets its tasks
/// open are too.
pub fn runtime_in(netns: &str, threads: usize) -> Result<Runtime> {
    e2e::try_in_netns(netns, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    })?
    .context("building a runtime")
}

/// Serves HTTP/1.1 and h2c on `addr` on `rt` until the runtime is dropped.
pub fn start_server(rt: &Runtime, addr: SocketAddr) -> Result<()> {
    let l = rt
        .block_on(rt.spawn(async move { TcpListener::bind(addr).await }))
        .context("server task")?
        .with_context(|| format!("binding the HTTP server on {addr}"))?;
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let body = if req.uri().path() == FORWARDED_PROBE {
                        Bytes::from(forwarded(req.headers()))
                    } else {
                        Bytes::from_static(BODY)
                    };
                    Ok::<_, Infallible>(http::Response::new(Full::new(body)))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// The path the server answers with what a proxy added to the request
/// ([`forwarded`]) instead of [`BODY`].
const FORWARDED_PROBE: &str = "/forwarded-headers";

/// What a proxy in front told the server about the request: its `Host`,
/// `x-forwarded-for` and `x-forwarded-proto`, and its `x-request-id`
/// (made by the proxy, a fresh random one each time, unless the client
/// sent [`CLIENT_REQUEST_ID`]).
fn forwarded(h: &http::HeaderMap) -> String {
    let value = |name: &str| {
        h.get(name).map_or("none".into(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        })
    };
    let id = match h.get("x-request-id") {
        Some(v) if v == CLIENT_REQUEST_ID => "the client's".to_string(),
        Some(v) => format!("one of {} characters", v.len()),
        None => "none".to_string(),
    };
    format!(
        "host {}, x-forwarded-for {}, x-forwarded-proto {}, x-request-id {id}",
        value("host"),
        value("x-forwarded-for"),
        value("x-forwarded-proto"),
    )
}

const CLIENT_REQUEST_ID: &str = "from-the-client";

/// Asks the server, through the proxy at `dst`, what the proxy told it
/// about two HTTP/1.1 requests from `src` (see [`forwarded`]): one with
/// only `Host`, and one whose client already set `x-forwarded-for`,
/// `x-forwarded-proto` and `x-request-id`.
pub fn forwarded_by(rt: &Runtime, src: IpAddr, dst: SocketAddr, host: &str) -> Result<String> {
    let host = host.to_string();
    // Spawned: the runtime's threads are in the client's network namespace,
    // the caller's is not.
    let asked = rt.spawn(async move {
        let s = connect(src, dst).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let mut reports = Vec::new();
        for client_set in [false, true] {
            let mut req = http::Request::builder()
                .uri(FORWARDED_PROBE)
                .header("host", &host);
            if client_set {
                req = req
                    .header("x-forwarded-for", "192.0.2.1")
                    .header("x-forwarded-proto", "https")
                    .header("x-request-id", CLIENT_REQUEST_ID);
            }
            let resp = send.send_request(req.body(Empty::<Bytes>::new())?).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::ensure!(status == 200, "status {status}");
            reports.push(String::from_utf8_lossy(&body).into_owned());
        }
        Ok::<_, anyhow::Error>(format!(
            "{}; with the client's own: {}",
            reports[0], reports[1]
        ))
    });
    rt.block_on(asked)
        .context("probe task")?
        .with_context(|| format!("asking the server what {dst} forwards"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        }
    }
}

/// What one or more measurements of a target produced.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// Latencies (µs) of the requests that ended after the warm-up.
    pub lat: Vec<u32>,
    pub errors: u64,
    /// Time measured (warm-up excluded).
    pub measured: Duration,
    /// Requests answered, warm-up included: what the proxy's CPU time over
    /// the whole measurement is divided by.
    pub completed: u64,
}

impl Samples {
    /// Adds another round's samples of the same target.
    pub fn merge(&mut self, other: Samples) {
        self.lat.extend(other.lat);
        self.errors += other.errors;
        self.measured += other.measured;
        self.completed += other.completed;
    }

    pub fn summary(&self) -> LoadResult {
        let mut lat = self.lat.clone();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                0.0
            } else {
                f64::from(lat[((lat.len() - 1) as f64 * p).round() as usize])
            }
        };
        LoadResult {
            requests: lat.len() as u64,
            errors: self.errors,
            rps: lat.len() as f64 / self.measured.as_secs_f64().max(1e-9),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

async fn connect(src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    sock.set_nodelay(true)?;
    tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .with_context(|| format!("connect {src} -> {dst} timed out"))?
        .with_context(|| format!("connect {src} -> {dst}"))
}

/// HTTP/1.1: origin form and a `Host` header; HTTP/2: the host in
/// `:authority` only (a `Host` header as well is refused by some servers).
fn request(host: &str, h2: bool) -> http::Request<Empty<Bytes>> {
    let b = if h2 {
        http::Request::builder().uri(format!("http://{host}/"))
    } else {
        http::Request::builder().uri("/").header("host", host)
    };
    b.body(Empty::new()).expect("static request")
}

/// Request loops until `until`; latencies in µs of requests that ended
/// after `record_from`.
async fn h1_loop(
    src: IpAddr,
    dst: SocketAddr,
    host: String,
    record_from: Instant,
    until: Instant,
) -> Result<Samples> {
    let s = connect(src, dst).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let (mut lat, mut errors, mut completed) = (Vec::with_capacity(100_000), 0, 0);
    while Instant::now() < until && !crate::load::stopped() {
        let t = Instant::now();
        let ok = match send.send_request(request(&host, false)).await {
            Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if !ok {
            errors += 1;
            // A broken connection is replaced.
            let s = connect(src, dst).await?;
            let (s2, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            tokio::spawn(conn);
            send = s2;
            continue;
        }
        completed += 1;
        if t >= record_from {
            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
    }
    Ok(Samples {
        lat,
        errors,
        measured: Duration::ZERO,
        completed,
    })
}

async fn h2_stream_loop(
    mut send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    host: String,
    record_from: Instant,
    until: Instant,
) -> Samples {
    let (mut lat, mut errors, mut completed) = (Vec::with_capacity(100_000), 0, 0);
    while Instant::now() < until && !crate::load::stopped() {
        let t = Instant::now();
        let ok = match send.send_request(request(&host, true)).await {
            Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if !ok {
            errors += 1;
            if send.ready().await.is_err() {
                // The connection is gone; the caller opens another.
                break;
            }
            continue;
        }
        completed += 1;
        if t >= record_from {
            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
    }
    Samples {
        lat,
        errors,
        measured: Duration::ZERO,
        completed,
    }
}

/// One HTTP/2 connection carrying `streams` request loops; reopened if the
/// server closes it.
async fn h2_connection(
    src: IpAddr,
    dst: SocketAddr,
    host: String,
    streams: usize,
    record_from: Instant,
    until: Instant,
) -> Result<Samples> {
    let mut all = Samples::default();
    while Instant::now() < until && !crate::load::stopped() {
        let s = connect(src, dst).await?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let loops: Vec<_> = (0..streams)
            .map(|_| {
                tokio::spawn(h2_stream_loop(
                    send.clone(),
                    host.clone(),
                    record_from,
                    until,
                ))
            })
            .collect();
        for l in loops {
            all.merge(l.await.context("stream task panicked")?);
        }
    }
    Ok(all)
}

/// One measurement: `concurrency` request loops from `src` to `dst`.
#[derive(Clone, Debug)]
pub struct Load {
    pub proto: Proto,
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub host: String,
    pub concurrency: usize,
    pub h2_connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Runs `load` on `rt` for its warm-up plus its duration.
pub fn run(rt: &Runtime, load: &Load) -> Result<Samples> {
    let Load {
        proto,
        src,
        dst,
        ref host,
        concurrency,
        h2_connections,
        warmup,
        duration,
    } = *load;
    let host = host.to_string();
    let fut = async move {
        let record_from = Instant::now() + warmup;
        let until = record_from + duration;
        let mut tasks = Vec::new();
        match proto {
            Proto::Http1 => {
                for _ in 0..concurrency {
                    tasks.push(tokio::spawn(h1_loop(
                        src,
                        dst,
                        host.clone(),
                        record_from,
                        until,
                    )));
                }
            }
            Proto::Http2 => {
                let conns = h2_connections.clamp(1, concurrency.max(1));
                for c in 0..conns {
                    let streams = concurrency / conns + usize::from(c < concurrency % conns);
                    tasks.push(tokio::spawn(h2_connection(
                        src,
                        dst,
                        host.clone(),
                        streams,
                        record_from,
                        until,
                    )));
                }
            }
        }
        let mut all = Samples::default();
        for t in tasks {
            all.merge(t.await.context("load task panicked")??);
        }
        Ok::<_, anyhow::Error>(all)
    };
    let mut samples = rt.block_on(rt.spawn(fut)).context("load task")??;
    if crate::load::stopped() {
        return Err(crate::load::interrupted_error());
    }
    samples.measured = duration;
    Ok(samples)
}
