//! The attention decoders of U2++: a left-to-right and a right-to-left Transformer
//! decoder over the encoder output (WeNet's `BiTransformerDecoder`).

use tch::nn::{self, Module};
use tch::Tensor;

use crate::activation::Activation;
use crate::attention::{AttentionMask, MultiHeadedAttention};
use crate::config::DecoderConf;
use crate::embedding::sinusoid;
use crate::ffn::{FeedForward, FfnFactory};
use crate::mask::{make_pad_mask, subsequent_mask};
use crate::moe::{MoeContext, Routing};

/// One pre-norm decoder block: self-attention, source attention, feed-forward
/// (parameters `self_attn`, `src_attn`, `feed_forward`, `norm1..3`).
#[derive(Debug)]
pub struct DecoderLayer {
    self_attn: MultiHeadedAttention,
    src_attn: MultiHeadedAttention,
    feed_forward: FeedForward,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
    dropout: f64,
}

impl DecoderLayer {
    fn new(path: &nn::Path<'_>, d: i64, c: &DecoderConf, feed_forward: FeedForward) -> Self {
        let ln = |name: &str| nn::layer_norm(path / name, vec![d], Default::default());
        Self {
            self_attn: MultiHeadedAttention::new(
                &(path / "self_attn"),
                c.attention_heads,
                d,
                c.self_attention_dropout_rate,
            ),
            src_attn: MultiHeadedAttention::new(
                &(path / "src_attn"),
                c.attention_heads,
                d,
                c.src_attention_dropout_rate,
            ),
            feed_forward,
            norm1: ln("norm1"),
            norm2: ln("norm2"),
            norm3: ln("norm3"),
            dropout: c.dropout_rate,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        tgt_mask: &AttentionMask,
        memory: &Tensor,
        memory_mask: &AttentionMask,
        train: bool,
        routing: &mut Routing,
    ) -> Tensor {
        // Position i is real iff it may attend to itself.
        let valid = tgt_mask.allowed().diagonal(0, 1, 2);
        let h = self.norm1.forward(x);
        let x = x + self
            .self_attn
            .forward(&h, &h, &h, tgt_mask, train)
            .dropout(self.dropout, train);
        let h = self.norm2.forward(&x);
        let x = &x
            + self
                .src_attn
                .forward(&h, memory, memory, memory_mask, train)
                .dropout(self.dropout, train);
        let h = self.norm3.forward(&x);
        &x + self
            .feed_forward
            .forward(&h, Some(&valid), train, routing)
            .dropout(self.dropout, train)
    }
}

/// A Transformer decoder (parameters `embed.0`, `decoders.{i}`, `after_norm`,
/// `output_layer`).
#[derive(Debug)]
pub struct TransformerDecoder {
    embed: nn::Embedding,
    decoders: Vec<DecoderLayer>,
    after_norm: nn::LayerNorm,
    output_layer: nn::Linear,
    d: i64,
    positional_dropout: f64,
}

impl TransformerDecoder {
    fn new(
        path: &nn::Path<'_>,
        vocab: i64,
        d: i64,
        blocks: usize,
        c: &DecoderConf,
        ffns: &mut FfnFactory,
    ) -> Self {
        let layer = |i: usize| {
            let at = path / "decoders" / i;
            let ffn = if c.is_moe_block(i) {
                ffns.moe(
                    &(&at / "feed_forward"),
                    &(&at / "feed_forward" / crate::moe::EXPERT_BANK),
                )
            } else {
                ffns.dense(&(&at / "feed_forward"))
            };
            DecoderLayer::new(&at, d, c, ffn)
        };
        Self {
            embed: nn::embedding(path / "embed" / 0, vocab, d, Default::default()),
            decoders: (0..blocks).map(layer).collect(),
            after_norm: nn::layer_norm(path / "after_norm", vec![d], Default::default()),
            output_layer: crate::init::linear(path / "output_layer", d, vocab, true),
            d,
            positional_dropout: c.positional_dropout_rate,
        }
    }

    /// Logits `[B, L, vocab]` for inputs `ys_in` `[B, L]` (lengths `ys_in_lens`) over
    /// `memory` `[B, T, d]` with mask `[B, 1, T]`.
    pub fn forward(
        &self,
        memory: &Tensor,
        memory_mask: &Tensor,
        ys_in: &Tensor,
        ys_in_lens: &Tensor,
        train: bool,
        routing: &mut Routing,
    ) -> Tensor {
        let l = ys_in.size()[1];
        let tgt_mask = AttentionMask::new(
            &make_pad_mask(ys_in_lens, l)
                .logical_not()
                .unsqueeze(1)
                .logical_and(&subsequent_mask(l, ys_in.device()).unsqueeze(0)),
        );
        let memory_mask = AttentionMask::new(memory_mask);
        let x = self.embed.forward(ys_in) * (self.d as f64).sqrt()
            + sinusoid(0, l, self.d, ys_in.device());
        let mut x = x.dropout(self.positional_dropout, train);
        for layer in &self.decoders {
            x = layer.forward(&x, &tgt_mask, memory, &memory_mask, train, routing);
        }
        let _t = crate::profile::span("decoder_output");
        self.output_layer.forward(&self.after_norm.forward(&x))
    }
}

/// Left-to-right and right-to-left decoders (parameters `left_decoder.`,
/// `right_decoder.`); the right one exists when `r_num_blocks > 0`.
#[derive(Debug)]
pub struct BiTransformerDecoder {
    left_decoder: TransformerDecoder,
    right_decoder: Option<TransformerDecoder>,
}

impl BiTransformerDecoder {
    /// Decoders of width `d` over a vocabulary of `vocab` under `path` (normally `decoder`).
    pub fn new(path: &nn::Path<'_>, vocab: i64, d: i64, c: &DecoderConf, moe: &MoeContext) -> Self {
        let mut ffns = FfnFactory::new(
            d,
            c.linear_units,
            Activation::from_name(&c.activation_type),
            c.dropout_rate,
            (c.n_expert, c.n_expert_activated, c.expert_units()),
            moe,
        );
        Self {
            left_decoder: TransformerDecoder::new(
                &(path / "left_decoder"),
                vocab,
                d,
                c.num_blocks,
                c,
                &mut ffns,
            ),
            right_decoder: (c.r_num_blocks > 0).then(|| {
                TransformerDecoder::new(
                    &(path / "right_decoder"),
                    vocab,
                    d,
                    c.r_num_blocks,
                    c,
                    &mut ffns,
                )
            }),
        }
    }

    /// The left-to-right decoder.
    pub fn left(&self) -> &TransformerDecoder {
        &self.left_decoder
    }

    /// The right-to-left decoder, if any.
    pub fn right(&self) -> Option<&TransformerDecoder> {
        self.right_decoder.as_ref()
    }
}
