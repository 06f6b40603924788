//! HTTP inside one CONNECT stream: hyper serves HTTP/1.1 or HTTP/2 (told
//! apart by the HTTP/2 connection preface, or fixed by the chain's codec,
//! i.e. the service port's appProtocol), and every request goes through
//! [`handle`]:
//!
//! 1. authorization (RBAC filters of the chain) — denied: 403, and the
//!    request never reaches a backend;
//! 2. route selection — none: 404;
//! 3. fault injection (delay, abort);
//! 4. the route's action: direct response, redirect, or forward
//!    (see [`crate::forward`]);
//! 5. response header modifiers, then metrics and the access log once the
//!    response body is done (see [`crate::record`]).
//!
//! hyper answers malformed HTTP/1.1 with 400 and oversized headers with
//! 431; an HTTP/2 protocol error resets that stream or connection only.
//!
//! WebSocket (an HTTP/1.1 request with `Connection: upgrade` and
//! `Upgrade: websocket`, as Istio's `upgrade_configs` allow) goes through
//! the same steps with its upgrade headers kept, and upstream over HTTP/1.1
//! whatever the cluster speaks. When the backend answers 101, the client
//! gets the 101 and the connection's task then copies bytes both ways
//! between the two switched connections until either ends; any other answer
//! is passed back as usual. An `h2c` upgrade is not honoured: its headers
//! are dropped as hop-by-hop and the request goes on as a plain one, which
//! a server may always do (RFC 9110 7.8). Any other upgrade is refused
//! with 403 and the connection closed, as Envoy does. HTTP/2's extended
//! CONNECT is not supported.
//!
//! An HTTP/1.1 connection's task also drives the upstream connections its
//! requests use ([`crate::upstream::affinity`]), so a request crosses the
//! proxy without being handed to another task.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, LOCATION, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::model::CodecType;
use crate::config::runtime::{Action, ChainKind, HttpChain, Redirect, Route};
use crate::forward::{self, Outcome};
use crate::idle::{Activity, Watch, HEADER_READ_TIMEOUT};
use crate::metrics::{Metrics, PeerLabels};
use crate::rbac::{self, AuthzRequest, Decision};
use crate::record::{self, RequestInfo};
use crate::upstream::affinity::{self, Affinity};
use crate::upstream::Body;
use crate::Proxy;
use ztunnel::identity::Identity;

/// Who is on the other end of a CONNECT stream, and where it was going.
pub struct Downstream {
    pub identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst: SocketAddr,
    /// What the first bytes were sniffed as, if they were.
    pub protocol: Option<&'static str>,
    /// How metrics name the client.
    pub source_labels: PeerLabels,
    /// `src_ip` as an `x-forwarded-for` value.
    xff: Option<HeaderValue>,
    /// Requests started and finished on this connection (its header-read
    /// timeout, see [`crate::idle`]).
    pub activity: Activity,
    /// Where its requests are counted (held per connection, not cloned
    /// per request).
    pub metrics: Arc<Metrics>,
    /// The metric series its requests went to last.
    pub last_series: record::LastSeries,
}

impl Downstream {
    /// `peers`: the mesh's workloads, which may tell who the client is.
    pub fn new(
        peers: &ztunnel::state::Store,
        metrics: Arc<Metrics>,
        identity: Option<Identity>,
        src_ip: IpAddr,
        dst: SocketAddr,
        protocol: Option<&'static str>,
    ) -> Self {
        Downstream {
            source_labels: crate::peers::source_labels(peers, identity.as_ref(), src_ip),
            xff: HeaderValue::from_str(&src_ip.to_string()).ok(),
            identity,
            src_ip,
            dst,
            protocol,
            activity: Activity::default(),
            metrics,
            last_series: Default::default(),
        }
    }
}

/// What a connection's requests share. Each request holds one reference
/// to all of it: a reference is an atomic increment and decrement, which
/// on x86 cost more than most of what a request does with it.
struct Conn {
    proxy: Arc<Proxy>,
    ds: Arc<Downstream>,
    affinity: Affinity,
}

