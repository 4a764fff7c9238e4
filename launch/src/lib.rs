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
//! | [`plan`] | staged plans: stages in order, finished ones skipped on a rerun |
//! | [`emit`] | cluster job scripts (SLURM `sbatch`, plain `mpirun`) for the same stages |
//!
//! Two ways to start a group ([`Spawn`]):
//! - [`Spawn::Direct`]: one process per worker with `RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//!   ... set per worker (torchrun's way; for GPU workers, each takes the GPU of its local
//!   rank). On the CPU workers talk over MPI only, so several direct workers are for
//!   GPUs (NCCL); one direct worker needs no communication at all.
//! - [`Spawn::Mpirun`]: the group is one `mpirun -np N` job (Open MPI); workers read
//!   `OMPI_COMM_WORLD_*`, and the launcher sets only the job-wide variables (per-rank
//!   torchrun variables would have to agree with MPI's, see `upcycle-parallel`'s `env`).
//!
//! Not here yet: the rendezvous (NCCL ids exchanged through a launcher-hosted store) and
//! several nodes (`--nnodes`); see the README's "Launcher" section.

pub mod emit;
pub mod plan;
mod procs;
pub mod supervise;
pub mod worker_env;

pub use supervise::{install_signal_handlers, launch, Failure, LaunchSpec, Spawn, WorkerStatus};

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
    /// between them; its id goes over MPI). The default.
    Mpi,
    /// NCCL with workers spawned directly, torchrun's way.
    Nccl,
}

impl Backend {
    /// How `nproc` workers of this backend are started: one worker needs no
    /// communication and runs directly; several run under `mpirun`. Several NCCL workers
    /// spawned directly are refused: they would need the launcher-hosted rendezvous to
    /// exchange the NCCL id, which does not exist yet (workers join over MPI).
    pub fn spawn(self, nproc: usize) -> Result<Spawn, LaunchError> {
        match (self, nproc) {
            (_, 1) => Ok(Spawn::Direct),
            (Backend::Mpi, _) => Ok(Spawn::Mpirun),
            (Backend::Nccl, n) => Err(LaunchError::Invalid(format!(
                "--backend nccl with {n} workers: {}; use --backend mpi (the default): the \
                 workers run under mpirun{}",
                if gpus_visible() {
                    "spawning GPU workers directly needs the launcher's rendezvous for the \
                     NCCL id, which is not built yet"
                } else {
                    "no GPU is visible, and on the CPU workers talk over MPI only"
                },
                if gpus_visible() {
                    " and still talk NCCL between GPUs (the id goes over MPI)"
                } else {
                    ""
                }
            ))),
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
