//! Where the waypoint is wired together: flags, identity, configuration
//! file, listeners.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};
use ztunnel::identity::{CaClient, Identity, LocalCa, SecretManager};

use crate::config::{self, Store};
use crate::metrics::Metrics;
use crate::upstream::balancer::Balancer;
use crate::upstream::connector::Dialer;
use crate::upstream::Upstream;
use crate::Proxy;

/// `1.5s`, `250ms`, `10m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Some(h) = s.strip_suffix('h') {
        return h
            .parse::<u64>()
            .map(|h| Duration::from_secs(h * 3600))
            .map_err(|e| e.to_string());
    }
    if let Some(m) = s.strip_suffix('m').filter(|m| !m.ends_with('m')) {
        if let Ok(m) = m.parse::<u64>() {
            return Ok(Duration::from_secs(m * 60));
        }
    }
    config::validate::duration("duration", s).map_err(|e| e.message)
}

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "waypoint", about = "L7 proxy of the ambient mesh")]
pub struct Args {
    /// The waypoint's SPIFFE identity.
    #[arg(
        long,
        env = "WAYPOINT_IDENTITY",
        default_value = "spiffe://cluster.local/ns/default/sa/waypoint"
    )]
    pub identity: Identity,
    /// Configuration file (YAML, Envoy v3 shaped; see the README).
    #[arg(
        long,
        env = "WAYPOINT_CONFIG",
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    pub config: Option<PathBuf>,
    /// Take the configuration over Envoy v3 ADS from this control
    /// plane (`http://host:port`, or `https://` with `--xds-root-cert`)
    /// instead of `--config`.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// PEM root the control plane's certificate must chain to.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_cert: Option<PathBuf>,
    /// Name expected in the control plane's certificate (default: its host).
    #[arg(long)]
    pub xds_server_name: Option<String>,
    /// File with a bearer token sent to the control plane (re-read on each
    /// connect).
    #[arg(long)]
    pub xds_token_file: Option<PathBuf>,
    /// xDS `Node.id` (default: Istio's `router~<ip>~<sa>.<ns>~<ns>.svc.cluster.local`;
    /// our control plane finds the waypoint's pod by the name there, else by
    /// the IP, so give the pod name, or `--own-ip` the pod's IP).
    #[arg(long)]
    pub xds_node_id: Option<String>,
    /// The node the waypoint runs on (`Node.metadata.NODE_NAME`, what a
    /// node token names).
    #[arg(long, env = "NODE_NAME")]
    pub xds_node_name: Option<String>,
    /// A referenced route configuration or load assignment missing this
    /// long is taken as empty (Envoy's `initial_fetch_timeout`).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub xds_warming_timeout: Duration,
    /// ADS protocol, as Envoy's `api_type`: `DELTA_GRPC` (incremental) or
    /// `GRPC` (state of the world). Delta falls back to SotW when the
    /// server does not implement it.
    #[arg(long, value_enum, default_value = "DELTA_GRPC")]
    pub xds_api_type: crate::xds::ApiType,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub config_poll: Duration,
    /// Get the waypoint's certificate from this CA (Istio's CSR API, e.g.
    /// the control plane's `https://host:15012`), reached with the xDS
    /// root, server name and token. Without it, a local CA signs it
    /// (`--ca-cert`, `--ca-key`): tests and single-machine set-ups.
    #[arg(long, env = "CA_ADDRESS", conflicts_with = "ca_key")]
    pub ca_address: Option<String>,
    /// Root certificate (PEM) of the local CA, generated if missing.
    #[arg(long, env = "CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Root key (PKCS#8 PEM) of the local CA, generated if missing.
    #[arg(long, env = "CA_KEY")]
    pub ca_key: Option<PathBuf>,
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    #[arg(long, default_value = "[::]:15008")]
    pub hbone_addr: SocketAddr,
    /// Plaintext HTTP listener, off by default (benchmarks, debugging):
    /// the local address is taken as the original destination; no identity.
    #[arg(long)]
    pub plaintext_addr: Option<SocketAddr>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,
    /// This waypoint's address, sent as `Forwarded: for=` upstream
    /// (default: the HBONE listen address, or 127.0.0.1 if unspecified).
    #[arg(long)]
    pub own_ip: Option<IpAddr>,
    #[arg(long, default_value_t = 0x539)]
    pub socket_mark: u32,
    #[arg(long, default_value_t = 100)]
    pub pool_max_streams: usize,
    /// Worker threads serving the listeners (each with its own event loop
    /// and upstream connections, as nginx's worker processes); a further
    /// thread runs configuration, xDS and the admin endpoints.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// Pins worker `i` to the `i`-th CPU the process may use, as nginx's
    /// `worker_cpu_affinity auto`: for a waypoint with CPUs of its own (a
    /// Guaranteed pod under the kubelet's static CPU manager, whose cpuset
    /// is then its own CPUs; a dedicated node). Off by default: on CPUs
    /// shared with other work the kernel places the workers better.
    #[arg(long)]
    pub pin_workers: bool,
    #[arg(long)]
    pub log_json: bool,
    /// On SIGTERM: not ready, stop accepting, GOAWAY, and wait this long
    /// at most for open requests to finish.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
}

