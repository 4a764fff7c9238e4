//! Sharded checkpoints. A checkpoint is a directory `step-<N>/`:
//!
//! - `rank-<r>.safetensors`: what worker `r` owns: its expert slices (rows of the stacked
//!   banks, named by their **global** expert range in the manifest) if it is in the first
//!   expert-data-parallel copy, and its share of the replicated dense tensors (spread over
//!   the workers by size, so no single worker writes them all); model parameters under
//!   `model/<name>`, optimizer moments under `optim/<name>`, sharded the same way.
//! - `manifest.json`: format, step, layout (world, ep, dp), the config, and for every
//!   tensor its global shape, dtype, and which file holds which rows, with a SHA-256 of
//!   each slice's bytes.
//! - `train.yaml`, `units.txt`, `global_cmvn` (the data's), `state.json` (step, epoch,
//!   position in the epoch, best CER, time: what an exact resume needs; every random
//!   draw of training is keyed by seed, epoch and batch index, so no generator state).
//!
//! Written under `.step-<N>.tmp`, every file flushed, then renamed; `latest` (and `best`)
//! move last, so a crash at any moment leaves the previous checkpoint whole. Reading
//! checks every checksum and shape, whatever the layout that wrote them: a run resumes on
//! another number of workers (resharding by global expert id). A worker reads only its
//! rows ([`read_group_rows`]): of each tensor, the slices that hold some of them, each
//! as its byte range of its file, so a worker of `--ep N` reads the dense tensors and
//! ~1/N of the experts. Only safetensors and JSON are read: no code runs from a
//! checkpoint.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};
use upcycle_dataset::cmvn::CmvnStats;
use upcycle_dataset::text::Units;
use upcycle_files::atomic;
use upcycle_files::confine::confined_join;
use upcycle_model::asr::AsrModel;
use upcycle_model::moe::{placement, Placement};

use crate::config::TrainConfig;
use crate::distributed::Distributed;
use crate::optim::OptimSteps;

/// Whether `name` is a slice of an expert bank (split over the expert-parallel group).
fn is_expert(name: &str) -> bool {
    placement(name) == Placement::Expert
}

/// The manifest's `format`.
const FORMAT: &str = "upcycle-checkpoint/1";

/// Where training stands, saved with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch being trained.
    pub epoch: u64,
    /// Batches of `epoch` consumed by each worker (the next one to train is this index).
    #[serde(default)]
    pub batches_in_epoch: u64,
    /// Batches of `epoch` each worker had in all (a run resumed with another layout or
    /// batch size starts at the same fraction of the epoch).
    #[serde(default)]
    pub epoch_batches: u64,
    /// Best dev CER so far (percent), if evaluated.
    pub best_dev_cer: Option<f64>,
    /// Dev CER of this checkpoint, if evaluated.
    pub dev_cer: Option<f64>,
    /// Seconds of training so far.
    pub train_seconds: f64,
    /// Batches or updates skipped for non-finite values so far.
    #[serde(default)]
    pub skipped: u64,
}

/// How the workers that wrote a checkpoint were arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Workers.
    pub world: usize,
    /// Expert-parallel size.
    pub ep: usize,
    /// Data-parallel size (dense parameters are replicated on all `world`).
    pub dp: usize,
}

impl Layout {
    /// `world` workers with experts spread over groups of `ep`.
    pub fn new(world: usize, ep: usize) -> Self {
        Self {
            world,
            ep,
            dp: world,
        }
    }
}

/// Rows `[start, end)` of a tensor held under `key` in `file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Slice {
    /// File in the checkpoint directory.
    pub file: String,
    /// Tensor name inside the file.
    pub key: String,
    /// First row (of the first dimension; experts for a stacked bank).
    pub start: i64,
    /// One past the last row.
    pub end: i64,
    /// SHA-256 of the slice's bytes (little-endian, row-major).
    pub sha256: String,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Global shape.
    pub shape: Vec<i64>,
    /// Element type (`float32`, ...).
    pub dtype: String,
    /// Where its rows are, in order, covering the first dimension.
    pub slices: Vec<Slice>,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The format and its version: `upcycle-checkpoint/1`.
    pub format: String,
    /// Optimizer steps taken.
    pub step: u64,
    /// Optimizer's own step count (updates taken).
    pub optimizer_step: u64,
    /// Each tensor's own step (its bias correction), by parameter name; absent from
    /// checkpoints of earlier versions, whose tensors with moments all had
    /// `optimizer_step`.
    #[serde(default)]
    pub optimizer_tensor_steps: BTreeMap<String, u64>,
    /// Who wrote it.
    pub layout: Layout,
    /// The configuration that ran.
    pub config: serde_json::Value,
    /// Every tensor, `model/<name>` and `optim/<name>`.
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl Manifest {
    /// The optimizer's step counts.
    pub fn optimizer_steps(&self) -> OptimSteps {
        OptimSteps {
            global: self.optimizer_step,
            per_tensor: self.optimizer_tensor_steps.clone(),
        }
    }
}

