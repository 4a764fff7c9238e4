//! WeNet checkpoints in and out (`upcycle convert import-wenet` / `export-wenet`).
//!
//! A WeNet model is its `state_dict` (`final.pt` from `torch.save`, or safetensors) and
//! its `train.yaml`; its units and CMVN come as `units.txt` and `global_cmvn`. Parameter
//! names are the same as ours except in MoE layers ([`upcycle_model::naming`]); the CMVN
//! statistics are the `encoder.global_cmvn.{mean,istd}` buffers in both. Every command
//! checks its input before it writes, and writes its output under a temporary name that
//! is synced and then renamed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use upcycle_dataset::cmvn::CmvnStats;
use upcycle_dataset::text::Units;
use upcycle_files::atomic::{self, StagedDir};
use upcycle_model::config::Router;
use upcycle_model::naming::{from_wenet, to_wenet};

use crate::checkpoint::{self, SaveRequest, TrainState};
use crate::config::TrainConfig;
use crate::torch_file;

const CMVN_MEAN: &str = "encoder.global_cmvn.mean";
const CMVN_ISTD: &str = "encoder.global_cmvn.istd";

/// What `upcycle convert import-wenet` was asked to do.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// WeNet's state dict: a `torch.save` file (`.pt`) or `.safetensors`.
    pub checkpoint: PathBuf,
    /// Its `train.yaml`.
    pub config: PathBuf,
    /// Its units (default: `units.txt` beside the checkpoint, else beside the config).
    pub units: Option<PathBuf>,
    /// Its `global_cmvn` JSON (default: statistics that give the checkpoint's buffers).
    pub cmvn: Option<PathBuf>,
    /// Output checkpoint root (gets `step-0/` and `latest`); must be new or empty.
    pub out: PathBuf,
}

/// What `upcycle convert export-wenet` was asked to do.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Our checkpoint (a run, its `checkpoints/` or a `step-N` directory).
    pub checkpoint: PathBuf,
    /// Output directory (gets `final.pt`, `train.yaml`, `units.txt`, `global_cmvn`);
    /// must be new or empty.
    pub out: PathBuf,
    /// Also write `final.safetensors`.
    pub safetensors: bool,
}

/// Refuses an output that exists and is not an empty directory.
fn check_new(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        ensure!(
            empty,
            "{}: already exists; choose a new --out (nothing was overwritten)",
            out.display()
        );
    }
    Ok(())
}

/// A WeNet state dict by name, from any form WeNet's tools leave:
/// - a `torch.save` file (`final.pt`, `epoch_N.pt`, `avg_N.pt` from `average_model.py`,
///   a full FSDP state dict), saved on a CPU or a GPU (the storage location is ignored),
///   in float32, float16 or bfloat16 (widened to float32 on import);
/// - a `.safetensors` file;
/// - a directory of DeepSpeed's converted weights (`zero_to_fp32.py` / WeNet's
///   `save_states: model_only` with DeepSpeed >= 0.15, which writes `pytorch_model.bin`
///   or `model.safetensors`, or shards listed in `*.index.json`).
///
/// Unconverted DeepSpeed and `torch.distributed.checkpoint` directories are refused with
/// the command that converts them.
pub fn read_wenet_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if path.is_dir() {
        return read_weights_dir(path);
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if name.starts_with("zero_pp_rank_")
        || (name.starts_with("mp_rank_") && name.ends_with("_model_states.pt"))
    {
        let dir = path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        bail!(
            "{}: a DeepSpeed checkpoint part, not a state dict; convert the checkpoint first: \
             python {}/zero_to_fp32.py {} final.pt (DeepSpeed's script, saved beside it), then \
             import final.pt",
            path.display(),
            dir.display(),
            dir.display()
        );
    }
    let tensors = if path.extension().is_some_and(|e| e == "safetensors") {
        Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?
    } else {
        torch_file::read_state_dict(path)?
    };
    Ok(tensors.into_iter().collect())
}