/// Serves HTTP on `io` until the client is done.
pub async fn serve_http<I>(proxy: Arc<Proxy>, io: I, ds: Arc<Downstream>, chain: Arc<HttpChain>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_buf = chain.max_header_bytes.max(8192);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(max_buf)
        // Kept per connection instead (`crate::idle`): hyper's costs a
        // timer per request.
        .header_read_timeout(None);
    builder
        .http2()
        .max_header_list_size(chain.max_header_bytes as u32)
        .max_concurrent_streams(1000)
        .timer(hyper_util::rt::TokioTimer::new());
    let (driver, new_upstreams) = tokio::sync::mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        proxy,
        ds,
        affinity: Affinity::new(driver),
    });
    let svc_conn = conn.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let conn = svc_conn.clone();
        // Boxed: a request's future is large (routing, retries, the
        // upstream exchange), and hyper spawns one task per HTTP/2 stream;
        // unboxed, each spawn, completion and drop copied all of it. The
        // box comes first, so the future is made in it, not on the stack
        // and then copied (some 4 KiB) in.
        let slot = Box::new_uninit();
        Box::into_pin(Box::write(slot, async move {
            let affinity = (req.version() < http::Version::HTTP_2).then_some(&conn.affinity);
            Ok::<_, Infallible>(handle(&conn.proxy, &conn.ds, req, affinity).await)
        }))
    });
    let io = TokioIo::new(io);
    // HTTP/1.1 with upgrades (WebSocket). hyper-util's upgradeable
    // connection always sniffs the protocol, so a chain fixed to HTTP/1.1
    // gets hyper's own HTTP/1.1 connection instead.
    match chain.codec {
        CodecType::Auto => {
            let c = builder.serve_connection_with_upgrades(io, svc);
            drive_connection(&conn.proxy, &conn.ds, new_upstreams, c, |c| {
                c.graceful_shutdown()
            })
            .await;
        }
        CodecType::Http1 => {
            let mut h1 = hyper::server::conn::http1::Builder::new();
            h1.max_buf_size(max_buf).header_read_timeout(None);
            let c = h1.serve_connection(io, svc).with_upgrades();
            drive_connection(&conn.proxy, &conn.ds, new_upstreams, c, |c| {
                c.graceful_shutdown()
            })
            .await;
        }
        CodecType::Http2 => {
            let builder = builder.http2_only();
            let c = builder.serve_connection(io, svc);
            drive_connection(&conn.proxy, &conn.ds, new_upstreams, c, |c| {
                c.graceful_shutdown()
            })
            .await;
        }
    }
    // A request switched protocols: hyper has handed the connection over.
    if let Some(tunnel) = conn.affinity.take_upgraded() {
        tunnel.await;
    }
}

/// Drives `conn` (hyper's connection future; `shutdown_conn` starts its
/// graceful shutdown) until it ends, with the upstream connections its
/// requests open (`new_upstreams`), the drain and the header-read timeout.
async fn drive_connection<C, E>(
    proxy: &Proxy,
    ds: &Downstream,
    new_upstreams: tokio::sync::mpsc::UnboundedReceiver<affinity::ConnFuture>,
    conn: C,
    mut shutdown_conn: impl FnMut(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let stopped = proxy.drain.stop.cancelled();
    tokio::pin!(stopped);
    let header_timer = tokio::time::sleep(HEADER_READ_TIMEOUT);
    tokio::pin!(header_timer);
    let mut watch = Watch::default();
    // Set once the connection is to end: the proxy drains, or no request
    // head came in time.
    let shutdown = AtomicBool::new(false);
    let mut draining = false;
    // This connection's own upstream connections are driven by this task.
    let res = affinity::drive(
        new_upstreams,
        |cx| {
            if shutdown.load(Relaxed) {
                return false;
            }
            if stopped.as_mut().poll(cx).is_ready() {
                shutdown.store(true, Relaxed);
            }
            while !shutdown.load(Relaxed) && header_timer.as_mut().poll(cx).is_ready() {
                if watch.idle(&ds.activity) {
                    tracing::debug!("no request head within the header-read timeout: closing");
                    shutdown.store(true, Relaxed);
                } else {
                    header_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + HEADER_READ_TIMEOUT);
                }
            }
            // Newly set: `main` is to start the shutdown.
            shutdown.load(Relaxed)
        },
        |cx| {
            if !draining && shutdown.load(Relaxed) {
                // Finish the request in progress (HTTP/1.1) or the open
                // streams (HTTP/2, after a GOAWAY), then close.
                draining = true;
                shutdown_conn(conn.as_mut());
            }
            conn.as_mut().poll(cx)
        },
    )
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}