/// A running waypoint: where it listens and its shared state.
pub struct Running {
    pub proxy: Arc<Proxy>,
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ready: Arc<AtomicBool>,
}

/// The pieces a waypoint is built from, for embedding (tests) as well as
/// the binary.
pub struct Parts {
    pub identity: Identity,
    pub ca: Arc<dyn CaClient>,
    pub cert_ttl: Duration,
    pub own_ip: IpAddr,
    pub mark: u32,
    pub pool_max_streams: usize,
    pub store: Arc<Store>,
}

pub fn build(p: Parts) -> Arc<Proxy> {
    let secrets = SecretManager::new(p.ca, p.cert_ttl);
    let dialer = Dialer::new(
        secrets.clone(),
        p.identity.clone(),
        p.own_ip,
        p.mark,
        p.pool_max_streams,
    );
    Arc::new(Proxy {
        identity: p.identity,
        secrets,
        store: p.store,
        upstream: Arc::new(Upstream::new(dialer, Arc::new(Balancer::default()))),
        metrics: Arc::new(Metrics::new()),
        peers: ztunnel::state::Store::new(),
        drain: ztunnel::proxy::Drain::default(),
    })
}

/// Starts serving HBONE on `hbone` and the admin endpoints on `admin`, on
/// the current runtime.
pub async fn start(
    proxy: Arc<Proxy>,
    hbone: TcpListener,
    admin: Vec<TcpListener>,
) -> anyhow::Result<Running> {
    let running = prepare(proxy, hbone.local_addr()?, admin).await?;
    tokio::spawn(crate::inbound::run(running.proxy.clone(), hbone));
    running.ready.store(true, Ordering::Release);
    Ok(running)
}