/// A directory of weights: DeepSpeed's converted output (one file or shards with an
/// index), or a raw DeepSpeed / distributed checkpoint, refused with its conversion.
fn read_weights_dir(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    for index in [
        "pytorch_model.bin.index.json",
        "model.safetensors.index.json",
    ] {
        let index = dir.join(index);
        if index.is_file() {
            let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
                .with_context(|| format!("{}: not JSON", index.display()))?;
            let map = json["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no weight_map", index.display()))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let mut out = BTreeMap::new();
            for f in files {
                ensure!(
                    !f.contains('/') && !f.contains('\\') && f != ".." && !f.is_empty(),
                    "{}: shard name {f:?} is not a file of that directory",
                    index.display()
                );
                out.extend(read_wenet_tensors(&dir.join(f))?);
            }
            return Ok(out);
        }
    }
    for single in ["pytorch_model.bin", "model.safetensors"] {
        if dir.join(single).is_file() {
            return read_wenet_tensors(&dir.join(single));
        }
    }
    let has = |f: &str| dir.join(f).exists();
    if has("latest") || has("zero_to_fp32.py") || has("mp_rank_00_model_states.pt") {
        bail!(
            "{}: an unconverted DeepSpeed checkpoint; convert it to a state dict first: \
             python {}/zero_to_fp32.py {} final.pt (DeepSpeed's script, saved beside it; add \
             --tag TAG for another tag than `latest`), then import final.pt",
            dir.display(),
            dir.display(),
            dir.display()
        );
    }
    if has(".metadata") {
        bail!(
            "{}: a torch.distributed.checkpoint (sharded) directory; convert it to a state \
             dict first: python -m torch.distributed.checkpoint.format_utils dcp_to_torch {} \
             final.pt, then import final.pt",
            dir.display(),
            dir.display()
        );
    }
    bail!(
        "{}: a directory without weights (expected a .pt or .safetensors file, or DeepSpeed's \
         converted pytorch_model.bin / model.safetensors / *.index.json)",
        dir.display()
    )
}

/// What WeNet's train.py wrote beside `checkpoint` (`final.yaml` for `final.pt`): the
/// step, epoch and tag it was saved at, for the log.
fn wenet_infos(checkpoint: &Path) -> Option<String> {
    let text = std::fs::read_to_string(checkpoint.with_extension("yaml")).ok()?;
    let infos: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let field = |k: &str| {
        infos
            .get(k)
            .map(|v| serde_yaml::to_string(v).unwrap_or_default())
    };
    let parts: Vec<String> = ["tag", "epoch", "step"]
        .into_iter()
        .filter_map(|k| Some(format!("{k} {}", field(k)?.trim())))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Refuses a WeNet train.yaml whose missing keys mean something else in WeNet than here:
/// WeNet's Conformer defaults to `cnn_module_norm: batch_norm`, which this model does
/// not have (ours defaults to layer_norm, what WeNet's U2++ recipes set).
fn check_wenet_defaults(config: &Path) -> Result<()> {
    let raw: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(config)?)?;
    let encoder = &raw["encoder_conf"];
    let conformer = raw
        .get("encoder")
        .and_then(|e| e.as_str())
        .unwrap_or("conformer")
        == "conformer";
    let with_conv = encoder
        .get("use_cnn_module")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    ensure!(
        !conformer || !with_conv || encoder.get("cnn_module_norm").is_some(),
        "encoder_conf.cnn_module_norm is absent, so WeNet built this model with its default, \
         batch_norm, which upcycle does not implement (supported: layer_norm)"
    );
    Ok(())
}

/// Statistics whose mean and inverse std are `mean`, `istd` (one pseudo-frame), for a
/// checkpoint imported without its `global_cmvn` file.
fn cmvn_from_buffers(mean: &Tensor, istd: &Tensor) -> Result<CmvnStats> {
    let mean = Vec::<f64>::try_from(mean.to_kind(Kind::Double))?;
    let istd = Vec::<f64>::try_from(istd.to_kind(Kind::Double))?;
    Ok(CmvnStats {
        var_stat: mean
            .iter()
            .zip(&istd)
            .map(|(m, s)| m * m + 1.0 / (s * s))
            .collect(),
        mean_stat: mean,
        frame_num: 1,
    })
}