/// Joins the client's switched connection to the backend's, copying both
/// ways until either ends; a failure ends the tunnel, logged at debug.
/// `rec` is written when it ends, with the bytes each way.
async fn tunnel(down: OnUpgrade, up: OnUpgrade, mut rec: record::TunnelRecord) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "protocol switch not completed");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_up, to_down)) => {
            rec.add(to_up, to_down);
            tracing::debug!(to_up, to_down, "upgraded connection closed")
        }
        Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
    }
}

fn local(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// A local reply to a gRPC client: HTTP 200, trailers-only, with the gRPC
/// status the HTTP status maps to (gRPC's "HTTP to gRPC status" table), as
/// gRPC clients do not read HTTP statuses.
fn grpc_local(status: StatusCode, message: &'static str) -> Response<Body> {
    let code = match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    let mut r = local(StatusCode::OK, "");
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, http::HeaderValue::from(code));
    if let Ok(v) = http::HeaderValue::from_str(message.trim_end()) {
        h.insert("grpc-message", v);
    }
    r
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `name` is one of the hop-by-hop headers [`strip_hop_by_hop`]
/// looks at.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether a `Connection` token is an option (`keep-alive`, `close`) and
/// not the name of a header to drop.
fn is_connection_option(token: &[u8]) -> bool {
    token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
}

/// Whether `Connection` may name headers: most say only `keep-alive` or
/// `close`, and need no parsing for names.
fn connection_nominates(h: &HeaderMap) -> bool {
    !h.get_all(CONNECTION)
        .iter()
        .all(|v| is_connection_option(v.as_bytes().trim_ascii()))
}

/// Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded: the ones the
/// spec names, and those a `Connection` header nominates.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names finds them (most messages have none, or
    // only `connection: keep-alive`): cheaper than a hashed lookup per
    // hop-by-hop name, and this runs twice per request.
    let present: Vec<HeaderName> = h.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    for name in present {
        if name == CONNECTION && connection_nominates(h) {
            let nominated: Vec<HeaderName> = h
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                // Connection options, not header names (a `keep-alive`
                // header goes anyway).
                .filter(|n| !is_connection_option(n.as_bytes()))
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect();
            for n in nominated {
                h.remove(n);
            }
        } else if name == TE && h.get_all(TE).iter().all(|v| v == "trailers") {
            // `te: trailers` is end to end (gRPC needs it).
            continue;
        }
        h.remove(name);
    }
}

/// The `Upgrade` value of an HTTP/1.1 WebSocket upgrade request (one
/// `Upgrade: websocket`, nominated by `Connection`; case-insensitive), the
/// only upgrade passed on, as Istio configures Envoy.
fn websocket_upgrade(version: http::Version, h: &HeaderMap) -> Option<HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let mut values = h.get_all(UPGRADE).iter();
    let v = values.next()?;
    let websocket =
        values.next().is_none() && v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket");
    (websocket && crate::upstream::is_upgrade(h)).then(|| v.clone())
}

/// Whether `h` asks to switch to a protocol other than WebSocket (which
/// [`websocket_upgrade`] lets through) and `h2c`. Envoy refuses those
/// with 403, as Istio configures no other upgrade, and closes the
/// connection: bytes of the other protocol may follow the request, and
/// read as HTTP they could smuggle requests past policy. An `h2c` upgrade
/// is only dropped (its headers are hop-by-hop), as Envoy does, since a
/// server may always ignore one.
fn refused_upgrade(h: &HeaderMap) -> bool {
    crate::upstream::is_upgrade(h)
        && !h
            .get_all(UPGRADE)
            .iter()
            .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// Envoy's answer to a refused upgrade: 403, empty, and the connection
/// closes after it.
fn upgrade_refused() -> Response<Body> {
    let mut r = local(StatusCode::FORBIDDEN, "");
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Puts back what [`strip_hop_by_hop`] took from an upgrade: only the
/// upgrade itself goes on in `Connection`.
fn keep_upgrade(h: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(v) = upgrade {
        h.insert(UPGRADE, v);
    }
}

/// What Envoy adds on the way upstream: the client's address appended to
/// `x-forwarded-for`, `x-forwarded-proto`, and an `x-request-id` when the
/// client sent none (for correlating logs across hops).
fn add_forwarding_headers(h: &mut HeaderMap, ds: &Downstream) {
    // One lookup per header (`entry`): these names are not standard ones,
    // so each lookup hashes the name.
    match h.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut e) => {
            let appended = e
                .get()
                .to_str()
                .ok()
                .and_then(|prev| HeaderValue::from_str(&format!("{prev}, {}", ds.src_ip)).ok());
            if let Some(v) = appended.or_else(|| ds.xff.clone()) {
                e.insert(v);
            }
        }
        Entry::Vacant(e) => {
            if let Some(v) = ds.xff.clone() {
                e.insert(v);
            }
        }
    }
    h.entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
    h.entry(X_REQUEST_ID).or_insert_with(request_id);
}

