//! Compiles the fused AdamW call (csrc/fused_adamw.cpp) against libtorch's headers.
include!("../parallel/torch_cc.rs");

fn main() {
    compile_against_libtorch("csrc/fused_adamw.cpp", "upcycle_fused_adamw_device_steps");
    println!("cargo:rerun-if-changed=../parallel/torch_cc.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
