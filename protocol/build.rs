//! Generates the gRPC code from `proto/*.proto` with a vendored `protoc`, so building needs
//! no system package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Blob chunks stay `Bytes` end to end: no copy between the store and the wire.
        .bytes(".granary.v1.BlobChunk.data")
        .bytes(".granary.v1.UpstreamChunk.data")
        .compile_with_config(config, &["proto/granary.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
