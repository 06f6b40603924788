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
//! - [`envoy::config`] `listener`, `route`, `cluster`, `endpoint`, `rbac`
//!   and the [`envoy::extensions`] the waypoint reads (HTTP connection
//!   manager, tcp_proxy, RBAC and fault filters, upstream HTTP options):
//!   the subset of Envoy's v3 LDS/RDS/CDS/EDS resources the waypoint maps
//!   (see [`type_url`]). Fields we do not read are left out; prost skips
//!   them on decode, so the subset is wire-compatible.

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
        pub mod listener {
            pub mod v3 {
                tonic::include_proto!("envoy.config.listener.v3");
            }
        }
        pub mod route {
            pub mod v3 {
                tonic::include_proto!("envoy.config.route.v3");
            }
        }
        pub mod cluster {
            pub mod v3 {
                tonic::include_proto!("envoy.config.cluster.v3");
            }
        }
        pub mod endpoint {
            pub mod v3 {
                tonic::include_proto!("envoy.config.endpoint.v3");
            }
        }
        pub mod rbac {
            pub mod v3 {
                tonic::include_proto!("envoy.config.rbac.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
        pub mod matcher {
            pub mod v3 {
                tonic::include_proto!("envoy.r#type.matcher.v3");
            }
        }
    }
    pub mod extensions {
        pub mod filters {
            pub mod network {
                pub mod http_connection_manager {
                    pub mod v3 {
                        tonic::include_proto!(
                            "envoy.extensions.filters.network.http_connection_manager.v3"
                        );
                    }
                }
                pub mod tcp_proxy {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.filters.network.tcp_proxy.v3");
                    }
                }
                pub mod rbac {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.filters.network.rbac.v3");
                    }
                }
            }
            pub mod http {
                pub mod rbac {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.filters.http.rbac.v3");
                    }
                }
                pub mod fault {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.filters.http.fault.v3");
                    }
                }
            }
            pub mod common {
                pub mod fault {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.filters.common.fault.v3");
                    }
                }
            }
        }
        pub mod upstreams {
            pub mod http {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.upstreams.http.v3");
                }
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
                    pub use crate::delta_response::{
                        EncodedDeltaDiscoveryResponse, EncodedResources, Run,
                    };
                }
            }
        }
    }
}

pub mod delta_response;

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
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE_CONFIGURATION: &str =
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const CLUSTER_LOAD_ASSIGNMENT: &str =
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    pub const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    pub const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    pub const NETWORK_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    pub const HTTP_FAULT: &str =
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
    pub const HTTP_PROTOCOL_OPTIONS: &str =
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
}

pub use prost;
pub use prost_types;
