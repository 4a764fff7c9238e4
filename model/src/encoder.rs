//! The Conformer encoder of U2++ (Gulati et al. 2020, as WeNet implements it):
//! CMVN, convolutional subsampling, then blocks of macaron feed-forward, relative
//! position self-attention, convolution module and feed-forward, each pre-norm.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::activation::Activation;
use crate::attention::{AttentionMask, RelPositionMultiHeadedAttention};
use crate::config::EncoderConf;
use crate::convolution::ConvolutionModule;
use crate::embedding::{sinusoid, Conv2dSubsampling, GlobalCmvn};
use crate::ffn::{FeedForward, FfnFactory};
use crate::mask::{chunk_attention_mask, make_pad_mask, ChunkMode};
use crate::moe::{MoeContext, Routing};

/// One Conformer block (WeNet's `ConformerEncoderLayer`, pre-norm).
#[derive(Debug)]
pub struct ConformerEncoderLayer {
    norm_ff_macaron: Option<nn::LayerNorm>,
    feed_forward_macaron: Option<FeedForward>,
    norm_mha: nn::LayerNorm,
    self_attn: RelPositionMultiHeadedAttention,
    norm_conv: Option<nn::LayerNorm>,
    conv_module: Option<ConvolutionModule>,
    norm_ff: nn::LayerNorm,
    feed_forward: FeedForward,
    norm_final: Option<nn::LayerNorm>,
    dropout: f64,
}

fn layer_norm(path: &nn::Path<'_>, name: &str, d: i64) -> nn::LayerNorm {
    nn::layer_norm(path / name, vec![d], Default::default())
}

impl ConformerEncoderLayer {
    /// A block under `path` (e.g. `encoder.encoders.3`) with its feed-forward networks
    /// (`feed_forward_macaron` exists when `c.macaron_style`).
    pub fn new(
        path: &nn::Path<'_>,
        c: &EncoderConf,
        feed_forward_macaron: Option<FeedForward>,
        feed_forward: FeedForward,
    ) -> Self {
        let d = c.output_size;
        let act = Activation::from_name(&c.activation_type);
        Self {
            norm_ff_macaron: c
                .macaron_style
                .then(|| layer_norm(path, "norm_ff_macaron", d)),
            feed_forward_macaron,
            norm_mha: layer_norm(path, "norm_mha", d),
            self_attn: RelPositionMultiHeadedAttention::new(
                &(path / "self_attn"),
                c.attention_heads,
                d,
                c.attention_dropout_rate,
            ),
            norm_conv: c.use_cnn_module.then(|| layer_norm(path, "norm_conv", d)),
            conv_module: c.use_cnn_module.then(|| {
                ConvolutionModule::new(
                    &(path / "conv_module"),
                    d,
                    c.cnn_module_kernel,
                    c.causal,
                    act,
                )
            }),
            norm_ff: layer_norm(path, "norm_ff", d),
            feed_forward,
            norm_final: c.use_cnn_module.then(|| layer_norm(path, "norm_final", d)),
            dropout: c.dropout_rate,
        }
    }

    /// `x` `[B, T, d]`, attention mask (of `[B, T or 1, T]`), padding mask `[B, 1, T]`.
    pub fn forward(
        &self,
        x: &Tensor,
        att_mask: &AttentionMask,
        pos_emb: &Tensor,
        mask_pad: &Tensor,
        train: bool,
        routing: &mut Routing,
    ) -> Tensor {
        let valid = mask_pad.squeeze_dim(1);
        let ff_scale = if self.feed_forward_macaron.is_some() {
            0.5
        } else {
            1.0
        };
        let mut x = x.shallow_clone();
        if let (Some(norm), Some(ff)) = (&self.norm_ff_macaron, &self.feed_forward_macaron) {
            x = &x
                + ff.forward(&norm.forward(&x), Some(&valid), train, routing)
                    .dropout(self.dropout, train)
                    * ff_scale;
        }
        let att = self
            .self_attn
            .forward(&self.norm_mha.forward(&x), att_mask, pos_emb, train);
        x = &x + att.dropout(self.dropout, train);
        if let (Some(norm), Some(conv)) = (&self.norm_conv, &self.conv_module) {
            x = &x
                + conv
                    .forward(&norm.forward(&x), mask_pad)
                    .dropout(self.dropout, train);
        }
        x = &x
            + self
                .feed_forward
                .forward(&self.norm_ff.forward(&x), Some(&valid), train, routing)
                .dropout(self.dropout, train)
                * ff_scale;
        match &self.norm_final {
            Some(norm) => norm.forward(&x),
            None => x,
        }
    }
}

/// The whole encoder (parameters under `encoder.`).
#[derive(Debug)]
pub struct ConformerEncoder {
    global_cmvn: GlobalCmvn,
    embed: Conv2dSubsampling,
    encoders: Vec<ConformerEncoderLayer>,
    after_norm: nn::LayerNorm,
    d: i64,
    positional_dropout: f64,
    conf: EncoderConf,
}

