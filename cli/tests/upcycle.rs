//! Upcycling, freezing and distillation end to end, on real recordings (pocketsphinx's
//! LibriVox clips): a dense tiny model is trained, `convert upcycle` turns it into an MoE
//! model that computes the same outputs, and training it follows the freezing schedule.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use upcycle_dataset::loader::{DataLoader, Mode, Shard};
use upcycle_model::mask::ChunkMode;
use upcycle_trainer::checkpoint::{self, load_model};

mod common;
use common::*;

fn tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    checkpoint::read_tensors(dir).unwrap()
}

/// `|a - b|` where `valid` (broadcast over the last dimension) is true.
fn masked_diff(a: &Tensor, b: &Tensor, valid: &Tensor) -> f64 {
    ((a - b).abs() * valid.to_kind(Kind::Float))
        .max()
        .double_value(&[])
}

#[test]
fn upcycled_model_computes_its_parents_outputs_then_trains_by_the_freezing_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, config) = setup(
        tmp.path(),
        "upcycle_conf: {seed: 5, eval_interval: 2, keep_checkpoints: 10}\n",
    );
    let dense = tmp.path().join("dense");
    train(&config, &data, &dense, 8, None);
    // The parent's best is not where it stopped: the child starts from the latest.
    std::fs::write(dense.join("checkpoints/best"), "step-2").unwrap();
    let moe_ckpt = tmp.path().join("moe");
    let converted = upcycle(&[
        "convert",
        "upcycle",
        "--from",
        dense.join("checkpoints").to_str().unwrap(),
        "--experts",
        "4",
        "--top-k",
        "2",
        // Sharded for 2 workers with ep 2; one process loads it whole.
        "--world",
        "2",
        "--ep",
        "2",
        "--out",
        moe_ckpt.to_str().unwrap(),
    ]);
    let out = ok(&converted);
    assert!(out.contains("expert banks filled"), "{out}");
    let log = String::from_utf8_lossy(&converted.stderr);
    assert!(
        log.contains("starting from the parent checkpoint") && log.contains("step-8"),
        "{log}"
    );
    let m = checkpoint::read_manifest(&checkpoint::resolve(&moe_ckpt).unwrap()).unwrap();
    assert_eq!((m.layout.world, m.layout.ep), (2, 2));
    // Converting into a directory that holds a checkpoint is refused.
    let again = upcycle(&[
        "convert",
        "upcycle",
        "--from",
        dense.join("checkpoints").to_str().unwrap(),
        "--out",
        moe_ckpt.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a checkpoint"));

    // The best one when its pointer is named: what the child copies verbatim (all but
    // the feed-forward networks) is step-2's.
    let from_best = tmp.path().join("moe-best");
    ok(&upcycle(&[
        "convert",
        "upcycle",
        "--from",
        dense.join("checkpoints/best").to_str().unwrap(),
        "--experts",
        "4",
        "--out",
        from_best.to_str().unwrap(),
    ]));
    let (best, last) = (
        tensors(&dense.join("checkpoints/step-2")),
        tensors(&dense.join("checkpoints/step-8")),
    );
    let child = tensors(&checkpoint::resolve(&from_best).unwrap());
    let copied: Vec<&String> = child.keys().filter(|n| best.contains_key(*n)).collect();
    assert!(copied.len() > 10, "{copied:?}");
    assert!(copied.iter().all(|n| child[*n].equal(&best[*n])));
    assert!(copied.iter().any(|n| !child[*n].equal(&last[*n])));
    // Continuing the dense parent (`train --init`) starts where it stopped too.
    let args = train_args(
        &config,
        &data,
        &tmp.path().join("continued"),
        1,
        &["--init", dense.to_str().unwrap()],
    );
    let continued = train_workers(1, &args.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&continued);
    let log = String::from_utf8_lossy(&continued.stderr);
    assert!(
        log.contains("starting from the parent checkpoint") && log.contains("step-8"),
        "{log}"
    );

    // Same outputs on real utterances, full context and chunked.
    let parent = load_model(&dense.join("checkpoints/step-8"), Device::Cpu).unwrap();
    let child = load_model(&moe_ckpt, Device::Cpu).unwrap();
    assert_eq!(child.config.encoder_conf.mlp_type, "moe");
    assert!(child
        .vs
        .variables()
        .keys()
        .any(|k| k.ends_with("experts.w_1")));
    let loader = DataLoader::new(
        &data.join("train/data.list"),
        parent.units.clone(),
        parent.config.dataset_conf.clone(),
        Mode::Eval,
        Shard::SINGLE,
        0,
    )
    .unwrap();
    let b = loader.epoch(0).unwrap().next().unwrap().unwrap();
    assert!(b.keys.len() >= 2, "a batch of several utterances (padding)");
    for chunk in [
        ChunkMode::Full,
        ChunkMode::Chunk {
            size: 4,
            left_chunks: -1,
        },
        ChunkMode::Chunk {
            size: 2,
            left_chunks: 1,
        },
    ] {
        let run = |m: &upcycle_trainer::checkpoint::LoadedModel| {
            tch::no_grad(|| {
                m.model.forward(
                    &b.feats,
                    &b.feats_lengths,
                    &b.target,
                    &b.target_lengths,
                    chunk,
                    false,
                )
            })
        };
        let (p, c) = (run(&parent), run(&child));
        let frames = p.encoder_out.1.transpose(1, 2);
        let l = b.target.size()[1] + 1;
        let tokens = Tensor::arange(l, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .lt_tensor(&(&b.target_lengths + 1).unsqueeze(1))
            .unsqueeze(2);
        let ctc = masked_diff(&p.ctc_log_probs, &c.ctc_log_probs, &frames);
        let dec = masked_diff(&p.decoder_out, &c.decoder_out, &tokens);
        let r_dec = masked_diff(
            p.r_decoder_out.as_ref().unwrap(),
            c.r_decoder_out.as_ref().unwrap(),
            &tokens,
        );
        eprintln!("{chunk:?}: max diff ctc {ctc:.2e} decoder {dec:.2e} right {r_dec:.2e}");
        assert!(
            ctc <= 1e-5 && dec <= 1e-5 && r_dec <= 1e-5,
            "{chunk:?}: {ctc} {dec} {r_dec}"
        );
    }

    // Training the child: experts and routers only until step 2, then everything.
    let moe_config = tmp.path().join("moe.yaml");
    let text = std::fs::read_to_string(checkpoint::resolve(&moe_ckpt).unwrap().join("train.yaml"))
        .unwrap();
    let text = text.replace(
        "  freeze: []",
        "  freeze:\n  - {from_step: 0, trainable: ['*.experts.*', '*.router.*']}\n  - {from_step: 2, trainable: ['*']}",
    );
    assert!(text.contains("from_step: 2"), "{text}");
    std::fs::write(&moe_config, text).unwrap();
    let run = tmp.path().join("moe-run");
    train(&moe_config, &data, &run, 4, Some(&moe_ckpt));
    let start = tensors(&checkpoint::resolve(&moe_ckpt).unwrap());
    let step2 = tensors(&run.join("checkpoints/step-2"));
    let step4 = tensors(&run.join("checkpoints/step-4"));
    let trainable_in_phase_0 = |n: &str| n.contains(".experts.") || n.contains(".router.");
    let mut moved_later = 0;
    for (name, t0) in &start {
        if name.contains("global_cmvn") {
            continue;
        }
        if trainable_in_phase_0(name) {
            assert!(!step2[name].equal(t0), "{name} did not train in phase 0");
        } else {
            assert!(step2[name].equal(t0), "{name} changed while frozen");
            moved_later += usize::from(!step4[name].equal(&step2[name]));
        }
    }
    assert!(
        moved_later > 10,
        "released parameters train in phase 1 ({moved_later})"
    );
    // Frozen parameters have no optimizer state in phase 0.
    let moments = checkpoint::read_group(&run.join("checkpoints/step-2"), "optim").unwrap();
    assert!(!moments.is_empty());
    for name in moments.keys() {
        let param = name.split_once('.').unwrap().1;
        assert!(
            trainable_in_phase_0(param),
            "optimizer state for frozen {param}"
        );
    }
    // Routing statistics and the balance loss are in the metrics.
    let lines = metrics(&run);
    let logged = lines.iter().find(|l| l.get("moe").is_some()).unwrap();
    assert!(logged["loss_balance"].as_f64().unwrap() >= 0.99);
    let layer = &logged["moe"]["encoder.encoders.0.feed_forward"];
    let load: Vec<f64> = serde_json::from_value(layer["load"].clone()).unwrap();
    assert_eq!(load.len(), 4);
    assert!((load.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    assert_eq!(lines[0]["freeze_phase"], 0);

    // The load table of the trained child: one row per MoE layer, shares summing to 100.
    let table = ok(&upcycle(&[
        "inspect",
        "routing",
        "--checkpoint",
        run.join("checkpoints").to_str().unwrap(),
        "--data",
        data.join("train").to_str().unwrap(),
    ]));
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| encoder.") || l.starts_with("| decoder."))
        .collect();
    assert_eq!(rows.len(), 2 * 2 + 2, "{table}");
    let shares: f64 = rows[0]
        .split('|')
        .skip(2)
        .take(4)
        .map(|c| c.trim().parse::<f64>().unwrap())
        .sum();
    assert!((shares - 100.0).abs() < 0.5, "{table}");
    // A dense checkpoint has no routing to show.
    let dense_table = upcycle(&[
        "inspect",
        "routing",
        "--checkpoint",
        dense.join("checkpoints").to_str().unwrap(),
        "--data",
        data.join("train").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&dense_table.stderr).contains("no MoE layer"));

    // Distillation from the dense parent: the term is logged and finite.
    let kd_config = tmp.path().join("kd.yaml");
    let text = std::fs::read_to_string(&moe_config).unwrap().replace(
        "  distill: null",
        &format!(
            "  distill: {{teacher: {}, weight: 2.0}}",
            dense.join("checkpoints").display()
        ),
    );
    assert!(text.contains("weight: 2.0"));
    std::fs::write(&kd_config, text).unwrap();
    let kd = tmp.path().join("kd-run");
    train(&kd_config, &data, &kd, 2, Some(&moe_ckpt));
    let kd_lines = metrics(&kd);
    let d = kd_lines[0]["loss_distill"].as_f64().unwrap();
    assert!(d.is_finite() && d >= 0.0, "{d}");
}
