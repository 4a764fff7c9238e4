//! The training loop: data, model, AdamW, schedule, gradient accumulation and
//! clipping, dynamic chunks, non-finite loss handling, metrics, periodic dev evaluation
//! and checkpoints, in one process or many.
//!
//! [`Trainer::new`] builds a run (or restores it from a checkpoint) and
//! [`Trainer::run`] is the loop, each phase a method: `step`, `log_step`, `evaluate`,
//! `checkpoint`. The step itself (forward, backward, gradient synchronisation and
//! clipping, the optimizer) is [`Learner`]'s, which the training-step benchmark times.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};
use upcycle_model::asr::{AsrModel, Losses, Vocab};
use upcycle_model::balance::{expert_bias_name, is_expert_bias, update_expert_bias};
use upcycle_model::host;
use upcycle_model::loss::distillation_loss;
use upcycle_model::mask::ChunkMode;
use upcycle_model::moe::{MoeContext, Routing};
use upcycle_model::precision::{autocast, Precision};
use upcycle_model::search::ctc_greedy;
use upcycle_parallel::groups::validate_layout;

use crate::checkpoint::{self, Checkpointer, LoadedModel, SaveRequest, TrainState};
use crate::config::{TrainConfig, UpcycleConf};
use crate::distributed::Distributed;
use crate::freeze::FreezeSchedule;
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, StagedSchedule};
use crate::scoring::ErrorRate;
use upcycle_dataset::cmvn::CmvnStats;
use upcycle_dataset::loader::{stream_seed, Batch, DataLoader, EpochIter, Mode};
use upcycle_dataset::text::Units;

/// What `upcycle train` was asked to do.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The config file.
    pub config: PathBuf,
    /// Dataset directory (from `data prepare`).
    pub data: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Overrides `upcycle_conf.max_steps`.
    pub max_steps: Option<u64>,
    /// Overrides `upcycle_conf.max_minutes`.
    pub max_minutes: Option<f64>,
    /// Device to train on.
    pub device: Device,
    /// Start from this checkpoint's weights (step 0, fresh optimizer), e.g. a dense
    /// parent or its upcycled MoE.
    pub init: Option<PathBuf>,
    /// Expert-parallel size (workers sharing one copy of the experts); 1 in one process.
    pub ep: usize,
    /// Continue this checkpoint's run exactly (weights, optimizer, data position,
    /// schedule); without it a run continues from `out`'s latest checkpoint if there is one.
    pub resume: Option<PathBuf>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Last dev CER (CTC greedy), percent.
    pub dev_cer: Option<f64>,
    /// Best dev CER, percent.
    pub best_dev_cer: Option<f64>,
    /// Wall seconds of training.
    pub seconds: f64,
    /// The last checkpoint written.
    pub last_checkpoint: PathBuf,
}

/// Peak resident memory of this process in MiB (Linux), for the metrics.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// MoE losses and routing statistics summed over a log interval (tensors, so that the
/// steps in between do not wait for them).
#[derive(Default)]
struct RoutingWindow {
    balance: Option<Tensor>,
    z_loss: Option<Tensor>,
    distill: Option<Tensor>,
    /// Per layer, in forward order: name, token copies per expert, dropped, entropy sum.
    layers: Vec<(String, Tensor, Tensor, Tensor)>,
}

fn accumulate(sum: &mut Option<Tensor>, part: Option<&Tensor>) {
    if let Some(p) = part {
        let p = p.detach();
        *sum = Some(match sum.take() {
            Some(s) => s + p,
            None => p,
        });
    }
}

impl RoutingWindow {
    fn add(&mut self, l: &Losses, distill: Option<&Tensor>) {
        accumulate(&mut self.balance, l.balance.as_ref());
        accumulate(&mut self.z_loss, l.z_loss.as_ref());
        accumulate(&mut self.distill, distill);
        if self.layers.is_empty() {
            self.layers = l
                .routing
                .layers
                .iter()
                .map(|r| {
                    let zero = r.dropped.zeros_like();
                    (
                        r.layer.clone(),
                        r.tokens_per_expert.zeros_like(),
                        zero,
                        Tensor::from(0f64),
                    )
                })
                .collect();
        }
        for (acc, r) in self.layers.iter_mut().zip(&l.routing.layers) {
            acc.1 = &acc.1 + &r.tokens_per_expert;
            acc.2 = &acc.2 + &r.dropped;
            acc.3 = &acc.3 + r.entropy.to_kind(Kind::Double);
        }
    }

    /// Adds the window's means over every worker's batches to a metrics line
    /// (`loss_balance`, `loss_z`, `loss_distill`, and `moe`: per layer the share of token
    /// copies each expert computed, copies dropped and mean router entropy) and starts a
    /// new window. Every worker calls it: the sums travel in one all-reduce, read once.
    /// `batches` is the window's batch count over all workers.
    fn take_into(
        &mut self,
        line: &mut serde_json::Value,
        dist: &Distributed,
        batches: f64,
    ) -> Result<()> {
        let device = dist.device;
        let losses = [
            ("loss_balance", &self.balance),
            ("loss_z", &self.z_loss),
            ("loss_distill", &self.distill),
        ];
        // Every worker has the same losses and layers (one config), so the layouts agree.
        let mut parts: Vec<Tensor> = losses
            .iter()
            .filter_map(|(_, t)| t.as_ref())
            .map(|t| t.to_kind(Kind::Double).reshape([1]))
            .collect();
        for (_, load, dropped, entropy) in &self.layers {
            parts.push(load.to_kind(Kind::Double).reshape([-1]));
            parts.push(dropped.to_kind(Kind::Double).reshape([1]));
            parts.push(entropy.to_kind(Kind::Double).reshape([1]));
        }
        if parts.is_empty() {
            return Ok(());
        }
        let parts: Vec<Tensor> = parts.iter().map(|t| t.to_device(device)).collect();
        let sums = host::to_vec_f64(&dist.sum_on_device(&Tensor::cat(&parts, 0))?)?;
        let mut next = sums.into_iter();
        let mut take = |n: usize| -> Vec<f64> { next.by_ref().take(n).collect() };
        for (key, part) in losses {
            if part.is_some() {
                line[key] = (take(1)[0] / batches).into();
            }
        }
        if !self.layers.is_empty() {
            let layers: serde_json::Map<String, serde_json::Value> = self
                .layers
                .iter()
                .map(|(name, load, _, _)| {
                    let load = take(load.numel());
                    let total = load.iter().sum::<f64>().max(1.0);
                    let share: Vec<f64> = load.iter().map(|c| c / total).collect();
                    let dropped = take(1)[0] as i64;
                    let entropy = take(1)[0] / batches;
                    let v = json!({"load": share, "dropped": dropped, "entropy": entropy});
                    (name.clone(), v)
                })
                .collect();
            line["moe"] = layers.into();
        }
        *self = Self::default();
        Ok(())
    }
}

