//! Links `libtorch_cuda` into the `upcycle` binary (and this package's tests) and sets the
//! rpath to the torch library folder (see ../parallel/link_cuda.rs).
include!("../parallel/link_cuda.rs");

fn main() {
    link_libtorch_cuda();
    println!("cargo:rerun-if-changed=../parallel/link_cuda.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