/// 128 random bits in hex.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for c in id.iter_mut().rev() {
        *c = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

fn protocol(req: &Request<Incoming>) -> &'static str {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"));
    if grpc {
        "grpc"
    } else {
        "http"
    }
}

// Not an `async fn`, nor are the functions it calls on the way
// upstream: an `async fn` holds a second copy of its arguments for as
// long as it runs, room every request's future carries; an `async move`
// block uses what it captured in place.
#[allow(clippy::manual_async_fn)]
pub fn handle<'a>(
    proxy: &'a Arc<Proxy>,
    ds: &'a Arc<Downstream>,
    mut req: Request<Incoming>,
    affinity: Option<&'a Affinity>,
) -> impl Future<Output = Response<Body>> + 'a {
    async move {
        ds.activity.start(req.version());
        let protocol = protocol(&req);
        // Taken now: forwarding does not carry the request's extensions on.
        let upgrade = websocket_upgrade(req.version(), req.headers())
            .map(|v| (v, hyper::upgrade::on(&mut req)));
        let (parts, body) = req.into_parts();
        let mut info = RequestInfo {
            start: Instant::now(),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            authority: crate::route::request_host(&parts),
            protocol,
            downstream: ds.clone(),
            route: None,
            cluster: None,
            endpoint: None,
            flags: "-",
            attempts: 0,
            request_bytes: None,
        };
        let (route, resp) = route_and_run(
            proxy,
            ds,
            parts,
            body,
            &mut info,
            affinity,
            upgrade.as_ref().map(|u| &u.0),
        )
        .await;
        // The two sides of a protocol switch, once the backend agreed to it.
        let mut switched = None;
        let mut resp = match resp {
            Outcome::Upstream(mut r) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
                match upgrade {
                    Some((_, down)) => {
                        switched = Some((down, hyper::upgrade::on(&mut r)));
                        let (mut rp, b) = r.into_parts();
                        let value = rp.headers.get(UPGRADE).cloned();
                        strip_hop_by_hop(&mut rp.headers);
                        keep_upgrade(&mut rp.headers, value);
                        Response::from_parts(rp, b)
                    }
                    // A switch the client did not ask for: it could not follow.
                    None => {
                        if info.flags == "-" {
                            info.flags = "UPE";
                        }
                        local(
                            StatusCode::BAD_GATEWAY,
                            "upstream switched protocols unasked\n",
                        )
                    }
                }
            }
            Outcome::Upstream(mut r) => {
                strip_hop_by_hop(r.headers_mut());
                r
            }
            Outcome::Ready(r) => r,
            Outcome::Local(status, flag, body) => {
                if info.flags == "-" {
                    info.flags = flag;
                }
                if info.protocol == "grpc" {
                    grpc_local(status, body)
                } else {
                    local(status, body)
                }
            }
        };
        if let Some(r) = &route {
            r.response_headers.apply(resp.headers_mut());
        }
        info.route = route;
        let status = resp.status();
        // A trailers-only gRPC answer carries its status in the head.
        let grpc = match info.protocol {
            "grpc" => resp
                .headers()
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        };
        let (rp, b) = resp.into_parts();
        if let Some((down, up)) = switched {
            // Recorded when the tunnel ends, with its bytes, as Envoy records
            // an upgraded stream.
            let rec = record::for_tunnel(info, status);
            let t = Box::pin(tunnel(down, up, rec));
            match affinity {
                Some(a) => a.set_upgraded(t),
                None => {
                    proxy.drain.connections.spawn(t);
                }
            }
            return Response::from_parts(rp, b);
        }
        let b = record::attach(info, status, grpc, b);
        Response::from_parts(rp, b)
    }
}

