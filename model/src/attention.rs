//! Multi-head attention (decoder) and WeNet's relative-position variant (encoder), and
//! the masks they share across a batch's layers ([`AttentionMask`]).
//!
//! Two kernels compute the same attention: [`AttentionKernel::Explicit`] (scores,
//! masked softmax, weighted sum: WeNet's own arithmetic) and [`AttentionKernel::Fused`]
//! (libtorch's `scaled_dot_product_attention`, the position term and the mask as one
//! additive bias). [`AttentionKernel::for_device`] is the one place that picks.

use std::cell::Cell;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::init;

/// How attention weights are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Scores, `-inf` fill, softmax, zero fill, product with the values (WeNet's code).
    Explicit,
    /// `scaled_dot_product_attention` with an additive float bias (flash or
    /// memory-efficient kernels on CUDA).
    Fused,
}

thread_local! {
    static FORCED_KERNEL: Cell<Option<AttentionKernel>> = const { Cell::new(None) };
}

impl AttentionKernel {
    /// The kernel attention uses on `device`, unless [`AttentionKernel::force`] is active
    /// on this thread.
    pub fn for_device(device: Device) -> Self {
        if let Some(kernel) = FORCED_KERNEL.with(Cell::get) {
            return kernel;
        }
        // The CPU keeps WeNet's arithmetic: paired train-step runs did not show the fused
        // kernel faster there (docs/ARCHITECTURE.md), and it stays bit-exact with WeNet.
        if device.is_cuda() {
            AttentionKernel::Fused
        } else {
            AttentionKernel::Explicit
        }
    }

    /// Runs `f` with every mask built on this thread using `self` (tests run the CUDA
    /// kernel choice on the CPU with it).
    pub fn force<T>(self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<AttentionKernel>);
        impl Drop for Restore {
            fn drop(&mut self) {
                FORCED_KERNEL.with(|k| k.set(self.0));
            }
        }
        let _restore = Restore(FORCED_KERNEL.with(|k| k.replace(Some(self))));
        f()
    }
}

/// A masked position's bias: far below any score and finite in fp32 and bf16 (a row
/// that is all `-inf` gives NaN in some kernels; its output is zeroed instead).
const MASKED_BIAS: f64 = -1e30;

/// What attention may see, `allowed` `[B, 1 or T1, T2]` (true: may attend), prepared
/// once per batch for the kernel of its device and shared by every layer.
#[derive(Debug)]
pub struct AttentionMask {
    allowed: Tensor,
    prepared: Prepared,
}

#[derive(Debug)]
enum Prepared {
    /// `[B, 1, 1 or T1, T2]`: true where the score is masked.
    Explicit { blocked: Tensor },
    /// `additive` `[B, 1, 1 or T1, T2]` (0 or [`MASKED_BIAS`], fp32) and `row_has_keys`
    /// `[B, 1, 1 or T1, 1]` (1, or 0 for a row that may attend to nothing, whose output
    /// WeNet makes 0: its weights are filled with 0 after the softmax).
    Fused {
        additive: Tensor,
        row_has_keys: Tensor,
    },
}

impl AttentionMask {
    /// The mask for `allowed` `[B, 1 or T1, T2]` (bool), for its device's kernel.
    pub fn new(allowed: &Tensor) -> Self {
        let allowed4 = allowed.unsqueeze(1);
        let prepared = match AttentionKernel::for_device(allowed.device()) {
            AttentionKernel::Explicit => Prepared::Explicit {
                blocked: allowed4.logical_not(),
            },
            AttentionKernel::Fused => Prepared::Fused {
                additive: Tensor::zeros(allowed4.size(), (Kind::Float, allowed.device()))
                    .masked_fill(&allowed4.logical_not(), MASKED_BIAS),
                row_has_keys: allowed4.any_dim(-1, true).to_kind(Kind::Float),
            },
        };
        Self {
            allowed: allowed.shallow_clone(),
            prepared,
        }
    }

