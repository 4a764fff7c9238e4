//! Support for tests that run as real MPI processes: a test binary starts itself under
//! `mpirun`, with an environment variable that turns one of its tests into the worker.

use std::process::{Command, Output};
use std::sync::Mutex;

/// One `mpirun` at a time per test binary (tests run on parallel threads; concurrent
/// jobs would oversubscribe the machine twice over).
static MPIRUN: Mutex<()> = Mutex::new(());

/// Runs the current test binary's test `test` as `np` MPI processes (oversubscribed, as
/// root if need be) with `flag=1` in their environment, and returns their output.
pub fn mpirun_self(test: &str, np: usize, flag: &str) -> Output {
    mpirun_self_with(test, np, flag, &[])
}

/// As [`mpirun_self`], with `env`'s variables also set in every process.
pub fn mpirun_self_with(test: &str, np: usize, flag: &str, env: &[(&str, &str)]) -> Output {
    let _one_at_a_time = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new("mpirun");
    command.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ]);
    for (key, value) in std::iter::once((flag, "1")).chain(env.iter().copied()) {
        command.args(["-x", &format!("{key}={value}")]);
    }
    command
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .output()
        .expect("mpirun (Debian openmpi-bin, installed by scripts/setup.sh)")
}
