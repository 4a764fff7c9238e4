//! Model configuration under WeNet's `train.yaml` keys (`encoder_conf`, `decoder_conf`,
//! `model_conf`). Unknown keys are refused by name (serde), and values that parse but are
//! not supported are refused by [`EncoderConf::validate`] and friends, naming the key.

use serde::{Deserialize, Serialize};

/// WeNet's `encoder_conf` for `encoder: conformer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConf {
    /// Model width d.
    #[serde(default = "d256")]
    pub output_size: i64,
    /// Attention heads.
    #[serde(default = "four")]
    pub attention_heads: i64,
    /// Feed-forward width.
    #[serde(default = "d2048")]
    pub linear_units: i64,
    /// Conformer blocks.
    #[serde(default = "six")]
    pub num_blocks: usize,
    /// Dropout after attention, convolution and feed-forward.
    #[serde(default = "p01")]
    pub dropout_rate: f64,
    /// Dropout on positional encodings.
    #[serde(default = "p01")]
    pub positional_dropout_rate: f64,
    /// Dropout on attention weights.
    #[serde(default)]
    pub attention_dropout_rate: f64,
    /// `conv2d` (x4), `conv2d6` (x6) or `conv2d8` (x8) subsampling.
    #[serde(default = "conv2d")]
    pub input_layer: String,
    /// Only `rel_pos`.
    #[serde(default = "rel_pos")]
    pub pos_enc_layer_type: String,
    /// Only `rel_selfattn`.
    #[serde(default = "rel_selfattn")]
    pub selfattention_layer_type: String,
    /// Pre-norm (must be true).
    #[serde(default = "yes")]
    pub normalize_before: bool,
    /// Chunk size used in training when not dynamic (0: full context).
    #[serde(default)]
    pub static_chunk_size: i64,
    /// Dynamic chunk training (U2++).
    #[serde(default)]
    pub use_dynamic_chunk: bool,
    /// Also draw a limited left context in dynamic chunk training.
    #[serde(default)]
    pub use_dynamic_left_chunk: bool,
    /// Macaron feed-forward pair with half-step residuals.
    #[serde(default = "yes")]
    pub macaron_style: bool,
    /// `swish`, `relu` or `gelu`.
    #[serde(default = "swish")]
    pub activation_type: String,
    /// Convolution module in each block.
    #[serde(default = "yes")]
    pub use_cnn_module: bool,
    /// Depthwise kernel size (odd unless causal).
    #[serde(default = "k15")]
    pub cnn_module_kernel: i64,
    /// Causal depthwise convolution (left padding only).
    #[serde(default)]
    pub causal: bool,
    /// Only `layer_norm`.
    #[serde(default = "layer_norm")]
    pub cnn_module_norm: String,
    /// `position_wise_feed_forward` (dense) or `moe` (WeNet's key).
    #[serde(default = "dense_mlp")]
    pub mlp_type: String,
    /// Experts per MoE layer (WeNet's key).
    #[serde(default = "eight")]
    pub n_expert: i64,
    /// Experts each token goes to, k (WeNet's key).
    #[serde(default = "two")]
    pub n_expert_activated: i64,
    /// Hidden units of one expert (our key; absent: `linear_units`). Granular upcycling
    /// splits the parent's `linear_units` into experts of `linear_units / G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_linear_units: Option<i64>,
    /// Blocks whose feed-forward networks are MoE (all when absent).
    #[serde(default)]
    pub moe_layers: Option<Vec<usize>>,
    /// The macaron feed-forward of an MoE block is MoE too (WeNet: yes).
    #[serde(default = "yes")]
    pub moe_macaron: bool,
    /// Groups of blocks sharing one expert bank per feed-forward position (Bai et al.);
    /// each block keeps its own router and norms. The bank lives in the group's first block.
    #[serde(default)]
    pub expert_sharing: Vec<Vec<usize>>,

    // WeNet options this model computes only at WeNet's default: accepted at that value
    // (WeNet's train.yaml files spell them out), refused by name otherwise.
    /// WeNet: `1` (a linear feed-forward; no convolution in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positionwise_conv_kernel_size: Option<i64>,
    /// WeNet: attention query projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_bias: Option<bool>,
    /// WeNet: attention key projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_bias: Option<bool>,
    /// WeNet: attention value projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_bias: Option<bool>,
    /// WeNet: the convolution module's convolutions have biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_bias: Option<bool>,
    /// WeNet: `layer_norm` (not `rms_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_type: Option<String>,
    /// WeNet: layer norm epsilon 1e-5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    /// WeNet: key/value heads (grouped-query attention); only as many as query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<i64>,
    /// WeNet: width of a head; only `output_size / attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// WeNet: feed-forward linears have biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// WeNet: the convolution module's norm epsilon 1e-5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_norm_eps: Option<f64>,
    /// WeNet: the convolution module widens by 2 before its GLU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_inner_factor: Option<i64>,
    /// WeNet: a layer norm after the last block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_norm: Option<bool>,
    /// WeNet's activation checkpointing (memory, not results): ignored.
    #[serde(default, skip_serializing)]
    pub gradient_checkpointing: Option<bool>,
    /// WeNet's choice of attention kernel (speed, not results): ignored.
    #[serde(default, skip_serializing)]
    pub use_sdpa: Option<bool>,
}

