//! Multi-head attention (decoder) and WeNet's relative-position variant (encoder).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::init;

/// Scaled dot-product multi-head attention (WeNet's `MultiHeadedAttention`; parameters
/// `linear_q`, `linear_k`, `linear_v`, `linear_out`).
#[derive(Debug)]
pub struct MultiHeadedAttention {
    linear_q: nn::Linear,
    linear_k: nn::Linear,
    linear_v: nn::Linear,
    linear_out: nn::Linear,
    heads: i64,
    d_k: i64,
    dropout: f64,
}

impl MultiHeadedAttention {
    /// `heads` heads over width `d` under `path`.
    pub fn new(path: &nn::Path<'_>, heads: i64, d: i64, dropout: f64) -> Self {
        Self {
            linear_q: init::linear(path / "linear_q", d, d, true),
            linear_k: init::linear(path / "linear_k", d, d, true),
            linear_v: init::linear(path / "linear_v", d, d, true),
            linear_out: init::linear(path / "linear_out", d, d, true),
            heads,
            d_k: d / heads,
            dropout,
        }
    }

    /// `[B, T, d] -> [B, h, T, d_k]`.
    fn split_heads(&self, x: &Tensor) -> Tensor {
        let b = x.size()[0];
        x.view([b, -1, self.heads, self.d_k]).transpose(1, 2)
    }

    /// Softmax over masked scores, weighted sum of `v`, output projection. `mask` is
    /// `[B, 1 or T1, T2]` with true where attention is allowed.
    fn attend(&self, v: &Tensor, scores: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let blocked = mask.logical_not().unsqueeze(1);
        let attn = scores
            .masked_fill(&blocked, f64::NEG_INFINITY)
            .softmax(-1, Kind::Float)
            .masked_fill(&blocked, 0.0)
            .dropout(self.dropout, train);
        let x = attn.matmul(v);
        let (b, _, t, _) = x.size4().expect("4-d attention output");
        self.linear_out.forward(
            &x.transpose(1, 2)
                .contiguous()
                .view([b, t, self.heads * self.d_k]),
        )
    }

    /// Attention of `query` over `key`/`value`.
    pub fn forward(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Tensor {
        let _t = crate::profile::span("attention");
        let q = self.split_heads(&self.linear_q.forward(query));
        let k = self.split_heads(&self.linear_k.forward(key));
        let v = self.split_heads(&self.linear_v.forward(value));
        let scores = q.matmul(&k.transpose(-2, -1)) / (self.d_k as f64).sqrt();
        self.attend(&v, &scores, mask, train)
    }
}

/// WeNet's `RelPositionMultiHeadedAttention`: content term `(q + u) k^T` plus position
/// term `(q + v) p^T` with `p = linear_pos(pos_emb)` (no bias). Like WeNet it does no
/// relative shift: the position embedding is the sinusoid of absolute positions.
#[derive(Debug)]
pub struct RelPositionMultiHeadedAttention {
    base: MultiHeadedAttention,
    linear_pos: nn::Linear,
    pos_bias_u: Tensor,
    pos_bias_v: Tensor,
}

impl RelPositionMultiHeadedAttention {
    /// `heads` heads over width `d` under `path`.
    pub fn new(path: &nn::Path<'_>, heads: i64, d: i64, dropout: f64) -> Self {
        let d_k = d / heads;
        let bound = (6.0 / (heads + d_k) as f64).sqrt(); // Xavier uniform, as WeNet
        Self {
            base: MultiHeadedAttention::new(path, heads, d, dropout),
            linear_pos: init::linear(path / "linear_pos", d, d, false),
            pos_bias_u: path.var(
                "pos_bias_u",
                &[heads, d_k],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            pos_bias_v: path.var(
                "pos_bias_v",
                &[heads, d_k],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
        }
    }

    /// Self-attention of `x` `[B, T, d]` with position embedding `pos_emb` `[1, T, d]`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor, pos_emb: &Tensor, train: bool) -> Tensor {
        let _t = crate::profile::span("attention");
        let m = &self.base;
        let b = x.size()[0];
        let q = m.linear_q.forward(x).view([b, -1, m.heads, m.d_k]); // [B, T, h, d_k]
        let k = m.split_heads(&m.linear_k.forward(x));
        let v = m.split_heads(&m.linear_v.forward(x));
        let p = self
            .linear_pos
            .forward(pos_emb)
            .view([pos_emb.size()[0], -1, m.heads, m.d_k])
            .transpose(1, 2);
        let q_u = (&q + &self.pos_bias_u).transpose(1, 2);
        let q_v = (&q + &self.pos_bias_v).transpose(1, 2);
        let ac = q_u.matmul(&k.transpose(-2, -1));
        let bd = q_v.matmul(&p.transpose(-2, -1));
        let scores = (ac + bd) / (m.d_k as f64).sqrt();
        m.attend(&v, &scores, mask, train)
    }
}