/// Dev-set loss and CTC greedy CER, the dev set split over the workers: each decodes its
/// own shard (`loader` is sharded like training's) and the sums are added up, so the
/// result is the whole set's, computed once rather than on every worker. Every worker
/// runs every batch index (the loader gives all the same count, repeats flagged and not
/// scored), so the expert-parallel all-to-all stays in step; with `limit` (utterances in
/// all), each worker scores about `limit / world` and all stop together.
fn evaluate_dev(
    model: &AsrModel,
    loader: &DataLoader,
    units: &Units,
    dist: &Distributed,
    limit: usize,
) -> Result<(f64, ErrorRate)> {
    let own_limit = limit.div_ceil(dist.world());
    let mut loss_sum = 0.0;
    let mut er = ErrorRate::default();
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0)? {
            let done = own_limit > 0 && er.utterances >= own_limit;
            if own_limit > 0 && !dist.any(!done)? {
                break;
            }
            let mut b = batch?;
            if !done && own_limit > 0 {
                b = b.first(own_limit - er.utterances);
            }
            let l = model.forward(
                &b.feats.to_device(dist.device),
                &b.feats_lengths.to_device(dist.device),
                &b.target.to_device(dist.device),
                &b.target_lengths.to_device(dist.device),
                ChunkMode::Full,
                false,
            );
            if b.repeated || done {
                continue;
            }
            loss_sum += l.loss.double_value(&[]) * b.len() as f64;
            let hlens = l
                .encoder_out
                .1
                .squeeze_dim(1)
                .sum_dim_intlist(-1, false, Kind::Int64);
            let hyps = ctc_greedy(&l.ctc_log_probs, &hlens);
            let targets = Vec::<i64>::try_from(b.target.flatten(0, -1))?;
            let width = b.target.size()[1] as usize;
            for (i, h) in hyps.iter().enumerate() {
                let reference: Vec<i64> = targets[i * width..(i + 1) * width]
                    .iter()
                    .copied()
                    .filter(|&t| t >= 0)
                    .collect();
                er.add(&units.decode(&reference), &units.decode(&h.tokens));
            }
        }
        Ok(())
    })?;
    let counts = [
        er.char_errors,
        er.chars,
        er.word_errors,
        er.words,
        er.utterances,
    ];
    let mut sums = dist.sum(&[loss_sum])?;
    sums.extend(dist.sum(&counts.map(|c| c as f64))?);
    let [loss_sum, char_errors, chars, word_errors, words, utterances] = sums[..] else {
        unreachable!("six sums")
    };
    let er = ErrorRate {
        char_errors: char_errors as usize,
        chars: chars as usize,
        word_errors: word_errors as usize,
        words: words as usize,
        utterances: utterances as usize,
    };
    Ok((loss_sum / er.utterances.max(1) as f64, er))
}

/// A batch's `[feats, feats_lengths, target, target_lengths]` on device `d`.
pub fn to_device(b: &Batch, d: Device) -> [tch::Tensor; 4] {
    [
        b.feats.to_device(d),
        b.feats_lengths.to_device(d),
        b.target.to_device(d),
        b.target_lengths.to_device(d),
    ]
}

/// Where a log window's time went on this worker (seconds): waiting for batches, forward
/// (with the losses), backward, gradient synchronisation and clipping, optimizer.
#[derive(Debug, Default)]
struct StepTimes {
    data: f64,
    forward: f64,
    backward: f64,
    sync: f64,
    optimizer: f64,
}

impl StepTimes {
    fn take_into(&mut self, line: &mut serde_json::Value) {
        let t = std::mem::take(self);
        for (key, v) in [
            ("time_data_s", t.data),
            ("time_forward_s", t.forward),
            ("time_backward_s", t.backward),
            ("time_sync_s", t.sync),
            ("time_optimizer_s", t.optimizer),
        ] {
            line[key] = v.into();
        }
    }
}

/// Seconds since `lap`, which moves to now.
fn lap_secs(lap: &mut Instant) -> f64 {
    let now = Instant::now();
    let secs = (now - *lap).as_secs_f64();
    *lap = now;
    secs
}

/// The config keys that decide what a checkpoint's tensors mean: a resumed run must
/// agree on them.
const MODEL_KEYS: [&str; 9] = [
    "input_dim",
    "encoder",
    "encoder_conf",
    "decoder",
    "decoder_conf",
    "model",
    "model_conf",
    "moe_conf",
    "optim",
];

/// Refuses to resume `dir` with a config that builds another model, naming the key.
fn check_resumable(dir: &std::path::Path, config: &TrainConfig) -> Result<()> {
    let saved = serde_json::to_value(TrainConfig::load(&dir.join("train.yaml"))?)?;
    let now = serde_json::to_value(config)?;
    for key in MODEL_KEYS {
        if let Some(path) = first_difference(&saved[key], &now[key], key) {
            bail!(
                "cannot resume {}: the config's {path} differs from the checkpoint's ({} there, {} \
                 now); resume with the checkpoint's config, or start a new run from its \
                 weights with --init and another --out",
                dir.display(),
                pointer(&saved, &path),
                pointer(&now, &path)
            );
        }
    }
    Ok(())
}

/// The dotted path of the first place where `a` and `b` differ.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(x), Object(y)) => x.keys().chain(y.keys()).find_map(|k| {
            first_difference(
                x.get(k).unwrap_or(&serde_json::Value::Null),
                y.get(k).unwrap_or(&serde_json::Value::Null),
                &format!("{path}.{k}"),
            )
        }),
        _ => (a != b).then(|| path.to_string()),
    }
}