/// The units file when `--units` is not given: `units.txt` or WeNet's `lang_char.txt`
/// beside the checkpoint or the config, else the config's `tokenizer_conf.
/// symbol_table_path` (relative to the working directory, as WeNet's recipes run, or to
/// the config's directory).
fn default_units(o: &ImportOptions, config: &TrainConfig) -> Result<PathBuf> {
    let config_dir = o.config.parent().unwrap_or(Path::new(""));
    let mut candidates: Vec<PathBuf> = [&o.checkpoint, &o.config]
        .iter()
        .filter_map(|p| p.parent())
        .flat_map(|d| ["units.txt", "lang_char.txt"].map(|f| d.join(f)))
        .collect();
    if let Some(table) = config.wenet_symbol_table() {
        candidates.extend([PathBuf::from(&table), config_dir.join(&table)]);
    }
    candidates.into_iter().find(|u| u.is_file()).context(
        "no --units given, no units.txt or lang_char.txt beside the checkpoint or the config, \
         and the config's tokenizer_conf.symbol_table_path is not a file: pass --units \
         data/dict/lang_char.txt",
    )
}

/// Imports a WeNet checkpoint as our `out/step-0`; returns that directory.
pub fn import_wenet(o: &ImportOptions) -> Result<PathBuf> {
    check_new(&o.out)?;
    let config = wenet_config(o)?;
    let (units, units_path) = wenet_units(o, &config)?;
    let given_cmvn = o.cmvn.as_deref().map(CmvnStats::load).transpose()?;
    let (mut tensors, saved_kind) = wenet_weights(o, units.len() as i64, &units_path)?;
    let cmvn = wenet_cmvn(o, &config, &mut tensors, given_cmvn, saved_kind)?;

    // Build in a hidden sibling and load it back with the checkpoint loader, which checks
    // every tensor's name and shape against the model the config builds.
    let staged = StagedDir::beside(&o.out, "import")?;
    write_checked(staged.path(), &config, &units, &cmvn, &tensors).with_context(|| {
        format!(
            "--checkpoint {} does not fit the model that --config {} describes",
            o.checkpoint.display(),
            o.config.display()
        )
    })?;
    Ok(staged.publish()?.join("step-0"))
}

/// The train.yaml, checked for what WeNet's model would compute otherwise; the keys with
/// no meaning here logged, and what WeNet says of the checkpoint (its info yaml).
fn wenet_config(o: &ImportOptions) -> Result<TrainConfig> {
    let what_to_do = "the WeNet train.yaml has an option upcycle's model does not have or \
                      supports differently: edit it (remove the key if its value is WeNet's \
                      default) or this checkpoint cannot be imported";
    let config = TrainConfig::load(&o.config)
        .and_then(|c| c.check_wenet_model_keys().map(|()| c))
        .map_err(anyhow::Error::from)
        .and_then(|c| check_wenet_defaults(&o.config).map(|()| c))
        .with_context(|| format!("--config {}: {what_to_do}", o.config.display()))?;
    let ignored = config.ignored_keys();
    if !ignored.is_empty() {
        tracing::info!(
            "--config {}: WeNet keys with no meaning here, ignored: {}",
            o.config.display(),
            ignored.join(", ")
        );
    }
    if let Some(infos) = wenet_infos(&o.checkpoint) {
        tracing::info!(
            "--checkpoint {}: saved by WeNet at {infos}",
            o.checkpoint.display()
        );
    }
    Ok(config)
}

