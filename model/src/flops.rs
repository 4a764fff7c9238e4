//! Matrix-product FLOPs of the model, counted from its shape and an utterance's real
//! lengths, for throughput in TFLOP/s and MFU (model FLOPs utilisation: achieved over the
//! device's peak) as Megatron-Core and PaLM count them:
//! - only matrix products and convolutions count (2 FLOPs per multiply-add); norms,
//!   activations, softmax, losses and the optimizer are left out;
//! - a training step is 3x the forward (the backward computes gradients of activations
//!   and of weights, each as costly as the forward), whatever is frozen;
//! - lengths are the real ones: padding is work the model did not need, so it lowers MFU;
//! - attention is full context (a chunk mask does not skip any product).
//!
//! Checked against PyTorch's own `FlopCounterMode`: equal on WeNet's own model code
//! (`scripts/check_wenet_flops.py`, WeNet's golden dense and MoE models) and on the
//! WeNet-style peer of `bench/reference` (`cli/tests/flops.rs`).
//!
//! Per utterance of `T` input frames and `U` target tokens, with `T'` frames after the
//! subsampling, `d` the model width, `h` the heads:
//! - subsampling: each convolution `2 * T_out * F_out * c_in * c_out * k^2`, then the linear
//!   projection `2 * T' * (d * F') * d`;
//! - each encoder block: attention projections `4 * 2 T' d^2` plus `linear_pos` `2 T' d^2`,
//!   scores `(q + u) k^T` and `(q + v) p^T` and the weighted sum `3 * 2 T'^2 d`; convolution
//!   module `2 (T' + L) d (2d) + 2 T' d K + 2 T' d d`, where `L = K - 1` when causal (the
//!   left padding comes before the first pointwise convolution, as in WeNet) and 0 if not; each feed-forward network `2 * 2 T' d f`
//!   (dense) or `2 T' d E + k * 2 * 2 T' d f_e` (router plus k experts of `f_e` hidden
//!   units, `expert_linear_units`, per token);
//! - CTC `2 T' d V`;
//! - each decoder block (left-to-right and, when trained, right-to-left) over `U + 1`
//!   positions: self-attention `4 * 2 U d^2 + 2 * 2 U^2 d`, source attention
//!   `2 * 2 U d^2 + 2 * 2 T' d^2 + 2 * 2 U T' d`, feed-forward as above; each decoder's
//!   output layer `2 U d V`.

use crate::config::{DecoderConf, EncoderConf};

/// The model's shape, as far as its FLOPs depend on it.
#[derive(Debug, Clone)]
pub struct FlopShape {
    /// Input features per frame (80 fbank bins).
    pub input_dim: i64,
    /// Output units (the vocabulary).
    pub vocab: i64,
    /// The encoder.
    pub encoder: EncoderConf,
    /// The decoder.
    pub decoder: DecoderConf,
    /// Whether the right-to-left decoder runs in training (`model_conf.reverse_weight > 0`).
    pub right_to_left: bool,
}

/// The convolutions of the subsampling by `rate`: (kernel, stride) of each, in order
/// (WeNet's `Conv2dSubsampling4/6/8`).
fn subsampling_convs(rate: i64) -> &'static [(i64, i64)] {
    match rate {
        6 => &[(3, 2), (5, 3)],
        8 => &[(3, 2), (3, 2), (3, 2)],
        _ => &[(3, 2), (3, 2)],
    }
}

/// A block's feed-forward network, as far as its FLOPs go: its hidden units, and for an
/// MoE block the experts and how many each token uses.
struct Ffn {
    hidden: f64,
    moe: Option<(f64, f64)>,
}

impl Ffn {
    fn of(moe: bool, linear_units: i64, expert_units: i64, experts: i64, active: i64) -> Self {
        match moe {
            true => Ffn {
                hidden: expert_units as f64,
                moe: Some((experts as f64, active as f64)),
            },
            false => Ffn {
                hidden: linear_units as f64,
                moe: None,
            },
        }
    }

