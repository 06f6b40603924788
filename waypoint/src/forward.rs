//! Forwarding a routed request: choose the weighted cluster, rewrite path
//! and host, then attempt, retrying per the route's policy within its
//! timeout, and mirror a copy where asked.
//!
//! The request body always streams; when a retry or a mirror may need to
//! send it again, it goes through a [`Replay`], which keeps a copy of its
//! first [`REPLAY_LIMIT`] bytes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

use crate::config::runtime::{ClusterConfig, Forward, PathMatch, Retry, Route, WeightedCluster};
use crate::record::RequestInfo;
use crate::replay::{Replay, REPLAY_LIMIT};
use crate::request_end::{self, RequestEnd};
use crate::upstream::affinity::Affinity;
use crate::upstream::{Attempt, Body, SendError, Upstream};

/// What forwarding produced: an upstream response, or a status to answer
/// locally with an Envoy-style response flag.
pub enum Outcome {
    /// The backend's response (its body limited by the route timeout).
    Upstream(Response<Body>),
    /// A response made here (direct response, redirect).
    Ready(Response<Body>),
    Local(StatusCode, &'static str, &'static str),
}

fn pick_cluster(f: &Forward) -> &WeightedCluster {
    let mut n = fastrand::u32(..f.total_weight);
    for c in &f.clusters {
        if n < c.weight {
            return c;
        }
        n -= c.weight;
    }
    // Unreachable: weights add up to total_weight (checked at validation).
    &f.clusters[0]
}

/// The path after the route's rewrites.
pub fn rewrite_path(route: &Route, f: &Forward, path: &str) -> String {
    if let (Some(new), PathMatch::Prefix(old)) = (&f.prefix_rewrite, &route.path) {
        if let Some(rest) = path.strip_prefix(old.as_str()) {
            let mut p = format!("{new}{rest}");
            if p.starts_with("//") {
                p.remove(0);
            }
            if p.is_empty() {
                p.push('/');
            }
            return p;
        }
    }
    if let Some((re, sub)) = &f.regex_rewrite {
        return re.replace_all(path, sub.as_str()).into_owned();
    }
    path.to_string()
}

enum ReqBody {
    Streaming(Body),
    /// The first attempt's body, and the way to the others.
    Resendable(Resend, Body),
}

fn retriable_status(r: &Retry, s: StatusCode) -> bool {
    let code = s.as_u16();
    (r.on_5xx && code >= 500)
        || (r.on_gateway_error && matches!(code, 502..=504))
        || r.status_codes.contains(&code)
}

fn retriable_error(r: &Retry, e: &SendError) -> bool {
    match e {
        SendError::NoEndpoint(_) => false,
        SendError::Connect(..) => r.on_connect_failure || r.on_5xx || r.on_gateway_error,
        SendError::Reset(..) | SendError::Timeout => r.on_reset || r.on_5xx || r.on_gateway_error,
    }
}

/// Fully jittered exponential backoff, as Envoy does it.
fn backoff(r: &Retry, retry: u32) -> Duration {
    let cap = r
        .base_interval
        .saturating_mul(1u32 << retry.min(16))
        .min(r.max_interval);
    cap.mul_f64(fastrand::f64())
}

