//! Who am I: rank, world size, local rank and node of this worker, from the environment
//! its starter left. Sources, first match wins:
//!
//! | starter | variables |
//! |---|---|
//! | `upcycle launch` / torchrun | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` |
//! | Open MPI's `mpirun` | `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`, `_LOCAL_SIZE` |
//! | MPICH / Intel MPI (PMI) | `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS` |
//! | Slurm's `srun` | `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID` |
//!
//! No variable at all: a single process. A source with some of its variables missing,
//! values that are not numbers or out of range, or two launcher-level sources (torchrun
//! and MPI) that disagree are refused with the variable's name. Slurm's variables are
//! read only when no launcher or MPI set any: inside an allocation `srun` may have
//! started the launcher itself.

use std::fmt;

/// Where the identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Starter {
    /// No starter: one process.
    Single,
    /// `upcycle launch` or torchrun.
    Torchrun,
    /// Open MPI's `mpirun`.
    OpenMpi,
    /// An MPICH-style process manager (PMI).
    Pmi,
    /// Slurm's `srun`.
    Slurm,
}

/// This worker's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldInfo {
    /// Global rank, `0..world`.
    pub rank: usize,
    /// Number of workers.
    pub world: usize,
    /// Rank on this node, `0..local_world`.
    pub local_rank: usize,
    /// Workers on this node.
    pub local_world: usize,
    /// Index of this node.
    pub node: usize,
    /// Who started it.
    pub starter: Starter,
}

impl WorldInfo {
    /// A world of one.
    pub const SINGLE: WorldInfo = WorldInfo {
        rank: 0,
        world: 1,
        local_rank: 0,
        local_world: 1,
        node: 0,
        starter: Starter::Single,
    };

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables `get` returns (the environment, or a test's map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let torchrun = read(
            &get,
            Starter::Torchrun,
            ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
            Some("GROUP_RANK"),
        )?;
        let ompi = read(
            &get,
            Starter::OpenMpi,
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ],
            None,
        )?;
        let pmi = read(
            &get,
            Starter::Pmi,
            ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
            None,
        )?;
        let mpi = ompi.or(pmi);
        if let (Some(t), Some(m)) = (torchrun, mpi) {
            // The launcher runs its workers through mpirun: both must describe one world.
            for (what, a, b) in [("rank", t.rank, m.rank), ("world size", t.world, m.world)] {
                if a != b {
                    return Err(EnvError(format!(
                        "the launcher's {what} ({a}, from RANK/WORLD_SIZE) differs from the MPI \
                         {what} ({b}, from {}); start workers with one of them, not both",
                        mpi_vars(m.starter)
                    )));
                }
            }
        }
        if let Some(w) = torchrun.or(mpi) {
            return Ok(w);
        }
        let slurm = read(
            &get,
            Starter::Slurm,
            [
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS",
            ],
            Some("SLURM_NODEID"),
        )?;
        Ok(match slurm {
            Some(mut s) => {
                // SLURM_NTASKS_PER_NODE exists with --ntasks-per-node; else the whole world
                // bounds it.
                s.local_world = get("SLURM_NTASKS_PER_NODE")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(s.world);
                check_local(&s, "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")?;
                s
            }
            None => Self::SINGLE,
        })
    }
}

/// Whether an MPI process manager (`mpirun`, `mpiexec`) started this process: its rank
/// variables are set, and the workers join over MPI even when a launcher's `RANK`...
/// are set too.
pub fn mpi_started(get: impl Fn(&str) -> Option<String>) -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|k| get(k).is_some())
}

fn mpi_vars(s: Starter) -> &'static str {
    match s {
        Starter::Pmi => "PMI_RANK/PMI_SIZE",
        _ => "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE",
    }
}

