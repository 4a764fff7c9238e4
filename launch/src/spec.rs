//! What a launch is asked to do: the command, the workers and how they start, the
//! rendezvous and the supervision settings. Read by the supervisor, the rendezvous and
//! plans alike.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// How a group of workers is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawn {
    /// One process per worker with its torchrun identity (`RANK`, `LOCAL_RANK`, ...).
    Direct,
    /// One `mpirun -np N` job (Open MPI); workers read their identity from MPI.
    Mpirun,
}

/// What to run and how to supervise it.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The program and its arguments, run once per worker.
    pub command: Vec<OsString>,
    /// Workers on this node.
    pub nproc: usize,
    /// Nodes of the job, each with its own launcher and `nproc` workers.
    pub nnodes: usize,
    /// This node's index (its workers are ranks `node_rank * nproc ..`).
    pub node_rank: usize,
    /// How they are started.
    pub spawn: Spawn,
    /// Restarts of the whole group after a failure.
    pub max_restarts: u32,
    /// `MASTER_ADDR` given to the workers.
    pub master_addr: String,
    /// `MASTER_PORT` given to the workers; where node 0 hosts the rendezvous store (0:
    /// any free port, on one node).
    pub master_port: u16,
    /// The job's rendezvous token (`UPCYCLE_RDZV_TOKEN`); `None`: a new random one, on one
    /// node (several need it given).
    pub token: Option<String>,
    /// The address node 0's store listens on (default: `master_addr`).
    pub store_bind: Option<String>,
    /// How long the launchers wait for each other (joining, restarting together).
    pub join_timeout: Duration,
    /// Between SIGTERM and SIGKILL when stopping the group.
    pub stop_grace: Duration,
    /// How long `mpirun` may stay up after one of its workers ended before the job
    /// counts as hung.
    pub hang_grace: Duration,
    /// One log file per rank (`rank-<r>.log`, and `mpirun.log`) here, appended to.
    pub log_dir: Option<PathBuf>,
    /// Lines of a failing worker's output quoted in the error.
    pub tail_lines: usize,
    /// The `mpirun` program.
    pub mpirun: OsString,
}

impl LaunchSpec {
    /// `command` on `nproc` workers started by `spawn`, with the defaults: no restart,
    /// master 127.0.0.1:29500 (torchrun's), one node, a new token, 10 minutes to join,
    /// 10 s grace, 60 s for `mpirun` to end a job a worker left, 20 lines of tail, no log
    /// files.
    pub fn new(command: Vec<OsString>, nproc: usize, spawn: Spawn) -> Self {
        LaunchSpec {
            command,
            nproc,
            nnodes: 1,
            node_rank: 0,
            spawn,
            max_restarts: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            token: None,
            store_bind: None,
            join_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(10),
            hang_grace: Duration::from_secs(60),
            log_dir: None,
            tail_lines: 20,
            mpirun: "mpirun".into(),
        }
    }
}
