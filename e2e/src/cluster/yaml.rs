//! The Kubernetes manifests the cluster writes for the control plane, as
//! a user would keep them (flow-style YAML, one object per document).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::App;

/// `{a: b, c: d}`, keys and values quoted (label values may look like
/// numbers or booleans).
pub fn flow_map(m: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
    format!("{{{}}}", items.join(", "))
}

pub fn namespace(name: &str, labels: &BTreeMap<String, String>) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {}\n",
        flow_map(labels)
    )
}

/// A running Pod scheduled on its node, with both addresses; `captured`:
/// annotated as its enrolment leaves it (`ambient.istio.io/redirection:
/// enabled`, which tells the control plane to reach it over HBONE).
pub fn pod(a: &App, captured: bool) -> String {
    let annotations = if captured {
        "{ambient.istio.io/redirection: enabled}"
    } else {
        "{}"
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {uid}\n  labels: {labels}\n  annotations: {annotations}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: e2e/app}}]\nstatus:\n  phase: Running\n  podIP: {ip4}\n  podIPs: [{{ip: {ip4}}}, {{ip: \"{ip6}\"}}]\n",
        name = a.name,
        ns = a.namespace,
        uid = a.uid(),
        labels = flow_map(&a.labels),
        node = a.node(),
        sa = a.sa,
        ip4 = a.ip(),
        ip6 = a.pod.ipv6(),
    )
}

/// A port of a Service: `port` to `target_port`, with an optional
/// `appProtocol` (e.g. `http`, `grpc`).
#[derive(Clone, Copy, Debug)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub app_protocol: Option<&'static str>,
}

impl ServicePort {
    pub fn new(port: u16, target_port: u16) -> Self {
        ServicePort {
            port,
            target_port,
            app_protocol: None,
        }
    }
}

/// A ClusterIP Service selecting pods by `selector`.
pub fn service(
    ns: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
    vip: IpAddr,
    ports: &[ServicePort],
) -> String {
    let mut p = String::new();
    for sp in ports {
        let _ = write!(
            p,
            "{{name: p{port}, port: {port}, targetPort: {tp}{ap}}}, ",
            port = sp.port,
            tp = sp.target_port,
            ap = sp
                .app_protocol
                .map(|a| format!(", appProtocol: {a}"))
                .unwrap_or_default()
        );
    }
    let p = p.trim_end_matches(", ");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {}\nspec:\n  selector: {}\n  clusterIP: {vip}\n  ports: [{p}]\n",
        flow_map(labels),
        flow_map(selector)
    )
}

/// A waypoint: the Gateway (class `istio-waypoint`, HBONE on 15008) and
/// the Service its replicas back (they carry the label
/// `gateway.networking.k8s.io/gateway-name: <name>`).
pub fn waypoint(ns: &str, name: &str, vip: IpAddr) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n\
         ---\n{}",
        service(
            ns,
            name,
            &BTreeMap::new(),
            &super::labels(&[(super::GATEWAY_NAME_LABEL, name)]),
            vip,
            &[ServicePort::new(15008, 15008)],
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_render_ports_and_labels() {
        let y = service(
            "store",
            "reviews",
            &BTreeMap::new(),
            &super::super::labels(&[("app", "reviews")]),
            "10.96.0.40".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            &[
                ServicePort::new(80, 8080),
                ServicePort {
                    port: 50051,
                    target_port: 50051,
                    app_protocol: Some("grpc"),
                },
            ],
        );
        assert!(y.contains("selector: {\"app\": \"reviews\"}"), "{y}");
        assert!(y.contains("clusterIP: 10.96.0.40"), "{y}");
        assert!(
            y.contains("ports: [{name: p80, port: 80, targetPort: 8080}, {name: p50051, port: 50051, targetPort: 50051, appProtocol: grpc}]"),
            "{y}"
        );
    }
}
