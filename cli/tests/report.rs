//! Run reports: a tiny real MoE training writes TensorBoard event files that
//! TensorBoard's own reader (`EventAccumulator`, from the project's `.venv`) opens, with
//! every scalar of `metrics.jsonl` at its step and value; `upcycle report` draws images
//! whose pixels follow the data, compares runs, and refuses a folder that is no run.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A decoded PNG: width, height, RGB bytes.
fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// Pixels that are not white, and distinct colours: a picture, not a blank page.
fn assert_drawn(path: &Path) {
    let (w, h, px) = pixels(path);
    let inked = px.chunks(3).filter(|p| p != &[255, 255, 255]).count();
    let colours: std::collections::HashSet<&[u8]> = px.chunks(3).collect();
    assert!(
        inked > (w * h) as usize / 50 && colours.len() > 20,
        "{}: {inked} inked pixels of {}, {} colours",
        path.display(),
        w * h,
        colours.len()
    );
}

/// Fraction of pixels that differ between two images of the same size.
fn changed(a: &Path, b: &Path) -> f64 {
    let ((wa, ha, pa), (wb, hb, pb)) = (pixels(a), pixels(b));
    assert_eq!((wa, ha), (wb, hb), "same size");
    let diff = pa
        .chunks(3)
        .zip(pb.chunks(3))
        .filter(|(x, y)| x != y)
        .count();
    diff as f64 / (wa * ha) as f64
}

fn report(args: &[&str]) -> std::process::Output {
    let mut all = vec!["report"];
    all.extend_from_slice(args);
    upcycle(&all)
}

/// Reads every event file under `logdir` with TensorBoard's `EventAccumulator` and
/// checks the expected `[tag, step, value]` scalars (values as the f32 TensorBoard
/// stores) and one load histogram per training line and MoE layer.
const READER: &str = r#"
import json, sys
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
logdir, expected, histograms = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0})
acc.Reload()
tags = acc.Tags()
bad = []
for tag, step, value in expected:
    events = [e for e in acc.Scalars(tag) if e.step == step] if tag in tags["scalars"] else []
    if len(events) != 1 or events[0].value != float(np.float32(value)):
        bad.append((tag, step, value, [(e.step, e.value) for e in events]))
for tag, steps in histograms.items():
    got = [h.step for h in acc.Histograms(tag)] if tag in tags["histograms"] else []
    if got != steps:
        bad.append((tag, steps, got))
    for h in acc.Histograms(tag):
        if abs(h.histogram_value.num - 1.0) > 1e-6 or len(h.histogram_value.bucket) == 0:
            bad.append((tag, h.step, h.histogram_value.num))
if bad:
    sys.exit("mismatches: %s" % bad[:10])
print("checked %d scalars and %d histograms" % (len(expected), len(histograms)))
"#;

