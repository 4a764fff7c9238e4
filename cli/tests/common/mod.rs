//! Helpers shared by the integration tests that drive the `upcycle` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the binary.
pub(crate) fn upcycle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args(args)
        .output()
        .unwrap()
}

pub(crate) fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Runs `script` (with `args`) in the project's Python environment, in the reference
/// folder (bench/reference); panics with its output if it fails; returns stdout.
pub(crate) fn python(script: &str, args: &[&Path]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Command::new(root.join(".venv/bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .current_dir(root.join("bench/reference"))
        .output()
        .expect("the project's Python environment exists (scripts/setup.sh)");
    assert!(
        o.status.success(),
        "python failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub(crate) fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// pocketsphinx's LibriVox clips prepared as a dataset at `data`.
pub(crate) fn librivox(data: &Path) -> PathBuf {
    ok(&upcycle(&[
        "data",
        "prepare",
        "--no-install",
        "--corpus",
        "librivox",
        "--out",
        data.to_str().unwrap(),
    ]));
    data.to_path_buf()
}

/// The librivox dataset and a tiny config with a short warm-up, in `dir`.
pub(crate) fn setup(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let data = librivox(&dir.join("data"));
    let mut text = std::fs::read_to_string(configs().join("tiny.yaml")).unwrap()
        + "dataset_conf:\n  batch_conf: {batch_type: static, batch_size: 4}\n  filter_conf: {min_length: 0}\n  spec_aug: false\n"
        + "optim: adamw\nlog_interval: 1\n"
        + extra;
    // Defaults for keys `extra` does not set.
    for (key, line) in [
        ("optim_conf:", "optim_conf: {lr: 0.005}\n"),
        ("scheduler_conf:", "scheduler_conf: {warmup_steps: 5}\n"),
    ] {
        if !extra.contains(key) {
            text.push_str(line);
        }
    }
    let config = dir.join("tiny.yaml");
    std::fs::write(&config, text).unwrap();
    (data, config)
}

pub(crate) fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `upcycle train` on the CPU for `steps` steps (from `init`'s weights); its stdout.
pub(crate) fn train(
    config: &Path,
    data: &Path,
    out: &Path,
    steps: u64,
    init: Option<&Path>,
) -> String {
    let init = init.map(|p| p.to_str().unwrap().to_string());
    let extra: Vec<&str> = init.iter().flat_map(|p| ["--init", p.as_str()]).collect();
    run_workers(1, config, data, out, steps, &extra)
}

/// `upcycle train ARGS` as one process, or as `np` MPI workers under `mpirun`.
pub(crate) fn train_workers(np: usize, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_upcycle");
    if np == 1 {
        return Command::new(bin).arg("train").args(args).output().unwrap();
    }
    Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
            bin,
            "train",
        ])
        .args(args)
        .output()
        .expect("mpirun (Debian openmpi-bin, installed by scripts/setup.sh)")
}

/// `upcycle train`'s arguments for `steps` steps on the CPU, then `extra`.
pub(crate) fn train_args(
    config: &Path,
    data: &Path,
    out: &Path,
    steps: u64,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--config",
        config.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        &steps.to_string(),
        "--device",
        "cpu",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Trains `steps` steps on the CPU with `np` workers (`extra`: more arguments); panics
/// with the output if it fails; returns stdout.
pub(crate) fn run_workers(
    np: usize,
    config: &Path,
    data: &Path,
    out: &Path,
    steps: u64,
    extra: &[&str],
) -> String {
    let args = train_args(config, data, out, steps, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&train_workers(np, &args))
}

/// The tiny model with MoE layers (4 experts, top-2) and nothing random (no dropout,
/// SpecAugment, dither, shuffling or dynamic chunks; no auxiliary losses; wide routers;
/// AdamW eps 1e-3), so that runs on different layouts can be compared: static batches
/// of `batch` per worker, a checkpoint every `eval_interval` steps.
pub(crate) fn deterministic_moe_config(dir: &Path, batch: usize, eval_interval: u64) -> PathBuf {
    let moe = "  mlp_type: moe\n  n_expert: 4\n  n_expert_activated: 2\n";
    let text = std::fs::read_to_string(configs().join("tiny.yaml"))
        .unwrap()
        .replace("dropout_rate: 0.1", "dropout_rate: 0.0")
        .replace("use_dynamic_chunk: true", "use_dynamic_chunk: false")
        .replace("encoder_conf:\n", &format!("encoder_conf:\n{moe}"))
        .replace("decoder_conf:\n", &format!("decoder_conf:\n{moe}"))
        + &format!(
            "dataset_conf:\n  batch_conf: {{batch_type: static, batch_size: {batch}}}\n  filter_conf: {{min_length: 0}}\n  \
             list_shuffle: false\n  shuffle: false\n  sort: false\n  spec_aug: false\n  speed_perturb: false\n  \
             fbank_conf: {{num_mel_bins: 80, frame_shift: 10, frame_length: 25, dither: 0.0}}\n\
             moe_conf: {{balance_loss_weight: 0.0, z_loss_weight: 0.0, router_init_std: 1.0}}\n\
             optim: adamw\noptim_conf: {{lr: 0.002, eps: 1.0e-3}}\nscheduler_conf: {{warmup_steps: 3}}\nlog_interval: 1\n\
             upcycle_conf: {{seed: 4, eval_interval: {eval_interval}}}\n"
        );
    let path = dir.join(format!("moe-b{batch}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}
