//! xds: the control plane of the ambient mesh.
//!
//! ```text
//!  manifest dir ─┐                      ┌─> ADS (delta + SotW) ──> ztunnels
//!                ├─> Model ─> translate ─┤
//!  Kubernetes  ──┘   (typed    (once per └─> CA (node checks) <── ztunnels
//!                    k8s objs)   change)
//! ```
//!
//! - [`manifest`] / `kube` (feature `kube`): sources producing one [`model::Model`]
//!   of typed `k8s-openapi` objects; invalid objects are reported and skipped.
//! - [`translate`]: the model as `istio.workload.Address` and
//!   `istio.security.Authorization` resources, versioned by content.
//! - [`envoy`]: each waypoint's Envoy v3 resources (HTTPRoutes, L7
//!   AuthorizationPolicies), served only to that waypoint.
//! - [`ads`]: the ADS server (per-resource versions, nonces, ACK/NACK,
//!   subscriptions, resume, removals).
//! - [`ca`]: `IstioCertificateService` with node checks.
//! - [`auth`]: bearer tokens naming each client's node, over TLS.
//!
//! One gRPC port (15012, as istiod) serves both ADS and the CA over TLS with
//! a server certificate signed by the mesh root; metrics on 15014.

pub mod ads;
pub mod auth;
pub mod ca;
pub mod envoy;
#[cfg(feature = "kube")]
pub mod kube;
pub mod manifest;
pub mod metrics;
pub mod model;
mod tls;
pub mod translate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_proto::discovery::encoded::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::{oneshot, watch};
use tracing::info;
use ztunnel::identity::LocalCa;

use crate::ads::{AdsServer, Snapshot};
use crate::auth::Auth;
use crate::manifest::ErrorList;
use crate::metrics::Metrics;
use crate::model::Model;

/// Where the model comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Manifests(PathBuf),
    /// The cluster of the kubeconfig (or in-cluster config).
    Kubernetes,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: Source,
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub auth: Auth,
    /// DNS names / IPs in the server certificate.
    pub server_names: Vec<String>,
    pub translate: translate::Options,
    /// The manifest source's full rescan, behind its change notifications
    /// (for filesystems that send none).
    pub poll_interval: Duration,
    pub debounce: Duration,
    pub default_cert_ttl: Duration,
    pub max_cert_ttl: Duration,
    /// What the Kubernetes source deploys for each waypoint Gateway.
    pub waypoints: WaypointDeployment,
}

/// The settings of the waypoints the control plane deploys for Gateways
/// of class `istio-waypoint` (Kubernetes source only): what the
/// `charts/waypoint` chart takes from its values. The trust domain, the
/// cluster domain, the token audience and the root certificate are the
/// control plane's own.
#[derive(Clone, Debug)]
pub struct WaypointDeployment {
    /// Container image holding `/usr/local/bin/waypoint`.
    pub image: String,
    /// The control plane as waypoints dial it (ADS and CA).
    pub xds_address: String,
    /// Name the control plane's certificate must carry.
    pub xds_server_name: String,
    /// How long a waypoint drains open requests on SIGTERM.
    pub drain_timeout: Duration,
    /// Audience of the waypoint's projected token (the control plane's
    /// `--token-audience`).
    pub token_audience: String,
}

impl Default for WaypointDeployment {
    fn default() -> Self {
        WaypointDeployment {
            image: "ambient-mesh".into(),
            xds_address: "https://istiod.istio-system.svc:15012".into(),
            xds_server_name: "istiod.istio-system.svc".into(),
            drain_timeout: Duration::from_secs(30),
            token_audience: "istio-ca".into(),
        }
    }
}

impl Config {
    pub fn new(source: Source) -> Self {
        Config {
            source,
            listen: "0.0.0.0:15012".parse().expect("static address"),
            metrics_addr: None,
            ca_cert: None,
            ca_key: None,
            auth: Auth::insecure(),
            server_names: vec!["istiod.istio-system.svc".into(), "localhost".into()],
            translate: translate::Options::default(),
            poll_interval: Duration::from_secs(1),
            debounce: Duration::from_millis(10),
            default_cert_ttl: Duration::from_secs(24 * 3600),
            max_cert_ttl: Duration::from_secs(30 * 24 * 3600),
            waypoints: WaypointDeployment::default(),
        }
    }
}

/// A running control plane.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub errors: ErrorList,
    pub root_pem: String,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops serving (streams are cut) and waits for the server to end.
    pub async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.server.abort();
        let _ = (&mut self.server).await;
    }

    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

