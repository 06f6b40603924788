//! The mesh's wire types, generated from our own `.proto` files in
//! `proto/` at build time. Every message keeps the package name and field
//! numbers published by Envoy and Istio, so Istio's ztunnel (or any Envoy v3
//! ADS client) decodes what our control plane sends and vice versa.
//!
//! - [`discovery`]: `envoy.service.discovery.v3` (SotW and delta ADS),
//!   with [`core::Node`] and [`rpc::Status`].
//! - [`workload`]: `istio.workload.Address` (a `Workload` or a `Service`).
//! - [`security`]: `istio.security.Authorization`.
//! - [`ca`]: `istio.v1.auth.IstioCertificateService`.

#![allow(clippy::all, missing_docs)]

// Modules nest like the proto packages: prost writes cross-package
// references as relative paths (`super::super::...`).
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");

                /// The server side of the same service with pre-encoded
                /// resources (see `discovery_encoded.proto`).
                pub mod encoded {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/encoded/envoy.service.discovery.v3.rs"
                    ));
                }
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub use prost_types as protobuf;
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use envoy::config::core::v3 as core;
pub use envoy::service::discovery::v3 as discovery;
pub use google::rpc;
pub use istio::security;
pub use istio::v1::auth as ca;
pub use istio::workload;

/// Type URLs of the resources served over ADS.
pub mod type_url {
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
}

pub use prost;
pub use prost_types;