fn pointer(v: &serde_json::Value, path: &str) -> serde_json::Value {
    let p = format!("/{}", path.replace('.', "/"));
    v.pointer(&p).cloned().unwrap_or(serde_json::Value::Null)
}

/// Trains until `max_steps`, `max_minutes` or `max_epoch`, whichever comes first.
pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    Trainer::new(opts)?.run()
}

/// The model `config` builds on `vs` from seed `seed` (its experts placed as `moe`
/// says), normalising its input with CMVN `mean` and inverse standard deviation `istd`.
pub fn build_model(
    config: &TrainConfig,
    vs: &nn::VarStore,
    vocab: Vocab,
    moe: &MoeContext,
    (mean, istd): (&[f32], &[f32]),
    seed: u64,
) -> Result<AsrModel> {
    tch::manual_seed(seed as i64);
    let mut model = config.build_model_with(&vs.root(), vocab, moe)?;
    model.encoder_mut().global_cmvn_mut().set(mean, istd);
    Ok(model)
}

/// One batch's forward pass (with the losses, on the device: the step reads none).
pub struct Forward {
    /// The model's losses and routing statistics; `losses.loss` is the objective
    /// (distillation included).
    pub losses: Losses,
    /// The distillation term before its weight, when there is a teacher.
    pub distill: Option<Tensor>,
}

/// The model being trained and what updates it: the training step that the trainer
/// runs and the benchmark times. One optimizer step is [`Learner::forward`] and
/// [`Learner::backward`] on each of `accum_grad` batches, then [`Learner::sync_and_clip`]
/// and [`Learner::apply`].
pub struct Learner {
    model: AsrModel,
    /// A frozen model whose encoder output the student's is pulled towards, and the
    /// weight of that term.
    teacher: Option<(LoadedModel, f64)>,
    opt: AdamW,
    /// In name order: every worker synchronises the same gradients in the same order.
    params: Vec<(String, Tensor)>,
    precision: Precision,
    device: Device,
    accum_grad: u64,
    grad_clip: f64,
    /// The routers' expert biases by name (`moe_conf.expert_bias`), and their step.
    expert_biases: BTreeMap<String, Tensor>,
    bias_update_rate: f64,
    /// Per MoE layer, token copies each expert computed in this step's batches so far.
    step_load: Vec<(String, Tensor)>,
    /// Whether a loss of this step's batches so far was not finite (bool, on the device).
    nonfinite_loss: Option<Tensor>,
}

/// The gradient norm of an update and whether it is skipped, on the device: the step
/// reads neither (the norm is read at log intervals).
pub struct GradNorm {
    /// The global norm before clipping (float64 scalar).
    pub norm: Tensor,
    /// 1.0 when the norm or a loss of the step on any worker is not finite: the update
    /// is then skipped (float32 scalar, what the fused AdamW takes).
    pub found_inf: Tensor,
}

impl Learner {
    /// `model` (its parameters in `vs`) trained as `config` says (optimizer, precision,
    /// gradient accumulation and clipping), optionally distilled from `teacher`.
    pub fn new(
        vs: &nn::VarStore,
        model: AsrModel,
        config: &TrainConfig,
        teacher: Option<(LoadedModel, f64)>,
    ) -> Self {
        let mut opt_conf = config.optim_conf.clone();
        if config.optim == "adam" {
            opt_conf.weight_decay = 0.0;
        }
        let params: BTreeMap<String, Tensor> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .collect();
        let param_list: Vec<(String, Tensor)> = params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect();
        let expert_biases = vs
            .variables()
            .into_iter()
            .filter(|(n, _)| is_expert_bias(n))
            .collect();
        Self {
            model,
            teacher,
            opt: AdamW::new(opt_conf, params.into_iter().collect()),
            params: param_list,
            precision: config.upcycle_conf.precision,
            device: vs.device(),
            accum_grad: config.accum_grad,
            grad_clip: config.grad_clip,
            expert_biases,
            bias_update_rate: config.moe_conf.bias_update_rate,
            step_load: Vec::new(),
            nonfinite_loss: None,
        }
    }

    /// The routers' expert biases by name (empty without `moe_conf.expert_bias`).
    pub fn expert_biases(&self) -> &BTreeMap<String, Tensor> {
        &self.expert_biases
    }

    /// The model.
    pub fn model(&self) -> &AsrModel {
        &self.model
    }

    /// The trainable parameters, in name order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The optimizer, to restore its state.
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// The forward pass over `[feats, feats_lengths, target, target_lengths]` (on the
    /// model's device) with attention chunks `chunk`, in the configured precision.
    pub fn forward(&self, batch: &[Tensor; 4], chunk: ChunkMode) -> Forward {
        let [feats, lens, target, tlens] = batch;
        let (precision, device) = (self.precision, self.device);
        let mut l = autocast(precision, device, || {
            self.model.forward(feats, lens, target, tlens, chunk, true)
        });
        let distill = self.teacher.as_ref().map(|(t, weight)| {
            let (teacher_out, _) = autocast(precision, device, || {
                tch::no_grad(|| {
                    t.model
                        .encoder()
                        .forward(feats, lens, chunk, false, &mut Routing::off())
                })
            });
            let (student_out, mask) = &l.encoder_out;
            let d = distillation_loss(student_out, &teacher_out, mask);
            l.loss = &l.loss + &d * *weight;
            d
        });
        Forward { losses: l, distill }
    }

    /// Accumulates the gradients of `f`'s objective (divided by the batches an update
    /// accumulates), and, for the expert biases, its load. Fails when an expert-parallel
    /// exchange of the forward or the backward failed (the gradients are then not to be
    /// used).
    pub fn backward(&mut self, f: &Forward) -> Result<()> {
        (&f.losses.loss / self.accum_grad as f64).backward();
        upcycle_parallel::failure::check()?;
        let bad = f.losses.loss.isfinite().logical_not();
        self.nonfinite_loss = Some(match self.nonfinite_loss.take() {
            Some(before) => before.logical_or(&bad),
            None => bad,
        });
        if self.expert_biases.is_empty() {
            return Ok(());
        }
        let layers = &f.losses.routing.layers;
        if self.step_load.is_empty() {
            self.step_load = layers
                .iter()
                .map(|r| (r.layer.clone(), r.tokens_per_expert.zeros_like()))
                .collect();
        }
        for ((_, sum), r) in self.step_load.iter_mut().zip(layers) {
            *sum = &*sum + &r.tokens_per_expert;
        }
        Ok(())
    }

