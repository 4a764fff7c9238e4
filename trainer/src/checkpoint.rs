//! Checkpoints, single-file for now: a directory `step-<N>/` holding the model
//! (`model.safetensors`, WeNet parameter names), the optimizer moments
//! (`optimizer.safetensors`), the config that ran (`train.yaml`), the units and CMVN
//! of the data, and the trainer state (`state.json`). Written under a temporary name,
//! flushed and renamed; the `latest` and `best` pointers move after. Sharding comes with
//! the checkpoint issue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};
use upcycle_model::asr::AsrModel;

use crate::config::TrainConfig;
use crate::data::cmvn::CmvnStats;
use crate::data::text::Units;

/// Where training stands, saved with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch being trained.
    pub epoch: u64,
    /// Best dev CER so far (percent), if evaluated.
    pub best_dev_cer: Option<f64>,
    /// Dev CER of this checkpoint, if evaluated.
    pub dev_cer: Option<f64>,
    /// Seconds of training so far.
    pub train_seconds: f64,
}

pub(crate) fn fsync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Moves a pointer file (`latest`, `best`) to name `target`, atomically.
fn set_pointer(root: &Path, name: &str, target: &str) -> Result<()> {
    let tmp = root.join(format!(".{name}.tmp"));
    write_synced(&tmp, target.as_bytes())?;
    std::fs::rename(&tmp, root.join(name))?;
    fsync_dir(root);
    Ok(())
}

/// Everything a checkpoint holds besides the tensors.
pub struct SaveRequest<'a> {
    /// The configuration that ran.
    pub config: &'a TrainConfig,
    /// Trainer state.
    pub state: &'a TrainState,
    /// Units file of the data.
    pub units: &'a Units,
    /// CMVN statistics of the data.
    pub cmvn: &'a CmvnStats,
    /// Optimizer step count and moments.
    pub optimizer: (u64, Vec<(String, Tensor)>),
    /// Also point `best` at it.
    pub is_best: bool,
}

/// Writes `root/step-<N>/` with the `model` tensors (the whole model, every expert) and
/// moves `latest` (and `best`) to it.
pub fn save(root: &Path, model: Vec<(String, Tensor)>, req: SaveRequest<'_>) -> Result<PathBuf> {
    std::fs::create_dir_all(root)?;
    let name = format!("step-{}", req.state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let cpu: Vec<(String, Tensor)> = model
        .into_iter()
        .map(|(k, v)| (k, v.to_device(Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&cpu, tmp.join("model.safetensors"))?;
    let (opt_step, moments) = req.optimizer;
    let moments: Vec<(String, Tensor)> = moments
        .into_iter()
        .map(|(k, v)| (k, v.to_device(Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&moments, tmp.join("optimizer.safetensors"))?;
    write_synced(
        &tmp.join("train.yaml"),
        serde_yaml::to_string(req.config)?.as_bytes(),
    )?;
    let mut state = serde_json::to_value(req.state)?;
    state["optimizer_step"] = opt_step.into();
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    req.units.save(&tmp.join("units.txt"))?;
    req.cmvn.save(&tmp.join("global_cmvn"))?;
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "units.txt",
        "global_cmvn",
    ] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    fsync_dir(&tmp);
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst)?;
    fsync_dir(root);
    set_pointer(root, "latest", &name)?;
    if req.is_best {
        set_pointer(root, "best", &name)?;
    }
    Ok(dst)
}

/// Removes `step-*` checkpoints except the newest `keep` and the one `best` names.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let best = std::fs::read_to_string(root.join("best")).unwrap_or_default();
    let latest = std::fs::read_to_string(root.join("latest")).unwrap_or_default();
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    let cut = steps.len().saturating_sub(keep.max(1));
    for (_, path) in &steps[..cut] {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name != best.trim() && name != latest.trim() {
            std::fs::remove_dir_all(path).with_context(|| format!("pruning {}", path.display()))?;
        }
    }
    Ok(())
}

/// The checkpoint directory that `path` names: a checkpoint itself, or a training
/// output directory (its `best`, else `latest`), or a checkpoints folder.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("model.safetensors").is_file() {
        return Ok(path.to_path_buf());
    }
    for root in [path.join("checkpoints"), path.to_path_buf()] {
        for pointer in ["best", "latest"] {
            if let Ok(name) = std::fs::read_to_string(root.join(pointer)) {
                let dir = root.join(name.trim());
                if dir.join("model.safetensors").is_file() {
                    return Ok(dir);
                }
            }
        }
    }
    bail!(
        "{} is neither a checkpoint (no model.safetensors) nor a training output with checkpoints/best or checkpoints/latest",
        path.display()
    )
}

/// A model loaded for decoding.
pub struct LoadedModel {
    /// The configuration it was trained with.
    pub config: TrainConfig,
    /// Its units.
    pub units: Arc<Units>,
    /// Parameters.
    pub vs: nn::VarStore,
    /// The model.
    pub model: AsrModel,
    /// Where it came from.
    pub dir: PathBuf,
}

/// Loads a checkpoint's model onto `device`, checking every tensor's name and shape.
pub fn load_model(path: &Path, device: Device) -> Result<LoadedModel> {
    let dir = resolve(path)?;
    let config = TrainConfig::load(&dir.join("train.yaml"))?;
    let units = Arc::new(Units::load(&dir.join("units.txt"))?);
    let vs = nn::VarStore::new(device);
    let model = config.build_model(&vs.root(), units.len() as i64)?;
    load_weights(&dir, &vs)?;
    Ok(LoadedModel {
        config,
        units,
        vs,
        model,
        dir,
    })
}

/// The tensors of a checkpoint directory's `model.safetensors`, by name.
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = dir.join("model.safetensors");
    Ok(Tensor::read_safetensors(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .into_iter()
        .collect())
}

/// Copies a checkpoint directory's tensors into every variable of `vs`; a missing
/// tensor or a shape that differs is an error naming the tensor.
pub fn load_weights(dir: &Path, vs: &nn::VarStore) -> Result<()> {
    let file = dir.join("model.safetensors");
    let saved = read_tensors(dir)?;
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vs.variables() {
            let t = saved.get(&name).with_context(|| {
                format!(
                    "{}: tensor {name} is missing (is this checkpoint of the same model? \
                     a dense one becomes MoE with `upcycle convert upcycle`)",
                    file.display()
                )
            })?;
            if t.size() != var.size() {
                bail!(
                    "{}: tensor {name} has shape {:?}, the model expects {:?}",
                    file.display(),
                    t.size(),
                    var.size()
                );
            }
            var.copy_(t);
        }
        Ok(())
    })
}
