//! `bench xds`: the control plane at scale, on loopback.
//!
//! Generates a manifest directory (default 10,000 pods in 100 namespaces
//! on 100 nodes, 2,000 services, 500 policies), starts the release `xds`
//! binary on it, connects N delta ADS clients (wildcard on both types,
//! ACKing every response) and measures:
//! - first full sync: from N streams opening at once until every client
//!   has both types; baseline: the same sync to a single client on its own
//!   (the ratio is the cost of the fan-out, N times the data);
//! - change -> all acknowledged: a pod added in a small file, from the
//!   write until the last client has received and ACKed it (p50/p99 over
//!   `--changes` changes); baseline: the same changes while only the
//!   single client is connected (the ratio is the cost of N streams);
//! - the CPU seconds of each sync: the server's, the clients' (this
//!   process) and everything else's (the machine's other load);
//! - the server's RSS and peak RSS, and the RSS of a ztunnel (node-0)
//!   holding the whole state from the same server.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use mesh_proto::core::Node;
// Clients read responses with the encoded-resources view of the same
// messages: each resource stays a slice of the received buffer. They stand
// for 100 nodes' ztunnels, whose decoding happens on their own machines;
// here it would only compete with the server for the same two cores.
use mesh_proto::discovery::encoded::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, Resource};
use mesh_proto::type_url::{ADDRESS, AUTHORIZATION};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::procstat;

#[derive(Args, Debug)]
pub struct XdsArgs {
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
    #[arg(long, default_value_t = 2_000)]
    pub services: usize,
    #[arg(long, default_value_t = 500)]
    pub policies: usize,
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    #[arg(long, default_value_t = 30)]
    pub changes: usize,
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

const NAMESPACES: usize = 100;

fn generate(dir: &Path, a: &XdsArgs) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let svc_per_ns = a.services.div_ceil(NAMESPACES);
    let pol_per_ns = a.policies.div_ceil(NAMESPACES);
    let mut files = vec![String::new(); NAMESPACES];
    for (n, f) in files.iter_mut().enumerate() {
        writeln!(f, "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}")?;
    }
    for i in 0..a.pods {
        let n = i % NAMESPACES;
        let app = (i / NAMESPACES) % svc_per_ns.max(1);
        writeln!(
            files[n],
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{n}, labels: {{app: app-{app}}}, annotations: {{ambient.istio.io/redirection: enabled}}}}\nspec: {{nodeName: node-{node}, serviceAccountName: sa-{app}, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: 10.{b}.{c}.{d}}}",
            node = i % 100,
            b = 1 + i / 65536,
            c = (i / 256) % 256,
            d = i % 256,
        )?;
    }
    for k in 0..a.services {
        let n = k % NAMESPACES;
        let app = k / NAMESPACES;
        writeln!(
            files[n],
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{app}, namespace: ns-{n}}}\nspec: {{selector: {{app: app-{app}}}, clusterIP: 10.96.{}.{}, ports: [{{port: 80, targetPort: 8080}}]}}",
            k / 256,
            k % 256
        )?;
    }
    for p in 0..a.policies {
        let n = p % NAMESPACES;
        let j = p / NAMESPACES;
        writeln!(
            files[n],
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{j}, namespace: ns-{n}}}\nspec:\n  selector: {{matchLabels: {{app: app-{j}}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/ns-{n}/sa/sa-{j}\"]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]"
        )?;
    }
    let _ = pol_per_ns;
    for (n, f) in files.iter().enumerate() {
        std::fs::write(dir.join(format!("ns-{n}.yaml")), f)?;
    }
    Ok(())
}

fn change_pod(dir: &Path, k: usize) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: change-{k}, namespace: ns-0, labels: {{app: app-0}}, annotations: {{ambient.istio.io/redirection: enabled}}}}\nspec: {{nodeName: node-0, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: 10.200.{}.{}}}\n",
        k / 256,
        k % 256
    );
    let tmp = dir.join(".change.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("change.yaml"))?;
    Ok(())
}

