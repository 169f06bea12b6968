//! Embeds libtorch's directory as an rpath in this package's binaries and test executables, so
//! they run without LD_LIBRARY_PATH. torch-sys (`links = "tch"`) exports the directory it
//! linked against as `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
