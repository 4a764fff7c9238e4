//! Compiles the autograd all-to-all (csrc/all_to_all.cpp) against libtorch's headers, and
//! links `libtorch_cuda` into this package's test binaries so that the NCCL tests see a GPU
//! where one exists (see link_cuda.rs).
include!("torch_cc.rs");
include!("link_cuda.rs");

fn main() {
    compile_against_libtorch("csrc/all_to_all.cpp", "upcycle_all_to_all");
    link_libtorch_cuda("");
    println!("cargo:rerun-if-changed=torch_cc.rs");
    println!("cargo:rerun-if-changed=link_cuda.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