/// Fault injection for the crash tests: `UPCYCLE_FAULT_SAVE_PAUSE_MS` makes every stage
/// of a save wait that long, so that a test can kill the process inside any of them.
fn fault_pause() {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("UPCYCLE_FAULT_SAVE_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(p) = pause {
        std::thread::sleep(*p);
    }
}

/// Moves a pointer file (`latest`, `best`) to name `target`, atomically.
fn set_pointer(root: &Path, name: &str, target: &str) -> Result<()> {
    Ok(atomic::write_file(&root.join(name), target.as_bytes())?)
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        other => bail!("{other:?} tensors cannot be checkpointed"),
    })
}

fn safetensors_dtype(d: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype::*;
    Ok(match d {
        F32 => Kind::Float,
        F64 => Kind::Double,
        F16 => Kind::Half,
        BF16 => Kind::BFloat16,
        I64 => Kind::Int64,
        I32 => Kind::Int,
        other => bail!("{other:?} tensors are not read from checkpoints"),
    })
}

/// SHA-256 of a CPU tensor's elements, row-major.
/// The bytes of a contiguous CPU tensor.
///
/// # Safety
/// `t` must be contiguous and on the CPU, and outlive the slice unchanged.
unsafe fn bytes_of(t: &Tensor) -> &[u8] {
    let bytes = t.numel() * t.kind().elt_size_in_bytes();
    if bytes == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) }
    }
}

/// The worker that writes each replicated (dense) tensor: largest first, each to the
/// worker with the fewest bytes so far, so the writing is spread evenly. Every worker
/// computes the same assignment from the same names and sizes.
fn dense_owners(tensors: &[(String, i64)], world: usize) -> BTreeMap<String, usize> {
    let mut order: Vec<&(String, i64)> = tensors.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut load = vec![0i64; world];
    let mut owners = BTreeMap::new();
    for (name, bytes) in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).expect("a worker");
        load[r] += bytes;
        owners.insert(name.clone(), r);
    }
    owners
}

/// What one worker wrote: its file's entries, by tensor.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Part {
    /// `model/<name>` or `optim/<name>` -> (global shape, dtype, the slice written).
    pub entries: Vec<(String, Vec<i64>, String, Slice)>,
}

/// Writes worker `rank`'s file into `dir`: `tensors` are this worker's (expert banks
/// hold its local experts, named `model/...` or `optim/...`). Experts are written by the
/// first expert-data-parallel copy (ranks `0..ep`), dense tensors by their owner.
pub fn write_part(
    dir: &Path,
    layout: Layout,
    rank: usize,
    tensors: &[(String, Tensor)],
) -> Result<Part> {
    let dense: Vec<(String, i64)> = tensors
        .iter()
        .filter(|(n, _)| !is_expert(n))
        .map(|(n, t)| (n.clone(), (t.numel() * t.kind().elt_size_in_bytes()) as i64))
        .collect();
    let owners = dense_owners(&dense, layout.world);
    let file = format!("rank-{rank}.safetensors");
    let mut part = Part::default();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let rows = t.size().first().copied().unwrap_or(1);
        let (start, global) = if is_expert(name) {
            if rank >= layout.ep {
                continue;
            }
            let mut g = t.size();
            g[0] *= layout.ep as i64;
            (rank as i64 * rows, g)
        } else {
            if owners[name] != rank {
                continue;
            }
            (0, t.size())
        };
        part.entries.push((
            name.clone(),
            global,
            dtype_name(t.kind())?.to_string(),
            Slice {
                file: file.clone(),
                key: name.clone(),
                start,
                end: start + rows,
                sha256: String::new(),
            },
        ));
        out.push((name.clone(), t));
    }
    let path = dir.join(&file);
    // SAFETY: `out` holds contiguous CPU tensors that nothing changes until the end.
    let data: Vec<&[u8]> = out.iter().map(|(_, t)| unsafe { bytes_of(t) }).collect();
    // Checksums on a second thread while the file is written: saving costs the longer
    // of the two rather than their sum.
    let sums = std::thread::scope(|scope| -> Result<Vec<String>> {
        let hashing = scope.spawn(|| {
            data.iter()
                .map(|d| format!("{:x}", Sha256::digest(d)))
                .collect::<Vec<_>>()
        });
        Tensor::write_safetensors(&out, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(hashing.join().expect("checksum thread"))
    })?;
    for (entry, sum) in part.entries.iter_mut().zip(sums) {
        entry.3.sha256 = sum;
    }
    fault_pause();
    // Each worker flushes its own file: on a shared file system rank 0 cannot.
    atomic::sync_file(&path)?;
    Ok(part)
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
    /// Optimizer step counts and moments.
    pub optimizer: (OptimSteps, Vec<(String, Tensor)>),
    /// Also point `best` at it.
    pub is_best: bool,
}

