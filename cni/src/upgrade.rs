//! Whether a stopping installer is being replaced or removed for good.
//!
//! A rolling update of the installer's DaemonSet stops the old pod before
//! the new one starts. If the old one took the plugin off the node on its
//! way out, every pod created in that gap would start outside the mesh
//! (until the new node agent enrolled it, running). So, as Istio's node
//! agent does, it leaves the plugin in place when the DaemonSet that runs
//! it is still there and not being deleted: pods created in the gap then
//! wait (the plugin's token dies with the old pod, so their `ADD` fails
//! and the runtime retries it) until the new installer writes a fresh
//! kubeconfig, and start in the mesh.
//!
//! Everything else is a removal, and the plugin goes: the DaemonSet gone
//! or being deleted, a DaemonSet that no longer selects this node (its
//! `nodeSelector` or required node affinity changed), no DaemonSet owning
//! this pod, or an API server that cannot say (fail open, as Istio: a node
//! without the mesh beats a node whose pods cannot start).

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod};
use kube::{Api, Client};

/// Which installer pod this is, and on which node.
pub struct Me {
    pub namespace: String,
    pub pod: String,
    pub node: Option<String>,
}

/// What to do with the plugin on the way out, and why.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// Leave it: the installer's DaemonSet is being updated.
    Keep(String),
    /// Take it off the node.
    Remove(String),
}

/// Asks the API server whether `me`'s DaemonSet is being updated.
pub async fn decide(client: &Client, me: &Me) -> Stop {
    match replaced_by(client, me).await {
        Ok(None) => Stop::Remove(format!(
            "pod {}/{} is not run by a DaemonSet",
            me.namespace, me.pod
        )),
        Ok(Some(Err(why))) => Stop::Remove(why),
        Ok(Some(Ok(why))) => Stop::Keep(why),
        Err(e) => Stop::Remove(format!("{e:#}")),
    }
}

/// `None` without an owning DaemonSet; otherwise why it will (`Ok`) or
/// will not (`Err`) start a new installer on this node.
async fn replaced_by(client: &Client, me: &Me) -> anyhow::Result<Option<Result<String, String>>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &me.namespace);
    let pod = pods
        .get(&me.pod)
        .await
        .with_context(|| format!("getting this pod {}/{}", me.namespace, me.pod))?;
    let Some(owner) = pod
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|o| o.kind == "DaemonSet" && o.controller == Some(true))
    else {
        return Ok(None);
    };
    let what = format!("DaemonSet {}/{}", me.namespace, owner.name);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &me.namespace);
    let Some(ds) = daemonsets
        .get_opt(&owner.name)
        .await
        .with_context(|| format!("getting {what}"))?
    else {
        return Ok(Some(Err(format!("{what} is gone"))));
    };
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Some(Err(format!("{what} is being deleted"))));
    }
    if let Some(name) = &me.node {
        let nodes: Api<Node> = Api::all(client.clone());
        let node = nodes
            .get(name)
            .await
            .with_context(|| format!("getting node {name}"))?;
        let labels = node.metadata.labels.unwrap_or_default();
        let spec = ds.spec.and_then(|s| s.template.spec);
        if !spec.as_ref().is_some_and(|s| selects(s, name, &labels)) {
            return Ok(Some(Err(format!("{what} no longer runs on node {name}"))));
        }
    }
    Ok(Some(Ok(format!("{what} is still there (an update)"))))
}

/// Whether a pod of `spec` may run on node `name` with `labels`: its
/// `nodeSelector`, and its required node affinity (any term, each of whose
/// requirements holds), as the scheduler reads them.
fn selects(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let selector = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let affinity = match required {
        None => true,
        Some(r) => r.node_selector_terms.iter().any(|t| term(t, name, labels)),
    };
    selector && affinity
}

