//! The waypoint's xDS client: Envoy v3 ADS (LDS, RDS, CDS, EDS), delta or
//! state of the world, from any control plane, translated into the same
//! configuration model the YAML file fills and put in force through the
//! same gate ([`crate::config::Store::apply`], i.e.
//! [`crate::config::validate::compile`]).
//!
//! One stream; Listeners and Clusters are subscribed as wildcards, route
//! configurations and load assignments by the names the listeners
//! (`rds.route_config_name`) and EDS clusters (`eds_cluster_config`)
//! refer to, updated as those change. Each response is applied to a copy of
//! the resource cache; the copy is translated ([`translate`]) and, once
//! every referenced resource is there, compiled and swapped in. Then it is
//! ACKed and the copy becomes the cache. A response that fails to decode,
//! translate or validate is NACKed with `error_detail` naming the resource
//! and field, and the cache and the configuration in force stay as they
//! were. While a referenced RDS/EDS resource is missing (warming), the
//! response is ACKed and the previous configuration stays in force.
//!
//! That logic lives once, in `state.rs`; the two wire protocols are
//! adapters around it (`delta.rs`, `sotw.rs`), chosen by
//! [`XdsConfig::api_type`] as Envoy's `api_type` chooses. A server that
//! answers the delta stream with `UNIMPLEMENTED` is asked again over SotW.
//!
//! The stream reconnects with exponential backoff (delta resumes with
//! `initial_resource_versions`; SotW asks again for the current names,
//! with no version); the data path keeps its configuration meanwhile.
//! Readiness ([`crate::config::Store::synced`]) waits for the first
//! complete configuration. A referenced resource still missing after
//! [`XdsConfig::warming_timeout`] is taken as empty (as Envoy's
//! `initial_fetch_timeout`), so it cannot hold back every later update.

mod delta;
mod sotw;
mod state;
pub mod translate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use mesh_proto::core::Node;
use mesh_proto::type_url;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::config::Store;
use state::State;

/// The four resource types, in the order Envoy asks for them.
pub const TYPES: [&str; 4] = [
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
];

/// Which ADS protocol, named as Envoy's `ApiConfigSource.api_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiType {
    /// State of the world: `StreamAggregatedResources`, every response
    /// the whole set of its type (LDS, CDS) or of the names asked (RDS,
    /// EDS).
    #[value(name = "GRPC")]
    Grpc,
    /// Incremental: `DeltaAggregatedResources`, changes and removals only.
    #[default]
    #[value(name = "DELTA_GRPC")]
    DeltaGrpc,
}

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `http://host:port`, or `https://host:port` (with `root_cert`).
    pub address: String,
    /// PEM root the server's certificate must chain to (TLS).
    pub root_cert: Option<PathBuf>,
    /// Name expected in the server's certificate (default: the host).
    pub server_name: Option<String>,
    /// File holding a bearer token, re-read on each connect.
    pub token_file: Option<PathBuf>,
    /// `Node.id` (Istio's form: `router~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub node_id: String,
    /// The Kubernetes node the waypoint runs on, sent as
    /// `Node.metadata.NODE_NAME` (as Istio's proxies do): a control plane
    /// authenticating nodes checks the token against it, and serves the
    /// waypoint pod `node_id` names only if it runs there.
    pub node_name: Option<String>,
    pub node_cluster: String,
    /// How long a referenced route configuration or load assignment may
    /// stay missing before it is taken as empty (Envoy's
    /// `initial_fetch_timeout`, 15 s), so one absent resource cannot hold
    /// back every later update.
    pub warming_timeout: Duration,
    /// Delta (default) or state of the world.
    pub api_type: ApiType,
}

impl XdsConfig {
    fn channel(&self) -> anyhow::Result<Channel> {
        let mut ep = Endpoint::from_shared(self.address.clone())
            .with_context(|| format!("xDS address {:?}", self.address))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(root) = &self.root_cert {
            let pem = std::fs::read_to_string(root)
                .with_context(|| format!("reading xDS root {}", root.display()))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(n) = &self.server_name {
                tls = tls.domain_name(n.clone());
            }
            ep = ep.tls_config(tls).context("xDS TLS")?;
        }
        Ok(ep.connect_lazy())
    }

    /// The stream's request, with the bearer token if there is one.
    fn request<T>(&self, body: T) -> anyhow::Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(body);
        let Some(p) = &self.token_file else {
            return Ok(req);
        };
        let tok =
            std::fs::read_to_string(p).with_context(|| format!("reading token {}", p.display()))?;
        let v = format!("Bearer {}", tok.trim())
            .parse()
            .map_err(|_| anyhow!("token in {} is not a valid header value", p.display()))?;
        req.metadata_mut().insert("authorization", v);
        Ok(req)
    }

    fn node(&self) -> Node {
        Node {
            id: self.node_id.clone(),
            cluster: self.node_cluster.clone(),
            metadata: self.node_name.as_ref().map(|n| prost_types::Struct {
                fields: [(
                    "NODE_NAME".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(n.clone())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
            user_agent_name: "waypoint".into(),
        }
    }
}

/// The NACK's `error_detail`.
fn rejected(msg: &str) -> mesh_proto::rpc::Status {
    mesh_proto::rpc::Status {
        code: tonic::Code::InvalidArgument as i32,
        message: msg.to_string(),
        details: Vec::new(),
    }
}

/// How often a stream checks for referenced resources missing too long.
const WARMING_TICK: Duration = Duration::from_secs(1);

/// Runs the client until the process ends: connects, follows the stream,
/// reconnects with backoff. Marks the store not synced until the first
/// complete configuration is in force.
pub fn spawn(cfg: XdsConfig, store: Arc<Store>) -> tokio::task::JoinHandle<()> {
    let mut state = State::new(store, cfg.warming_timeout);
    tokio::spawn(async move {
        let mut api = cfg.api_type;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut got_any = false;
            let r = match api {
                ApiType::DeltaGrpc => delta::session(&cfg, &mut state, &mut got_any).await,
                ApiType::Grpc => sotw::session(&cfg, &mut state, &mut got_any).await,
            };
            match r {
                Ok(()) => info!("xDS stream closed by the server"),
                Err(e) if api == ApiType::DeltaGrpc && !got_any && unimplemented(&e) => {
                    warn!(address = %cfg.address,
                          "the xDS server does not implement delta ADS; using state-of-the-world ADS");
                    api = ApiType::Grpc;
                    continue;
                }
                Err(e) => {
                    warn!(address = %cfg.address, error = %format!("{e:#}"), "xDS stream failed")
                }
            }
            if got_any {
                backoff = Duration::from_millis(100);
            }
            // Full jitter, so a fleet of waypoints does not reconnect at once.
            let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            debug!(?wait, "xDS reconnecting");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    })
}

fn unimplemented(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::Unimplemented)
}
