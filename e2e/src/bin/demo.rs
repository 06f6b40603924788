//! The local mesh demo: a two-node ambient mesh on network namespaces.
//!
//! ```text
//! demo [--once]
//! ```
//!
//! Builds nodes `node-1` and `node-2` (plus `control`, where the control
//! plane runs), pods `shop/frontend` and `legacy/batch` (node-1, namespace
//! legacy outside the mesh), `shop/cart` (behind service `cart`,
//! 10.96.0.20:80) and `shop/catalog` (behind `catalog`, 10.96.0.30:80) on
//! node-2, each pod its own network namespace and cgroup. It writes the
//! cluster as Kubernetes manifests into a directory the `xds` control plane
//! watches, starts one ztunnel per node fed by xDS (certificates from the
//! control plane's CA), enrolls the pods by invoking the `ztunnel-cni`
//! plugin as a container runtime would (eBPF capture inside each pod, no
//! iptables), and walks through a scenario, checking each step: capture in
//! place, a mesh call with both identities, a DENY policy, encryption on the
//! node link, and live edits of the manifests pushed by the control plane.
//! Last, namespace `store` opts in to the waypoint `waypoint` (label
//! `istio.io/use-waypoint`, a Gateway of class `istio-waypoint`, a replica
//! of the real `waypoint` binary in pod store/waypoint-1 on node-2,
//! configured over xDS by the control plane, certificate from its CA). Its
//! routes come from HTTPRoutes the demo writes into the manifest
//! directory: service `reviews` (10.96.0.40:80) split 80/20 between
//! Services reviews-v1 (pod on node-1) and reviews-v2 (node-2), and gRPC to
//! reviews (port 50051) routed by method (Hello to v1, Echo to v2); then
//! an AuthorizationPolicy on the waypoint denying `/admin*`. The demo
//! checks that the waypoint takes the routes, the path (client -> ztunnel
//! -> waypoint -> ztunnel -> v1/v2), the split over 200 requests, the gRPC
//! routing, the L7 DENY (403, never reaching reviews), and the identities
//! on both legs.
//!
//! Then it stays up and prints how to poke at it, until Ctrl-C (or SIGTERM),
//! and removes everything it created. With `--once` it exits after the
//! scenario: status 0 only if every step behaved as expected.
//!
//! Needs root. `scripts/demo.sh` builds everything and runs it.

#[path = "demo/mesh.rs"]
mod mesh;

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};

use e2e::apps::grpc::{ECHO_PATH, HELLO_PATH};
use e2e::cluster::App;
use mesh::{
    counter, interrupted, metric_line, Mesh, Outcome, APP_PORT, CART_VIP, CATALOG_VIP, GRPC_PORT,
    REVIEWS_VIP, REVIEWS_WEIGHTS, SERVICE_PORT,
};

/// One line of the summary table.
struct Check {
    step: String,
    expected: String,
    observed: String,
    ok: bool,
}

struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn record(&mut self, step: &str, expected: &str, observed: impl Into<String>, ok: bool) {
        let observed = observed.into();
        println!("   {} {observed}", if ok { "=> ok:" } else { "=> FAIL:" });
        self.checks.push(Check {
            step: step.into(),
            expected: expected.into(),
            observed,
            ok,
        });
    }

    /// Runs a step; an error inside it is one failed check.
    fn step(&mut self, step: &str, expected: &str, f: impl FnOnce(&mut Report) -> Result<()>) {
        if interrupted() {
            return;
        }
        if let Err(e) = f(self) {
            self.record(step, expected, format!("error: {e:#}"), false);
        }
    }

    fn all_ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    fn print_table(&self) {
        let headers = ["step", "expected", "observed", "result"];
        let rows: Vec<[String; 4]> = self
            .checks
            .iter()
            .map(|c| {
                [
                    c.step.clone(),
                    c.expected.clone(),
                    shorten(&c.observed, 70),
                    if c.ok { "ok".into() } else { "FAIL".into() },
                ]
            })
            .collect();
        let mut w = headers.map(str::len);
        for r in &rows {
            for (i, cell) in r.iter().enumerate() {
                w[i] = w[i].max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 4]| {
            let mut s = String::from("|");
            for (i, c) in cells.iter().enumerate() {
                s.push_str(&format!(" {c:<width$} |", width = w[i]));
            }
            println!("{s}");
        };
        line(headers);
        let sep: Vec<String> = w.iter().map(|n| "-".repeat(*n)).collect();
        line([&sep[0], &sep[1], &sep[2], &sep[3]]);
        for r in &rows {
            line([&r[0], &r[1], &r[2], &r[3]]);
        }
    }
}

fn shorten(s: &str, max: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= max {
        s
    } else {
        let mut t: String = s.chars().take(max - 3).collect();
        t.push_str("...");
        t
    }
}

fn heading(s: &str) {
    println!("\n== {s}");
}

fn say(s: &str) {
    println!("   {s}");
}

fn vip(ip: std::net::Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), SERVICE_PORT)
}

/// `spiffe://td/ns/shop/sa/cart` -> `shop/cart`.
fn sa_of(spiffe: &str) -> String {
    match spiffe
        .split_once("/ns/")
        .and_then(|(_, r)| r.split_once("/sa/"))
    {
        Some((ns, sa)) => format!("{ns}/{sa}"),
        None => spiffe.to_string(),
    }
}

fn short_id(spiffe: &str) -> &str {
    spiffe.strip_prefix("spiffe://").unwrap_or(spiffe)
}

fn main() {
    let once = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}\nusage: demo [--once]");
            std::process::exit(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "demo: must run as root (it creates network namespaces, veths and iptables rules); try: sudo bash scripts/demo.sh"
        );
        std::process::exit(2);
    }
    // Stop signals are caught (tokio's handler only notes them) and handed
    // to main over a channel, so a Ctrl-C ends main normally and the test
    // bed's Drop cleans up. No signal mask is touched: children inherit a
    // blocked mask, and ztunnel would then ignore SIGTERM.
    let rx = match catch_stop_signals() {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("demo: installing signal handlers: {e:#}");
            std::process::exit(2);
        }
    };
    let code = run(once, &rx);
    std::process::exit(code);
}

