//! `upcycle-parallel`: the communication layer of upcycle.
//!
//! It owns, as `../shared/design/ARCHITECTURE.md` describes: the worker's identity
//! ([`env`](mod@env): rank, world, local rank from the launcher, `mpirun` or `srun`) and the
//! [`collective`] operations on tensors (single-rank, [`tcp`] and MPI backends; the TCP
//! backend meets its peers through the rendezvous [`store`]: the client and the wire
//! protocol; the server is the launcher's) and the process [`groups`] (world,
//! expert-parallel, expert-data-parallel), and data-parallel
//! [`grads`] synchronisation in flat buckets, and the differentiable [`alltoall`] (an
//! autograd node in C++ calling back into Rust; its failures are recorded in [`failure`]
//! for the caller to check), every blocking call under a
//! [`watchdog`] deadline. With the `nccl` feature, the NCCL backend for GPUs (loaded at
//! run time). Nothing here knows what a Conformer is.

pub mod alltoall;

/// Unit tests (the fuzz tests among them) fail on any single allocation above 1 GiB: a
/// reader that believed a peer's claim of a huge size.
#[cfg(test)]
#[global_allocator]
static ALLOC: upcycle_files::fuzz::Bounded = upcycle_files::fuzz::Bounded::new(1 << 30);
#[cfg(feature = "mpi")]
pub mod bench;
pub mod collective;
pub mod env;
pub mod failure;
pub mod grads;
pub mod groups;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod store;
pub mod tcp;
pub mod testing;
pub mod watchdog;