/// WeNet's `decoder_conf` for `decoder: bitransformer` (or `transformer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConf {
    /// Attention heads.
    #[serde(default = "four")]
    pub attention_heads: i64,
    /// Feed-forward width.
    #[serde(default = "d2048")]
    pub linear_units: i64,
    /// Blocks of the left-to-right decoder.
    #[serde(default = "six")]
    pub num_blocks: usize,
    /// Blocks of the right-to-left decoder (bitransformer).
    #[serde(default)]
    pub r_num_blocks: usize,
    /// Dropout after attention and feed-forward.
    #[serde(default = "p01")]
    pub dropout_rate: f64,
    /// Dropout on positional encodings.
    #[serde(default = "p01")]
    pub positional_dropout_rate: f64,
    /// Dropout on self-attention weights.
    #[serde(default)]
    pub self_attention_dropout_rate: f64,
    /// Dropout on source-attention weights.
    #[serde(default)]
    pub src_attention_dropout_rate: f64,
    /// Only `embed`.
    #[serde(default = "embed")]
    pub input_layer: String,
    /// Output projection to the vocabulary (must be true).
    #[serde(default = "yes")]
    pub use_output_layer: bool,
    /// Pre-norm (must be true).
    #[serde(default = "yes")]
    pub normalize_before: bool,
    /// `relu` (WeNet's default), `swish` or `gelu`.
    #[serde(default = "relu")]
    pub activation_type: String,
    /// `position_wise_feed_forward` (dense) or `moe` (WeNet's key).
    #[serde(default = "dense_mlp")]
    pub mlp_type: String,
    /// Experts per MoE layer (WeNet's key).
    #[serde(default = "eight")]
    pub n_expert: i64,
    /// Experts each token goes to, k (WeNet's key).
    #[serde(default = "two")]
    pub n_expert_activated: i64,
    /// Hidden units of one expert (our key; absent: `linear_units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_linear_units: Option<i64>,
    /// Blocks (of both decoders) whose feed-forward is MoE (all when absent).
    #[serde(default)]
    pub moe_layers: Option<Vec<usize>>,

    // WeNet options this model computes only at WeNet's default (see `EncoderConf`).
    /// WeNet: the decoder attends to the encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_attention: Option<bool>,
    /// WeNet: self-attention query projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_bias: Option<bool>,
    /// WeNet: self-attention key projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_bias: Option<bool>,
    /// WeNet: self-attention value projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_bias: Option<bool>,
    /// WeNet: source-attention query projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_query_bias: Option<bool>,
    /// WeNet: source-attention key projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_key_bias: Option<bool>,
    /// WeNet: source-attention value projections have a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_value_bias: Option<bool>,
    /// WeNet: the output layer has its own weights (not the embedding's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embedding: Option<bool>,
    /// WeNet: `layer_norm` (not `rms_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_type: Option<String>,
    /// WeNet: layer norm epsilon 1e-5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    /// WeNet: key/value heads; only as many as query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<i64>,
    /// WeNet: width of a head; only the model width / attention_heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// WeNet: feed-forward linears have biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// WeNet's activation checkpointing (memory, not results): ignored.
    #[serde(default, skip_serializing)]
    pub gradient_checkpointing: Option<bool>,
    /// WeNet's choice of attention kernel (speed, not results): ignored.
    #[serde(default, skip_serializing)]
    pub use_sdpa: Option<bool>,
}

