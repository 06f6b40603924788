//! Timeouts, retries, load balancing and ejection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};

#[tokio::test]
async fn request_timeout_gives_504() {
    let ca = ca();
    let slow = backend("slow").await;
    let routes = "          - match: {prefix: /}
            route: {cluster: slow, timeout: 0.2s}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("slow", &[slow.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let r = c.get("/", &[("x-delay-ms", "3000")]).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(c.get("/", &[]).await.status, 200);
}

/// A backend whose answer to `/stall/<ms>` is a head and a first chunk at
/// once, the last chunk `<ms>` later.
async fn trickling_backend() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve(l, |req: Request<Incoming>| async move {
        let ms: u64 = req.uri().path()[7..].parse().unwrap();
        let chunks = futures::stream::unfold(0, move |n| async move {
            match n {
                0 => Some((Ok::<_, Infallible>(Frame::data(Bytes::from("first "))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Some((Ok(Frame::data(Bytes::from("last"))), 2))
                }
                _ => None,
            }
        });
        Response::new(StreamBody::new(chunks))
    });
    addr
}

/// The route timeout spans the whole response, as Envoy's: a body still
/// coming when it passes is cut (the client gets the head, then an error),
/// and the request is flagged `UT` with the status the client saw.
#[tokio::test]
async fn the_route_timeout_cuts_a_response_body_still_coming() {
    let ca = ca();
    let addr = trickling_backend().await;
    let routes = "          - match: {prefix: /}
            route: {cluster: trickle, timeout: 0.4s}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("trickle", &[addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let get = |path: &str| {
        Request::builder()
            .uri(path)
            .header("host", "echo.default.svc.cluster.local")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // In time: untouched.
    let mut h1 = c.h1(VIP).await;
    assert_eq!(send(&mut h1, get("/stall/50")).await.body, "first last");
    // Not in time, over HTTP/1.1 and over HTTP/2.
    let started = std::time::Instant::now();
    let resp = h1.send_request(get("/stall/5000")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err());
    let mut h2 = c.h2(VIP).await;
    let resp = h2
        .send_request(get("http://echo.default.svc.cluster.local/stall/5000"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first ");
    assert!(body.frame().await.unwrap().is_err());
    assert!(started.elapsed() < Duration::from_secs(4));
    let metrics = admin_get(&wp, "/metrics").await;
    let cut = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"response_flags="UT""#)
                && l.contains(r#"response_code="200""#)
        })
        .unwrap_or_else(|| panic!("no cut request in:\n{metrics}"));
    assert!(cut.ends_with(" 2"), "{cut}");
}

#[tokio::test]
async fn retry_turns_a_flaky_503_into_200() {
    let ca = ca();
    let flaky = backend("flaky").await;
    let routes = "          - match: {prefix: /retry}
            route:
              cluster: flaky
              retry_policy:
                retry_on: 5xx
                num_retries: 2
                retry_back_off: {base_interval: 0.01s}
          - match: {prefix: /codes}
            route:
              cluster: flaky
              retry_policy: {retry_on: retriable-status-codes, retriable_status_codes: [409], num_retries: 1}
          - match: {prefix: /}
            route: {cluster: flaky}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("flaky", &[flaky.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    flaky.script(&[503]);
    let r = c
        .request("POST", "/retry", &[], "body survives the retry")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(flaky.hits(), 2);
    // Out of retries: the last answer is passed on.
    flaky.script(&[503, 503, 503]);
    assert_eq!(c.get("/retry", &[]).await.status, 503);
    assert_eq!(flaky.hits(), 5);
    // Only the listed codes are retried.
    flaky.script(&[409]);
    assert_eq!(c.get("/codes", &[]).await.status, 200);
    flaky.script(&[500]);
    assert_eq!(c.get("/codes", &[]).await.status, 500);
    // Without a retry policy a 503 is final.
    flaky.script(&[503]);
    assert_eq!(c.get("/", &[]).await.status, 503);
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_endpoint() {
    let ca = ca();
    let good = backend("good").await;
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let routes = "          - match: {prefix: /}
            route:
              cluster: pair
              retry_policy: {retry_on: connect-failure, num_retries: 2}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("pair", &[good.addr, dead], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    for _ in 0..20 {
        assert_eq!(c.get("/", &[]).await.status, 200);
    }
    assert_eq!(good.hits(), 20);
}

#[tokio::test]
async fn both_endpoints_serve_and_a_failing_one_is_ejected() {
    let ca = ca();
    let a = backend("a").await;
    let b = backend("b").await;
    let od = "    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 600s, max_ejection_percent: 50}\n";
    let routes = "          - match: {prefix: /}
            route: {cluster: pair}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("pair", &[a.addr, b.addr], od)),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    // P2C favours the endpoint with the lower latency estimate; estimates
    // fade while idle, so both get traffic, though on a loaded machine one
    // may take a long run of requests first.
    for _ in 0..2000 {
        assert_eq!(c.get("/", &[]).await.status, 200);
        if a.hits() > 0 && b.hits() > 0 {
            break;
        }
    }
    assert!(
        a.hits() > 0 && b.hits() > 0,
        "a {} b {}",
        a.hits(),
        b.hits()
    );
    // b starts failing: after 3 consecutive 5xx it is ejected and gets
    // nothing more. (P2C sends b traffic again once its latency estimate
    // has decayed below a's: keep going until it has failed 3 times.)
    b.script(&[500; 1000]);
    let before = b.hits();
    let mut failed = 0;
    for _ in 0..5000 {
        if c.get("/", &[]).await.status != 200 {
            failed += 1;
        }
        if b.hits() - before == 3 {
            break;
        }
    }
    assert_eq!((failed, b.hits() - before), (3, 3));
    for _ in 0..100 {
        assert_eq!(c.get("/", &[]).await.status, 200);
    }
    assert_eq!(b.hits() - before, 3);
    let dump = admin_get(&wp, "/config_dump").await;
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let eps = v["endpoints"].as_array().unwrap();
    let eb = eps
        .iter()
        .find(|e| e["address"] == b.addr.to_string())
        .unwrap();
    assert_eq!(eb["ejected"], true);
    let ea = eps
        .iter()
        .find(|e| e["address"] == a.addr.to_string())
        .unwrap();
    assert_eq!(ea["ejected"], false);
}

#[tokio::test]
async fn ejected_endpoint_is_readmitted_after_the_ejection_time() {
    let ca = ca();
    let a = backend("a").await;
    let b = backend("b").await;
    let od = "    outlier_detection: {consecutive_5xx: 1, base_ejection_time: 0.3s, max_ejection_percent: 50}\n";
    let routes = "          - match: {prefix: /}
            route: {cluster: pair}
";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("pair", &[a.addr, b.addr], od)),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    b.script(&[500]);
    // Until b has failed once (and is ejected).
    for _ in 0..5000 {
        if b.hits() > 0 {
            break;
        }
        c.get("/", &[]).await;
    }
    assert_eq!(b.hits(), 1);
    let after_ejection = b.hits();
    // Wait for re-admission, then b serves again.
    let mut back = false;
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(c.get("/", &[]).await.status, 200);
        if b.hits() > after_ejection {
            back = true;
            break;
        }
    }
    assert!(back, "b was never re-admitted");
}

#[tokio::test]
async fn drain_lets_the_request_in_flight_finish_and_refuses_new_tunnels() {
    let ca = ca();
    let v1 = backend("v1").await;
    let routes = "          - match: {prefix: /}\n            route: {cluster: v1}\n";
    let wp = waypoint(
        ca.clone(),
        &config("[]", routes, &cluster("v1", &[v1.addr], "")),
        "waypoint",
    )
    .await;
    let c = client(ca, "client", &wp);
    let mut s = c.h1(VIP).await;
    let req = http::Request::builder()
        .uri("/slow")
        .header("host", "echo")
        .header("x-delay-ms", "300")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let in_flight = tokio::spawn(async move { send(&mut s, req).await.status });
    // Until the backend has the request.
    while v1.hits() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let drain = wp.proxy.drain.clone();
    let left = tokio::spawn(async move { drain.run(std::time::Duration::from_secs(20)).await });
    assert_eq!(in_flight.await.unwrap(), 200);
    assert_eq!(left.await.unwrap(), 0);
    assert!(c.tunnel(VIP).await.is_err());
}
