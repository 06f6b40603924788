//! ztunnel: the per-node proxy of the ambient mesh.
//!
//! Traffic of the workloads on a node is captured into ztunnel, which
//! carries it to the destination node's ztunnel over HBONE (HTTP/2 CONNECT
//! over mutual TLS, port 15008) with a certificate per workload identity,
//! and enforces L4 authorization on the receiving side.
//!
//! - [`state`]: what ztunnel knows of the mesh (workloads, services, policies)
//! - [`identity`]: SPIFFE identities and their certificates
//! - [`tls`]: rustls set-up for HBONE
//! - [`rbac`]: L4 authorization
//! - [`proxy`]: the listeners and data paths
//! - [`inpod`]: pod enrollment and eBPF capture inside each pod
//! - [`metrics`], [`admin`]: observability
//! - [`xds`]: the control-plane client (workload xDS and the CA)
//! - [`app`]: where it is all wired together

pub mod admin;
pub mod alloc;
pub mod app;
pub mod config;
pub mod identity;
pub mod inpod;
pub mod metrics;
pub mod pow;
pub mod process;
pub mod proxy;
pub mod rbac;
pub mod socket;
pub mod state;
pub mod tls;
pub mod xds;
