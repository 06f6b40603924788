//! In-process control plane on loopback, and raw tonic clients for it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use mesh_proto::core::Node;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Streaming;
use xds::auth::Auth;
use xds::{Config, Running, Source};

pub const NS: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
"#;

pub fn pod(name: &str, node: &str, ip: &str, sa: &str, labels: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {{{labels}}}
  # Enrolled: its capture is in place, so it is reached over HBONE.
  annotations: {{ambient.istio.io/redirection: enabled}}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]
status:
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
"#
    )
}

pub const SERVICE: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: http}]
"#;

pub fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

pub async fn start(dir: &Path) -> Running {
    let mut cfg = Config::new(Source::Manifests(dir.to_path_buf()));
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.auth = Auth::from_pairs([
        ("node-a".to_string(), "tok-a".to_string()),
        ("node-b".to_string(), "tok-b".to_string()),
    ]);
    cfg.poll_interval = Duration::from_millis(20);
    xds::start(cfg).await.unwrap()
}

pub async fn channel(r: &Running) -> Channel {
    Endpoint::from_shared(format!("https://{}", r.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&r.root_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn node(name: &str) -> Option<Node> {
    Some(Node {
        id: name.to_string(),
        ..Default::default()
    })
}

/// A waypoint's node: Istio's `router~<ip>~<pod>.demo~demo.svc.cluster.local`
/// id, and the node it runs on as `metadata.NODE_NAME` (what its token
/// names).
pub fn waypoint_node(pod: &str, ip: &str, node: &str) -> Option<Node> {
    Some(Node {
        id: format!("router~{ip}~{pod}.demo~demo.svc.cluster.local"),
        metadata: Some(prost_types::Struct {
            fields: [(
                "NODE_NAME".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(node.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    })
}

/// A waypoint pod of Gateway `gateway` (namespace demo).
pub fn waypoint_pod(name: &str, node: &str, ip: &str, gateway: &str) -> String {
    pod(
        name,
        node,
        ip,
        "waypoint",
        &format!("gateway.networking.k8s.io/gateway-name: {gateway}"),
    )
}

pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A raw delta ADS stream.
pub struct Delta {
    pub tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    pub async fn open(
        ch: Channel,
        token: &str,
        first: DeltaDiscoveryRequest,
    ) -> Result<Delta, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let mut client =
            AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(usize::MAX);
        let rx = client
            .delta_aggregated_resources(authed(ReceiverStream::new(rx), token))
            .await?
            .into_inner();
        Ok(Delta { tx, rx })
    }

    pub async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    pub async fn recv(&mut self) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(20), self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(tonic::Status::aborted("stream ended")),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("no response from the server"),
        }
    }

    pub async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The echo Service (ClusterIP 10.96.0.10, as the client dials), its one
/// pod outside the mesh at `echo_ip` (plain TCP to the loopback backend),
/// the waypoint Gateway `wp` and its pod `wp-1` on node-a; then `extra`.
pub fn waypoint_mesh(echo_ip: &str, backend_port: u16, extra: &str) -> String {
    format!(
        r#"{ns}---
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: demo
  labels: {{app: echo, istio.io/dataplane-mode: none}}
spec:
  nodeName: node-b
  serviceAccountName: echo
  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: {backend_port}}}]}}]
status:
  podIP: {echo_ip}
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-1
  namespace: demo
  labels: {{gateway.networking.k8s.io/gateway-name: wp}}
spec:
  nodeName: node-a
  serviceAccountName: wp
  containers: [{{name: waypoint, image: waypoint}}]
status:
  podIP: 10.244.1.99
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo, labels: {{istio.io/use-waypoint: wp}}}}
spec:
  selector: {{app: echo}}
  clusterIP: 10.96.0.10
  ports: [{{port: 80, targetPort: http}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: demo}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
{extra}"#,
        ns = NS
    )
}