/// One source's four numbers (rank, world, local rank, local world) and optional node:
/// `None` when none of the four is set, an error when only some are or one is bad.
fn read(
    get: &impl Fn(&str) -> Option<String>,
    starter: Starter,
    names: [&str; 4],
    node: Option<&str>,
) -> Result<Option<WorldInfo>, EnvError> {
    let values: Vec<Option<String>> = names.iter().map(|n| get(n)).collect();
    if values.iter().all(Option::is_none) {
        return Ok(None);
    }
    let number = |name: &str, v: &Option<String>| -> Result<usize, EnvError> {
        let v = v.as_deref().ok_or_else(|| {
            EnvError(format!(
                "{name} is not set, but {} is: the environment of {starter:?} is incomplete",
                names
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| v.is_some())
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        v.trim()
            .parse()
            .map_err(|_| EnvError(format!("{name}={v:?} is not a non-negative integer")))
    };
    let [rank, world, local_rank, local_world] = [0, 1, 2, 3].map(|i| number(names[i], &values[i]));
    let (rank, world, local_rank) = (rank?, world?, local_rank?);
    // Slurm's local world is read by the caller (it has no single variable).
    let local_world = if starter == Starter::Slurm {
        world
    } else {
        local_world?
    };
    if world == 0 || rank >= world {
        return Err(EnvError(format!(
            "{}={rank} is not below {}={world}",
            names[0], names[1]
        )));
    }
    let info = WorldInfo {
        rank,
        world,
        local_rank,
        local_world,
        node: match node.and_then(|n| get(n).map(|v| (n, v))) {
            Some((n, v)) => v
                .trim()
                .parse()
                .map_err(|_| EnvError(format!("{n}={v:?} is not a non-negative integer")))?,
            // MPI names no node index: with ranks placed node by node it is this.
            None => rank / local_world.max(1),
        },
        starter,
    };
    if starter != Starter::Slurm {
        check_local(&info, names[2], names[3])?;
    }
    Ok(Some(info))
}

fn check_local(w: &WorldInfo, local_rank: &str, local_world: &str) -> Result<(), EnvError> {
    if w.local_world == 0 || w.local_rank >= w.local_world || w.local_world > w.world {
        return Err(EnvError(format!(
            "{local_rank}={} and {local_world}={} do not fit a world of {}",
            w.local_rank, w.local_world, w.world
        )));
    }
    Ok(())
}

/// The environment does not describe a usable worker identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError(pub String);

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker environment: {}", self.0)
    }
}

impl std::error::Error for EnvError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<WorldInfo, EnvError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorldInfo::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn each_starter_is_read() {
        assert_eq!(world(&[]).unwrap(), WorldInfo::SINGLE);
        let t = world(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.local_world, t.node),
            (5, 8, 1, 4, 1)
        );
        assert_eq!(t.starter, Starter::Torchrun);
        let o = world(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!((o.rank, o.node, o.starter), (3, 1, Starter::OpenMpi));
        let p = world(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALRANKID", "0"),
            ("MPI_LOCALNRANKS", "2"),
        ])
        .unwrap();
        assert_eq!(p.starter, Starter::Pmi);
        let s = world(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_NTASKS_PER_NODE", "2"),
        ])
        .unwrap();
        assert_eq!(
            (s.rank, s.local_world, s.node, s.starter),
            (3, 2, 1, Starter::Slurm)
        );
    }

    #[test]
    fn launcher_inside_slurm_wins_and_agreeing_mpi_is_accepted() {
        let w = world(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_LOCALID", "0"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world, w.starter), (1, 2, Starter::Torchrun));
    }

    #[test]
    fn incomplete_bad_and_conflicting_environments_name_the_variable() {
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]).unwrap_err();
        assert!(e.0.contains("LOCAL_WORLD_SIZE is not set"), "{e}");
        let e = world(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
        ])
        .unwrap_err();
        assert!(e.0.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = world(&[
            ("RANK", "x"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
        ])
        .unwrap_err();
        assert!(e.0.contains("RANK=\"x\""), "{e}");
        let e = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .unwrap_err();
        assert!(e.0.contains("LOCAL_RANK=2"), "{e}");
        let e = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ])
        .unwrap_err();
        assert!(
            e.0.contains("world size") && e.0.contains("OMPI_COMM_WORLD"),
            "{e}"
        );
    }
}
