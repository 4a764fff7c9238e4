//! `upcycle data`: prepare a corpus, the filterbank of one file, read a list as training would.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use upcycle_dataset::{audio, config::DatasetConf, corpus, fbank, loader, npy, text::Units};

#[derive(Subcommand)]
pub(crate) enum DataCommand {
    /// Build a dataset directory (train/dev/test lists, 16 kHz WAVs, units, CMVN, summary).
    Prepare(PrepareArgs),
    /// Write the filterbank features of one file as frames x 80 float32 .npy (no dither, no CMVN).
    Fbank {
        /// Input WAV (any rate and channel count; converted to 16 kHz mono first).
        input: PathBuf,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Read a list as training would: report bad input, batches per rank and loading speed.
    Check(CheckArgs),
}

/// `--corpus`: the dataset crate's names and descriptions as clap's possible values.
fn corpus_name() -> impl clap::builder::TypedValueParser<Value = corpus::CorpusName> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let values = corpus::CorpusName::ALL.map(|c| PossibleValue::new(c.label()).help(c.about()));
    PossibleValuesParser::new(values).map(|name| {
        *corpus::CorpusName::ALL
            .iter()
            .find(|c| c.label() == name)
            .expect("one of the possible values")
    })
}

#[derive(Args)]
pub(crate) struct PrepareArgs {
    /// Which corpus.
    #[arg(long, value_parser = corpus_name())]
    pub(crate) corpus: corpus::CorpusName,
    /// Output dataset directory.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Utterances to synthesise (espeak-en).
    #[arg(long, default_value_t = 500)]
    pub(crate) count: usize,
    /// espeak-ng utterances per language to add to the training split (multilingual):
    /// many voices, speeds and pitches, speaking only training text (the training
    /// transcripts and Fillets NG's dialogue from training levels); dev and test stay real.
    #[arg(long, default_value_t = 0)]
    pub(crate) synth: usize,
    /// Your data (dir): a folder with wav.scp + text, or a data.list.
    #[arg(long)]
    pub(crate) src: Option<PathBuf>,
    /// Seed of the synthesis choices (espeak-en, --synth).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Rebuild even if OUT already holds a complete dataset.
    #[arg(long)]
    pub(crate) force: bool,
    /// Do not run apt-get for missing corpus packages; print the command instead.
    #[arg(long)]
    pub(crate) no_install: bool,
    /// Refuse when more than this fraction of recordings cannot be converted.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) max_bad_fraction: f64,
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// A split folder holding data.list (e.g. DATA/train), or the list itself.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Units file (default: units.txt beside the split folder).
    #[arg(long)]
    pub(crate) units: Option<PathBuf>,
    /// YAML file with WeNet's dataset_conf keys (default: upcycle's defaults).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Number of data-parallel ranks to plan for.
    #[arg(long, default_value_t = 1)]
    pub(crate) world: usize,
    /// Iterate rank 0's batches in training mode and time them.
    #[arg(long)]
    pub(crate) iterate: bool,
}

/// Runs one `upcycle data` subcommand.
pub(crate) fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Prepare(a) => {
            let t = Instant::now();
            let summary = corpus::prepare(&corpus::PrepareOptions {
                corpus: a.corpus,
                out: a.out.clone(),
                count: a.count,
                synth_per_language: a.synth,
                src: a.src,
                seed: a.seed,
                force: a.force,
                install: !a.no_install,
                max_bad_fraction: a.max_bad_fraction,
            })?;
            print!("{}", summary.table());
            println!(
                "dataset: {}  ({:.1} s)",
                a.out.display(),
                t.elapsed().as_secs_f64()
            );
        }
        DataCommand::Fbank { input, out } => {
            let a =
                audio::read_wav(&input).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let rate = a.sample_rate;
            let samples = audio::resample(&a.into_mono(), rate, audio::SAMPLE_RATE);
            let fb = fbank::Fbank::new(fbank::FbankOptions::default());
            let feats = fb.compute(&samples, &mut rand::rng());
            let frames = feats.len() / fb.dim();
            npy::write_f32_2d(&out, &feats, frames, fb.dim())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{frames} x {} -> {}", fb.dim(), out.display());
        }
        DataCommand::Check(a) => check(a)?,
    }
    Ok(())
}

fn check(a: CheckArgs) -> Result<()> {
    let list = if a.data.is_dir() {
        a.data.join("data.list")
    } else {
        a.data.clone()
    };
    let split_dir = list.parent().unwrap_or(Path::new("."));
    let units_path = a
        .units
        .unwrap_or_else(|| split_dir.join("..").join("units.txt"));
    let units = Arc::new(Units::load(&units_path)?);
    let conf: DatasetConf = match &a.config {
        Some(p) => serde_yaml::from_str(&std::fs::read_to_string(p)?)
            .with_context(|| format!("{}: dataset_conf", p.display()))?,
        None => DatasetConf::default(),
    };
    let shard = loader::Shard {
        rank: 0,
        world: a.world,
    };
    let l = loader::DataLoader::new(&list, units, conf, loader::Mode::Train, shard, 0)?;
    let plan = l.plan(0)?;
    println!("{}", plan.report.summary());
    println!(
        "batches per rank: {} (own shards: {:?}; ranks with fewer repeat their first batches)",
        plan.batches_per_rank, plan.own_batches
    );
    if a.iterate {
        let t = Instant::now();
        let (mut frames, mut n) = (0usize, 0usize);
        for b in l.epoch(0)? {
            let b = b?;
            frames += b.num_frames;
            n += 1;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "rank 0: {n} batches, {frames} frames in {s:.2} s ({:.0} frames/s)",
            frames as f64 / s
        );
    }
    Ok(())
}
