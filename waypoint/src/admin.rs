//! The operator-facing endpoints, on the same small hyper server ztunnel
//! uses: `/config_dump` (the configuration in force, the last rejected
//! one's error, endpoint health and the waypoint's certificate),
//! `/metrics` (also `/stats/prometheus`) and `/healthz/ready`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use ztunnel::admin::Handler;

use crate::Proxy;

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

pub fn handler(proxy: Arc<Proxy>, ready: Arc<AtomicBool>) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/config_dump" => {
            let cfg = proxy.store.get();
            let dump = json!({
                "identity": proxy.identity.to_string(),
                "config": cfg.source,
                "lastConfigError": proxy.store.last_error(),
                "endpoints": proxy.upstream.balancer.dump(),
                "certificates": proxy.secrets.dump(),
            });
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        "/metrics" | "/stats/prometheus" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            proxy.metrics.encode(),
        ),
        "/healthz/ready" if ready.load(Ordering::Acquire) && proxy.store.synced() => {
            reply(StatusCode::OK, "text/plain", "ready\n")
        }
        "/healthz/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}
