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

pub(crate) fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// The librivox dataset and a tiny config with a short warm-up, in `dir`.
pub(crate) fn setup(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    ok(&upcycle(&[
        "data",
        "prepare",
        "--no-install",
        "--corpus",
        "librivox",
        "--out",
        data.to_str().unwrap(),
    ]));
    let mut text = std::fs::read_to_string(configs().join("tiny.yaml")).unwrap()
        + "dataset_conf:\n  batch_conf: {batch_type: static, batch_size: 4}\n  filter_conf: {min_length: 0}\n"
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
    let steps = steps.to_string();
    let mut args = vec![
        "train",
        "--config",
        config.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        &steps,
        "--device",
        "cpu",
    ];
    if let Some(init) = init {
        args.extend(["--init", init.to_str().unwrap()]);
    }
    ok(&upcycle(&args))
}
