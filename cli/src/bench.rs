//! `upcycle bench`: timings of parts of the pipeline (bench/ runs them beside the peers).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;

use crate::device::device;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
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

/// Runs one benchmark; prints its JSON.
pub(crate) fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::TrainStep {
            config,
            list,
            utts,
            steps,
            warmup,
            threads,
            lr,
            device: device_name,
        } => {
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
        BenchCommand::MoeLayer {
            tokens,
            d,
            hidden,
            experts,
            top_k,
            compute,
            steps,
            warmup,
            threads,
        } => {
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
        BenchCommand::Collectives {
            sizes,
            autograd_sizes,
            repeat,
        } => {
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
        BenchCommand::Checkpoint {
            config,
            synthetic_mib,
            repeat,
            dir,
        } => {
            std::fs::create_dir_all(&dir)?;
            let (io, stall) =
                upcycle_trainer::bench::checkpoint_io(&config, synthetic_mib, repeat, &dir)?;
            println!("{}", serde_json::json!({"io": io, "stall": stall}));
        }
        BenchCommand::Fbank { files, repeat } => {
            let timing = upcycle_trainer::bench::fbank(&files, repeat)?;
            println!("{}", serde_json::to_string(&timing)?);
        }
    }
    Ok(())
}
