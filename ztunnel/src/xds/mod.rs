//! The control-plane client: delta ADS for Istio's workload API, feeding
//! the [`Store`], and the CSR client for the control plane's CA.
//!
//! One stream subscribes (wildcard) to `istio.workload.Address` and
//! `istio.security.Authorization`. Every resource of a response is
//! translated into ztunnel's model as it arrives (the cache keeps only that
//! model, not the protos); the snapshot is then indexed from the cache with
//! the response overlaid, sharing every unchanged object. Only if all of
//! that succeeds is it committed, swapped into the store and ACKed.
//! Anything wrong NACKs it with the reason, and the last good state stays
//! in force. When the stream breaks, the client reconnects with
//! exponential backoff and resumes with `initial_resource_versions`, so the
//! server sends only what changed meanwhile (and removals); the data plane
//! keeps its state throughout. `synced` turns true once a full response of
//! each type has been accepted (a NACKed one does not count), and
//! readiness waits for it.

mod translate;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures::future::BoxFuture;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::core::Node;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::rpc::Status as RpcStatus;
use mesh_proto::type_url;
use mesh_proto::{security, workload};
use prost::Message;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

use crate::identity::{CaClient, CertificateRequest, IssuedCertificate};
use crate::rbac::Authorization;
use crate::state::{Snapshot, Store};

pub use translate::Address;

/// How to reach and authenticate to the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `https://host:port` (`http://` without `root_cert`: plaintext, for
    /// a waypoint told so).
    pub address: String,
    /// PEM root the server certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// Name expected in the server certificate (empty: the address's host).
    pub server_name: String,
    /// File holding this node's bearer token (re-read on each connect).
    pub token_file: Option<PathBuf>,
}

impl ControlPlane {
    /// A lazily connecting channel: TLS with `root_cert`, else plaintext.
    pub fn channel(&self) -> anyhow::Result<Channel> {
        let mut ep = Endpoint::from_shared(self.address.clone())
            .with_context(|| format!("control-plane address {:?}", self.address))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(root_cert) = &self.root_cert {
            let root = std::fs::read_to_string(root_cert)
                .with_context(|| format!("reading control-plane root {}", root_cert.display()))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
            if !self.server_name.is_empty() {
                tls = tls.domain_name(self.server_name.clone());
            }
            ep = ep.tls_config(tls).context("control-plane TLS")?;
        }
        Ok(ep.connect_lazy())
    }