/// SIGINT, SIGTERM and SIGHUP set [`mesh::INTERRUPTED`] and are sent, by
/// name, on the returned channel.
fn catch_stop_signals() -> Result<mpsc::Receiver<&'static str>> {
    let (tx, rx) = mpsc::channel();
    e2e::on_stop_signal(move |sig| {
        e2e::request_stop();
        let _ = tx.send(sig);
    })
    .context("registering signal handlers")?;
    Ok(rx)
}

fn parse_args() -> Result<bool> {
    let mut once = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--once" => once = true,
            "-h" | "--help" => {
                println!("usage: demo [--once]\n\nRuns the local ambient-mesh demo (as root). Without --once it stays up until Ctrl-C.");
                std::process::exit(0);
            }
            other => return Err(anyhow!("unknown argument {other:?}")),
        }
    }
    Ok(once)
}

/// Everything that owns the test bed lives in here, so that it is dropped
/// (namespaces removed, processes killed) before the process exits.
fn run(once: bool, signals: &mpsc::Receiver<&'static str>) -> i32 {
    let t0 = Instant::now();
    println!("Local ambient mesh demo: 2 nodes, the xds control plane on a manifest directory, 1 ztunnel per node, pods enrolled by the CNI plugin and captured with eBPF.\n");
    heading("Setting up");
    let progress = |s: &str| say(s);
    let mut mesh = match Mesh::start(&progress) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("\ndemo: set-up failed: {e:#}");
            return 1;
        }
    };
    print_topology(&mesh);
    let setup_ms = t0.elapsed().as_millis();

    let t1 = Instant::now();
    let mut report = Report { checks: Vec::new() };
    scenario(&mut mesh, &mut report);
    let scenario_ms = t1.elapsed().as_millis();

    heading("Summary");
    report.print_table();
    let ok = report.all_ok();
    println!(
        "\n{} ({} of {} checks ok; set-up {:.1} s, scenario {:.1} s)",
        if interrupted() {
            "Interrupted: the remaining steps were skipped."
        } else if ok {
            "All steps behaved as expected."
        } else {
            "Some steps did NOT behave as expected; ztunnel logs are under the dir below (E2E_KEEP=1 keeps them)."
        },
        report.checks.iter().filter(|c| c.ok).count(),
        report.checks.len(),
        setup_ms as f64 / 1000.0,
        scenario_ms as f64 / 1000.0,
    );

    if !once && !interrupted() {
        print_playground(&mesh);
        if let Ok(sig) = signals.recv() {
            println!("\nGot {sig}; stopping.");
        }
    } else if interrupted() {
        println!("\nInterrupted.");
    }
    println!(
        "Cleaning up (CNI DEL of every pod, ztunnels, control plane, pins, namespaces, {}) ...",
        mesh.c.tb.dir().display()
    );
    let prefix = mesh.c.tb.prefix().to_string();
    let t2 = Instant::now();
    mesh.shutdown();
    drop(mesh);
    println!("Cleaned up {prefix}-* in {} ms.", t2.elapsed().as_millis());
    if ok && !interrupted() {
        0
    } else {
        1
    }
}

fn print_topology(m: &Mesh) {
    heading("The cluster");
    say(&format!(
        "{:<16} {:<7} {:<12} {:<34} {}",
        "pod", "node", "ip", "identity", "in the mesh"
    ));
    for a in [&m.frontend, &m.batch, &m.cart, &m.catalog] {
        say(&format!(
            "{:<16} {:<7} {:<12} {:<34} {}",
            a.key(),
            a.node(),
            a.ip(),
            if m.c.in_mesh(&a.namespace) {
                short_id(&a.spiffe()).to_string()
            } else {
                "-".to_string()
            },
            if m.is_pinned(a) {
                "yes (enrolled)"
            } else {
                "no"
            }
        ));
    }
    say(&format!(
        "services: cart {CART_VIP}:{SERVICE_PORT} -> shop/cart:8080, catalog {CATALOG_VIP}:{SERVICE_PORT} -> shop/catalog:8080"
    ));
    say("policy shop/catalog-shop-only: DENY connections to catalog from outside namespace shop");
    say(&format!("manifests: {}", m.manifests().display()));
}

fn scenario(m: &mut Mesh, r: &mut Report) {
    step_0(m, r);
    if !interrupted() {
        step_a(m, r);
    }
    if !interrupted() {
        step_b(m, r);
    }
    if !interrupted() {
        step_c(m, r);
    }
    if !interrupted() {
        step_d(m, r);
    }
    if !interrupted() {
        step_e(m, r);
    }
}

/// 0. Capture is in place where it should be, and only there.
fn step_0(m: &Mesh, r: &mut Report) {
    heading("0. enrollment: what the CNI plugin and ztunnel set up in each pod");
    let exp = "shop pods captured by eBPF, legacy not";
    r.step("0. eBPF capture per pod", exp, |r| {
        let mut ok = true;
        let mut seen = Vec::new();
        for a in [&m.frontend, &m.batch, &m.cart, &m.catalog] {
            let progs = m.cgroup_programs(a);
            let pinned = m.is_pinned(a);
            say(&format!(
                "{:<15} pins: {:<3} cgroup programs: {}",
                a.key(),
                if pinned { "yes" } else { "no" },
                if progs.is_empty() {
                    "none".to_string()
                } else {
                    progs.join(", ")
                }
            ));
            let want = m.c.in_mesh(&a.namespace);
            ok &= pinned == want && progs.iter().any(|p| p.contains("connect")) == want;
            seen.push(format!("{} {}", a.name, if pinned { "yes" } else { "no" }));
        }
        // No NAT rule anywhere: capture is the pods' eBPF alone.
        let mut nat = 0;
        for a in [&m.frontend, &m.cart, &m.catalog] {
            let out = e2e::ip_netns_exec_output(a.pod.netns(), &["iptables-save", "-t", "nat"]);
            if let Ok(o) = out {
                nat += String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count();
            }
        }
        say(&format!("iptables nat rules in the mesh pods: {nat}"));
        r.record(
            "0. eBPF capture per pod",
            exp,
            format!("enrolled: {}; iptables nat rules: {nat}", seen.join(", ")),
            ok && nat == 0,
        );
        Ok(())
    });
}

