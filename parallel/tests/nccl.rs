//! The NCCL backend on GPUs. Where libtorch sees no CUDA device (CI, CPU machines) the
//! tests say so and pass, unless `UPCYCLE_REQUIRE_GPU=1` (set it on GPU machines) makes
//! that a failure: the refusal without a GPU is tested in `nccl.rs` itself. This
//! package's build script links libtorch_cuda into the test binaries, so they see the GPU. With
//! one GPU: a world of one through NCCL, every operation checked on GPU tensors and on
//! CPU tensors staged through the GPU. With two or more: two ranks under `mpirun`, one GPU
//! each, the NCCL id sent over MPI.

use std::time::Duration;

use tch::Device;
use upcycle_parallel::collective::{finalize_mpi, Collective, MpiCollective, Single};
use upcycle_parallel::env::WorldInfo;
use upcycle_parallel::nccl::NcclCollective;
use upcycle_parallel::testing::{check_collectives, have_cuda_devices, mpirun_self};

const TIMEOUT: Duration = Duration::from_secs(120);
const WORKER: &str = "UPCYCLE_NCCL_TEST_WORKER";

#[test]
fn nccl_collectives_on_one_gpu() {
    if !have_cuda_devices(1, "NCCL on one GPU") {
        return;
    }
    let world = NcclCollective::new(&Single, Device::Cuda(0), TIMEOUT).unwrap();
    check_collectives(&world, Device::Cuda(0));
    check_collectives(&world, Device::Cpu);
}

#[test]
fn nccl_worker() {
    if std::env::var_os(WORKER).is_none() {
        return;
    }
    let mpi = MpiCollective::world().unwrap();
    let device = Device::Cuda(WorldInfo::from_env().unwrap().local_rank);
    let world = NcclCollective::new(&mpi, device, TIMEOUT).unwrap();
    check_collectives(&world, device);
    println!("rank {}: nccl collectives correct", world.rank());
    drop((world, mpi));
    finalize_mpi();
}

#[test]
fn nccl_collectives_over_two_gpus_under_mpirun() {
    if !have_cuda_devices(2, "NCCL between ranks") {
        return;
    }
    let out = mpirun_self("nccl_worker", 2, WORKER);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("nccl collectives correct").count(), 2);
}
