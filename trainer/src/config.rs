//! The training configuration: a WeNet `train.yaml` (its keys, so WeNet recipes load
//! as they are) plus upcycle's own `upcycle_conf` block. Unknown keys are refused by
//! name; WeNet keys that do not apply here are accepted and reported as ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use upcycle_dataset::config::DatasetConf;
use upcycle_dataset::text::Units;
use upcycle_model::asr::{AsrModel, Vocab};
use upcycle_model::config::{DecoderConf, EncoderConf, ModelConf, MoeConf, Router};
use upcycle_model::moe::MoeContext;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// YAML or a key is wrong (serde names the key and, for unknown keys, the known ones).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value parses but cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// Optimizer settings (WeNet's `optim_conf`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConf {
    /// Peak learning rate.
    #[serde(default = "lr")]
    pub lr: f64,
    /// Decoupled weight decay (AdamW); 0 for Adam.
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam's beta1, beta2.
    #[serde(default = "betas")]
    pub betas: (f64, f64),
    /// Adam's epsilon.
    #[serde(default = "eps")]
    pub eps: f64,
}

fn lr() -> f64 {
    1e-3
}
fn betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn eps() -> f64 {
    1e-8
}

impl Default for OptimConf {
    fn default() -> Self {
        Self {
            lr: lr(),
            weight_decay: 0.0,
            betas: betas(),
            eps: eps(),
        }
    }
}

/// Learning-rate schedule settings (WeNet's `scheduler_conf`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConf {
    /// Linear warm-up steps.
    #[serde(default = "warmup")]
    pub warmup_steps: u64,
    /// Total steps for `cosine` and `linear` (they decay to `min_lr` there); 0 decays
    /// until the run's last step (a phase's schedule: counted from the phase's first; a
    /// run resumed with another `max_steps` decays until the new last step).
    #[serde(default)]
    pub total_steps: u64,
    /// Floor of `cosine` and `linear`.
    #[serde(default)]
    pub min_lr: f64,
}

/// The schedules `scheduler` may name.
pub const SCHEDULERS: [&str; 3] = ["warmuplr", "cosine", "linear"];

/// A learning-rate schedule of a freezing phase's own (`upcycle_conf.freeze[].lr_schedule`):
/// it starts again at the phase's first step, so a phase re-warms and decays on its own
/// steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSchedule {
    /// One of [`SCHEDULERS`], as the top-level `scheduler`.
    pub scheduler: String,
    /// Peak rate (default: `optim_conf.lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Warm-up and total steps (counted from the phase's first step) and floor.
    #[serde(default)]
    pub scheduler_conf: SchedulerConf,
}

/// Refuses a schedule `key` that does not exist or lacks its length, naming the key.
fn check_schedule(key: &str, name: &str, conf: &SchedulerConf) -> Result<(), String> {
    if !SCHEDULERS.contains(&name) {
        return Err(format!(
            "{key}: {name:?} is not supported (supported: {})",
            SCHEDULERS.join(", ")
        ));
    }
    if name != "warmuplr" && conf.total_steps != 0 && conf.total_steps <= conf.warmup_steps {
        return Err(format!(
            "{key}: {name} decays until scheduler_conf.total_steps, which must be above \
             warmup_steps ({} and {}), or 0 to decay until the run's last step",
            conf.total_steps, conf.warmup_steps
        ));
    }
    Ok(())
}

fn warmup() -> u64 {
    25_000
}

impl Default for SchedulerConf {
    fn default() -> Self {
        Self {
            warmup_steps: warmup(),
            total_steps: 0,
            min_lr: 0.0,
        }
    }
}