/// a. frontend -> cart VIP, both identities, the endpoint.
fn step_a(m: &Mesh, r: &mut Report) {
    heading("a. shop/frontend calls the cart service (10.96.0.20:80) through the mesh");
    let exp = "allowed, mTLS frontend -> cart";
    r.step("a. frontend -> cart VIP", exp, |r| {
        let (m1, m2) = (m.log_mark(&m.node1), m.log_mark(&m.node2));
        let out = m.request(&m.frontend, vip(CART_VIP), "/cart");
        say(&format!("frontend's plain TCP client: {}", out.describe()));
        let Outcome::Answered { body, .. } = &out else {
            r.record("a. frontend -> cart VIP", exp, out.describe(), false);
            return Ok(());
        };
        let src = m.frontend.ip().to_string();
        let o = m.wait_access(&m.node1, m1, "node-1's outbound access log", |l| {
            l.src_ip() == src && l.get("direction") == "outbound"
        })?;
        say(&format!(
            "node-1 ztunnel (outbound): service {} -> picked endpoint {} ({}), tunnelled as {}",
            o.get("dst.service"),
            o.get("dst.addr"),
            o.get("dst.workload"),
            o.get("src.identity"),
        ));
        let i = m.wait_access(&m.node2, m2, "node-2's inbound access log", |l| {
            l.get("direction") == "inbound"
                && !l.refused
                && l.src_ip() == m.frontend.ip().to_string()
                && l.get("dst.workload") == "shop/cart"
        })?;
        say(&format!(
            "node-2 ztunnel (inbound): peer certificate says {}, served as {}, {} bytes to the client",
            i.get("src.identity"),
            i.get("dst.identity"),
            i.get("bytes_sent"),
        ));
        let metrics = m.metrics(&m.node2)?;
        let needles = [
            "reporter=\"destination\"",
            &format!("source_principal=\"{}\"", m.frontend.spiffe()),
            &format!("destination_principal=\"{}\"", m.cart.spiffe()),
        ];
        let opened = counter(&metrics, "istio_tcp_connections_opened_total", &needles);
        if let Some(l) = metric_line(&metrics, "istio_tcp_connections_opened_total", &needles) {
            say(&format!("node-2 metrics: {}", shorten(l, 400)));
        }
        let ok = body.contains("shop/cart")
            && o.get("dst.addr") == m.cart.addr(APP_PORT).to_string()
            && i.get("src.identity") == m.frontend.spiffe()
            && i.get("dst.identity") == m.cart.spiffe()
            && opened >= 1;
        r.record(
            "a. frontend -> cart VIP",
            exp,
            format!(
                "{} at {}; mTLS {} -> {}",
                out.short(),
                o.get("dst.addr"),
                sa_of(i.get("src.identity")),
                sa_of(i.get("dst.identity"))
            ),
            ok,
        );
        Ok(())
    });
}

/// b. The DENY policy on catalog.
fn step_b(m: &Mesh, r: &mut Report) {
    heading("b. policy shop/catalog-shop-only: catalog is for namespace shop only (DENY notNamespaces [shop])");
    let exp = "denied (no reply)";
    r.step("b. legacy/batch -> catalog", exp, |r| {
        say("legacy/batch is outside the mesh: no identity, no service VIPs; it dials catalog's pod IP directly");
        let m2 = m.log_mark(&m.node2);
        let out = m.request(&m.batch, m.catalog.addr(APP_PORT), "/items");
        say(&format!("batch's client: {}", out.describe()));
        let l = m.wait_access(&m.node2, m2, "node-2's refusal", |l| {
            l.refused && l.src_ip() == m.batch.ip().to_string()
        })?;
        say(&format!(
            "node-2 ztunnel: connection refused {} -> {}: {}",
            l.get("src.addr"),
            l.get("dst.addr"),
            l.get("error")
        ));
        r.record(
            "b. legacy/batch -> catalog",
            exp,
            format!("{}; ztunnel: {}", out.short(), l.get("error")),
            !out.answered() && l.get("error").contains("catalog-shop-only"),
        );
        Ok(())
    });
    let exp = "allowed";
    r.step("b. frontend -> catalog VIP", exp, |r| {
        let out = m.request(&m.frontend, vip(CATALOG_VIP), "/items");
        say(&format!(
            "frontend (namespace shop) -> catalog: {}",
            out.describe()
        ));
        r.record(
            "b. frontend -> catalog VIP",
            exp,
            out.short(),
            out.answered() && out.body().contains("shop/catalog"),
        );
        Ok(())
    });
}

