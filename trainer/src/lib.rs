//! `upcycle-trainer`: everything around the model that a training run needs.
//! The speech data pipeline it reads from is its own crate, `upcycle-dataset`.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the training configuration (WeNet `train.yaml` keys + `upcycle_conf`) |
//! | [`optim`] | AdamW with saveable state, clipping, schedules |
//! | [`train`] | the training loop |
//! | [`distributed`] | the loop's view of the job: groups, gradient sync, agreements |
//! | [`freeze`] | freezing schedules by step and parameter glob |
//! | [`inspect`] | routing tables of checkpoints, comparison tables of runs |
//! | [`metrics`] | a run's `metrics.jsonl` and TensorBoard scalars: writing, reading |
//! | [`tensorboard`] | TensorBoard event files |
//! | [`report`] | plots and a Markdown summary of runs (`upcycle report`) |
//! | [`checkpoint`] | checkpoint directories (single-file for now) |
//! | [`convert`] | the conversion tool: dense -> MoE (upcycle), WeNet import/export |
//! | [`torch_file`] | `torch.save` state dicts read (no pickle code run) and written |
//! | [`eval`] | decoding, CER/WER, RTF; transcription |
//! | [`scoring`] | edit distance and error rates |
//! | [`bench`](mod@bench) | benchmarks of the Rust side |

pub mod bench;

/// Unit tests (the fuzz tests among them) fail on any single allocation above 1 GiB: a
/// reader that believed a file's claim of a huge size.
#[cfg(test)]
#[global_allocator]
static ALLOC: upcycle_files::fuzz::Bounded = upcycle_files::fuzz::Bounded::new(1 << 30);
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod distributed;
pub mod eval;
pub mod freeze;
pub mod inspect;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod scoring;
pub mod tensorboard;
pub mod torch_file;
pub mod train;
