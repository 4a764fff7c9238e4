//! Test binaries link libtorch through upcycle-trainer; give them the same rpath the
//! `upcycle` binary has (trainer/build.rs), so they run without LD_LIBRARY_PATH.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports the libtorch folder");
    let lib = std::path::Path::new(&lib).canonicalize().expect("libtorch folder exists");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