struct ChildKill(Child);
impl Drop for ChildKill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn ready_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut raw = String::new();
    s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n").is_ok()
        && s.read_to_string(&mut raw).is_ok()
        && e2e::mesh::parse_response(&raw).is_some_and(|(c, _)| c == 200)
}

/// Adds pods `range` one at a time (200 ms apart) and returns, for each,
/// the time from the write until `total` clients had received it.
async fn changes(
    dir: &Path,
    range: std::ops::Range<usize>,
    total: usize,
    seen_rx: &mut mpsc::UnboundedReceiver<(String, Instant)>,
) -> Result<Vec<f64>> {
    let mut lat = Vec::new();
    for k in range {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while seen_rx.try_recv().is_ok() {}
        let name = format!("Kubernetes//Pod/ns-0/change-{k}");
        let t = Instant::now();
        change_pod(dir, k)?;
        let mut got = 0;
        let mut last = t;
        while got < total {
            let (n, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await?
                .ok_or_else(|| anyhow!("clients gone"))?;
            if n == name {
                got += 1;
                last = at;
            }
        }
        lat.push((last - t).as_secs_f64() * 1000.0);
    }
    Ok(lat)
}

/// CPU seconds spent by the server, by this process (the clients) and by
/// everything else on the machine (other builds and benchmarks: the wall
/// times are only comparable when that is small).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    server: f64,
    clients: f64,
    other: f64,
}

impl Cpu {
    /// Totals so far (`other`: all processes' busy time).
    fn now(server: u32) -> Result<Cpu> {
        Ok(Cpu {
            server: procstat::cpu_seconds(server)?,
            clients: procstat::cpu_seconds(std::process::id())?,
            other: procstat::system_busy_seconds()?,
        })
    }

    /// What was spent since `before`.
    fn since(&self, before: &Cpu) -> Cpu {
        let server = self.server - before.server;
        let clients = self.clients - before.clients;
        let busy = self.other - before.other;
        Cpu {
            server,
            clients,
            other: (busy - server - clients).max(0.0),
        }
    }

