//! The checkpoint conversion tool (`upcycle convert ...`): `upcycle`, a dense checkpoint
//! to its MoE child (UME); `consolidate`, a sharded checkpoint to one safetensors file
//! with its config, units and CMVN; `shard` and `reshard`, to a sharded checkpoint for a
//! given number of workers and expert parallelism; WeNet import/export ([`wenet`]). Every
//! command checks its input first and writes its output under a temporary name, renamed
//! when complete.

pub mod wenet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};
use upcycle_dataset::cmvn::CmvnStats;
use upcycle_dataset::loader::{DataLoader, Mode, Shard};
use upcycle_dataset::text::Units;
use upcycle_files::atomic::{self, StagedDir};
use upcycle_model::asr::AsrModel;
use upcycle_model::mask::ChunkMode;
use upcycle_model::moe::Routing;
use upcycle_model::upcycle::{kmeans_router, upcycle, Method, UpcycleReport};

use crate::checkpoint::{self, Layout, SaveRequest, TrainState};
use crate::config::TrainConfig;
use crate::optim::OptimSteps;

/// What `upcycle convert upcycle` was asked to do.
#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    /// The dense checkpoint (a run, its `checkpoints/`: the latest; a pointer such as
    /// `checkpoints/best`; or a `step-N` directory).
    pub from: PathBuf,
    /// Output checkpoint root (gets `step-0/` and `latest`); must not hold one yet.
    pub out: PathBuf,
    /// Experts per MoE layer.
    pub experts: i64,
    /// Experts per token.
    pub top_k: i64,
    /// How the experts are made from the parent's networks.
    pub method: Method,
    /// `moe_conf.router` of the child (`topk_softmax`, WeNet's, or `softmax_topk`).
    pub router: String,
    /// `normal` or `zero` router initialisation.
    pub router_init: String,
    /// Standard deviation of a `normal` router.
    pub router_std: f64,
    /// `kmeans` routers: the data set (directory or `data.list`) whose utterances the
    /// parent encodes and decodes (teacher-forced) to give each router its tokens, and
    /// how many of its utterances.
    pub router_data: Option<(PathBuf, usize)>,
    /// Leave the decoder dense.
    pub encoder_only: bool,
    /// Seed of the routers (and the noise).
    pub seed: u64,
    /// Workers and expert parallelism the checkpoint is sharded for (any layout loads it;
    /// this only decides which files hold what).
    pub layout: Layout,
}