/// c. The node link carries ciphertext.
fn step_c(m: &Mesh, r: &mut Report) {
    heading("c. what crosses the wire: tcpdump on node-1's eth0 during two requests");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let secret = format!("DEMO-SECRET-{}-{nanos}", std::process::id());
    let plain = format!("DEMO-PLAINTEXT-{}-{nanos}", std::process::id());
    let exp_mesh = "marker not on the wire";
    let exp_ctl = "marker on the wire";
    let res = (|| -> Result<(Outcome, Outcome, Vec<u8>)> {
        let cap =
            m.c.tb
                .capture(m.node1.netns(), "eth0")
                .context("starting tcpdump")?;
        let o1 = m.request(&m.frontend, vip(CART_VIP), &format!("/pay?card={secret}"));
        let o2 = m.request(
            &m.batch,
            m.cart.addr(APP_PORT),
            &format!("/legacy?note={plain}"),
        );
        std::thread::sleep(Duration::from_millis(300));
        let bytes = cap.stop().context("stopping tcpdump")?;
        Ok((o1, o2, bytes))
    })();
    match res {
        Ok((o1, o2, bytes)) => {
            say(&format!(
                "frontend -> cart VIP with {secret} in the URL: {}",
                o1.describe()
            ));
            say(&format!(
                "control: legacy/batch -> cart pod IP (plaintext, allowed) with {plain}: {}",
                o2.describe()
            ));
            let seen1 = e2e::contains(&bytes, secret.as_bytes());
            let seen2 = e2e::contains(&bytes, plain.as_bytes());
            let (segments, hbone) = mesh::pcap_tcp_counts(&bytes);
            say(&format!(
                "capture: {segments} TCP segments ({hbone} on HBONE port 15008); mesh marker {}; control marker {}",
                if seen1 {
                    "FOUND in clear"
                } else {
                    "absent (encrypted in HBONE/mTLS on port 15008)"
                },
                if seen2 {
                    "found in clear (as expected)"
                } else {
                    "absent"
                },
            ));
            r.record(
                "c. mesh bytes on node link",
                exp_mesh,
                format!(
                    "request {}, marker {} in {segments} segments ({hbone} HBONE)",
                    if o1.answered() && o1.body().contains(&secret) {
                        "answered"
                    } else {
                        "FAILED"
                    },
                    if seen1 { "found" } else { "absent" },
                ),
                o1.answered() && o1.body().contains(&secret) && !seen1 && hbone > 0,
            );
            r.record(
                "c. control: plaintext",
                exp_ctl,
                format!(
                    "request {}, marker {}",
                    if o2.answered() { "answered" } else { "FAILED" },
                    if seen2 { "found" } else { "absent" }
                ),
                o2.answered() && seen2,
            );
        }
        Err(e) => r.record(
            "c. mesh bytes on node link",
            exp_mesh,
            format!("error: {e:#}"),
            false,
        ),
    }
}