    /// After an update: each expert bias moves towards an even load of the step's global
    /// batch (token copies summed over the workers of `dist`, on the device), and the
    /// global balance statistics start a new step.
    pub fn end_step(&mut self, dist: &Distributed) -> Result<()> {
        self.model.moe().balance.new_step();
        let load = std::mem::take(&mut self.step_load);
        if load.is_empty() {
            return Ok(());
        }
        let local: Vec<Tensor> = load.iter().map(|(_, t)| t.to_kind(Kind::Double)).collect();
        let sizes: Vec<i64> = local.iter().map(|t| t.size()[0]).collect();
        let summed = dist.sum_on_device(&Tensor::cat(&local, 0))?;
        for ((layer, _), global) in load.iter().zip(summed.split_with_sizes(&sizes, 0)) {
            let name = expert_bias_name(layer);
            let bias = self
                .expert_biases
                .get_mut(&name)
                .with_context(|| format!("MoE layer {layer} has no expert bias {name}"))?;
            update_expert_bias(bias, &global, self.bias_update_rate);
        }
        Ok(())
    }

    /// Synchronises the gradients over the workers of `dist` and clips them to the
    /// configured global norm (by a coefficient on the device); returns the norm before
    /// clipping and whether the update is to be skipped.
    pub fn sync_and_clip(&mut self, dist: &Distributed) -> Result<GradNorm> {
        dist.sync_gradients(&self.params)?;
        let norm = match dist.grad_norm(&self.params)? {
            Some(norm) => {
                self.opt.clip_to(&norm, self.grad_clip);
                Some(norm)
            }
            None => self.opt.clip_grad_norm(self.grad_clip),
        };
        let norm = norm.unwrap_or_else(|| Tensor::zeros([], (Kind::Double, self.device)));
        let mut bad = norm.isfinite().logical_not();
        if let Some(loss) = self.nonfinite_loss.take() {
            bad = bad.logical_or(&loss);
        }
        // Every worker skips together: the flag is raised on all when on one.
        let found_inf = dist.max_on_device(&bad.to_kind(Kind::Float))?;
        Ok(GradNorm { norm, found_inf })
    }

    /// Updates the parameters at learning rate `lr`, unless `grad.found_inf` says to skip
    /// (decided on the device), then clears the gradients.
    pub fn apply(&mut self, lr: f64, grad: &GradNorm) -> Result<()> {
        self.opt.step(lr, Some(&grad.found_inf))?;
        self.opt.zero_grad();
        Ok(())
    }
}

/// Updates skipped for a non-finite loss or gradient norm, counted on the device and
/// read at log intervals (float32 scalars).
struct NonfiniteSteps {
    /// Skipped in a row, up to the last update.
    run: Tensor,
    /// The longest run since the last metrics line.
    longest: Tensor,
    /// Skipped since the last metrics line.
    skipped: Tensor,
}

impl NonfiniteSteps {
    fn new(device: Device) -> Self {
        let zero = || Tensor::zeros([], (Kind::Float, device));
        Self {
            run: zero(),
            longest: zero(),
            skipped: zero(),
        }
    }

    /// Counts an update, skipped where `found_inf` is 1.
    fn add(&mut self, found_inf: &Tensor) {
        self.run = (&self.run + 1.0) * found_inf;
        self.longest = self.longest.maximum(&self.run);
        self.skipped = &self.skipped + found_inf;
    }

    /// A new window: the run goes on.
    fn restart(&mut self) {
        self.longest = self.run.copy();
        self.skipped = self.skipped.zeros_like();
    }
}

/// What rank 0 writes and shows (metrics lines, the progress bar; other ranks keep a
/// hidden bar), and the steps since the last metrics line.
struct Log {
    metrics: Option<MetricsLog>,
    bar: indicatif::ProgressBar,
    /// Start of the window (also moved past each evaluation and save).
    window: Instant,
    /// [`host::reads`] at the start of the window.
    reads: u64,
    frames: usize,
    /// Sums of the window's losses, on the device (float64; `None` before a batch).
    loss: Option<Tensor>,
    ctc: Option<Tensor>,
    att: Option<Tensor>,
    batches: u64,
    /// Updates in the window.
    steps: u64,
    nonfinite: NonfiniteSteps,
    routing: RoutingWindow,
    times: StepTimes,
}

