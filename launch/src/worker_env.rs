//! The environment a worker is started with: torchrun's variables, which
//! `upcycle-parallel`'s `env` reads, and the restart count.

use crate::Spawn;
use upcycle_parallel::store::TOKEN_VAR;

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
    /// This node (`GROUP_RANK`).
    pub node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// The rendezvous token, for workers that meet through the launcher's store.
    pub token: Option<String>,
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
        .into_iter()
        .chain(self.token.iter().map(|t| (TOKEN_VAR.into(), t.clone())))
        .collect()
    }

    /// Every variable the worker of local rank `local` of this node's `nproc` gets: the
    /// job-wide ones and, spawned directly, its torchrun identity (global rank
    /// `node * nproc + local`).
    pub fn worker_vars(&self, spawn: Spawn, local: usize, nproc: usize) -> Vec<(String, String)> {
        let mut vars = self.job_vars();
        if spawn == Spawn::Direct {
            for (k, v) in [
                ("RANK", self.node * nproc + local),
                ("LOCAL_RANK", local),
                ("WORLD_SIZE", self.nnodes * nproc),
                ("LOCAL_WORLD_SIZE", nproc),
                ("GROUP_RANK", self.node),
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
            node: 0,
            nnodes: 1,
            token: None,
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
        // The second of two nodes, its workers meeting through the store.
        let node1 = JobEnv {
            node: 1,
            nnodes: 2,
            token: Some("0123456789abcdef".into()),
            ..job()
        };
        for local in 0..2 {
            let vars = node1.worker_vars(Spawn::Direct, local, 2);
            let w = read(&vars, None);
            assert_eq!(
                (w.rank, w.world, w.local_rank, w.local_world, w.node),
                (2 + local, 4, local, 2, 1)
            );
            let m: HashMap<String, String> = vars.into_iter().collect();
            let r =
                upcycle_parallel::store::RendezvousEnv::from_vars(|k| m.get(k).cloned()).unwrap();
            assert_eq!((r.addr.as_str(), r.attempt), ("127.0.0.1:29500", 2));
        }
        let vars: HashMap<_, _> = job().job_vars().into_iter().collect();
        assert!(!vars.contains_key(TOKEN_VAR));
        assert_eq!(vars[RESTART_COUNT], "2");
        assert_eq!(vars[TORCHELASTIC_RESTART_COUNT], "2");
        assert_eq!(vars["MASTER_PORT"], "29500");
    }
}
