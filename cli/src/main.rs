//! The `upcycle` command: one module per subcommand group, each holding its arguments
//! and its dispatch; the libraries below (`upcycle-trainer`, `upcycle-launch`) know
//! nothing of the command line.

// The arguments' doc comments are `--help` text, where `<split>` and `<r>` are placeholders,
// not HTML.
#![allow(rustdoc::invalid_html_tags)]

mod bench;
mod convert;
mod cuda;
mod data;
mod device;
mod eval;
mod inspect;
mod launch;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use upcycle_parallel::failure::CollectiveFailed;
use upcycle_parallel::watchdog::TIMEOUT_EXIT;

/// Train Mixture-of-Experts speech recognizers upcycled from dense checkpoints.
#[derive(Parser)]
#[command(name = "upcycle", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare and inspect speech data.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a model on a prepared dataset.
    Train(train::TrainArgs),
    /// Decode a data set with every method and chunk setting; print and write CER/WER and RTF.
    Eval(eval::EvalArgs),
    /// Transcribe audio files.
    Transcribe(eval::TranscribeArgs),
    /// Time parts of the pipeline (see bench/ for side-by-side runs with the peers).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Convert checkpoints (dense -> MoE, WeNet import/export).
    #[command(subcommand)]
    Convert(convert::ConvertCommand),
    /// Look into checkpoints and runs.
    #[command(subcommand)]
    Inspect(inspect::InspectCommand),
    /// Plots (training curves, expert load, comparison) and a Markdown summary of runs.
    Report(inspect::ReportArgs),
    /// Run a command on N supervised workers (torchrun-style; restarts from the latest
    /// checkpoint on failure), a staged plan, or write a cluster job script.
    Launch(launch::LaunchArgs),
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
    if let Err(e) = cuda::load() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    upcycle_parallel::watchdog::on_expiry(|expired| {
        eprintln!(
            "error: {expired} Stopping (exit {TIMEOUT_EXIT}) so that the job can restart from \
             its last checkpoint."
        );
        std::process::exit(TIMEOUT_EXIT);
    });
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(exit_code(&e));
    }
}

/// The exit status for an error: what the launcher contract gives its kind (a failed
/// expert-parallel exchange: 3), else 1. (`upcycle launch` exits with its worker's status,
/// a collective's deadline with [`TIMEOUT_EXIT`].)
fn exit_code(e: &anyhow::Error) -> i32 {
    let failed = e.chain().any(|c| c.is::<CollectiveFailed>());
    if failed {
        CollectiveFailed::EXIT_CODE
    } else {
        1
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(c) => data::run(c),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run_eval(a),
        Command::Transcribe(a) => eval::run_transcribe(a),
        Command::Bench(c) => bench::run(c),
        Command::Convert(c) => convert::run(c),
        Command::Inspect(c) => inspect::run(c),
        Command::Report(a) => inspect::run_report(a),
        Command::Launch(a) => launch::run(a),
    }
}