/// The waypoint's certificate and the admin endpoints: what comes before
/// serving.
async fn prepare(
    proxy: Arc<Proxy>,
    hbone_addr: SocketAddr,
    admin: Vec<TcpListener>,
) -> anyhow::Result<Running> {
    // The certificate first: a waypoint without one cannot serve. A CA
    // that refuses or cannot be reached yet (it may not know this pod
    // yet) is asked again; meanwhile the waypoint is not ready.
    while let Err(e) = proxy.secrets.fetch(&proxy.identity).await {
        warn!(identity = %proxy.identity, error = %format!("{e:#}"), "no certificate yet; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let admin_addr = admin
        .first()
        .map(|l| l.local_addr())
        .transpose()?
        .unwrap_or(hbone_addr);
    let ready = Arc::new(AtomicBool::new(false));
    for l in admin {
        ztunnel::admin::serve(l, crate::admin::handler(proxy.clone(), ready.clone()));
    }
    Ok(Running {
        proxy,
        hbone_addr,
        admin_addr,
        ready,
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::empty();
    if let Some(path) = &args.config {
        config::watch_file(path.clone(), store.clone(), args.config_poll).await?;
    }
    let ca = certificate_authority(&args)?;
    let own_ip = args.own_ip.unwrap_or_else(|| {
        let ip = args.hbone_addr.ip();
        if ip.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            ip
        }
    });
    let proxy = build(Parts {
        identity: args.identity.clone(),
        ca,
        cert_ttl: args.cert_ttl,
        own_ip,
        mark: args.socket_mark,
        pool_max_streams: args.pool_max_streams,
        store: store.clone(),
    });
    let hbone = ztunnel::socket::listen(args.hbone_addr, false)
        .with_context(|| format!("binding HBONE on {}", args.hbone_addr))?;
    let mut admin = Vec::new();
    for (a, what) in [
        (args.admin_addr, "admin"),
        (args.metrics_addr, "metrics"),
        (args.readiness_addr, "readiness"),
    ] {
        admin.push(ztunnel::admin::bind(a, what).await?);
    }
    let plaintext = args
        .plaintext_addr
        .map(|a| {
            ztunnel::socket::listen(a, false)
                .with_context(|| format!("binding the plaintext listener on {a}"))
        })
        .transpose()?;
    if let Some(address) = &args.xds_address {
        let id = &args.identity;
        let node_id = args.xds_node_id.clone().unwrap_or_else(|| {
            format!(
                "router~{own_ip}~{}.{}~{}.svc.cluster.local",
                id.service_account, id.namespace, id.namespace
            )
        });
        let cfg = crate::xds::XdsConfig {
            address: address.clone(),
            root_cert: args.xds_root_cert.clone(),
            server_name: args.xds_server_name.clone(),
            token_file: args.xds_token_file.clone(),
            node_id,
            node_name: args.xds_node_name.clone(),
            node_cluster: id.service_account.clone(),
            warming_timeout: args.xds_warming_timeout,
            api_type: args.xds_api_type,
        };
        crate::peers::discover(&cfg, &id.trust_domain, proxy.peers.clone())?;
        crate::xds::spawn(cfg, store.clone());
    }
    let running = prepare(proxy, hbone.local_addr()?, admin).await?;
    crate::workers::start(
        &running.proxy,
        args.worker_threads,
        args.pin_workers,
        hbone,
        plaintext,
    )?;
    tokio::spawn(keep_tables(running.proxy.clone()));
    running.ready.store(true, Ordering::Release);
    info!(hbone = %running.hbone_addr, identity = %args.identity, "waypoint ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("waypoint draining");
    running.ready.store(false, Ordering::Release);
    let left = running.proxy.drain.run(args.drain_timeout).await;
    info!(still_open = left, "waypoint stopped");
    Ok(())
}

/// Where the waypoint's certificate comes from: the mesh CA over Istio's
/// CSR API when `--ca-address` is set, so no CA key leaves the control
/// plane; else a local CA.
fn certificate_authority(args: &Args) -> anyhow::Result<Arc<dyn CaClient>> {
    let Some(address) = &args.ca_address else {
        let ca = LocalCa::load_or_generate(
            args.ca_cert.as_deref(),
            args.ca_key.as_deref(),
            &args.identity.trust_domain,
        )
        .context("setting up the local CA")?;
        return Ok(Arc::new(ca));
    };
    let root_cert = args
        .xds_root_cert
        .clone()
        .or_else(|| args.ca_cert.clone())
        .context("--ca-address needs the root its certificate chains to: --xds-root-cert")?;
    let server_name = match &args.xds_server_name {
        Some(n) => n.clone(),
        None => address
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_string()))
            .with_context(|| format!("--ca-address {address:?}: no host in it"))?,
    };
    let ca = ztunnel::xds::RemoteCa::new(ztunnel::xds::ControlPlane {
        address: address.clone(),
        root_cert: Some(root_cert),
        server_name,
        token_file: args.xds_token_file.clone(),
    })?;
    Ok(Arc::new(ca))
}

/// Keeps the endpoint tables (the balancer's, the dialer's) in step with
/// configuration reloads: endpoints gone from every cluster are forgotten.
pub async fn keep_tables(p: Arc<Proxy>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let cfg = p.store.get();
        p.upstream
            .balancer
            .retain(cfg.clusters.values().map(|c| c.as_ref()));
        let live = cfg
            .clusters
            .values()
            .flat_map(|c| c.endpoints.iter().map(|e| e.address))
            .collect();
        p.upstream.dialer.retain(&live);
    }
}
