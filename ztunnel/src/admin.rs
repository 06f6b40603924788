//! The operator-facing HTTP endpoints: admin (`/config_dump`) on 15000,
//! Prometheus metrics on 15020, readiness on 15021.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::proxy::{accept_loop, Drain, ProxyInputs};
use crate::state::file::LoadStatus;

pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))
}

/// How much of the process one admin listener may take: these ports face
/// whoever can reach them, so a stuck or malicious client must not hold
/// connections (or file descriptors) for ever.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A client has this long to send each request's headers (including
    /// the wait for the next request on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// Connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 32,
        }
    }
}

/// Serves `handler` over HTTP/1.1 on `listener` until the process ends,
/// with the default [`Limits`].
pub fn serve(listener: TcpListener, handler: Handler) {
    serve_with(listener, handler, Limits::default());
}

/// [`serve`] with explicit limits.
pub fn serve_with(listener: TcpListener, handler: Handler, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Admin endpoints outlive the data-plane drain (readiness must keep
    // answering "not ready"), so they get a drain of their own that never
    // stops; `accept_loop` gives the back-off on accept errors.
    let drain = Drain::default();
    tokio::spawn(accept_loop(
        listener,
        "admin",
        drain,
        move |stream, peer| {
            let handler = handler.clone();
            // Taken at accept time, so that a full server refuses at once.
            let slot = slots.clone().try_acquire_owned();
            async move {
                let Ok(_slot) = slot else {
                    debug!(%peer, "too many admin connections; closing");
                    return;
                };
                let svc = service_fn(move |req| {
                    let resp = handler(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, error = %e, "admin connection error");
                }
            }
        },
    ));
}

pub fn admin_handler(pi: Arc<ProxyInputs>, state_status: LoadStatus) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/config_dump" => {
            let snap = pi.store.snapshot();
            let body = json!({
                "node": pi.node,
                "stateVersion": pi.store.version(),
                "workloads": snap.workloads.values().collect::<Vec<_>>(),
                "services": snap.services.values().collect::<Vec<_>>(),
                "policies": snap.policies.values().collect::<Vec<_>>(),
                "certificates": pi.secrets.dump(),
                "localStateError": *state_status.lock().expect("status lock"),
                "openInboundConnections": pi.tracker.len(),
                "hbonePoolConnections": pi.pool.connections(),
            });
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        "/" => reply(StatusCode::OK, "text/plain", "endpoints: /config_dump\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

pub fn metrics_handler(pi: Arc<ProxyInputs>) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/metrics" | "/stats/prometheus" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            pi.metrics.encode(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

pub fn readiness_handler(ready: Arc<AtomicBool>) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/healthz/ready" if ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ready\n")
        }
        "/healthz/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}
