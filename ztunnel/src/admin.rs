//! The operator-facing HTTP endpoints: admin (`/config_dump`) on 15000,
//! Prometheus metrics on 15020, readiness on 15021.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::debug;

use crate::proxy::ProxyInputs;
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

/// Serves `handler` over HTTP/1.1 on `listener` until the process ends.
pub fn serve(listener: TcpListener, handler: Handler) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = handler(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, "admin connection error");
                }
            });
        }
    });
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