/// d. Live edits of the manifest directory, applied through the control
/// plane (no restarts).
fn step_d(m: &mut Mesh, r: &mut Report) {
    heading(&format!(
        "d. live edits of the manifests in {} (xds -> both ztunnels, no restarts)",
        m.manifests().display()
    ));
    let pids: Vec<u32> =
        m.c.ztunnels()
            .iter()
            .map(|(_, z)| z.pid())
            .chain(m.c.xds().map(|x| x.pid()))
            .collect();

    let exp = "denied after the push";
    r.step("d1. add DENY frontend->catalog", exp, |r| {
        say(&format!(
            "edit: new file {} (AuthorizationPolicy shop/catalog-no-frontend: DENY from principals [cluster.local/ns/shop/sa/frontend])",
            m.deny_frontend_file().display()
        ));
        let before = m.state_versions()?;
        let t = Instant::now();
        m.write_deny_frontend()?;
        mesh::wait_for(
            Duration::from_secs(10),
            "node-2's ztunnel to receive the policy",
            || Ok(m.policies(&m.node2)?.iter().any(|p| p == "shop/catalog-no-frontend")),
        )?;
        let after = m.state_versions()?;
        say(&format!(
            "xds pushed it; node-2's ztunnel holds it {} ms after the write (stateVersion {:?} -> {:?})",
            t.elapsed().as_millis(),
            before,
            after
        ));
        let m2 = m.log_mark(&m.node2);
        let out = m.request(&m.frontend, vip(CATALOG_VIP), "/items");
        say(&format!("frontend -> catalog: {}", out.describe()));
        let l = m.wait_access(&m.node2, m2, "node-2's refusal", |l| {
            l.refused && l.src_ip() == m.frontend.ip().to_string()
        })?;
        say(&format!("node-2 ztunnel: {}", l.get("error")));
        r.record(
            "d1. add DENY frontend->catalog",
            exp,
            format!("{}; ztunnel: {}", out.short(), l.get("error")),
            !out.answered() && l.get("error").contains("catalog-no-frontend"),
        );
        Ok(())
    });

    let exp = "allowed again";
    r.step("d2. delete that policy file", exp, |r| {
        say("edit: rm policy-catalog-no-frontend.yaml");
        std::fs::remove_file(m.deny_frontend_file())?;
        mesh::wait_for(
            Duration::from_secs(10),
            "node-2's ztunnel to drop the policy",
            || {
                Ok(!m
                    .policies(&m.node2)?
                    .iter()
                    .any(|p| p == "shop/catalog-no-frontend"))
            },
        )?;
        let out = m.request(&m.frontend, vip(CATALOG_VIP), "/items");
        say(&format!("frontend -> catalog: {}", out.describe()));
        r.record(
            "d2. delete that policy file",
            exp,
            out.short(),
            out.answered() && out.body().contains("shop/catalog"),
        );
        Ok(())
    });

    let exp = "both replicas answer";
    r.step("d3. scale cart to 2", exp, |r| {
        let c2 = m.add_cart2()?;
        say(&format!(
            "new pod shop/cart-2 on node-1 ({}): netns + cgroup, CNI ADD ({}), then its Pod manifest {} (label app: cart, so service cart selects it)",
            c2.ip(),
            if m.is_pinned(&c2) { "enrolled" } else { "NOT enrolled" },
            m.pod_file(&c2).display()
        ));
        mesh::wait_for(
            Duration::from_secs(10),
            "node-1's ztunnel to learn cart-2",
            || {
                let d = m.config_dump(&m.node1)?;
                Ok(d["workloads"]
                    .as_array()
                    .is_some_and(|ws| ws.iter().any(|w| w["name"] == "cart-2")))
            },
        )?;
        let (mut n1, mut n2, mut other) = (0, 0, 0);
        for i in 0..20 {
            if interrupted() {
                break;
            }
            let out = m.request(&m.frontend, vip(CART_VIP), &format!("/cart/{i}"));
            match out.who() {
                Some("shop/cart-2") => n2 += 1,
                Some("shop/cart") => n1 += 1,
                _ => other += 1,
            }
        }
        say(&format!(
            "20 requests frontend -> cart VIP: shop/cart (node-2) answered {n1}, shop/cart-2 (node-1, same node as frontend) answered {n2}, failed {other}"
        ));
        r.record(
            "d3. scale cart to 2",
            exp,
            format!("cart {n1}, cart-2 {n2}, failed {other} of 20"),
            n1 > 0 && n2 > 0 && other == 0,
        );
        Ok(())
    });

    let exp = "cart-2 leaves service cart";
    r.step("d4. relabel cart-2", exp, |r| {
        let c2 = m.relabel_cart2("cart-canary")?;
        say(&format!(
            "edit: {}: labels app: cart -> app: cart-canary",
            m.pod_file(&c2).display()
        ));
        let mut st = None;
        mesh::wait_for(
            Duration::from_secs(10),
            "node-1's ztunnel to see the new label",
            || {
                st = m.cart2_state()?;
                Ok(st.as_ref().is_some_and(|(l, _)| l == "cart-canary"))
            },
        )?;
        let services = st.map(|(_, s)| s).unwrap_or_default();
        say(&format!(
            "node-1's ztunnel: shop/cart-2 now has app=cart-canary and backs services {services:?}"
        ));
        let (mut n1, mut n2, mut other) = (0, 0, 0);
        for i in 0..10 {
            if interrupted() {
                break;
            }
            let out = m.request(&m.frontend, vip(CART_VIP), &format!("/after-relabel/{i}"));
            match out.who() {
                Some("shop/cart-2") => n2 += 1,
                Some("shop/cart") => n1 += 1,
                _ => other += 1,
            }
        }
        say(&format!(
            "10 requests frontend -> cart VIP: shop/cart answered {n1}, shop/cart-2 {n2}, failed {other}"
        ));
        r.record(
            "d4. relabel cart-2",
            exp,
            format!("services {services:?}; cart {n1}, cart-2 {n2}, failed {other} of 10"),
            services.is_empty() && n1 == 10,
        );
        Ok(())
    });

    let exp = "reported, skipped, rest kept";
    r.step("d5. a bad manifest", exp, |r| {
        let bad = m.manifests().join("broken.yaml");
        say(&format!(
            "edit: {} with a Service whose port is \"eighty\"",
            bad.display()
        ));
        mesh::write_atomic(
            &bad,
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: shop}\nspec:\n  clusterIP: 10.96.0.99\n  ports: [{port: eighty}]\n",
        )?;
        let mut errs = String::new();
        mesh::wait_for(
            Duration::from_secs(10),
            "the control plane to report it",
            || {
                errs = m.xds_errors()?;
                Ok(errs.contains("broken.yaml"))
            },
        )?;
        let line = errs
            .lines()
            .find(|l| l.contains("broken.yaml"))
            .unwrap_or("")
            .to_string();
        say(&format!("xds /debug/errors: {}", shorten(&line, 200)));
        let out = m.request(&m.frontend, vip(CART_VIP), "/still-there");
        say(&format!("frontend -> cart still: {}", out.describe()));
        std::fs::remove_file(&bad)?;
        mesh::wait_for(Duration::from_secs(10), "the error to clear", || {
            Ok(!m.xds_errors()?.contains("broken.yaml"))
        })?;
        say("removed the file; the error cleared");
        r.record(
            "d5. a bad manifest",
            exp,
            format!(
                "reported ({}); traffic {}",
                shorten(line.split_once(": ").map_or(line.as_str(), |x| x.1), 50),
                if out.answered() { "flows" } else { "FAILED" }
            ),
            !line.is_empty() && out.answered(),
        );
        Ok(())
    });

    let exp = "same xds and ztunnel pids";
    r.step("d6. no restarts", exp, |r| {
        let now: Vec<u32> =
            m.c.ztunnels()
                .iter()
                .map(|(_, z)| z.pid())
                .chain(m.c.xds().map(|x| x.pid()))
                .collect();
        let running = m.c.ztunnels().iter().all(|(_, z)| z.is_running())
            && m.c.xds().is_some_and(|x| x.is_running());
        r.record(
            "d6. no restarts",
            exp,
            format!("pids {pids:?} -> {now:?}, running: {running}"),
            now == pids && running,
        );
        Ok(())
    });
}

/// Requests the waypoint counted (`istio_requests_total`) with `needles`.
fn wp_requests(m: &Mesh, needles: &[&str]) -> u64 {
    m.waypoint_get("/metrics")
        .map(|t| counter(&t, "istio_requests_total", needles))
        .unwrap_or(0)
}

