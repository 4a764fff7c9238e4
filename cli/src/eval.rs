//! `upcycle eval` and `upcycle transcribe`: decoding options shared by both.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use upcycle_trainer::eval::{self, DecodeOptions, Method};

use crate::device::device;

#[derive(Args)]
pub(crate) struct DecodeArgs {
    /// Decoding methods (default: all three).
    #[arg(long = "mode", value_enum)]
    pub(crate) modes: Vec<Method>,
    /// Chunk sizes after subsampling; 0 is full context (default: 0 and 16).
    #[arg(long = "chunk")]
    pub(crate) chunks: Vec<i64>,
    /// Left chunks visible in chunked decoding (-1: all).
    #[arg(long, default_value_t = -1)]
    pub(crate) left_chunks: i64,
    /// Beam of the CTC prefix search.
    #[arg(long, default_value_t = 10)]
    pub(crate) beam: usize,
    /// CTC weight in attention rescoring.
    #[arg(long, default_value_t = 0.3)]
    pub(crate) ctc_weight: f64,
    /// Right-to-left decoder weight in attention rescoring (default: the model's reverse_weight).
    #[arg(long)]
    pub(crate) reverse_weight: Option<f64>,
    /// cpu, cuda, or auto.
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// fp32, or bf16 (encoder and decoders under bfloat16 autocast; scores in fp32).
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    pub(crate) precision: upcycle_model::precision::Precision,
}

pub(crate) fn parse_precision(s: &str) -> Result<upcycle_model::precision::Precision, String> {
    serde_yaml::from_str(s).map_err(|_| format!("{s:?}: expected fp32 or bf16"))
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// A checkpoint directory, a training output directory (its best checkpoint), or a
    /// pointer such as runs/x/checkpoints/latest.
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// A split folder with data.list (e.g. DATA/test), or the list.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Where hypotheses and reports go (default: CHECKPOINT/eval-<split>).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) decode: DecodeArgs,
}

#[derive(Args)]
pub(crate) struct TranscribeArgs {
    /// A checkpoint directory, or a training output directory.
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Audio files (WAV, any rate).
    pub(crate) files: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) decode: DecodeArgs,
}

impl DecodeArgs {
    fn options(&self, default_reverse: f64) -> Result<DecodeOptions> {
        Ok(DecodeOptions {
            methods: if self.modes.is_empty() {
                Method::ALL.to_vec()
            } else {
                self.modes.clone()
            },
            chunks: if self.chunks.is_empty() {
                vec![0, 16]
            } else {
                self.chunks.clone()
            },
            left_chunks: self.left_chunks,
            beam: self.beam,
            ctc_weight: self.ctc_weight,
            reverse_weight: self.reverse_weight.unwrap_or(default_reverse),
            device: device(&self.device)?,
            precision: self.precision,
        })
    }
}

/// The reverse weight a checkpoint was trained with (for attention rescoring).
fn trained_reverse_weight(checkpoint: &Path) -> f64 {
    upcycle_trainer::checkpoint::resolve(checkpoint)
        .ok()
        .and_then(|d| upcycle_trainer::config::TrainConfig::load(&d.join("train.yaml")).ok())
        .map_or(0.0, |c| c.model_conf.reverse_weight)
}

/// Decodes a data set with every method and chunk setting; prints and writes CER/WER and RTF.
pub(crate) fn run_eval(a: EvalArgs) -> Result<()> {
    let opts = a.decode.options(trained_reverse_weight(&a.checkpoint))?;
    let dir = upcycle_trainer::checkpoint::resolve(&a.checkpoint)?;
    let split = a
        .data
        .file_name()
        .map_or("data".into(), |n| n.to_string_lossy().to_string());
    let out = a.out.unwrap_or_else(|| dir.join(format!("eval-{split}")));
    let results = eval::evaluate(&a.checkpoint, &a.data, &out, &opts)?;
    print!("{}", eval::table(&results));
    println!("hypotheses and per-utterance report: {}", out.display());
    Ok(())
}

/// Transcribes audio files (attention rescoring, full context, unless told otherwise).
pub(crate) fn run_transcribe(a: TranscribeArgs) -> Result<()> {
    let mut opts = a.decode.options(trained_reverse_weight(&a.checkpoint))?;
    if a.decode.modes.is_empty() {
        opts.methods = vec![Method::AttentionRescoring];
    }
    if a.decode.chunks.is_empty() {
        opts.chunks = vec![0];
    }
    for (file, text) in eval::transcribe(&a.checkpoint, &a.files, &opts)? {
        println!("{}\t{text}", file.display());
    }
    Ok(())
}
