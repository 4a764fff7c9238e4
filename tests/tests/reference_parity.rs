//! The Rust U2++ model against the PyTorch oracle (`bench/reference/u2pp.py`, WeNet's
//! model in eager PyTorch, run with the project's own torch 2.11): same weights, real
//! fbank input of two utterances of different lengths, outputs in full context and in
//! chunked modes, and every parameter's gradient, with each attention kernel (explicit,
//! and fused `scaled_dot_product_attention` as CUDA runs it). Tolerance: fp32, 1e-5.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{nn, Device, Kind, Tensor};
use upcycle_model::asr::Vocab;
use upcycle_model::attention::AttentionKernel;
use upcycle_model::mask::ChunkMode;
use upcycle_model::naming::from_wenet;
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
        "{what}: differs from the PyTorch reference by {e:.3e} (largest |reference| {:.3e})",
        want.abs().max().double_value(&[])
    );
}

/// `max |ours - want| <= 3e-5 * (1 + max |want|)`, for the gradients of a whole model
/// with MoE layers. Each MoE layer alone matches WeNet's element by element within 1e-5
/// (tests/moe_parity.rs), but the model's gradients sum the experts' contributions in
/// another order than WeNet's loop, and that fp32 rounding, carried back through every
/// block, reaches 1.9e-5 of a tensor's largest gradient (measured; dense models match
/// element by element).
fn check_scaled(what: &str, ours: &Tensor, want: &Tensor) {
    let diff = (ours - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        diff <= 3e-5 * (1.0 + scale),
        "{what}: differs from the PyTorch reference by {diff:.3e} (largest |reference| {scale:.3e})"
    );
}

fn parity(config_text: &str, label: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.yaml");
    std::fs::write(&config, config_text).unwrap();
    let (weights, io) = reference(&config, tmp.path());
    let c = TrainConfig::load(&config).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let model = c
        .build_model(&vs.root(), Vocab::sos_eos_last(VOCAB))
        .unwrap();
    let moe = c.encoder_conf.mlp_type == "moe" || c.decoder_conf.mlp_type == "moe";
    let weights = from_wenet(weights).unwrap();
    // The parameter names are WeNet's (experts stacked): both sets are equal.
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
    // Feed-forward layers compute only real frames and tokens (WeNet's compute padding
    // too), so outputs are compared where they are not padding.
    let dec_valid = Tensor::arange(target.size()[1] + 1, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .lt_tensor(&(tlens + 1).unsqueeze(1))
        .unsqueeze(2);
    let grads = from_wenet(
        io.iter()
            .filter_map(|(k, t)| Some((k.strip_prefix("grad.")?.to_string(), t.copy())))
            .collect(),
    )
    .unwrap();
    // Both attention kernels, forced on the CPU: the fused one is what CUDA runs.
    for kernel in [AttentionKernel::Explicit, AttentionKernel::Fused] {
        kernel.force(|| {
            for (_, mut var) in vs.variables() {
                var.zero_grad();
            }
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
                let enc_valid = io[&key("encoder_mask")].transpose(1, 2);
                let masked = |t: &Tensor, valid: &Tensor| t * valid;
                check(
                    &key("encoder_out"),
                    &masked(&l.encoder_out.0, &enc_valid),
                    &masked(&io[&key("encoder_out")], &enc_valid),
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
                    &masked(&l.ctc_log_probs, &enc_valid),
                    &masked(&io[&key("ctc_log_probs")], &enc_valid),
                    &mut worst,
                );
                check(
                    &key("decoder_out"),
                    &masked(&l.decoder_out, &dec_valid),
                    &masked(&io[&key("decoder_out")], &dec_valid),
                    &mut worst,
                );
                if let Some(r) = &l.r_decoder_out {
                    check(
                        &key("r_decoder_out"),
                        &masked(r, &dec_valid),
                        &masked(&io[&key("r_decoder_out")], &dec_valid),
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
                        let what = format!("grad.{name}");
                        if moe {
                            check_scaled(&what, &var.grad(), &grads[&name]);
                        } else {
                            check(&what, &var.grad(), &grads[&name], &mut worst);
                        }
                    }
                }
            }
            eprintln!("{label} ({kernel:?} attention): worst excess over rtol 1e-5: {worst:.2e}");
        });
    }
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

/// WeNet's U2++ MoE (every FFN of encoder and decoder an MoE layer, 4 experts, top-2,
/// no auxiliary loss) against WeNet's MoEFFNLayer in the reference model.
#[test]
fn moe_conformer_matches_pytorch() {
    let moe_keys = "  mlp_type: moe\n  n_expert: 4\n  n_expert_activated: 2\n";
    let text = tiny()
        .replace("encoder_conf:\n", &format!("encoder_conf:\n{moe_keys}"))
        .replace("decoder_conf:\n", &format!("decoder_conf:\n{moe_keys}"))
        + "moe_conf:\n  balance_loss_weight: 0.0\n  expert_compute: loop\n";
    parity(&text, "moe");
}
