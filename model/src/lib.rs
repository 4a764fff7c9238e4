//! `upcycle-model`: the Conformer U2++ recognizer and its Mixture-of-Experts
//! layers, as WeNet defines it, with WeNet's parameter names so that checkpoints map
//! one-to-one.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | `encoder_conf`, `decoder_conf`, `model_conf` (WeNet keys) |
//! | [`mask`] | padding, causal and (dynamic) chunk masks |
//! | [`embedding`] | CMVN, conv2d subsampling x4/x6/x8, sinusoidal positions |
//! | [`attention`] | multi-head and relative-position multi-head attention |
//! | [`ffn`] | the feed-forward network of every block, dense or MoE |
//! | [`moe`] | router, dispatch, stacked experts, routing statistics |
//! | [`dispatch`] | expert-parallel dispatch by differentiable all-to-all |
//! | [`naming`] | WeNet's parameter names and ours (stacked experts) |
//! | [`init`] | layers initialised as PyTorch does |
//! | [`convolution`] | the Conformer convolution module |
//! | [`encoder`] | Conformer blocks and encoder |
//! | [`decoder`] | left-to-right and right-to-left Transformer decoders |
//! | [`ctc`] | CTC head and loss |
//! | [`host`] | device-to-host reads of the training step, counted |
//! | [`loss`] | target preparation and label smoothing |
//! | [`asr`] | the whole model and its loss |
//! | [`search`] | CTC greedy and prefix beam search, attention rescoring |
//! | [`upcycle`] | dense -> MoE: experts copied from the dense networks |
//!
//! Nothing here reads files; processes appear only through the expert-parallel dispatch
//! ([`dispatch`], over a group from `upcycle-parallel`). The trainer builds a model from
//! parsed configuration and a `tch::nn::VarStore`.

pub mod activation;
pub mod asr;
pub mod attention;
pub mod balance;
pub mod config;
pub mod convolution;
pub mod ctc;
pub mod decoder;
pub mod dispatch;
pub mod embedding;
pub mod encoder;
pub mod ffn;
pub mod flops;
pub mod host;
pub mod init;
pub mod loss;
pub mod mask;
pub mod moe;
pub mod naming;
pub mod precision;
pub mod profile;
pub mod search;
pub mod upcycle;

/// Unit tests of this crate draw from libtorch's one global generator, and some seed it
/// and compare two draws: run in parallel, another test's draw in between changes the
/// second. Every unit test holds this lock, so they run one at a time (they take well
/// under a second together).
#[cfg(test)]
mod test_rng {
    use std::sync::{Mutex, MutexGuard};

    static RNG: Mutex<()> = Mutex::new(());

    /// The lock (a test that failed while holding it does not poison the others).
    pub(crate) fn lock() -> MutexGuard<'static, ()> {
        RNG.lock().unwrap_or_else(|e| e.into_inner())
    }
}
