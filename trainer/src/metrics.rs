//! A run's metrics: `metrics.jsonl` (one JSON object per logged step or evaluation) and
//! the same values as TensorBoard events under `tensorboard/`; reading them back.
//!
//! Training lines hold `step`, the loss parts, `lr`, `grad_norm`, `frames_per_s`,
//! `peak_rss_mib`, `elapsed_s`, ... and for MoE models `moe`: per layer the share of
//! token copies each expert computed (`load`), `dropped` and the router `entropy`.
//! Evaluation lines hold `dev_loss`, `dev_cer`, `dev_wer`. TensorBoard gets every
//! number of a line under a tag made from its key (see [`scalars`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::tensorboard::{self, EventWriter};

/// The metrics file of a run directory.
pub const FILE: &str = "metrics.jsonl";

/// Writes a run's metrics (rank 0 only): JSON lines, and TensorBoard events when asked.
pub struct MetricsLog {
    jsonl: BufWriter<File>,
    events: Option<EventWriter>,
}

impl MetricsLog {
    /// Appends to `run_dir/metrics.jsonl` (a resumed run continues it) and, with
    /// `tensorboard`, starts a new event file in `run_dir/tensorboard/`. A run that
    /// starts at step `start` first drops the lines of later steps: a run that crashed
    /// after its last checkpoint logged them, and this one logs them again (so that each
    /// step is in the file once).
    pub fn create(run_dir: &Path, tensorboard: bool, start: u64) -> Result<Self> {
        let path = run_dir.join(FILE);
        drop_lines_after(&path, start)?;
        let jsonl = BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?,
        );
        let events = tensorboard
            .then(|| {
                let dir = run_dir.join(tensorboard::DIR);
                EventWriter::create(&dir).with_context(|| format!("creating {}", dir.display()))
            })
            .transpose()?;
        Ok(Self { jsonl, events })
    }

    /// Writes one line and its events, and flushes both so that a reader (a plot, a
    /// live TensorBoard) sees it now.
    pub fn log(&mut self, line: &Value) -> Result<()> {
        writeln!(self.jsonl, "{line}")?;
        self.jsonl.flush()?;
        if let Some(ev) = self.events.as_mut() {
            let step = line["step"].as_i64().unwrap_or(0);
            for (tag, v) in scalars(line) {
                ev.scalar(&tag, step, v)?;
            }
            for (layer, load) in moe_loads(line) {
                // Buckets one expert wide: TensorBoard's histogram view then shows the
                // load by expert index over steps.
                let limits: Vec<f64> = (0..load.len()).map(|e| e as f64 + 0.5).collect();
                ev.histogram(&format!("moe/{layer}/load"), step, &limits, &load)?;
            }
            ev.flush()?;
        }
        Ok(())
    }
}

/// Rewrites `path` (atomically) without the lines whose `step` is past `step`, if it has
/// any; lines that are not JSON with a step are kept as they are.
fn drop_lines_after(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let later = |l: &str| {
        serde_json::from_str::<Value>(l)
            .ok()
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| s > step)
    };
    if !text.lines().any(later) {
        return Ok(());
    }
    let kept: String = text
        .lines()
        .filter(|l| !later(l))
        .flat_map(|l| [l, "\n"])
        .collect();
    tracing::info!(
        "{}: dropping the lines after step {step}, which this run logs again",
        path.display()
    );
    upcycle_files::atomic::write_file(path, kept.as_bytes())?;
    Ok(())
}

/// The TensorBoard scalars of a metrics line: evaluation lines (any `dev_` key) give
/// `dev/<key without dev_>`, training lines `train/<key>`, for every number but `step`;
/// each MoE layer gives `moe/<layer>/entropy`, `.../dropped`, `.../load_e<i>` and
/// `.../max_over_even` (the busiest expert's share over an even share).
pub fn scalars(line: &Value) -> Vec<(String, f64)> {
    let Some(map) = line.as_object() else {
        return Vec::new();
    };
    let dev = map.keys().any(|k| k.starts_with("dev_"));
    let mut out: Vec<(String, f64)> = map
        .iter()
        .filter(|(k, _)| *k != "step")
        .filter_map(|(k, v)| {
            let v = v.as_f64()?;
            Some(if dev {
                (format!("dev/{}", k.strip_prefix("dev_").unwrap_or(k)), v)
            } else {
                (format!("train/{k}"), v)
            })
        })
        .collect();
    if let Some(moe) = map.get("moe").and_then(Value::as_object) {
        for (layer, m) in moe {
            for key in ["entropy", "dropped"] {
                if let Some(v) = m[key].as_f64() {
                    out.push((format!("moe/{layer}/{key}"), v));
                }
            }
        }
    }
    for (layer, load) in moe_loads(line) {
        for (e, v) in load.iter().enumerate() {
            out.push((format!("moe/{layer}/load_e{e}"), *v));
        }
        out.push((format!("moe/{layer}/max_over_even"), max_over_even(&load)));
    }
    out
}

