//! waypoint: the L7 proxy of the ambient mesh.
//!
//! ztunnels send the traffic of workloads that opted in to L7 here over
//! HBONE (HTTP/2 `CONNECT` over mutual TLS, port 15008). The waypoint
//! terminates HBONE with its own identity, learns the original client's
//! identity (the peer certificate) and the original destination (the
//! `CONNECT` authority), and inside each tunnel speaks HTTP/1.1, HTTP/2 or
//! gRPC: authorization, routing, retries, timeouts, mirroring and fault
//! injection, as Envoy's v3 API and Gateway API's HTTPRoute define them.
//! Requests leave over HBONE again, to the chosen endpoint's ztunnel, with
//! the waypoint's own certificate.
//!
//! A request's path through the modules:
//!
//! [`inbound`] (HBONE, per stream) → [`serve`] (hyper server; RBAC via
//! [`rbac`], route via [`route`], faults, redirects) → [`forward`]
//! (rewrites, retries, timeout, mirroring) → [`upstream`] (endpoint choice
//! in [`upstream::balancer`], HBONE or TCP in [`upstream::connector`],
//! hyper client) → back, with [`record`] writing metrics ([`metrics`]) and
//! the access log. Opaque TCP takes [`tcp`] instead of [`serve`];
//! [`plaintext`] is an optional way in without HBONE (benchmarks, debugging).
//! [`idle`] is the HTTP/1.1 header-read timeout, one timer per connection.
//! HTTP/2 upstream uses its own per-endpoint pool ([`upstream::h2pool`]).
//! [`app`] wires it together and drains on SIGTERM; [`workers`] runs the
//! listeners thread per core; [`admin`] serves `/config_dump`, `/metrics`
//! and readiness.
//!
//! Configuration ([`config`]) mirrors Envoy's Listener / RouteConfiguration
//! / Cluster resources, is read from YAML or received over Envoy v3 xDS
//! ([`xds`]: delta ADS, LDS/RDS/CDS/EDS) and swapped in whole after
//! [`config::validate::compile`] accepts it.

pub mod admin;
pub mod app;
pub mod config;
pub mod forward;
pub mod h2io;
pub mod idle;
pub mod inbound;
pub mod metrics;
pub mod out_of_line;
pub mod path;
pub mod peers;
pub mod plaintext;
pub mod rbac;
pub mod record;
pub mod replay;
pub mod request_end;
pub mod route;
pub mod serve;
pub mod sniff;
pub mod tcp;
pub mod upstream;
pub mod workers;
pub mod xds;

use std::sync::Arc;

use ztunnel::identity::{Identity, SecretManager};

/// What every connection and request handler shares.
pub struct Proxy {
    /// The waypoint's own identity (its certificate on both sides).
    pub identity: Identity,
    pub secrets: Arc<SecretManager>,
    pub store: Arc<config::Store>,
    pub upstream: Arc<upstream::Upstream>,
    pub metrics: Arc<metrics::Metrics>,
    /// The mesh's workloads, to tell who a client is ([`peers`]).
    pub peers: Arc<ztunnel::state::Store>,
    /// Graceful shutdown: stop accepting, GOAWAY, let open requests end.
    pub drain: ztunnel::proxy::Drain,
}

impl Proxy {
    /// The same proxy with upstream connection pools of its own, for a
    /// worker thread (see [`workers`]); everything else is shared. Call
    /// it on the worker's runtime: the pools' tasks run there.
    pub fn for_worker(&self) -> Proxy {
        Proxy {
            identity: self.identity.clone(),
            secrets: self.secrets.clone(),
            store: self.store.clone(),
            upstream: Arc::new(self.upstream.fresh()),
            metrics: self.metrics.clone(),
            peers: self.peers.clone(),
            // A child token: a connection checks it on every turn of its
            // task, which locks the token's state; shared by every worker,
            // that lock bounced between cores.
            drain: ztunnel::proxy::Drain {
                stop: self.drain.stop.child_token(),
                connections: self.drain.connections.clone(),
            },
        }
    }
}
