//! Compiles the mixed-precision switches (csrc/autocast.cpp) against libtorch's headers.
include!("../parallel/torch_cc.rs");

fn main() {
    compile_against_libtorch("csrc/autocast.cpp", "upcycle_autocast");
    println!("cargo:rerun-if-changed=../parallel/torch_cc.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
