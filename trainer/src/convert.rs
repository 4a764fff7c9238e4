//! The checkpoint conversion tool (`upcycle convert ...`): `upcycle`, a dense
//! checkpoint to its MoE child (UME), and WeNet import/export ([`wenet`]); the sharded
//! layouts come with the checkpoint issue.

pub mod wenet;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tch::{nn, Device};
use upcycle_model::upcycle::{upcycle, UpcycleReport};

use crate::checkpoint::{self, SaveRequest, TrainState};
use crate::data::cmvn::CmvnStats;

/// What `upcycle convert upcycle` was asked to do.
#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    /// The dense checkpoint (a run's `checkpoints/` or a `step-N` directory).
    pub from: PathBuf,
    /// Output checkpoint root (gets `step-0/` and `latest`); must not hold one yet.
    pub out: PathBuf,
    /// Experts per MoE layer.
    pub experts: i64,
    /// Experts per token.
    pub top_k: i64,
    /// Relative Gaussian noise on the expert copies (0: exact copies).
    pub noise: f64,
    /// `normal` or `zero` router initialisation.
    pub router_init: String,
    /// Standard deviation of a `normal` router.
    pub router_std: f64,
    /// Leave the decoder dense.
    pub encoder_only: bool,
    /// Seed of the routers (and the noise).
    pub seed: u64,
}

/// Writes the upcycled checkpoint; returns its directory and what was done.
pub fn upcycle_checkpoint(o: &UpcycleOptions) -> Result<(PathBuf, UpcycleReport)> {
    if o.out.join("latest").exists() {
        bail!(
            "{}: already holds a checkpoint; choose a new --out (nothing was overwritten)",
            o.out.display()
        );
    }
    let dense = checkpoint::load_model(&o.from, Device::Cpu)
        .with_context(|| format!("--from {}", o.from.display()))?;
    let mut config = dense.config.clone();
    if config.encoder_conf.mlp_type == "moe" || config.decoder_conf.mlp_type == "moe" {
        bail!(
            "--from {}: this checkpoint is already MoE (mlp_type: moe)",
            dense.dir.display()
        );
    }
    config.encoder_conf.mlp_type = "moe".into();
    config.encoder_conf.n_expert = o.experts;
    config.encoder_conf.n_expert_activated = o.top_k;
    if !o.encoder_only {
        config.decoder_conf.mlp_type = "moe".into();
        config.decoder_conf.n_expert = o.experts;
        config.decoder_conf.n_expert_activated = o.top_k;
    }
    config.moe_conf.router_init = o.router_init.clone();
    config.moe_conf.router_init_std = o.router_std;
    config.validate().context("the upcycled configuration")?;

    tch::manual_seed(o.seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    config.build_model(&vs.root(), dense.units.len() as i64)?;
    let parent = checkpoint::read_tensors(&dense.dir)?;
    let report = upcycle(&parent, &vs, o.noise).map_err(anyhow::Error::msg)?;
    let cmvn = CmvnStats::load(&dense.dir.join("global_cmvn"))?;
    let dir = checkpoint::save(
        &o.out,
        vs.variables().into_iter().collect(),
        SaveRequest {
            config: &config,
            state: &TrainState::default(),
            units: &dense.units,
            cmvn: &cmvn,
            optimizer: (0, Vec::new()),
            is_best: false,
        },
    )?;
    Ok((dir, report))
}
