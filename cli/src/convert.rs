//! `upcycle convert`: dense -> MoE, consolidate, (re)shard, WeNet import and export.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use upcycle_model::upcycle::Method;
use upcycle_trainer::convert;

#[derive(Subcommand)]
pub(crate) enum ConvertCommand {
    /// Dense -> MoE: every feed-forward network becomes experts made from it (--method),
    /// with fresh routers; copy and granular compute the parent's outputs at step 0.
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
pub(crate) struct LayoutArgs {
    /// A checkpoint (or a run / checkpoints directory: its latest).
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// Workers of the new layout.
    #[arg(long)]
    pub(crate) world: usize,
    /// Expert-parallel size of the new layout (divides world and every n_expert).
    #[arg(long, default_value_t = 1)]
    pub(crate) ep: usize,
    /// The new checkpoints directory.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Args)]
pub(crate) struct ImportWenetArgs {
    /// WeNet's model: MODEL.pt (torch.save(model.state_dict())) or MODEL.safetensors.
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// The train.yaml it was trained with.
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// Its units (default: units.txt beside the checkpoint, else beside the config).
    #[arg(long)]
    pub(crate) units: Option<PathBuf>,
    /// Its global_cmvn JSON (default: made from the checkpoint's CMVN buffers).
    #[arg(long)]
    pub(crate) cmvn: Option<PathBuf>,
    /// Where to write our checkpoint (a new directory: gets step-0/ and latest).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Args)]
pub(crate) struct ExportWenetArgs {
    /// Our checkpoint (a run, its checkpoints/ directory or a step-N directory).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Where to write the WeNet model (a new directory).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Also write final.safetensors.
    #[arg(long)]
    pub(crate) safetensors: bool,
}

#[derive(Args)]
pub(crate) struct UpcycleArgs {
    /// The dense checkpoint: a run or its checkpoints/ directory (its latest: where the
    /// parent stopped), a pointer such as runs/x/checkpoints/best, or a step-N directory.
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// Where to write the MoE checkpoint (a new directory: gets step-0/ and latest).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Experts per MoE layer.
    #[arg(long, default_value_t = 8)]
    pub(crate) experts: i64,
    /// Experts each token goes to.
    #[arg(long, default_value_t = 2)]
    pub(crate) top_k: i64,
    /// How experts are made from the parent's network: copy (exact copies), noise
    /// (copies times 1 + S N(0,1)), drop (Drop-Upcycling: a fraction of each expert's
    /// hidden units re-initialised) or granular (each expert 1/G of the hidden units).
    #[arg(long, default_value = "copy")]
    pub(crate) method: String,
    /// --method noise: relative standard deviation S of the noise [default: 0.01].
    #[arg(long)]
    pub(crate) noise: Option<f64>,
    /// --method drop: fraction of each expert's hidden units re-initialised [default: 0.5].
    #[arg(long)]
    pub(crate) drop_ratio: Option<f64>,
    /// --method granular: G, experts per copy of the parent, each of linear_units / G
    /// hidden units (--experts and --top-k multiples of G; --top-k G keeps the parent's
    /// active FLOPs).
    #[arg(long)]
    pub(crate) granularity: Option<i64>,
    /// Routing (moe_conf.router): topk_softmax (WeNet's) or softmax_topk (softmax over
    /// all experts, top-k, times E/k; allows --top-k 1; with --router-init zero the child
    /// computes its parent's outputs exactly).
    #[arg(long, default_value = "topk_softmax")]
    pub(crate) router: String,
    /// Router initialisation: normal (small random, breaks the copies' symmetry), zero,
    /// or kmeans (each router's rows the k-means centroids of the tokens it sees when the
    /// parent runs on --router-data, so that every expert starts on its own cluster).
    #[arg(long, default_value = "normal")]
    pub(crate) router_init: String,
    /// --router-init kmeans: the data set (a directory from `data prepare`, or a
    /// data.list) to fit the routers on: utterances that span the training data (all
    /// its languages and speakers), e.g. a small corpus's train/, or a sample of a large
    /// one's list. Read in list order.
    #[arg(long)]
    pub(crate) router_data: Option<PathBuf>,
    /// --router-init kmeans: the first N utterances of --router-data (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) router_utterances: usize,
    /// Standard deviation of a normal router.
    #[arg(long, default_value_t = 0.02)]
    pub(crate) router_std: f64,
    /// Keep the decoder's feed-forward networks dense.
    #[arg(long)]
    pub(crate) encoder_only: bool,
    /// Seed of the routers and the noise.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Shard the checkpoint for this many workers (any layout loads it).
    #[arg(long, default_value_t = 1)]
    pub(crate) world: usize,
    /// ... with this expert-parallel size (divides world and --experts).
    #[arg(long, default_value_t = 1)]
    pub(crate) ep: usize,
}

/// Runs one `upcycle convert` subcommand.
pub(crate) fn run(command: ConvertCommand) -> Result<()> {
    match command {
        ConvertCommand::Upcycle(a) => {
            if a.router == "softmax_topk" && a.router_init != "zero" {
                eprintln!(
                    "note: with --router softmax_topk the child reproduces its parent exactly \
                     only with --router-init zero (a {} router moves it a little)",
                    a.router_init
                );
            }
            let method = a.method.clone();
            let (dir, r) = convert::upcycle_checkpoint(&convert::UpcycleOptions {
                from: a.from,
                out: a.out,
                experts: a.experts,
                top_k: a.top_k,
                method: Method::parse(&a.method, a.noise, a.drop_ratio, a.granularity)
                    .map_err(anyhow::Error::msg)?,
                router: a.router,
                router_init: a.router_init,
                router_std: a.router_std,
                router_data: a.router_data.map(|d| (d, a.router_utterances)),
                encoder_only: a.encoder_only,
                seed: a.seed,
                layout: upcycle_trainer::checkpoint::Layout::new(a.world, a.ep),
            })?;
            let (total, active) = upcycle_trainer::inspect::parameter_counts(&dir)?;
            println!(
                "upcycled ({method}): {} expert banks filled, {} fresh routers ({} fitted by \
                 k-means), {} tensors copied; {total} parameters ({active} active per token) -> {}",
                r.banks,
                r.routers,
                r.fitted,
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
        ConvertCommand::ImportWenet(a) => {
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
        ConvertCommand::ExportWenet(a) => {
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
        ConvertCommand::Consolidate { from, out } => {
            let dir = convert::consolidate(&from, &out)?;
            println!("consolidated -> {}", dir.display());
        }
        ConvertCommand::Shard(a) | ConvertCommand::Reshard(a) => {
            let dir = convert::reshard(&a.from, a.world, a.ep, &a.out)?;
            println!("world {} ep {} -> {}", a.world, a.ep, dir.display());
        }
    }
    Ok(())
}