/// The temporary directory a checkpoint of `step` is written in (the same name on every
/// worker).
pub fn staging_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!(".step-{step}.tmp"))
}

/// Prepares `staging_dir` (removing a leftover of a crashed save). Rank 0 only.
pub fn begin(root: &Path, step: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = staging_dir(root, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fault_pause();
    Ok(tmp)
}

/// Rank 0, after every worker wrote its part into `tmp`: the manifest and the other
/// files, then the rename and the pointers.
pub fn commit(
    root: &Path,
    tmp: &Path,
    layout: Layout,
    parts: Vec<Part>,
    req: &SaveRequest<'_>,
) -> Result<PathBuf> {
    let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
    for (name, shape, dtype, slice) in parts.into_iter().flat_map(|p| p.entries) {
        let e = tensors.entry(name).or_insert_with(|| TensorEntry {
            shape,
            dtype,
            slices: Vec::new(),
        });
        e.slices.push(slice);
    }
    for e in tensors.values_mut() {
        e.slices.sort_by_key(|s| s.start);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step: req.state.step,
        optimizer_step: req.optimizer.0.global,
        optimizer_tensor_steps: req.optimizer.0.per_tensor.clone(),
        layout,
        config: serde_json::to_value(req.config)?,
        tensors,
    };
    atomic::write_file(
        &tmp.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    fault_pause();
    atomic::write_file(
        &tmp.join("train.yaml"),
        serde_yaml::to_string(req.config)?.as_bytes(),
    )?;
    atomic::write_file(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(req.state)?.as_bytes(),
    )?;
    req.units.save(&tmp.join("units.txt"))?;
    req.cmvn.save(&tmp.join("global_cmvn"))?;
    let name = format!("step-{}", req.state.step);
    let dst = root.join(&name);
    fault_pause();
    // A checkpoint of the same step (a run resumed before it and saving again) goes
    // only after the new one is in place.
    atomic::publish_dir(tmp, &dst)?;
    fault_pause();
    set_pointer(root, "latest", &name)?;
    if req.is_best {
        set_pointer(root, "best", &name)?;
    }
    Ok(dst)
}

fn shallow(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

/// `model/<name>` for parameters, `optim/<name>` for optimizer moments.
fn tagged(model: Vec<(String, Tensor)>, moments: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    model
        .into_iter()
        .map(|(n, t)| (format!("model/{n}"), t))
        .chain(moments.into_iter().map(|(n, t)| (format!("optim/{n}"), t)))
        .collect()
}

/// Every worker: rank 0 prepares the staging directory of `step`; all learn whether it
/// could.
fn begin_all(root: &Path, dist: &Distributed, step: u64) -> Result<PathBuf> {
    let began = if dist.is_main() {
        begin(root, step).map(|_| ())
    } else {
        Ok(())
    };
    if dist.any(began.is_err())? {
        return Err(began
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("rank 0 could not prepare the checkpoint")));
    }
    Ok(staging_dir(root, step))
}

/// Every worker, after writing its part (or failing to): the parts go to rank 0, which
/// writes the manifest and moves the pointers; all return the error if any failed.
fn gather_and_commit(
    root: &Path,
    dist: &Distributed,
    layout: Layout,
    part: std::result::Result<Part, String>,
    req: &SaveRequest<'_>,
) -> Result<PathBuf> {
    let step = req.state.step;
    let parts = dist.gather_strings(&serde_json::to_string(&part)?)?;
    let committed = if dist.is_main() {
        parts
            .iter()
            .enumerate()
            .map(|(r, text)| {
                let part: std::result::Result<Part, String> = serde_json::from_str(text)?;
                part.map_err(|e| anyhow::anyhow!("rank {r} could not write its part: {e}"))
            })
            .collect::<Result<Vec<Part>>>()
            .and_then(|parts| commit(root, &staging_dir(root, step), layout, parts, req))
    } else {
        part.map(|_| root.to_path_buf()).map_err(anyhow::Error::msg)
    };
    if dist.any(committed.is_err())? {
        return Err(committed.err().unwrap_or_else(|| {
            anyhow::anyhow!("checkpoint step-{step} was not written (see rank 0's error)")
        }));
    }
    Ok(root.join(format!("step-{step}")))
}

/// Writes `root/step-<N>/` from every worker of the job: each writes its part (`model`:
/// its parameters, expert banks holding its local experts; the moments of `req`), rank 0
/// the manifest and the rest, then moves the pointers. Every worker calls it; all return
/// the error if any worker failed, and the previous checkpoint stays the latest.
pub fn save_distributed(
    root: &Path,
    dist: &Distributed,
    model: Vec<(String, Tensor)>,
    req: SaveRequest<'_>,
) -> Result<PathBuf> {
    let tensors = tagged(model, shallow(&req.optimizer.1));
    let layout = Layout::new(dist.world(), dist.ep());
    let tmp = begin_all(root, dist, req.state.step)?;
    let part = write_part(&tmp, layout, dist.rank(), &tensors).map_err(|e| format!("{e:#}"));
    gather_and_commit(root, dist, layout, part, &req)
}

/// A save whose part is being written by a background thread.
struct Pending {
    writer: std::thread::JoinHandle<std::result::Result<Part, String>>,
    layout: Layout,
    config: TrainConfig,
    state: TrainState,
    units: Arc<Units>,
    cmvn: CmvnStats,
    optimizer_steps: OptimSteps,
    is_best: bool,
}

/// Saves checkpoints during training, in the foreground or (`background`) by a thread
/// per worker while training goes on; keeps the newest `keep` and the best.
pub struct Checkpointer {
    root: PathBuf,
    background: bool,
    keep: usize,
    pending: Option<Pending>,
}

impl Checkpointer {
    /// Checkpoints under `root`.
    pub fn new(root: PathBuf, background: bool, keep: usize) -> Self {
        Self {
            root,
            background,
            keep,
            pending: None,
        }
    }

    /// Saves (every worker calls it). In the foreground it returns the checkpoint; in the
    /// background the tensors are copied to host memory first and `None` is returned
    /// ([`Checkpointer::poll`] and [`Checkpointer::finish`] complete it). A save first
    /// waits for the one before.
    pub fn save(
        &mut self,
        dist: &Distributed,
        model: Vec<(String, Tensor)>,
        units: &Arc<Units>,
        req: SaveRequest<'_>,
    ) -> Result<Option<PathBuf>> {
        self.finish(dist)?;
        if !self.background {
            let dir = save_distributed(&self.root, dist, model, req)?;
            self.prune(dist)?;
            return Ok(Some(dir));
        }
        // A copy the training step cannot change while it is written.
        let tensors: Vec<(String, Tensor)> = tagged(model, shallow(&req.optimizer.1))
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).copy()))
            .collect();
        let layout = Layout::new(dist.world(), dist.ep());
        let tmp = begin_all(&self.root, dist, req.state.step)?;
        let rank = dist.rank();
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                upcycle_dataset::threads::serial_libtorch();
                write_part(&tmp, layout, rank, &tensors).map_err(|e| format!("{e:#}"))
            })
            .context("starting the checkpoint writer")?;
        self.pending = Some(Pending {
            writer,
            layout,
            config: req.config.clone(),
            state: req.state.clone(),
            units: units.clone(),
            cmvn: req.cmvn.clone(),
            optimizer_steps: req.optimizer.0.clone(),
            is_best: req.is_best,
        });
        Ok(None)
    }

    /// Completes a background save once every worker's part is written (every worker
    /// calls it, e.g. after each step); the checkpoint, if one was completed.
    pub fn poll(&mut self, dist: &Distributed) -> Result<Option<PathBuf>> {
        let Some(p) = &self.pending else {
            return Ok(None);
        };
        if dist.any(!p.writer.is_finished())? {
            return Ok(None);
        }
        self.finish(dist)
    }

    /// Waits for a background save and completes it (every worker calls it).
    pub fn finish(&mut self, dist: &Distributed) -> Result<Option<PathBuf>> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let part = p
            .writer
            .join()
            .unwrap_or_else(|_| Err("the checkpoint writer panicked".into()));
        let req = SaveRequest {
            config: &p.config,
            state: &p.state,
            units: &p.units,
            cmvn: &p.cmvn,
            optimizer: (p.optimizer_steps, Vec::new()),
            is_best: p.is_best,
        };
        let dir = gather_and_commit(&self.root, dist, p.layout, part, &req)?;
        self.prune(dist)?;
        Ok(Some(dir))
    }

    fn prune(&self, dist: &Distributed) -> Result<()> {
        if dist.is_main() {
            prune(&self.root, self.keep)?;
        }
        Ok(())
    }
}

