//! Links `libtorch_cuda` into this package's tests (the `upcycle` binary opens it at run
//! time: src/cuda.rs) and sets the rpath to the torch library folder (see ../parallel/link_cuda.rs).
include!("../parallel/link_cuda.rs");

fn main() {
    link_libtorch_cuda("-tests");
    println!("cargo:rerun-if-changed=../parallel/link_cuda.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