/// upcycle's own training settings (not in WeNet's files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpcycleConf {
    /// Seed of parameters, data order, augmentation and dynamic chunks.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many optimizer steps (0: run `max_epoch` epochs).
    #[serde(default)]
    pub max_steps: u64,
    /// Stop after this many minutes of training (0: no limit); checked between steps.
    #[serde(default)]
    pub max_minutes: f64,
    /// Evaluate on the dev set (loss, CTC greedy CER) every this many steps (0: each epoch).
    #[serde(default)]
    pub eval_interval: u64,
    /// Utterances of the dev set used for evaluation during training (0: all).
    #[serde(default)]
    pub eval_utterances: usize,
    /// Stop when this many steps in a row have a non-finite loss.
    #[serde(default = "max_nonfinite")]
    pub max_nonfinite_steps: u32,
    /// libtorch intra-op threads (0: libtorch's default).
    #[serde(default)]
    pub threads: i32,
    /// Train with full-context attention for this many steps before the encoder's chunk
    /// setting (dynamic chunks) applies: U2++ streams best when initialised from a
    /// non-streaming model, and CTC learns alignments faster with full context.
    #[serde(default)]
    pub full_context_steps: u64,
    /// Checkpoints kept besides the best one (the newest ones).
    #[serde(default = "keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Freezing schedule (UME): phases by global step naming the trainable parameters
    /// by glob; empty: everything trains.
    #[serde(default)]
    pub freeze: Vec<crate::freeze::FreezePhase>,
    /// Knowledge distillation from a frozen dense teacher (Bai et al.).
    #[serde(default)]
    pub distill: Option<DistillConf>,
    /// Seconds a blocking collective may take before the worker stops with a message
    /// naming it (a dead or hung peer), so that the job can restart.
    #[serde(default = "collective_timeout")]
    pub collective_timeout_s: f64,
    /// Write TensorBoard event files to `OUT/tensorboard/` beside `metrics.jsonl`.
    #[serde(default = "yes")]
    pub tensorboard: bool,
    /// Write checkpoints in the background: training waits only while the tensors are
    /// copied to host memory; a save waits for the previous one to finish.
    #[serde(default)]
    pub async_checkpoint: bool,
    /// Time the parts of the training forward pass (attention, convolution, FFN, MoE
    /// routing, dispatch, experts) into the metrics as `time_fwd_<part>_s`.
    #[serde(default)]
    pub profile_forward: bool,
    /// Arithmetic of the training forward pass: `fp32`, or `bf16` (autocast: matrix
    /// products and convolutions in bfloat16 over fp32 master weights; the MoE router,
    /// the losses, gradients and optimizer state stay fp32). On the CPU, bf16 needs a
    /// processor with bfloat16 instructions (AVX512-BF16 or AMX) to be faster.
    #[serde(default)]
    pub precision: upcycle_model::precision::Precision,
}

fn yes() -> bool {
    true
}

fn collective_timeout() -> f64 {
    1800.0
}

/// `upcycle_conf.distill`: loss += weight * mean squared distance between the student's
/// and the teacher's encoder outputs over real frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConf {
    /// The teacher's checkpoint (a run's `checkpoints/` or a `step-N` directory).
    pub teacher: std::path::PathBuf,
    /// Weight of the distillation term.
    #[serde(default = "one_f64")]
    pub weight: f64,
}

fn one_f64() -> f64 {
    1.0
}

fn keep_checkpoints() -> usize {
    3
}

fn max_nonfinite() -> u32 {
    20
}

impl Default for UpcycleConf {
    fn default() -> Self {
        Self {
            seed: 0,
            max_steps: 0,
            max_minutes: 0.0,
            eval_interval: 0,
            eval_utterances: 0,
            max_nonfinite_steps: max_nonfinite(),
            threads: 0,
            full_context_steps: 0,
            keep_checkpoints: keep_checkpoints(),
            freeze: Vec::new(),
            distill: None,
            collective_timeout_s: collective_timeout(),
            tensorboard: true,
            async_checkpoint: false,
            profile_forward: false,
            precision: Default::default(),
        }
    }
}