/// Writes `root/step-<N>/` from whole tensors as `layout.world` workers with expert
/// parallelism `layout.ep` would have (offline resharding): each worker's part in turn,
/// then the manifest. `moments` are optimizer moments by name (may be empty).
pub fn save_layout(
    root: &Path,
    layout: Layout,
    model: &BTreeMap<String, Tensor>,
    moments: &BTreeMap<String, Tensor>,
    req: SaveRequest<'_>,
) -> Result<PathBuf> {
    let whole = tagged(
        model
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
        moments
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
    );
    let counts: Vec<i64> = whole
        .iter()
        .filter(|(n, _)| is_expert(n))
        .map(|(_, t)| t.size()[0])
        .collect();
    upcycle_parallel::groups::validate_layout(layout.world, layout.ep, &counts)?;
    let tmp = begin(root, req.state.step)?;
    let mut parts = Vec::new();
    // Only the first expert-data-parallel copy (ranks 0..ep) writes experts.
    for rank in 0..layout.world {
        let local: Vec<(String, Tensor)> = whole
            .iter()
            .map(|(n, t)| {
                if is_expert(n) {
                    let rows = t.size()[0] / layout.ep as i64;
                    let first = (rank % layout.ep) as i64 * rows;
                    (n.clone(), t.narrow(0, first, rows))
                } else {
                    (n.clone(), t.shallow_clone())
                }
            })
            .collect();
        parts.push(write_part(&tmp, layout, rank, &local)?);
    }
    commit(root, &tmp, layout, parts, &req)
}

