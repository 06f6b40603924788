//! Compiles `proto/zds.proto` with prost; protox parses it in pure Rust, so
//! no `protoc` is needed.
fn main() {
    println!("cargo:rerun-if-changed=proto/zds.proto");
    let fds = protox::compile(["proto/zds.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("parsing proto/zds.proto: {e}"));
    prost_build::Config::new()
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating code for proto/zds.proto: {e}"));
}