impl ConformerEncoder {
    /// An encoder of `input_dim` features under `path` (normally `encoder`).
    pub fn new(path: &nn::Path<'_>, input_dim: i64, c: &EncoderConf, moe: &MoeContext) -> Self {
        let d = c.output_size;
        let mut ffns = FfnFactory::new(
            d,
            c.linear_units,
            Activation::from_name(&c.activation_type),
            c.dropout_rate,
            (c.n_expert, c.n_expert_activated, c.expert_units()),
            moe,
        );
        let mut ffn = |block: usize, name: &str, moe: bool| {
            let at = path / "encoders" / block / name;
            if moe {
                let owner =
                    path / "encoders" / c.expert_bank_owner(block) / name / crate::moe::EXPERT_BANK;
                ffns.moe(&at, &owner)
            } else {
                ffns.dense(&at)
            }
        };
        let mut encoders = Vec::with_capacity(c.num_blocks);
        for i in 0..c.num_blocks {
            let moe = c.is_moe_block(i);
            let macaron = c
                .macaron_style
                .then(|| ffn(i, "feed_forward_macaron", moe && c.moe_macaron));
            let feed_forward = ffn(i, "feed_forward", moe);
            encoders.push(ConformerEncoderLayer::new(
                &(path / "encoders" / i),
                c,
                macaron,
                feed_forward,
            ));
        }
        Self {
            global_cmvn: GlobalCmvn::new(&(path / "global_cmvn"), input_dim),
            embed: Conv2dSubsampling::new(&(path / "embed"), input_dim, d, c.subsampling_rate()),
            encoders,
            after_norm: layer_norm(path, "after_norm", d),
            d,
            positional_dropout: c.positional_dropout_rate,
            conf: c.clone(),
        }
    }

    /// The CMVN front end (to load statistics into).
    pub fn global_cmvn_mut(&mut self) -> &mut GlobalCmvn {
        &mut self.global_cmvn
    }

    /// Width of the output.
    pub fn output_size(&self) -> i64 {
        self.d
    }

    /// Subsampling rate of the front end.
    pub fn subsampling_rate(&self) -> i64 {
        self.embed.rate()
    }

    /// The chunk mode training uses by the config (dynamic, static or full).
    pub fn training_chunk_mode(&self, draw: u64, left_draw: u64) -> ChunkMode {
        if self.conf.use_dynamic_chunk {
            ChunkMode::Dynamic {
                draw,
                left_draw,
                dynamic_left: self.conf.use_dynamic_left_chunk,
                max_chunk: 100 / self.embed.rate(),
            }
        } else if self.conf.static_chunk_size > 0 {
            ChunkMode::Chunk {
                size: self.conf.static_chunk_size,
                left_chunks: -1,
            }
        } else {
            ChunkMode::Full
        }
    }

    /// `xs` `[B, T, idim]` with lengths `[B]` to `([B, T', d], mask [B, 1, T'])`; MoE
    /// layers record their routing into `routing`.
    pub fn forward(
        &self,
        xs: &Tensor,
        xs_lens: &Tensor,
        chunk: ChunkMode,
        train: bool,
        routing: &mut Routing,
    ) -> (Tensor, Tensor) {
        let t = xs.size()[1];
        let masks = make_pad_mask(xs_lens, t).logical_not().unsqueeze(1);
        let xs = self.global_cmvn.forward(xs);
        let (xs, masks) = self.embed.forward(&xs, &masks);
        let len = xs.size()[1];
        let xs = (xs * (self.d as f64).sqrt()).dropout(self.positional_dropout, train);
        let pos_emb = sinusoid(0, len, self.d, xs.device()).dropout(self.positional_dropout, train);
        let att_mask = AttentionMask::new(&chunk_attention_mask(&masks, chunk));
        let mut x = xs;
        for layer in &self.encoders {
            x = layer.forward(&x, &att_mask, &pos_emb, &masks, train, routing);
        }
        (self.after_norm.forward(&x), masks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MoeConf;
    use tch::{Device, Kind};

    fn conf(extra: &str) -> EncoderConf {
        serde_yaml::from_str(&format!(
            "output_size: 16\nattention_heads: 2\nlinear_units: 24\nnum_blocks: 4\n\
             mlp_type: moe\nn_expert: 4\nn_expert_activated: 2\n{extra}"
        ))
        .unwrap()
    }

    /// Bai et al.: blocks of a group share one expert bank per FFN position (stored once,
    /// in the group's first block) and keep their own routers.
    #[test]
    fn shared_expert_banks_are_stored_once_with_a_router_per_block() {
        let _rng = crate::test_rng::lock();
        let c = conf("expert_sharing: [[0, 1], [2, 3]]\n");
        c.validate().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = ConformerEncoder::new(&vs.root(), 8, &c, &MoeContext::local(MoeConf::default()));
        let names: Vec<String> = vs.variables().into_keys().collect();
        let banks = |block: usize| {
            names
                .iter()
                .filter(|n| n.starts_with(&format!("encoders.{block}.")) && n.contains(".experts."))
                .count()
        };
        assert_eq!((banks(0), banks(1), banks(2), banks(3)), (8, 0, 8, 0));
        for block in 0..4 {
            for ffn in ["feed_forward", "feed_forward_macaron"] {
                let router = format!("encoders.{block}.{ffn}.router.weight");
                assert!(names.contains(&router), "{router}");
            }
        }
        // The one stored bank is what both blocks compute with: it gets their gradient.
        let x = Tensor::randn([2, 40, 8], (Kind::Float, Device::Cpu));
        let lens = Tensor::from_slice(&[40i64, 30]);
        let (y, _) = enc.forward(&x, &lens, ChunkMode::Full, true, &mut Routing::recording());
        y.square().sum(Kind::Float).backward();
        let g = vs.variables()["encoders.0.feed_forward.experts.w_1"].grad();
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        // Unknown or overlapping groups are refused by name.
        assert!(conf("expert_sharing: [[0, 1], [1, 2]]\n")
            .validate()
            .unwrap_err()
            .contains("block 1 is in two groups"));
        assert!(conf("moe_layers: [0]\nexpert_sharing: [[0, 1]]\n")
            .validate()
            .unwrap_err()
            .contains("block 1 is not an MoE block"));
    }
}
