//! The `upcycle` command.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use upcycle_trainer::convert;
use upcycle_trainer::data::{audio, config::DatasetConf, corpus, fbank, loader, npy, text::Units};
use upcycle_trainer::eval::{self, DecodeOptions, Method};
use upcycle_trainer::train::{self, TrainOptions};

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
    /// Train a model on a prepared dataset.
    Train(TrainArgs),
    /// Decode a data set with every method and chunk setting; print and write CER/WER and RTF.
    Eval(EvalArgs),
    /// Transcribe audio files.
    Transcribe(TranscribeArgs),
    /// Time parts of the pipeline (see bench/ for side-by-side runs with the peers).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Convert checkpoints (dense -> MoE, WeNet import/export).
    #[command(subcommand)]
    Convert(ConvertCommand),
    /// Look into checkpoints and runs.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Plots (training curves, expert load, comparison) and a Markdown summary of runs.
    Report(ReportArgs),
    /// Run a command on N supervised workers (torchrun-style; restarts from the latest
    /// checkpoint on failure), a staged plan, or write a cluster job script.
    Launch(LaunchArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    /// Workers under one `mpirun` job (CPU; on GPUs they still talk NCCL). One node.
    Mpi,
    /// Workers spawned directly, talking over TCP through the launcher's rendezvous (CPU;
    /// no MPI needed; one launcher per node).
    Tcp,
    /// Workers spawned directly, one GPU each, talking NCCL (its id through the
    /// launcher's rendezvous; one launcher per node).
    Nccl,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EmitKind {
    /// An sbatch script whose workers `srun` starts.
    Slurm,
    /// A script that starts the workers with `mpirun --hostfile`.
    Mpirun,
}

#[derive(Args)]
struct LaunchArgs {
    /// Workers on this node (default 1; with --emit, the workers per node of the script).
    #[arg(long)]
    nproc_per_node: Option<usize>,
    /// Nodes, each with its own launcher (--backend tcp or nccl; give each --node-rank and
    /// the same UPCYCLE_RDZV_TOKEN); with --emit, the nodes of the job script.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0 to nnodes-1 (node 0's launcher hosts the rendezvous store).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Restarts of the whole group after a worker fails (each from the latest checkpoint).
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// How workers talk.
    #[arg(long, value_enum, default_value = "mpi")]
    backend: BackendArg,
    /// MASTER_ADDR given to the workers: node 0, where the rendezvous store listens.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// MASTER_PORT given to the workers: the rendezvous store's port (0: any free one, on
    /// one node).
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// Node 0: the address its rendezvous store listens on (default: --master-addr;
    /// 0.0.0.0 for every interface).
    #[arg(long)]
    store_bind: Option<String>,
    /// Seconds the launchers wait for each other (joining, restarting together).
    #[arg(long, default_value_t = 600.0)]
    join_timeout_s: f64,
    /// Also write each rank's output to DIR/rank-<r>.log.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when stopping workers.
    #[arg(long, default_value_t = 10.0)]
    stop_grace_s: f64,
    /// Run the stages of this plan file (see launch/README.md) instead of one command.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Write a job script for the command or plan instead of running it.
    #[arg(long, value_enum)]
    emit: Option<EmitKind>,
    /// Where --emit writes the script (default: standard output).
    #[arg(long)]
    script: Option<PathBuf>,
    /// --emit slurm: GPUs per node.
    #[arg(long, default_value_t = 0)]
    gpus_per_node: usize,
    /// --emit: the job's name.
    #[arg(long, default_value = "upcycle")]
    job_name: String,
    /// --emit slurm: time limit (sbatch --time).
    #[arg(long)]
    time: Option<String>,
    /// --emit slurm: partition.
    #[arg(long)]
    partition: Option<String>,
    /// The upcycle subcommand the workers run, after `--` (e.g. `-- train --config ...`).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct ReportArgs {
    /// Run directories (the --out of `upcycle train`), as RUN_DIR or NAME=RUN_DIR; with
    /// several, OUT gets a comparison plot and one folder per run.
    #[arg(required = true)]
    runs: Vec<String>,
    /// Output folder.
    #[arg(long, default_value = "report")]
    out: PathBuf,
    /// CHILD=PARENT: run CHILD started from PARENT's last checkpoint; draw it after
    /// PARENT (steps and wall time), as the UME comparison counts the parent's cost.
    #[arg(long)]
    after: Vec<String>,
}

/// `NAME=RUN_DIR` or `RUN_DIR` (named after its last component).
fn run_row(arg: &str) -> upcycle_trainer::inspect::RunRow {
    match arg.split_once('=') {
        Some((name, dir)) => upcycle_trainer::inspect::RunRow {
            name: name.into(),
            dir: dir.into(),
        },
        None => {
            let dir = PathBuf::from(arg);
            let name = dir.components().next_back().map_or(arg.to_string(), |c| {
                c.as_os_str().to_string_lossy().to_string()
            });
            upcycle_trainer::inspect::RunRow { name, dir }
        }
    }
}

#[derive(Subcommand)]
enum InspectCommand {
    /// The load table of every MoE layer of a checkpoint on a data set.
    Routing {
        /// Checkpoint (a run's checkpoints/ directory or a step-N directory).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Data set directory or data.list.
        #[arg(long)]
        data: PathBuf,
        /// Utterances to route (0: all).
        #[arg(long, default_value_t = 0)]
        utterances: usize,
        /// Chunk size (0: full context).
        #[arg(long, default_value_t = 0)]
        chunk: i64,
    },
    /// What a checkpoint holds: step, layout, files, parameters, per-expert norms (every
    /// checksum is verified on the way).
    Checkpoint {
        /// A checkpoint, a run's checkpoints/ directory or a run directory (its latest).
        checkpoint: PathBuf,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// A Markdown table comparing finished runs (NAME=RUN_DIR, each evaluated into
    /// RUN_DIR/eval-test): parameters, training time, test CER and RTF.
    Runs {
        /// NAME=RUN_DIR pairs.
        runs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConvertCommand {
    /// Dense -> MoE: every feed-forward network becomes experts that are copies of it,
    /// with fresh routers; the result computes its parent's outputs at step 0.
    Upcycle(UpcycleArgs),
    /// Sharded -> one safetensors file (whole experts) with train.yaml, units.txt,
    /// global_cmvn and state.json, in a new directory.
    Consolidate {
        /// A checkpoint (or a run / checkpoints directory: its latest).
        #[arg(long)]
        from: PathBuf,
        /// The new directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Consolidated (or any checkpoint) -> sharded for WORLD workers with expert
    /// parallelism EP (a new checkpoints directory with step-N/ and latest).
    Shard(LayoutArgs),
    /// A sharded checkpoint -> another layout, optimizer state included (resuming does
    /// this by itself at load; this writes it out).
    Reshard(LayoutArgs),
    /// A WeNet checkpoint (torch.save state dict or safetensors, and its train.yaml) ->
    /// our checkpoint; read without running any pickle code.
    ImportWenet(ImportWenetArgs),
    /// Our checkpoint -> a WeNet model directory: final.pt, train.yaml, units.txt,
    /// global_cmvn.
    ExportWenet(ExportWenetArgs),
}

#[derive(Args)]
struct LayoutArgs {
    /// A checkpoint (or a run / checkpoints directory: its latest).
    #[arg(long)]
    from: PathBuf,
    /// Workers of the new layout.
    #[arg(long)]
    world: usize,
    /// Expert-parallel size of the new layout (divides world and every n_expert).
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// The new checkpoints directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ImportWenetArgs {
    /// WeNet's model: MODEL.pt (torch.save(model.state_dict())) or MODEL.safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The train.yaml it was trained with.
    #[arg(long)]
    config: PathBuf,
    /// Its units (default: units.txt beside the checkpoint, else beside the config).
    #[arg(long)]
    units: Option<PathBuf>,
    /// Its global_cmvn JSON (default: made from the checkpoint's CMVN buffers).
    #[arg(long)]
    cmvn: Option<PathBuf>,
    /// Where to write our checkpoint (a new directory: gets step-0/ and latest).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ExportWenetArgs {
    /// Our checkpoint (a run, its checkpoints/ directory or a step-N directory).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Where to write the WeNet model (a new directory).
    #[arg(long)]
    out: PathBuf,
    /// Also write final.safetensors.
    #[arg(long)]
    safetensors: bool,
}

#[derive(Args)]
struct UpcycleArgs {
    /// The dense checkpoint: a run or its checkpoints/ directory (its latest: where the
    /// parent stopped), a pointer such as runs/x/checkpoints/best, or a step-N directory.
    #[arg(long)]
    from: PathBuf,
    /// Where to write the MoE checkpoint (a new directory: gets step-0/ and latest).
    #[arg(long)]
    out: PathBuf,
    /// Experts per MoE layer.
    #[arg(long, default_value_t = 8)]
    experts: i64,
    /// Experts each token goes to.
    #[arg(long, default_value_t = 2)]
    top_k: i64,
    /// Relative Gaussian noise on each expert copy (0 keeps the parent's outputs exact).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    /// Router initialisation: normal (small random, breaks the copies' symmetry) or zero.
    #[arg(long, default_value = "normal")]
    router_init: String,
    /// Standard deviation of a normal router.
    #[arg(long, default_value_t = 0.02)]
    router_std: f64,
    /// Keep the decoder's feed-forward networks dense.
    #[arg(long)]
    encoder_only: bool,
    /// Seed of the routers and the noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shard the checkpoint for this many workers (any layout loads it).
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// ... with this expert-parallel size (divides world and --experts).
    #[arg(long, default_value_t = 1)]
    ep: usize,
}

#[derive(Args)]
struct TrainArgs {
    /// Training configuration (WeNet train.yaml keys; see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Dataset directory from `upcycle data prepare`.
    #[arg(long)]
    data: PathBuf,
    /// Output directory (metrics.jsonl, checkpoints/, train.yaml).
    #[arg(long)]
    out: PathBuf,
    /// Stop after this many optimizer steps (overrides upcycle_conf.max_steps).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Stop after this many minutes (overrides upcycle_conf.max_minutes).
    #[arg(long)]
    max_minutes: Option<f64>,
    /// cpu, cuda, or auto (a GPU when there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Start from this checkpoint's weights (step 0, fresh optimizer): a dense parent to
    /// continue, or its MoE child from `convert upcycle`. A run or checkpoints/ directory
    /// gives its latest; name runs/x/checkpoints/best for the best one.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Expert-parallel size: workers (started by `mpirun -np N`) that share one copy of
    /// the experts; it must divide N and every n_expert.
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Continue a run exactly from this checkpoint (or training output: its latest):
    /// weights, optimizer, data position and schedule, on any number of workers. Without
    /// it, a run whose --out already holds checkpoints continues from the latest.
    #[arg(long)]
    resume: Option<PathBuf>,
}

#[derive(Args)]
struct DecodeArgs {
    /// Decoding methods (default: all three).
    #[arg(long = "mode", value_enum)]
    modes: Vec<Method>,
    /// Chunk sizes after subsampling; 0 is full context (default: 0 and 16).
    #[arg(long = "chunk")]
    chunks: Vec<i64>,
    /// Left chunks visible in chunked decoding (-1: all).
    #[arg(long, default_value_t = -1)]
    left_chunks: i64,
    /// Beam of the CTC prefix search.
    #[arg(long, default_value_t = 10)]
    beam: usize,
    /// CTC weight in attention rescoring.
    #[arg(long, default_value_t = 0.3)]
    ctc_weight: f64,
    /// Right-to-left decoder weight in attention rescoring (default: the model's reverse_weight).
    #[arg(long)]
    reverse_weight: Option<f64>,
    /// cpu, cuda, or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, or bf16 (encoder and decoders under bfloat16 autocast; scores in fp32).
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    precision: upcycle_model::precision::Precision,
}

fn parse_precision(s: &str) -> Result<upcycle_model::precision::Precision, String> {
    serde_yaml::from_str(s).map_err(|_| format!("{s:?}: expected fp32 or bf16"))
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint directory, a training output directory (its best checkpoint), or a
    /// pointer such as runs/x/checkpoints/latest.
    #[arg(long)]
    checkpoint: PathBuf,
    /// A split folder with data.list (e.g. DATA/test), or the list.
    #[arg(long)]
    data: PathBuf,
    /// Where hypotheses and reports go (default: CHECKPOINT/eval-<split>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    decode: DecodeArgs,
}

#[derive(Args)]
struct TranscribeArgs {
    /// A checkpoint directory, or a training output directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Audio files (WAV, any rate).
    files: Vec<PathBuf>,
    #[command(flatten)]
    decode: DecodeArgs,
}

fn device(name: &str) -> Result<tch::Device> {
    match name {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "--device cuda: no CUDA device is visible to libtorch"
            );
            Ok(tch::Device::Cuda(0))
        }
        "auto" => Ok(tch::Device::cuda_if_available()),
        other => anyhow::bail!("--device {other:?}: expected cpu, cuda or auto"),
    }
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
    /// Sharded checkpoint save/load of a model's tensors (with moments) and of a large
    /// synthetic set against plain file write/read of the same bytes, and the training
    /// stall of a foreground and a background save; prints JSON (bench/checkpoint.py).
    Checkpoint {
        /// Model configuration (its parameters and AdamW-shaped moments are saved).
        #[arg(long, default_value = "configs/small-upcycle.yaml")]
        config: PathBuf,
        /// MiB of synthetic tensors.
        #[arg(long, default_value_t = 1024)]
        synthetic_mib: usize,
        /// Repetitions of each.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Where to write (the disk measured).
        #[arg(long, default_value = "target/bench-checkpoint")]
        dir: PathBuf,
    },
    /// All-reduce and uneven all-to-all through `parallel/` against raw MPI calls on the
    /// same sizes, and the autograd all-to-all's cost; run under `mpirun -np 2`, rank 0
    /// prints JSON (bench/collectives.py prints the table).
    Collectives {
        /// Bytes per rank.
        #[arg(long, value_delimiter = ',', default_values_t = [65536usize, 1 << 20, 16 << 20, 64 << 20])]
        sizes: Vec<usize>,
        /// Bytes per rank of the autograd comparison.
        #[arg(long, value_delimiter = ',', default_values_t = [65536usize, 1 << 20])]
        autograd_sizes: Vec<usize>,
        /// Timed repetitions each way (interleaved).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Training-step frames/s and peak memory on a fixed batch; prints JSON (bench/train_step.py runs it beside PyTorch).
    TrainStep {
        /// Training configuration.
        #[arg(long)]
        config: PathBuf,
        /// A data.list (its units.txt is read from the dataset folder above it).
        #[arg(long)]
        list: PathBuf,
        /// Utterances in the batch.
        #[arg(long, default_value_t = 16)]
        utts: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// libtorch threads (0: default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Constant learning rate of the timed AdamW steps.
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
    },
    /// Forward + backward of one MoE feed-forward layer on random tokens; prints JSON
    /// (bench/moe_layer.py runs it beside WeNet's loop over experts).
    MoeLayer {
        /// Tokens per pass.
        #[arg(long, default_value_t = 4096)]
        tokens: i64,
        /// Model width.
        #[arg(long, default_value_t = 144)]
        d: i64,
        /// Expert hidden width.
        #[arg(long, default_value_t = 576)]
        hidden: i64,
        /// Experts.
        #[arg(long, default_value_t = 8)]
        experts: i64,
        /// Experts per token.
        #[arg(long, default_value_t = 2)]
        top_k: i64,
        /// grouped_mm, bmm or loop.
        #[arg(long, default_value = "grouped_mm")]
        compute: String,
        /// Timed passes.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed passes first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// libtorch threads (0: default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
    },
    /// Filterbank frames/s on one thread over the given 16 kHz WAVs; prints JSON.
    Fbank {
        /// Input WAVs.
        files: Vec<PathBuf>,
        /// Repetitions.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

/// Keeps freed memory in the process for the next step instead of returning it to the
/// system. glibc serves every allocation above 32 MiB with a fresh mapping, and a
/// training step's large activations (the subsampling's outputs are hundreds of MB)
/// then page-fault in and are zeroed again every step: 2.7M minor faults and 6 s of
/// system time in 5 steps of the `small` model, 0.55M and 1.2 s with this (peak
/// memory +10%). `UPCYCLE_SYSTEM_MALLOC=1` leaves glibc's defaults.
fn keep_freed_memory() {
    if std::env::var_os("UPCYCLE_SYSTEM_MALLOC").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: mallopt only sets glibc allocator parameters; called before any thread
    // starts. Allocations on other threads that do not fit their arena still get a
    // mapping (glibc falls back to mmap there whatever M_MMAP_MAX says).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
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
        Command::Launch(a) => {
            if let Err(e) = launch(a) {
                eprintln!("error: {e}");
                std::process::exit(e.exit_code());
            }
        }
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
        Command::Train(a) => {
            let report = train::train(&TrainOptions {
                config: a.config,
                data: a.data,
                out: a.out.clone(),
                max_steps: a.max_steps,
                max_minutes: a.max_minutes,
                device: device(&a.device)?,
                init: a.init,
                ep: a.ep,
                resume: a.resume,
            });
            // Every rank finalises MPI (a no-op in one process), error or not.
            upcycle_parallel::collective::finalize_mpi();
            let report = report?;
            println!(
                "trained {} steps in {:.1} min; dev CER (CTC greedy) last {} best {}; checkpoint {}",
                report.steps,
                report.seconds / 60.0,
                report.dev_cer.map_or("-".into(), |c| format!("{c:.2}%")),
                report.best_dev_cer.map_or("-".into(), |c| format!("{c:.2}%")),
                report.last_checkpoint.display()
            );
        }
        Command::Convert(ConvertCommand::Upcycle(a)) => {
            let (dir, r) = convert::upcycle_checkpoint(&convert::UpcycleOptions {
                from: a.from,
                out: a.out,
                experts: a.experts,
                top_k: a.top_k,
                noise: a.noise,
                router_init: a.router_init,
                router_std: a.router_std,
                encoder_only: a.encoder_only,
                seed: a.seed,
                layout: upcycle_trainer::checkpoint::Layout::new(a.world, a.ep),
            })?;
            let (total, active) = upcycle_trainer::inspect::parameter_counts(&dir)?;
            println!(
                "upcycled: {} expert banks filled, {} fresh routers, {} tensors copied; \
                 {total} parameters ({active} active per token) -> {}",
                r.banks,
                r.routers,
                r.copied,
                dir.display()
            );
            if !r.unused.is_empty() {
                println!(
                    "dense networks not copied (their blocks share another block's bank): {}",
                    r.unused.join(", ")
                );
            }
        }
        Command::Convert(ConvertCommand::ImportWenet(a)) => {
            let dir = convert::wenet::import_wenet(&convert::wenet::ImportOptions {
                checkpoint: a.checkpoint,
                config: a.config,
                units: a.units,
                cmvn: a.cmvn,
                out: a.out,
            })?;
            let (total, active) = upcycle_trainer::inspect::parameter_counts(&dir)?;
            println!(
                "imported: {total} parameters ({active} active per token) -> {}",
                dir.display()
            );
        }
        Command::Convert(ConvertCommand::ExportWenet(a)) => {
            let dir = convert::wenet::export_wenet(&convert::wenet::ExportOptions {
                checkpoint: a.checkpoint,
                out: a.out,
                safetensors: a.safetensors,
            })?;
            println!(
                "exported: {} (final.pt, train.yaml, units.txt, global_cmvn)",
                dir.display()
            );
        }
        Command::Inspect(InspectCommand::Routing {
            checkpoint,
            data,
            utterances,
            chunk,
        }) => {
            print!(
                "{}",
                upcycle_trainer::inspect::routing_table(&checkpoint, &data, utterances, chunk)?
            );
        }
        Command::Convert(ConvertCommand::Consolidate { from, out }) => {
            let dir = convert::consolidate(&from, &out)?;
            println!("consolidated -> {}", dir.display());
        }
        Command::Convert(ConvertCommand::Shard(a) | ConvertCommand::Reshard(a)) => {
            let dir = convert::reshard(&a.from, a.world, a.ep, &a.out)?;
            println!("world {} ep {} -> {}", a.world, a.ep, dir.display());
        }
        Command::Inspect(InspectCommand::Checkpoint { checkpoint, json }) => {
            let s = upcycle_trainer::inspect::checkpoint_summary(&checkpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", upcycle_trainer::inspect::checkpoint_text(&s));
            }
        }
        Command::Inspect(InspectCommand::Runs { runs }) => {
            let rows = runs
                .iter()
                .map(|r| {
                    let (name, dir) = r.split_once('=').with_context(|| {
                        format!("{r:?}: expected NAME=RUN_DIR, e.g. upcycled=runs/ume/b-upcycled")
                    })?;
                    Ok(upcycle_trainer::inspect::RunRow {
                        name: name.into(),
                        dir: dir.into(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            print!("{}", upcycle_trainer::inspect::runs_table(&rows)?);
        }
        Command::Report(a) => {
            let after = a
                .after
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(c, p)| (c.to_string(), p.to_string()))
                        .with_context(|| {
                            format!("--after {p:?}: expected CHILD=PARENT, e.g. upcycled=parent")
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let files = upcycle_trainer::report::report(&upcycle_trainer::report::ReportOptions {
                runs: a.runs.iter().map(|r| run_row(r)).collect(),
                out: a.out,
                after,
            })?;
            for f in files {
                println!("{}", f.display());
            }
        }
        Command::Eval(a) => {
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
        }
        Command::Transcribe(a) => {
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
        }
        Command::Bench(BenchCommand::TrainStep {
            config,
            list,
            utts,
            steps,
            warmup,
            threads,
            lr,
            device: device_name,
        }) => {
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let timing = upcycle_trainer::bench::train_step(
                &config,
                &list,
                utts,
                steps,
                warmup,
                lr,
                device(&device_name)?,
            )?;
            println!("{}", serde_json::to_string(&timing)?);
        }
        Command::Bench(BenchCommand::MoeLayer {
            tokens,
            d,
            hidden,
            experts,
            top_k,
            compute,
            steps,
            warmup,
            threads,
        }) => {
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let shape = upcycle_trainer::bench::MoeLayerShape {
                tokens,
                d,
                hidden,
                experts,
                k: top_k,
            };
            let timing = upcycle_trainer::bench::moe_layer(shape, &compute, steps, warmup)?;
            println!("{}", serde_json::to_string(&timing)?);
        }
        Command::Bench(BenchCommand::Collectives {
            sizes,
            autograd_sizes,
            repeat,
        }) => {
            use upcycle_parallel::collective::{Collective, MpiCollective};
            let world: Arc<dyn Collective> = Arc::new(MpiCollective::world()?);
            let collectives = upcycle_parallel::bench::collectives(world.as_ref(), &sizes, repeat);
            let autograd: Vec<_> = autograd_sizes
                .iter()
                .map(|&b| upcycle_parallel::bench::autograd_cost(world.clone(), b, repeat))
                .collect();
            if world.rank() == 0 {
                let json = serde_json::json!({
                    "ranks": world.size(),
                    "collectives": collectives,
                    "autograd": autograd,
                });
                println!("{json}");
            }
            drop(world);
            upcycle_parallel::collective::finalize_mpi();
        }
        Command::Bench(BenchCommand::Checkpoint {
            config,
            synthetic_mib,
            repeat,
            dir,
        }) => {
            std::fs::create_dir_all(&dir)?;
            let (io, stall) =
                upcycle_trainer::bench::checkpoint_io(&config, synthetic_mib, repeat, &dir)?;
            println!("{}", serde_json::json!({"io": io, "stall": stall}));
        }
        Command::Bench(BenchCommand::Fbank { files, repeat }) => {
            let timing = upcycle_trainer::bench::fbank(&files, repeat)?;
            println!("{}", serde_json::to_string(&timing)?);
        }
    }
    Ok(())
}

/// `upcycle launch`: its own exit statuses (the failing worker's), hence its own error type.
fn launch(a: LaunchArgs) -> std::result::Result<(), upcycle_launch::LaunchError> {
    use upcycle_launch::{emit, plan::Plan, Backend, LaunchError, LaunchSpec};
    let invalid = |m: &str| Err(LaunchError::Invalid(m.into()));
    let program = std::env::current_exe().map_err(|source| LaunchError::Spawn {
        what: "the upcycle binary's own path".into(),
        source,
    })?;
    let plan =
        match (&a.plan, a.command.is_empty()) {
            (Some(_), false) => return invalid(
                "--plan and a command after `--` were both given: the plan names its commands; \
                 give one of them",
            ),
            (None, true) => {
                return invalid(
                    "nothing to launch: give a command after `--` (e.g. `upcycle launch \
                 --nproc-per-node 2 -- train --config C --data D --out O`) or --plan FILE",
                )
            }
            (Some(p), true) => Some(Plan::load(p)?),
            (None, false) => None,
        };
    if a.command
        .first()
        .is_some_and(|c| c == "launch" || c == "upcycle")
    {
        return invalid(
            "the command after `--` is an upcycle subcommand (train, eval, convert ...), \
             not `launch` or `upcycle`",
        );
    }
    let nproc = a.nproc_per_node.unwrap_or(1);
    let backend = match a.backend {
        BackendArg::Mpi => Backend::Mpi,
        BackendArg::Tcp => Backend::Tcp,
        BackendArg::Nccl => Backend::Nccl,
    };
    if let Some(kind) = a.emit {
        let (stages, state_dir) = match &plan {
            Some(p) => (
                emit::plan_stages(p),
                p.out.join("job-state").display().to_string(),
            ),
            None => (
                vec![emit::ScriptStage {
                    name: a.command[0].clone(),
                    nproc: nproc * a.nnodes,
                    args: a.command.clone(),
                }],
                "upcycle-job-state".into(),
            ),
        };
        let script = emit::job_script(
            &stages,
            &emit::JobOptions {
                kind: match kind {
                    EmitKind::Slurm => emit::ScriptKind::Slurm,
                    EmitKind::Mpirun => emit::ScriptKind::Mpirun,
                },
                job_name: a.job_name,
                nproc_per_node: a.nproc_per_node,
                gpus_per_node: a.gpus_per_node,
                time: a.time,
                partition: a.partition,
                max_restarts: plan.as_ref().map_or(a.max_restarts, |p| p.max_restarts),
                upcycle: program.display().to_string(),
                state_dir,
                master_port: a.master_port,
            },
        )?;
        return match &a.script {
            Some(path) => {
                std::fs::write(path, script).map_err(|source| LaunchError::Io {
                    path: path.clone(),
                    source,
                })?;
                eprintln!("job script: {}", path.display());
                Ok(())
            }
            None => {
                print!("{script}");
                Ok(())
            }
        };
    }
    if a.nnodes > 1 && plan.is_some() {
        return invalid(&format!(
            "--nnodes {} with --plan: a plan runs on one node; run each stage as its own \
             `upcycle launch --nnodes ...` on every node, or write a job script (--emit slurm)",
            a.nnodes
        ));
    }
    if a.nnodes > 1 && matches!(a.backend, BackendArg::Mpi) {
        return invalid(&format!(
            "--nnodes {} with --backend mpi: mpirun starts every node's workers itself; use \
             --backend tcp (CPU) or --backend nccl (GPU) with one launcher per node, or write \
             a job script (--emit mpirun or --emit slurm)",
            a.nnodes
        ));
    }
    if !(a.stop_grace_s >= 0.0 && a.stop_grace_s.is_finite()) {
        return invalid("--stop-grace-s must be a number of seconds, 0 or more");
    }
    if !(a.join_timeout_s > 0.0 && a.join_timeout_s.is_finite()) {
        return invalid("--join-timeout-s must be a positive number of seconds");
    }
    upcycle_launch::install_signal_handlers();
    let mut spec = LaunchSpec::new(Vec::new(), nproc, backend.spawn(nproc)?);
    spec.max_restarts = a.max_restarts;
    spec.master_addr = a.master_addr;
    spec.master_port = a.master_port;
    spec.nnodes = a.nnodes;
    spec.node_rank = a.node_rank;
    spec.store_bind = a.store_bind;
    spec.join_timeout = std::time::Duration::from_secs_f64(a.join_timeout_s);
    spec.token = std::env::var(upcycle_parallel::store::TOKEN_VAR)
        .ok()
        .filter(|t| !t.is_empty());
    spec.log_dir = a.log_dir;
    spec.stop_grace = std::time::Duration::from_secs_f64(a.stop_grace_s);
    match plan {
        Some(p) => p.run(&program, &spec),
        None => {
            spec.command = std::iter::once(program.into_os_string())
                .chain(a.command.iter().map(Into::into))
                .collect();
            upcycle_launch::launch(&spec)
        }
    }
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