impl Log {
    fn new(
        dist: &Distributed,
        out: &std::path::Path,
        tensorboard: bool,
        start: u64,
        steps: u64,
    ) -> Result<Self> {
        let metrics = dist
            .is_main()
            .then(|| MetricsLog::create(out, tensorboard, start))
            .transpose()?;
        let bar = if dist.is_main() {
            indicatif::ProgressBar::new(steps)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Ok(Self {
            metrics,
            bar,
            window: Instant::now(),
            reads: host::reads(),
            frames: 0,
            loss: None,
            ctc: None,
            att: None,
            batches: 0,
            steps: 0,
            nonfinite: NonfiniteSteps::new(dist.device),
            routing: RoutingWindow::default(),
            times: StepTimes::default(),
        })
    }

    /// Writes a metrics line (rank 0).
    fn write(&mut self, line: serde_json::Value) -> Result<()> {
        self.metrics.as_mut().map_or(Ok(()), |m| m.log(&line))
    }

    /// Counts a trained batch of `frames` frames into the window (on the device).
    fn add(&mut self, frames: usize, f: &Forward) {
        self.frames += frames;
        let l = &f.losses;
        for (sum, part) in [
            (&mut self.loss, &l.loss),
            (&mut self.ctc, &l.ctc),
            (&mut self.att, &l.att),
        ] {
            accumulate(sum, Some(&part.to_kind(Kind::Double)));
        }
        self.batches += 1;
        self.routing.add(&f.losses, f.distill.as_ref());
    }

    /// Starts a new window (after a metrics line, an evaluation or a save).
    fn restart(&mut self) {
        (self.frames, self.batches, self.steps) = (0, 0, 0);
        (self.loss, self.ctc, self.att) = (None, None, None);
        self.nonfinite.restart();
        self.window = Instant::now();
        self.reads = host::reads();
    }
}

/// What an optimizer step used.
struct Update {
    lr: f64,
    grad: GradNorm,
}

/// The dataset's files as a run reads them.
struct Dataset {
    train_list: PathBuf,
    dev_list: PathBuf,
    units: Arc<Units>,
    cmvn: CmvnStats,
}

/// A training run: [`Trainer::new`] builds it (or restores it from a checkpoint),
/// [`Trainer::run`] trains it, one method per phase.
pub struct Trainer {
    config: TrainConfig,
    uc: UpcycleConf,
    dist: Distributed,
    data: Dataset,
    vs: nn::VarStore,
    learner: Learner,
    freeze: FreezeSchedule,
    /// The freezing phase in force (`None` before the first step).
    phase: Option<Option<usize>>,
    schedule: StagedSchedule,
    train_loader: DataLoader,
    dev_loader: DataLoader,
    total_steps: u64,
    eval_interval: u64,
    state: TrainState,
    log: Log,
    checkpointer: Checkpointer,
    /// Time spent before a resume counts (elapsed_s, max_minutes).
    started: Instant,
    /// Batches trained since the start (or resume), for gradient accumulation.
    micro: u64,
    /// Updates skipped in a row for a non-finite loss or gradient norm (as last read).
    nonfinite_run: u32,
    last_ckpt: PathBuf,
    last_dev_cer: Option<f64>,
}

impl Trainer {
    /// Builds the run `opts` asks for: the config, the world, the data, the model (from
    /// a seed, `--init`, or the checkpoint it continues), the optimizer, the schedule.
    pub fn new(opts: &TrainOptions) -> Result<Self> {
        let (config, dist) = setup(opts)?;
        let uc = config.upcycle_conf.clone();
        let data = Dataset::open(opts, &config, &dist)?;
        let device = dist.device;
        let vs = nn::VarStore::new(device);
        let vocab = crate::config::vocab(&data.units);
        let moe = dist.moe_context(config.moe_conf.clone());
        let (mean, istd) = data.cmvn.mean_istd();
        let model = build_model(&config, &vs, vocab, &moe, (&mean, &istd), uc.seed)?;
        let resume = restore_weights(opts, &config, &dist, &vs)?;
        let teacher = load_teacher(&uc, &model, device)?;
        let n_params: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        tracing::info!(params = n_params, vocab = vocab.size, sos_eos = vocab.sos_eos, device = ?device, "model built");

        let mut learner = Learner::new(&vs, model, &config, teacher);
        let params: BTreeMap<String, Tensor> = learner
            .params()
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect();
        let freeze = FreezeSchedule::new(&uc.freeze, &params).map_err(anyhow::Error::msg)?;
        let mut state = TrainState::default();
        if let Some(dir) = &resume {
            state = restore_optimizer(dir, &dist, learner.optimizer_mut())?;
        }
        let (train_loader, dev_loader) = data.loaders(&config, &dist)?;
        let batches_per_epoch = train_loader.plan(0)?.batches_per_rank as u64;
        let steps_per_epoch = batches_per_epoch.div_ceil(config.accum_grad);
        let total_steps = match uc.max_steps {
            0 => steps_per_epoch * config.max_epoch,
            n => n,
        };
        let schedule = StagedSchedule::new(
            &config.scheduler,
            config.optim_conf.lr,
            &config.scheduler_conf,
            &uc.freeze,
            total_steps,
        );
        let eval_interval = match uc.eval_interval {
            0 => steps_per_epoch.max(1),
            n => n,
        };
        let mut log = Log::new(&dist, &opts.out, uc.tensorboard, state.step, total_steps)?;
        if resume.is_some() {
            rescale_epoch_position(&mut state, &train_loader)?;
        }
        let started = Instant::now() - std::time::Duration::from_secs_f64(state.train_seconds);
        upcycle_model::profile::enable(uc.profile_forward);
        log.window = Instant::now();
        let checkpointer = Checkpointer::new(
            opts.out.join("checkpoints"),
            uc.async_checkpoint,
            uc.keep_checkpoints,
        );
        Ok(Self {
            config,
            uc,
            dist,
            data,
            vs,
            learner,
            freeze,
            phase: None,
            schedule,
            train_loader,
            dev_loader,
            total_steps,
            eval_interval,
            state,
            log,
            checkpointer,
            started,
            micro: 0,
            nonfinite_run: 0,
            last_ckpt: PathBuf::new(),
            last_dev_cer: None,
        })
    }

    /// Trains until `max_steps`, `max_minutes` or `max_epoch`, whichever comes first:
    /// steps, logs every `log_interval`, evaluates and saves every `eval_interval` and at
    /// the end.
    pub fn run(mut self) -> Result<TrainReport> {
        self.log.bar.set_position(self.state.step);
        let first_epoch = self.state.epoch;
        for epoch in first_epoch..self.config.max_epoch.max(1) {
            if self.state.step >= self.total_steps {
                break;
            }
            let skip = if epoch == first_epoch {
                self.state.batches_in_epoch as usize
            } else {
                0
            };
            let mut batches = self.start_epoch(epoch, skip)?;
            while let Some(batch) = self.next_batch(&mut batches)? {
                // None: the batch was skipped, or its gradients wait for more.
                let Some(update) = self.step(&batch)? else {
                    continue;
                };
                self.log_step(&update)?;
                let done = self.should_stop()?;
                if self.state.step % self.eval_interval == 0 || done {
                    let is_best = self.evaluate()?;
                    self.checkpoint(is_best)?;
                }
                self.poll_checkpoint()?;
                if done {
                    return self.finish();
                }
            }
        }
        self.finish()
    }

    fn start_epoch(&mut self, epoch: u64, skip: usize) -> Result<EpochIter> {
        self.state.epoch = epoch;
        self.log.bar.set_prefix(format!("epoch {epoch}"));
        let batches = self.train_loader.epoch_from(epoch, skip)?;
        self.state.epoch_batches = batches.plan().batches_per_rank as u64;
        Ok(batches)
    }

