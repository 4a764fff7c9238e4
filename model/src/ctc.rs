//! The CTC head: a projection to the vocabulary and its loss.

use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

/// WeNet's `CTC` (parameter `ctc_lo`).
#[derive(Debug)]
pub struct Ctc {
    ctc_lo: nn::Linear,
}

impl Ctc {
    /// A head from width `d` to `vocab` under `path` (normally `ctc`).
    pub fn new(path: &nn::Path<'_>, d: i64, vocab: i64) -> Self {
        Self {
            ctc_lo: crate::init::linear(path / "ctc_lo", d, vocab, true),
        }
    }

    /// Log-probabilities `[B, T, vocab]`.
    pub fn log_softmax(&self, hs: &Tensor) -> Tensor {
        self.ctc_lo.forward(hs).log_softmax(-1, Kind::Float)
    }

    /// Loss summed over utterances and divided by the batch size, as WeNet
    /// (infinite losses of impossible alignments are zeroed).
    pub fn loss(
        &self,
        log_probs: &Tensor,
        hlens: &Tensor,
        ys: &Tensor,
        ys_lens: &Tensor,
    ) -> Tensor {
        let b = log_probs.size()[0] as f64;
        // ctc_loss reads padded targets only up to each length; -1 padding is never read.
        let ys = ys.clamp_min(0);
        Tensor::ctc_loss_tensor(
            &log_probs.transpose(0, 1),
            &ys,
            hlens,
            ys_lens,
            0,
            Reduction::Sum,
            true,
        ) / b
    }
}