/// Retranslates on every model change, after `debounce` so that a burst of
/// changes makes one snapshot.
async fn translator(
    mut models: watch::Receiver<Arc<Model>>,
    tx: watch::Sender<Arc<Snapshot>>,
    mut tr: translate::Translator,
    opts: translate::Options,
    debounce: Duration,
) {
    loop {
        if models.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(debounce).await;
        let model = models.borrow_and_update().clone();
        let t0 = std::time::Instant::now();
        let Ok((back, res)) = tokio::task::spawn_blocking(move || {
            let res = tr.translate(model);
            (tr, res)
        })
        .await
        else {
            // The translation panicked: a bug, not input. Start afresh,
            // from nothing, on the same model; meanwhile the last snapshot
            // stays served. Giving up would freeze every update.
            tracing::error!("translation failed; retranslating everything");
            tr = translate::Translator::new(opts.clone());
            models.mark_changed();
            // Should it panic again on this model, not in a tight loop.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        tr = back;
        let t1 = t0.elapsed();
        let prev = tx.borrow().clone();
        if res.errors != prev.resources.errors {
            for e in &res.errors {
                tracing::warn!("{e}");
            }
        }
        let next = Snapshot::next(&prev, res, std::mem::take(&mut tr.last_changed));
        info!(
            generation = next.generation,
            changed = next.changed.as_ref().map_or(0, |c| c.len()),
            retranslated_pods = tr.last_retranslated,
            translate = ?t1,
            took = ?t0.elapsed(),
            "translated"
        );
        tx.send_replace(Arc::new(next));
    }
}

/// Starts the source, the translator and the gRPC server.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    // First: the waypoints the Kubernetes source deploys trust this root.
    let ca = Arc::new(
        LocalCa::load_or_generate(
            cfg.ca_cert.as_deref(),
            cfg.ca_key.as_deref(),
            &cfg.translate.trust_domain,
        )
        .context("setting up the CA root")?,
    );
    let metrics = Arc::new(Metrics::default());
    let errors: ErrorList = Default::default();
    let (model_tx, mut model_rx) = watch::channel(Arc::new(Model::default()));
    match &cfg.source {
        Source::Manifests(dir) => {
            manifest::run(
                dir.clone(),
                cfg.poll_interval,
                model_tx,
                errors.clone(),
                metrics.clone(),
            )
            .await?;
        }
        #[cfg(feature = "kube")]
        Source::Kubernetes => {
            let waypoints = kube::deploy::Settings {
                waypoint: cfg.waypoints.clone(),
                trust_domain: cfg.translate.trust_domain.clone(),
                cluster_domain: cfg.translate.cluster_domain.clone(),
                root_pem: ca.root_pem().to_string(),
            };
            kube::run(model_tx, errors.clone(), metrics.clone(), waypoints).await?;
        }
        #[cfg(not(feature = "kube"))]
        Source::Kubernetes => {
            anyhow::bail!("this build has no Kubernetes source (build with --features kube)")
        }
    }
    let first = model_rx.borrow_and_update().clone();
    let mut tr = translate::Translator::new(cfg.translate.clone());
    let snap = Snapshot::first(tr.translate(first));
    for e in &snap.resources.errors {
        tracing::warn!("{e}");
    }
    let (snap_tx, snap_rx) = watch::channel(Arc::new(snap));
    tokio::spawn(translator(
        model_rx,
        snap_tx,
        tr,
        cfg.translate.clone(),
        cfg.debounce,
    ));

    let (cert_pem, key_pem) =
        ca.sign_server(&cfg.server_names, Duration::from_secs(365 * 86400))?;
    let tls = tls::server_config(&cert_pem, &key_pem)?;

    let ads = AdsServer {
        snapshots: snap_rx.clone(),
        auth: cfg.auth.clone(),
        metrics: metrics.clone(),
    };
    let ca_svc = ca::CaService {
        ca: ca.clone(),
        auth: cfg.auth.clone(),
        snapshots: snap_rx.clone(),
        metrics: metrics.clone(),
        max_ttl: cfg.max_cert_ttl,
        default_ttl: cfg.default_cert_ttl,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the xDS/CA port {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        // A client gone without a FIN (node lost, partition) is found out
        // by its unanswered PINGs: its stream and the snapshot it holds go.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            AggregatedDiscoveryServiceServer::new(ads)
                .max_encoding_message_size(usize::MAX)
                .max_decoding_message_size(16 << 20),
        )
        .add_service(IstioCertificateServiceServer::new(ca_svc));
    let server = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(tls::incoming(listener, tls), async {
                let _ = stop_rx.await;
            })
            .await
        {
            tracing::error!("gRPC server: {e}");
        }
    });
    if let Some(maddr) = cfg.metrics_addr {
        let l = ztunnel::admin::bind(maddr, "metrics").await?;
        let m = metrics.clone();
        let errs = errors.clone();
        let snaps = snap_rx.clone();
        ztunnel::admin::serve(
            l,
            Arc::new(move |req: &http::Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/debug/errors" {
                    // The sources' (invalid objects) and translation's.
                    let mut all = errs.lock().map(|e| e.clone()).unwrap_or_default();
                    all.extend(snaps.borrow().resources.errors.iter().cloned());
                    all.join("\n")
                } else {
                    m.encode()
                };
                http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)))
            }),
        );
    }
    info!(%addr, insecure = cfg.auth.is_insecure(), "xDS and CA serving (TLS)");
    Ok(Running {
        addr,
        metrics,
        errors,
        root_pem: ca.root_pem().to_string(),
        snapshots: snap_rx,
        shutdown: Some(stop_tx),
        server,
    })
}
