//! A Service port's endpoints as an Envoy ClusterLoadAssignment: the
//! selected pods' IPs and target ports, with Istio's endpoint metadata
//! (`workload` in istiod's encoding, which Istio's telemetry reads).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_proto::envoy::config::core::v3 as core;
use mesh_proto::envoy::config::endpoint::v3 as pe;

use super::{string_value, Builder};
use crate::translate::{
    pod_identity, reached_over_hbone, resolve_target_port, workload_name, Options,
};

impl Builder<'_> {
    pub(super) fn endpoints(
        &self,
        name: &str,
        svc: &Service,
        port: i32,
    ) -> pe::ClusterLoadAssignment {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let spec = svc.spec.clone().unwrap_or_default();
        let selector = spec.selector.clone().unwrap_or_default();
        let target = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.port == port)
            .and_then(|p| p.target_port.clone());
        let mut lb_endpoints = Vec::new();
        if !selector.is_empty() {
            for p in self.model.pods.values() {
                if p.metadata.namespace.as_deref() != Some(ns) || !selects(&selector, p) {
                    continue;
                }
                let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                    continue;
                };
                let tp = resolve_target_port(p, port, target.as_ref());
                if tp == 0 {
                    continue;
                }
                let mut fields = BTreeMap::new();
                fields.insert("workload".into(), string_value(&workload(self.opts, p)));
                // An identity means "reach over HBONE" to the waypoint;
                // pods not captured are plain TCP.
                if reached_over_hbone(self.model, p) {
                    fields.insert("identity".into(), string_value(&pod_identity(self.opts, p)));
                    fields.insert(
                        "hbone_port".into(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(15008.0)),
                        },
                    );
                }
                lb_endpoints.push(pe::LbEndpoint {
                    host_identifier: Some(pe::lb_endpoint::HostIdentifier::Endpoint(
                        pe::Endpoint {
                            address: Some(core::Address {
                                socket_address: Some(core::SocketAddress {
                                    address: ip,
                                    port_value: tp,
                                }),
                            }),
                        },
                    )),
                    metadata: Some(core::Metadata {
                        filter_metadata: [("istio".to_string(), prost_types::Struct { fields })]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    }),
                });
            }
        }
        pe::ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![pe::LocalityLbEndpoints { lb_endpoints }],
        }
    }
}

fn selects(selector: &BTreeMap<String, String>, p: &Pod) -> bool {
    let labels = p.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Istio's endpoint `workload` metadata, as istiod writes it:
/// `name;namespace;canonical service;canonical revision;cluster id`.
fn workload(opts: &Options, p: &Pod) -> String {
    let name = workload_name(p);
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let labels = p.metadata.labels.as_ref();
    let label = |keys: [&str; 3]| {
        keys.iter()
            .find_map(|k| labels.and_then(|l| l.get(*k)))
            .map(String::as_str)
    };
    // Istio's canonical-service rules.
    let service = label([
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or(&name);
    let revision = label([
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or("latest");
    format!("{name};{ns};{service};{revision};{}", opts.cluster_id)
}