/// WeNet's `model_conf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConf {
    /// Weight of CTC in the loss.
    #[serde(default = "p05")]
    pub ctc_weight: f64,
    /// Weight of the right-to-left decoder in the attention loss.
    #[serde(default)]
    pub reverse_weight: f64,
    /// Label smoothing.
    #[serde(default)]
    pub lsm_weight: f64,
    /// Normalise the attention loss by tokens instead of utterances.
    #[serde(default)]
    pub length_normalized_loss: bool,
    /// Padding id of targets (must be -1).
    #[serde(default = "minus_one")]
    pub ignore_id: i64,
}

/// How every MoE layer of the model routes and computes (our `moe_conf` key; WeNet has
/// no such options: its defaults are `router_init: normal`, no noise, no capacity, no
/// auxiliary loss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConf {
    /// `normal` (N(0, router_init_std), breaks the symmetry of upcycled copies), `zero`,
    /// or `kmeans` (fitted to the parent's tokens by `convert upcycle`; a model built
    /// from the config alone starts as `normal`, and its trained router is then loaded).
    #[serde(default = "normal")]
    pub router_init: String,
    /// Standard deviation of a `normal` router initialisation.
    #[serde(default = "p002")]
    pub router_init_std: f64,
    /// How a token's experts and their weights come from the router's logits:
    /// `topk_softmax` (WeNet's: top-k of the logits, softmax over the k) or
    /// `softmax_topk` (He et al.: softmax over all E, top-k of it, weights scaled by
    /// E/k, so a zero router reproduces an upcycled parent and top-1 learns); see
    /// [`Router`].
    #[serde(default = "topk_softmax")]
    pub router: String,
    /// Replaced by `router` (read so that older checkpoints' configs, which wrote
    /// `false`, load; `true` is refused with the replacement).
    #[serde(default, skip_serializing)]
    pub softmax_before_topk: Option<bool>,
    /// Router input multiplied by uniform noise in `[1 - j, 1 + j]` in training (Switch).
    #[serde(default)]
    pub jitter_noise: f64,
    /// Training capacity of an expert as a multiple of an even share of the token
    /// copies; the copies with the lowest routing weight beyond it are dropped.
    /// 0: dropless. Evaluation is always dropless.
    #[serde(default)]
    pub capacity_factor: f64,
    /// Weight of the load-balancing loss `E * sum_i f_i * P_i` (mean over MoE layers).
    #[serde(default = "p001")]
    pub balance_loss_weight: f64,
    /// Weight of the router z-loss `mean(logsumexp(logits)^2)` (mean over MoE layers).
    #[serde(default)]
    pub z_loss_weight: f64,
    /// Expert computation: `auto`, `grouped_mm`, `bmm` or `loop`.
    #[serde(default = "auto")]
    pub expert_compute: String,
    /// Token fractions `f_i` of the load-balancing loss: `micro_batch` (each worker's
    /// batch) or `global` (summed over every data-parallel worker and over the
    /// micro-batches of the optimizer step so far; arXiv 2501.11873).
    #[serde(default = "micro_batch")]
    pub balance_scope: String,
    /// Aux-loss-free balancing (DeepSeek-V3): a per-expert bias, not trained, added to the
    /// router's scores to choose the top-k only, moved after each optimizer step by
    /// `bias_update_rate` towards an even load of that step's global batch.
    #[serde(default)]
    pub expert_bias: bool,
    /// The step of the expert bias's update (Megatron-Core's default).
    #[serde(default = "p0001")]
    pub bias_update_rate: f64,
}

/// The routing rule of `moe_conf.router`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Router {
    /// WeNet's: top-k of the logits, softmax over the k (weights sum to 1; top-1 gives
    /// weight 1 and no router gradient).
    TopkSoftmax,
    /// He et al. (arXiv 2410.07524): softmax over all E experts, top-k of it, the k
    /// probabilities multiplied by E/k.
    SoftmaxTopk,
}

impl MoeConf {
    /// The routing rule (`router` is checked by [`MoeConf::validate`]).
    pub fn router(&self) -> Router {
        match self.router.as_str() {
            "softmax_topk" => Router::SoftmaxTopk,
            _ => Router::TopkSoftmax,
        }
    }
}

impl Default for MoeConf {
    fn default() -> Self {
        serde_json_like_default()
    }
}

