// Shared by the build scripts of the packages whose binaries must see a GPU (`include!`d by
// parallel/build.rs and cli/build.rs): links `libtorch_cuda` even though no symbol of it is
// named, so that CUDA kernels register and a GPU is seen where one exists (otherwise the
// linker's --as-needed drops it and `tch::Cuda::is_available()` is false on a GPU machine),
// and gives the binaries and tests an rpath to the torch library folder so that they run
// without `LD_LIBRARY_PATH`.

/// Links libtorch_cuda where the torch build has it into the targets that
/// `cargo:rustc-link-arg{targets}` names ("" all of the package's, "-tests" its test
/// binaries only: the `upcycle` binary opens it at run time, see cli/src/cuda.rs), and
/// sets the rpath of every target.
fn link_libtorch_cuda(targets: &str) {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB; run scripts/setup.sh first");
    let lib = std::path::Path::new(&lib);
    let lib = lib.canonicalize().unwrap_or_else(|_| lib.to_path_buf());
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg{targets}=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg{targets}=-ltorch_cuda");
        println!("cargo:rustc-link-arg{targets}=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
