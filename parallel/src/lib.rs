//! `upcycle-parallel`: the communication layer of upcycle.
//!
//! It owns, as `../shared/design/ARCHITECTURE.md` describes: the worker's identity
//! ([`env`]: rank, world, local rank from the launcher, `mpirun` or `srun`) and the
//! [`collective`] operations on tensors (single-rank and MPI backends); next the NCCL
//! backend, the process groups (data-parallel, expert-parallel, expert-data-parallel),
//! gradient all-reduce and the differentiable all-to-all. Nothing here knows what a
//! Conformer is.

pub mod collective;
pub mod env;
