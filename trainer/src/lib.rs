//! `upcycle-trainer`: everything around the model that a training run needs.
//!
//! Today: the speech data pipeline ([`data`]) and the benchmarks that time it
//! ([`bench`]). Training, evaluation, checkpoints and the conversion tool join as their
//! issues land (see `../shared/design/ARCHITECTURE.md`).

pub mod bench;
pub mod config;
pub mod data;
pub mod optim;
