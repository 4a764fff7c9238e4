//! `upcycle train`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use upcycle_trainer::train::{self, TrainOptions};

use crate::device::device;

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// Training configuration (WeNet train.yaml keys; see configs/).
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// Dataset directory from `upcycle data prepare`.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Output directory (metrics.jsonl, checkpoints/, train.yaml).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Stop after this many optimizer steps (overrides upcycle_conf.max_steps).
    #[arg(long)]
    pub(crate) max_steps: Option<u64>,
    /// Stop after this many minutes (overrides upcycle_conf.max_minutes).
    #[arg(long)]
    pub(crate) max_minutes: Option<f64>,
    /// cpu, cuda, or auto (a GPU when there is one).
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// Start from this checkpoint's weights (step 0, fresh optimizer): a dense parent to
    /// continue, or its MoE child from `convert upcycle`. A run or checkpoints/ directory
    /// gives its latest; name runs/x/checkpoints/best for the best one.
    #[arg(long)]
    pub(crate) init: Option<PathBuf>,
    /// Expert-parallel size: workers (started by `mpirun -np N`) that share one copy of
    /// the experts; it must divide N and every n_expert.
    #[arg(long, default_value_t = 1)]
    pub(crate) ep: usize,
    /// Continue a run exactly from this checkpoint (or training output: its latest):
    /// weights, optimizer, data position and schedule, on any number of workers. Without
    /// it, a run whose --out already holds checkpoints continues from the latest.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
}

/// Trains; prints the steps, time, dev CER and last checkpoint.
pub(crate) fn run(a: TrainArgs) -> Result<()> {
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
        report
            .best_dev_cer
            .map_or("-".into(), |c| format!("{c:.2}%")),
        report.last_checkpoint.display()
    );
    Ok(())
}