/// e. Namespace store uses a waypoint: L7 routing from HTTPRoutes that the
/// control plane translates and sends to the waypoint over xDS.
fn step_e(m: &mut Mesh, r: &mut Report) {
    heading("e. namespace store uses the waypoint `waypoint`: HTTPRoutes -> control plane -> xDS -> waypoint");
    let exp = "store, waypoint and reviews v1/v2 up";
    let progress = |s: &str| say(s);
    r.step("e. waypoint set-up", exp, |r| {
        m.add_store(&progress)?;
        say(&format!(
            "manifests: Namespace store {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}, Gateway waypoint (istio-waypoint, mesh/15008/HBONE), Services waypoint, reviews, reviews-v1, reviews-v2 (ports {SERVICE_PORT} and {GRPC_PORT}/grpc), Pods"
        ));
        r.record(
            "e. waypoint set-up",
            exp,
            "store/waypoint-1 ready (xDS); reviews-v1, reviews-v2 enrolled",
            true,
        );
        Ok(())
    });
    let Some(st) = m.store.as_ref() else { return };
    let (wp, v1, v2) = (st.waypoint.app.clone(), st.v1.clone(), st.v2.clone());
    let fe = m.frontend.clone();
    let dst = vip(REVIEWS_VIP);
    let via = [
        "reporter=\"waypoint\"",
        &format!("source_principal=\"{}\"", fe.spiffe()),
    ];

    let (w1, w2) = REVIEWS_WEIGHTS;
    let exp = "waypoint config has the routes";
    r.step("e. HTTPRoutes over xDS", exp, |r| {
        say(&format!(
            "edit: new file {} (HTTPRoute store/reviews: {w1}/{w2} to reviews-v1/v2; HTTPRoute store/reviews-grpc: {HELLO_PATH} to v1, {ECHO_PATH} to v2)",
            m.manifests().join(mesh::Store::ROUTES).display()
        ));
        let t = Instant::now();
        m.write_store_routes()?;
        m.waypoint()?.wait_config(
            Duration::from_secs(20),
            "the waypoint to take the HTTPRoutes",
            |d| {
                let s = d.to_string();
                s.contains("store/reviews.0.0") && s.contains("store/reviews-grpc.1.0")
            },
        )?;
        let ms = t.elapsed().as_millis();
        say(&format!(
            "the control plane translated them into Envoy routes and clusters; the waypoint has them {ms} ms after the write"
        ));
        r.record(
            "e. HTTPRoutes over xDS",
            exp,
            format!("routes store/reviews, store/reviews-grpc in force after {ms} ms"),
            true,
        );
        Ok(())
    });
    if interrupted() {
        return;
    }

    // The control plane pushes the waypoint assignment; until node-1's
    // ztunnel has it, requests go straight to a reviews pod.
    let exp = "frontend -> ztunnel -> waypoint -> ztunnel -> reviews";
    r.step("e. reviews VIP via waypoint", exp, |r| {
        mesh::wait_for(
            Duration::from_secs(20),
            "the first request through the waypoint",
            || {
                let _ = m.request(&fe, dst, "/warm-up");
                Ok(wp_requests(m, &via) > 0)
            },
        )?;
        let n1 = m.log_mark(&m.node1);
        let out = m.request(&fe, dst, "/reviews/1");
        say(&format!("frontend -> reviews {dst}: {}", out.describe()));
        let o = m.wait_access(
            &m.node1,
            n1,
            "node-1's outbound access line to the waypoint",
            |l| l.src_ip() == fe.ip().to_string() && l.get("direction") == "outbound",
        )?;
        say(&format!(
            "node-1 ztunnel (outbound): service {} -> sent to {} ({}), tunnelled as {}",
            o.get("dst.service"),
            o.get("dst.addr"),
            o.get("dst.workload"),
            o.get("src.identity"),
        ));
        let log = m.waypoint_log();
        let access = log
            .lines()
            .rev()
            .find(|l| l.contains("access") && l.contains("/reviews/1"))
            .unwrap_or("");
        say(&format!(
            "waypoint access log: {}",
            shorten(access.trim(), 400)
        ));
        let ok = out.answered()
            && out.body().contains("store/reviews-v")
            && o.get("dst.workload") == wp.key()
            && !access.is_empty();
        r.record(
            "e. reviews VIP via waypoint",
            exp,
            format!(
                "{} via {} ({})",
                out.short(),
                o.get("dst.addr"),
                o.get("dst.workload")
            ),
            ok,
        );
        Ok(())
    });
    if interrupted() {
        return;
    }

    let n: u64 = 200;
    // ±4 standard deviations of a binomial(n, w2/(w1+w2)) count.
    let p2 = f64::from(w2) / f64::from(w1 + w2);
    let tol = (4.0 * (n as f64 * p2 * (1.0 - p2)).sqrt()).ceil() as u64;
    let want2 = (n as f64 * p2).round() as u64;
    let exp = format!("{n} requests ~{w1}/{w2} (v2 {want2}±{tol}), waypoint counted them");
    r.step("e. weighted split v1/v2", &exp, |r| {
        let wv = |a: &App| {
            wp_requests(
                m,
                &[
                    "reporter=\"waypoint\"",
                    &format!("source_principal=\"{}\"", fe.spiffe()),
                    &format!("destination_principal=\"{}\"", a.spiffe()),
                    &format!("destination_workload=\"{}\"", a.name),
                    "response_code=\"200\"",
                ],
            )
        };
        let (b1, b2) = (wv(&v1), wv(&v2));
        let urls: Vec<String> = (0..n).map(|i| format!("{dst}/reviews/{i}")).collect();
        let replies = m.c.http_many(&fe, &urls, &[], false);
        let (mut c1, mut c2, mut other) = (0u64, 0u64, 0u64);
        for rep in &replies {
            match (rep.code, rep.served_by.as_str()) {
                (200, "store/reviews-v1") => c1 += 1,
                (200, "store/reviews-v2") => c2 += 1,
                _ => other += 1,
            }
        }
        let mut counted = (0, 0);
        let _ = mesh::wait_for(Duration::from_secs(5), "the waypoint's metrics", || {
            counted = (wv(&v1) - b1, wv(&v2) - b2);
            Ok(counted.0 + counted.1 >= c1 + c2)
        });
        say(&format!(
            "one curl, {n} requests on one connection: reviews-v1 {c1}, reviews-v2 {c2}, other/failed {other} (HTTPRoute weights {w1}/{w2}; the waypoint picks per request)"
        ));
        say(&format!(
            "waypoint istio_requests_total (reporter=waypoint, 200): to v1 +{}, to v2 +{}",
            counted.0, counted.1
        ));
        let ok = other == 0 && c1 + c2 == n && c2.abs_diff(want2) <= tol && counted == (c1, c2);
        r.record(
            "e. weighted split v1/v2",
            &exp,
            format!(
                "v1 {c1} / v2 {c2} of {n}; waypoint counted {}/{}",
                counted.0, counted.1
            ),
            ok,
        );
        Ok(())
    });
    if interrupted() {
        return;
    }

    let exp = "Hello -> reviews-v1, Echo -> reviews-v2";
    r.step("e. gRPC routed by method", exp, |r| {
        let addr = format!("{REVIEWS_VIP}:{GRPC_PORT}");
        let (mut hello, mut echo) = (Vec::new(), Vec::new());
        for i in 0..5 {
            hello.push(m.c.grpc_call(&fe, &addr, "hello", &format!("demo {i}"))?);
            echo.push(m.c.grpc_call(&fe, &addr, "echo", &format!("demo {i}"))?);
        }
        let by = |v: &[(String, String)]| {
            let mut s: Vec<&str> = v.iter().map(|x| x.0.as_str()).collect();
            s.dedup();
            s.join(",")
        };
        say(&format!(
            "sample-grpc call {addr} from frontend, 5 x Hello: answered by {} (\"{}\"); 5 x Echo: answered by {} (\"{}\")",
            by(&hello),
            hello.first().map(|x| x.1.as_str()).unwrap_or(""),
            by(&echo),
            echo.first().map(|x| x.1.as_str()).unwrap_or(""),
        ));
        let ok = hello.iter().all(|x| x.0 == v1.key() && x.1.starts_with("hello demo"))
            && echo.iter().all(|x| x.0 == v2.key() && x.1.starts_with("demo"));
        r.record(
            "e. gRPC routed by method",
            exp,
            format!("Hello -> {}, Echo -> {}", by(&hello), by(&echo)),
            ok,
        );
        Ok(())
    });
    if interrupted() {
        return;
    }

    let exp = "403 from the waypoint, reviews never asked";
    r.step("e. L7 DENY /admin", exp, |r| {
        say(&format!(
            "edit: new file {} (AuthorizationPolicy store/reviews-no-admin, targetRefs Gateway waypoint: DENY paths [/admin*])",
            m.manifests().join(mesh::Store::DENY).display()
        ));
        m.write_store_deny()?;
        m.waypoint()?.wait_config(
            Duration::from_secs(20),
            "the waypoint to take the policy",
            |d| d.to_string().contains("reviews-no-admin"),
        )?;
        let denied = m.c.http(&fe, &format!("{dst}/admin/stats"), &[]);
        let allowed = m.c.http(&fe, &format!("{dst}/reviews/after-policy"), &[]);
        let reached: Vec<String> = [&v1, &v2]
            .iter()
            .flat_map(|a| m.server_paths(a))
            .filter(|p| p.starts_with("/admin"))
            .collect();
        say(&format!(
            "frontend -> reviews /admin/stats: {} (\"{}\"); /reviews/after-policy: {}; /admin requests that reached a reviews pod: {}",
            denied.code,
            denied.body.trim(),
            allowed.describe(),
            reached.len()
        ));
        r.record(
            "e. L7 DENY /admin",
            exp,
            format!(
                "/admin/stats {}, reached reviews {} times; /reviews {}",
                denied.code,
                reached.len(),
                allowed.code
            ),
            denied.code == 403 && reached.is_empty() && allowed.ok(),
        );
        Ok(())
    });
    if interrupted() {
        return;
    }

    let exp = "frontend -> waypoint, waypoint -> v1/v2 (mTLS)";
    r.step("e. identities per leg", exp, |r| {
        // Leg 1: node-1's ztunnel tunnelled frontend's traffic to the
        // waypoint's identity.
        let z1 = m.metrics(&m.node1)?;
        let leg1 = [
            "reporter=\"source\"",
            &format!("source_principal=\"{}\"", fe.spiffe()),
            &format!("destination_principal=\"{}\"", wp.spiffe()),
        ];
        let l1 = counter(&z1, "istio_tcp_connections_opened_total", &leg1);
        if let Some(l) = metric_line(&z1, "istio_tcp_connections_opened_total", &leg1) {
            say(&format!("leg 1, node-1 metrics: {}", shorten(l, 300)));
        }
        // The waypoint saw frontend's certificate.
        let w = wp_requests(m, &via);
        say(&format!(
            "waypoint: {w} requests with peer identity {}",
            fe.spiffe()
        ));
        // Leg 2: the reviews pods' ztunnels saw the waypoint's certificate.
        let mut leg2 = Vec::new();
        for (node, a) in [(&m.node1, &v1), (&m.node2, &v2)] {
            let z = m.metrics(node)?;
            let needles = [
                "reporter=\"destination\"",
                &format!("source_principal=\"{}\"", wp.spiffe()),
                &format!("destination_principal=\"{}\"", a.spiffe()),
            ];
            let c = counter(&z, "istio_tcp_connections_opened_total", &needles);
            if let Some(l) = metric_line(&z, "istio_tcp_connections_opened_total", &needles) {
                say(&format!(
                    "leg 2, {} metrics: {}",
                    node.name(),
                    shorten(l, 300)
                ));
            }
            leg2.push(c);
        }
        let ok = l1 > 0 && w > 0 && leg2.iter().all(|&c| c > 0);
        r.record(
            "e. identities per leg",
            exp,
            format!(
                "{} -> {}: {l1} conns; {} -> reviews: v1 {}, v2 {}",
                fe.name, wp.name, wp.name, leg2[0], leg2[1]
            ),
            ok,
        );
        Ok(())
    });
}