#[test]
fn tiny_moe_run_gives_tensorboard_events_and_pictures_that_follow_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 3, eval_interval: 3}\n");
    let moe = "  mlp_type: moe\n  n_expert: 4\n  n_expert_activated: 2\n";
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("encoder_conf:\n", &format!("encoder_conf:\n{moe}"))
        .replace("decoder_conf:\n", &format!("decoder_conf:\n{moe}"));
    std::fs::write(&config, text).unwrap();
    let run = tmp.path().join("run");
    train(&config, &data, &run, 6, None);

    // What TensorBoard must find: every scalar of every metrics line.
    let lines = metrics(&run);
    let mut expected = Vec::new();
    let mut histograms: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for l in &lines {
        let step = l["step"].as_i64().unwrap();
        for (tag, v) in upcycle_trainer::metrics::scalars(l) {
            expected.push(serde_json::json!([tag, step, v]));
        }
        for (layer, _) in upcycle_trainer::metrics::moe_loads(l) {
            histograms
                .entry(format!("moe/{layer}/load"))
                .or_default()
                .push(step);
        }
    }
    let tags: Vec<&str> = expected.iter().map(|e| e[0].as_str().unwrap()).collect();
    for tag in [
        "train/loss",
        "train/loss_ctc",
        "train/loss_att",
        "train/loss_balance",
        "train/lr",
        "train/grad_norm",
        "train/frames_per_s",
        "train/peak_rss_mib",
        "dev/loss",
        "dev/cer",
        "moe/encoder.encoders.0.feed_forward/entropy",
        "moe/encoder.encoders.1.feed_forward_macaron/load_e3",
        "moe/decoder.left_decoder.decoders.0.feed_forward/max_over_even",
    ] {
        assert!(tags.contains(&tag), "{tag} not among {tags:?}");
    }
    assert_eq!(tags.iter().filter(|t| **t == "train/loss").count(), 6);
    assert_eq!(tags.iter().filter(|t| **t == "dev/cer").count(), 2);
    let exp_file = tmp.path().join("expected.json");
    std::fs::write(&exp_file, serde_json::to_string(&expected).unwrap()).unwrap();
    let hist_file = tmp.path().join("histograms.json");
    std::fs::write(&hist_file, serde_json::to_string(&histograms).unwrap()).unwrap();
    let events = run.join("tensorboard");
    let files: Vec<_> = std::fs::read_dir(&events).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one event file per training process");
    assert!(files[0]
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let read = || {
        Command::new(root().join(".venv/bin/python"))
            .args(["-c", READER])
            .args([&events, &exp_file, &hist_file])
            .output()
            .expect(".venv/bin/python (scripts/setup.sh installs tensorboard there)")
    };
    let o = read();
    assert!(
        o.status.success(),
        "TensorBoard's reader: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&o.stdout));
    // The check can fail: one value off and the reader disagrees.
    let mut wrong = expected.clone();
    wrong[3][2] = serde_json::json!(wrong[3][2].as_f64().unwrap() + 0.01);
    std::fs::write(&exp_file, serde_json::to_string(&wrong).unwrap()).unwrap();
    let o = read();
    assert!(!o.status.success(), "a wrong value passed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("mismatches"));

    // The report of the run: pictures with content, a summary.
    let out = tmp.path().join("report");
    let listed = ok(&report(&[
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    for f in ["training.png", "routing.png", "summary.md"] {
        assert!(listed.contains(f), "{listed}");
    }
    assert_drawn(&out.join("training.png"));
    assert_drawn(&out.join("routing.png"));
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for part in [
        "| run | params | active",
        "total",
        "active per token",
        "dev CER",
        "Routing",
        "train.yaml",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }

    // Other data, other pixels: the same run with its losses and loads changed.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let changed_lines: Vec<String> = lines
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if let Some(v) = l["loss"].as_f64() {
                l["loss"] = (v * 0.5).into();
            }
            if let Some(moe) = l["moe"].as_object_mut() {
                for m in moe.values_mut() {
                    m["load"] = serde_json::json!([0.7, 0.1, 0.1, 0.1]);
                }
            }
            l.to_string()
        })
        .collect();
    std::fs::write(other.join("metrics.jsonl"), changed_lines.join("\n") + "\n").unwrap();
    let out2 = tmp.path().join("report2");
    ok(&report(&[
        other.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]));
    let (t, r) = (
        changed(&out.join("training.png"), &out2.join("training.png")),
        changed(&out.join("routing.png"), &out2.join("routing.png")),
    );
    eprintln!("changed pixels: training {t:.3}, routing {r:.3}");
    assert!(t > 0.005 && r > 0.05, "training {t}, routing {r}");
    // The same data draws the same picture.
    let out3 = tmp.path().join("report3");
    ok(&report(&[
        run.to_str().unwrap(),
        "--out",
        out3.to_str().unwrap(),
    ]));
    assert_eq!(
        changed(&out.join("routing.png"), &out3.join("routing.png")),
        0.0
    );
}

/// A run directory with `n` logged steps of a dense model whose dev CER falls from `cer0`.
fn synthetic_run(dir: &Path, n: u64, cer0: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for s in 1..=n {
        let f = s as f64;
        text += &serde_json::json!({"step": s, "loss": 50.0 / f, "loss_ctc": 60.0 / f, "loss_att": 45.0 / f,
            "lr": 1e-3 * f.min(5.0) / 5.0, "grad_norm": 10.0 / f.sqrt(), "frames_per_s": 3000.0 + f,
            "peak_rss_mib": 900.0 + f, "elapsed_s": 6.0 * f})
        .to_string();
        text.push('\n');
        if s % 5 == 0 {
            text += &serde_json::json!({"step": s, "dev_loss": 40.0 / f, "dev_cer": cer0 - f,
                "dev_wer": 90.0, "elapsed_s": 6.0 * f + 1.0})
            .to_string();
            text.push('\n');
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn report_compares_runs_and_names_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, child, scratch) = (
        tmp.path().join("parent"),
        tmp.path().join("child"),
        tmp.path().join("scratch"),
    );
    synthetic_run(&parent, 20, 60.0);
    synthetic_run(&child, 10, 38.0);
    synthetic_run(&scratch, 30, 70.0);
    let out = tmp.path().join("report");
    let p = format!("parent={}", parent.display());
    let c = format!("upcycled={}", child.display());
    let listed = ok(&report(&[
        &p,
        &c,
        scratch.to_str().unwrap(),
        "--after",
        "upcycled=parent",
        "--out",
        out.to_str().unwrap(),
    ]));
    for f in [
        "parent/training.png",
        "upcycled/training.png",
        "scratch/training.png",
        "compare.png",
    ] {
        assert!(listed.contains(f), "{f}: {listed}");
        assert_drawn(&out.join(f));
    }
    assert!(
        !out.join("parent/routing.png").exists(),
        "dense: no routing plot"
    );
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("| upcycled | - | - | 10 | 1.0 |"),
        "{summary}"
    );
    assert!(
        summary.contains("upcycled started from parent"),
        "{summary}"
    );
    // Without --after the child's curve moves: the comparison follows the offsets.
    let out2 = tmp.path().join("report2");
    ok(&report(&[
        &p,
        &c,
        scratch.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]));
    assert!(changed(&out.join("compare.png"), &out2.join("compare.png")) > 0.001);

    // A folder that is no run, a misspelt parent, no run at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = report(&[empty.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("metrics.jsonl not found") && err.contains("upcycle train"),
        "{err}"
    );
    let o = report(&[
        &p,
        &c,
        "--after",
        "upcycled=parnet",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no run is named \"parnet\""));
    assert!(!report(&[]).status.success());
    let o = report(&[
        &p,
        &format!("parent={}", child.display()),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("two runs are named \"parent\""));
}
