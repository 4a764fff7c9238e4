//! Compiles the autograd all-to-all (csrc/all_to_all.cpp) against libtorch's headers.
include!("torch_cc.rs");

fn main() {
    compile_against_libtorch("csrc/all_to_all.cpp", "upcycle_all_to_all");
    println!("cargo:rerun-if-changed=torch_cc.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
