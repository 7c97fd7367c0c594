//! Generates the event messages with the vendored protoc (no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../../proto/tensorboard/event.proto");
    prost_build::compile_protos(&["../../proto/tensorboard/event.proto"], &["../../proto"])?;
    Ok(())
}
