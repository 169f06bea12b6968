//! Generates the tonic/prost code for every `.proto` file under `proto/prime/v1`, using the
//! vendored `protoc` so that no system protobuf compiler is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let dir = PathBuf::from("proto/prime/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&files, &[PathBuf::from("proto")])?;
    Ok(())
}