/// Writes the upcycled checkpoint; returns its directory and what was done.
pub fn upcycle_checkpoint(o: &UpcycleOptions) -> Result<(PathBuf, UpcycleReport)> {
    if o.out.join("latest").exists() {
        bail!(
            "{}: already holds a checkpoint; choose a new --out (nothing was overwritten)",
            o.out.display()
        );
    }
    let dense = checkpoint::resolve_parent(&o.from)
        .and_then(|dir| checkpoint::load_model(&dir, Device::Cpu))
        .with_context(|| format!("--from {}", o.from.display()))?;
    let mut config = dense.config.clone();
    if config.encoder_conf.mlp_type == "moe" || config.decoder_conf.mlp_type == "moe" {
        bail!(
            "--from {}: this checkpoint is already MoE (mlp_type: moe)",
            dense.dir.display()
        );
    }
    let e = &mut config.encoder_conf;
    e.mlp_type = "moe".into();
    e.n_expert = o.experts;
    e.n_expert_activated = o.top_k;
    e.expert_linear_units = expert_units("encoder_conf", e.linear_units, o)?;
    if !o.encoder_only {
        let d = &mut config.decoder_conf;
        d.mlp_type = "moe".into();
        d.n_expert = o.experts;
        d.n_expert_activated = o.top_k;
        d.expert_linear_units = expert_units("decoder_conf", d.linear_units, o)?;
    }
    config.moe_conf.router_init = o.router_init.clone();
    config.moe_conf.router_init_std = o.router_std;
    config.moe_conf.router = o.router.clone();
    config.validate().context("the upcycled configuration")?;
    let router_data = match (o.router_init.as_str(), &o.router_data) {
        ("kmeans", None) => bail!(
            "--router-init kmeans fits the routers to the parent's tokens: name the data with \
             --router-data (e.g. the training set's directory)"
        ),
        ("kmeans", Some(data)) => Some(data),
        (init, Some(_)) => bail!(
            "--router-data is read only by --router-init kmeans (this is --router-init {init}): \
             drop it, or ask for kmeans routers"
        ),
        (_, None) => None,
    };

    tch::manual_seed(o.seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = config.build_model(&vs.root(), crate::config::vocab(&dense.units))?;
    let parent = checkpoint::read_tensors(&dense.dir)?;
    let mut report = upcycle(&parent, &vs, o.method).map_err(anyhow::Error::msg)?;
    if let Some((list, utterances)) = router_data {
        report.fitted = fit_routers(&model, &vs, &config, &dense.units, list, *utterances, o)?;
    }
    let cmvn = CmvnStats::load(&dense.dir.join("global_cmvn"))?;
    let dir = checkpoint::save_layout(
        &o.out,
        o.layout,
        &vs.variables().into_iter().collect(),
        &BTreeMap::new(),
        SaveRequest {
            config: &config,
            state: &TrainState::default(),
            units: &dense.units,
            cmvn: &cmvn,
            optimizer: Default::default(),
            is_best: false,
        },
    )?;
    Ok((dir, report))
}

/// Sets every router of the child `model` that the data reaches to k-means centroids of
/// the tokens it sees ([`kmeans_router`]) over `utterances` of `list`; returns how many.
/// A copy or granular child computes its parent's outputs under `topk_softmax` whatever
/// the router, and nearly under `softmax_topk` with these small routers (noise and drop
/// children nearly), so one pass gives every layer the inputs it will have at step 0.
fn fit_routers(
    model: &AsrModel,
    vs: &nn::VarStore,
    config: &TrainConfig,
    units: &Arc<Units>,
    list: &Path,
    utterances: usize,
    o: &UpcycleOptions,
) -> Result<usize> {
    let list = crate::inspect::data_list(list);
    if !list.is_file() {
        bail!(
            "--router-data: {} does not exist (name a data set: `data prepare`'s train/ \
             directory, or a data.list)",
            list.display()
        );
    }
    let loader = DataLoader::new(
        &list,
        units.clone(),
        config.dataset_conf.clone(),
        Mode::Eval,
        Shard::SINGLE,
        0,
    )
    .with_context(|| format!("--router-data {}", list.display()))?;
    let mut tokens: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    let seen = crate::inspect::routed_passes(
        model,
        &loader,
        utterances,
        ChunkMode::Full,
        Routing::capturing_inputs,
        |r| {
            for l in r.layers {
                if let Some(inputs) = l.inputs {
                    tokens.entry(l.layer).or_default().push(inputs);
                }
            }
        },
    )?;
    let vars = vs.variables();
    let granularity = o.method.granularity();
    // softmax_topk scales each chosen expert by E/k times its probability: near-zero
    // logits keep that near 1 (the parent's outputs) while choosing as k-means does.
    let scale = if o.router == "softmax_topk" {
        KMEANS_SOFTMAX_TOPK_SCALE
    } else {
        1.0
    };
    for (layer, parts) in &tokens {
        let name = format!("{layer}.router.weight");
        let mut router = vars[&name].shallow_clone();
        let all = Tensor::cat(parts, 0);
        let n = all.size()[0];
        let sample = if n > KMEANS_TOKENS {
            let pick = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            all.index_select(0, &pick.narrow(0, 0, KMEANS_TOKENS))
        } else {
            all
        };
        let fitted = scale
            * kmeans_router(&sample, o.experts, granularity, KMEANS_ROUNDS)
                .map_err(|e| anyhow::anyhow!("{name} on {seen} utterances: {e}"))?;
        tch::no_grad(|| router.copy_(&fitted));
    }
    Ok(tokens.len())
}

/// Lloyd's rounds of the routers' k-means: a few tens settle it on tens of thousands of
/// tokens.
const KMEANS_ROUNDS: usize = 30;
/// How much smaller kmeans routers are under `softmax_topk`: logits of about 1e-3 times a
/// cosine move each expert's weight E p / k from 1 by about 0.1%.
const KMEANS_SOFTMAX_TOPK_SCALE: f64 = 1e-3;
/// Tokens a router's k-means runs on at most (a random sample of those the data gave).
const KMEANS_TOKENS: i64 = 200_000;

/// `expert_linear_units` of a section whose `linear_units` hidden units the method splits
/// (granular: G ways; `None`, the same as `linear_units`, otherwise). Granular needs
/// whole virtual groups: G divides the units, the experts and k.
fn expert_units(section: &str, units: i64, o: &UpcycleOptions) -> Result<Option<i64>> {
    let g = o.method.granularity();
    if g == 1 {
        return Ok(None);
    }
    if units % g != 0 {
        bail!("--granularity {g} does not divide {section}.linear_units ({units})");
    }
    if o.experts % g != 0 || o.top_k % g != 0 {
        bail!(
            "--granularity {g}: --experts ({}) and --top-k ({}) must be multiples of it, so \
             that tokens take whole virtual groups (--top-k {g} keeps the parent's active \
             FLOPs)",
            o.experts,
            o.top_k
        );
    }
    Ok(Some(units / g))
}

/// A directory that must not exist yet: refused by name (nothing is overwritten).
fn fresh_output(out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; choose a new --out (nothing was overwritten)",
            out.display()
        );
    }
    Ok(())
}