/// A term with no requirements matches no node (the API's rule).
fn term(t: &NodeSelectorTerm, name: &str, labels: &BTreeMap<String, String>) -> bool {
    let exprs = t.match_expressions.as_deref().unwrap_or_default();
    let fields = t.match_fields.as_deref().unwrap_or_default();
    let node_fields = BTreeMap::from([("metadata.name".to_string(), name.to_string())]);
    (!exprs.is_empty() || !fields.is_empty())
        && exprs.iter().all(|r| requirement(r, labels))
        && fields.iter().all(|r| requirement(r, &node_fields))
}

fn requirement(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let have = labels.get(&r.key);
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => have.is_some_and(|v| values.contains(v)),
        "NotIn" => have.is_none_or(|v| !values.contains(v)),
        "Exists" => have.is_some(),
        "DoesNotExist" => have.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), [limit]) = (have.and_then(|v| number(v)), values) else {
                return false;
            };
            match (number(limit), r.operator.as_str()) {
                (Some(l), "Gt") => have > l,
                (Some(l), _) => have < l,
                (None, _) => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> k8s_openapi::api::core::v1::PodSpec {
        let mut v = v;
        v["containers"] = json!([]);
        serde_json::from_value(v).expect("pod spec")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn affinity(terms: serde_json::Value) -> k8s_openapi::api::core::v1::PodSpec {
        spec(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}))
    }

    #[test]
    fn node_selector() {
        let s = spec(json!({"nodeSelector": {"kubernetes.io/os": "linux", "pool": "a"}}));
        assert!(selects(
            &s,
            "n",
            &labels(&[("kubernetes.io/os", "linux"), ("pool", "a"), ("x", "y")])
        ));
        assert!(!selects(
            &s,
            "n",
            &labels(&[("kubernetes.io/os", "linux"), ("pool", "b")])
        ));
        assert!(!selects(&s, "n", &labels(&[("kubernetes.io/os", "linux")])));
        assert!(selects(&spec(json!({})), "n", &labels(&[])));
    }

    #[test]
    fn required_node_affinity() {
        let node = labels(&[("zone", "z1"), ("cpus", "8")]);
        let one = |op: &str, values: serde_json::Value| {
            affinity(
                json!([{"matchExpressions": [{"key": "zone", "operator": op, "values": values}]}]),
            )
        };
        assert!(selects(&one("In", json!(["z0", "z1"])), "n", &node));
        assert!(!selects(&one("In", json!(["z2"])), "n", &node));
        assert!(selects(&one("NotIn", json!(["z2"])), "n", &node));
        assert!(!selects(&one("NotIn", json!(["z1"])), "n", &node));
        assert!(selects(&one("Exists", json!(null)), "n", &node));
        assert!(!selects(&one("DoesNotExist", json!(null)), "n", &node));
        assert!(!selects(&one("Sometimes", json!(["z1"])), "n", &node));
        let cpus = |op: &str, v: &str| {
            affinity(
                json!([{"matchExpressions": [{"key": "cpus", "operator": op, "values": [v]}]}]),
            )
        };
        assert!(selects(&cpus("Gt", "4"), "n", &node));
        assert!(!selects(&cpus("Gt", "8"), "n", &node));
        assert!(selects(&cpus("Lt", "16"), "n", &node));
        assert!(!selects(&cpus("Lt", "many"), "n", &node));
        // Terms are alternatives; the requirements of one all hold.
        let terms = affinity(json!([
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z9"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]},
                                  {"key": "cpus", "operator": "Exists"}]},
        ]));
        assert!(selects(&terms, "n", &node));
        let both = affinity(json!([{"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["z1"]},
            {"key": "gpu", "operator": "Exists"}]}]));
        assert!(!selects(&both, "n", &node));
        // By name, and an empty term that matches nothing.
        let by_name = affinity(json!([{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["n"]}]}]));
        assert!(selects(&by_name, "n", &node));
        assert!(!selects(&by_name, "m", &node));
        assert!(!selects(&affinity(json!([{}])), "n", &node));
    }
}
