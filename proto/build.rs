// Generates the selfplay.v1 messages and tonic services. protoc comes from the
// protoc-bin-vendored crate, so no system install is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let files = ["common", "coordinator", "learner", "reward"].map(|f| format!("selfplay/v1/{f}.proto"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        // Weight chunks decode as slices of the receive buffer instead of fresh copies.
        .bytes(".selfplay.v1.WeightChunk.data")
        .file_descriptor_set_path(std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("selfplay_descriptor.bin"))
        .compile_protos(&files, &[".".to_string()])?;
    Ok(())
}
