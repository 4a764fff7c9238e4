//! The `upcycle` command.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use upcycle_trainer::data::{audio, config::DatasetConf, corpus, fbank, loader, npy, text::Units};

/// Train Mixture-of-Experts speech recognizers upcycled from dense checkpoints.
#[derive(Parser)]
#[command(name = "upcycle", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare and inspect speech data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Time parts of the pipeline (see bench/ for side-by-side runs with the peers).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum DataCommand {
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

#[derive(Args)]
struct PrepareArgs {
    /// Which corpus.
    #[arg(long, value_enum)]
    corpus: corpus::CorpusName,
    /// Output dataset directory.
    #[arg(long)]
    out: PathBuf,
    /// Utterances to synthesise (espeak-en).
    #[arg(long, default_value_t = 500)]
    count: usize,
    /// Your data (dir): a folder with wav.scp + text, or a data.list.
    #[arg(long)]
    src: Option<PathBuf>,
    /// Seed of the synthesis choices (espeak-en).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rebuild even if OUT already holds a complete dataset.
    #[arg(long)]
    force: bool,
    /// Do not run apt-get for missing corpus packages; print the command instead.
    #[arg(long)]
    no_install: bool,
    /// Refuse when more than this fraction of recordings cannot be converted.
    #[arg(long, default_value_t = 0.05)]
    max_bad_fraction: f64,
}

#[derive(Args)]
struct CheckArgs {
    /// A split folder holding data.list (e.g. DATA/train), or the list itself.
    #[arg(long)]
    data: PathBuf,
    /// Units file (default: units.txt beside the split folder).
    #[arg(long)]
    units: Option<PathBuf>,
    /// YAML file with WeNet's dataset_conf keys (default: upcycle's defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of data-parallel ranks to plan for.
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Iterate rank 0's batches in training mode and time them.
    #[arg(long)]
    iterate: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Filterbank frames/s on one thread over the given 16 kHz WAVs; prints JSON.
    Fbank {
        /// Input WAVs.
        files: Vec<PathBuf>,
        /// Repetitions.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(DataCommand::Prepare(a)) => {
            let t = Instant::now();
            let summary = corpus::prepare(&corpus::PrepareOptions {
                corpus: a.corpus,
                out: a.out.clone(),
                count: a.count,
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
        Command::Data(DataCommand::Fbank { input, out }) => {
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
        Command::Data(DataCommand::Check(a)) => check(a)?,
        Command::Bench(BenchCommand::Fbank { files, repeat }) => {
            let timing = upcycle_trainer::bench::fbank(&files, repeat)?;
            println!("{}", serde_json::to_string(&timing)?);
        }
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