    fn authorize<T>(&self, req: &mut tonic::Request<T>) -> anyhow::Result<()> {
        if let Some(p) = &self.token_file {
            let tok = std::fs::read_to_string(p)
                .with_context(|| format!("reading token {}", p.display()))?;
            let v = format!("Bearer {}", tok.trim())
                .parse()
                .map_err(|_| anyhow!("token in {} is not a valid header value", p.display()))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(())
    }
}

/// What the client holds: resource name -> (version, translation). Only
/// ztunnel's model of each resource is kept, not the proto it came in
/// (which would double the memory of a node holding a large mesh); the
/// snapshot built from the cache shares the same objects.
#[derive(Default)]
pub struct Cache {
    addresses: HashMap<String, (String, Address)>,
    authorizations: HashMap<String, (String, Arc<Authorization>)>,
}

impl Cache {
    fn versions(&self, t: &str) -> HashMap<String, String> {
        match t {
            type_url::ADDRESS => self
                .addresses
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect(),
            _ => self
                .authorizations
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Decodes and translates one response without touching the cache:
    /// every resource is checked on its own here.
    fn stage(resp: &DeltaDiscoveryResponse, trust_domain: &str) -> anyhow::Result<Staged> {
        fn body(r: &mesh_proto::discovery::Resource) -> anyhow::Result<&[u8]> {
            r.resource
                .as_ref()
                .map(|a| a.value.as_slice())
                .ok_or_else(|| anyhow!("resource {} has no body", r.name))
        }
        let mut st = Staged {
            removed: resp.removed_resources.iter().cloned().collect(),
            ..Default::default()
        };
        match resp.type_url.as_str() {
            type_url::ADDRESS => {
                for r in &resp.resources {
                    let a = workload::Address::decode(body(r)?)
                        .with_context(|| format!("decoding Address {}", r.name))?;
                    let a = translate::address(&r.name, &a, trust_domain)?;
                    st.addresses.insert(r.name.clone(), (r.version.clone(), a));
                }
            }
            type_url::AUTHORIZATION => {
                for r in &resp.resources {
                    let a = security::Authorization::decode(body(r)?)
                        .with_context(|| format!("decoding Authorization {}", r.name))?;
                    let a = translate::authorization(&r.name, &a)?;
                    st.authorizations
                        .insert(r.name.clone(), (r.version.clone(), a));
                }
            }
            other => return Err(anyhow!("unexpected type {other}")),
        }
        st.type_url = resp.type_url.clone();
        Ok(st)
    }

    /// The snapshot of the cache with `st` applied, without copying the
    /// cache: cross-resource checks (addresses claimed twice) happen here.
    fn snapshot(&self, st: &Staged) -> anyhow::Result<Snapshot> {
        let is_addr = st.type_url == type_url::ADDRESS;
        let addresses = self
            .addresses
            .iter()
            .filter(|(k, _)| {
                !is_addr || !(st.addresses.contains_key(*k) || st.removed.contains(*k))
            })
            .chain(st.addresses.iter())
            .map(|(_, (_, a))| a);
        let authorizations = self
            .authorizations
            .iter()
            .filter(|(k, _)| {
                is_addr || !(st.authorizations.contains_key(*k) || st.removed.contains(*k))
            })
            .chain(st.authorizations.iter())
            .map(|(_, (_, a))| a);
        translate::snapshot(addresses, authorizations)
    }

    fn commit(&mut self, st: Staged) {
        if st.type_url == type_url::ADDRESS {
            for n in &st.removed {
                self.addresses.remove(n);
            }
            self.addresses.extend(st.addresses);
        } else {
            for n in &st.removed {
                self.authorizations.remove(n);
            }
            self.authorizations.extend(st.authorizations);
        }
    }
}

/// One translated response, not yet applied.
#[derive(Default)]
struct Staged {
    type_url: String,
    addresses: HashMap<String, (String, Address)>,
    authorizations: HashMap<String, (String, Arc<Authorization>)>,
    removed: HashSet<String>,
}

const TYPES: [&str; 2] = [type_url::ADDRESS, type_url::AUTHORIZATION];

/// How a client names itself in its streams' first request.
#[derive(Clone, Debug)]
pub struct ClientNode {
    /// `Node.id`.
    pub id: String,
    /// The node it runs on (`Node.metadata.NODE_NAME`), which a node token
    /// is checked against.
    pub node_name: String,
    pub user_agent: &'static str,
}

impl ClientNode {
    /// A ztunnel: named by its node.
    pub fn ztunnel(node: &str) -> Self {
        ClientNode {
            id: node.to_string(),
            node_name: node.to_string(),
            user_agent: "ztunnel",
        }
    }

    fn to_proto(&self) -> Node {
        let mut md = prost_types::Struct::default();
        md.fields.insert(
            "NODE_NAME".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    self.node_name.clone(),
                )),
            },
        );
        Node {
            id: self.id.clone(),
            metadata: Some(md),
            user_agent_name: self.user_agent.into(),
            ..Default::default()
        }
    }
}

