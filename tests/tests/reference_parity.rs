//! The Rust U2++ model against the PyTorch oracle (`bench/reference/u2pp.py`, WeNet's
//! model in eager PyTorch, run with the project's own torch 2.11): same weights, real
//! fbank input of two utterances of different lengths, outputs in full context and in
//! chunked modes, and every parameter's gradient. Tolerance: fp32, 1e-5.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{nn, Device, Kind, Tensor};
use upcycle_model::asr::AsrModel;
use upcycle_model::mask::ChunkMode;
use upcycle_trainer::config::TrainConfig;

const VOCAB: i64 = 30;
const WAVS: [&str; 2] = [
    "/usr/share/pocketsphinx/test/data/cards/001.wav",
    "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the oracle on `config` and returns its tensors (weights, io).
fn reference(config: &Path, out: &Path) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("bench/reference/parity.py"))
        .arg("--config")
        .arg(config)
        .args([
            "--vocab",
            &VOCAB.to_string(),
            "--seed",
            "0",
            "--quiet",
            "--out",
        ])
        .arg(out)
        .arg("--wav")
        .args(WAVS)
        .output()
        .expect("the project's Python environment exists (scripts/setup.sh)");
    assert!(
        o.status.success(),
        "parity.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |name: &str| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(out.join(name))
            .unwrap()
            .into_iter()
            .collect()
    };
    (read("weights.safetensors"), read("io.safetensors"))
}

/// Largest `|a - b| - rtol * |b|` (<= atol means allclose(atol, rtol)).
fn excess(a: &Tensor, b: &Tensor, rtol: f64) -> f64 {
    assert_eq!(a.size(), b.size());
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    ((&a - &b).abs() - b.abs() * rtol).max().double_value(&[])
}

fn check(what: &str, ours: &Tensor, want: &Tensor, worst: &mut f64) {
    let e = excess(ours, want, 1e-5);
    *worst = worst.max(e);
    assert!(
        e <= 1e-5,
        "{what}: differs from the PyTorch reference by {e:.3e}"
    );
}

fn parity(config_text: &str, label: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.yaml");
    std::fs::write(&config, config_text).unwrap();
    let (weights, io) = reference(&config, tmp.path());
    let c = TrainConfig::load(&config).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let model = AsrModel::new(
        &vs.root(),
        c.input_dim,
        VOCAB,
        &c.encoder_conf,
        &c.decoder_conf,
        &c.model_conf,
    )
    .unwrap();
    // The parameter names are WeNet's, exactly: both sets are equal.
    let ours: BTreeSet<String> = vs.variables().keys().cloned().collect();
    let theirs: BTreeSet<String> = weights.keys().cloned().collect();
    assert_eq!(
        ours.symmetric_difference(&theirs).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "{label}: state_dict names differ"
    );
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&weights[&name]);
        }
    });

    let feats = &io["feats"];
    let lens = &io["feats_lengths"];
    let target = &io["target"];
    let tlens = &io["target_lengths"];
    let mut worst = 0f64;
    for (mode, chunk) in [
        ("full", ChunkMode::Full),
        (
            "chunk4",
            ChunkMode::Chunk {
                size: 4,
                left_chunks: -1,
            },
        ),
        (
            "chunk4left1",
            ChunkMode::Chunk {
                size: 4,
                left_chunks: 1,
            },
        ),
    ] {
        let l = model.forward(feats, lens, target, tlens, chunk, false);
        let key = |k: &str| format!("{mode}.{k}");
        check(
            &key("encoder_out"),
            &l.encoder_out.0,
            &io[&key("encoder_out")],
            &mut worst,
        );
        check(
            &key("encoder_mask"),
            &l.encoder_out.1.to_kind(Kind::Int64),
            &io[&key("encoder_mask")],
            &mut worst,
        );
        check(
            &key("ctc_log_probs"),
            &l.ctc_log_probs,
            &io[&key("ctc_log_probs")],
            &mut worst,
        );
        check(
            &key("decoder_out"),
            &l.decoder_out,
            &io[&key("decoder_out")],
            &mut worst,
        );
        if let Some(r) = &l.r_decoder_out {
            check(
                &key("r_decoder_out"),
                r,
                &io[&key("r_decoder_out")],
                &mut worst,
            );
        }
        check(&key("loss_ctc"), &l.ctc, &io[&key("loss_ctc")], &mut worst);
        check(&key("loss_att"), &l.att, &io[&key("loss_att")], &mut worst);
        check(&key("loss"), &l.loss, &io[&key("loss")], &mut worst);
        if mode == "full" {
            l.loss.backward();
            for (name, var) in vs
                .variables()
                .into_iter()
                .filter(|(_, v)| v.requires_grad())
            {
                check(
                    &format!("grad.{name}"),
                    &var.grad(),
                    &io[&format!("grad.{name}")],
                    &mut worst,
                );
            }
        }
    }
    eprintln!("{label}: worst excess over rtol 1e-5: {worst:.2e}");
}

fn tiny() -> String {
    std::fs::read_to_string(root().join("configs/tiny.yaml")).unwrap()
}

#[test]
fn tiny_causal_conformer_matches_pytorch() {
    parity(&tiny(), "tiny");
}

#[test]
fn non_causal_conformer_matches_pytorch() {
    parity(
        &tiny().replace("causal: true", "causal: false"),
        "non-causal",
    );
}

#[test]
fn subsampling_6_and_8_match_pytorch() {
    parity(
        &tiny().replace("input_layer: conv2d", "input_layer: conv2d6"),
        "conv2d6",
    );
    parity(
        &tiny().replace("input_layer: conv2d", "input_layer: conv2d8"),
        "conv2d8",
    );
}
