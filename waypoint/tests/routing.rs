//! Routing through the waypoint over HBONE on loopback: matches, splits,
//! modifiers, rewrites, redirects, faults, mirroring, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test]
async fn routes_http1_over_hbone_and_counts_it() {
    let ca = ca();
    let v1 = backend("v1").await;
    let yaml = config(
        "[]",
        "          - match: {prefix: /}\n            route: {cluster: v1}\n",
        &cluster("v1", &[v1.addr], ""),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    let r = c.get("/hello?x=1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "v1 /hello?x=1");
    assert_eq!(v1.hits(), 1);
    // The backend sees the original host.
    assert_eq!(v1.last_headers()["host"], "echo.default.svc.cluster.local");
    let metrics = admin_get(&wp, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .expect("istio_requests_total");
    assert!(line.contains("reporter=\"waypoint\""), "{line}");
    assert!(line.contains("response_code=\"200\""), "{line}");
    assert!(
        line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{line}"
    );
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket"));
    assert!(metrics.contains("istio_response_bytes_sum"));
}