    /// The next batch of the epoch (the wait counts as data time).
    fn next_batch(&mut self, batches: &mut EpochIter) -> Result<Option<Batch>> {
        let asked = Instant::now();
        let Some(batch) = batches.next() else {
            return Ok(None);
        };
        let b = batch?;
        self.log.times.data += asked.elapsed().as_secs_f64();
        Ok(Some(b))
    }

    /// Trains on one batch: forward and backward, and every `accum_grad` batches the
    /// update. An update whose loss or gradient norm is not finite on any worker is
    /// skipped by all, on the device (counted at log intervals, [`Trainer::log_step`]):
    /// nothing here reads the device.
    fn step(&mut self, b: &Batch) -> Result<Option<Update>> {
        let mut lap = Instant::now();
        self.state.batches_in_epoch = b.index as u64 + 1;
        // Every random draw of the step is keyed by (seed, epoch, batch): a resumed
        // run draws what the uninterrupted one would have.
        let key = [self.uc.seed, self.state.epoch, b.index as u64];
        let mut chunk_rng = ChaCha8Rng::seed_from_u64(stream_seed(&key));
        tch::manual_seed(stream_seed(&[key[0], key[1], key[2], self.dist.rank() as u64]) as i64);
        let batch = to_device(b, self.dist.device);
        let (draw, left_draw) = (chunk_rng.random(), chunk_rng.random());
        let chunk = if self.state.step < self.uc.full_context_steps {
            ChunkMode::Full
        } else {
            self.learner
                .model()
                .encoder()
                .training_chunk_mode(draw, left_draw)
        };
        self.enter_freeze_phase();
        let f = self.learner.forward(&batch, chunk);
        // A failed exchange: the loss is not to be trusted nor the peers waited for.
        upcycle_parallel::failure::check()?;
        self.log.times.forward += lap_secs(&mut lap);
        self.learner.backward(&f)?;
        self.log.times.backward += lap_secs(&mut lap);
        self.micro += 1;
        self.log.add(b.num_frames, &f);
        if self.micro % self.config.accum_grad != 0 {
            return Ok(None);
        }
        let grad = self.learner.sync_and_clip(&self.dist)?;
        self.log.times.sync += lap_secs(&mut lap);
        let lr = self.schedule.lr(self.state.step);
        self.learner.apply(lr, &grad)?;
        self.log.nonfinite.add(&grad.found_inf);
        self.learner.end_step(&self.dist)?;
        self.log.times.optimizer += lap_secs(&mut lap);
        self.state.step += 1;
        self.log.steps += 1;
        self.log.bar.inc(1);
        Ok(Some(Update { lr, grad }))
    }

    /// Sets which parameters train when the step enters another freezing phase.
    fn enter_freeze_phase(&mut self) {
        let step = self.state.step;
        if self.phase != Some(self.freeze.phase_at(step)) {
            self.phase = Some(self.freeze.phase_at(step));
            let trainable = self.freeze.apply(step);
            tracing::info!(step, phase = ?self.phase.flatten(), trainable, "freezing phase");
        }
    }

    /// Counts the window's updates skipped for a non-finite loss or gradient norm
    /// (`skipped`, `longest` in a row, the `run` going on, read at the log interval);
    /// stops the run when `max_nonfinite_steps` of them came in a row.
    fn count_nonfinite(&mut self, skipped: f64, longest: f64, run: f64) -> Result<()> {
        let (skipped, longest) = (skipped as u64, longest as u32);
        self.nonfinite_run = run as u32;
        if skipped == 0 {
            return Ok(());
        }
        self.state.skipped += skipped;
        tracing::warn!(
            step = self.state.step,
            skipped,
            in_a_row_now = self.nonfinite_run,
            "non-finite loss or gradient norm: {skipped} updates skipped since the last metrics line"
        );
        if longest >= self.uc.max_nonfinite_steps {
            self.log.bar.abandon();
            bail!(
                "{longest} updates in a row had a non-finite loss or gradient norm \
                 (upcycle_conf.max_nonfinite_steps); stopping. Lower optim_conf.lr or raise \
                 scheduler_conf.warmup_steps; the last checkpoint is {}",
                self.last_ckpt.display()
            );
        }
        Ok(())
    }

    /// Every `log_interval` steps and at the last: a metrics line of the window's means
    /// over every worker's batches (frames/s of the whole job), then a new window. The
    /// window's device values (losses, the norm, skipped updates) are read here, at once.
    fn log_step(&mut self, update: &Update) -> Result<()> {
        let step = self.state.step;
        if step % self.config.log_interval.max(1) != 0 && step != self.total_steps {
            return Ok(());
        }
        // The steps' own reads (this method's are not theirs).
        let reads_per_step = (host::reads() - self.log.reads) as f64 / self.log.steps.max(1) as f64;
        let Update { lr, grad } = update;
        let device = self.dist.device;
        let sum = |t: &Option<Tensor>| {
            t.as_ref().map_or_else(
                || Tensor::zeros([], (Kind::Double, device)),
                Tensor::shallow_clone,
            )
        };
        let nonfinite = &self.log.nonfinite;
        let window = [
            sum(&self.log.loss),
            sum(&self.log.ctc),
            sum(&self.log.att),
            grad.norm.shallow_clone(),
            nonfinite.skipped.to_kind(Kind::Double),
            nonfinite.longest.to_kind(Kind::Double),
            nonfinite.run.to_kind(Kind::Double),
        ];
        let read = host::to_vec_f64(&Tensor::stack(&window, 0))?;
        let [loss, ctc, att, grad_norm, skipped, longest, run] = read[..] else {
            unreachable!("seven values")
        };
        self.count_nonfinite(skipped, longest, run)?;
        let log = &mut self.log;
        let secs = log.window.elapsed().as_secs_f64();
        let totals = self
            .dist
            .sum(&[log.frames as f64, loss, ctc, att, log.batches as f64])?;
        let [frames, total_loss, total_ctc, total_att, batches] = totals[..] else {
            unreachable!("five sums")
        };
        let fps = frames / secs.max(1e-9);
        let n = batches.max(1.0);
        let lr = *lr;
        let mut line = json!({
            "step": step, "epoch": self.state.epoch, "loss": total_loss / n, "loss_ctc": total_ctc / n,
            "loss_att": total_att / n, "lr": lr, "grad_norm": grad_norm, "frames_per_s": fps,
            "peak_rss_mib": peak_rss_mib(), "skipped": self.state.skipped,
            "elapsed_s": self.started.elapsed().as_secs_f64(), "freeze_phase": self.phase.flatten(),
            "host_reads_per_step": reads_per_step,
        });
        log.routing.take_into(&mut line, &self.dist, n)?;
        for (name, bias) in self.learner.expert_biases() {
            let layer = name.trim_end_matches(&expert_bias_name(""));
            if let Some(entry) = line["moe"].get_mut(layer) {
                entry["expert_bias"] = host::to_vec_f64(bias)?.into();
            }
        }
        log.times.take_into(&mut line);
        for (part, secs) in upcycle_model::profile::take() {
            line[format!("time_fwd_{part}_s")] = secs.into();
        }
        log.write(line)?;
        log.bar.set_message(format!(
            "loss {:.2} lr {lr:.2e} {fps:.0} frames/s",
            total_loss / n
        ));
        log.restart();
        Ok(())
    }

