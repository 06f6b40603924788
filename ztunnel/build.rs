//! Compiles `proto/zds.proto` with prost; protox parses it in pure Rust, so
//! no `protoc` is needed.
//!
//! Also links ztunnel's binaries with packed relative relocations (DT_RELR,
//! glibc 2.36+): a position-independent executable otherwise carries a
//! 24-byte `.rela.dyn` entry per pointer in its data, about 240 KiB that
//! the dynamic loader reads at start-up and that then stays resident;
//! packed, they take a few KiB. Idle RSS is one of ztunnel's targets.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=proto/zds.proto");
    let fds = protox::compile(["proto/zds.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("parsing proto/zds.proto: {e}"));
    prost_build::Config::new()
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating code for proto/zds.proto: {e}"));
}
