//! The benchmark scripts of `bench/` run (one tiny repetition) so that they cannot rot;
//! they measure, the numbers are not checked here.

use std::path::Path;
use std::process::Command;

mod common;

#[test]
fn benchmark_scripts_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = env!("CARGO_BIN_EXE_upcycle");
    let tmp = tempfile::tempdir().unwrap();
    let data = common::librivox(&tmp.path().join("librivox"));
    let list = data.join("train/data.list");
    let list = list.to_str().unwrap();
    let python = root.join(".venv/bin/python");
    // One tiny repetition of every benchmark through the suite's own runner.
    let json = tmp.path().join("all.json");
    let o = Command::new(&python)
        .current_dir(&root)
        .args([
            "bench/all.py",
            "--quick",
            "--list",
            list,
            "--bin",
            bin,
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bench/all.py: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for script in [
        "fbank.py",
        "train_step.py",
        "moe_layer.py",
        "moe_cost.py",
        "collectives.py",
        "checkpoint.py",
    ] {
        let ratio = r[script]["result"]["ratio_median"].as_f64();
        assert!(ratio.is_some_and(|x| x > 0.0), "{script}: {r}");
    }
    // The training step reports model TFLOP/s, also on a batch made as the loader makes them.
    for step in ["train_step.py", "train_step.py:loader"] {
        let tflops = r[step]["result"]["upcycle_tflops"].as_f64();
        assert!(tflops.is_some_and(|x| x > 0.0), "{step}: {r}");
    }
    assert_eq!(
        r["train_step.py:loader"]["result"]["batch"],
        "loader (sorted, dynamic)"
    );
    // The step-time breakdown (not a comparison): two tiny steps.
    let o = Command::new(&python)
        .current_dir(&root)
        .args([
            "bench/profile_step.py",
            "--configs",
            "configs/tiny.yaml",
            "--steps",
            "2",
        ])
        .args(["--log-interval", "1", "--bin", bin, "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bench/profile_step.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("configs/tiny.yaml"));
}
