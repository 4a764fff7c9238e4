//! Helpers for the integration tests in `tests/tests/`.

use std::path::PathBuf;

/// The `upcycle` binary of the same build profile as the running test (cargo builds it
/// with `cargo test --workspace`, which also tests the trainer package).
pub fn upcycle_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/upcycle
    let bin = exe.parent().and_then(|d| d.parent()).expect("target layout").join("upcycle");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build the binary first)",
        bin.display()
    );
    bin
}
