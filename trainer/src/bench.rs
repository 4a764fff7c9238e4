//! Benchmarks of the Rust side; `bench/` holds the scripts that run them beside their
//! peers and print ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use upcycle_dataset::audio;
use upcycle_dataset::fbank::{Fbank, FbankOptions};

/// One timing of the filterbank over a set of files.
#[derive(Debug, Serialize)]
pub struct FbankTiming {
    /// Frames computed per repetition.
    pub frames: usize,
    /// Seconds of audio per repetition.
    pub audio_seconds: f64,
    /// Wall seconds of each repetition (audio already in memory).
    pub seconds: Vec<f64>,
    /// Median frames per second.
    pub frames_per_second: f64,
}

/// Times feature extraction of `files` (already decoded) on one thread, `repeat` times.
pub fn fbank(files: &[PathBuf], repeat: usize) -> Result<FbankTiming> {
    let audio: Vec<Vec<f32>> = files
        .iter()
        .map(|f| audio::read_model_input(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display())))
        .collect::<Result<_>>()?;
    let fb = Fbank::new(FbankOptions::default());
    let frames: usize = audio.iter().map(|a| fb.num_frames(a.len())).sum();
    let audio_seconds =
        audio.iter().map(|a| a.len()).sum::<usize>() as f64 / audio::SAMPLE_RATE as f64;
    let mut rng = rand::rng();
    let mut seconds = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let mut sink = 0f32;
        for a in &audio {
            sink += fb.compute(a, &mut rng)[0];
        }
        std::hint::black_box(sink);
        seconds.push(t.elapsed().as_secs_f64());
    }
    let median = median(&seconds);
    Ok(FbankTiming {
        frames,
        audio_seconds,
        seconds,
        frames_per_second: frames as f64 / median,
    })
}

/// One timing of full training steps (forward, backward, clipping, AdamW) on a fixed
/// batch.
#[derive(Debug, Serialize)]
pub struct TrainStepTiming {
    /// Trainable parameters.
    pub params: i64,
    /// Utterances in the batch.
    pub utterances: usize,
    /// Feature frames in the batch (before padding).
    pub frames: i64,
    /// Wall seconds of each timed step.
    pub seconds: Vec<f64>,
    /// Frames per second at the median step time.
    pub frames_per_second: f64,
    /// Model FLOPs of one step on the batch's real lengths (`upcycle_model::flops`).
    pub model_flops_per_step: f64,
    /// Model TFLOP/s at the median step time (MFU is this over the device's peak).
    pub model_tflops_per_second: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Loss and CTC loss of every step (warm-up included).
    pub losses: Vec<(f64, f64)>,
}

