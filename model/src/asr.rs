//! The U2++ model: Conformer encoder, CTC head and bidirectional attention decoder,
//! trained on `ctc_weight * ctc + (1 - ctc_weight) * attention` (WeNet's `ASRModel`).

use tch::nn;
use tch::Tensor;

use crate::config::{DecoderConf, EncoderConf, ModelConf};
use crate::ctc::Ctc;
use crate::decoder::BiTransformerDecoder;
use crate::encoder::ConformerEncoder;
use crate::loss::{add_sos_eos, label_smoothing_loss, reverse_pad_list, IGNORE_ID};
use crate::mask::ChunkMode;
use crate::moe::{MoeContext, Routing};

/// A model configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid model configuration: {0}")]
pub struct ConfigError(pub String);

/// The loss of one batch and its parts.
#[derive(Debug)]
pub struct Losses {
    /// The training objective.
    pub loss: Tensor,
    /// CTC loss per utterance.
    pub ctc: Tensor,
    /// Attention loss (left and right mixed by `reverse_weight`).
    pub att: Tensor,
    /// Left-to-right decoder logits.
    pub decoder_out: Tensor,
    /// Right-to-left decoder logits (when it exists).
    pub r_decoder_out: Option<Tensor>,
    /// CTC log-probabilities `[B, T', V]`.
    pub ctc_log_probs: Tensor,
    /// Encoder output `[B, T', d]` and its mask `[B, 1, T']`.
    pub encoder_out: (Tensor, Tensor),
    /// Load-balancing loss (mean over MoE layers), already in `loss` by its weight.
    pub balance: Option<Tensor>,
    /// Router z-loss (mean over MoE layers), already in `loss` by its weight.
    pub z_loss: Option<Tensor>,
    /// What every MoE layer's router did.
    pub routing: Routing,
}

/// The output units as the model sees them: how many, and which one is `<sos/eos>`
/// (WeNet's `special_tokens`; its default, and ours, is the last unit, while its char
/// recipes put it at 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vocab {
    /// Number of units, `<blank>` and `<sos/eos>` included.
    pub size: i64,
    /// The id that starts and ends every decoder sequence.
    pub sos_eos: i64,
}

impl Vocab {
    /// `size` units with `<sos/eos>` last.
    pub fn sos_eos_last(size: i64) -> Self {
        Self {
            size,
            sos_eos: size - 1,
        }
    }
}

/// The U2++ ASR model (parameters `encoder.`, `decoder.`, `ctc.` as WeNet names them).
#[derive(Debug)]
pub struct AsrModel {
    encoder: ConformerEncoder,
    decoder: BiTransformerDecoder,
    ctc: Ctc,
    conf: ModelConf,
    moe: MoeContext,
    vocab: Vocab,
}

impl AsrModel {
    /// Builds the model under `root` after checking the configuration.
    pub fn new(
        root: &nn::Path<'_>,
        input_dim: i64,
        vocab: Vocab,
        encoder_conf: &EncoderConf,
        decoder_conf: &DecoderConf,
        model_conf: &ModelConf,
        moe: &MoeContext,
    ) -> Result<Self, ConfigError> {
        encoder_conf.validate().map_err(ConfigError)?;
        moe.conf.validate().map_err(ConfigError)?;
        decoder_conf
            .validate(encoder_conf.output_size)
            .map_err(ConfigError)?;
        model_conf.validate().map_err(ConfigError)?;
        if !(0..vocab.size).contains(&vocab.sos_eos) {
            return Err(ConfigError(format!(
                "<sos/eos> id {} is not one of the {} units",
                vocab.sos_eos, vocab.size
            )));
        }
        if model_conf.reverse_weight > 0.0 && decoder_conf.r_num_blocks == 0 {
            return Err(ConfigError(
                "model_conf.reverse_weight > 0 needs decoder_conf.r_num_blocks > 0".into(),
            ));
        }
        let d = encoder_conf.output_size;
        Ok(Self {
            encoder: ConformerEncoder::new(&(root / "encoder"), input_dim, encoder_conf, moe),
            decoder: BiTransformerDecoder::new(
                &(root / "decoder"),
                vocab.size,
                d,
                decoder_conf,
                moe,
            ),
            ctc: Ctc::new(&(root / "ctc"), d, vocab.size),
            conf: model_conf.clone(),
            moe: moe.clone(),
            vocab,
        })
    }