    /// FLOPs over `n` positions of width `d`: dense, or router plus `k` experts.
    fn flops(&self, n: f64, d: f64) -> f64 {
        match self.moe {
            None => 2.0 * 2.0 * n * d * self.hidden,
            Some((experts, k)) => 2.0 * n * d * experts + k * 2.0 * 2.0 * n * d * self.hidden,
        }
    }
}

impl FlopShape {
    /// Frames after the subsampling of `frames` input frames, and the subsampling's FLOPs.
    fn subsampling(&self, frames: i64) -> (i64, f64) {
        let d = self.encoder.output_size;
        let (mut t, mut f, mut c_in, mut flops) = (frames, self.input_dim, 1, 0.0);
        for &(k, s) in subsampling_convs(self.encoder.subsampling_rate()) {
            t = ((t - k) / s + 1).max(0);
            f = (f - k) / s + 1;
            flops += 2.0 * (t * f * c_in * d * k * k) as f64;
            c_in = d;
        }
        (t, flops + 2.0 * (t * d * f * d) as f64)
    }

    fn encoder_block(&self, block: usize, t: f64) -> f64 {
        let e = &self.encoder;
        let d = e.output_size as f64;
        let attention = 5.0 * 2.0 * t * d * d + 3.0 * 2.0 * t * t * d;
        let conv = if e.use_cnn_module {
            let kernel = e.cnn_module_kernel as f64;
            let padded = t + if e.causal { kernel - 1.0 } else { 0.0 };
            2.0 * padded * d * 2.0 * d + 2.0 * t * d * kernel + 2.0 * t * d * d
        } else {
            0.0
        };
        let ffn = Ffn::of(
            e.is_moe_block(block),
            e.linear_units,
            e.expert_units(),
            e.n_expert,
            e.n_expert_activated,
        );
        let ffns = if e.macaron_style { 2.0 } else { 1.0 };
        attention + conv + ffns * ffn.flops(t, d)
    }

    fn decoder_block(&self, block: usize, u: f64, t: f64) -> f64 {
        let c = &self.decoder;
        let d = self.encoder.output_size as f64;
        let self_attention = 4.0 * 2.0 * u * d * d + 2.0 * 2.0 * u * u * d;
        let source_attention =
            2.0 * 2.0 * u * d * d + 2.0 * 2.0 * t * d * d + 2.0 * 2.0 * u * t * d;
        let ffn = Ffn::of(
            c.is_moe_block(block),
            c.linear_units,
            c.expert_units(),
            c.n_expert,
            c.n_expert_activated,
        );
        self_attention + source_attention + ffn.flops(u, d)
    }

    /// Forward FLOPs of one utterance of `frames` input frames and `tokens` target tokens.
    pub fn forward_flops(&self, frames: i64, tokens: i64) -> f64 {
        let (t, subsampling) = self.subsampling(frames);
        let (t, d, v) = (t as f64, self.encoder.output_size as f64, self.vocab as f64);
        let encoder: f64 = (0..self.encoder.num_blocks)
            .map(|b| self.encoder_block(b, t))
            .sum();
        let ctc = 2.0 * t * d * v;
        // The decoders read `<sos>` + the tokens (and predict the tokens + `<eos>`).
        let u = (tokens + 1) as f64;
        let one_decoder = |blocks: usize| -> f64 {
            (0..blocks)
                .map(|b| self.decoder_block(b, u, t))
                .sum::<f64>()
                + 2.0 * u * d * v
        };
        let mut decoder = one_decoder(self.decoder.num_blocks);
        if self.right_to_left && self.decoder.r_num_blocks > 0 {
            decoder += one_decoder(self.decoder.r_num_blocks);
        }
        subsampling + encoder + ctc + decoder
    }

