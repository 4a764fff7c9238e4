//! Support for tests that run as real MPI processes: a test binary starts itself under
//! `mpirun`, with an environment variable that turns one of its tests into the worker.

use std::process::{Command, Output};

use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, ReduceOp};
use std::sync::Mutex;

/// A free TCP port on the loopback interface (bound, read, released), for tests that
/// start servers or launchers of several "nodes".
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The variable that turns "no GPU here" into a test failure. Set it (`=1`) on GPU
/// machines, so that a test written for a GPU cannot pass there by skipping (a binary
/// linked without libtorch_cuda sees no device).
pub const REQUIRE_GPU: &str = "UPCYCLE_REQUIRE_GPU";

/// Whether at least `n` CUDA devices are seen. Where fewer are, says so on stderr and
/// returns false (the test skips) unless [`REQUIRE_GPU`] is set, where it panics.
pub fn have_cuda_devices(n: i64, what: &str) -> bool {
    let seen = tch::Cuda::device_count();
    if seen >= n {
        return true;
    }
    let required = std::env::var(REQUIRE_GPU).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{REQUIRE_GPU} is set but {seen} CUDA device(s) are seen, {n} needed: {what} cannot run"
    );
    eprintln!("{seen} CUDA device(s), {n} needed: {what} not exercised here");
    false
}

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

/// What one rank sends to rank `to`: `2 * from + to` rows (rank 0 sends none to itself),
/// each row `[from, to, i]`.
pub fn rows(from: usize, to: usize) -> Tensor {
    let n = if from == 0 && to == 0 {
        0
    } else {
        2 * from + to
    } as i64;
    let data: Vec<f32> = (0..n)
        .flat_map(|i| [from as f32, to as f32, i as f32])
        .collect();
    Tensor::from_slice(&data).view([n, 3])
}

/// Checks every operation of `world` (sums, maxima and means of several kinds, an uneven
/// all-to-all with a zero count after exchanging counts, all-gather, broadcast, barrier,
/// a split into even and odd ranks) on tensors on `device`, against values computed
/// here; panics naming the first that differs. Every rank of `world` calls it.
pub fn check_collectives(world: &dyn Collective, device: Device) {
    let (rank, size) = (world.rank(), world.size());
    for kind in [Kind::Float, Kind::Double, Kind::Int64] {
        let mut t = Tensor::full([3, 2], (rank + 1) as f64, (kind, device));
        world.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        let want = (size * (size + 1) / 2) as f64;
        assert_eq!(t.max().double_value(&[]), want, "{kind:?} sum");
        assert_eq!(t.min().double_value(&[]), want, "{kind:?} sum");
        let mut m = Tensor::full([4], rank as f64, (kind, device));
        world.all_reduce(&mut m, ReduceOp::Max).unwrap();
        assert_eq!(m.min().double_value(&[]), (size - 1) as f64);
    }
    let mut avg = Tensor::from_slice(&[rank as f32, 1.0]).to_device(device);
    world.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
    let mean = (size - 1) as f64 / 2.0;
    assert!(
        (avg.double_value(&[0]) - mean).abs() < 1e-6 && (avg.double_value(&[1]) - 1.0).abs() < 1e-6
    );

    // Uneven all-to-all with a zero count, counts exchanged first.
    let parts: Vec<Tensor> = (0..size)
        .map(|to| rows(rank, to).to_device(device))
        .collect();
    let send_counts: Vec<i64> = parts.iter().map(|p| p.size()[0]).collect();
    let recv_counts = world.exchange_counts(&send_counts).unwrap();
    let want_counts: Vec<i64> = (0..size).map(|from| rows(from, rank).size()[0]).collect();
    assert_eq!(recv_counts, want_counts);
    let got = world
        .all_to_all(&Tensor::cat(&parts, 0), &send_counts, &recv_counts)
        .unwrap();
    let want = Tensor::cat(
        &(0..size).map(|from| rows(from, rank)).collect::<Vec<_>>(),
        0,
    );
    assert!(
        got.to_device(Device::Cpu).equal(&want),
        "all_to_all on rank {rank}"
    );
    // Tokens under bf16 autocast travel as bfloat16 (moved bit for bit).
    let got = world
        .all_to_all(
            &Tensor::cat(&parts, 0).to_kind(Kind::BFloat16),
            &send_counts,
            &recv_counts,
        )
        .unwrap();
    assert!(
        got.to_device(Device::Cpu)
            .equal(&want.to_kind(Kind::BFloat16)),
        "bfloat16 all_to_all on rank {rank}"
    );

    let gathered = world
        .all_gather(&Tensor::from_slice(&[rank as i64, 7]).to_device(device))
        .unwrap();
    let want: Vec<i64> = (0..size as i64).flat_map(|r| [r, 7]).collect();
    assert_eq!(
        Vec::<i64>::try_from(&gathered.to_device(Device::Cpu)).unwrap(),
        want
    );

    let mut b = Tensor::full([5], rank as f64, (Kind::Float, device));
    world.broadcast(&mut b, size - 1).unwrap();
    assert_eq!(b.min().double_value(&[]), (size - 1) as f64);
    world.barrier().unwrap();

    // Subgroups: even and odd ranks.
    let sub = world.split(rank % 2, rank, "parity").unwrap();
    assert_eq!(sub.rank(), rank / 2);
    assert_eq!(
        sub.size(),
        size / 2 + usize::from(rank % 2 == 0 && size % 2 == 1)
    );
    let mut s = Tensor::from_slice(&[rank as i64]).to_device(device);
    sub.all_reduce(&mut s, ReduceOp::Sum).unwrap();
    let want: i64 = (0..size)
        .filter(|r| r % 2 == rank % 2)
        .map(|r| r as i64)
        .sum();
    assert_eq!(s.int64_value(&[0]), want);
}