/// Times `steps` training steps after `warmup` untimed ones, on the first `utts`
/// utterances of `list` (features without dither, full-context attention), on `device`
/// (a GPU's work is waited for before each step's time is taken).
pub fn train_step(
    config: &std::path::Path,
    list: &std::path::Path,
    utts: usize,
    steps: usize,
    warmup: usize,
    lr: f64,
    device: tch::Device,
) -> Result<TrainStepTiming> {
    use crate::config::TrainConfig;
    use crate::distributed::Distributed;
    use crate::train::{build_model, to_device, Learner};
    use tch::{nn, Device, Tensor};
    use upcycle_dataset::cmvn::CmvnStats;
    use upcycle_model::mask::ChunkMode;
    use upcycle_model::moe::MoeContext;

    let mut c = TrainConfig::load(config)?;
    // One batch per update, whatever the config accumulates.
    c.accum_grad = 1;
    let dataset = list
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("..");
    let (batch, units) = first_utterances(list, &dataset.join("units.txt"), utts)?;
    let batch_on_device = to_device(&batch, device);
    let (mean, istd) = CmvnStats::load(&dataset.join("global_cmvn"))
        .map(|c| c.mean_istd())
        .unwrap_or_else(|_| (vec![0.0; 80], vec![1.0; 80]));
    let vs = nn::VarStore::new(device);
    let moe = MoeContext::local(c.moe_conf.clone());
    let vocab = crate::config::vocab(&units);
    let model_flops_per_step = c.flop_shape(vocab).training_step_flops(
        Vec::<i64>::try_from(&batch.feats_lengths)?
            .into_iter()
            .zip(Vec::<i64>::try_from(&batch.target_lengths)?),
    );
    let model = build_model(&c, &vs, vocab, &moe, (&mean, &istd), 0)?;
    let params = vs
        .trainable_variables()
        .iter()
        .map(|v| v.numel() as i64)
        .sum();
    let mut learner = Learner::new(&vs, model, &c, None);
    let world = Distributed::new(1, std::time::Duration::from_secs(600), device)?;
    let mut seconds = Vec::new();
    // Read after the timed steps, as training reads them at log intervals only.
    let mut loss_tensors = Vec::new();
    for i in 0..warmup + steps {
        let start = Instant::now();
        let f = learner.forward(&batch_on_device, ChunkMode::Full);
        learner.backward(&f)?;
        loss_tensors.push(Tensor::stack(&[&f.losses.loss, &f.losses.ctc], 0).detach());
        let grad = learner.sync_and_clip(&world)?;
        learner.apply(lr, &grad)?;
        learner.end_step(&world)?;
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        if i >= warmup {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    let losses = upcycle_model::host::to_vec_f64(&Tensor::stack(&loss_tensors, 0))?
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();
    let median = median(&seconds);
    Ok(TrainStepTiming {
        params,
        utterances: batch.len(),
        frames: batch.num_frames as i64,
        seconds,
        frames_per_second: batch.num_frames as f64 / median,
        model_flops_per_step,
        model_tflops_per_second: model_flops_per_step / median / 1e12,
        peak_rss_mib: crate::train::peak_rss_mib(),
        losses,
    })
}

/// The first `utts` utterances of `list` (features without dither) as one batch, and
/// the units (`units`) that encode their transcripts.
fn first_utterances(
    list: &std::path::Path,
    units: &std::path::Path,
    utts: usize,
) -> Result<(upcycle_dataset::loader::Batch, upcycle_dataset::text::Units)> {
    use upcycle_dataset::list::ListReader;
    use upcycle_dataset::loader::Batch;
    use upcycle_dataset::text::{normalize, Units};

    let units = Units::load(units)?;
    let fb = Fbank::new(FbankOptions::default());
    let mut reader = ListReader::open(list)?;
    let (mut keys, mut feats, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(item) = reader.next() {
        let (_, e) = item?;
        let samples = audio::read_model_input(&reader.resolve(&e.wav))
            .map_err(|err| anyhow::anyhow!("{}: {err}", e.wav))?;
        feats.push(fb.compute(&samples, &mut rand::rng()));
        targets.push(units.encode(&normalize(&e.txt)).0);
        keys.push(e.key);
        if feats.len() >= utts {
            break;
        }
    }
    Ok((
        Batch::pad(0, keys, &feats, fb.dim(), &targets, false),
        units,
    ))
}

/// Timing of one MoE feed-forward layer's forward and backward.
#[derive(Debug, Serialize)]
pub struct MoeLayerTiming {
    /// `grouped_mm`, `bmm` or `loop`.
    pub compute: String,
    /// Tokens routed per pass.
    pub tokens: i64,
    /// Wall seconds of each timed pass.
    pub seconds: Vec<f64>,
    /// Median pass, seconds.
    pub median_s: f64,
}

/// Shapes of the MoE layer benchmark.
#[derive(Debug, Clone, Copy)]
pub struct MoeLayerShape {
    /// Tokens per pass.
    pub tokens: i64,
    /// Model width.
    pub d: i64,
    /// Expert hidden width.
    pub hidden: i64,
    /// Experts.
    pub experts: i64,
    /// Experts per token.
    pub k: i64,
}

/// Times forward + backward (`sum(y * g)`) of one MoE layer (swish experts, no dropout,
/// WeNet routing) over random tokens, `steps` passes after `warmup`.
pub fn moe_layer(
    shape: MoeLayerShape,
    compute: &str,
    steps: usize,
    warmup: usize,
) -> Result<MoeLayerTiming> {
    use std::sync::Arc;
    use tch::{nn, Device, Kind, Tensor};
    use upcycle_model::activation::Activation;
    use upcycle_model::config::MoeConf;
    use upcycle_model::moe::{ExpertBank, LocalDispatch, MoeFeedForward, MoeSpec, Routing};

    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = MoeSpec {
        d: shape.d,
        n_expert: shape.experts,
        k: shape.k,
        activation: Activation::Swish,
        dropout: 0.0,
        conf: MoeConf {
            expert_compute: compute.into(),
            balance_loss_weight: 0.0,
            ..Default::default()
        },
        dispatch: Arc::new(LocalDispatch),
        balance: Arc::default(),
    };
    let path = vs.root() / "moe";
    let bank = ExpertBank::new(&(&path / "experts"), shape.experts, shape.d, shape.hidden);
    let layer = MoeFeedForward::new(&path, bank, &spec);
    let x = Tensor::randn([1, shape.tokens, shape.d], (Kind::Float, Device::Cpu))
        .set_requires_grad(true);
    let g = Tensor::randn([1, shape.tokens, shape.d], (Kind::Float, Device::Cpu));
    let mut seconds = Vec::new();
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let y = layer.forward(&x, None, true, &mut Routing::off());
        (y * &g).sum(Kind::Float).backward();
        if i >= warmup {
            seconds.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(MoeLayerTiming {
        compute: compute.into(),
        tokens: shape.tokens,
        median_s: median(&seconds),
        seconds,
    })
}

/// Save and load of one set of tensors as a sharded checkpoint, against writing and
/// reading the same bytes as one plain file on the same disk, alternating.
#[derive(Debug, Serialize)]
pub struct CheckpointIo {
    /// What was saved.
    pub name: String,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Seconds per repetition: checkpoint save (with fsync and checksums).
    pub save_s: Vec<f64>,
    /// Plain sequential write + fsync of the same bytes.
    pub write_s: Vec<f64>,
    /// Checkpoint load (checksums verified, tensors assembled).
    pub load_s: Vec<f64>,
    /// Plain sequential read of the same bytes.
    pub read_s: Vec<f64>,
    /// Median checkpoint save throughput over the plain write's.
    pub save_ratio: f64,
    /// Median checkpoint load throughput over the plain read's.
    pub load_ratio: f64,
}

/// What training waits for at a save, foreground against background.
#[derive(Debug, Serialize)]
pub struct CheckpointStall {
    /// Seconds training waits for a foreground save (median).
    pub foreground_s: f64,
    /// Seconds training waits when the save is written in the background (median).
    pub background_s: f64,
}

/// The middle value of `v` (the upper one of an even count); NaN when empty.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The parameters of the MoE model `config` builds (vocabulary `vocab`) and AdamW-like
/// moments of the same shapes.
fn model_tensors(
    config: &std::path::Path,
    vocab: i64,
) -> Result<(crate::config::TrainConfig, Vec<(String, tch::Tensor)>)> {
    let c = crate::config::TrainConfig::load(config)?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    c.build_model(&vs.root(), upcycle_model::asr::Vocab::sos_eos_last(vocab))?;
    Ok((c, vs.variables().into_iter().collect()))
}

/// Times checkpoint save/load of the model `config` builds (with moments) and of
/// `synthetic_mib` MiB of random tensors, `repeat` times each against plain file I/O in
/// `dir`; and the stall of a foreground and a background save of the model.
pub fn checkpoint_io(
    config: &std::path::Path,
    synthetic_mib: usize,
    repeat: usize,
    dir: &std::path::Path,
) -> Result<(Vec<CheckpointIo>, CheckpointStall)> {
    use crate::checkpoint::{SaveRequest, TrainState};
    use std::collections::BTreeMap;
    use tch::{Kind, Tensor};
    use upcycle_dataset::cmvn::CmvnStats;
    use upcycle_dataset::text::Units;

    let units = Units::from_texts(["abcdefghijklmnopqrstuvwxyz"]);
    let (config_v, params) = model_tensors(config, units.len() as i64)?;
    let cmvn = CmvnStats::new(config_v.input_dim as usize);
    let moments: BTreeMap<String, Tensor> = params
        .iter()
        .flat_map(|(n, t)| {
            [
                (format!("exp_avg.{n}"), t.randn_like()),
                (format!("exp_avg_sq.{n}"), t.randn_like().abs()),
            ]
        })
        .collect();
    let model: BTreeMap<String, Tensor> = params.into_iter().collect();
    // 16 MiB tensors of random floats.
    let per = 4 << 20;
    let synthetic: BTreeMap<String, Tensor> = (0..synthetic_mib.div_ceil(16))
        .map(|i| {
            (
                format!("synthetic.{i:04}"),
                Tensor::randn([per], (Kind::Float, tch::Device::Cpu)),
            )
        })
        .collect();
    let state = TrainState::default();
    let req = || SaveRequest {
        config: &config_v,
        state: &state,
        units: &units,
        cmvn: &cmvn,
        optimizer: Default::default(),
        is_best: false,
    };
    let empty = BTreeMap::new();
    let cases = [
        ("small MoE + moments", &model, &moments),
        ("synthetic", &synthetic, &empty),
    ];
    let results = cases
        .into_iter()
        .map(|(name, m, o)| time_save_and_load(name, m, o, &req, repeat, dir))
        .collect::<Result<Vec<_>>>()?;
    let stalls = checkpoint_stall(&model, &moments, &units, &req, repeat, dir)?;
    Ok((results, stalls))
}

/// Times `repeat` saves and loads of `m` (with optimizer tensors `o`) as a checkpoint
/// in `dir`, each against a plain write and read of as many bytes.
fn time_save_and_load<'a>(
    name: &str,
    m: &std::collections::BTreeMap<String, tch::Tensor>,
    o: &std::collections::BTreeMap<String, tch::Tensor>,
    req: &dyn Fn() -> crate::checkpoint::SaveRequest<'a>,
    repeat: usize,
    dir: &std::path::Path,
) -> Result<CheckpointIo> {
    use crate::checkpoint::{self, Layout};
    use std::io::{Read, Write};

    let bytes_of = |m: &std::collections::BTreeMap<String, tch::Tensor>| -> u64 {
        m.values()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    };
    let bytes = bytes_of(m) + bytes_of(o);
    let blob: Vec<u8> = (0..bytes).map(|i| (i * 2654435761 % 251) as u8).collect();
    let (mut save_s, mut write_s, mut load_s, mut read_s) = (vec![], vec![], vec![], vec![]);
    for r in 0..repeat {
        let root = dir.join(format!("ckpt-{r}"));
        let _ = std::fs::remove_dir_all(&root);
        let t = Instant::now();
        let saved = checkpoint::save_layout(&root, Layout::new(1, 1), m, o, req())?;
        save_s.push(t.elapsed().as_secs_f64());
        let plain = dir.join(format!("plain-{r}.bin"));
        let t = Instant::now();
        let mut f = std::fs::File::create(&plain)?;
        f.write_all(&blob)?;
        f.sync_all()?;
        write_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let got = checkpoint::read_group(&saved, "model")?;
        let got_o = checkpoint::read_group(&saved, "optim")?;
        load_s.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            got.len() == m.len() && got_o.len() == o.len(),
            "{name}: reloaded"
        );
        let t = Instant::now();
        let mut back = Vec::with_capacity(blob.len());
        std::fs::File::open(&plain)?.read_to_end(&mut back)?;
        read_s.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&root)?;
        std::fs::remove_file(&plain)?;
    }
    Ok(CheckpointIo {
        name: name.into(),
        bytes,
        save_ratio: median(&write_s) / median(&save_s),
        load_ratio: median(&read_s) / median(&load_s),
        save_s,
        write_s,
        load_s,
        read_s,
    })
}

/// What [`crate::checkpoint::Checkpointer::save`] of `model` and `moments` costs the training
/// loop, foreground and background (median of `repeat` saves in `dir`).
fn checkpoint_stall<'a>(
    model: &std::collections::BTreeMap<String, tch::Tensor>,
    moments: &std::collections::BTreeMap<String, tch::Tensor>,
    units: &upcycle_dataset::text::Units,
    req: &dyn Fn() -> crate::checkpoint::SaveRequest<'a>,
    repeat: usize,
    dir: &std::path::Path,
) -> Result<CheckpointStall> {
    use crate::checkpoint::{self, SaveRequest};
    use tch::Tensor;

    let dist = crate::distributed::Distributed::new(
        1,
        std::time::Duration::from_secs(600),
        tch::Device::Cpu,
    )?;
    let units_arc = std::sync::Arc::new(units.clone());
    let stall = |background: bool| -> Result<f64> {
        let mut times = Vec::new();
        for r in 0..repeat {
            let root = dir.join(format!("stall-{background}-{r}"));
            let mut saver = checkpoint::Checkpointer::new(root.clone(), background, 1);
            let opt: Vec<(String, Tensor)> = moments
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            let t = Instant::now();
            saver.save(
                &dist,
                model
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
                &units_arc,
                SaveRequest {
                    optimizer: (Default::default(), opt),
                    ..req()
                },
            )?;
            times.push(t.elapsed().as_secs_f64());
            saver.finish(&dist)?;
            std::fs::remove_dir_all(&root)?;
        }
        Ok(median(&times))
    };
    Ok(CheckpointStall {
        foreground_s: stall(false)?,
        background_s: stall(true)?,
    })
}