/// Per MoE layer of a training line, the share of token copies of each expert.
pub fn moe_loads(line: &Value) -> Vec<(String, Vec<f64>)> {
    line["moe"]
        .as_object()
        .map(|moe| {
            moe.iter()
                .map(|(layer, m)| {
                    let load = m["load"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default();
                    (layer.clone(), load)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The busiest expert's share over an even share (1: balanced; E: one expert takes all).
pub fn max_over_even(load: &[f64]) -> f64 {
    let total: f64 = load.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    load.iter().cloned().fold(0.0, f64::max) / (total / load.len() as f64)
}

/// The lines of `run_dir/metrics.jsonl`; a missing file or a line that is not JSON is
/// an error naming it.
pub fn read(run_dir: &Path) -> Result<Vec<Value>> {
    let file = run_dir.join(FILE);
    if !file.is_file() {
        anyhow::bail!(
            "{} not found: {} is not a training run directory (give the --out of `upcycle train`)",
            file.display(),
            run_dir.display()
        );
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a JSON object", file.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tags_of_training_and_dev_lines() {
        let train = json!({"step": 4, "loss": 2.5, "lr": 1e-3, "freeze_phase": null,
            "moe": {"enc.0": {"load": [0.75, 0.25], "dropped": 0, "entropy": 0.5}}});
        let s = scalars(&train);
        let get = |t: &str| s.iter().find(|(k, _)| k == t).map(|(_, v)| *v);
        assert_eq!(get("train/loss"), Some(2.5));
        assert_eq!(get("train/lr"), Some(1e-3));
        assert_eq!(get("train/step"), None);
        assert_eq!(get("train/freeze_phase"), None);
        assert_eq!(get("moe/enc.0/load_e0"), Some(0.75));
        assert_eq!(get("moe/enc.0/entropy"), Some(0.5));
        assert_eq!(get("moe/enc.0/max_over_even"), Some(1.5));
        let dev = scalars(&json!({"step": 4, "dev_cer": 40.0, "elapsed_s": 3.0}));
        assert_eq!(
            dev,
            vec![("dev/cer".into(), 40.0), ("dev/elapsed_s".into(), 3.0)]
        );
    }

    #[test]
    fn events_only_when_asked() {
        let line = json!({"step": 1, "loss": 2.0});
        for tb in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            MetricsLog::create(dir.path(), tb, 0)
                .unwrap()
                .log(&line)
                .unwrap();
            assert_eq!(read(dir.path()).unwrap(), vec![line.clone()]);
            assert_eq!(dir.path().join(tensorboard::DIR).is_dir(), tb);
        }
    }

    /// A run resumed at step 2 after one that logged steps 1-4 (and a dev line at 4)
    /// before it crashed: steps 3 and 4 are dropped and logged again, once each.
    #[test]
    fn a_resumed_run_logs_each_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = "{\"step\":1,\"loss\":4.0}\n{\"step\":2,\"loss\":3.0}\n\
                       {\"step\":2,\"dev_cer\":50.0}\n{\"step\":3,\"loss\":2.5}\n\
                       {\"step\":4,\"loss\":2.0}\n{\"step\":4,\"dev_cer\":40.0}\n";
        std::fs::write(dir.path().join(FILE), crashed).unwrap();
        let mut log = MetricsLog::create(dir.path(), false, 2).unwrap();
        for step in [3, 4] {
            log.log(&json!({"step": step, "loss": 1.0})).unwrap();
        }
        let steps: Vec<(u64, bool)> = read(dir.path())
            .unwrap()
            .iter()
            .map(|l| (l["step"].as_u64().unwrap(), l.get("dev_cer").is_some()))
            .collect();
        let want = [(1, false), (2, false), (2, true), (3, false), (4, false)];
        assert_eq!(steps, want);
        // Nothing after the start: the file is left as it is.
        let before = std::fs::read(dir.path().join(FILE)).unwrap();
        drop(MetricsLog::create(dir.path(), false, 4).unwrap());
        assert_eq!(std::fs::read(dir.path().join(FILE)).unwrap(), before);
    }

    #[test]
    fn missing_metrics_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("metrics.jsonl not found") && e.contains("upcycle train"),
            "{e}"
        );
        std::fs::write(dir.path().join(FILE), "{\"step\": 1}\nnot json\n").unwrap();
        let e = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(e.contains("line 2"), "{e}");
    }
}
