//! Compiles the autograd all-to-all (csrc/all_to_all.cpp) against the libtorch headers
//! that torch-sys found (`DEP_TCH_LIBTORCH_LIB` is `<torch>/lib`).
fn main() {
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
        .file("csrc/all_to_all.cpp")
        .compile("upcycle_all_to_all");
    println!("cargo:rerun-if-changed=csrc/all_to_all.cpp");
    println!("cargo:rerun-if-changed=build.rs");
}
