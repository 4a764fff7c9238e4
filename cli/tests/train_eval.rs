//! `upcycle train`, `eval` and `transcribe` through the binary, on real recordings
//! (pocketsphinx's LibriVox and cards clips) with the tiny config.

mod common;
use common::*;

#[test]
fn train_then_eval_then_transcribe() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 3, eval_interval: 15}\n");
    let out = tmp.path().join("run");
    let stdout = train(&config, &data, &out, 30, None);
    assert!(stdout.contains("trained 30 steps"), "{stdout}");

    // Metrics: one line per step with the loss parts, and dev evaluations.
    let m = metrics(&out);
    let train: Vec<&serde_json::Value> = m.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(train.len(), 30);
    for key in [
        "loss_ctc",
        "loss_att",
        "lr",
        "grad_norm",
        "frames_per_s",
        "peak_rss_mib",
    ] {
        assert!(train[0].get(key).is_some(), "{key} missing");
    }
    // Two batches alternate (8 utterances, 4 per batch): compare whole cycles.
    let mean = |w: &[&serde_json::Value]| {
        w.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / w.len() as f64
    };
    let (first, last) = (mean(&train[..6]), mean(&train[24..]));
    assert!(last < 0.85 * first, "loss did not fall: {first} -> {last}");
    let dev: Vec<&serde_json::Value> = m.iter().filter(|l| l.get("dev_cer").is_some()).collect();
    assert_eq!(dev.len(), 2, "eval at steps 15 and 30");

    // Checkpoints: best and latest pointers, the config that ran.
    let ckpt = out.join("checkpoints");
    let latest = std::fs::read_to_string(ckpt.join("latest")).unwrap();
    assert_eq!(latest, "step-30");
    for f in [
        "manifest.json",
        "rank-0.safetensors",
        "train.yaml",
        "state.json",
        "units.txt",
        "global_cmvn",
    ] {
        assert!(ckpt.join(&latest).join(f).is_file(), "{f}");
    }
    assert!(out.join("train.yaml").is_file());

    // Eval: one line per method and chunk setting, written as JSON too.
    let (ckpt_arg, test_arg) = (out.to_str().unwrap(), data.join("test"));
    let eval = |eval_out: &std::path::Path, more: &[&str]| {
        let mut args = vec!["eval", "--checkpoint", ckpt_arg, "--data"];
        args.extend([
            test_arg.to_str().unwrap(),
            "--out",
            eval_out.to_str().unwrap(),
        ]);
        args.extend(more);
        upcycle(&args)
    };
    let eval_out = tmp.path().join("eval");
    let table = ok(&eval(&eval_out, &["--device", "cpu"]));
    for line in ["ctc_greedy", "ctc_prefix_beam", "attention_rescoring"] {
        assert_eq!(table.matches(line).count(), 2, "{table}");
    }
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(eval_out.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(results.len(), 6);
    assert!(results
        .iter()
        .all(|r| r["cer"].as_f64().unwrap() >= 0.0 && r["rtf"].as_f64().unwrap() > 0.0));
    assert!(eval_out.join("attention_rescoring_chunk16.txt").is_file());
    assert!(
        std::fs::read_to_string(eval_out.join("utterances.jsonl"))
            .unwrap()
            .lines()
            .count()
            >= 6
    );

    // A list tagged with two languages: CER per language beside the overall CER, and the
    // comparison table and its JSON from `inspect runs`.
    let tagged = data.join("tagged");
    std::fs::create_dir_all(&tagged).unwrap();
    let held_out = ["test", "dev"]
        .map(|s| std::fs::read_to_string(data.join(s).join("data.list")).unwrap())
        .concat();
    let lines: Vec<String> = held_out
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut e: serde_json::Value = serde_json::from_str(l).unwrap();
            e["lang"] = ["aa", "bb"][i % 2].into();
            e.to_string()
        })
        .collect();
    std::fs::write(tagged.join("data.list"), lines.join("\n") + "\n").unwrap();
    let by_lang_out = out.join("eval-test");
    let by_lang = ok(&upcycle(&[
        "eval",
        "--checkpoint",
        ckpt_arg,
        "--data",
        tagged.to_str().unwrap(),
        "--out",
        by_lang_out.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    assert!(by_lang.contains("CER % by language: aa"), "{by_lang}");
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(by_lang_out.join("results.json")).unwrap())
            .unwrap();
    for r in &results {
        let per: Vec<f64> = ["aa", "bb"]
            .iter()
            .map(|l| r["cer_by_language"][l].as_f64().unwrap())
            .collect();
        let cer = r["cer"].as_f64().unwrap();
        let (lo, hi) = (per[0].min(per[1]), per[0].max(per[1]));
        assert!(lo - 1e-9 <= cer && cer <= hi + 1e-9, "{r}");
    }
    let json = tmp.path().join("ume.json");
    let table = ok(&upcycle(&[
        "inspect",
        "runs",
        &format!("a-dense={ckpt_arg}"),
        "--method",
        "a-dense=dense",
        "--json",
        json.to_str().unwrap(),
    ]));
    assert!(table.contains("| CER aa | CER bb | CER avg |"), "{table}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["command"], "./run main");
    let run = &doc["runs"][0];
    assert_eq!(
        (&run["name"], &run["method"]),
        (&"a-dense".into(), &"dense".into())
    );
    assert!(run["params"].as_i64().unwrap() > 0 && run["params"] == run["active_params"]);
    let (aa, bb) = (
        run["cer_by_language"]["aa"].as_f64().unwrap(),
        run["cer_by_language"]["bb"].as_f64().unwrap(),
    );
    assert!(
        (run["cer_avg"].as_f64().unwrap() - (aa + bb) / 2.0).abs() < 1e-9,
        "{run}"
    );
    for key in ["train_min", "rtf_full", "rtf_chunk16"] {
        assert!(run[key].as_f64().unwrap() > 0.0, "{key}: {run}");
    }

    // bf16 decoding (autocast) gives a table too; a precision it does not know is named.
    let bf16 = ok(&eval(
        &tmp.path().join("eval-bf16"),
        &[
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--mode",
            "attention-rescoring",
            "--chunk",
            "0",
        ],
    ));
    assert_eq!(bf16.matches("attention_rescoring").count(), 1, "{bf16}");
    let bad = eval(&tmp.path().join("eval-fp8"), &["--precision", "fp8"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");

    // Transcribe: one line per file.
    let t = ok(&upcycle(&[
        "transcribe",
        "--checkpoint",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "/usr/share/pocketsphinx/test/data/cards/001.wav",
        "/usr/share/pocketsphinx/test/data/cards/002.wav",
    ]));
    assert_eq!(t.lines().count(), 2, "{t}");
    assert!(t.contains("001.wav\t"));
}

#[test]
fn training_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(tmp.path(), "upcycle_conf: {seed: 7}\n");
    let run = |name: &str| {
        let out = tmp.path().join(name);
        train(&config, &data, &out, 6, None);
        let losses: Vec<f64> = metrics(&out)
            .iter()
            .filter_map(|l| l.get("loss").and_then(|v| v.as_f64()))
            .collect();
        (
            losses,
            std::fs::read(out.join("checkpoints/step-6/rank-0.safetensors")).unwrap(),
        )
    };
    let (la, ma) = run("a");
    let (lb, mb) = run("b");
    assert_eq!(la, lb);
    assert!(
        ma == mb,
        "parameters differ between two runs with the same seed"
    );
}

#[test]
fn bad_configs_and_diverging_runs_stop_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = setup(tmp.path(), "");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "encoder_conf: {output_size: 32, num_block: 2}\n").unwrap();
    let o = upcycle(&[
        "train",
        "--config",
        bad.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("num_block"));

    let o = upcycle(&[
        "train",
        "--config",
        configs().join("tiny.yaml").to_str().unwrap(),
        "--data",
        tmp.path().to_str().unwrap(),
        "--out",
        tmp.path().join("y").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("data prepare"));

    // A learning rate that blows up: non-finite losses are skipped, then training stops.
    let (data, config) = setup(&tmp.path().join("nan"), "optim_conf: {lr: 1.0e+30}\nscheduler_conf: {warmup_steps: 0}\ngrad_clip: 1.0e+30\nupcycle_conf: {max_nonfinite_steps: 3}\n");
    let o = upcycle(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("z").to_str().unwrap(),
        "--max-steps",
        "50",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("non-finite loss") && err.contains("max_nonfinite_steps"),
        "{err}"
    );
}