/// Writes `root/step-<N>/` from one process holding the whole model (every expert), and
/// moves `latest` (and `best`) to it.
pub fn save(root: &Path, model: Vec<(String, Tensor)>, req: SaveRequest<'_>) -> Result<PathBuf> {
    let tmp = begin(root, req.state.step)?;
    let layout = Layout::new(1, 1);
    let part = write_part(&tmp, layout, 0, &tagged(model, shallow(&req.optimizer.1)))?;
    commit(root, &tmp, layout, vec![part], &req)
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
    // Staging directories of saves that crashed.
    for e in std::fs::read_dir(root)?.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".step-") && (name.ends_with(".tmp") || name.ends_with(".old")) {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
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

/// Whether `dir` is a checkpoint: a manifest, or the single-file layout of earlier
/// versions (`model.safetensors`).
fn is_checkpoint(dir: &Path) -> bool {
    dir.join("manifest.json").is_file() || dir.join("model.safetensors").is_file()
}

/// The checkpoint directory that `path` names: a checkpoint itself, a pointer file
/// (`.../checkpoints/best`, `.../checkpoints/latest`: the one it names), or a training
/// output directory or checkpoints folder (its `best`, else `latest`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    resolve_with(path, &["best", "latest"])
}

/// As [`resolve`], but a training output or checkpoints folder gives its `latest`: where
/// a run resumes.
pub fn resolve_latest(path: &Path) -> Result<PathBuf> {
    resolve_with(path, &["latest"])
}

/// The checkpoint a new run starts from (`train --init`, `convert upcycle --from`): as
/// [`resolve_latest`], since UME continues from where the parent stopped (name its
/// `checkpoints/best` to start from the best one). Logs which step it is.
pub fn resolve_parent(path: &Path) -> Result<PathBuf> {
    let dir = resolve_latest(path)?;
    // Imported or consolidated checkpoints may have no trainer state.
    let step = read_state(&dir).ok().map(|s| s.step);
    tracing::info!(from = %path.display(), checkpoint = %dir.display(), step = ?step, "starting from the parent checkpoint");
    Ok(dir)
}

fn resolve_with(path: &Path, pointers: &[&str]) -> Result<PathBuf> {
    if is_checkpoint(path) {
        return Ok(path.to_path_buf());
    }
    if path.is_file() {
        // A pointer asked for by name: what it names, or an error (never another one).
        let name =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let root = path.parent().unwrap_or(Path::new("."));
        let dir = confined_join(root, name.trim(), path)?;
        if !is_checkpoint(&dir) {
            bail!(
                "{} names {}, which is not a checkpoint",
                path.display(),
                dir.display()
            );
        }
        return Ok(dir);
    }
    for root in [path.join("checkpoints"), path.to_path_buf()] {
        for pointer in pointers {
            let file = root.join(pointer);
            if let Ok(name) = std::fs::read_to_string(&file) {
                let dir = confined_join(&root, name.trim(), &file)?;
                if is_checkpoint(&dir) {
                    return Ok(dir);
                }
            }
        }
        // A pointer that names no checkpoint (a crash between renames): the newest one.
        if let Some(dir) = newest(&root) {
            return Ok(dir);
        }
    }
    bail!(
        "{} is neither a checkpoint (no manifest.json) nor a training output with checkpoints/{}",
        path.display(),
        pointers.join(" or checkpoints/")
    )
}

/// The `step-<N>` checkpoint with the largest N under `root`.
fn newest(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            is_checkpoint(&e.path()).then_some((n, e.path()))
        })
        .max()
        .map(|(_, p)| p)
}

/// A checkpoint's manifest; refuses another format.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a checkpoint?)",
            path.display(),
            dir.display()
        )
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid manifest", path.display()))?;
    if m.format != FORMAT {
        bail!(
            "{}: format {:?}, this version reads {FORMAT:?}",
            path.display(),
            m.format
        );
    }
    Ok(m)
}

/// The trainer state saved with a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid trainer state", path.display()))
}

