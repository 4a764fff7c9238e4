//! The benchmark scripts of `bench/` run (one tiny repetition) so that they cannot rot;
//! they measure, the numbers are not checked here.

use std::path::Path;
use std::process::Command;

#[test]
fn benchmark_scripts_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = env!("CARGO_BIN_EXE_upcycle");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("librivox");
    let o = Command::new(bin)
        .args([
            "data",
            "prepare",
            "--no-install",
            "--corpus",
            "librivox",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success());
    let list = data.join("train/data.list");
    let list = list.to_str().unwrap();
    let python = root.join(".venv/bin/python");
    for (script, args) in [
        (
            "bench/fbank.py",
            vec!["--list", list, "--files", "3", "--repeat", "1"],
        ),
        (
            "bench/train_step.py",
            vec![
                "--list",
                list,
                "--config",
                "configs/tiny.yaml",
                "--utts",
                "2",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--repeat",
                "1",
                "--threads",
                "1",
            ],
        ),
        (
            "bench/moe_cost.py",
            vec![
                "--list",
                list,
                "--config",
                "configs/tiny.yaml",
                "--utts",
                "2",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--repeat",
                "1",
                "--threads",
                "1",
            ],
        ),
        (
            "bench/moe_layer.py",
            vec![
                "--tokens",
                "64",
                "--d",
                "8",
                "--hidden",
                "16",
                "--experts",
                "4",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--repeat",
                "1",
                "--threads",
                "1",
            ],
        ),
        (
            "bench/checkpoint.py",
            vec![
                "--config",
                "configs/tiny.yaml",
                "--synthetic-mib",
                "16",
                "--repeat",
                "1",
            ],
        ),
        (
            "bench/collectives.py",
            vec![
                "--sizes",
                "65536",
                "--autograd-sizes",
                "65536",
                "--repeat",
                "1",
            ],
        ),
    ] {
        let json = tmp.path().join("out.json");
        let o = Command::new(&python)
            .current_dir(&root)
            .arg(script)
            .args(&args)
            .arg("--bin")
            .arg(bin)
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(r["ratio_median"].as_f64().unwrap() > 0.0, "{script}: {r}");
    }
}