    /// The boolean mask it was built from, `[B, 1 or T1, T2]`.
    pub fn allowed(&self) -> &Tensor {
        &self.allowed
    }
}

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

    /// Attention of `q` over `k`, `v` (`[B, h, T, d_k]`) with the scores
    /// `(q k^T + pos_scores) / sqrt(d_k)` under `mask`, then the output projection.
    /// `pos_scores` `[B or 1, h, T1, T2]` is the relative-position term, unscaled.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos_scores: Option<&Tensor>,
        mask: &AttentionMask,
        train: bool,
    ) -> Tensor {
        let scale = 1.0 / (self.d_k as f64).sqrt();
        let x = match &mask.prepared {
            Prepared::Explicit { blocked } => {
                let content = q.matmul(&k.transpose(-2, -1));
                let scores = match pos_scores {
                    Some(pos) => content + pos,
                    None => content,
                } / (self.d_k as f64).sqrt();
                scores
                    .masked_fill(blocked, f64::NEG_INFINITY)
                    .softmax(-1, Kind::Float)
                    .masked_fill(blocked, 0.0)
                    .dropout(self.dropout, train)
                    .matmul(v)
            }
            Prepared::Fused {
                additive,
                row_has_keys,
            } => {
                // One dtype for the kernel: the values' (bf16 under autocast), as autocast
                // would cast the matrix products.
                let kind = v.kind();
                let bias = match pos_scores {
                    Some(pos) => pos * scale + additive,
                    None => additive.shallow_clone(),
                };
                let dropout = if train { self.dropout } else { 0.0 };
                Tensor::scaled_dot_product_attention(
                    &q.to_kind(kind),
                    &k.to_kind(kind),
                    v,
                    Some(bias.to_kind(kind)),
                    dropout,
                    false,
                    scale,
                    false,
                ) * row_has_keys.to_kind(kind)
            }
        };
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
        mask: &AttentionMask,
        train: bool,
    ) -> Tensor {
        let _t = crate::profile::span("attention");
        let q = self.split_heads(&self.linear_q.forward(query));
        let k = self.split_heads(&self.linear_k.forward(key));
        let v = self.split_heads(&self.linear_v.forward(value));
        self.attend(&q, &k, &v, None, mask, train)
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
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        pos_emb: &Tensor,
        train: bool,
    ) -> Tensor {
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
        let bd = q_v.matmul(&p.transpose(-2, -1));
        m.attend(&q_u, &k, &v, Some(&bd), mask, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row that may attend to nothing (a zero-length sequence) gives WeNet's zeros
    /// before the output projection, in both kernels, forward and backward, with no NaN.
    #[test]
    fn rows_with_nothing_visible_give_zeros_not_nan() {
        let _rng = crate::test_rng::lock();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = MultiHeadedAttention::new(&vs.root(), 2, 8, 0.0);
        // Batch 0 sees its first 3 keys, batch 1 sees none.
        let allowed = Tensor::from_slice(&[true, true, true, false, false, false, false, false])
            .view([2, 1, 4]);
        let x = Tensor::randn([2, 4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let outs = [AttentionKernel::Explicit, AttentionKernel::Fused].map(|kernel| {
            let mask = kernel.force(|| AttentionMask::new(&allowed));
            let y = attn.forward(&x, &x, &x, &mask, false);
            let gx = Tensor::run_backward(&[y.square().sum(Kind::Float)], &[&x], false, false);
            (y, gx[0].shallow_clone())
        });
        let bias = attn.linear_out.bs.as_ref().unwrap();
        for (y, gx) in &outs {
            assert!(bool::try_from(y.isfinite().all()).unwrap());
            assert!(bool::try_from(gx.isfinite().all()).unwrap());
            // Zero attention output: batch 1 is the output projection's bias alone.
            assert!(y
                .get(1)
                .allclose(&bias.expand_as(&y.get(1)), 0.0, 1e-7, false));
        }
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&outs[0].0, &outs[1].0) < 1e-6);
        assert!(diff(&outs[0].1, &outs[1].1) < 1e-6);
    }
}
