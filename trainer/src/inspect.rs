//! `upcycle inspect`: what a checkpoint holds (layout, step, parameters, per-expert
//! norms), what its routers do on a data set, and the comparison table of finished runs
//! (parameters, training time, CER and RTF per decoding mode).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use upcycle_dataset::loader::{DataLoader, Mode, Shard};
use upcycle_model::asr::AsrModel;
use upcycle_model::mask::ChunkMode;
use upcycle_model::moe::Routing;

use crate::checkpoint::{self, load_model};

/// Parameters of a checkpoint's model: (total, active per token). An expert bank counts
/// `k` of its `E` experts as active for every layer that uses it.
pub fn parameter_counts(dir: &Path) -> Result<(i64, i64)> {
    let m = load_model(dir, Device::Cpu)?;
    let users = |bank: &str| -> i64 {
        // Layers that share a bank point at it from other blocks (encoder_conf.expert_sharing).
        let c = &m.config.encoder_conf;
        c.expert_sharing
            .iter()
            .find(|g| {
                g.iter()
                    .min()
                    .is_some_and(|o| bank.starts_with(&format!("encoder.encoders.{o}.")))
            })
            .map_or(1, |g| g.len() as i64)
    };
    let (mut total, mut active) = (0, 0);
    for (name, v) in m.vs.variables() {
        if !v.requires_grad() {
            continue;
        }
        let n = v.numel() as i64;
        total += n;
        active += if name.contains(".experts.") {
            let k = if name.starts_with("decoder.") {
                m.config.decoder_conf.n_expert_activated
            } else {
                m.config.encoder_conf.n_expert_activated
            };
            n / v.size()[0] * k * users(&name)
        } else {
            n
        };
    }
    Ok((total, active))
}

/// The load table of every MoE layer of `checkpoint` over (up to `utterances` of) the
/// data set `list` (`chunk` 0: full context): share of token copies per expert, the
/// busiest expert's share over an even share, and the mean router entropy.
pub fn routing_table(
    checkpoint: &Path,
    list: &Path,
    utterances: usize,
    chunk: i64,
) -> Result<String> {
    let m = load_model(checkpoint, Device::Cpu)?;
    let list = data_list(list);
    let loader = DataLoader::new(
        &list,
        m.units.clone(),
        m.config.dataset_conf.clone(),
        Mode::Eval,
        Shard::SINGLE,
        0,
    )?;
    let mode = if chunk > 0 {
        ChunkMode::Chunk {
            size: chunk,
            left_chunks: -1,
        }
    } else {
        ChunkMode::Full
    };
    let mut layers: Vec<(String, Tensor, f64)> = Vec::new();
    let mut batches = 0usize;
    let seen = routed_passes(
        &m.model,
        &loader,
        utterances,
        mode,
        Routing::recording,
        |r| {
            if layers.is_empty() {
                layers = r
                    .layers
                    .iter()
                    .map(|r| (r.layer.clone(), r.tokens_per_expert.zeros_like(), 0.0))
                    .collect();
            }
            for (acc, r) in layers.iter_mut().zip(&r.layers) {
                acc.1 = &acc.1 + &r.tokens_per_expert;
                acc.2 += r.entropy.double_value(&[]);
            }
            batches += 1;
        },
    )?;
    if layers.is_empty() {
        bail!("{}: the model has no MoE layer", m.dir.display());
    }
    let experts = layers[0].1.size()[0];
    let mut out = format!(
        "routing of {} on {seen} utterances of {} ({}): share of token copies per expert, %\n\n| layer |",
        m.dir.display(),
        list.display(),
        if chunk > 0 { format!("chunk {chunk}") } else { "full context".into() }
    );
    for e in 0..experts {
        out += &format!(" e{e} |");
    }
    out += " max/even | entropy |\n|---|";
    out += &"---:|".repeat(experts as usize + 2);
    out.push('\n');
    for (name, load, entropy) in &layers {
        let load = Vec::<f64>::try_from(&load.to_kind(Kind::Double)).unwrap_or_default();
        let total: f64 = load.iter().sum::<f64>().max(1.0);
        out += &format!("| {name} |");
        for c in &load {
            out += &format!(" {:.1} |", 100.0 * c / total);
        }
        let max = load.iter().cloned().fold(0.0, f64::max);
        out += &format!(
            " {:.2} | {:.3} |\n",
            max / (total / load.len() as f64),
            entropy / batches as f64
        );
    }
    Ok(out)
}

/// A data set's `data.list`: `path` itself, or the list inside a dataset directory.
pub fn data_list(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("data.list")
    } else {
        path.to_path_buf()
    }
}