    /// FLOPs of one training step (forward and backward) over utterances of these
    /// `(frames, tokens)`.
    pub fn training_step_flops(&self, utterances: impl IntoIterator<Item = (i64, i64)>) -> f64 {
        3.0 * utterances
            .into_iter()
            .map(|(frames, tokens)| self.forward_flops(frames, tokens))
            .sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(mlp_type: &str) -> FlopShape {
        let encoder: EncoderConf = serde_yaml::from_str(&format!(
            "output_size: 8\nattention_heads: 2\nlinear_units: 16\nnum_blocks: 1\n\
             macaron_style: true\nuse_cnn_module: true\ncnn_module_kernel: 3\n\
             input_layer: conv2d\nmlp_type: {mlp_type}\nn_expert: 4\nn_expert_activated: 2\n"
        ))
        .unwrap();
        let decoder: DecoderConf = serde_yaml::from_str(
            "attention_heads: 2\nlinear_units: 12\nnum_blocks: 1\nr_num_blocks: 1\n",
        )
        .unwrap();
        FlopShape {
            input_dim: 9,
            vocab: 5,
            encoder,
            decoder,
            right_to_left: true,
        }
    }

    /// Counted by hand for a 1-block model of width 8 on 13 frames and 2 tokens.
    #[test]
    #[allow(clippy::identity_op)] // every factor spelled out, the 1-channel input included
    fn forward_matches_a_hand_count() {
        // Subsampling: 13 x 9 -> conv 3/2 -> 6 x 4 (8 channels) -> conv 3/2 -> 2 x 1.
        let conv1 = 2 * 6 * 4 * 1 * 8 * 9;
        let conv2 = 2 * 2 * 1 * 8 * 8 * 9;
        let proj = 2 * 2 * 8 * 8;
        // Encoder block over T' = 2: q, k, v, out, linear_pos; three T'^2 d products.
        let attention = 5 * 2 * 2 * 8 * 8 + 3 * 2 * 2 * 2 * 8;
        let conv_module = 2 * 2 * 8 * 16 + 2 * 2 * 8 * 3 + 2 * 2 * 8 * 8;
        let ffn = 2 * 2 * 2 * 8 * 16;
        let encoder = attention + conv_module + 2 * ffn;
        let ctc = 2 * 2 * 8 * 5;
        // Each decoder over U = 3 positions, source T' = 2.
        let self_attention = 4 * 2 * 3 * 8 * 8 + 2 * 2 * 3 * 3 * 8;
        let source = 2 * 2 * 3 * 8 * 8 + 2 * 2 * 2 * 8 * 8 + 2 * 2 * 3 * 2 * 8;
        let decoder = self_attention + source + 2 * 2 * 3 * 8 * 12 + 2 * 3 * 8 * 5;
        let expected = conv1 + conv2 + proj + encoder + ctc + 2 * decoder;
        // Granular experts (a quarter of the units, top-4 of 16) cost what the dense
        // network costs, plus the router.
        let mut granular = tiny("moe");
        granular.encoder.n_expert = 16;
        granular.encoder.n_expert_activated = 4;
        granular.encoder.expert_linear_units = Some(4);
        let router = 2 * 2 * 8 * 16;
        assert_eq!(
            granular.forward_flops(13, 2),
            (expected + 2 * router) as f64
        );
        assert_eq!(
            tiny("position_wise_feed_forward").forward_flops(13, 2),
            expected as f64
        );
    }

    /// An MoE block costs the router plus k experts, not E; training is 3x the forward.
    #[test]
    fn moe_counts_active_experts_and_training_triples() {
        let _rng = crate::test_rng::lock();
        let (dense, moe) = (tiny("position_wise_feed_forward"), tiny("moe"));
        let ffn = 2 * 2 * 2 * 8 * 16;
        let router = 2 * 2 * 8 * 4;
        let extra = 2 * (router + 2 * ffn - ffn);
        assert_eq!(
            moe.forward_flops(13, 2) - dense.forward_flops(13, 2),
            extra as f64
        );
        assert_eq!(
            moe.training_step_flops([(13, 2), (13, 2)]),
            6.0 * moe.forward_flops(13, 2)
        );
    }
}