/// Runs the ADS client until the process ends.
pub fn spawn(
    cp: ControlPlane,
    node: ClientNode,
    trust_domain: String,
    store: Arc<Store>,
    synced: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let channel = cp.channel()?;
    tokio::spawn(async move {
        let mut cache = Cache::default();
        let mut seen: Vec<&'static str> = Vec::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut got_any = false;
            let r = stream_once(
                &cp,
                channel.clone(),
                &node,
                &trust_domain,
                &mut cache,
                &store,
                &mut |t| {
                    got_any = true;
                    if let Some(t) = TYPES.iter().find(|x| **x == t) {
                        if !seen.contains(t) {
                            seen.push(t);
                            if seen.len() == TYPES.len() {
                                info!("first full xDS sync");
                                synced.send_replace(true);
                            }
                        }
                    }
                },
            )
            .await;
            match r {
                Ok(()) => warn!("xDS stream ended; reconnecting"),
                Err(e) => warn!("xDS stream: {e:#}; reconnecting"),
            }
            if got_any {
                backoff = Duration::from_millis(100);
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    });
    Ok(())
}

async fn stream_once(
    cp: &ControlPlane,
    channel: Channel,
    node: &ClientNode,
    trust_domain: &str,
    cache: &mut Cache,
    store: &Store,
    on_accepted: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<()> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(8);
    for (i, t) in TYPES.iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.to_proto()),
            type_url: t.to_string(),
            initial_resource_versions: cache.versions(t),
            ..Default::default()
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    cp.authorize(&mut req)?;
    let mut inbound = client.delta_aggregated_resources(req).await?.into_inner();
    info!(address = %cp.address, "xDS stream open");
    // Types with a NACKed chunk in the response being received: its last
    // chunk does not complete a sync.
    let mut failed_chunks = HashSet::new();
    while let Some(resp) = inbound.message().await? {
        let (error_detail, synced) =
            apply_response(&resp, trust_domain, cache, store, &mut failed_chunks);
        if synced {
            on_accepted(&resp.type_url);
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
    }
    Ok(())
}

/// Applies one response to the cache and the store. Returns the NACK to
/// send (`None`: ACK) and whether the response completes a sync of its
/// type: only an accepted response does, and for a response in chunks
/// only its last chunk, when none before it was rejected either.
fn apply_response(
    resp: &DeltaDiscoveryResponse,
    trust_domain: &str,
    cache: &mut Cache,
    store: &Store,
    failed_chunks: &mut HashSet<String>,
) -> (Option<RpcStatus>, bool) {
    // A chunk of a larger response (see the server's `send_delta`) is
    // translated resource by resource and kept; the snapshot is built
    // once, at the last chunk.
    let partial = resp.system_version_info.ends_with("/partial");
    let result = Cache::stage(resp, trust_domain).and_then(|st| {
        if partial {
            return Ok((st, None));
        }
        let snap = cache.snapshot(&st)?;
        Ok((st, Some(snap)))
    });
    let error_detail = match result {
        Ok((st, snap)) => {
            cache.commit(st);
            if let Some(snap) = snap {
                store.replace(snap);
            }
            None
        }
        Err(e) => {
            warn!(type_url = %resp.type_url, nonce = %resp.nonce, "rejecting xDS response (NACK): {e:#}");
            Some(RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message: format!("{e:#}"),
                details: vec![],
            })
        }
    };
    if partial {
        if error_detail.is_some() {
            failed_chunks.insert(resp.type_url.clone());
        }
        return (error_detail, false);
    }
    let earlier_chunk_failed = failed_chunks.remove(&resp.type_url);
    let synced = error_detail.is_none() && !earlier_chunk_failed;
    (error_detail, synced)
}

/// The control plane's CA (`IstioCertificateService`), asked on behalf of
/// the workloads on this node.
pub struct RemoteCa {
    cp: ControlPlane,
    channel: Channel,
}

impl RemoteCa {
    pub fn new(cp: ControlPlane) -> anyhow::Result<Self> {
        let channel = cp.channel()?;
        Ok(RemoteCa { cp, channel })
    }
}

