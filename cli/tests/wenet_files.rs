//! WeNet's own files, made by WeNet's own code (`scripts/make_wenet_fixture.py` ran
//! WeNet's model classes, training step and `save_checkpoint`; its outputs are committed
//! in `tests/golden/wenet/`, since CI has no WeNet): they import with no editing, the
//! imported models compute WeNet's CTC log-probabilities within 1e-5 and decode to
//! WeNet's hypotheses in every mode upcycle has, full context and chunk 16; the other
//! forms WeNet's tools leave (`avg_N.pt`, GPU storage locations, half precision,
//! DeepSpeed's converted directories) load or are refused with their conversion; the
//! export holds exactly the tensors WeNet's strict `load_state_dict` wants.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{ok, python, upcycle};
use tch::{Device, Kind, Tensor};
use upcycle_model::moe::Routing;
use upcycle_model::precision::Precision;
use upcycle_trainer::checkpoint::{self, LoadedModel};
use upcycle_trainer::eval::{chunk_mode, decode_one, DecodeOptions, Method};
use upcycle_trainer::torch_file::read_state_dict;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> PathBuf {
    root().join("tests/golden/wenet")
}

fn refused(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a refusal");
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `upcycle convert import-wenet` of `checkpoint` with `config`, the units of `model`'s
/// directory (dense: `<sos/eos>` last, as WeNet's BPE recipes; moe: at 2, as its char
/// recipes) and the fixture's CMVN, into `out`.
fn import(model: &str, checkpoint: &Path, config: &Path, out: &Path) -> std::process::Output {
    upcycle(&[
        "convert",
        "import-wenet",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--units",
        fixture()
            .join(model)
            .join("lang_char.txt")
            .to_str()
            .unwrap(),
        "--cmvn",
        fixture().join("global_cmvn").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// Imports `model`'s `final.pt` with its `train.yaml` into `out`, which must succeed.
fn import_final(model: &str, out: &Path) {
    let dir = fixture().join(model);
    ok(&import(
        model,
        &dir.join("final.pt"),
        &dir.join("train.yaml"),
        out,
    ));
}

fn expected(model: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(fixture().join(model).join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn hyps(model: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join(model).join("hyps.json")).unwrap())
        .unwrap()
}

/// The utterance keys of the fixture.
fn keys(expected: &BTreeMap<String, Tensor>) -> Vec<String> {
    let keys: Vec<String> = expected
        .keys()
        .filter_map(|k| k.strip_prefix("feats.").map(str::to_string))
        .collect();
    assert!(keys.len() >= 5, "the fixture has the five LibriVox clips");
    keys
}

/// CTC log-probabilities `[T', vocab]` of one utterance's features.
fn ctc_log_probs(m: &LoadedModel, feats: &Tensor, chunk: i64) -> Tensor {
    tch::no_grad(|| {
        let x = feats.unsqueeze(0);
        let lens = Tensor::from_slice(&[feats.size()[0]]);
        let (enc, _) =
            m.model
                .encoder()
                .forward(&x, &lens, chunk_mode(chunk, -1), false, &mut Routing::off());
        m.model.ctc().log_softmax(&enc).squeeze_dim(0)
    })
}

/// Largest `|a - b| - 1e-5 * |b|` (<= 1e-5: allclose with atol = rtol = 1e-5).
fn excess(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    ((&a - &b).abs() - b.abs() * 1e-5).max().double_value(&[])
}

const MODES: [(&str, i64); 2] = [("full", 0), ("chunk16", 16)];

/// Imports `model` (dense or moe) as WeNet wrote it, and checks log-probs and every
/// decoding mode against WeNet's.
fn imports_and_decodes_as_wenet(model: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ours");
    import_final(model, &out);
    let m = checkpoint::load_model(&out, Device::Cpu).unwrap();
    let want = expected(model);
    let wenet = hyps(model);
    let settings = &wenet["settings"];
    let o = DecodeOptions {
        methods: Method::ALL.to_vec(),
        chunks: vec![],
        left_chunks: -1,
        beam: settings["beam_size"].as_u64().unwrap() as usize,
        ctc_weight: settings["ctc_weight"].as_f64().unwrap(),
        reverse_weight: settings["reverse_weight"].as_f64().unwrap(),
        device: Device::Cpu,
        precision: Precision::Fp32,
    };
    let mut worst = 0f64;
    let mut largest_diff = 0f64;
    let mut compared = 0;
    for key in keys(&want) {
        let feats = &want[&format!("feats.{key}")];
        for (mode, chunk) in MODES {
            let ours = ctc_log_probs(&m, feats, chunk);
            let theirs = &want[&format!("ctc_log_probs.{mode}.{key}")];
            let e = excess(&ours, theirs);
            largest_diff = largest_diff.max((&ours - theirs).abs().max().double_value(&[]));
            assert!(
                e <= 1e-5,
                "{model} {mode} {key}: log-probs differ by {e:.3e}"
            );
            worst = worst.max(e);
            for (method, hyp, _) in decode_one(&m, feats, chunk_mode(chunk, -1), &o) {
                let name = match method {
                    Method::CtcGreedy => "ctc_greedy_search",
                    Method::CtcPrefixBeam => "ctc_prefix_beam_search",
                    Method::AttentionRescoring => "attention_rescoring",
                };
                let theirs: Vec<i64> =
                    serde_json::from_value(wenet["hyps"][name][mode][&key].clone())
                        .unwrap_or_else(|e| panic!("hyps.json {name} {mode} {key}: {e}"));
                assert_eq!(hyp.tokens, theirs, "{model} {name} {mode} {key}");
                compared += 1;
            }
        }
    }
    eprintln!(
        "{model}: {compared} hypotheses equal WeNet's; log-probs differ by at most \
         {largest_diff:.2e} (worst excess over 1e-5 * |WeNet's| {worst:.2e})"
    );
}

#[test]
fn wenet_dense_checkpoint_imports_and_decodes_as_wenet() {
    imports_and_decodes_as_wenet("dense");
}

#[test]
fn wenet_moe_checkpoint_imports_and_decodes_as_wenet() {
    imports_and_decodes_as_wenet("moe");
}

/// `avg_N.pt` from WeNet's `average_model.py`, a state dict saved from a GPU (`cuda:0`
/// storage locations), a half-precision one, and DeepSpeed's converted directories
/// import; unconverted DeepSpeed and distributed checkpoints are refused with the
/// command that converts them; nothing is written for a refusal.
#[test]
fn every_form_wenet_tools_write_imports_or_is_refused_with_its_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dense = fixture().join("dense");
    let config = dense.join("train.yaml");
    let want = expected("dense");

    // avg_2.pt: WeNet's average of two epochs.
    ok(&import(
        "dense",
        &dense.join("avg_2.pt"),
        &config,
        &t.join("avg"),
    ));
    let m = checkpoint::load_model(&t.join("avg"), Device::Cpu).unwrap();
    for key in keys(&want) {
        let ours = ctc_log_probs(&m, &want[&format!("feats.{key}")], 0);
        let e = excess(&ours, &want[&format!("avg_2.ctc_log_probs.full.{key}")]);
        assert!(e <= 1e-5, "avg_2 {key}: log-probs differ by {e:.3e}");
    }

    // What a GPU save and `model.half()` write, made with torch itself.
    python(
        r#"
import os, sys, torch, torch.serialization as ser
src, out = sys.argv[1], sys.argv[2]
sd = torch.load(src, weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, out + "/half.pt")
tag = ser.location_tag
ser.location_tag = lambda storage: "cuda:0"  # what torch.save records for GPU tensors
torch.save(sd, out + "/cuda.pt")
ser.location_tag = tag
assert b"cuda:0" in open(out + "/cuda.pt", "rb").read()
# DeepSpeed >= 0.15's converted output: a directory with one file, or shards + index.
os.makedirs(out + "/ds_single/final.pt")
torch.save(sd, out + "/ds_single/final.pt/pytorch_model.bin")
os.makedirs(out + "/ds_sharded")
names = sorted(sd)
half = len(names) // 2
index = {"metadata": {}, "weight_map": {}}
for i, part in enumerate((names[:half], names[half:])):
    f = "pytorch_model-%05d-of-00002.bin" % (i + 1)
    torch.save({k: sd[k] for k in part}, out + "/ds_sharded/" + f)
    index["weight_map"].update({k: f for k in part})
import json
json.dump(index, open(out + "/ds_sharded/pytorch_model.bin.index.json", "w"))
# Unconverted DeepSpeed and distributed checkpoints (their markers).
os.makedirs(out + "/ds_raw/epoch_1")
open(out + "/ds_raw/latest", "w").write("epoch_1")
os.makedirs(out + "/dcp")
open(out + "/dcp/.metadata", "wb").write(b"")
"#,
        &[&dense.join("final.pt"), t],
    );
    let original = read_state_dict(&dense.join("final.pt")).unwrap();
    for form in ["cuda.pt", "ds_single/final.pt", "ds_sharded"] {
        let out = t.join(format!("out-{}", form.replace('/', "-")));
        ok(&import("dense", &t.join(form), &config, &out));
        let m = checkpoint::load_model(&out, Device::Cpu).unwrap();
        let vars = m.vs.variables();
        for (name, w) in &original {
            if let Some(v) = vars.get(name) {
                assert!(v.equal(w), "{form}: {name} differs from final.pt's");
            }
        }
    }
    ok(&import(
        "dense",
        &t.join("half.pt"),
        &config,
        &t.join("out-half"),
    ));
    let m = checkpoint::load_model(&t.join("out-half"), Device::Cpu).unwrap();
    let vars = m.vs.variables();
    for (name, w) in &original {
        if let Some(v) = vars.get(name) {
            let widened = w.to_kind(Kind::Half).to_kind(Kind::Float);
            assert!(
                v.equal(&widened),
                "half.pt: {name} is not the float16 weight widened"
            );
        }
    }
    for (form, fix) in [
        ("ds_raw", "zero_to_fp32.py"),
        ("dcp", "dcp_to_torch"),
        ("ds_raw/epoch_1", "without weights"),
    ] {
        let out = t.join("refused");
        let e = refused(&import("dense", &t.join(form), &config, &out));
        assert!(e.contains(fix), "{form}: want {fix:?} in: {e}");
        assert!(!out.exists(), "{form}: a refused import wrote its output");
    }
}

/// A position table that is not WeNet's sinusoid, and a train.yaml that relies on
/// WeNet's `cnn_module_norm: batch_norm` default or asks for other features, are refused
/// by name.
#[test]
fn wrong_position_tables_and_unsupported_wenet_defaults_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dense = fixture().join("dense");
    let config = dense.join("train.yaml");
    python(
        r#"
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
sd["decoder.right_decoder.embed.1.pe"] = sd["decoder.right_decoder.embed.1.pe"] * 1.001
torch.save(sd, sys.argv[2] + "/pe.pt")
"#,
        &[&dense.join("final.pt"), t],
    );
    let e = refused(&import("dense", &t.join("pe.pt"), &config, &t.join("out")));
    assert!(
        e.contains("decoder.right_decoder.embed.1.pe") && e.contains("sinusoid"),
        "{e}"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    for (edit, want) in [
        (
            text.lines()
                .filter(|l| !l.contains("cnn_module_norm"))
                .collect::<Vec<_>>()
                .join("\n"),
            "batch_norm",
        ),
        (
            text.replacen("dataset_conf:\n", "dataset_conf:\n  feats_type: mfcc\n", 1),
            "dataset_conf.feats_type",
        ),
        (
            text.replacen("encoder_conf:\n", "encoder_conf:\n  key_bias: false\n", 1),
            "encoder_conf.key_bias",
        ),
    ] {
        assert_ne!(edit, text, "the edit for {want} changed nothing");
        let edited = t.join("edited.yaml");
        std::fs::write(&edited, edit).unwrap();
        let e = refused(&import(
            "dense",
            &dense.join("final.pt"),
            &edited,
            &t.join("out"),
        ));
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
    assert!(!t.join("out").exists(), "a refused import wrote its output");
}

/// Import then export of WeNet's own files gives back WeNet's state dict: the same names
/// (position tables included, which WeNet's strict load requires), dtypes, shapes and
/// bits.
#[test]
fn export_gives_back_what_wenet_saved() {
    for model in ["dense", "moe"] {
        let tmp = tempfile::tempdir().unwrap();
        let ours = tmp.path().join("ours");
        import_final(model, &ours);
        let back = tmp.path().join("wenet");
        ok(&upcycle(&[
            "convert",
            "export-wenet",
            "--checkpoint",
            ours.to_str().unwrap(),
            "--out",
            back.to_str().unwrap(),
        ]));
        let theirs: BTreeMap<String, Tensor> =
            read_state_dict(&fixture().join(model).join("final.pt"))
                .unwrap()
                .into_iter()
                .collect();
        let exported: BTreeMap<String, Tensor> = read_state_dict(&back.join("final.pt"))
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(
            theirs.keys().collect::<Vec<_>>(),
            exported.keys().collect::<Vec<_>>(),
            "{model}: the export's tensors are not the ones WeNet saved"
        );
        for (name, t) in &theirs {
            let e = &exported[name];
            assert_eq!(
                (t.kind(), t.size()),
                (e.kind(), e.size()),
                "{model}: {name}"
            );
            assert!(t.equal(e), "{model}: {name} differs from WeNet's");
        }
    }
}

/// With no `--units`, the `lang_char.txt` beside the checkpoint is found; units whose
/// `<sos/eos>` is not the unit the model was trained with (`tokenizer_conf.
/// special_tokens`) are refused by name.
#[test]
fn units_are_found_beside_the_checkpoint_and_must_agree_with_special_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = fixture().join("moe");
    let ours = tmp.path().join("ours");
    ok(&upcycle(&[
        "convert",
        "import-wenet",
        "--checkpoint",
        moe.join("final.pt").to_str().unwrap(),
        "--config",
        moe.join("train.yaml").to_str().unwrap(),
        "--out",
        ours.to_str().unwrap(),
    ]));
    let m = checkpoint::load_model(&ours, Device::Cpu).unwrap();
    assert_eq!(
        m.model.sos_eos(),
        2,
        "WeNet's char recipes put <sos/eos> at 2"
    );
    // The dense model's units (<sos/eos> last) for the MoE model (trained with 2).
    let e = refused(&upcycle(&[
        "convert",
        "import-wenet",
        "--checkpoint",
        moe.join("final.pt").to_str().unwrap(),
        "--config",
        moe.join("train.yaml").to_str().unwrap(),
        "--units",
        fixture().join("dense/lang_char.txt").to_str().unwrap(),
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]));
    assert!(
        e.contains("special_tokens") && e.contains("<sos/eos>"),
        "{e}"
    );
    assert!(
        !tmp.path().join("out").exists(),
        "a refused import wrote its output"
    );
}