/// Runs `model` without gradients, as in evaluation, over the first `utterances` of
/// `loader`'s epoch 0 (0: all), each batch reporting to a fresh `collector()`, which is
/// then given to `each`; returns the utterances seen.
pub fn routed_passes(
    model: &AsrModel,
    loader: &DataLoader,
    utterances: usize,
    mode: ChunkMode,
    collector: fn() -> Routing,
    mut each: impl FnMut(Routing),
) -> Result<usize> {
    let mut seen = 0usize;
    for batch in loader.epoch(0)? {
        let b = match utterances {
            0 => batch?,
            _ => batch?.first(utterances - seen),
        };
        let l = tch::no_grad(|| {
            model.forward_routed(
                &b.feats,
                &b.feats_lengths,
                &b.target,
                &b.target_lengths,
                mode,
                false,
                collector(),
            )
        });
        each(l.routing);
        seen += b.keys.len();
        if utterances > 0 && seen >= utterances {
            break;
        }
    }
    Ok(seen)
}

/// One row of [`runs_table`]: a name and a run directory (`metrics.jsonl`,
/// `checkpoints/`, `eval-test/results.json`).
#[derive(Debug, Clone)]
pub struct RunRow {
    /// Label in the table.
    pub name: String,
    /// The run directory.
    pub dir: PathBuf,
}

/// Seconds of training of a run: the last `elapsed_s` of its metrics.
pub fn last_elapsed(dir: &Path) -> Result<f64> {
    Ok(crate::metrics::read(dir)?
        .iter()
        .filter_map(|v| v["elapsed_s"].as_f64())
        .fold(0.0, f64::max))
}

/// One finished run's numbers, as the comparison table and `docs/experiments/ume.json`
/// hold them: test CER and RTF of attention rescoring, full context and chunk 16.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunNumbers {
    /// Label of the run.
    pub name: String,
    /// `parent`, `dense` (continued), `scratch`, or the upcycling method (`copy`, ...).
    pub method: String,
    /// Parameters.
    pub params: i64,
    /// Parameters active per token.
    pub active_params: i64,
    /// Minutes of this run's own training (a continuation counts only its own).
    pub train_min: f64,
    /// Test CER per language, full context, percent.
    pub cer_by_language: BTreeMap<String, f64>,
    /// Mean of the per-language CERs (each language weighs the same); the overall CER
    /// when the test list has no language tags.
    pub cer_avg: Option<f64>,
    /// Mean per-language CER at chunk 16.
    pub cer_avg_chunk16: Option<f64>,
    /// CER over all test utterances, full context and chunk 16.
    pub cer_full: Option<f64>,
    /// See `cer_full`.
    pub cer_chunk16: Option<f64>,
    /// Real-time factor, full context and chunk 16, measured back to back by one `eval`.
    pub rtf_full: Option<f64>,
    /// See `rtf_full`.
    pub rtf_chunk16: Option<f64>,
}