impl CaClient for RemoteCa {
    fn sign(&self, req: CertificateRequest) -> BoxFuture<'_, anyhow::Result<IssuedCertificate>> {
        Box::pin(async move {
            let mut md = prost_types::Struct::default();
            md.fields.insert(
                "ImpersonatedIdentity".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        req.identity.to_string(),
                    )),
                },
            );
            let mut r = tonic::Request::new(IstioCertificateRequest {
                csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone())),
                validity_duration: req.ttl.as_secs() as i64,
                metadata: Some(md),
            });
            self.cp.authorize(&mut r)?;
            let resp = IstioCertificateServiceClient::new(self.channel.clone())
                .create_certificate(r)
                .await
                .map_err(|s| {
                    anyhow!(
                        "CA refused {}: {} ({:?})",
                        req.identity,
                        s.message(),
                        s.code()
                    )
                })?
                .into_inner();
            let mut ders = Vec::new();
            for p in &resp.cert_chain {
                for block in pem::parse_many(p.as_bytes())
                    .map_err(|e| anyhow!("CA answered a bad PEM chain: {e}"))?
                {
                    ders.push(CertificateDer::from(block.into_contents()));
                }
            }
            if ders.len() < 2 {
                return Err(anyhow!("CA answered a chain without root"));
            }
            let root = ders.pop().ok_or_else(|| anyhow!("empty chain"))?;
            Ok(IssuedCertificate {
                chain: ders,
                roots: vec![root],
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mesh_proto::discovery::Resource;

    use super::*;

    fn workload_resource(uid: &str, ip: Vec<u8>) -> Resource {
        let a = workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "ns".into(),
                addresses: vec![ip],
                node: "n".into(),
                ..Default::default()
            })),
        };
        Resource {
            name: uid.into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url::ADDRESS.into(),
                value: a.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn response(resources: Vec<Resource>, removed: Vec<String>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url::ADDRESS.into(),
            resources,
            removed_resources: removed,
            nonce: "1".into(),
            ..Default::default()
        }
    }

    /// What the stream does with a response: the new snapshot, or the
    /// error it NACKs with (leaving the cache untouched).
    fn apply(cache: &mut Cache, resp: &DeltaDiscoveryResponse) -> anyhow::Result<Snapshot> {
        let st = Cache::stage(resp, "cluster.local")?;
        let snap = cache.snapshot(&st)?;
        cache.commit(st);
        Ok(snap)
    }

    #[test]
    fn bad_responses_are_rejected_and_the_last_good_state_stays() {
        let mut cache = Cache::default();
        let snap = apply(
            &mut cache,
            &response(vec![workload_resource("a", vec![10, 0, 0, 1])], vec![]),
        )
        .unwrap();
        assert_eq!(snap.workloads.len(), 1);

        // An address of 5 bytes: NACK, cache unchanged.
        let err = apply(
            &mut cache,
            &response(vec![workload_resource("b", vec![10, 0, 0, 2, 9])], vec![]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("workload b"), "{err:#}");
        assert_eq!(cache.addresses.len(), 1);

        // Two workloads claiming one address: NACK, cache unchanged.
        let err = apply(
            &mut cache,
            &response(vec![workload_resource("c", vec![10, 0, 0, 1])], vec![]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("10.0.0.1"), "{err:#}");
        assert!(!cache.addresses.contains_key("c"));

        // A body that is not an Address at all.
        let mut garbage = workload_resource("d", vec![10, 0, 0, 4]);
        garbage.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        assert!(apply(&mut cache, &response(vec![garbage], vec![])).is_err());

        // Removal applies.
        let snap = apply(&mut cache, &response(vec![], vec!["a".into()])).unwrap();
        assert!(snap.workloads.is_empty());
        assert!(cache.addresses.is_empty());
    }

    #[test]
    fn only_accepted_responses_count_as_synced() {
        let store = Store::new();
        let mut cache = Cache::default();
        let mut failed = HashSet::new();
        let mut garbage = workload_resource("d", vec![10, 0, 0, 4]);
        garbage.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        let (nack, synced) = apply_response(
            &response(vec![garbage.clone()], vec![]),
            "cluster.local",
            &mut cache,
            &store,
            &mut failed,
        );
        assert!(nack.is_some());
        assert!(!synced, "a NACKed response must not mark the type synced");

        // A response in chunks whose first chunk was rejected: the last
        // chunk, good on its own, does not complete the sync either.
        let mut chunk = response(vec![garbage], vec![]);
        chunk.system_version_info = "v1/partial".into();
        let (nack, synced) =
            apply_response(&chunk, "cluster.local", &mut cache, &store, &mut failed);
        assert!(nack.is_some() && !synced);
        let last = response(vec![workload_resource("a", vec![10, 0, 0, 1])], vec![]);
        let (nack, synced) =
            apply_response(&last, "cluster.local", &mut cache, &store, &mut failed);
        assert!(nack.is_none());
        assert!(!synced, "a sync with a rejected chunk is incomplete");

        // An accepted response counts.
        let (nack, synced) =
            apply_response(&last, "cluster.local", &mut cache, &store, &mut failed);
        assert!(nack.is_none() && synced);
        assert_eq!(store.snapshot().workloads.len(), 1);
    }
}