/// The units (and where they came from), checked against `output_dim` and the
/// `<sos>`/`<eos>` the model was trained with.
fn wenet_units(o: &ImportOptions, config: &TrainConfig) -> Result<(Units, PathBuf)> {
    let units_path = match &o.units {
        Some(u) => u.clone(),
        None => default_units(o, config)?,
    };
    tracing::info!("units: {}", units_path.display());
    let units = Units::load(&units_path)?;
    let vocab = units.len() as i64;
    if let Some(dim) = config.wenet_output_dim().filter(|&d| d != vocab) {
        bail!(
            "{} has {vocab} units but {} says output_dim: {dim}",
            units_path.display(),
            o.config.display()
        );
    }
    // WeNet's model takes <sos> and <eos> from special_tokens (default: the last unit);
    // ours from the units file: they must name the same unit.
    let special = |name: &str| config.wenet_special_token(name).unwrap_or(vocab - 1);
    let (sos, eos, ours) = (special("<sos>"), special("<eos>"), units.sos_eos() as i64);
    ensure!(
        sos == ours && eos == ours,
        "--config {}: the model starts sequences with unit {sos} and ends them with unit {eos} \
         (tokenizer_conf.special_tokens; WeNet's default is the last unit), but {} has \
         <sos/eos> at {ours}; pass the units file the model was trained with (upcycle uses \
         one unit for both)",
        o.config.display(),
        units_path.display()
    );
    Ok((units, units_path))
}

/// The checkpoint's tensors under our names, widened to float32, and the precision the
/// CMVN buffers were saved in.
fn wenet_weights(
    o: &ImportOptions,
    vocab: i64,
    units_path: &Path,
) -> Result<(BTreeMap<String, Tensor>, Kind)> {
    let wenet = read_wenet_tensors(&o.checkpoint)
        .with_context(|| format!("--checkpoint {}", o.checkpoint.display()))?;
    if let Some(w) = wenet.get("ctc.ctc_lo.weight") {
        ensure!(
            w.size().first() == Some(&vocab),
            "{}: ctc.ctc_lo.weight has shape {:?}, so the model has {} output units, but {} has {vocab}",
            o.checkpoint.display(),
            w.size(),
            w.size().first().copied().unwrap_or(0),
            units_path.display()
        );
    }
    let mut tensors = from_wenet(wenet)
        .map_err(|e| anyhow::anyhow!("--checkpoint {}: {e}", o.checkpoint.display()))?;
    // Our checkpoints are float32; half-precision weights widen exactly.
    let saved_kind = tensors.get(CMVN_MEAN).map_or(Kind::Float, Tensor::kind);
    for t in tensors.values_mut() {
        if matches!(t.kind(), Kind::Half | Kind::BFloat16) {
            *t = t.to_kind(Kind::Float);
        }
    }
    Ok((tensors, saved_kind))
}

/// The CMVN statistics: the checkpoint's buffers (a `--cmvn` file must agree with them
/// at the precision they were saved in), or the identity for a model without CMVN.
fn wenet_cmvn(
    o: &ImportOptions,
    config: &TrainConfig,
    tensors: &mut BTreeMap<String, Tensor>,
    given: Option<CmvnStats>,
    saved_kind: Kind,
) -> Result<CmvnStats> {
    Ok(
        match (tensors.get(CMVN_MEAN), tensors.get(CMVN_ISTD), given) {
            (Some(mean), Some(istd), None) => cmvn_from_buffers(mean, istd)?,
            (Some(mean), Some(istd), Some(given)) => {
                let (m, s) = given.mean_istd();
                let close = |a: &Tensor, b: Vec<f32>| {
                    let b = Tensor::from_slice(&b)
                        .to_kind(saved_kind)
                        .to_kind(Kind::Float);
                    a.size() == b.size() && a.to_kind(Kind::Float).allclose(&b, 1e-4, 1e-6, false)
                };
                ensure!(
                    close(mean, m) && close(istd, s),
                    "--cmvn {}: its mean and inverse std differ from the checkpoint's {CMVN_MEAN} \
                 and {CMVN_ISTD}, which the model was trained with; leave --cmvn out",
                    o.cmvn.as_ref().expect("given").display()
                );
                given
            }
            (None, None, given) => {
                // A WeNet model built with `cmvn: null` normalises nothing: the identity.
                ensure!(
                    given.is_none(),
                    "--checkpoint {}: has no {CMVN_MEAN}/{CMVN_ISTD} (its model applies no CMVN), \
                 so --cmvn would change its outputs; leave --cmvn out",
                    o.checkpoint.display()
                );
                let dim = config.input_dim;
                tensors.insert(CMVN_MEAN.into(), Tensor::zeros([dim], tch::kind::FLOAT_CPU));
                tensors.insert(CMVN_ISTD.into(), Tensor::ones([dim], tch::kind::FLOAT_CPU));
                cmvn_from_buffers(&tensors[CMVN_MEAN], &tensors[CMVN_ISTD])?
            }
            _ => bail!(
                "--checkpoint {}: has only one of {CMVN_MEAN} and {CMVN_ISTD}",
                o.checkpoint.display()
            ),
        },
    )
}

