//! `upcycle-launch`: starting and supervising training workers, torchrun-style.
//!
//! The launcher is generic: it runs a command line as a group of N workers, gives each
//! the environment a worker reads its place in the job from, prefixes every output line
//! with the worker's rank, and supervises the group: when any worker fails, all are
//! stopped (SIGTERM, then SIGKILL after a grace period) and the whole group is started
//! again, up to `max_restarts` times. A restarted `upcycle train` continues from its
//! `--out`'s latest checkpoint by itself, so a restart is the same command again.
//!
//! | module | what |
//! |---|---|
//! | [`worker_env`] | the torchrun variables (and restart count) each worker gets |
//! | [`supervise`] | spawning (directly, or as one `mpirun` job), watching, stopping, restarting |
//! | [`rendezvous`] | node 0 hosting the store, every launcher joining it, agreeing on each attempt across nodes |
//! | [`store_server`] | the rendezvous store's server (the client, and the protocol, are `upcycle_parallel::store`) |
//! | [`plan`] | staged plans: stages in order, finished ones skipped on a rerun |
//! | [`emit`] | cluster job scripts (SLURM `sbatch`, plain `mpirun`) for the same stages |
//!
//! Two ways to start a group ([`Spawn`]):
//! - [`Spawn::Direct`]: one process per worker with `RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//!   ... set per worker (torchrun's way; GPU workers each take the GPU of their local
//!   rank). Several direct workers meet through the rendezvous store that node 0's
//!   launcher hosts (`MASTER_ADDR:MASTER_PORT`, guarded by `UPCYCLE_RDZV_TOKEN`) and talk
//!   over TCP (CPU) or NCCL (GPU); one launcher per node (`--nnodes`, `--node-rank`).
//! - [`Spawn::Mpirun`]: the group is one `mpirun -np N` job (Open MPI); workers read
//!   `OMPI_COMM_WORLD_*`, and the launcher sets only the job-wide variables (per-rank
//!   torchrun variables would have to agree with MPI's, see `upcycle-parallel`'s `env`).

pub mod emit;
pub mod plan;
mod procs;
pub mod rendezvous;
pub mod spec;
pub mod store_server;
pub mod supervise;
pub mod worker_env;

pub use spec::{LaunchSpec, Spawn};
pub use supervise::{install_signal_handlers, launch, Failure, WorkerStatus};

use std::path::PathBuf;

/// Why a launch (or a plan) did not finish.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The request cannot work; the message names the problem and the fix.
    #[error("{0}")]
    Invalid(String),
    /// A worker (or `mpirun`) could not be started.
    #[error("starting {what}: {source}")]
    Spawn {
        /// What was being started.
        what: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A file of the launcher (log, plan, plan state, job script) could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// The group failed more often than allowed.
    #[error("{0}")]
    Failed(Box<Failure>),
    /// The launchers could not meet or agree (a node did not join, the store was lost,
    /// another node stopped the job, another node's failures used the last restart).
    #[error("{0}")]
    Rendezvous(String),
    /// The launcher was asked to stop (SIGINT, SIGTERM or SIGHUP, by number); every
    /// worker was stopped.
    #[error("stopped by signal {0}; every worker was stopped")]
    Interrupted(i32),
    /// A stage of a plan did not finish.
    #[error(
        "stage {stage}: {source}\n(run the plan again to go on: finished stages are skipped, \
         a train stage resumes from its own latest checkpoint)"
    )]
    Stage {
        /// The stage's name.
        stage: String,
        /// What went wrong.
        source: Box<LaunchError>,
    },
}

impl LaunchError {
    /// The exit status the launcher should end with: the failing worker's (128 + signal
    /// for a worker killed by a signal), 128 + the signal that stopped the launcher, or 1
    /// for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Failed(f) => f.status.exit_code(),
            LaunchError::Interrupted(sig) => 128 + sig,
            LaunchError::Stage { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.into();
    move |source| LaunchError::Io { path, source }
}

/// How workers talk, as the user chooses it (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Through MPI: the group is one `mpirun` job (on GPUs the workers still use NCCL
    /// between them; its id goes over MPI). The default; one node.
    Mpi,
    /// Workers spawned directly, torchrun's way, meeting through the launcher's store
    /// and talking over TCP (CPU tensors; `upcycle_parallel::tcp`). No MPI needed; one
    /// launcher per node.
    Tcp,
    /// Workers spawned directly, each on the GPU of its local rank, talking NCCL (its id
    /// sent through the launcher's store). One launcher per node.
    Nccl,
}

impl Backend {
    /// How `nproc` workers (per node) of this backend are started: one worker of the MPI
    /// backend needs no communication and runs directly; several run under `mpirun`. The
    /// TCP and NCCL backends spawn directly; several NCCL workers need a visible GPU.
    pub fn spawn(self, nproc: usize) -> Result<Spawn, LaunchError> {
        match (self, nproc) {
            (Backend::Mpi, 1) | (Backend::Tcp, _) => Ok(Spawn::Direct),
            (Backend::Mpi, _) => Ok(Spawn::Mpirun),
            (Backend::Nccl, n) if n > 1 && !gpus_visible() => Err(LaunchError::Invalid(format!(
                "--backend nccl with {n} workers: no GPU is visible (no /dev/nvidia0, or \
                 CUDA_VISIBLE_DEVICES hides them); on CPUs use --backend tcp (workers spawned \
                 directly, talking over TCP) or --backend mpi (under mpirun)"
            ))),
            (Backend::Nccl, _) => Ok(Spawn::Direct),
        }
    }
}

/// Whether this machine shows an NVIDIA GPU (a device node, not hidden by
/// `CUDA_VISIBLE_DEVICES`).
pub fn gpus_visible() -> bool {
    let hidden = std::env::var("CUDA_VISIBLE_DEVICES")
        .is_ok_and(|v| v.trim().is_empty() || v.trim() == "-1");
    !hidden && std::path::Path::new("/dev/nvidia0").exists()
}
