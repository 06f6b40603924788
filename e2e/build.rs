//! Compiles `proto/sample.proto` (the gRPC sample app) with protox, a
//! pure-Rust protobuf compiler, so the build needs no protoc.

fn main() -> anyhow::Result<()> {
    let file = "proto/sample.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