// Not an `async fn`, for the reason [`crate::serve::handle`] gives.
#[allow(clippy::manual_async_fn)]
pub fn forward<'a>(
    upstream: &'a Arc<Upstream>,
    route: &'a Route,
    f: &'a Forward,
    mut parts: Parts,
    body: Incoming,
    info: &'a mut RequestInfo,
    affinity: Option<&'a Affinity>,
) -> impl Future<Output = Outcome> + 'a {
    async move {
        let picked = pick_cluster(f);
        let cluster = &*picked.cluster;
        info.cluster = Some(picked.cluster.clone());
        // Upstream requests carry the origin form (path and query; the
        // upstream module adds what HTTP/2 or a pooled client needs) and the
        // host in `Host`: the rewritten one, else the request's.
        let rewritten = (f.prefix_rewrite.is_some() || f.regex_rewrite.is_some())
            .then(|| rewrite_path(route, f, parts.uri.path()));
        let pq = match (rewritten, parts.uri.query()) {
            (Some(p), Some(q)) => PathAndQuery::try_from(format!("{p}?{q}")),
            (Some(p), None) => PathAndQuery::try_from(p),
            (None, _) => Ok(parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))),
        };
        let host = match &f.host_rewrite {
            Some(h) => Some(HeaderValue::from_str(h).map_err(|_| ())),
            None => parts
                .uri
                .authority()
                .map(|a| HeaderValue::from_str(a.as_str()).map_err(|_| ())),
        };
        let host_ok = match host {
            Some(Ok(v)) => {
                parts.headers.insert(http::header::HOST, v);
                true
            }
            Some(Err(())) => false,
            // The client's own `Host`, if it makes an authority.
            None => parts
                .headers
                .get(http::header::HOST)
                .is_none_or(|h| Authority::try_from(h.as_bytes()).is_ok()),
        };
        match pq {
            Ok(pq) if host_ok => parts.uri = Uri::from(pq),
            _ => return Outcome::Local(StatusCode::BAD_REQUEST, "-", "bad request target\n"),
        }
        // The backend's header changes, then the route's (Envoy's order).
        picked.request_headers.apply(&mut parts.headers);
        route.request_headers.apply(&mut parts.headers);
        let downstream_h2 = parts.version == http::Version::HTTP_2;

        let needs_copy =
            f.retry.as_ref().is_some_and(|r| r.num_retries > 0) || !f.mirrors.is_empty();
        let (body, end) = request_end::watch(body, &mut info.request_bytes);
        let body = if needs_copy {
            let (resend, first) = match end {
                // Nothing to keep (most requests).
                RequestEnd::Now => (Resend::Empty, body),
                RequestEnd::Later(_) => {
                    let (replay, first) = Replay::new(body, REPLAY_LIMIT);
                    (Resend::Replay(replay), first.boxed_unsync())
                }
            };
            // A protocol switch is not mirrored: the shadow's tunnel would have
            // no client.
            let mirrors = if crate::upstream::is_upgrade(&parts.headers) {
                &[][..]
            } else {
                &f.mirrors[..]
            };
            for (mc, fraction) in mirrors {
                if fastrand::f64() >= *fraction {
                    continue;
                }
                if let Some(copy) = resend.mirror() {
                    mirror(upstream, mc.clone(), &parts, copy, downstream_h2);
                }
            }
            ReqBody::Resendable(resend, first)
        } else {
            ReqBody::Streaming(body)
        };

        // The route timeout's, for the response head and then its body.
        let mut deadline = f
            .timeout
            .map(|t| end.deadline(t, affinity.map(|a| &a.timer)));
        // Pinned in place, here (see `Deadline::bound`); the block ends the
        // borrows it holds.
        let result = {
            let mut attempts = std::pin::pin!(attempt_all(
                upstream,
                cluster,
                f,
                parts,
                (body, &end),
                downstream_h2,
                info,
                affinity,
            ));
            match &mut deadline {
                Some(d) => match d.bound(attempts.as_mut()).await {
                    Some(r) => r,
                    None => {
                        return Outcome::Local(
                            StatusCode::GATEWAY_TIMEOUT,
                            "UT",
                            "upstream request timeout\n",
                        )
                    }
                },
                None => attempts.await,
            }
        };
        match result {
            Ok(mut a) => {
                info.endpoint = Some(a.endpoint);
                // The route's come after (where local replies get them too).
                picked.response_headers.apply(a.response.headers_mut());
                // A switched protocol's tunnel is not a response body: it
                // outlives the route timeout.
                let limited = deadline.filter(|_| {
                    a.response.status() != StatusCode::SWITCHING_PROTOCOLS
                        && !a.response.body().is_end_stream()
                });
                Outcome::Upstream(a.response.map(|b| match limited {
                    Some(d) => d.limit(b),
                    None => b.map_err(Into::into).boxed_unsync(),
                }))
            }
            Err(e) => match e {
                SendError::NoEndpoint(_) => Outcome::Local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    "no healthy upstream\n",
                ),
                SendError::Connect(..) => Outcome::Local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UF",
                    "upstream connect error\n",
                ),
                SendError::Reset(..) => Outcome::Local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UR",
                    "upstream reset before response\n",
                ),
                SendError::Timeout => Outcome::Local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout\n",
                ),
            },
        }
    }
}

/// A request body to send again: none at all, or the client's kept by a
/// [`Replay`].
enum Resend {
    Empty,
    Replay(Replay),
}

impl Resend {
    /// The body of another attempt (earlier attempts' bodies fail from
    /// now on), if it can still be sent.
    fn attempt(&self) -> Option<Body> {
        match self {
            Resend::Empty => Some(empty()),
            Resend::Replay(r) => r.attempt().map(BodyExt::boxed_unsync),
        }
    }

