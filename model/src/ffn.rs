//! The feed-forward network of every block: dense (WeNet's `PositionwiseFeedForward`)
//! or a mixture of experts ([`crate::moe`]), chosen per block by the config.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::activation::Activation;
use crate::mask::on_valid_rows;
use crate::moe::{ExpertBank, MoeContext, MoeFeedForward, MoeSpec, Routing};

/// `w_2(dropout(act(w_1(x))))` (parameters `w_1.weight`, `w_1.bias`, `w_2.weight`,
/// `w_2.bias`).
#[derive(Debug)]
pub struct DenseFeedForward {
    w_1: nn::Linear,
    w_2: nn::Linear,
    activation: Activation,
    dropout: f64,
}

impl DenseFeedForward {
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

    /// Applies the network to `[B, T, d]` (or rows `[N, d]`).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let _t = crate::profile::span("ffn");
        let h = self
            .activation
            .apply(&self.w_1.forward(x))
            .dropout(self.dropout, train);
        self.w_2.forward(&h)
    }
}

/// A block's feed-forward network.
#[derive(Debug)]
pub enum FeedForward {
    /// One network for every token.
    Dense(DenseFeedForward),
    /// Routed experts.
    Moe(Box<MoeFeedForward>),
}

impl FeedForward {
    /// Applies the network to `x` `[B, T, d]`. `valid` `[B, T]` marks the positions that
    /// are not padding: only those are computed (an MoE layer routes only those; a dense
    /// one skips padding on the CPU, where the work saved is the padding's share; on a
    /// GPU finding the rows would stop the host each layer), and padding gives zeros,
    /// which no later layer reads. MoE layers record their routing into `routing`.
    pub fn forward(
        &self,
        x: &Tensor,
        valid: Option<&Tensor>,
        train: bool,
        routing: &mut Routing,
    ) -> Tensor {
        match self {
            FeedForward::Dense(ffn) if x.device() == tch::Device::Cpu => {
                on_valid_rows(x, valid, |rows| ffn.forward(rows, train))
            }
            FeedForward::Dense(ffn) => ffn.forward(x, train),
            FeedForward::Moe(moe) => moe.forward(x, valid, train, routing),
        }
    }
}

/// Builds a section's (encoder's or decoder's) feed-forward networks, creating each
/// expert bank once and sharing it with every layer that names the same bank path.
#[derive(Debug)]
pub struct FfnFactory {
    d: i64,
    hidden: i64,
    expert_hidden: i64,
    activation: Activation,
    dropout: f64,
    moe: MoeSpec,
    banks: std::collections::HashMap<String, ExpertBank>,
}

impl FfnFactory {
    /// Networks `d -> hidden -> d`; MoE ones with `n_expert` experts of
    /// `d -> expert_hidden -> d`, `k` per token.
    pub fn new(
        d: i64,
        hidden: i64,
        activation: Activation,
        dropout: f64,
        (n_expert, k, expert_hidden): (i64, i64, i64),
        moe: &MoeContext,
    ) -> Self {
        Self {
            d,
            hidden,
            expert_hidden,
            activation,
            dropout,
            moe: MoeSpec {
                d,
                n_expert,
                k,
                activation,
                dropout,
                conf: moe.conf.clone(),
                dispatch: moe.dispatch.clone(),
                balance: moe.balance.clone(),
            },
            banks: Default::default(),
        }
    }

    /// A dense network under `path`.
    pub fn dense(&self, path: &nn::Path<'_>) -> FeedForward {
        FeedForward::Dense(DenseFeedForward::new(
            path,
            self.d,
            self.hidden,
            self.activation,
            self.dropout,
        ))
    }

    /// An MoE layer under `path` whose experts are the bank at `bank` (created there
    /// the first time it is named, shared afterwards).
    pub fn moe(&mut self, path: &nn::Path<'_>, bank: &nn::Path<'_>) -> FeedForward {
        let key = bank.components().collect::<Vec<_>>().join(".");
        let local = self.moe.dispatch.local_experts(self.moe.n_expert);
        let (n, d, hidden) = (self.moe.n_expert, self.d, self.expert_hidden);
        let experts = self
            .banks
            .entry(key)
            .or_insert_with(|| ExpertBank::part(bank, local, n, d, hidden))
            .share();
        FeedForward::Moe(Box::new(MoeFeedForward::new(path, experts, &self.moe)))
    }
}