/// A whole training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Feature dimension.
    #[serde(default = "input_dim")]
    pub input_dim: i64,
    /// Only `conformer`.
    #[serde(default = "conformer")]
    pub encoder: String,
    /// Encoder settings.
    #[serde(default)]
    pub encoder_conf: EncoderConf,
    /// `bitransformer` or `transformer`.
    #[serde(default = "bitransformer")]
    pub decoder: String,
    /// Decoder settings.
    #[serde(default)]
    pub decoder_conf: DecoderConf,
    /// Only `asr_model`.
    #[serde(default = "asr_model")]
    pub model: String,
    /// Loss settings.
    #[serde(default)]
    pub model_conf: ModelConf,
    /// Routing and auxiliary losses of every MoE layer.
    #[serde(default)]
    pub moe_conf: MoeConf,
    /// Data pipeline settings.
    #[serde(default)]
    pub dataset_conf: DatasetConf,
    /// `adam` or `adamw`.
    #[serde(default = "adam")]
    pub optim: String,
    /// Optimizer settings.
    #[serde(default)]
    pub optim_conf: OptimConf,
    /// `warmuplr` (WeNet's Noam-style inverse square root), `cosine` or `linear` (linear
    /// warm-up, then a half cosine or a straight line down to `min_lr`).
    #[serde(default = "warmuplr")]
    pub scheduler: String,
    /// Schedule settings.
    #[serde(default)]
    pub scheduler_conf: SchedulerConf,
    /// Clip the global gradient norm to this.
    #[serde(default = "grad_clip")]
    pub grad_clip: f64,
    /// Batches per optimizer step.
    #[serde(default = "one")]
    pub accum_grad: u64,
    /// Epochs (when `upcycle_conf.max_steps` is 0).
    #[serde(default = "max_epoch")]
    pub max_epoch: u64,
    /// Steps between metric lines.
    #[serde(default = "log_interval")]
    pub log_interval: u64,
    /// upcycle's own settings.
    #[serde(default)]
    pub upcycle_conf: UpcycleConf,

    // WeNet keys that carry no meaning here (set from the data or fixed); accepted so
    // that WeNet's own train.yaml files load.
    #[serde(default, skip_serializing)]
    output_dim: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    vocab_size: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    cmvn: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    cmvn_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    tokenizer: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    tokenizer_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    ctc: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    ctc_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    dataset: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    train_engine: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    use_amp: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    dtype: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    model_dir: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    save_states: Option<serde_yaml::Value>,
    // WeNet 2.x spellings of `cmvn_conf`, and the LF-MMI directory (empty for ASR models).
    #[serde(default, skip_serializing)]
    cmvn_file: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    is_json_cmvn: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    lfmmi_dir: Option<serde_yaml::Value>,
    // Steps-mode saving (upcycle saves by `upcycle_conf.save_every`), WeNet 1.x data
    // keys, and what WeNet's train.py writes into the info yaml beside each checkpoint
    // (`epoch_N.yaml`, `final.yaml`: the config plus these), which users also pass as
    // the config.
    #[serde(default, skip_serializing)]
    save_interval: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    raw_wav: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    collate_conf: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    init_infos: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    epoch: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    step: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    lrs: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    lr: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    tag: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    save_time: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    loss_dict: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    batch_idx: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    cv_step: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    is_gradient_accumulation_boundary: Option<serde_yaml::Value>,
    // LoRA adapters add tensors and change the model's function: refused by name in
    // `validate` when present.
    #[serde(default, skip_serializing)]
    lora_conf: Option<serde_yaml::Value>,
}

fn input_dim() -> i64 {
    80
}
fn conformer() -> String {
    "conformer".into()
}
fn bitransformer() -> String {
    "bitransformer".into()
}
fn asr_model() -> String {
    "asr_model".into()
}
fn adam() -> String {
    "adam".into()
}
fn warmuplr() -> String {
    "warmuplr".into()
}
fn grad_clip() -> f64 {
    5.0
}
fn one() -> u64 {
    1
}
fn max_epoch() -> u64 {
    100
}
fn log_interval() -> u64 {
    100
}