fn print_playground(m: &Mesh) {
    let n1 = m.node1.netns();
    let n2 = m.node2.netns();
    let cp = m.c.control().netns();
    let dir = m.c.tb.dir().display().to_string();
    let logs: Vec<String> =
        m.c.ztunnels()
            .iter()
            .map(|(_, z)| z.log_path().display().to_string())
            .collect();
    let xlog =
        m.c.xds()
            .map(|x| x.log_path().display().to_string())
            .unwrap_or_default();
    let f = m.frontend.pod.netns();
    let b = m.batch.pod.netns();
    let pods: Vec<&App> = [&m.frontend, &m.batch, &m.cart, &m.catalog]
        .into_iter()
        .chain(m.cart2.as_ref())
        .chain(m.store.iter().flat_map(|s| [&s.waypoint.app, &s.v1, &s.v2]))
        .collect();
    heading("The mesh is up. Poke at it (as root, in another terminal)");
    println!(
        r#"
Every pod is a network namespace and a cgroup. `ip netns exec <netns> CMD`
runs CMD in a pod's network; the pod's eBPF capture (cgroup connect4/6 and
sockops) sees CMD's outbound connections once CMD is also in the pod's cgroup,
as a container runtime puts the app there:
  sh -c 'echo $$ > <cgroup>/cgroup.procs; exec ip netns exec <netns> CMD'

  pod                node    netns / cgroup
{pod_rows}
Call through the mesh, as shop/frontend (cart answers; cart-2 left the service
when the demo relabelled it app: cart-canary; set app: cart again in
{cart2_file} and it shares the load again):
  sh -c 'echo $$ > {fcg}/cgroup.procs; exec ip netns exec {f} curl -s http://{CART_VIP}/hello'
  sh -c 'echo $$ > {fcg}/cgroup.procs; exec ip netns exec {f} curl -s http://{CATALOG_VIP}/items'

Be refused, as legacy/batch (outside the mesh; policy shop/catalog-shop-only);
curl reports an empty reply or a reset, and node-2's log says why:
  ip netns exec {b} curl -sS http://{cat}:8080/items

Watch every connection (one access line each, with both identities):
  tail -f {logs}

Change the mesh: edit the manifests; the control plane (log: {xlog}) picks
up changes within a second and pushes them to both ztunnels over xDS.
  ls {manifests}
  e.g. add an AuthorizationPolicy (security.istio.io/v1) with action DENY, or
  change a Pod's label app: cart to something else and watch the cart VIP
  lose that endpoint. Bad manifests are skipped and listed at:
  ip netns exec {cp} curl -s 127.0.0.1:15014/debug/errors
  Control plane metrics: ip netns exec {cp} curl -s 127.0.0.1:15014/metrics

Full state and metrics of a node's ztunnel:
  ip netns exec {n1} curl -s 127.0.0.1:15000/config_dump
  ip netns exec {n2} curl -s 127.0.0.1:15020/metrics | grep istio_tcp_connections_opened_total

{waypoint_text}
See ciphertext on the node link while you call catalog (cart-2 is on node-1
itself, so its answers never cross the link):
  ip netns exec {n1} tcpdump -ni eth0 -A tcp port 15008

All files (manifests, CA, tokens, logs, captures): {dir}
Press Ctrl-C to stop; everything ({prefix}-* namespaces, cgroups, pins, processes, files) is removed."#,
        pod_rows = pods
            .iter()
            .map(|a| format!(
                "  {:<18} {:<7} {}{}\n  {:<26} {}\n",
                a.key(),
                a.node(),
                a.pod.netns(),
                if !m.c.in_mesh(&a.namespace) {
                    "  (not in the mesh)"
                } else {
                    ""
                },
                "",
                a.pod
                    .cgroup()
                    .map(|c| c.display().to_string())
                    .unwrap_or_default(),
            ))
            .collect::<String>(),
        fcg = m
            .frontend
            .pod
            .cgroup()
            .map(|c| c.display().to_string())
            .unwrap_or_default(),
        logs = logs.join(" "),
        cart2_file = m
            .cart2
            .as_ref()
            .map(|c| m.pod_file(c).display().to_string())
            .unwrap_or_else(|| "pod-shop-cart-2.yaml".into()),
        cat = m.catalog.ip(),
        manifests = m.manifests().display(),
        prefix = m.c.tb.prefix(),
        waypoint_text = waypoint_playground(m),
    );
}

