//! The feed-forward network of every block. All blocks call [`FeedForward`], so the
//! MoE issue swaps its implementation without touching the blocks.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::activation::Activation;

/// `w_2(dropout(act(w_1(x))))` (WeNet's `PositionwiseFeedForward`; parameters
/// `w_1.weight`, `w_1.bias`, `w_2.weight`, `w_2.bias`).
#[derive(Debug)]
pub struct FeedForward {
    w_1: nn::Linear,
    w_2: nn::Linear,
    activation: Activation,
    dropout: f64,
}

impl FeedForward {
    /// A `d -> hidden -> d` network under `path`.
    pub fn new(
        path: &nn::Path<'_>,
        d: i64,
        hidden: i64,
        activation: Activation,
        dropout: f64,
    ) -> Self {
        Self {
            w_1: crate::init::linear(path / "w_1", d, hidden, true),
            w_2: crate::init::linear(path / "w_2", hidden, d, true),
            activation,
            dropout,
        }
    }

    /// Applies the network to `[B, T, d]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self
            .activation
            .apply(&self.w_1.forward(x))
            .dropout(self.dropout, train);
        self.w_2.forward(&h)
    }
}