    /// Dev loss and CER (CTC greedy), logged and kept in the state; returns whether the
    /// CER is the best so far (ties go to the newer checkpoint).
    fn evaluate(&mut self) -> Result<bool> {
        let (dev_loss, er) = evaluate_dev(
            self.learner.model(),
            &self.dev_loader,
            &self.data.units,
            &self.dist,
            self.uc.eval_utterances,
        )?;
        upcycle_parallel::failure::check()?;
        // Only training's forward passes are profiled.
        upcycle_model::profile::take();
        let cer = er.cer();
        let state = &mut self.state;
        let is_best = state.best_dev_cer.is_none_or(|b| cer <= b);
        if is_best {
            state.best_dev_cer = Some(cer);
        }
        state.dev_cer = Some(cer);
        self.last_dev_cer = Some(cer);
        state.train_seconds = self.started.elapsed().as_secs_f64();
        let (step, epoch, elapsed) = (state.step, state.epoch, state.train_seconds);
        self.log.write(
            json!({"step": step, "epoch": epoch, "dev_loss": dev_loss, "dev_cer": cer,
                   "dev_wer": er.wer(), "dev_utterances": er.utterances, "elapsed_s": elapsed}),
        )?;
        self.log.bar.println(format!(
            "step {step:>6}  dev loss {dev_loss:.3}  dev CER {cer:.2}% (CTC greedy){}",
            if is_best { "  best" } else { "" }
        ));
        Ok(is_best)
    }

    /// Saves a checkpoint (every worker writes its part; rank 0 the manifest), in the
    /// background when so configured, and logs how long training waited for it.
    fn checkpoint(&mut self, is_best: bool) -> Result<()> {
        let stall = Instant::now();
        let saved = self.checkpointer.save(
            &self.dist,
            self.vs.variables().into_iter().collect(),
            &self.data.units,
            SaveRequest {
                config: &self.config,
                state: &self.state,
                units: &self.data.units,
                cmvn: &self.data.cmvn,
                optimizer: self.learner.optimizer().state(),
                is_best,
            },
        )?;
        self.log.write(
            json!({"step": self.state.step, "checkpoint_stall_s": stall.elapsed().as_secs_f64()}),
        )?;
        if let Some(dir) = saved {
            self.last_ckpt = dir;
        }
        (self.log.window, self.log.reads) = (Instant::now(), host::reads());
        Ok(())
    }

    /// Notes a background save that has finished on every worker.
    fn poll_checkpoint(&mut self) -> Result<()> {
        if let Some(dir) = self.checkpointer.poll(&self.dist)? {
            self.last_ckpt = dir;
        }
        Ok(())
    }

    /// Whether the run stops after this step: its steps or minutes are spent on some
    /// worker (all agree).
    fn should_stop(&self) -> Result<bool> {
        let max = self.uc.max_minutes;
        let out_of_time = max > 0.0 && self.started.elapsed().as_secs_f64() >= max * 60.0;
        self.dist
            .any(self.state.step >= self.total_steps || out_of_time)
    }

    /// Waits for a background save, and reports.
    fn finish(mut self) -> Result<TrainReport> {
        if let Some(dir) = self.checkpointer.finish(&self.dist)? {
            self.last_ckpt = dir;
        }
        self.log.bar.finish_and_clear();
        Ok(TrainReport {
            steps: self.state.step,
            dev_cer: self.last_dev_cer,
            best_dev_cer: self.state.best_dev_cer,
            seconds: self.started.elapsed().as_secs_f64(),
            last_checkpoint: self.last_ckpt,
        })
    }
}

/// The config with `opts`' overrides, validated, and the world of workers it runs in.
fn setup(opts: &TrainOptions) -> Result<(TrainConfig, Distributed)> {
    let mut config = TrainConfig::load(&opts.config)?;
    if let Some(s) = opts.max_steps {
        config.upcycle_conf.max_steps = s;
    }
    if let Some(m) = opts.max_minutes {
        config.upcycle_conf.max_minutes = m;
    }
    config.validate()?;
    for k in config.ignored_keys() {
        tracing::info!("config key {k} is WeNet's and has no effect here");
    }
    let uc = &config.upcycle_conf;
    if !(uc.collective_timeout_s > 0.0 && uc.collective_timeout_s.is_finite()) {
        bail!("upcycle_conf.collective_timeout_s must be a positive number of seconds");
    }
    let dist = Distributed::new(
        opts.ep,
        std::time::Duration::from_secs_f64(uc.collective_timeout_s),
        opts.device,
    )?;
    let expert_counts: Vec<i64> = [
        (
            config.encoder_conf.mlp_type.as_str(),
            config.encoder_conf.n_expert,
        ),
        (
            config.decoder_conf.mlp_type.as_str(),
            config.decoder_conf.n_expert,
        ),
    ]
    .iter()
    .filter(|(t, _)| *t == "moe")
    .map(|&(_, e)| e)
    .collect();
    validate_layout(dist.world(), dist.ep(), &expert_counts)?;
    if uc.threads > 0 {
        tch::set_num_threads(uc.threads);
    }
    Ok((config, dist))
}

impl Dataset {
    /// The dataset `opts.data` (from `upcycle data prepare`), checked against `config`;
    /// rank 0 creates the output directory and writes the config there.
    fn open(opts: &TrainOptions, config: &TrainConfig, dist: &Distributed) -> Result<Self> {
        let train_list = opts.data.join("train/data.list");
        let dev_list = opts.data.join("dev/data.list");
        for p in [&train_list, &dev_list] {
            if !p.is_file() {
                bail!(
                    "{} is missing: --data must be a dataset from `upcycle data prepare`",
                    p.display()
                );
            }
        }
        let units = Arc::new(Units::load(&opts.data.join("units.txt"))?);
        let cmvn = CmvnStats::load(&opts.data.join("global_cmvn"))?;
        if cmvn.mean_stat.len() as i64 != config.input_dim {
            bail!(
                "{}: CMVN has {} dimensions, the config's input_dim is {}",
                opts.data.join("global_cmvn").display(),
                cmvn.mean_stat.len(),
                config.input_dim
            );
        }
        if dist.is_main() {
            std::fs::create_dir_all(&opts.out)
                .with_context(|| format!("creating {}", opts.out.display()))?;
            std::fs::write(opts.out.join("train.yaml"), serde_yaml::to_string(config)?)?;
        }
        Ok(Self {
            train_list,
            dev_list,
            units,
            cmvn,
        })
    }

