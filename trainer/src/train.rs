//! The training loop (single process): data, model, AdamW, schedule, gradient
//! accumulation and clipping, dynamic chunks, non-finite loss handling, metrics,
//! periodic dev evaluation and checkpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};
use upcycle_data::cmvn::CmvnStats;
use upcycle_data::loader::{stream_seed, Batch, DataLoader, Mode, Shard};
use upcycle_data::text::Units;
use upcycle_model::asr::AsrModel;
use upcycle_model::asr::Losses;
use upcycle_model::loss::distillation_loss;
use upcycle_model::mask::ChunkMode;
use upcycle_model::moe::Routing;
use upcycle_model::precision::autocast;
use upcycle_model::search::ctc_greedy;
use upcycle_parallel::groups::validate_layout;

use crate::checkpoint::{self, SaveRequest, TrainState};
use crate::config::TrainConfig;
use crate::distributed::Distributed;
use crate::freeze::FreezeSchedule;
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, Schedule};
use crate::scoring::ErrorRate;

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

    /// Adds the window's means to a metrics line (`loss_balance`, `loss_z`,
    /// `loss_distill`, and `moe`: per layer the share of token copies each expert
    /// computed, copies dropped and mean router entropy) and starts a new window.
    fn take_into(&mut self, line: &mut serde_json::Value, batches: u64) {
        let mean = |t: &Option<Tensor>| t.as_ref().map(|t| t.double_value(&[]) / batches as f64);
        for (key, part) in [
            ("loss_balance", &self.balance),
            ("loss_z", &self.z_loss),
            ("loss_distill", &self.distill),
        ] {
            if let Some(v) = mean(part) {
                line[key] = v.into();
            }
        }
        if !self.layers.is_empty() {
            let layers: serde_json::Map<String, serde_json::Value> = self
                .layers
                .iter()
                .map(|(name, load, dropped, entropy)| {
                    let load = Vec::<i64>::try_from(load).unwrap_or_default();
                    let total = load.iter().sum::<i64>().max(1) as f64;
                    let share: Vec<f64> = load.iter().map(|&c| c as f64 / total).collect();
                    let v = json!({"load": share, "dropped": dropped.int64_value(&[]),
                                   "entropy": entropy.double_value(&[]) / batches as f64});
                    (name.clone(), v)
                })
                .collect();
            line["moe"] = layers.into();
        }
        *self = Self::default();
    }
}

/// Dev-set loss and CTC greedy CER.
fn evaluate(
    model: &AsrModel,
    loader: &DataLoader,
    units: &Units,
    device: Device,
    limit: usize,
) -> Result<(f64, ErrorRate)> {
    let mut loss_sum = 0.0;
    let mut utts = 0usize;
    let mut er = ErrorRate::default();
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0)? {
            let b = match limit {
                0 => batch?,
                _ => batch?.first(limit - utts),
            };
            let l = model.forward(
                &b.feats.to_device(device),
                &b.feats_lengths.to_device(device),
                &b.target.to_device(device),
                &b.target_lengths.to_device(device),
                ChunkMode::Full,
                false,
            );
            let n = b.len();
            loss_sum += l.loss.double_value(&[]) * n as f64;
            utts += n;
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
            if limit > 0 && utts >= limit {
                break;
            }
        }
        Ok(())
    })?;
    Ok((loss_sum / utts.max(1) as f64, er))
}

