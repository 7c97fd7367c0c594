//! Generates the gRPC code with the vendored protoc (no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../../proto/dtrain/v1/cluster.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["../../proto/dtrain/v1/cluster.proto"], &["../../proto"])?;
    Ok(())
}
