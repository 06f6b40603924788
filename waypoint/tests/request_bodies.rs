//! Request bodies: on routes that retry or mirror they stream to the first
//! attempt, a retry replays them, and one too large to keep still goes
//! through (without a retry); a route's timeout starts once the client has
//! sent its whole request, as Envoy's does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use waypoint::app::Running;

/// What the body backend saw: each request's body length, in order.
#[derive(Default)]
struct Seen {
    lengths: Mutex<Vec<usize>>,
    /// Statuses to answer `/count` with, in order, then 200.
    script: Mutex<VecDeque<u16>>,
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// `/count` reads the whole body and answers its length; `/echo` streams
/// each request chunk back as it arrives.
async fn body_backend() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let st = seen.clone();
    serve(l, move |req| {
        let st = st.clone();
        async move { answer(&st, req).await }
    });
    (addr, seen)
}

async fn answer(st: &Seen, req: Request<Incoming>) -> Response<RespBody> {
    if req.uri().path() == "/echo" {
        return Response::new(req.into_body().boxed());
    }
    let len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => usize::MAX,
    };
    st.lengths.lock().unwrap().push(len);
    let code = st.script.lock().unwrap().pop_front().unwrap_or(200);
    let body = Full::new(Bytes::from(len.to_string()))
        .map_err(|never| match never {})
        .boxed();
    Response::builder().status(code).body(body).unwrap()
}

fn routes(extra: &str) -> String {
    format!(
        "          - match: {{prefix: /}}
            route:
              cluster: bodies
              retry_policy:
                retry_on: 5xx
                num_retries: 2
                retry_back_off: {{base_interval: 0.01s}}
{extra}"
    )
}

async fn setup(extra_route: &str, extra_clusters: &str) -> (Client, Arc<Seen>, Running) {
    let ca = ca();
    let (addr, seen) = body_backend().await;
    let clusters = format!("{}{extra_clusters}", cluster("bodies", &[addr], ""));
    let wp = waypoint(
        ca.clone(),
        &config("[]", &routes(extra_route), &clusters),
        "waypoint",
    )
    .await;
    (client(ca, "client", &wp), seen, wp)
}

async fn post(c: &Client, len: usize) -> (u16, String) {
    let mut s = c.h1(VIP).await;
    let req = Request::builder()
        .method("POST")
        .uri("/count")
        .header("host", "echo.default.svc.cluster.local")
        .body(Full::new(Bytes::from(vec![b'x'; len])))
        .unwrap();
    let r = send(&mut s, req).await;
    (r.status.as_u16(), r.body)
}

#[tokio::test]
async fn a_body_is_replayed_on_retry_and_a_large_one_streams_without_one() {
    let (c, seen, _wp) = setup("", "").await;
    // Kept, so the retry sends it again whole.
    seen.script.lock().unwrap().push_back(503);
    assert_eq!(post(&c, 512 * 1024).await, (200, "524288".into()));
    assert_eq!(*seen.lengths.lock().unwrap(), [524288, 524288]);
    // Larger than what is kept: it still goes through (this used to be a
    // 413, the body was gathered whole before the first attempt).
    let big = 6 * 1024 * 1024;
    assert_eq!(post(&c, big).await, (200, big.to_string()));
    // And when the one attempt fails there is no retry: its answer stands.
    seen.lengths.lock().unwrap().clear();
    seen.script.lock().unwrap().push_back(503);
    assert_eq!(post(&c, big).await.0, 503);
    assert_eq!(*seen.lengths.lock().unwrap(), [big]);
}

#[tokio::test]
async fn a_call_streaming_both_ways_flows_through_a_retrying_route() {
    let (c, _seen, _wp) = setup("", "").await;
    let io = c.tunnel(VIP).await.unwrap();
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri("http://echo.default.svc.cluster.local/echo")
        .body(StreamBody::new(rx))
        .unwrap();
    tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"ping 1"))))
        .unwrap();
    // The answer starts before the request ends: a route that gathered the
    // body first would wait here for good.
    let talk = async {
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "ping 1");
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"ping 2"))))
            .unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "ping 2");
        tx.close_channel();
        let rest = body.collect().await.unwrap().to_bytes();
        assert!(rest.is_empty(), "{rest:?}");
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .expect("the streamed call went through");
}

#[tokio::test]
async fn a_mirror_gets_the_body_too() {
    let (shadow, shadow_seen) = body_backend().await;
    let mirror = "              request_mirror_policies: [{cluster: shadow}]\n";
    let (c, seen, _wp) = setup(mirror, &cluster("shadow", &[shadow], "")).await;
    assert_eq!(post(&c, 300 * 1024).await, (200, "307200".into()));
    for _ in 0..100 {
        if !shadow_seen.lengths.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*shadow_seen.lengths.lock().unwrap(), [307200]);
    assert_eq!(*seen.lengths.lock().unwrap(), [307200]);
}

#[tokio::test]
async fn the_route_timeout_starts_when_the_upload_ends() {
    let ca = ca();
    let (addr, seen) = body_backend().await;
    let routes = "          - match: {prefix: /}
            route: {cluster: bodies, timeout: 0.3s}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("bodies", &[addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let io = c.tunnel(VIP).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
    let req = Request::builder()
        .method("POST")
        .uri("http://echo.default.svc.cluster.local/count")
        .body(StreamBody::new(rx))
        .unwrap();
    // An upload three times as long as the timeout, answered at once.
    let upload = async move {
        for _ in 0..9 {
            tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (resp, ()) = tokio::join!(send.send_request(req), upload);
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "90");
    assert_eq!(*seen.lengths.lock().unwrap(), [90]);
}