/// Reads a finished run: parameters, training time and `eval-test/results.json`.
pub fn run_numbers(r: &RunRow, method: &str) -> Result<RunNumbers> {
    let ckpt = checkpoint::resolve_latest(&r.dir.join("checkpoints"))?;
    let (params, active_params) = parameter_counts(&ckpt)?;
    let file = r.dir.join("eval-test/results.json");
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&file)
            .with_context(|| format!("reading {} (run `upcycle eval` first)", file.display()))?,
    )?;
    let mode = |chunk: i64| {
        results.as_array().and_then(|a| {
            a.iter()
                .find(|m| m["method"] == "attention_rescoring" && m["chunk"] == chunk)
        })
    };
    let by_language = |chunk: i64| -> BTreeMap<String, f64> {
        mode(chunk)
            .and_then(|m| m["cer_by_language"].as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(l, c)| Some((l.clone(), c.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let field = |chunk: i64, key: &str| mode(chunk).and_then(|m| m[key].as_f64());
    let average = |chunk: i64| {
        let per = by_language(chunk);
        match per.len() {
            0 => field(chunk, "cer"),
            n => Some(per.values().sum::<f64>() / n as f64),
        }
    };
    Ok(RunNumbers {
        name: r.name.clone(),
        method: method.to_string(),
        params,
        active_params,
        train_min: last_elapsed(&r.dir)? / 60.0,
        cer_by_language: by_language(0),
        cer_avg: average(0),
        cer_avg_chunk16: average(16),
        cer_full: field(0, "cer"),
        cer_chunk16: field(16, "cer"),
        rtf_full: field(0, "rtf"),
        rtf_chunk16: field(16, "rtf"),
    })
}

/// A Markdown table comparing finished runs: parameters (total, active), training
/// minutes, test CER of attention rescoring per language and averaged (full context),
/// CER in full context and at chunk 16, and RTF in both.
pub fn runs_table(runs: &[RunNumbers]) -> String {
    let langs: BTreeSet<&String> = runs.iter().flat_map(|r| r.cer_by_language.keys()).collect();
    let mut out = String::from("| run | params | active | train min |");
    for l in &langs {
        out += &format!(" CER {l} |");
    }
    out += " CER avg | CER full | CER chunk16 | RTF full | RTF chunk16 |\n|---|---:|---:|---:|";
    out += &"---:|".repeat(langs.len() + 5);
    out.push('\n');
    let num = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for r in runs {
        out += &format!(
            "| {} | {:.2}M | {:.2}M | {:.1} |",
            r.name,
            r.params as f64 / 1e6,
            r.active_params as f64 / 1e6,
            r.train_min
        );
        for l in &langs {
            out += &format!(" {} |", num(r.cer_by_language.get(*l).copied(), 2));
        }
        out += &format!(
            " {} | {} | {} | {} | {} |\n",
            num(r.cer_avg, 2),
            num(r.cer_full, 2),
            num(r.cer_chunk16, 2),
            num(r.rtf_full, 4),
            num(r.rtf_chunk16, 4)
        );
    }
    out
}

/// What `upcycle inspect checkpoint` reports.
#[derive(Debug, serde::Serialize)]
pub struct CheckpointSummary {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch and batches of it consumed.
    pub epoch: u64,
    /// Next batch of the epoch.
    pub batches_in_epoch: u64,
    /// Workers and expert parallelism that wrote it (absent for a consolidated one).
    pub layout: Option<checkpoint::Layout>,
    /// Files and their bytes.
    pub files: Vec<(String, u64)>,
    /// Parameters (total, active per token).
    pub parameters: (i64, i64),
    /// Tensors with optimizer moments.
    pub optimizer_tensors: usize,
    /// Best and last dev CER.
    pub dev_cer: (Option<f64>, Option<f64>),
    /// Per expert bank: the L2 norm of each expert's parameters.
    pub expert_norms: Vec<(String, Vec<f64>)>,
}

/// Reads a checkpoint (checking every checksum) and summarises it.
pub fn checkpoint_summary(path: &Path) -> Result<CheckpointSummary> {
    let dir = checkpoint::resolve_latest(path)?;
    let model = checkpoint::read_tensors(&dir)?;
    let sharded = dir.join("manifest.json").is_file();
    let layout = sharded
        .then(|| checkpoint::read_manifest(&dir).map(|m| m.layout))
        .transpose()?;
    let optimizer_tensors = if sharded {
        checkpoint::read_group(&dir, "optim")?.len() / 2
    } else {
        0
    };
    let state = if dir.join("state.json").is_file() {
        checkpoint::read_state(&dir)?
    } else {
        checkpoint::TrainState::default()
    };
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().to_string(), len)
        })
        .collect();
    files.sort();
    // Banks: `<layer>.experts.w_1` etc.; an expert's norm over all its tensors.
    let mut banks: std::collections::BTreeMap<String, Tensor> = Default::default();
    for (name, t) in &model {
        let Some(at) = name.find(".experts.") else {
            continue;
        };
        let sq = t
            .to_kind(Kind::Double)
            .square()
            .flatten(1, -1)
            .sum_dim_intlist(1, false, Kind::Double);
        let bank = name[..at].to_string();
        let sum = match banks.remove(&bank) {
            Some(prev) => prev + sq,
            None => sq,
        };
        banks.insert(bank, sum);
    }
    let expert_norms = banks
        .into_iter()
        .map(|(bank, sq)| (bank, Vec::<f64>::try_from(&sq.sqrt()).unwrap_or_default()))
        .collect();
    Ok(CheckpointSummary {
        parameters: parameter_counts(&dir)?,
        dir,
        step: state.step,
        epoch: state.epoch,
        batches_in_epoch: state.batches_in_epoch,
        layout,
        files,
        optimizer_tensors,
        dev_cer: (state.best_dev_cer, state.dev_cer),
        expert_norms,
    })
}

/// The summary as text for people.
pub fn checkpoint_text(s: &CheckpointSummary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "checkpoint {}", s.dir.display());
    let _ = writeln!(
        out,
        "step {} (epoch {}, next batch {}); layout {}",
        s.step,
        s.epoch,
        s.batches_in_epoch,
        s.layout
            .map_or("consolidated (one file)".into(), |l| format!(
                "world {} ep {} dp {}",
                l.world, l.ep, l.dp
            ))
    );
    let _ = writeln!(
        out,
        "parameters {} ({} active per token); optimizer moments for {} tensors",
        s.parameters.0, s.parameters.1, s.optimizer_tensors
    );
    let fmt = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.2}%"));
    let _ = writeln!(
        out,
        "dev CER best {} last {}",
        fmt(s.dev_cer.0),
        fmt(s.dev_cer.1)
    );
    for (name, bytes) in &s.files {
        let _ = writeln!(out, "  {name:<24} {:>12} bytes", bytes);
    }
    if !s.expert_norms.is_empty() {
        let _ = writeln!(out, "expert norms (L2 of each expert's parameters):");
        for (bank, norms) in &s.expert_norms {
            let row: Vec<String> = norms.iter().map(|n| format!("{n:.3}")).collect();
            let _ = writeln!(out, "  {bank}: {}", row.join(" "));
        }
    }
    out
}
