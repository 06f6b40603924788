use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use xds::auth::Auth;
use xds::{Config, Source};

fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 24h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// xds: the ambient mesh control plane (workload xDS and CA).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of Kubernetes manifests (the default source).
    #[arg(long, env = "MANIFESTS", conflicts_with = "kubernetes")]
    manifests: Option<PathBuf>,
    /// Watch the cluster of the kubeconfig / in-cluster config instead.
    #[arg(long)]
    kubernetes: bool,
    /// gRPC port for ADS and the CA (TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// Root certificate (PEM); generated (and written) on first start.
    #[arg(long, env = "CA_CERT")]
    ca_cert: Option<PathBuf>,
    #[arg(long, env = "CA_KEY")]
    ca_key: Option<PathBuf>,
    /// `<node> <token>` per line: the tokens ztunnels authenticate with.
    #[arg(long, env = "TOKENS")]
    tokens: Option<PathBuf>,
    /// Accept any client and believe the node it names (no token file).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Check callers' projected service-account tokens with Kubernetes
    /// TokenReview instead of a token file (build with `--features kube`).
    #[arg(long, conflicts_with_all = ["tokens", "insecure_no_auth"])]
    token_review: bool,
    /// The audience reviewed tokens must be for.
    #[arg(long, default_value = "istio-ca")]
    token_audience: String,
    /// `namespace/service-account` of node agents (ztunnels): they may
    /// ask for the identities of their node's pods; any other caller only
    /// for its own (Istio's CA_TRUSTED_NODE_ACCOUNTS).
    #[arg(long, value_delimiter = ',', default_value = "istio-system/ztunnel")]
    trusted_node_accounts: Vec<String>,
    /// Names (DNS or IP) in the server certificate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,localhost"
    )]
    server_names: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// The manifest directory is watched (inotify); it is also rescanned
    /// this often, for filesystems that send no change events (NFS, FUSE).
    #[arg(long, value_parser = duration, default_value = "1s")]
    poll_interval: Duration,
    #[arg(long, value_parser = duration, default_value = "10ms")]
    debounce: Duration,
    /// Longest certificate lifetime granted.
    #[arg(long, value_parser = duration, default_value = "720h")]
    max_cert_ttl: Duration,
    /// Image of the waypoints deployed for Gateways of class
    /// `istio-waypoint` (with --kubernetes).
    #[arg(long, default_value = "ambient-mesh")]
    waypoint_image: String,
    /// This control plane as deployed waypoints dial it (ADS and CA).
    #[arg(long, default_value = "https://istiod.istio-system.svc:15012")]
    waypoint_xds_address: String,
    /// Name in this control plane's certificate that waypoints check.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    waypoint_xds_server_name: String,
    /// How long a deployed waypoint drains on SIGTERM.
    #[arg(long, value_parser = duration, default_value = "30s")]
    waypoint_drain_timeout: Duration,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON")]
    log_json: bool,
}

#[cfg(feature = "kube")]
async fn token_review(
    audience: String,
    node_accounts: Vec<String>,
    trust_domain: String,
) -> anyhow::Result<Auth> {
    use anyhow::Context;
    let client = kube::Client::try_default()
        .await
        .context("--token-review: no Kubernetes client configuration")?;
    Ok(Auth::token_review(
        client,
        audience,
        node_accounts,
        trust_domain,
    ))
}

#[cfg(not(feature = "kube"))]
async fn token_review(_: String, _: Vec<String>, _: String) -> anyhow::Result<Auth> {
    anyhow::bail!("--token-review needs a build with `--features kube`")
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    ztunnel::process::init_logging("xds", a.log_json);
    let waypoints = xds::WaypointDeployment {
        image: a.waypoint_image.clone(),
        xds_address: a.waypoint_xds_address.clone(),
        xds_server_name: a.waypoint_xds_server_name.clone(),
        drain_timeout: a.waypoint_drain_timeout,
        token_audience: a.token_audience.clone(),
    };
    let run = async move {
        let source = match (a.manifests, a.kubernetes) {
            (Some(d), _) => Source::Manifests(d),
            (None, true) => Source::Kubernetes,
            (None, false) => anyhow::bail!("give --manifests DIR or --kubernetes"),
        };
        let auth = match (a.tokens, a.insecure_no_auth, a.token_review) {
            (Some(p), _, _) => Auth::load(&p)?,
            (None, true, _) => Auth::insecure(),
            (None, false, true) => {
                token_review(
                    a.token_audience,
                    a.trusted_node_accounts,
                    a.trust_domain.clone(),
                )
                .await?
            }
            (None, false, false) => {
                anyhow::bail!("give --tokens FILE, --token-review (or --insecure-no-auth)")
            }
        };
        let mut cfg = Config::new(source);
        cfg.listen = a.listen;
        cfg.metrics_addr = Some(a.metrics_addr);
        cfg.ca_cert = a.ca_cert;
        cfg.ca_key = a.ca_key;
        cfg.auth = auth;
        cfg.server_names = a.server_names;
        cfg.translate.trust_domain = a.trust_domain;
        cfg.translate.cluster_domain = a.cluster_domain;
        cfg.translate.root_namespace = a.root_namespace;
        cfg.poll_interval = a.poll_interval;
        cfg.debounce = a.debounce;
        cfg.max_cert_ttl = a.max_cert_ttl;
        cfg.waypoints = waypoints;
        let running = xds::start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        running.stop().await;
        Ok::<_, anyhow::Error>(())
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xds: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xds: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