impl MoeConf {
    /// Refuses values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        one_of(
            "moe_conf.router_init",
            &self.router_init,
            &["normal", "zero", "kmeans"],
        )?;
        one_of(
            "moe_conf.router",
            &self.router,
            &["topk_softmax", "softmax_topk"],
        )?;
        if self.softmax_before_topk == Some(true) {
            return Err(
                "moe_conf.softmax_before_topk was replaced by moe_conf.router: \
                        softmax_topk, which also scales the chosen probabilities by E/k \
                        (see configs/README.md); remove the old key"
                    .into(),
            );
        }
        one_of(
            "moe_conf.expert_compute",
            &self.expert_compute,
            &["auto", "grouped_mm", "bmm", "loop"],
        )?;
        one_of(
            "moe_conf.balance_scope",
            &self.balance_scope,
            &["micro_batch", "global"],
        )?;
        for (key, v) in [
            ("router_init_std", self.router_init_std),
            ("jitter_noise", self.jitter_noise),
            ("capacity_factor", self.capacity_factor),
            ("balance_loss_weight", self.balance_loss_weight),
            ("z_loss_weight", self.z_loss_weight),
            ("bias_update_rate", self.bias_update_rate),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("moe_conf.{key}: {v} must be a finite number >= 0"));
            }
        }
        if self.jitter_noise >= 1.0 {
            return Err("moe_conf.jitter_noise must be below 1".into());
        }
        Ok(())
    }
}

/// Refuses a WeNet option set to anything but the value this model computes.
fn only_default<T: PartialEq + std::fmt::Debug>(
    key: &str,
    value: &Option<T>,
    default: T,
) -> Result<(), String> {
    match value {
        Some(v) if *v != default => Err(format!(
            "{key}: {v:?} is not supported (this model computes WeNet's default, {default:?}; \
             remove the key or set it to that)"
        )),
        _ => Ok(()),
    }
}

/// The WeNet options that only change memory or speed, present in a section.
fn ignored(
    section: &'static [&'static str; 2],
    checkpointing: bool,
    sdpa: bool,
) -> Vec<&'static str> {
    [(section[0], checkpointing), (section[1], sdpa)]
        .into_iter()
        .filter_map(|(k, present)| present.then_some(k))
        .collect()
}

/// Checks what WeNet's encoder and decoder share: grouped-query heads and head width.
fn check_heads(
    section: &str,
    kv: Option<i64>,
    head_dim: Option<i64>,
    heads: i64,
    d: i64,
) -> Result<(), String> {
    only_default(&format!("{section}.n_kv_head"), &kv, heads)?;
    only_default(&format!("{section}.head_dim"), &head_dim, d / heads.max(1))
}

/// Checks the MoE keys shared by `encoder_conf` and `decoder_conf`.
fn validate_mlp(
    section: &str,
    mlp_type: &str,
    n_expert: i64,
    k: i64,
    moe_layers: Option<&[usize]>,
    num_blocks: usize,
    expert_linear_units: Option<i64>,
) -> Result<(), String> {
    if let Some(units) = expert_linear_units.filter(|&u| u < 1) {
        return Err(format!(
            "{section}.expert_linear_units: {units} must be at least 1 (or absent: linear_units)"
        ));
    }
    one_of(
        &format!("{section}.mlp_type"),
        mlp_type,
        &["position_wise_feed_forward", "moe"],
    )?;
    if mlp_type != "moe" {
        return Ok(());
    }
    if n_expert < 1 || k < 1 || k > n_expert {
        return Err(format!(
            "{section}: n_expert_activated ({k}) must be between 1 and n_expert ({n_expert})"
        ));
    }
    if let Some(&bad) = moe_layers.unwrap_or(&[]).iter().find(|&&i| i >= num_blocks) {
        return Err(format!(
            "{section}.moe_layers: block {bad} does not exist (num_blocks: {num_blocks})"
        ));
    }
    Ok(())
}

fn is_moe_block(mlp_type: &str, moe_layers: Option<&[usize]>, block: usize) -> bool {
    mlp_type == "moe" && moe_layers.is_none_or(|l| l.contains(&block))
}

fn d256() -> i64 {
    256
}
fn d2048() -> i64 {
    2048
}
fn eight() -> i64 {
    8
}
fn two() -> i64 {
    2
}
fn dense_mlp() -> String {
    "position_wise_feed_forward".into()
}
fn four() -> i64 {
    4
}
fn six() -> usize {
    6
}
fn k15() -> i64 {
    15
}
fn p01() -> f64 {
    0.1
}
fn p002() -> f64 {
    0.02
}
fn p001() -> f64 {
    0.01
}
fn normal() -> String {
    "normal".into()
}
fn topk_softmax() -> String {
    "topk_softmax".into()
}
fn auto() -> String {
    "auto".into()
}
fn micro_batch() -> String {
    "micro_batch".into()
}
fn p0001() -> f64 {
    1e-3
}
fn p05() -> f64 {
    0.5
}
fn minus_one() -> i64 {
    -1
}
fn yes() -> bool {
    true
}
fn conv2d() -> String {
    "conv2d".into()
}
fn rel_pos() -> String {
    "rel_pos".into()
}
fn rel_selfattn() -> String {
    "rel_selfattn".into()
}
fn swish() -> String {
    "swish".into()
}
fn relu() -> String {
    "relu".into()
}
fn layer_norm() -> String {
    "layer_norm".into()
}
fn embed() -> String {
    "embed".into()
}

