//! Which waypoint sees which Envoy resources: each waypoint is sent only
//! the listener, routes, clusters and endpoints of its own Gateway, never
//! another waypoint's (whose routes and policies are that namespace's
//! business), and a client that is no waypoint gets none.
//!
//! A client says which waypoint it is by its `Node.id`, in Istio's form
//! `router~<pod ip>~<pod>.<ns>~<ns>.svc.cluster.local`; the pod (by name,
//! else by IP in that namespace) must carry
//! `gateway.networking.k8s.io/gateway-name` naming a waypoint Gateway of
//! its namespace. When the client authenticated as a node (a node token,
//! `Node.metadata.NODE_NAME`), the pod must run on that node, so one
//! node's credentials cannot read another node's waypoint configuration.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use mesh_proto::type_url;

use crate::model::{Model, GATEWAY_NAME_LABEL};
use crate::translate::Resource;

type Named = BTreeMap<Arc<str>, Arc<Resource>>;

/// The Envoy types served per waypoint.
pub const SCOPED_TYPES: [&str; 4] = [
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
];

#[derive(Debug, Default)]
pub struct Scope {
    /// type URL -> resource name -> the waypoint Gateways (`ns/name`) it
    /// is for.
    owners: HashMap<&'static str, HashMap<Arc<str>, BTreeSet<String>>>,
    /// Waypoint pods by `ns/name` and by `ns/ip`: (Gateway `ns/name`,
    /// node name).
    pods: HashMap<String, (String, String)>,
}

impl Scope {
    /// The waypoint pods of `model`.
    pub(super) fn with_pods(model: &Model) -> Scope {
        let mut pods = HashMap::new();
        for p in model.pods.values() {
            let Some(gw) = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            else {
                continue;
            };
            let ns = p.metadata.namespace.as_deref().unwrap_or("default");
            let gw = format!("{ns}/{gw}");
            if !model.gateways.get(&gw).is_some_and(|g| g.is_waypoint()) {
                continue;
            }
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let name = p.metadata.name.as_deref().unwrap_or_default();
            pods.insert(format!("{ns}/{name}"), (gw.clone(), node.clone()));
            for ip in p.status.as_ref().into_iter().flat_map(|s| {
                s.pod_ip
                    .iter()
                    .chain(s.pod_ips.iter().flatten().map(|i| &i.ip))
            }) {
                pods.entry(format!("{ns}/{ip}"))
                    .or_insert_with(|| (gw.clone(), node.clone()));
            }
        }
        Scope {
            owners: HashMap::new(),
            pods,
        }
    }

    /// Records that resource `name` of `type_url` is for `gateways`.
    pub(super) fn own(&mut self, type_url: &'static str, name: &str, gateways: BTreeSet<String>) {
        self.owners
            .entry(type_url)
            .or_default()
            .insert(name.into(), gateways);
    }

    pub fn is_scoped(type_url: &str) -> bool {
        SCOPED_TYPES.contains(&type_url)
    }

    /// The waypoint Gateway (`ns/name`) a client is: `node_id` its
    /// `Node.id`, `node` the node it authenticated as (the id itself when
    /// it named no node).
    pub fn gateway_of(&self, node_id: &str, node: &str) -> Option<&str> {
        let mut parts = node_id.split('~');
        let (Some("router"), Some(ip), Some(pod_ns)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        // Pod names may hold dots, namespaces cannot.
        let (pod, ns) = pod_ns.rsplit_once('.')?;
        let (gw, pod_node) = self
            .pods
            .get(&format!("{ns}/{pod}"))
            .or_else(|| self.pods.get(&format!("{ns}/{ip}")))?;
        (node == node_id || pod_node == node).then_some(gw.as_str())
    }

    /// The resources of `type_url` (from `res`) that waypoint `gateway`
    /// may see.
    pub fn view(&self, type_url: &str, res: &Named, gateway: Option<&str>) -> Named {
        let (Some(gw), Some(owners)) = (gateway, self.owners.get(type_url)) else {
            return Named::new();
        };
        res.iter()
            .filter(|(n, _)| owners.get(*n).is_some_and(|o| o.contains(gw)))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }
}