/// Tensor bytes one read of a checkpoint group took from its files, and the bytes of the
/// whole group (what a reader of every row would take); safetensors headers not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BytesRead {
    /// Bytes of tensor data read (whole slices: each is checked against its checksum).
    pub read: u64,
    /// Bytes of tensor data in the group.
    pub total: u64,
}

/// One safetensors file of a checkpoint, opened for reads of byte ranges: its header
/// parsed, its tensors' bytes read only when asked for.
struct SliceFile {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    /// Where the tensor data begins (after the length and the header).
    data_start: u64,
    tensors: std::collections::HashMap<String, safetensors::tensor::TensorInfo>,
}

impl SliceFile {
    fn open(path: PathBuf) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut claim = [0u8; 8];
        let got = file.read_at(&mut claim, 0)?;
        check_header_claim(&path, &claim[..got], len)?;
        let n = u64::from_le_bytes(claim);
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .with_context(|| format!("reading the header of {}", path.display()))?;
        let metadata: safetensors::tensor::Metadata = std::str::from_utf8(&header)
            .ok()
            .and_then(|h| serde_json::from_str(h).ok())
            .with_context(|| {
                format!(
                    "{}: not a safetensors file (its header does not parse); use another \
                     checkpoint",
                    path.display()
                )
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.clone()))
            .collect();
        Ok(Self {
            path,
            file,
            len,
            data_start: 8 + n,
            tensors,
        })
    }

    /// The bytes, element type and shape of tensor `key`, read from its byte range only.
    fn read(&self, key: &str) -> Result<(Vec<u8>, Kind, Vec<i64>)> {
        use std::os::unix::fs::FileExt;
        let info = self
            .tensors
            .get(key)
            .with_context(|| format!("{} does not hold {key}", self.path.display()))?;
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let kind = safetensors_dtype(info.dtype)?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let claimed = info
            .shape
            .iter()
            .try_fold(info.dtype.size() as u64, |n, &d| n.checked_mul(d as u64));
        if end < start
            || claimed != Some(end - start)
            || self
                .data_start
                .checked_add(end)
                .is_none_or(|e| e > self.len)
        {
            bail!(
                "{}: tensor {key} claims bytes {start}..{end} for shape {shape:?}, the file \
                 holds {}: it is truncated or damaged; use another checkpoint",
                self.path.display(),
                self.len
            );
        }
        let mut bytes = vec![0u8; (end - start) as usize];
        self.file
            .read_exact_at(&mut bytes, self.data_start + start)
            .with_context(|| format!("reading {key} from {}", self.path.display()))?;
        Ok((bytes, kind, shape))
    }
}

/// The whole tensors of one group (`model` or `optim`) of a checkpoint, by name, put
/// together from every worker's slices; each slice's checksum, shape and dtype are
/// checked, and a missing file or tensor is named.
pub fn read_group(dir: &Path, group: &str) -> Result<BTreeMap<String, Tensor>> {
    let every_row = |_: &str, rows: i64| Ok(0..rows);
    Ok(read_group_rows(dir, group, &every_row)?.0)
}

