//! Cross-crate integration tests: the TCP collective meeting through the launcher's store
//! server (`tests/tcp_collective.rs`); multi-process runs under `mpirun`, launcher
//! restarts and resharding join `tests/tests/` as the parallelism, checkpoint and launcher
//! issues land. `tests/golden/` holds reference outputs that other crates' tests compare
//! against (each folder names the script that regenerates it).
