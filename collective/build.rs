//! Embeds libtorch's directory as an rpath (as the model crate does) and tells the NCCL
//! loader where the torch wheel keeps its `libnccl.so.2` (`torch/lib/../../nvidia/nccl/lib`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=PRIME_TORCH_LIB_DIR={dir}");
    } else {
        println!("cargo:rustc-env=PRIME_TORCH_LIB_DIR=");
    }
}