    /// The training and the dev loader, each over this worker's shard.
    fn loaders(
        &self,
        config: &TrainConfig,
        dist: &Distributed,
    ) -> Result<(DataLoader, DataLoader)> {
        let seed = config.upcycle_conf.seed;
        let train = DataLoader::new(
            &self.train_list,
            self.units.clone(),
            config.dataset_conf.clone(),
            Mode::Train,
            dist.shard(),
            seed,
        )?;
        let dev = DataLoader::new(
            &self.dev_list,
            self.units.clone(),
            config.dataset_conf.clone(),
            Mode::Eval,
            dist.shard(),
            seed,
        )?;
        Ok((train, dev))
    }
}

/// Loads into `vs` the weights the run starts from: the checkpoint it continues (which
/// it returns) or `--init`'s (without either, the seeded build stands); then every
/// worker takes rank 0's replicated parameters.
fn restore_weights(
    opts: &TrainOptions,
    config: &TrainConfig,
    dist: &Distributed,
    vs: &nn::VarStore,
) -> Result<Option<PathBuf>> {
    let resume = match &opts.resume {
        Some(dir) => Some(checkpoint::resolve_latest(dir)?),
        None => checkpoint::resolve_latest(&opts.out.join("checkpoints")).ok(),
    };
    if let Some(dir) = &resume {
        check_resumable(dir, config)?;
        if opts.init.is_some() {
            tracing::warn!(from = %dir.display(), "resuming the run; --init is ignored");
        }
    }
    // This worker's rows of a checkpoint; without one, the model built from the seed is
    // already this worker's part of a single process's (each expert drawn by its global
    // id).
    let from = if let Some(dir) = &resume {
        tracing::info!(from = %dir.display(), "resuming");
        Some(dir.clone())
    } else if let Some(init) = &opts.init {
        // Weights (and CMVN buffers) only: step 0, a fresh optimizer.
        Some(checkpoint::resolve_parent(init)?)
    } else {
        None
    };
    if let Some(dir) = from {
        let tensors = read_local(&dir, "model", dist)?;
        dist.load_local(&tensors, vs)
            .with_context(|| format!("loading {}", dir.display()))?;
    }
    dist.broadcast_parameters(vs)?;
    Ok(resume)
}

/// The frozen teacher of `upcycle_conf.distill` and its weight, checked against the
/// student `model`.
fn load_teacher(
    uc: &UpcycleConf,
    model: &AsrModel,
    device: Device,
) -> Result<Option<(LoadedModel, f64)>> {
    let Some(d) = &uc.distill else {
        return Ok(None);
    };
    let t = checkpoint::load_model(&d.teacher, device)
        .with_context(|| format!("upcycle_conf.distill.teacher {}", d.teacher.display()))?;
    if t.model.encoder().output_size() != model.encoder().output_size() {
        bail!(
            "upcycle_conf.distill.teacher: its encoder width {} differs from the student's {}",
            t.model.encoder().output_size(),
            model.encoder().output_size()
        );
    }
    for mut v in t.vs.trainable_variables() {
        let _ = v.requires_grad_(false);
    }
    Ok(Some((t, d.weight)))
}

/// Restores the optimizer (this worker's rows of its moments) from checkpoint `dir`;
/// returns the run's state there.
fn restore_optimizer(
    dir: &std::path::Path,
    dist: &Distributed,
    opt: &mut AdamW,
) -> Result<TrainState> {
    let manifest = checkpoint::read_manifest(dir)?;
    let moments = read_local(dir, "optim", dist)?.into_iter().collect();
    opt.load_state(&manifest.optimizer_steps(), moments)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    checkpoint::read_state(dir)
}

/// This worker's rows of a checkpoint group (`model` or `optim`): only the slices that
/// hold them are read; the bytes read are logged beside the group's.
fn read_local(
    dir: &std::path::Path,
    group: &str,
    dist: &Distributed,
) -> Result<BTreeMap<String, Tensor>> {
    let (tensors, bytes) =
        checkpoint::read_group_rows(dir, group, &|name, rows| dist.local_range(name, rows))?;
    tracing::info!(
        rank = dist.rank(),
        "{group}: read {} bytes of {} in the checkpoint {}",
        bytes.read,
        bytes.total,
        dir.display()
    );
    Ok(tensors)
}

/// Keeps the same share of the resumed epoch done; with another layout or batch size
/// the batches (and utterances) that follow are not those of an uninterrupted run.
fn rescale_epoch_position(state: &mut TrainState, loader: &DataLoader) -> Result<()> {
    let now = loader.plan(state.epoch)?.batches_per_rank as u64;
    if state.epoch_batches > 0 && now != state.epoch_batches {
        tracing::warn!(
            saved = state.epoch_batches,
            now,
            "resuming with another number of batches per epoch (workers or batch size changed): \
             the rest of this epoch's data order differs from an uninterrupted run"
        );
        state.batches_in_epoch = state.batches_in_epoch * now / state.epoch_batches;
    }
    Ok(())
}
