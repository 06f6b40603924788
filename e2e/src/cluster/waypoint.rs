//! Waypoints: a Gateway of class `istio-waypoint` plus its Service in the
//! manifests, and replicas of the real `waypoint` binary, each in a pod of
//! its own, configured over Envoy xDS by the control plane (the listeners,
//! routes, clusters and endpoints it translates from HTTPRoutes, Services
//! and policies) with a certificate from the mesh CA.
//!
//! A replica's pod carries `gateway.networking.k8s.io/gateway-name`, so
//! the waypoint's Service selects it and the ztunnels learn the replicas
//! as the waypoint's endpoints. It is not enrolled with CNI: the waypoint
//! speaks HBONE itself.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::{wait_for, yaml, App, Cluster, ADMIN, GATEWAY_NAME_LABEL, METRICS, READY};
use crate::mesh::http_get;
use crate::{ChildGuard, Node};

/// One running replica of a waypoint. Dropping it stops the process.
#[derive(Debug)]
pub struct WaypointReplica {
    pub app: App,
    pub child: ChildGuard,
}

impl Cluster {
    /// Writes waypoint `ns/name`: the Gateway and its Service at `vip`
    /// (`waypoint-<ns>-<name>.yaml`). Namespaces or Services opt in with
    /// the `istio.io/use-waypoint: <name>` label.
    pub fn add_waypoint(&self, ns: &str, name: &str, vip: IpAddr) -> Result<()> {
        self.apply(
            &format!("waypoint-{ns}-{name}.yaml"),
            &yaml::waypoint(ns, name, vip),
        )
    }

    /// Starts replica `replica` of waypoint `ns/gateway` on `node`: its
    /// pod (service account `gateway`) and Pod manifest, and the waypoint
    /// binary with `--xds-address` pointing at the control plane, the
    /// identity `spiffe://cluster.local/ns/<ns>/sa/<gateway>` and a
    /// certificate from the mesh CA. Returns once it is ready, i.e. has
    /// its first complete configuration.
    pub fn start_waypoint_replica(
        &self,
        node: &Node,
        ns: &str,
        gateway: &str,
        replica: &str,
    ) -> Result<WaypointReplica> {
        let bin = self.bins.waypoint.clone().map_err(|e| anyhow!(e))?;
        let app = self.add_pod(node, ns, replica, gateway, &[(GATEWAY_NAME_LABEL, gateway)])?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--xds-address", &self.xds_url()])
            .arg("--xds-root-cert")
            .arg(self.ca_cert())
            // The name in the control plane's certificate (ztunnel's default).
            .args(["--xds-server-name", "istiod.istio-system.svc"])
            .arg("--xds-token-file")
            .arg(self.token_file(node.name()))
            // The node's token names the node; the stream must name it too
            // (Node.metadata.NODE_NAME). Node.id stays Istio's default
            // `router~<own ip>~...`, by which the control plane finds this
            // pod and so its Gateway.
            .args(["--xds-node-name", node.name()])
            .args(["--identity", &app.spiffe()])
            // Its certificate from the mesh CA, as a ztunnel's: the CA key
            // stays with the control plane.
            .args(["--ca-address", &self.xds_url()])
            .args(["--hbone-addr", "[::]:15008"])
            .args(["--own-ip", &app.ip().to_string()])
            // Not captured: nothing to exempt its own sockets from.
            .args(["--socket-mark", "0"])
            .env("RUST_LOG", "info");
        let child = self.tb.spawn(app.pod.netns(), cmd)?;
        let ns_name = app.pod.netns().to_string();
        let ready = wait_for(Duration::from_secs(30), "waypoint readiness", || {
            if !child.is_running() {
                bail!("waypoint exited during start-up");
            }
            Ok(matches!(
                http_get(&ns_name, READY, "/healthz/ready"),
                Ok((200, _))
            ))
        });
        if let Err(e) = ready {
            bail!(
                "waypoint {}: {e:#}; the end of its log ({}):\n{}",
                app.key(),
                child.log_path().display(),
                super::tail(&child.log(), 10)
            );
        }
        Ok(WaypointReplica { app, child })
    }
}

impl WaypointReplica {
    /// GET on the replica's admin (`/config_dump`) or metrics port.
    pub fn get(&self, path: &str) -> Result<String> {
        let port = if path == "/config_dump" {
            ADMIN
        } else {
            METRICS
        };
        let (code, body) = http_get(self.app.pod.netns(), port, path)?;
        if code != 200 {
            bail!("waypoint {} {path}: HTTP {code}", self.app.key());
        }
        Ok(body)
    }

    pub fn config_dump(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/config_dump")?)?)
    }

    pub fn metrics(&self) -> Result<String> {
        self.get("/metrics")
    }

    /// The waypoint's log (access lines have target `access`).
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Waits until the configuration in force (`/config_dump`) satisfies
    /// `f`, e.g. names a route the control plane translated.
    pub fn wait_config(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        wait_for(timeout, what, || Ok(f(&self.config_dump()?)))
    }
}