    fn row(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.server, self.clients, self.other
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"server": self.server, "clients": self.clients, "other": self.other})
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// One client: wildcard on both types, ACK everything. Reports when it
/// has both types, and each name it receives (for the change probes).
async fn client(
    ch: Channel,
    node: String,
    synced: mpsc::Sender<usize>,
    seen: mpsc::UnboundedSender<(String, Instant)>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel(8);
    for (i, t) in [ADDRESS, AUTHORIZATION].iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: node.clone(),
                ..Default::default()
            }),
            type_url: t.to_string(),
            ..Default::default()
        })
        .await?;
    }
    let mut c = AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(usize::MAX);
    let mut inbound = c
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut types = 0;
    let mut count = 0;
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Some(resp) = m? else { return Ok(()) };
                tx.send(DeltaDiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                })
                .await?;
                let now = Instant::now();
                count += resp.resources.len();
                if types < 2 {
                    if !resp.system_version_info.ends_with("/partial") {
                        types += 1;
                        if types == 2 {
                            let _ = synced.send(count).await;
                        }
                    }
                } else if resp.resources.len() < 16 {
                    for raw in resp.resources.iter() {
                        let r = Resource::decode(raw)?;
                        if r.name.contains("/change-") {
                            let _ = seen.send((r.name, now));
                        }
                    }
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

pub fn run(a: &XdsArgs) -> Result<String> {
    let exe = std::env::current_exe()?;
    let bindir = exe.parent().ok_or_else(|| anyhow!("no bin dir"))?;
    let xds_bin = bindir.join("xds");
    let zt_bin = bindir.join("ztunnel");
    let tmp = std::env::temp_dir().join(format!("xds-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let dir = tmp.join("manifests");
    let t = Instant::now();
    generate(&dir, a)?;
    eprintln!("bench: generated manifests in {:?}", t.elapsed());
    let port = free_port()?;
    let mport = free_port()?;
    let started = Instant::now();
    let server = ChildKill(
        Command::new(&xds_bin)
            .arg("--manifests")
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{mport}")])
            .arg("--ca-cert")
            .arg(tmp.join("ca.crt"))
            .arg("--ca-key")
            .arg(tmp.join("ca.key"))
            .args(["--insecure-no-auth", "--debounce", "5ms"])
            .env(
                "RUST_LOG",
                std::env::var("XDS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", xds_bin.display()))?,
    );
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(anyhow!("xds did not start"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let startup = started.elapsed();
    let root = std::fs::read_to_string(tmp.join("ca.crt"))?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut out = String::new();
    let res: Result<()> = rt.block_on(async {
        let ep = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&root))
                .domain_name("localhost"),
        )?;
        let (stop_tx, stop_rx) = watch::channel(false);
        // A single client first.
        let (stx, mut srx) = mpsc::channel(a.clients + 1);
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let cpu0 = Cpu::now(server.0.id())?;
        let t0 = Instant::now();
        let ch = ep.connect().await?;
        tokio::spawn(client(
            ch,
            "node-0".into(),
            stx.clone(),
            seen_tx.clone(),
            stop_rx.clone(),
        ));
        let synced_resources = srx.recv().await.ok_or_else(|| anyhow!("client failed"))?;
        let single = t0.elapsed();
        let cpu1 = Cpu::now(server.0.id())?.since(&cpu0);
        let expected = a.pods + a.services + a.policies;
        if synced_resources != expected {
            return Err(anyhow!(
                "client synced {synced_resources} resources, expected {expected}"
            ));
        }
        // Changes with that one client only: the baseline.
        let mut lat1 = changes(&dir, 0..a.changes, 1, &mut seen_rx).await?;
        // Then N at once, each with its own connection.
        let mut chans = Vec::new();
        for _ in 0..a.clients {
            chans.push(ep.connect().await?);
        }
        let load = procstat::loadavg_1m();
        let cpu0 = Cpu::now(server.0.id())?;
        let t0 = Instant::now();
        for (k, ch) in chans.into_iter().enumerate() {
            tokio::spawn(client(
                ch,
                format!("node-{k}"),
                stx.clone(),
                seen_tx.clone(),
                stop_rx.clone(),
            ));
        }
        for _ in 0..a.clients {
            srx.recv().await.ok_or_else(|| anyhow!("a client failed"))?;
        }
        let all = t0.elapsed();
        let cpu_n = Cpu::now(server.0.id())?.since(&cpu0);
        let rss = procstat::rss_mib(server.0.id())?;
        let mut lat = changes(&dir, a.changes..2 * a.changes, a.clients + 1, &mut seen_rx).await?;
        let hwm = procstat::hwm_mib(server.0.id())?;
        let _ = stop_tx.send(true);
        // A ztunnel holding the whole state.
        let ready = free_port()?;
        let z = ChildKill(
            Command::new(&zt_bin)
                .args(["--node", "node-0"])
                .args(["--xds-address", &format!("https://127.0.0.1:{port}")])
                .args(["--xds-server-name", "localhost"])
                .arg("--xds-root-cert")
                .arg(tmp.join("ca.crt"))
                .arg("--ca-cert")
                .arg(tmp.join("zt-ca.crt"))
                .arg("--ca-key")
                .arg(tmp.join("zt-ca.key"))
                .args([
                    "--outbound-addr",
                    "127.0.0.1:0",
                    "--inbound-plaintext-addr",
                    "127.0.0.1:0",
                ])
                .args([
                    "--inbound-addr",
                    "127.0.0.1:0",
                    "--admin-addr",
                    "127.0.0.1:0",
                ])
                .args(["--metrics-addr", "127.0.0.1:0"])
                .args(["--readiness-addr", &format!("127.0.0.1:{ready}")])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", zt_bin.display()))?,
        );
        let zt0 = Instant::now();
        loop {
            let ok = ready_ok(ready);
            if ok {
                break;
            }
            if zt0.elapsed() > Duration::from_secs(60) {
                return Err(anyhow!("ztunnel did not become ready"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let zt_sync = zt0.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let zrss = procstat::rss_mib(z.0.id())?;
        let (p50, p99) = (pct(&mut lat.clone(), 0.5), pct(&mut lat, 0.99));
        let (p50_1, p99_1) = (pct(&mut lat1.clone(), 0.5), pct(&mut lat1, 0.99));
        let (single_ms, all_ms) = (single.as_secs_f64() * 1000.0, all.as_secs_f64() * 1000.0);
        let json = serde_json::json!({
            "benchmark": "xds",
            "pods": a.pods, "services": a.services, "policies": a.policies, "clients": a.clients,
            "server_start_ms": startup.as_secs_f64() * 1000.0,
            "first_full_sync_single_client_ms": single_ms,
            "first_full_sync_all_clients_ms": all_ms,
            "first_full_sync_ratio": all_ms / single_ms,
            "first_full_sync_single_client_cpu_s": cpu1.json(),
            "first_full_sync_all_clients_cpu_s": cpu_n.json(),
            "change_to_one_acked_p50_ms": p50_1,
            "change_to_one_acked_p99_ms": p99_1,
            "change_to_all_acked_p50_ms": p50,
            "change_to_all_acked_p99_ms": p99,
            "change_p99_ratio": p99 / p99_1,
            "changes": a.changes,
            "server_rss_mib": rss, "server_peak_rss_mib": hwm,
            "ztunnel_first_sync_ms": zt_sync.as_secs_f64() * 1000.0,
            "ztunnel_rss_mib": zrss,
            "load_average_1m": load,
        });
        let n = a.clients;
        writeln!(
            out,
            "| metric | 1 client (baseline) | {n} clients | ratio | target |\n| --- | ---: | ---: | ---: | ---: |"
        )?;
        writeln!(
            out,
            "| first full sync | {single_ms:.0} ms | {all_ms:.0} ms | {:.1}x ({n}x the data) | < 1000 ms |",
            all_ms / single_ms
        )?;
        writeln!(
            out,
            "| first sync CPU s: server / clients / other processes | {} | {} | {} | |",
            cpu1.row(),
            cpu_n.row(),
            // Below the clock tick (10 ms) a single client's sync reads 0.
            if cpu1.server > 0.0 {
                format!("{:.1}x (server)", cpu_n.server / cpu1.server)
            } else {
                "-".to_string()
            }
        )?;
        writeln!(
            out,
            "| change -> all acked p50 | {p50_1:.1} ms | {p50:.1} ms | {:.2}x | |",
            p50 / p50_1
        )?;
        writeln!(
            out,
            "| change -> all acked p99 | {p99_1:.1} ms | {p99:.1} ms | {:.2}x | < 100 ms |",
            p99 / p99_1
        )?;
        writeln!(out, "\n| metric | value | target |\n| --- | ---: | ---: |")?;
        writeln!(
            out,
            "| server RSS (synced) / peak | {rss:.1} / {hwm:.1} MiB | < 300 MB |"
        )?;
        writeln!(
            out,
            "| ztunnel RSS holding the state | {zrss:.1} MiB | < 40 MB |"
        )?;
        writeln!(
            out,
            "| ztunnel start -> ready (first sync) | {:.0} ms | |",
            zt_sync.as_secs_f64() * 1000.0
        )?;
        writeln!(out, "| load average (1 min) before the sync | {load:.2} | |")?;
        if let Some(d) = &a.out_dir {
            std::fs::create_dir_all(d)?;
            std::fs::write(d.join("xds.json"), serde_json::to_vec_pretty(&json)?)?;
            std::fs::write(d.join("xds.md"), &out)?;
        }
        drop(z);
        Ok(())
    });
    drop(server);
    if std::env::var_os("XDS_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res?;
    Ok(out)
}
