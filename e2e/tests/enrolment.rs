//! Moving a namespace into the mesh while its pods run, as a platform team
//! migrates one namespace at a time: labelling it must not break the pods
//! already running there. They were not captured when they started (CNI
//! ADD ran before the label), so they are reached in plain TCP until they
//! are enrolled; pods started after the label are captured and reached
//! over HBONE. The control plane tells the two apart by the annotation the
//! enrolment leaves on a pod (`ambient.istio.io/redirection: enabled`), as
//! Istio does, not by the label.
//!
//! Needs root and the mesh's binaries (`cargo build --workspace`, which
//! `scripts/test.sh` runs first). Without root it prints why and passes.

use anyhow::{ensure, Context, Result};
use e2e::apps::http::HttpServer;
use e2e::cluster::{App, Cluster, ClusterOptions, AMBIENT_LABEL};

const PORT: u16 = 8080;

/// `a`'s protocol in the ztunnel of every node (`HBONE` or `TCP`).
fn protocols(c: &Cluster, a: &App) -> Result<Vec<String>> {
    c.nodes()
        .iter()
        .map(|n| {
            let d = c.config_dump(n)?;
            let w = d["workloads"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["name"] == a.name.as_str()))
                .with_context(|| format!("{} not in {}'s ztunnel", a.key(), n.name()))?;
            Ok(w["protocol"].as_str().unwrap_or("?").to_string())
        })
        .collect()
}

fn run() -> Result<()> {
    let c = Cluster::start(ClusterOptions { nodes: 2 }, &|s| eprintln!("setup: {s}"))?;
    let (n1, n2) = (c.node(0).clone(), c.node(1).clone());
    c.namespace("shop", &[(AMBIENT_LABEL, "ambient")])?;
    c.namespace("legacy", &[])?;
    let client = c.add_pod(&n1, "shop", "client", "client", &[("app", "client")])?;
    let old = c.add_pod(&n2, "legacy", "old", "old", &[("app", "old")])?;
    let mut servers = vec![HttpServer::start_for(&old, PORT)?];
    ensure!(c.enroll(&client)?, "shop/client was not captured");
    ensure!(!c.enroll(&old)?, "legacy/old was captured outside the mesh");
    let url = |a: &App| format!("{}:{PORT}/", a.ip());
    let r = c.http(&client, &url(&old), &[]);
    ensure!(
        r.ok(),
        "client -> legacy/old before the label: {}",
        r.describe()
    );

    // The namespace moves into the mesh; a pod started afterwards is
    // captured, and `enroll` returns once every ztunnel reaches it over
    // HBONE, so the control plane has translated the labelled namespace.
    c.namespace("legacy", &[(AMBIENT_LABEL, "ambient")])?;
    let new = c.add_pod(&n2, "legacy", "new", "new", &[("app", "new")])?;
    servers.push(HttpServer::start_for(&new, PORT)?);
    ensure!(
        c.enroll(&new)?,
        "legacy/new was not captured after the label"
    );

    // The running pod still answers, reached in plain TCP.
    let r = c.http(&client, &url(&old), &[]);
    ensure!(
        r.ok(),
        "client -> legacy/old after the label: {}",
        r.describe()
    );
    let p = protocols(&c, &old)?;
    ensure!(
        p.iter().all(|p| p == "TCP"),
        "legacy/old, running but not captured, is to be reached in plain TCP: {p:?}"
    );

    // The new pod answers over mutual TLS, with both identities.
    let mark = c.log_mark(&n2);
    let r = c.http(&client, &url(&new), &[]);
    ensure!(r.ok(), "client -> legacy/new: {}", r.describe());
    let line = c.wait_access(&n2, mark, "node-2's inbound line for legacy/new", |l| {
        l.get("direction") == "inbound" && l.get("dst.workload") == "legacy/new"
    })?;
    ensure!(
        line.get("src.identity").ends_with("/ns/shop/sa/client")
            && line.get("dst.identity").ends_with("/ns/legacy/sa/new"),
        "identities on legacy/new's connection: {:?}",
        line.fields
    );
    drop(servers);
    Ok(())
}

#[test]
fn labelling_a_running_namespace_keeps_its_pods_reachable() {
    if !e2e::require_root() {
        return;
    }
    e2e::cleanup_on_stop_signal().unwrap();
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}