impl Default for EncoderConf {
    fn default() -> Self {
        serde_json_like_default()
    }
}

impl Default for DecoderConf {
    fn default() -> Self {
        serde_json_like_default()
    }
}

impl Default for ModelConf {
    fn default() -> Self {
        serde_json_like_default()
    }
}

/// A struct whose every field has a serde default, built from an empty map.
fn serde_json_like_default<T: for<'de> Deserialize<'de>>() -> T {
    T::deserialize(serde::de::value::MapDeserializer::<
        std::iter::Empty<(String, String)>,
        serde::de::value::Error,
    >::new(std::iter::empty()))
    .expect("every field has a default")
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{key}: {value:?} is not supported (supported: {})",
            allowed.join(", ")
        ))
    }
}

impl EncoderConf {
    /// Subsampling rate of `input_layer`.
    pub fn subsampling_rate(&self) -> i64 {
        match self.input_layer.as_str() {
            "conv2d6" => 6,
            "conv2d8" => 8,
            _ => 4,
        }
    }

    /// WeNet keys present here that change nothing this model computes.
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        ignored(
            &[
                "encoder_conf.gradient_checkpointing",
                "encoder_conf.use_sdpa",
            ],
            self.gradient_checkpointing.is_some(),
            self.use_sdpa.is_some(),
        )
    }

    /// Refuses values this implementation does not support, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let e = "encoder_conf";
        only_default(
            &format!("{e}.positionwise_conv_kernel_size"),
            &self.positionwise_conv_kernel_size,
            1,
        )?;
        for (key, v) in [
            ("query_bias", self.query_bias),
            ("key_bias", self.key_bias),
            ("value_bias", self.value_bias),
            ("conv_bias", self.conv_bias),
            ("mlp_bias", self.mlp_bias),
            ("final_norm", self.final_norm),
        ] {
            only_default(&format!("{e}.{key}"), &v, true)?;
        }
        only_default(
            &format!("{e}.layer_norm_type"),
            &self.layer_norm_type.as_deref(),
            "layer_norm",
        )?;
        only_default(&format!("{e}.norm_eps"), &self.norm_eps, 1e-5)?;
        only_default(&format!("{e}.conv_norm_eps"), &self.conv_norm_eps, 1e-5)?;
        only_default(
            &format!("{e}.conv_inner_factor"),
            &self.conv_inner_factor,
            2,
        )?;
        check_heads(
            e,
            self.n_kv_head,
            self.head_dim,
            self.attention_heads,
            self.output_size,
        )?;
        one_of(
            "encoder_conf.input_layer",
            &self.input_layer,
            &["conv2d", "conv2d6", "conv2d8"],
        )?;
        one_of(
            "encoder_conf.pos_enc_layer_type",
            &self.pos_enc_layer_type,
            &["rel_pos"],
        )?;
        one_of(
            "encoder_conf.selfattention_layer_type",
            &self.selfattention_layer_type,
            &["rel_selfattn"],
        )?;
        one_of(
            "encoder_conf.activation_type",
            &self.activation_type,
            &["swish", "relu", "gelu"],
        )?;
        one_of(
            "encoder_conf.cnn_module_norm",
            &self.cnn_module_norm,
            &["layer_norm"],
        )?;
        if !self.normalize_before {
            return Err("encoder_conf.normalize_before: only pre-norm (true) is supported".into());
        }
        if self.output_size <= 0
            || self.attention_heads <= 0
            || self.output_size % self.attention_heads != 0
        {
            return Err(format!(
                "encoder_conf.output_size ({}) must be a positive multiple of attention_heads ({})",
                self.output_size, self.attention_heads
            ));
        }
        if self.use_cnn_module && !self.causal && self.cnn_module_kernel % 2 == 0 {
            return Err(format!(
                "encoder_conf.cnn_module_kernel: {} must be odd unless causal: true",
                self.cnn_module_kernel
            ));
        }
        validate_mlp(
            "encoder_conf",
            &self.mlp_type,
            self.n_expert,
            self.n_expert_activated,
            self.moe_layers.as_deref(),
            self.num_blocks,
            self.expert_linear_units,
        )?;
        let mut seen = std::collections::BTreeSet::new();
        for group in &self.expert_sharing {
            for &block in group {
                if !self.is_moe_block(block) {
                    return Err(format!(
                        "encoder_conf.expert_sharing: block {block} is not an MoE block \
                         (mlp_type: moe, moe_layers)"
                    ));
                }
                if !seen.insert(block) {
                    return Err(format!(
                        "encoder_conf.expert_sharing: block {block} is in two groups"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Hidden units of one expert.
    pub fn expert_units(&self) -> i64 {
        self.expert_linear_units.unwrap_or(self.linear_units)
    }

    /// Whether the feed-forward networks of `block` are MoE.
    pub fn is_moe_block(&self, block: usize) -> bool {
        is_moe_block(&self.mlp_type, self.moe_layers.as_deref(), block)
    }

    /// The block whose expert banks `block` uses (itself unless it shares).
    pub fn expert_bank_owner(&self, block: usize) -> usize {
        self.expert_sharing
            .iter()
            .find(|g| g.contains(&block))
            .and_then(|g| g.iter().min().copied())
            .unwrap_or(block)
    }
}

impl DecoderConf {
    /// WeNet keys present here that change nothing this model computes.
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        ignored(
            &[
                "decoder_conf.gradient_checkpointing",
                "decoder_conf.use_sdpa",
            ],
            self.gradient_checkpointing.is_some(),
            self.use_sdpa.is_some(),
        )
    }

    /// Refuses values this implementation does not support, naming the key.
    pub fn validate(&self, d_model: i64) -> Result<(), String> {
        let d = "decoder_conf";
        for (key, v) in [
            ("src_attention", self.src_attention),
            ("query_bias", self.query_bias),
            ("key_bias", self.key_bias),
            ("value_bias", self.value_bias),
            ("src_query_bias", self.src_query_bias),
            ("src_key_bias", self.src_key_bias),
            ("src_value_bias", self.src_value_bias),
            ("mlp_bias", self.mlp_bias),
        ] {
            only_default(&format!("{d}.{key}"), &v, true)?;
        }
        only_default(
            &format!("{d}.tie_word_embedding"),
            &self.tie_word_embedding,
            false,
        )?;
        only_default(
            &format!("{d}.layer_norm_type"),
            &self.layer_norm_type.as_deref(),
            "layer_norm",
        )?;
        only_default(&format!("{d}.norm_eps"), &self.norm_eps, 1e-5)?;
        check_heads(
            d,
            self.n_kv_head,
            self.head_dim,
            self.attention_heads,
            d_model,
        )?;
        one_of("decoder_conf.input_layer", &self.input_layer, &["embed"])?;
        one_of(
            "decoder_conf.activation_type",
            &self.activation_type,
            &["relu", "swish", "gelu"],
        )?;
        if !self.normalize_before || !self.use_output_layer {
            return Err("decoder_conf.normalize_before and use_output_layer must be true".into());
        }
        if self.attention_heads <= 0 || d_model % self.attention_heads != 0 {
            return Err(format!(
                "decoder_conf.attention_heads ({}) must divide encoder_conf.output_size ({d_model})",
                self.attention_heads
            ));
        }
        validate_mlp(
            "decoder_conf",
            &self.mlp_type,
            self.n_expert,
            self.n_expert_activated,
            self.moe_layers.as_deref(),
            self.num_blocks.max(self.r_num_blocks),
            self.expert_linear_units,
        )
    }

    /// Hidden units of one expert.
    pub fn expert_units(&self) -> i64 {
        self.expert_linear_units.unwrap_or(self.linear_units)
    }

    /// Whether the feed-forward network of `block` (of either decoder) is MoE.
    pub fn is_moe_block(&self, block: usize) -> bool {
        is_moe_block(&self.mlp_type, self.moe_layers.as_deref(), block)
    }
}

impl ModelConf {
    /// Refuses values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.ctc_weight) {
            return Err("model_conf.ctc_weight must be in [0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.reverse_weight) {
            return Err("model_conf.reverse_weight must be in [0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.lsm_weight) {
            return Err("model_conf.lsm_weight must be in [0, 1)".into());
        }
        if self.ignore_id != -1 {
            return Err("model_conf.ignore_id must be -1".into());
        }
        Ok(())
    }
}