fn to_device(b: &Batch, d: Device) -> [tch::Tensor; 4] {
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
    let uc = config.upcycle_conf.clone();
    if !(uc.collective_timeout_s > 0.0 && uc.collective_timeout_s.is_finite()) {
        bail!("upcycle_conf.collective_timeout_s must be a positive number of seconds");
    }
    let dist = Distributed::new(
        opts.ep,
        std::time::Duration::from_secs_f64(uc.collective_timeout_s),
        opts.device,
    )?;
    let device = dist.device;
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
        std::fs::write(opts.out.join("train.yaml"), serde_yaml::to_string(&config)?)?;
    }

    tch::manual_seed(uc.seed as i64);
    let vs = nn::VarStore::new(device);
    let vocab = crate::config::vocab(&units);
    let moe = dist.moe_context(config.moe_conf.clone());
    let mut model = config.build_model_with(&vs.root(), vocab, &moe)?;
    let (mean, istd) = cmvn.mean_istd();
    model.encoder_mut().global_cmvn_mut().set(&mean, &istd);
    let resume = match &opts.resume {
        Some(dir) => Some(checkpoint::resolve_latest(dir)?),
        None => checkpoint::resolve_latest(&opts.out.join("checkpoints")).ok(),
    };
    if let Some(dir) = &resume {
        check_resumable(dir, &config)?;
        if opts.init.is_some() {
            tracing::warn!(from = %dir.display(), "resuming the run; --init is ignored");
        }
    }
    // The whole model this worker holds a part of: a checkpoint, or (experts spread
    // over ranks) the one a single process would build from this seed.
    let whole = if let Some(dir) = &resume {
        tracing::info!(from = %dir.display(), "resuming");
        Some((checkpoint::read_tensors(dir)?, dir.display().to_string()))
    } else if let Some(init) = &opts.init {
        // Weights (and CMVN buffers) only: step 0, a fresh optimizer.
        let dir = checkpoint::resolve_parent(init)?;
        Some((checkpoint::read_tensors(&dir)?, dir.display().to_string()))
    } else if dist.ep() > 1 {
        tch::manual_seed(uc.seed as i64);
        let full = nn::VarStore::new(device);
        let mut m = config.build_model(&full.root(), vocab)?;
        m.encoder_mut().global_cmvn_mut().set(&mean, &istd);
        Some((
            full.variables().into_iter().collect(),
            "the seeded model".into(),
        ))
    } else {
        None
    };
    if let Some((tensors, from)) = whole {
        dist.load_global(&tensors, &vs)
            .with_context(|| format!("loading {from}"))?;
    }
    dist.broadcast_parameters(&vs)?;
    let teacher = uc
        .distill
        .as_ref()
        .map(|d| -> Result<_> {
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
            Ok((t, d.weight))
        })
        .transpose()?;
    let n_params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    tracing::info!(params = n_params, vocab = vocab.size, sos_eos = vocab.sos_eos, device = ?device, "model built");

    let mut opt_conf = config.optim_conf.clone();
    if config.optim == "adam" {
        opt_conf.weight_decay = 0.0;
    }
    let params: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect();
    let freeze = FreezeSchedule::new(&uc.freeze, &params).map_err(anyhow::Error::msg)?;
    let mut phase = None;
    // In name order: every worker synchronises the same gradients in the same order.
    let param_list: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .collect();
    let mut opt = AdamW::new(opt_conf, params.into_iter().collect());
    let mut state = TrainState::default();
    if let Some(dir) = &resume {
        let manifest = checkpoint::read_manifest(dir)?;
        let moments = checkpoint::read_group(dir, "optim")?
            .into_iter()
            .map(|(n, t)| Ok((n.clone(), dist.local_rows(&n, &t)?)))
            .collect::<Result<Vec<_>>>()?;
        opt.load_state(&manifest.optimizer_steps(), moments)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        state = checkpoint::read_state(dir)?;
    }
    let schedule = Schedule::new(
        &config.scheduler,
        config.optim_conf.lr,
        &config.scheduler_conf,
    );
    let train_loader = DataLoader::new(
        &train_list,
        units.clone(),
        config.dataset_conf.clone(),
        Mode::Train,
        dist.shard(),
        uc.seed,
    )?;
    let dev_loader = DataLoader::new(
        &dev_list,
        units.clone(),
        config.dataset_conf.clone(),
        Mode::Eval,
        Shard::SINGLE,
        uc.seed,
    )?;
    let batches_per_epoch = train_loader.plan(0)?.batches_per_rank as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(config.accum_grad);
    let total_steps = if uc.max_steps > 0 {
        uc.max_steps
    } else {
        steps_per_epoch * config.max_epoch
    };
    let eval_interval = if uc.eval_interval > 0 {
        uc.eval_interval
    } else {
        steps_per_epoch.max(1)
    };

    // Rank 0 writes the metrics and shows progress.
    let mut metrics = dist
        .is_main()
        .then(|| MetricsLog::create(&opts.out, uc.tensorboard))
        .transpose()?;
    let mut log = |line: serde_json::Value| -> Result<()> {
        metrics.as_mut().map_or(Ok(()), |m| m.log(&line))
    };
    let bar = if dist.is_main() {
        indicatif::ProgressBar::new(total_steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );

    if resume.is_some() {
        // The same share of the epoch is done; with another layout or batch size the
        // batches (and utterances) that follow are not those of an uninterrupted run.
        let now = train_loader.plan(state.epoch)?.batches_per_rank as u64;
        if state.epoch_batches > 0 && now != state.epoch_batches {
            tracing::warn!(
                saved = state.epoch_batches,
                now,
                "resuming with another number of batches per epoch (workers or batch size changed): \
                 the rest of this epoch's data order differs from an uninterrupted run"
            );
            state.batches_in_epoch = state.batches_in_epoch * now / state.epoch_batches;
        }
    }
    let ckpt_root = opts.out.join("checkpoints");
    // Time spent before a resume counts (elapsed_s, max_minutes).
    let started = Instant::now() - std::time::Duration::from_secs_f64(state.train_seconds);
    let mut window = Instant::now();
    let (mut win_frames, mut win_loss, mut win_ctc, mut win_att, mut win_n) =
        (0usize, 0.0, 0.0, 0.0, 0u64);
    let mut win_moe = RoutingWindow::default();
    let mut times = StepTimes::default();
    upcycle_model::profile::enable(uc.profile_forward);
    let mut micro = 0u64;
    let mut nonfinite_run = 0u32;
    let mut skipped_total = state.skipped;
    let mut last_ckpt = PathBuf::new();
    let mut checkpointer =
        checkpoint::Checkpointer::new(ckpt_root.clone(), uc.async_checkpoint, uc.keep_checkpoints);
    let mut last_dev_cer = None;
    let out_of_time =
        |s: &Instant| uc.max_minutes > 0.0 && s.elapsed().as_secs_f64() >= uc.max_minutes * 60.0;

    bar.set_position(state.step);
    let first_epoch = state.epoch;
    'epochs: for epoch in first_epoch..config.max_epoch.max(1) {
        if state.step >= total_steps {
            break;
        }
        let skip = if epoch == first_epoch {
            state.batches_in_epoch as usize
        } else {
            0
        };
        state.epoch = epoch;
        bar.set_prefix(format!("epoch {epoch}"));
        let batches = train_loader.epoch_from(epoch, skip)?;
        state.epoch_batches = batches.plan().batches_per_rank as u64;
        let mut batches = batches;
        loop {
            let asked = Instant::now();
            let Some(batch) = batches.next() else {
                break;
            };
            let b = batch?;
            times.data += asked.elapsed().as_secs_f64();
            let mut lap = Instant::now();
            state.batches_in_epoch = b.index as u64 + 1;
            // Every random draw of the step is keyed by (seed, epoch, batch): a resumed
            // run draws what the uninterrupted one would have.
            let key = [uc.seed, epoch, b.index as u64];
            let mut chunk_rng = ChaCha8Rng::seed_from_u64(stream_seed(&key));
            tch::manual_seed(stream_seed(&[key[0], key[1], key[2], dist.rank() as u64]) as i64);
            let [feats, lens, target, tlens] = to_device(&b, device);
            let (draw, left_draw) = (chunk_rng.random(), chunk_rng.random());
            let chunk = if state.step < uc.full_context_steps {
                ChunkMode::Full
            } else {
                model.encoder().training_chunk_mode(draw, left_draw)
            };
            if phase != Some(freeze.phase_at(state.step)) {
                phase = Some(freeze.phase_at(state.step));
                let trainable = freeze.apply(state.step);
                tracing::info!(step = state.step, phase = ?phase.flatten(), trainable, "freezing phase");
            }
            let mut l = autocast(uc.precision, device, || {
                model.forward(&feats, &lens, &target, &tlens, chunk, true)
            });
            let distill = teacher.as_ref().map(|(t, weight)| {
                let (teacher_out, _) = autocast(uc.precision, device, || {
                    tch::no_grad(|| {
                        t.model
                            .encoder()
                            .forward(&feats, &lens, chunk, false, &mut Routing::off())
                    })
                });
                let (student_out, mask) = &l.encoder_out;
                let d = distillation_loss(student_out, &teacher_out, mask);
                l.loss = &l.loss + &d * *weight;
                d
            });
            let loss = l.loss.double_value(&[]);
            times.forward += lap_secs(&mut lap);
            if dist.any(!loss.is_finite())? {
                nonfinite_run += 1;
                skipped_total += 1;
                tracing::warn!(step = state.step, keys = ?b.keys, "non-finite loss {loss}; batch skipped");
                if nonfinite_run >= uc.max_nonfinite_steps {
                    bar.abandon();
                    bail!(
                        "{nonfinite_run} batches in a row had a non-finite loss (upcycle_conf.max_nonfinite_steps); \
                         stopping. Lower optim_conf.lr or raise scheduler_conf.warmup_steps; the last checkpoint is {}",
                        last_ckpt.display()
                    );
                }
                continue;
            }
            nonfinite_run = 0;
            (&l.loss / config.accum_grad as f64).backward();
            times.backward += lap_secs(&mut lap);
            micro += 1;
            win_frames += b.num_frames;
            win_loss += loss;
            win_ctc += l.ctc.double_value(&[]);
            win_att += l.att.double_value(&[]);
            win_n += 1;
            win_moe.add(&l, distill.as_ref());
            if micro % config.accum_grad != 0 {
                continue;
            }
            dist.sync_gradients(&param_list)?;
            let grad_norm = match dist.grad_norm(&param_list)? {
                Some(norm) => {
                    opt.clip_to(norm, config.grad_clip);
                    norm
                }
                None => opt.clip_grad_norm(config.grad_clip),
            };
            times.sync += lap_secs(&mut lap);
            let lr = schedule.lr(state.step);
            if grad_norm.is_finite() {
                opt.step(lr)?;
            } else {
                skipped_total += 1;
                tracing::warn!(
                    step = state.step,
                    "non-finite gradient norm; update skipped"
                );
            }
            opt.zero_grad();
            times.optimizer += lap_secs(&mut lap);
            state.step += 1;
            bar.inc(1);

            if state.step % config.log_interval.max(1) == 0 || state.step == total_steps {
                let secs = window.elapsed().as_secs_f64();
                // Means over every worker's batches; frames/s of the whole job.
                let totals =
                    dist.sum(&[win_frames as f64, win_loss, win_ctc, win_att, win_n as f64])?;
                let [frames, total_loss, total_ctc, total_att, batches] = totals[..] else {
                    unreachable!("five sums")
                };
                let fps = frames / secs.max(1e-9);
                let n = batches.max(1.0);
                let mut line = json!({
                    "step": state.step, "epoch": epoch, "loss": total_loss / n, "loss_ctc": total_ctc / n,
                    "loss_att": total_att / n, "lr": lr, "grad_norm": grad_norm, "frames_per_s": fps,
                    "peak_rss_mib": peak_rss_mib(), "skipped": skipped_total,
                    "elapsed_s": started.elapsed().as_secs_f64(), "freeze_phase": phase.flatten(),
                });
                win_moe.take_into(&mut line, win_n.max(1));
                times.take_into(&mut line);
                for (part, secs) in upcycle_model::profile::take() {
                    line[format!("time_fwd_{part}_s")] = secs.into();
                }
                log(line)?;
                bar.set_message(format!(
                    "loss {:.2} lr {lr:.2e} {fps:.0} frames/s",
                    total_loss / n
                ));
                (win_frames, win_loss, win_ctc, win_att, win_n) = (0, 0.0, 0.0, 0.0, 0);
                window = Instant::now();
            }
            let done = dist.any(state.step >= total_steps || out_of_time(&started))?;
            if state.step % eval_interval == 0 || done {
                let (dev_loss, er) =
                    evaluate(&model, &dev_loader, &units, device, uc.eval_utterances)?;
                // Only training's forward passes are profiled.
                upcycle_model::profile::take();
                let cer = er.cer();
                // Ties go to the newer checkpoint.
                let is_best = state.best_dev_cer.is_none_or(|b| cer <= b);
                if is_best {
                    state.best_dev_cer = Some(cer);
                }
                state.dev_cer = Some(cer);
                last_dev_cer = Some(cer);
                state.train_seconds = started.elapsed().as_secs_f64();
                state.skipped = skipped_total;
                log(
                    json!({"step": state.step, "epoch": epoch, "dev_loss": dev_loss, "dev_cer": cer,
                           "dev_wer": er.wer(), "elapsed_s": state.train_seconds}),
                )?;
                bar.println(format!(
                    "step {:>6}  dev loss {dev_loss:.3}  dev CER {cer:.2}% (CTC greedy){}",
                    state.step,
                    if is_best { "  best" } else { "" }
                ));
                // Every worker writes its part; rank 0 the manifest.
                let stall = Instant::now();
                let saved = checkpointer.save(
                    &dist,
                    vs.variables().into_iter().collect(),
                    &units,
                    SaveRequest {
                        config: &config,
                        state: &state,
                        units: &units,
                        cmvn: &cmvn,
                        optimizer: opt.state(),
                        is_best,
                    },
                )?;
                log(
                    json!({"step": state.step, "checkpoint_stall_s": stall.elapsed().as_secs_f64()}),
                )?;
                if let Some(dir) = saved {
                    last_ckpt = dir;
                }
                window = Instant::now();
            }
            if let Some(dir) = checkpointer.poll(&dist)? {
                last_ckpt = dir;
            }
            if done {
                break 'epochs;
            }
        }
    }
    if let Some(dir) = checkpointer.finish(&dist)? {
        last_ckpt = dir;
    }
    bar.finish_and_clear();
    Ok(TrainReport {
        steps: state.step,
        dev_cer: last_dev_cer,
        best_dev_cer: state.best_dev_cer,
        seconds: started.elapsed().as_secs_f64(),
        last_checkpoint: last_ckpt,
    })
}
