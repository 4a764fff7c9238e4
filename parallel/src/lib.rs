//! `upcycle-parallel`: the communication layer of upcycle.
//!
//! It will own, as `../shared/design/ARCHITECTURE.md` describes: the worker's identity
//! (rank, world, local rank from the launcher, `mpirun` or `srun`), the `Collective`
//! trait with its NCCL, MPI and single-rank backends, the process groups (data-parallel,
//! expert-parallel, expert-data-parallel), gradient all-reduce and the differentiable
//! all-to-all. Nothing here knows what a Conformer is.
//!
//! The crate is empty until the parallelism issue lands; the data pipeline takes its
//! rank and world size as plain numbers meanwhile.
