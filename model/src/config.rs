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

fn d256() -> i64 {
    256
}
fn d2048() -> i64 {
    2048
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

    /// Refuses values this implementation does not support, naming the key.
    pub fn validate(&self) -> Result<(), String> {
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
        Ok(())
    }
}

impl DecoderConf {
    /// Refuses values this implementation does not support, naming the key.
    pub fn validate(&self, d_model: i64) -> Result<(), String> {
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
        Ok(())
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