/// Saves the imported model as a checkpoint in `dir` and loads it back, refusing
/// tensors the model the config builds does not have (the loader refuses missing and
/// misshapen ones).
fn write_checked(
    dir: &Path,
    config: &TrainConfig,
    units: &Units,
    cmvn: &CmvnStats,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    checkpoint::save(
        dir,
        tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect(),
        SaveRequest {
            config,
            state: &TrainState::default(),
            units,
            cmvn,
            optimizer: Default::default(),
            is_best: false,
        },
    )?;
    let loaded = checkpoint::load_model(dir, Device::Cpu)?;
    let ours: BTreeSet<String> = loaded.vs.variables().into_keys().collect();
    let unknown: Vec<&String> = tensors.keys().filter(|k| !ours.contains(*k)).collect();
    if !unknown.is_empty() {
        bail!(
            "{} tensor(s) that the model does not have: {} (a different model? check the \
             config's options, e.g. mlp_type, n_expert, use_cnn_module, r_num_blocks)",
            unknown.len(),
            unknown
                .iter()
                .map(|s| WenetName(s).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// An our-named tensor as the user knows it (WeNet's name when it differs).
struct WenetName<'a>(&'a str);

impl std::fmt::Display for WenetName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.strip_suffix(".router.weight") {
            Some(layer) => write!(f, "{layer}.gate.weight"),
            None => f.write_str(self.0),
        }
    }
}

/// Refuses what WeNet's model cannot express, naming the key.
fn check_wenet_expressible(c: &TrainConfig) -> Result<()> {
    let e = &c.encoder_conf;
    let d = &c.decoder_conf;
    let all = |l: &Option<Vec<usize>>, n: usize| {
        l.as_ref()
            .is_none_or(|l| l.iter().copied().collect::<BTreeSet<_>>() == (0..n).collect())
    };
    let refuse = |key: &str| {
        bail!(
            "{key}: WeNet's model has no such option (its MoE makes every feed-forward network \
             of every block an MoE layer with its own experts); this checkpoint cannot be \
             exported to WeNet"
        )
    };
    if e.mlp_type == "moe" {
        if !all(&e.moe_layers, e.num_blocks) {
            return refuse("encoder_conf.moe_layers");
        }
        if !e.moe_macaron && e.macaron_style {
            return refuse("encoder_conf.moe_macaron: false");
        }
        if !e.expert_sharing.is_empty() {
            return refuse("encoder_conf.expert_sharing");
        }
    }
    if d.mlp_type == "moe" && !all(&d.moe_layers, d.num_blocks.max(d.r_num_blocks)) {
        return refuse("decoder_conf.moe_layers");
    }
    let moe = e.mlp_type == "moe" || d.mlp_type == "moe";
    if moe && c.moe_conf.router() != Router::TopkSoftmax {
        bail!(
            "moe_conf.router: {}: WeNet routes by a softmax over the top-k logits \
             (topk_softmax); this model weighs its experts otherwise and cannot be exported \
             to WeNet",
            c.moe_conf.router
        );
    }
    if c.moe_conf.expert_bias {
        // Dropping the trained biases would send tokens to other experts than those the
        // model was trained with.
        bail!(
            "moe_conf.expert_bias: WeNet's router has no expert bias for choosing the top-k; \
             this model routes otherwise and cannot be exported to WeNet (train with \
             expert_bias: false to export)"
        );
    }
    Ok(())
}

/// WeNet's train.yaml for our config: WeNet's keys (its `init_model` passes
/// `encoder_conf`, `decoder_conf` and `model_conf` as keyword arguments, so only its own
/// keys may be there), the data-derived ones it expects (`output_dim`, CMVN, tokenizer),
/// and our `moe_conf` at the top level, which WeNet does not read.
fn wenet_train_yaml(c: &TrainConfig, units: &Units, out: &Path) -> Result<serde_yaml::Value> {
    let vocab = units.len();
    use serde_yaml::{Mapping, Value};
    let mut v = serde_yaml::to_value(c)?;
    let root = v.as_mapping_mut().context("config is not a mapping")?;
    root.remove("upcycle_conf");
    let section = |root: &mut Mapping, key: &str| -> Result<()> {
        let m = root
            .get_mut(key)
            .and_then(Value::as_mapping_mut)
            .with_context(|| format!("config has no {key}"))?;
        let dense = m.get("mlp_type").and_then(Value::as_str) != Some("moe");
        for ours in ["moe_layers", "moe_macaron", "expert_sharing"] {
            m.remove(ours);
        }
        // WeNet's experts have linear_units; every feed-forward network of an exported
        // MoE section is MoE (check_wenet_expressible), so the key can carry the experts'.
        if let Some(units) = m.remove("expert_linear_units").filter(|_| !dense) {
            m.insert("linear_units".into(), units);
        }
        // A dense model's yaml stays loadable by WeNet versions without MoE.
        if dense {
            for k in ["mlp_type", "n_expert", "n_expert_activated"] {
                m.remove(k);
            }
        }
        Ok(())
    };
    section(root, "encoder_conf")?;
    section(root, "decoder_conf")?;
    if let Some(Value::Mapping(ds)) = root.get_mut("dataset_conf") {
        for ours in ["max_bad_fraction", "num_workers", "prefetch"] {
            ds.remove(ours);
        }
    }
    // WeNet's WarmupLR takes warmup_steps only.
    if c.scheduler == "warmuplr" {
        let mut s = Mapping::new();
        s.insert("warmup_steps".into(), c.scheduler_conf.warmup_steps.into());
        root.insert("scheduler_conf".into(), s.into());
    }
    let out = std::path::absolute(out)?;
    let path = |f: &str| Value::from(out.join(f).display().to_string());
    let yaml = |s: &str| -> Result<Value> { Ok(serde_yaml::from_str(s)?) };
    let sos_eos = units.sos_eos();
    root.insert("output_dim".into(), (vocab as i64).into());
    root.insert("vocab_size".into(), (vocab as i64).into());
    root.insert("cmvn".into(), "global_cmvn".into());
    let mut cmvn_conf = Mapping::new();
    cmvn_conf.insert("cmvn_file".into(), path("global_cmvn"));
    cmvn_conf.insert("is_json_cmvn".into(), true.into());
    root.insert("cmvn_conf".into(), cmvn_conf.into());
    root.insert("ctc".into(), "ctc".into());
    root.insert("ctc_conf".into(), yaml("{ctc_blank_id: 0}")?);
    root.insert("dataset".into(), "asr".into());
    root.insert("tokenizer".into(), "char".into());
    let mut tok = yaml(&format!(
        "{{split_with_space: false, bpe_path: null, non_lang_syms_path: null, \
         is_multilingual: false, num_languages: 1, \
         special_tokens: {{'<blank>': 0, '<unk>': 1, '<sos>': {sos_eos}, '<eos>': {sos_eos}}}}}"
    ))?;
    tok.as_mapping_mut()
        .expect("a mapping")
        .insert("symbol_table_path".into(), path("units.txt"));
    root.insert("tokenizer_conf".into(), tok);
    Ok(v)
}

/// `1e-8` -> `1.0e-8`: PyYAML (YAML 1.1), which WeNet reads its train.yaml with, takes a
/// float without a dot for a string (and then Adam gets `eps: "1e-8"`).
fn yaml_1_1_floats(text: &str) -> String {
    let fix = |v: &str| -> Option<String> {
        let (mantissa, exp) = v.split_once(['e', 'E'])?;
        let digits = mantissa.strip_prefix('-').unwrap_or(mantissa);
        let exp_digits = exp.strip_prefix(['-', '+']).unwrap_or(exp);
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        (all_digits(digits) && all_digits(exp_digits)).then(|| format!("{mantissa}.0e{exp}"))
    };
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        let value_at = match line.rfind(": ") {
            Some(i) => Some(i + 2),
            None => line
                .find("- ")
                .filter(|&i| line[..i].trim().is_empty())
                .map(|i| i + 2),
        };
        match value_at.and_then(|i| Some((i, fix(&line[i..])?))) {
            Some((i, v)) => {
                out.push_str(&line[..i]);
                out.push_str(&v);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Exports our checkpoint as a WeNet model directory; returns it.
pub fn export_wenet(o: &ExportOptions) -> Result<PathBuf> {
    check_new(&o.out)?;
    let loaded = checkpoint::load_model(&o.checkpoint, Device::Cpu)
        .with_context(|| format!("--checkpoint {}", o.checkpoint.display()))?;
    check_wenet_expressible(&loaded.config)
        .with_context(|| format!("--checkpoint {}", loaded.dir.display()))?;
    let cmvn = CmvnStats::load(&loaded.dir.join("global_cmvn"))?;
    let yaml = wenet_train_yaml(&loaded.config, &loaded.units, &o.out)?;
    let tensors: Vec<(String, Tensor)> = to_wenet(loaded.vs.variables().into_iter().collect())
        .into_iter()
        .collect();

    let staged = StagedDir::beside(&o.out, "export")?;
    let tmp = staged.path();
    let written = (|| -> Result<()> {
        torch_file::write_state_dict(&tmp.join("final.pt"), &tensors)?;
        if o.safetensors {
            Tensor::write_safetensors(&tensors, tmp.join("final.safetensors"))?;
        }
        atomic::write_file(
            &tmp.join("train.yaml"),
            yaml_1_1_floats(&serde_yaml::to_string(&yaml)?).as_bytes(),
        )?;
        loaded.units.save(&tmp.join("units.txt"))?;
        Ok(cmvn.save(&tmp.join("global_cmvn"))?)
    })();
    written.with_context(|| format!("writing {}", o.out.display()))?;
    Ok(staged.publish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TrainConfig {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.yaml");
        TrainConfig::load(&p).unwrap()
    }

    #[test]
    fn exported_yaml_has_wenet_keys_only_and_reimports() {
        let mut c = tiny();
        c.encoder_conf.mlp_type = "moe".into();
        c.encoder_conf.n_expert = 4;
        let units = Units::from_texts(["abcdefghijklmnopqrstuvwx"]);
        let v = wenet_train_yaml(&c, &units, Path::new("/x/out")).unwrap();
        let enc = v["encoder_conf"].as_mapping().unwrap();
        assert!(enc.contains_key("n_expert") && !enc.contains_key("moe_macaron"));
        let dec = v["decoder_conf"].as_mapping().unwrap();
        assert!(!dec.contains_key("mlp_type") && !dec.contains_key("moe_layers"));
        assert!(v.get("upcycle_conf").is_none());
        assert_eq!(v["output_dim"].as_i64(), Some(27));
        assert_eq!(
            v["cmvn_conf"]["cmvn_file"].as_str(),
            Some("/x/out/global_cmvn")
        );
        assert_eq!(
            v["scheduler_conf"].as_mapping().unwrap().len(),
            1,
            "WarmupLR takes warmup_steps only"
        );
        let back = TrainConfig::parse(&serde_yaml::to_string(&v).unwrap()).unwrap();
        back.validate().unwrap();
        back.check_wenet_model_keys().unwrap();
        assert_eq!(back.encoder_conf, c.encoder_conf);
        assert_eq!(back.decoder_conf, c.decoder_conf);
        assert_eq!(back.model_conf, c.model_conf);
        assert_eq!(back.wenet_output_dim(), Some(27));
        assert_eq!(back.wenet_special_token("<sos>"), Some(26));
        assert_eq!(back.wenet_special_token("<eos>"), Some(26));
    }

    /// Granular experts are WeNet's experts of `linear_units` = `expert_linear_units`.
    #[test]
    fn granular_experts_export_as_wenet_linear_units() {
        let mut c = tiny();
        c.encoder_conf.mlp_type = "moe".into();
        c.encoder_conf.expert_linear_units = Some(c.encoder_conf.linear_units / 4);
        let units = Units::from_texts(["abc"]);
        let v = wenet_train_yaml(&c, &units, Path::new("/x/out")).unwrap();
        let enc = v["encoder_conf"].as_mapping().unwrap();
        assert!(!enc.contains_key("expert_linear_units"));
        assert_eq!(
            enc["linear_units"].as_i64(),
            c.encoder_conf.expert_linear_units
        );
        let back = TrainConfig::parse(&serde_yaml::to_string(&v).unwrap()).unwrap();
        assert_eq!(
            back.encoder_conf.expert_units(),
            c.encoder_conf.expert_units()
        );
    }

    #[test]
    fn floats_are_spelled_for_yaml_1_1() {
        assert_eq!(
            yaml_1_1_floats("a:\n  eps: 1e-8\n  lr: 0.001\n  n: 12\nb:\n- -2e5\nc: 1e-8x\n"),
            "a:\n  eps: 1.0e-8\n  lr: 0.001\n  n: 12\nb:\n- -2.0e5\nc: 1e-8x\n"
        );
    }

    #[test]
    fn what_wenet_cannot_express_is_refused_by_name() {
        let mut c = tiny();
        c.encoder_conf.mlp_type = "moe".into();
        c.encoder_conf.moe_layers = Some(vec![1]);
        let e = check_wenet_expressible(&c).unwrap_err().to_string();
        assert!(e.contains("encoder_conf.moe_layers"), "{e}");
        c.encoder_conf.moe_layers = Some(vec![1, 0]);
        check_wenet_expressible(&c).unwrap();
        c.moe_conf.router = "softmax_topk".into();
        let e = check_wenet_expressible(&c).unwrap_err().to_string();
        assert!(e.contains("moe_conf.router: softmax_topk"), "{e}");
        c.moe_conf.router = "topk_softmax".into();
        c.moe_conf.expert_bias = true;
        let e = check_wenet_expressible(&c).unwrap_err().to_string();
        assert!(e.contains("moe_conf.expert_bias"), "{e}");
    }

    #[test]
    fn cmvn_from_buffers_gives_them_back() {
        let mean = Tensor::from_slice(&[1.5f32, -2.0, 0.25]);
        let istd = Tensor::from_slice(&[0.5f32, 3.0, 1.0]);
        let (m, s) = cmvn_from_buffers(&mean, &istd).unwrap().mean_istd();
        assert_eq!(m, vec![1.5, -2.0, 0.25]);
        for (a, b) in s.iter().zip([0.5f32, 3.0, 1.0]) {
            assert!((a - b).abs() <= 1e-6 * b, "{a} {b}");
        }
    }
}
