// Shared by the build scripts that compile C++ against libtorch (`include!`d by
// parallel/build.rs, model/build.rs and trainer/build.rs): the headers are those torch-sys found
// (`DEP_TCH_LIBTORCH_LIB` is `<torch>/lib`), with libtorch's ABI flags.

/// Compiles `file` against the libtorch headers into the static library `name`.
fn compile_against_libtorch(file: &str, name: &str) {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB; run scripts/setup.sh first");
    let torch = std::path::Path::new(&lib)
        .parent()
        .expect("<torch>/lib has a parent")
        .to_path_buf();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(file)
        .compile(name);
    println!("cargo:rerun-if-changed={file}");
}
