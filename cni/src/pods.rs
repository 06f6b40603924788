//! Which pods join the mesh, and where the plugin learns about them.
//!
//! The rule is Istio's: a pod is ambient when it carries
//! `istio.io/dataplane-mode=ambient`, or its namespace does and the pod does
//! not say `none`. On top of the labels, and like Istio's CNI, some pods are
//! never enrolled whatever their labels say:
//!
//! - pods in `kube-system` (Istio's default `excludeNamespaces`): the
//!   cluster's own plumbing (DNS, the primary CNI's agents) must come up
//!   even when the mesh or the API server is not there, so the plugin does
//!   not even ask the API server about them;
//! - host-network pods: they have no network namespace of their own (the
//!   runtime does not call CNI for them; checked anyway, as Istio does);
//! - pods with a sidecar (`sidecar.istio.io/status`): ztunnel and a
//!   sidecar in one pod is not supported;
//! - ztunnel itself (label `app=ztunnel`): it cannot capture its own pod.
//!
//! On a cluster the facts come from the API server ([`crate::api`]); in the
//! test bed, which has none, from the JSON `labelsFile` ([`from_file`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Namespaces whose pods are never enrolled (see the module docs).
pub const EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];

/// What decides whether one pod joins the mesh.
#[derive(Default, Debug)]
pub struct Facts {
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// `spec.serviceAccountName`, passed on to ztunnel (empty if unknown).
    pub service_account: String,
}

impl Facts {
    pub fn in_mesh(&self) -> bool {
        fn label(l: &BTreeMap<String, String>) -> Option<&str> {
            l.get(DATAPLANE_MODE).map(String::as_str)
        }
        let ambient = match label(&self.pod_labels) {
            Some("ambient") => true,
            Some("none") => false,
            _ => label(&self.namespace_labels) == Some("ambient"),
        };
        ambient
            && !self.host_network
            && !self.pod_annotations.contains_key(SIDECAR_STATUS)
            && self.pod_labels.get("app").map(String::as_str) != Some("ztunnel")
    }
}

/// The test bed's stand-in for the API server:
/// `{"namespaces": {ns: labels}, "pods": {"ns/name": labels}}`.
#[derive(Deserialize, Default)]
struct LabelsFile {
    #[serde(default)]
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pods: BTreeMap<String, BTreeMap<String, String>>,
}

/// Facts for pod `namespace/name` from a labels file; a pod or namespace
/// the file does not mention has no labels.
pub fn from_file(path: &Path, namespace: &str, name: &str) -> anyhow::Result<Facts> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading labelsFile {}", path.display()))?;
    let mut file: LabelsFile = serde_json::from_str(&text)
        .with_context(|| format!("parsing labelsFile {}", path.display()))?;
    Ok(Facts {
        pod_labels: file
            .pods
            .remove(&format!("{namespace}/{name}"))
            .unwrap_or_default(),
        namespace_labels: file.namespaces.remove(namespace).unwrap_or_default(),
        ..Facts::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pod: &[(&str, &str)], ns: &[(&str, &str)]) -> Facts {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Facts {
            pod_labels: map(pod),
            namespace_labels: map(ns),
            ..Facts::default()
        }
    }

    #[test]
    fn istio_rule() {
        let amb = (DATAPLANE_MODE, "ambient");
        let none = (DATAPLANE_MODE, "none");
        assert!(facts(&[], &[amb]).in_mesh(), "ambient namespace");
        assert!(facts(&[amb], &[]).in_mesh(), "pod opts in");
        assert!(!facts(&[none], &[amb]).in_mesh(), "pod opts out");
        assert!(!facts(&[], &[]).in_mesh(), "no labels");
        assert!(
            !facts(&[(DATAPLANE_MODE, "other")], &[]).in_mesh(),
            "unknown mode"
        );
        assert!(
            facts(&[(DATAPLANE_MODE, "other")], &[amb]).in_mesh(),
            "unknown pod mode defers to the namespace"
        );
        assert!(
            !facts(&[amb, ("app", "ztunnel")], &[]).in_mesh(),
            "ztunnel itself"
        );
        let mut f = facts(&[amb], &[]);
        f.host_network = true;
        assert!(!f.in_mesh(), "host network");
        let mut f = facts(&[], &[amb]);
        f.pod_annotations.insert(SIDECAR_STATUS.into(), "{}".into());
        assert!(!f.in_mesh(), "has a sidecar");
    }
}
