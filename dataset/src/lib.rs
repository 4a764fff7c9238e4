//! `upcycle-dataset`: the speech data pipeline: audio, features, text, lists, corpora and
//! the loader.
//!
//! | module | what |
//! |---|---|
//! | [`audio`] | WAV reading/writing, header checks, resampling, speed change |
//! | [`fbank`] | Kaldi-compatible 80-bin log-mel filterbank |
//! | [`cmvn`] | global CMVN statistics (WeNet's JSON) |
//! | [`augment`] | SpecAugment and speed perturbation choices |
//! | [`text`] | normaliser, units file, character tokenizer |
//! | [`list`] | `data.list` and Kaldi `wav.scp` + `text` |
//! | [`config`] | WeNet's `dataset_conf` |
//! | [`loader`] | sharded, batched, background feature extraction |
//! | [`corpus`] | `data prepare` for the corpora of DATA.md |
//! | [`npy`] | `.npy` writing, for features to inspect (`upcycle data fbank`) |
//! | [`threads`] | background threads that leave libtorch's CPUs to the training step |
//!
//! The crate knows nothing of training, models or processes: the caller says which
//! part of a list is its own ([`loader::Shard`]), and batches come out as `tch`
//! tensors.

pub mod audio;

/// Unit tests (the fuzz tests among them) fail on any single allocation above 1 GiB: a
/// reader that believed a file's claim of a huge size.
#[cfg(test)]
#[global_allocator]
static ALLOC: upcycle_files::fuzz::Bounded = upcycle_files::fuzz::Bounded::new(1 << 30);
pub mod augment;
pub mod cmvn;
pub mod config;
pub mod corpus;
pub mod fbank;
pub mod list;
pub mod loader;
pub mod npy;
pub mod text;
pub mod threads;