/// Everything a checkpoint (sharded, or consolidated) holds, whole.
struct Whole {
    dir: PathBuf,
    config: TrainConfig,
    units: Units,
    cmvn: CmvnStats,
    state: TrainState,
    optimizer_steps: OptimSteps,
    model: BTreeMap<String, Tensor>,
    moments: BTreeMap<String, Tensor>,
}

fn read_whole(from: &Path) -> Result<Whole> {
    let dir =
        checkpoint::resolve_latest(from).with_context(|| format!("--from {}", from.display()))?;
    let sharded = dir.join("manifest.json").is_file();
    // Checks every tensor's name and shape against the model the config builds.
    let loaded = checkpoint::load_model(&dir, Device::Cpu)?;
    let (moments, optimizer_steps) = if sharded {
        (
            checkpoint::read_group(&dir, "optim")?,
            checkpoint::read_manifest(&dir)?.optimizer_steps(),
        )
    } else {
        (BTreeMap::new(), OptimSteps::default())
    };
    let state = if dir.join("state.json").is_file() {
        checkpoint::read_state(&dir)?
    } else {
        TrainState::default()
    };
    Ok(Whole {
        config: loaded.config,
        units: (*loaded.units).clone(),
        cmvn: CmvnStats::load(&dir.join("global_cmvn"))?,
        state,
        optimizer_steps,
        // The loaded (and checked) variables: the checkpoint is read once.
        model: loaded.vs.variables().into_iter().collect(),
        moments,
        dir,
    })
}

/// `convert consolidate`: one safetensors file with every parameter (experts whole, by
/// our names), beside `train.yaml`, `units.txt`, `global_cmvn` and `state.json`, in the
/// new directory `out`. Any command that takes a checkpoint reads it.
pub fn consolidate(from: &Path, out: &Path) -> Result<PathBuf> {
    fresh_output(out)?;
    let w = read_whole(from)?;
    let staged = StagedDir::beside(out, "consolidate")?;
    let tmp = staged.path();
    let tensors: Vec<(String, Tensor)> = w.model.into_iter().collect();
    let file = tmp.join("model.safetensors");
    Tensor::write_safetensors(&tensors, &file)?;
    atomic::write_file(
        &tmp.join("train.yaml"),
        serde_yaml::to_string(&w.config)?.as_bytes(),
    )?;
    atomic::write_file(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&w.state)?.as_bytes(),
    )?;
    w.units.save(&tmp.join("units.txt"))?;
    w.cmvn.save(&tmp.join("global_cmvn"))?;
    Ok(staged.publish()?)
}

/// `convert shard` / `convert reshard`: a sharded checkpoint for `world` workers with
/// expert parallelism `ep` (under `out/step-<N>`, `out/latest`), optimizer moments
/// included when the source has them.
pub fn reshard(from: &Path, world: usize, ep: usize, out: &Path) -> Result<PathBuf> {
    fresh_output(out)?;
    let w = read_whole(from)?;
    let staged = StagedDir::beside(out, "reshard")?;
    let dir = checkpoint::save_layout(
        staged.path(),
        Layout::new(world, ep),
        &w.model,
        &w.moments,
        SaveRequest {
            config: &w.config,
            state: &w.state,
            units: &w.units,
            cmvn: &w.cmvn,
            // Scalars per tensor: the same whatever the layout.
            optimizer: (w.optimizer_steps, Vec::new()),
            is_best: false,
        },
    )
    .with_context(|| format!("resharding {}", w.dir.display()))?;
    let out = staged.publish()?;
    Ok(out.join(dir.file_name().expect("step-N")))
}