    /// How the MoE layers route (options, dispatch, balance statistics).
    pub fn moe(&self) -> &MoeContext {
        &self.moe
    }

    /// The encoder.
    pub fn encoder(&self) -> &ConformerEncoder {
        &self.encoder
    }

    /// The encoder, mutably (to load CMVN statistics).
    pub fn encoder_mut(&mut self) -> &mut ConformerEncoder {
        &mut self.encoder
    }

    /// The decoders.
    pub fn decoder(&self) -> &BiTransformerDecoder {
        &self.decoder
    }

    /// The CTC head.
    pub fn ctc(&self) -> &Ctc {
        &self.ctc
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> i64 {
        self.vocab.size
    }

    /// The id of `<sos/eos>`.
    pub fn sos_eos(&self) -> i64 {
        self.vocab.sos_eos
    }

    /// Forward pass and losses for features `[B, T, idim]` and targets `[B, L]`
    /// padded with -1.
    pub fn forward(
        &self,
        feats: &Tensor,
        feats_lens: &Tensor,
        target: &Tensor,
        target_lens: &Tensor,
        chunk: ChunkMode,
        train: bool,
    ) -> Losses {
        let routing = Routing::recording();
        self.forward_routed(
            feats,
            feats_lens,
            target,
            target_lens,
            chunk,
            train,
            routing,
        )
    }

    /// [`Self::forward`] with the MoE layers reporting to `routing` (e.g. one that keeps
    /// the router inputs); it comes back in [`Losses::routing`].
    #[allow(clippy::too_many_arguments)] // `forward`'s batch and mode, plus the collector
    pub fn forward_routed(
        &self,
        feats: &Tensor,
        feats_lens: &Tensor,
        target: &Tensor,
        target_lens: &Tensor,
        chunk: ChunkMode,
        train: bool,
        mut routing: Routing,
    ) -> Losses {
        let (enc, mask) = self
            .encoder
            .forward(feats, feats_lens, chunk, train, &mut routing);
        let hlens = mask
            .squeeze_dim(1)
            .sum_dim_intlist(-1, false, tch::Kind::Int64);
        let (ctc_log_probs, ctc) = {
            let _t = crate::profile::span("ctc");
            let log_probs = self.ctc.log_softmax(&enc);
            let ctc = self.ctc.loss(&log_probs, &hlens, target, target_lens);
            (log_probs, ctc)
        };

        let eos = self.vocab.sos_eos;
        let (ys_in, ys_out) = add_sos_eos(target, target_lens, eos, eos);
        let ys_in_lens = target_lens + 1;
        let decoder_out =
            self.decoder
                .left()
                .forward(&enc, &mask, &ys_in, &ys_in_lens, train, &mut routing);
        let smoothing = self.conf.lsm_weight;
        let norm = self.conf.length_normalized_loss;
        let l2r = {
            let _t = crate::profile::span("attention_loss");
            label_smoothing_loss(&decoder_out, &ys_out, smoothing, norm)
        };
        let rw = self.conf.reverse_weight;
        let (att, r_decoder_out) = match self.decoder.right().filter(|_| rw > 0.0) {
            Some(right) => {
                let r_ys = reverse_pad_list(target, target_lens, IGNORE_ID);
                let (r_in, r_out) = add_sos_eos(&r_ys, target_lens, eos, eos);
                let r_dec = right.forward(&enc, &mask, &r_in, &ys_in_lens, train, &mut routing);
                let r2l = {
                    let _t = crate::profile::span("attention_loss");
                    label_smoothing_loss(&r_dec, &r_out, smoothing, norm)
                };
                (l2r * (1.0 - rw) + r2l * rw, Some(r_dec))
            }
            None => (l2r, None),
        };
        let cw = self.conf.ctc_weight;
        let mut loss = &ctc * cw + &att * (1.0 - cw);
        let balance = routing.balance_loss();
        let z_loss = routing.z_loss();
        let moe = &self.moe.conf;
        for (part, weight) in [
            (&balance, moe.balance_loss_weight),
            (&z_loss, moe.z_loss_weight),
        ] {
            if let Some(part) = part.as_ref().filter(|_| weight > 0.0) {
                loss += part * weight;
            }
        }
        Losses {
            balance,
            z_loss,
            routing,
            loss,
            ctc,
            att,
            decoder_out,
            r_decoder_out,
            ctc_log_probs,
            encoder_out: (enc, mask),
        }
    }
}
