//! Cross-crate integration tests: multi-process runs under `mpirun`, launcher restarts
//! and resharding join `tests/tests/` as the parallelism, checkpoint and launcher issues
//! land. `tests/golden/` holds reference outputs that other crates' tests compare
//! against (each folder names the script that regenerates it).
