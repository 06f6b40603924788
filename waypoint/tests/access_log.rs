//! The access log: one line per request. Alone in its test binary: a
//! thread-scoped tracing subscriber only sees every event reliably when no
//! other test thread is hitting the same call sites.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// Collects what the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_access_log_line_per_request() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    // The test's runtime is single-threaded: the whole exchange is logged
    // through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let ca = ca();
    let v1 = backend("v1").await;
    let yaml = config(
        "[]",
        "          - name: all\n            match: {prefix: /}\n            route: {cluster: v1}\n",
        &cluster("v1", &[v1.addr], ""),
    );
    let wp = waypoint(ca.clone(), &yaml, "waypoint").await;
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/logged?q=1", &[]).await.status, 200);
    // The line is written when the server has finished with the response
    // body, which can be just after the client has read it.
    let text = || String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for _ in 0..500 {
        if text().contains("path=/logged?q=1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let text = text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("access") && l.contains("path=/logged?q=1"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let l = lines[0];
    for want in [
        "status=200",
        "route=all",
        "cluster=v1",
        "src_principal=spiffe://cluster.local/ns/default/sa/client",
        "method=GET",
    ] {
        assert!(l.contains(want), "{want} missing in {l}");
    }
}