/// How to look at the waypoint, if the waypoint step set it up.
fn waypoint_playground(m: &Mesh) -> String {
    let Some(st) = m.store.as_ref() else {
        return String::new();
    };
    let w = st.waypoint.app.pod.netns();
    let fcg = m
        .frontend
        .pod
        .cgroup()
        .map(|c| c.display().to_string())
        .unwrap_or_default();
    let (w1, w2) = REVIEWS_WEIGHTS;
    format!(
        r#"The waypoint of namespace store (pod {wkey}, netns {w}; log {log}):
call reviews ({w1}/{w2} between v1 and v2) and look at what the waypoint did:
  sh -c 'echo $$ > {fcg}/cgroup.procs; exec ip netns exec {f} curl -s http://{REVIEWS_VIP}/reviews'
  ip netns exec {w} curl -s 127.0.0.1:15000/config_dump
  ip netns exec {w} curl -s 127.0.0.1:15020/metrics | grep istio_requests_total
Its routes come from the HTTPRoutes in {routes}: change the weights (or
add a rule) and the control plane pushes the new routes to the waypoint
over xDS within a second. The namespace's label, the Gateway and the
Services are in {manifests}.
"#,
        wkey = st.waypoint.app.key(),
        log = st.waypoint.child.log_path().display(),
        f = m.frontend.pod.netns(),
        routes = m.manifests().join(mesh::Store::ROUTES).display(),
        manifests = m.manifests().display(),
    )
}