    /// The body of a mirror, read alongside the attempts.
    fn mirror(&self) -> Option<Body> {
        match self {
            Resend::Empty => Some(empty()),
            Resend::Replay(r) => r.mirror().map(BodyExt::boxed_unsync),
        }
    }

    /// No more attempts or mirrors will be made.
    fn stop_keeping(&self) {
        if let Resend::Replay(r) = self {
            r.stop_keeping();
        }
    }
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request for one attempt (the client's extensions stay here).
fn copy_request(parts: &Parts, body: Body) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

// Not an `async fn`, for the reason [`crate::serve::handle`] gives.
#[allow(clippy::manual_async_fn)]
#[allow(clippy::too_many_arguments)]
fn attempt_all<'a>(
    upstream: &'a Upstream,
    cluster: &'a ClusterConfig,
    f: &'a Forward,
    mut parts: Parts,
    (body, end): (ReqBody, &'a RequestEnd),
    downstream_h2: bool,
    info: &'a mut RequestInfo,
    affinity: Option<&'a Affinity>,
) -> impl Future<Output = Result<Attempt, SendError>> + 'a {
    async move {
        // Mirrors read alongside the attempts, so what is kept stays for them.
        let done = |resend: &Resend| {
            if f.mirrors.is_empty() {
                resend.stop_keeping();
            }
        };
        // The first attempt, and what another would need: the policy, and
        // the client's body to send again.
        let (mut req, again) = match body {
            ReqBody::Streaming(b) => {
                // Sent once: the request itself goes, not a copy.
                let mut p = std::mem::replace(&mut parts, Request::new(()).into_parts().0);
                p.extensions = http::Extensions::new();
                (Request::from_parts(p, b), None)
            }
            ReqBody::Resendable(resend, first) => {
                let req = copy_request(&parts, first);
                match &f.retry {
                    Some(retry) => (req, Some((retry, resend))),
                    None => {
                        done(&resend);
                        (req, None)
                    }
                }
            }
        };
        let mut avoid = None;
        let mut n = 0;
        // One place awaits `send`: each await of it would take room of its
        // own in this future, which every request's future carries.
        loop {
            info.attempts = n + 1;
            let mut sent =
                std::pin::pin!(upstream.send(cluster, req, downstream_h2, avoid, affinity));
            let res = match again.as_ref().and_then(|(retry, _)| retry.per_try_timeout) {
                // Its own timer: the route timeout's holds the connection's.
                Some(t) => end
                    .deadline(t, None)
                    .bound(sent.as_mut())
                    .await
                    .unwrap_or(Err(SendError::Timeout)),
                None => sent.await,
            };
            let Some((retry, resend)) = &again else {
                return res;
            };
            let retriable = match &res {
                Ok(a) => retriable_status(retry, a.response.status()),
                Err(e) => retriable_error(retry, e),
            };
            // The next attempt's body, if the client's can still be sent again
            // (Envoy's "retry overflow" otherwise: this outcome stands).
            let next = (retriable && n < retry.num_retries)
                .then(|| resend.attempt())
                .flatten();
            let Some(next) = next else {
                if n > 0 && retriable {
                    info.flags = "URX";
                }
                done(resend);
                return res;
            };
            req = copy_request(&parts, next);
            avoid = match &res {
                Ok(a) => Some(a.endpoint.config.address),
                Err(SendError::Connect(a, _)) | Err(SendError::Reset(a, _)) => Some(*a),
                Err(_) => None,
            };
            drop(res);
            tokio::time::sleep(backoff(retry, n)).await;
            n += 1;
        }
    }
}

/// Sends a copy to `cluster` in the background, its host suffixed with
/// `-shadow` as Envoy does; the answer is dropped.
fn mirror(
    upstream: &Arc<Upstream>,
    cluster: Arc<ClusterConfig>,
    parts: &Parts,
    body: Body,
    downstream_h2: bool,
) {
    // Not on the client connection's own upstream (no affinity): it runs
    // alongside.
    let mut req = copy_request(parts, body);
    if let Some(host) = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        let shadow = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => format!("{h}-shadow:{p}"),
            _ => format!("{host}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    let upstream = upstream.clone();
    tokio::spawn(async move {
        if let Err(e) = upstream
            .send(&cluster, req, downstream_h2, None, None)
            .await
        {
            tracing::debug!(cluster = %cluster.name, error = %e, "mirror request failed");
        }
    });
}
