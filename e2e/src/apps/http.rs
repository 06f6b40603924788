//! The sample HTTP server (HTTP/1.1 and h2c on one port). Every answer
//! names the server (`x-served-by` header and the first body line) and
//! echoes the request: path, method and headers, one per line, so a test
//! can see what a waypoint added, removed or rewrote. Special paths:
//!
//! - `.../delay/<ms>` (e.g. `/delay/500`, `/slow/delay/500`): answers
//!   after `<ms>` milliseconds (at most 60 s);
//! - `/flaky/<key>`: 503 the first time a `<key>` is asked for, 200 after,
//!   so a retry turns it into a 200.
//!
//! The server records every path it was asked for (with the query), so a
//! test can assert a request never reached it.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Background;
use crate::cluster::{App, SERVED_BY};
use crate::process::lock;

#[derive(Debug, Default)]
struct Seen {
    paths: Mutex<Vec<String>>,
    flaky: Mutex<HashSet<String>>,
}

/// A running sample HTTP server; dropping it stops it.
#[derive(Debug)]
pub struct HttpServer {
    served_by: String,
    seen: Arc<Seen>,
    bg: Background,
}

impl HttpServer {
    /// Serves on `[::]:<port>` in `app`'s namespace, named after the app
    /// (`x-served-by: <namespace>/<name>`).
    pub fn start_for(app: &App, port: u16) -> Result<HttpServer> {
        let who = format!("{} on {} ({})", app.key(), app.node(), app.ip());
        HttpServer::start(
            app.pod.netns(),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            &app.key(),
            &who,
        )
    }

    /// Serves on `addr` in `netns`; `served_by` goes in the header,
    /// `who` in the first body line (`hello from <who>; you asked for <path>`).
    pub fn start(netns: &str, addr: SocketAddr, served_by: &str, who: &str) -> Result<HttpServer> {
        let seen = Arc::new(Seen::default());
        let (s, w, sn) = (served_by.to_string(), who.to_string(), seen.clone());
        let bg = Background::start(netns, addr, "http", move |l, mut stop| async move {
            loop {
                let conn = tokio::select! {
                    c = l.accept() => c,
                    _ = &mut stop => return,
                };
                let Ok((stream, _)) = conn else { continue };
                let (s, w, sn) = (s.clone(), w.clone(), sn.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (s, w, sn) = (s.clone(), w.clone(), sn.clone());
                        async move { Ok::<_, Infallible>(answer(req, &s, &w, &sn).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })?;
        Ok(HttpServer {
            served_by: served_by.to_string(),
            seen,
            bg,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.bg.addr()
    }

    pub fn served_by(&self) -> &str {
        &self.served_by
    }

    /// Every path (with query) asked for so far, in order.
    pub fn paths(&self) -> Vec<String> {
        lock(&self.seen.paths).clone()
    }

    /// How many requests asked for exactly `path`.
    pub fn hits(&self, path: &str) -> usize {
        lock(&self.seen.paths).iter().filter(|p| *p == path).count()
    }
}

async fn answer(
    req: http::Request<Incoming>,
    served_by: &str,
    who: &str,
    seen: &Seen,
) -> http::Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    lock(&seen.paths).push(path.clone());
    let bare = req.uri().path();
    let mut status = 200;
    if let Some((_, ms)) = bare.rsplit_once("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0).min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(key) = bare.strip_prefix("/flaky/") {
        if lock(&seen.flaky).insert(key.to_string()) {
            status = 503;
        }
    }
    let mut body = format!("hello from {who}; you asked for {path}\n");
    let _ = writeln!(body, "method: {}", req.method());
    for (k, v) in req.headers() {
        let _ = writeln!(
            body,
            "header {k}: {}",
            String::from_utf8_lossy(v.as_bytes())
        );
    }
    if status == 503 {
        body.insert_str(0, "flaky: failing the first try\n");
    }
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(v) = http::HeaderValue::from_str(served_by) {
        resp.headers_mut().insert(SERVED_BY, v);
    }
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// The request headers echoed in a sample server's body, lower-cased
/// names: `[("host", "x"), ...]`.
pub fn echoed_headers(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.strip_prefix("header "))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The path a sample server says it was asked for.
pub fn echoed_path(body: &str) -> Option<&str> {
    body.lines()
        .find_map(|l| l.split_once("; you asked for ").map(|x| x.1.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_parsing() {
        let b = "hello from a/b on n (1.2.3.4); you asked for /x?y=1\nmethod: GET\nheader host: h\nheader x-a: 1: 2\n";
        assert_eq!(echoed_path(b), Some("/x?y=1"));
        assert_eq!(
            echoed_headers(b),
            vec![("host".into(), "h".into()), ("x-a".into(), "1: 2".into())]
        );
    }
}