/// Rows `rows(name, first dimension)` of every tensor of one group of a checkpoint, by
/// name, and the bytes that took. Only the slices that hold some of those rows are read,
/// each as its byte range of its file (a slice partly wanted is read whole, to check its
/// checksum); the manifest is checked whole (every tensor's slices cover its rows).
pub fn read_group_rows(
    dir: &Path,
    group: &str,
    rows: &dyn Fn(&str, i64) -> Result<Range<i64>>,
) -> Result<(BTreeMap<String, Tensor>, BytesRead)> {
    if !dir.join("manifest.json").is_file() && group == "model" {
        return read_single_file(dir, rows);
    }
    let manifest = read_manifest(dir)?;
    let prefix = format!("{group}/");
    let mut files: BTreeMap<&str, SliceFile> = BTreeMap::new();
    let mut bytes = BytesRead::default();
    let mut out = BTreeMap::new();
    for (tagged, entry) in manifest.tensors.iter() {
        let Some(name) = tagged.strip_prefix(&prefix) else {
            continue;
        };
        let total_rows = entry.shape.first().copied().unwrap_or(1);
        let want = rows(name, total_rows)?;
        if want.start < 0 || want.end > total_rows || (want.is_empty() && total_rows > 0) {
            bail!(
                "{}: tensor {tagged} has {total_rows} rows, rows {want:?} were asked for: \
                 the model does not match this checkpoint",
                dir.display()
            );
        }
        let mut parts = Vec::new();
        let mut next = 0;
        for slice in &entry.slices {
            let claimed = slice_bytes(entry, slice);
            if slice.start != next || claimed.is_none() {
                bail!(
                    "{}: tensor {tagged}: the manifest says rows {}..{} in {}, expected rows from \
                     {next} of shape {:?} {}: the manifest is damaged; use another checkpoint",
                    dir.display(),
                    slice.start,
                    slice.end,
                    slice.file,
                    entry.shape,
                    entry.dtype
                );
            }
            next = slice.end;
            let claimed = claimed.expect("checked");
            bytes.total = bytes.total.saturating_add(claimed);
            let (first, last) = (slice.start.max(want.start), slice.end.min(want.end));
            // A tensor of no rows still has its (empty) slice read, for its shape.
            if first >= last && total_rows > 0 {
                continue;
            }
            if !files.contains_key(slice.file.as_str()) {
                let path = confined_join(dir, &slice.file, &dir.join("manifest.json"))?;
                if !path.is_file() {
                    bail!(
                        "{}: {} is missing (a checkpoint copied in part?); it holds {tagged}",
                        dir.display(),
                        slice.file
                    );
                }
                files.insert(slice.file.as_str(), SliceFile::open(path)?);
            }
            let file = &files[slice.file.as_str()];
            if claimed > file.len {
                bail!(
                    "{}: tensor {tagged}: the manifest claims rows {}..{} of shape {:?} {} in {} \
                     ({claimed} bytes), which holds {} bytes: the manifest is damaged; use \
                     another checkpoint",
                    dir.display(),
                    slice.start,
                    slice.end,
                    entry.shape,
                    entry.dtype,
                    slice.file,
                    file.len
                );
            }
            let t = read_slice(dir, tagged, entry, slice, file)?;
            bytes.read += claimed;
            parts.push(match entry.shape.is_empty() || total_rows == 0 {
                true => t,
                false => t.narrow(0, first - slice.start, last - first),
            });
        }
        if next != total_rows {
            bail!(
                "{}: tensor {tagged} has rows up to {next} of {:?}",
                dir.display(),
                entry.shape
            );
        }
        let t = match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(&parts, 0),
        };
        out.insert(name.to_string(), t);
    }
    Ok((out, bytes))
}

/// One slice of tensor `tagged`, read from `file` and checked against the manifest
/// (shape, dtype, checksum).
fn read_slice(
    dir: &Path,
    tagged: &str,
    entry: &TensorEntry,
    slice: &Slice,
    file: &SliceFile,
) -> Result<Tensor> {
    let (data, kind, shape) = file
        .read(&slice.key)
        .map_err(|e| anyhow::anyhow!("{}: tensor {tagged}: {e:#}", dir.display()))?;
    let mut want = entry.shape.clone();
    if let Some(first) = want.first_mut() {
        *first = slice.end - slice.start;
    }
    if shape != want || dtype_name(kind)? != entry.dtype {
        bail!(
            "{}: tensor {tagged} in {}: rows {}..{} of shape {shape:?} {}, the manifest \
             says shape {want:?} {}",
            dir.display(),
            slice.file,
            slice.start,
            slice.end,
            dtype_name(kind)?,
            entry.dtype
        );
    }
    if format!("{:x}", Sha256::digest(&data)) != slice.sha256 {
        bail!(
            "{}: tensor {tagged} in {} does not match its checksum: the file is \
             damaged; use another checkpoint",
            dir.display(),
            slice.file
        );
    }
    Ok(Tensor::from_data_size(&data, &shape, kind))
}

/// The single-file layout of earlier versions (`model.safetensors`, no manifest): read
/// whole, then narrowed.
fn read_single_file(
    dir: &Path,
    rows: &dyn Fn(&str, i64) -> Result<Range<i64>>,
) -> Result<(BTreeMap<String, Tensor>, BytesRead)> {
    let file = dir.join("model.safetensors");
    let len = std::fs::metadata(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let mut out = BTreeMap::new();
    for (name, t) in
        Tensor::read_safetensors(&file).with_context(|| format!("reading {}", file.display()))?
    {
        let total = t.size().first().copied().unwrap_or(1);
        let want = rows(&name, total)?;
        let t = match t.dim() {
            0 => t,
            _ => t.narrow(0, want.start, want.end - want.start),
        };
        out.insert(name, t);
    }
    Ok((
        out,
        BytesRead {
            read: len,
            total: len,
        },
    ))
}

/// A safetensors file begins with the length of its header: a claim beyond the file's end
/// (a truncated or damaged file, `len` bytes long, beginning with `first`) is named here,
/// before anything is parsed.
fn check_header_claim(path: &Path, first: &[u8], len: u64) -> Result<()> {
    let Some(claim) = first.get(..8) else {
        bail!(
            "{}: {len} bytes, too short for a safetensors file: it is truncated; use another \
             checkpoint",
            path.display()
        );
    };
    let claim = u64::from_le_bytes(claim.try_into().expect("8 bytes"));
    let holds = len - 8;
    if claim > holds {
        bail!(
            "{}: the safetensors header claims {claim} bytes, the file holds {holds} after its \
             length: it is truncated or damaged; use another checkpoint",
            path.display()
        );
    }
    Ok(())
}

/// The bytes a manifest says one slice holds (`None`: beyond 2^64, or a bad shape or dtype).
fn slice_bytes(entry: &TensorEntry, slice: &Slice) -> Option<u64> {
    let kind = [
        Kind::Float,
        Kind::Double,
        Kind::Half,
        Kind::BFloat16,
        Kind::Int64,
        Kind::Int,
    ]
    .into_iter()
    .find(|&k| dtype_name(k).is_ok_and(|n| n == entry.dtype))?;
    let rows = u64::try_from(slice.end.checked_sub(slice.start)?).ok()?;
    let row: u64 = entry
        .shape
        .iter()
        .skip(1)
        .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))?;
    rows.checked_mul(row)?
        .checked_mul(kind.elt_size_in_bytes() as u64)
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
    let model = config.build_model(&vs.root(), crate::config::vocab(&units))?;
    load_weights(&dir, &vs)?;
    Ok(LoadedModel {
        config,
        units,
        vs,
        model,
        dir,
    })
}

