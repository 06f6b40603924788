//! Compiles the .proto files with protox (a pure-Rust protobuf compiler, so
//! the build needs no protoc) and generates prost messages and tonic
//! clients and servers from the descriptors.

fn main() -> anyhow::Result<()> {
    let files = [
        "proto/envoy/core.proto",
        "proto/envoy/discovery.proto",
        "proto/google/rpc/status.proto",
        "proto/istio/workload.proto",
        "proto/istio/authorization.proto",
        "proto/istio/ca.proto",
        // The waypoint's Envoy v3 resources (LDS, RDS, CDS, EDS).
        "proto/envoy/xds/type.proto",
        "proto/envoy/xds/matcher.proto",
        "proto/envoy/xds/core_types.proto",
        "proto/envoy/xds/route.proto",
        "proto/envoy/xds/listener.proto",
        "proto/envoy/xds/hcm.proto",
        "proto/envoy/xds/tcp_proxy.proto",
        "proto/envoy/xds/rbac.proto",
        "proto/envoy/xds/rbac_filters.proto",
        "proto/envoy/xds/rbac_network.proto",
        "proto/envoy/xds/fault_common.proto",
        "proto/envoy/xds/fault.proto",
        "proto/envoy/xds/endpoint.proto",
        "proto/envoy/xds/cluster.proto",
        "proto/envoy/xds/upstream_http.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Encoded in key order, not a HashMap's random one: the control
        // plane versions each resource by a hash of its bytes, which must be
        // the same in every process (a workload backing two services, RBAC
        // policies by name).
        .btree_map(".envoy.config.rbac.v3.RBAC.policies")
        .btree_map(".istio.workload.Workload.services")
        .compile_fds(fds)?;

    // The server-side ADS with pre-encoded resources: its own output
    // directory (same package name), sharing every type but the responses.
    let encoded = "proto/envoy/discovery_encoded.proto";
    println!("cargo:rerun-if-changed={encoded}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("encoded");
    std::fs::create_dir_all(&out)?;
    let fds = protox::compile([encoded], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&out)
        .bytes(".")
        .extern_path(".envoy.config.core.v3", "crate::envoy::config::core::v3")
        .extern_path(".google.rpc", "crate::google::rpc")
        .extern_path(
            ".envoy.service.discovery.v3.DiscoveryRequest",
            "crate::envoy::service::discovery::v3::DiscoveryRequest",
        )
        .extern_path(
            ".envoy.service.discovery.v3.DeltaDiscoveryRequest",
            "crate::envoy::service::discovery::v3::DeltaDiscoveryRequest",
        )
        // Written by hand: resources may come as runs encoded once per
        // snapshot (see src/delta_response.rs).
        .extern_path(
            ".envoy.service.discovery.v3.EncodedDeltaDiscoveryResponse",
            "crate::delta_response::EncodedDeltaDiscoveryResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}