// Not an `async fn`, for the reason [`crate::serve::handle`] gives.
#[allow(clippy::manual_async_fn)]
fn route_and_run<'a>(
    proxy: &'a Arc<Proxy>,
    ds: &'a Downstream,
    mut parts: http::request::Parts,
    body: Incoming,
    info: &'a mut RequestInfo,
    affinity: Option<&'a Affinity>,
    upgrade: Option<&'a HeaderValue>,
) -> impl Future<Output = (Option<Arc<Route>>, Outcome)> + 'a {
    async move {
        // Held for the request, which borrows its chain from it.
        let cfg = proxy.store.get();
        let chain = match cfg.chain_for_protocol(ds.dst, ds.protocol).map(|c| &c.kind) {
            Some(ChainKind::Http(h)) => h,
            _ => {
                return (
                    None,
                    Outcome::Local(
                        StatusCode::NOT_FOUND,
                        "NR",
                        "no HTTP listener for this destination\n",
                    ),
                )
            }
        };
        if let Some(outcome) = normalize_path(&chain.path, &mut parts) {
            return (None, outcome);
        }
        let authz = AuthzRequest {
            source: ds.identity.as_ref(),
            destination_port: ds.dst.port(),
            http: Some((&parts.method, &parts.uri, &parts.headers)),
        };
        if let Decision::Deny(why) = rbac::authorize(&chain.rbac, &authz) {
            tracing::debug!(reason = %why, "request denied");
            return (
                None,
                Outcome::Local(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied\n"),
            );
        }
        let Some(route) = crate::route::select(&chain.routes, &info.authority, &parts) else {
            return (
                None,
                Outcome::Local(StatusCode::NOT_FOUND, "NR", "no route matched\n"),
            );
        };
        if upgrade.is_none() && refused_upgrade(&parts.headers) {
            return (Some(route), Outcome::Ready(upgrade_refused()));
        }
        strip_hop_by_hop(&mut parts.headers);
        if let Some(v) = upgrade {
            keep_upgrade(&mut parts.headers, Some(v.clone()));
        }
        add_forwarding_headers(&mut parts.headers, ds);
        if let Some(fault) = &route.fault {
            if let Some((d, p)) = fault.delay {
                if fastrand::f64() < p {
                    info.flags = "DI";
                    tokio::time::sleep(d).await;
                }
            }
            if let Some((s, p)) = fault.abort {
                if fastrand::f64() < p {
                    return (Some(route), Outcome::Local(s, "FI", "fault filter abort\n"));
                }
            }
        }
        let outcome = match &route.action {
            Action::Direct { status, body } => {
                let mut r = local(*status, "");
                *r.body_mut() = Full::new(Bytes::from(body.clone()))
                    .map_err(|never| match never {})
                    .boxed_unsync();
                return (Some(route.clone()), Outcome::Ready(r));
            }
            Action::Redirect(r) => return (Some(route.clone()), redirect(r, &route, &parts)),
            Action::Forward(f) => {
                forward::forward(&proxy.upstream, &route, f, parts, body, info, affinity).await
            }
        };
        (Some(route), outcome)
    }
}