/// The model parameters of a checkpoint, whole (every expert), by name.
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    read_group(dir, "model")
}

/// Copies a checkpoint directory's tensors into every variable of `vs`; a missing
/// tensor or a shape that differs is an error naming the tensor.
pub fn load_weights(dir: &Path, vs: &nn::VarStore) -> Result<()> {
    let file = dir;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing, seeded, a fixed number of inputs: a two-worker checkpoint (an expert bank
    /// in two slices, a dense tensor, a scalar; `tests/fuzz/checkpoint/`) read with its
    /// manifest mutated, then with a slice file mutated. No input may panic, hang (2 s
    /// each) or allocate above the test binary's bound.
    #[test]
    fn fuzz_checkpoint_reader() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/checkpoint");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let copy_seeds = || {
            for e in std::fs::read_dir(seeds.join("slices")).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
            std::fs::copy(
                seeds.join("manifest/manifest.json"),
                dir.join("manifest.json"),
            )
            .unwrap();
        };
        copy_seeds();
        let whole = read_group(dir, "model").unwrap();
        assert_eq!(whole["experts"].size(), [2, 2]);
        let limit = std::time::Duration::from_secs(2);
        let manifests = upcycle_files::fuzz::seeds(&seeds.join("manifest"));
        upcycle_files::fuzz::run("manifest", &manifests, 19_003, 1500, limit, |bytes| {
            std::fs::write(dir.join("manifest.json"), bytes).unwrap();
            let _ = read_group(dir, "model");
        });
        copy_seeds();
        let slices = upcycle_files::fuzz::seeds(&seeds.join("slices"));
        upcycle_files::fuzz::run("safetensors", &slices, 19_004, 1500, limit, |bytes| {
            std::fs::write(dir.join("rank-0.safetensors"), bytes).unwrap();
            let _ = read_group(dir, "model");
        });
    }

    #[test]
    fn pointers_choose_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let root = run.join("checkpoints");
        for step in [2, 4] {
            let dir = root.join(format!("step-{step}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("manifest.json"), "{}").unwrap();
        }
        std::fs::write(root.join("best"), "step-2").unwrap();
        std::fs::write(root.join("latest"), "step-4\n").unwrap();
        let (best, latest) = (root.join("step-2"), root.join("step-4"));
        for path in [run, root.as_path()] {
            // Decoding prefers the best; resuming and a parent for a new run, the latest.
            assert_eq!(resolve(path).unwrap(), best);
            assert_eq!(resolve_latest(path).unwrap(), latest);
            assert_eq!(resolve_parent(path).unwrap(), latest);
        }
        // A pointer named is followed, whoever resolves it.
        for f in [resolve, resolve_latest, resolve_parent] {
            assert_eq!(f(&root.join("best")).unwrap(), best);
            assert_eq!(f(&root.join("latest")).unwrap(), latest);
            assert_eq!(f(&best).unwrap(), best);
        }
        // ... and never replaced by another when it names no checkpoint.
        std::fs::write(root.join("best"), "step-3").unwrap();
        let e = resolve_parent(&root.join("best")).unwrap_err().to_string();
        assert!(e.contains("step-3, which is not a checkpoint"), "{e}");
    }

    #[test]
    fn manifests_without_per_tensor_steps_still_read() {
        // Written before each tensor had its own step.
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "format": FORMAT, "step": 5, "optimizer_step": 5,
            "layout": {"world": 1, "ep": 1, "dp": 1}, "config": {}, "tensors": {}
        }))
        .unwrap();
        assert_eq!(
            m.optimizer_steps(),
            OptimSteps {
                global: 5,
                per_tensor: BTreeMap::new()
            }
        );
    }
}