/// The model's view of `units`: their number and the `<sos/eos>` id.
pub fn vocab(units: &Units) -> Vocab {
    Vocab {
        size: units.len() as i64,
        sos_eos: units.sos_eos() as i64,
    }
}

impl TrainConfig {
    /// The shape the model's FLOP count depends on, for `vocab`.
    pub fn flop_shape(&self, vocab: Vocab) -> upcycle_model::flops::FlopShape {
        upcycle_model::flops::FlopShape {
            input_dim: self.input_dim,
            vocab: vocab.size,
            encoder: self.encoder_conf.clone(),
            decoder: self.decoder_conf.clone(),
            right_to_left: self.model_conf.reverse_weight > 0.0,
        }
    }

    /// Builds the model this config describes under `root`, every expert local.
    pub fn build_model(
        &self,
        root: &tch::nn::Path<'_>,
        vocab: Vocab,
    ) -> Result<AsrModel, upcycle_model::asr::ConfigError> {
        self.build_model_with(root, vocab, &MoeContext::local(self.moe_conf.clone()))
    }

    /// Builds the model with its experts where `moe` says (e.g. spread over ranks).
    pub fn build_model_with(
        &self,
        root: &tch::nn::Path<'_>,
        vocab: Vocab,
        moe: &MoeContext,
    ) -> Result<AsrModel, upcycle_model::asr::ConfigError> {
        AsrModel::new(
            root,
            self.input_dim,
            vocab,
            &self.encoder_conf,
            &self.decoder_conf,
            &self.model_conf,
            moe,
        )
    }

    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        let c = Self::parse(&text).map_err(|message| ConfigError::Parse { path: p, message })?;
        c.validate()?;
        Ok(c)
    }

    /// Parses YAML text (no validation).
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// WeNet keys present in the file that upcycle ignores.
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let keys = [
            ("output_dim", self.output_dim.is_some()),
            ("vocab_size", self.vocab_size.is_some()),
            ("cmvn", self.cmvn.is_some()),
            ("cmvn_conf", self.cmvn_conf.is_some()),
            ("tokenizer", self.tokenizer.is_some()),
            ("tokenizer_conf", self.tokenizer_conf.is_some()),
            ("ctc", self.ctc.is_some()),
            ("ctc_conf", self.ctc_conf.is_some()),
            ("dataset", self.dataset.is_some()),
            ("train_engine", self.train_engine.is_some()),
            ("use_amp", self.use_amp.is_some()),
            ("dtype", self.dtype.is_some()),
            ("model_dir", self.model_dir.is_some()),
            ("save_states", self.save_states.is_some()),
            ("cmvn_file", self.cmvn_file.is_some()),
            ("is_json_cmvn", self.is_json_cmvn.is_some()),
            ("lfmmi_dir", self.lfmmi_dir.is_some()),
            ("save_interval", self.save_interval.is_some()),
            ("raw_wav", self.raw_wav.is_some()),
            ("collate_conf", self.collate_conf.is_some()),
            ("init_infos", self.init_infos.is_some()),
            ("epoch", self.epoch.is_some()),
            ("step", self.step.is_some()),
            ("lrs", self.lrs.is_some()),
            ("lr", self.lr.is_some()),
            ("tag", self.tag.is_some()),
            ("save_time", self.save_time.is_some()),
            ("loss_dict", self.loss_dict.is_some()),
            ("batch_idx", self.batch_idx.is_some()),
            ("cv_step", self.cv_step.is_some()),
            (
                "is_gradient_accumulation_boundary",
                self.is_gradient_accumulation_boundary.is_some(),
            ),
        ];
        for (k, present) in keys {
            if present {
                v.push(k);
            }
        }
        v.extend(self.encoder_conf.ignored_keys());
        v.extend(self.decoder_conf.ignored_keys());
        v.extend(self.dataset_conf.ignored_keys());
        v
    }

    /// `tokenizer_conf.symbol_table_path` of a WeNet train.yaml (its units file).
    pub fn wenet_symbol_table(&self) -> Option<String> {
        let table = self.tokenizer_conf.as_ref()?.get("symbol_table_path")?;
        table.as_str().map(str::to_string)
    }

    /// `tokenizer_conf.special_tokens[name]` of a WeNet train.yaml, when given.
    pub fn wenet_special_token(&self, name: &str) -> Option<i64> {
        let tokens = self.tokenizer_conf.as_ref()?.get("special_tokens")?;
        tokens.get(name)?.as_i64()
    }

    /// `output_dim` of a WeNet train.yaml (its vocabulary size), when the file has it.
    pub fn wenet_output_dim(&self) -> Option<i64> {
        self.output_dim.as_ref().and_then(serde_yaml::Value::as_i64)
    }

    /// Refuses values of the WeNet keys that training ignores but that would make a WeNet
    /// model compute something this model does not (a CTC blank other than 0, another CTC
    /// or CMVN kind, an LF-MMI model), naming the key. Used when importing WeNet
    /// checkpoints, whose weights must mean the same here.
    pub fn check_wenet_model_keys(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let string =
            |v: &Option<serde_yaml::Value>| v.as_ref().and_then(|v| v.as_str().map(str::to_string));
        if let Some(ctc) = string(&self.ctc).filter(|c| c != "ctc") {
            return bad(format!("ctc: {ctc:?} is not supported (supported: ctc)"));
        }
        if let Some(conf) = &self.ctc_conf {
            let Some(map) = conf.as_mapping() else {
                return bad("ctc_conf must be a mapping".into());
            };
            for (k, v) in map {
                let key = k.as_str().unwrap_or("?");
                match key {
                    "ctc_blank_id" if v.as_i64() == Some(0) => {}
                    "ctc_blank_id" => {
                        return bad(format!(
                            "ctc_conf.ctc_blank_id: {v:?} is not supported (upcycle's CTC blank is unit 0)"
                        ))
                    }
                    _ => {
                        return bad(format!(
                            "ctc_conf.{key}: not an option of upcycle's CTC (remove it if it is at WeNet's default)"
                        ))
                    }
                }
            }
        }
        if let Some(cmvn) = string(&self.cmvn).filter(|c| c != "global_cmvn") {
            return bad(format!(
                "cmvn: {cmvn:?} is not supported (supported: global_cmvn or none)"
            ));
        }
        if string(&self.lfmmi_dir).is_some_and(|d| !d.is_empty()) {
            return bad("lfmmi_dir: LF-MMI (k2) models are not supported (supported: model: asr_model with an empty lfmmi_dir)".into());
        }
        Ok(())
    }

    /// Checks values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.encoder != "conformer" {
            return bad(format!(
                "encoder: {:?} is not supported (supported: conformer)",
                self.encoder
            ));
        }
        if self.decoder != "bitransformer" && self.decoder != "transformer" {
            return bad(format!(
                "decoder: {:?} is not supported (supported: bitransformer, transformer)",
                self.decoder
            ));
        }
        if self.decoder == "transformer" && self.decoder_conf.r_num_blocks > 0 {
            return bad("decoder_conf.r_num_blocks needs decoder: bitransformer".into());
        }
        for (section, mlp, k) in [
            (
                "encoder_conf",
                &self.encoder_conf.mlp_type,
                self.encoder_conf.n_expert_activated,
            ),
            (
                "decoder_conf",
                &self.decoder_conf.mlp_type,
                self.decoder_conf.n_expert_activated,
            ),
        ] {
            if mlp == "moe" && k == 1 && self.moe_conf.router() == Router::TopkSoftmax {
                return bad(format!(
                    "{section}.n_expert_activated: 1 with WeNet's routing (softmax over the \
                     chosen experts) gives every token weight 1, so the router gets no \
                     gradient and never learns; set moe_conf.router: softmax_topk \
                     (softmax over all experts, then top-1) or choose 2 or more experts"
                ));
            }
        }
        if self.lora_conf.as_ref().is_some_and(|v| !v.is_null()) {
            return bad(
                "lora_conf: LoRA adapters are not supported (merge them into the \
                        weights with WeNet before importing, and drop lora_conf)"
                    .into(),
            );
        }
        if self.model != "asr_model" {
            return bad(format!(
                "model: {:?} is not supported (supported: asr_model)",
                self.model
            ));
        }
        if self.optim != "adam" && self.optim != "adamw" {
            return bad(format!(
                "optim: {:?} is not supported (supported: adam, adamw)",
                self.optim
            ));
        }
        check_schedule("scheduler", &self.scheduler, &self.scheduler_conf).or_else(bad)?;
        for (i, phase) in self.upcycle_conf.freeze.iter().enumerate() {
            if let Some(s) = &phase.lr_schedule {
                let key = format!("upcycle_conf.freeze[{i}].lr_schedule.scheduler");
                check_schedule(&key, &s.scheduler, &s.scheduler_conf).or_else(bad)?;
                if s.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
                    return bad(format!(
                        "upcycle_conf.freeze[{i}].lr_schedule.lr must be positive"
                    ));
                }
            }
        }
        if self.accum_grad == 0 {
            return bad("accum_grad must be at least 1".into());
        }
        if self.grad_clip <= 0.0 || !self.grad_clip.is_finite() {
            return bad("grad_clip must be positive".into());
        }
        if self.input_dim != self.dataset_conf.fbank_conf.num_mel_bins as i64 {
            return bad(format!(
                "input_dim ({}) differs from dataset_conf.fbank_conf.num_mel_bins ({})",
                self.input_dim, self.dataset_conf.fbank_conf.num_mel_bins
            ));
        }
        self.encoder_conf.validate().map_err(ConfigError::Invalid)?;
        self.decoder_conf
            .validate(self.encoder_conf.output_size)
            .map_err(ConfigError::Invalid)?;
        self.model_conf.validate().map_err(ConfigError::Invalid)?;
        self.moe_conf.validate().map_err(ConfigError::Invalid)?;
        if self.model_conf.reverse_weight > 0.0 && self.decoder_conf.r_num_blocks == 0 {
            return bad("model_conf.reverse_weight > 0 needs decoder_conf.r_num_blocks > 0".into());
        }
        self.dataset_conf.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing, seeded, a fixed number of inputs: the shipped configs (upcycle's and
    /// WeNet's, each with a `dataset_conf`) mutated, parsed and validated. No input may
    /// panic, hang (2 s each) or allocate above the test binary's bound.
    #[test]
    fn fuzz_train_config() {
        let seeds: Vec<Vec<u8>> = ["tiny.yaml", "small-upcycle.yaml", "wenet-u2pp-moe.yaml"]
            .iter()
            .map(|f| std::fs::read(configs().join(f)).unwrap())
            .collect();
        let limit = std::time::Duration::from_secs(2);
        upcycle_files::fuzz::run("train config", &seeds, 19_005, 5000, limit, |bytes| {
            if let Ok(c) = TrainConfig::parse(&String::from_utf8_lossy(bytes)) {
                let _ = c.validate();
                let _ = c.ignored_keys();
            }
        });
    }

    fn configs() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
    }

    /// Every shipped config loads, and builds a model of the size configs/README.md
    /// states (vocabulary sizes: fillets-cs 51, AISHELL 4233, a 5k-unit set).
    #[test]
    fn shipped_configs_build_models_of_the_stated_size() {
        for (name, vocab, lo, hi) in [
            ("tiny.yaml", 27, 0.05e6, 0.15e6),
            ("small.yaml", 51, 4.0e6, 5.0e6),
            ("wenet-u2pp-conformer.yaml", 4233, 40e6, 55e6),
            ("wenet-u2pp-moe.yaml", 51, 200e6, 230e6),
            ("dense-225m.yaml", 5000, 150e6, 260e6),
            ("small-upcycle-top1.yaml", 51, 20e6, 21.5e6),
            ("small-upcycle-granular.yaml", 51, 6e6, 7.5e6),
        ] {
            let c = TrainConfig::load(&configs().join(name)).unwrap();
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            c.build_model(&vs.root(), Vocab::sos_eos_last(vocab))
                .unwrap();
            let n: i64 = vs
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as i64)
                .sum();
            eprintln!("{name}: {n} parameters");
            assert!((lo..hi).contains(&(n as f64)), "{name}: {n} parameters");
        }
    }

    #[test]
    fn unknown_and_unsupported_keys_are_named() {
        let e = TrainConfig::parse("encoder_conf: {output_size: 32, num_block: 2}").unwrap_err();
        assert!(e.contains("num_block"), "{e}");
        let e = TrainConfig::parse("optim_confs: {}").unwrap_err();
        assert!(e.contains("optim_confs"), "{e}");
        let c = TrainConfig::parse("encoder_conf: {input_layer: conv3d}").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("encoder_conf.input_layer") && e.contains("conv3d"),
            "{e}"
        );
        let c = TrainConfig::parse(
            "model_conf: {reverse_weight: 0.3}\ndecoder_conf: {r_num_blocks: 0}",
        )
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("r_num_blocks"));
        let c = TrainConfig::parse("cmvn: global_cmvn\ntrain_engine: torch_ddp").unwrap();
        assert_eq!(c.ignored_keys(), vec!["cmvn", "train_engine"]);
        let phase = |s: &str| {
            let c = TrainConfig::parse(&format!(
                "upcycle_conf: {{freeze: [{{from_step: 5, trainable: ['*'], lr_schedule: {s}}}]}}"
            ))
            .unwrap();
            c.validate().map_err(|e| e.to_string())
        };
        let e = phase("{scheduler: step}").unwrap_err();
        assert!(
            e.contains("freeze[0].lr_schedule.scheduler: \"step\""),
            "{e}"
        );
        let e = phase("{scheduler: cosine, scheduler_conf: {warmup_steps: 10, total_steps: 10}}")
            .unwrap_err();
        assert!(e.contains("total_steps"), "{e}");
        phase("{scheduler: cosine, scheduler_conf: {warmup_steps: 10}}").unwrap();
        phase("{scheduler: linear, scheduler_conf: {warmup_steps: 10, total_steps: 20}}").unwrap();
        // The model refuses its own keys when it is built.
        let e = TrainConfig::parse("moe_conf: {balance_scope: world}")
            .unwrap()
            .moe_conf
            .validate()
            .unwrap_err();
        assert!(e.contains("moe_conf.balance_scope"), "{e}");
    }

    /// Top-1 with WeNet's routing would leave the router without a gradient.
    #[test]
    fn top_1_needs_softmax_before_top_k() {
        let moe = "encoder_conf: {mlp_type: moe, n_expert: 4, n_expert_activated: 1}";
        let e = TrainConfig::parse(moe).unwrap().validate().unwrap_err();
        assert!(
            e.to_string().contains("encoder_conf.n_expert_activated: 1"),
            "{e}"
        );
        let switch = format!("{moe}\nmoe_conf: {{router: softmax_topk}}");
        TrainConfig::parse(&switch).unwrap().validate().unwrap();
        // The key it replaced: false (what older checkpoints wrote) loads, true is
        // refused with its replacement.
        let old = format!("{moe}\nmoe_conf: {{router: softmax_topk, softmax_before_topk: false}}");
        TrainConfig::parse(&old).unwrap().validate().unwrap();
        let old = format!("{moe}\nmoe_conf: {{softmax_before_topk: true}}");
        let e = TrainConfig::parse(&old).unwrap().validate().unwrap_err();
        assert!(
            e.to_string().contains("moe_conf.router: softmax_topk"),
            "{e}"
        );
    }
}
