//! The environment a worker is started with: torchrun's variables, which
//! `upcycle-parallel`'s `env` reads, and the restart count.

use crate::Spawn;

/// How many times the group was restarted before this attempt (0 on the first).
pub const RESTART_COUNT: &str = "UPCYCLE_RESTART_COUNT";

/// torchrun's name for the same count, for scripts written against torchrun.
pub const TORCHELASTIC_RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";

/// torchrun's per-worker identity variables. Under `mpirun` they are removed from the
/// workers' environment: each worker's `OMPI_COMM_WORLD_*` says who it is, and a
/// launcher-wide value would contradict it (the worker refuses that).
pub const PER_WORKER: [&str; 5] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
];

/// MPI identity variables a directly spawned worker must not inherit from a launcher
/// that was itself started by `mpirun`.
pub const MPI_IDENTITY: [&str; 8] = [
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
];

/// Where the job's master is and which attempt this is; the same for every worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    /// `MASTER_ADDR`.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
    /// Restarts so far.
    pub restart_count: u32,
    /// Restarts allowed.
    pub max_restarts: u32,
}

impl JobEnv {
    /// The job-wide variables (every worker, either way of spawning).
    pub fn job_vars(&self) -> Vec<(String, String)> {
        let restarts = self.restart_count.to_string();
        vec![
            ("MASTER_ADDR".into(), self.master_addr.clone()),
            ("MASTER_PORT".into(), self.master_port.to_string()),
            (RESTART_COUNT.into(), restarts.clone()),
            (TORCHELASTIC_RESTART_COUNT.into(), restarts),
            (
                "TORCHELASTIC_MAX_RESTARTS".into(),
                self.max_restarts.to_string(),
            ),
        ]
    }

    /// Every variable worker `rank` of `nproc` (all on this node) gets: the job-wide ones
    /// and, spawned directly, its torchrun identity.
    pub fn worker_vars(&self, spawn: Spawn, rank: usize, nproc: usize) -> Vec<(String, String)> {
        let mut vars = self.job_vars();
        if spawn == Spawn::Direct {
            // One node: the local rank is the rank, the node (group) is 0.
            for (k, v) in [
                ("RANK", rank),
                ("LOCAL_RANK", rank),
                ("WORLD_SIZE", nproc),
                ("LOCAL_WORLD_SIZE", nproc),
                ("GROUP_RANK", 0),
            ] {
                vars.push((k.into(), v.to_string()));
            }
        }
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use upcycle_parallel::env::{Starter, WorldInfo};

    fn job() -> JobEnv {
        JobEnv {
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            restart_count: 2,
            max_restarts: 3,
        }
    }

    /// What a worker makes of `vars` (and, under mpirun, of the rank mpirun gives it).
    fn read(vars: &[(String, String)], mpi_rank: Option<(usize, usize)>) -> WorldInfo {
        let mut m: HashMap<String, String> = vars.iter().cloned().collect();
        if let Some((rank, size)) = mpi_rank {
            for (k, v) in [
                ("OMPI_COMM_WORLD_RANK", rank),
                ("OMPI_COMM_WORLD_SIZE", size),
                ("OMPI_COMM_WORLD_LOCAL_RANK", rank),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", size),
            ] {
                m.insert(k.into(), v.to_string());
            }
        }
        WorldInfo::from_vars(|k| m.get(k).cloned()).unwrap()
    }

    #[test]
    fn workers_accept_the_environment_they_are_given() {
        for rank in 0..4 {
            let w = read(&job().worker_vars(Spawn::Direct, rank, 4), None);
            assert_eq!(
                (w.rank, w.world, w.local_rank, w.local_world, w.node),
                (rank, 4, rank, 4, 0)
            );
            assert_eq!(w.starter, Starter::Torchrun);
            // Under mpirun only the job-wide variables are set: MPI's identity stands.
            let w = read(&job().worker_vars(Spawn::Mpirun, rank, 4), Some((rank, 4)));
            assert_eq!((w.rank, w.world, w.starter), (rank, 4, Starter::OpenMpi));
        }
        let vars: HashMap<_, _> = job().job_vars().into_iter().collect();
        assert_eq!(vars[RESTART_COUNT], "2");
        assert_eq!(vars[TORCHELASTIC_RESTART_COUNT], "2");
        assert_eq!(vars["MASTER_PORT"], "29500");
    }
}
