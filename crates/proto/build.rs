//! Compiles proto/ with protox (pure Rust, so no protoc is needed on a fresh machine).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("kserve/grpc_service.proto"),
        root.join("framecast/compositor/v1/compositor.proto"),
        root.join("framecast/tensorcache/v1/tensor_cache.proto"),
    ];
    // Imported files too (kserve/model_config.proto): the whole tree.
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let mut config = tonic_prost_build::Config::new();
    // Tensor payloads are large: keep them as reference-counted `Bytes`, never copied per element.
    config.bytes(["."]);
    tonic_prost_build::configure().compile_fds_with_config(fds, config)?;
    Ok(())
}