/// Applies the chain's path normalization to the request, which policy,
/// routing and the backend then all see; or the answer when the path is
/// refused (400) or the client is sent to the normalized one (307).
fn normalize_path(
    n: &crate::path::PathNormalization,
    parts: &mut http::request::Parts,
) -> Option<Outcome> {
    use crate::path::Normalized;
    use std::borrow::Cow;
    let pq = parts.uri.path_and_query().filter(|_| !n.is_noop())?;
    let new = match n.apply(pq.as_str()) {
        Normalized::Forward(Cow::Borrowed(_)) => return None,
        Normalized::Forward(Cow::Owned(p)) => p,
        Normalized::Reject(why) => {
            tracing::debug!(path = %pq, reason = why, "request path refused");
            return Some(Outcome::Local(
                StatusCode::BAD_REQUEST,
                "-",
                "Bad Request\n",
            ));
        }
        Normalized::Redirect(location) => {
            let mut resp = local(StatusCode::TEMPORARY_REDIRECT, "");
            if let Ok(v) = http::HeaderValue::from_str(&location) {
                resp.headers_mut().insert(LOCATION, v);
            }
            return Some(Outcome::Ready(resp));
        }
    };
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = new.parse().ok();
    match http::Uri::from_parts(uri) {
        Ok(u) if u.path_and_query().is_some() => {
            parts.uri = u;
            None
        }
        // Only valid path bytes are ever produced; refuse rather than guess.
        _ => Some(Outcome::Local(
            StatusCode::BAD_REQUEST,
            "-",
            "Bad Request\n",
        )),
    }
}

fn redirect(r: &Redirect, route: &Route, parts: &http::request::Parts) -> Outcome {
    let host_header = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let (orig_host, orig_port) = match host_header.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => {
            (h.to_string(), Some(p.to_string()))
        }
        _ => (host_header.clone(), None),
    };
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let host = r.host.clone().unwrap_or(orig_host);
    let port = match (r.port, &r.host) {
        (Some(p), _) => Some(p.to_string()),
        (None, Some(_)) => None,
        (None, None) => orig_port,
    };
    let path = match (&r.path, &r.prefix_rewrite, &route.path) {
        (Some(p), _, _) => p.clone(),
        (None, Some(new), crate::config::runtime::PathMatch::Prefix(old)) => {
            let rest = parts.uri.path().strip_prefix(old.as_str()).unwrap_or("");
            let p = format!("{new}{rest}").replace("//", "/");
            if p.is_empty() {
                "/".into()
            } else {
                p
            }
        }
        _ => parts.uri.path().to_string(),
    };
    let mut location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    };
    if let (false, Some(q)) = (r.strip_query, parts.uri.query()) {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = local(r.status, "");
    match http::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
            Outcome::Ready(resp)
        }
        Err(_) => Outcome::Local(StatusCode::BAD_REQUEST, "-", "cannot build redirect\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "keep-alive, x-secret"),
            ("connection", "close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host", "x-kept"]);
    }

    #[test]
    fn te_trailers_and_end_to_end_headers_stay() {
        let mut h = headers(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "te"]);
        let mut h = headers(&[("connection", "keep-alive"), ("x-a", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-a"]);
    }

    #[test]
    fn websocket_upgrades_keep_only_the_upgrade() {
        use http::Version;
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade, x-secret"),
            ("upgrade", "WebSocket"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "k"),
        ]);
        let v = websocket_upgrade(Version::HTTP_11, &h).unwrap();
        assert_eq!(v, "WebSocket");
        strip_hop_by_hop(&mut h);
        keep_upgrade(&mut h, Some(v));
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "WebSocket");

        let ws = |pairs: &[(&str, &str)], v| websocket_upgrade(v, &headers(pairs)).is_some();
        let up = [("connection", "upgrade"), ("upgrade", "websocket")];
        assert!(ws(&up, Version::HTTP_11));
        assert!(!ws(&up, Version::HTTP_10));
        // Not nominated by `Connection`, or another protocol: not passed on.
        assert!(!ws(&[("upgrade", "websocket")], Version::HTTP_11));
        assert!(!ws(
            &[("connection", "keep-alive"), ("upgrade", "websocket")],
            Version::HTTP_11
        ));
        assert!(!ws(
            &[("connection", "upgrade"), ("upgrade", "h2c")],
            Version::HTTP_11
        ));
        assert!(!ws(
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("upgrade", "h2c")
            ],
            Version::HTTP_11
        ));
    }

    #[test]
    fn forwarding_headers_are_added_or_appended() {
        let ds = Downstream::new(
            &ztunnel::state::Store::new(),
            Arc::new(Metrics::new()),
            None,
            "10.0.0.7".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
            None,
        );
        let mut h = headers(&[]);
        add_forwarding_headers(&mut h, &ds);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_REQUEST_ID].len(), 32);
        let mut h = headers(&[
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "abc"),
        ]);
        add_forwarding_headers(&mut h, &ds);
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.1, 10.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_REQUEST_ID], "abc");
    }
}
