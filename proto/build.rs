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
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
