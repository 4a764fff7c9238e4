//! `upcycle convert import-wenet` / `export-wenet` on WeNet checkpoints that the PyTorch
//! reference (`bench/reference/parity.py`, WeNet's model) saves as WeNet does,
//! `torch.save(model.state_dict(), path)`: the imported model computes the reference's
//! outputs, the export is read by `torch.load(weights_only=True)` and loaded strictly
//! by WeNet's model, import -> export gives the same bits, and bad input is refused by name
//! before anything is written or run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ok, python, upcycle};
use tch::{Device, Kind, Tensor};
use upcycle_model::mask::ChunkMode;
use upcycle_trainer::checkpoint;
use upcycle_trainer::torch_file::read_state_dict;

const VOCAB: i64 = 30;
const WAVS: [&str; 2] = [
    "/usr/share/pocketsphinx/test/data/cards/001.wav",
    "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tiny() -> String {
    std::fs::read_to_string(root().join("configs/tiny.yaml")).unwrap()
}

fn tiny_moe() -> String {
    let moe_keys = "  mlp_type: moe\n  n_expert: 4\n  n_expert_activated: 2\n";
    tiny()
        .replace("encoder_conf:\n", &format!("encoder_conf:\n{moe_keys}"))
        .replace("decoder_conf:\n", &format!("decoder_conf:\n{moe_keys}"))
}

/// A WeNet model directory made by the reference: `final.pt`, `train.yaml`,
/// `units.txt`, and the reference's inputs and outputs (`io.safetensors`).
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Fixture {
    fn new(config: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("train.yaml"), config).unwrap();
        let mut units = "<blank> 0\n<unk> 1\n".to_string();
        for i in 2..VOCAB - 1 {
            units += &format!("{} {i}\n", char::from(b'a' + (i - 2) as u8));
        }
        units += &format!("<sos/eos> {}\n", VOCAB - 1);
        std::fs::write(dir.join("units.txt"), units).unwrap();
        let o = Command::new(root().join(".venv/bin/python"))
            .arg(root().join("bench/reference/parity.py"))
            .arg("--config")
            .arg(dir.join("train.yaml"))
            .args(["--vocab", &VOCAB.to_string(), "--seed", "0", "--quiet"])
            .arg("--out")
            .arg(&dir)
            .arg("--save-pt")
            .arg(dir.join("final.pt"))
            .arg("--wav")
            .args(WAVS)
            .output()
            .expect("the project's Python environment exists (scripts/setup.sh)");
        assert!(
            o.status.success(),
            "parity.py failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Self { _tmp: tmp, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn import(&self, extra: &[&str], out: &str) -> std::process::Output {
        let mut args = vec![
            "convert".to_string(),
            "import-wenet".into(),
            "--config".into(),
            self.path("train.yaml").display().to_string(),
            "--out".into(),
            self.path(out).display().to_string(),
        ];
        if !extra.contains(&"--checkpoint") {
            args.extend([
                "--checkpoint".into(),
                self.path("final.pt").display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        upcycle(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

fn refused(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a refusal");
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Largest `|a - b| - rtol * |b|`.
fn excess(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    ((&a - &b).abs() - b.abs() * 1e-5).max().double_value(&[])
}

fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut b, t.numel());
    b
}

/// Imports the fixture, checks the outputs against the reference's, exports it again and
/// checks the export in Rust and in PyTorch.
fn import_matches_reference_and_round_trips(config: &str, label: &str) {
    let f = Fixture::new(config);
    ok(&f.import(&[], "ours"));
    let loaded = checkpoint::load_model(&f.path("ours"), Device::Cpu).unwrap();
    let io: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(f.path("io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let (target, tlens) = (&io["target"], &io["target_lengths"]);
    // Our feed-forward layers compute only real frames and tokens (WeNet's compute
    // padding too), so outputs are compared where they are not padding (as
    // tests/reference_parity.rs).
    let dec_valid = Tensor::arange(target.size()[1] + 1, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .lt_tensor(&(tlens + 1).unsqueeze(1))
        .unsqueeze(2);
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
    ] {
        let l = tch::no_grad(|| {
            loaded.model.forward(
                &io["feats"],
                &io["feats_lengths"],
                target,
                tlens,
                chunk,
                false,
            )
        });
        let enc_valid = io[&format!("{mode}.encoder_mask")].transpose(1, 2);
        let mut pairs = vec![
            ("encoder_out", &l.encoder_out.0 * &enc_valid, &enc_valid),
            ("ctc_log_probs", &l.ctc_log_probs * &enc_valid, &enc_valid),
            ("decoder_out", &l.decoder_out * &dec_valid, &dec_valid),
        ];
        if let Some(r) = &l.r_decoder_out {
            pairs.push(("r_decoder_out", r * &dec_valid, &dec_valid));
        }
        for (key, ours, valid) in pairs {
            let want = &io[&format!("{mode}.{key}")] * valid;
            let e = excess(&ours, &want);
            assert!(e <= 1e-5, "{label} {mode}.{key}: differs by {e:.3e}");
            worst = worst.max(e);
        }
        // WeNet's losses; our total adds the MoE balance loss (moe_conf, not WeNet's).
        for (key, ours) in [("loss_ctc", &l.ctc), ("loss_att", &l.att)] {
            let e = excess(ours, &io[&format!("{mode}.{key}")]);
            assert!(e <= 1e-5, "{label} {mode}.{key}: differs by {e:.3e}");
        }
    }
    eprintln!("{label}: imported model vs reference, worst excess {worst:.2e}");

    let wenet = f.path("wenet");
    ok(&upcycle(&[
        "convert",
        "export-wenet",
        "--checkpoint",
        f.path("ours").to_str().unwrap(),
        "--out",
        wenet.to_str().unwrap(),
        "--safetensors",
    ]));
    // Import -> export gives back the same names, dtypes and bits.
    let original = read_state_dict(&f.path("final.pt")).unwrap();
    let exported: std::collections::BTreeMap<String, Tensor> =
        read_state_dict(&wenet.join("final.pt"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(original.len(), exported.len(), "{label}: tensor count");
    for (name, t) in &original {
        let e = exported
            .get(name)
            .unwrap_or_else(|| panic!("{label}: {name} not exported"));
        assert_eq!(
            (t.kind(), t.size()),
            (e.kind(), e.size()),
            "{label}: {name}"
        );
        assert_eq!(bits(t), bits(e), "{label}: {name} differs");
    }
    // PyTorch reads it with weights_only=True, finds the same tensors, and WeNet's model
    // (the reference's, with WeNet's constructor signatures) accepts the train.yaml and
    // loads the state dict strictly.
    let report = python(
        r#"
import sys, torch, yaml
from safetensors.torch import load_file
from u2pp import build_model
orig, out = sys.argv[1], sys.argv[2]
a = torch.load(orig, weights_only=True)
b = torch.load(out + "/final.pt", weights_only=True)
c = load_file(out + "/final.safetensors")
assert list(a) and set(a) == set(b) == set(c), set(a) ^ set(b)
for k in a:
    for other in (b[k], c[k]):
        assert a[k].dtype == other.dtype and a[k].shape == other.shape, k
        assert torch.equal(a[k], other), k
config = yaml.safe_load(open(out + "/train.yaml"))
assert isinstance(config["optim_conf"]["eps"], float), config["optim_conf"]
model = build_model(config, config["output_dim"])
model.load_state_dict(b, strict=True)
import json
json.load(open(config["cmvn_conf"]["cmvn_file"]))
assert len(open(config["tokenizer_conf"]["symbol_table_path"]).read().split("\n")) > 2
print("torch ok", len(b))
"#,
        &[&f.path("final.pt"), &wenet],
    );
    assert!(report.contains("torch ok"), "{report}");
}

#[test]
fn dense_wenet_checkpoint_imports_matches_and_round_trips() {
    import_matches_reference_and_round_trips(&tiny(), "dense");
}

#[test]
fn moe_wenet_checkpoint_imports_matches_and_round_trips() {
    import_matches_reference_and_round_trips(&tiny_moe(), "moe");
}

/// A pickle naming `os.system` (or any class) is refused by name, and nothing runs.
#[test]
fn forbidden_globals_are_refused_and_nothing_runs() {
    let f = Fixture::new(&tiny());
    let marker = f.path("pwned");
    python(
        r#"
import argparse, os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
sd = torch.load(sys.argv[1] + "/final.pt", weights_only=True)
torch.save({**sd, "evil": Evil()}, sys.argv[1] + "/evil.pt")
torch.save({**sd, "args": argparse.Namespace(lr=1)}, sys.argv[1] + "/class.pt")
torch.save(sd, sys.argv[1] + "/legacy.pt", _use_new_zipfile_serialization=False)
"#,
        &[&f.dir, &marker],
    );
    for (file, global) in [
        ("evil.pt", "posix.system"),
        ("class.pt", "argparse.Namespace"),
    ] {
        let e = refused(&f.import(&["--checkpoint", f.path(file).to_str().unwrap()], "out"));
        assert!(
            e.contains(global) && e.contains("nothing was executed"),
            "{e}"
        );
    }
    assert!(!marker.exists(), "the pickle's code ran");
    let e = refused(&f.import(
        &["--checkpoint", f.path("legacy.pt").to_str().unwrap()],
        "out",
    ));
    assert!(e.contains("legacy torch.save format"), "{e}");
    assert!(!f.path("out").exists(), "a refused import wrote its output");
}

/// Options our model lacks, a tensor of another shape, and a tensor our model does not
/// have are named; nothing is written.
#[test]
fn unsupported_options_and_mismatched_tensors_are_named() {
    let f = Fixture::new(&tiny());
    let original = tiny();
    for (edit, want) in [
        (
            original.replace("encoder: conformer", "encoder: transformer"),
            "encoder: \"transformer\" is not supported",
        ),
        (
            original.clone() + "ctc_conf:\n  ctc_blank_id: 3\n",
            "ctc_conf.ctc_blank_id",
        ),
        (
            original.replace(
                "model_conf:\n",
                "model_conf:\n  apply_non_blank_embedding: true\n",
            ),
            "apply_non_blank_embedding",
        ),
        (
            original.replace(
                "  linear_units: 64\n  num_blocks: 2",
                "  linear_units: 48\n  num_blocks: 2",
            ),
            "feed_forward",
        ),
    ] {
        std::fs::write(f.path("train.yaml"), &edit).unwrap();
        let e = refused(&f.import(&[], "out"));
        assert!(e.contains(want), "want {want:?} in: {e}");
        if want == "feed_forward" {
            assert!(e.contains("has shape") && e.contains("expects"), "{e}");
        }
    }
    std::fs::write(f.path("train.yaml"), &original).unwrap();
    // An extra tensor (here in a safetensors checkpoint).
    let mut tensors = read_state_dict(&f.path("final.pt")).unwrap();
    tensors.push((
        "encoder.extra_proj.weight".into(),
        Tensor::zeros([2, 2], tch::kind::FLOAT_CPU),
    ));
    Tensor::write_safetensors(&tensors, f.path("extra.safetensors")).unwrap();
    let e = refused(&f.import(
        &[
            "--checkpoint",
            f.path("extra.safetensors").to_str().unwrap(),
        ],
        "out",
    ));
    assert!(e.contains("encoder.extra_proj.weight"), "{e}");
    assert!(!f.path("out").exists(), "a refused import wrote its output");
    // Units that do not fit the output layer.
    std::fs::write(f.path("few.txt"), "<blank> 0\n<unk> 1\nx 2\n<sos/eos> 3\n").unwrap();
    let e = refused(&f.import(&["--units", f.path("few.txt").to_str().unwrap()], "out"));
    assert!(e.contains("ctc.ctc_lo.weight") && e.contains("4"), "{e}");
}

/// float32, float16, bfloat16 and int64 tensors, views into one storage (offsets,
/// strides) and 0-d tensors read as PyTorch made them.
#[test]
fn dtypes_views_and_scalars_read_as_torch_wrote_them() {
    let tmp = tempfile::tempdir().unwrap();
    python(
        r#"
import sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
base = torch.randn(4, 6)
sd = {
    "f32": base,
    "view": base[1:, 2:].t(),           # offset and strides into base's storage
    "row": base[2],
    "f16": base.half()[:, ::3],
    "bf16": base.bfloat16(),
    "i64": torch.arange(-5, 5, dtype=torch.int64).view(2, 5)[:, 1:],
    "scalar": torch.tensor(2.5),
    "count": torch.tensor(7, dtype=torch.int64),
    "empty": torch.zeros(0, 3),
}
torch.save(sd, sys.argv[1] + "/m.pt")
save_file({k: v.contiguous().clone() for k, v in sd.items()}, sys.argv[1] + "/m.safetensors")
"#,
        &[tmp.path()],
    );
    let ours = read_state_dict(&tmp.path().join("m.pt")).unwrap();
    let want: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(tmp.path().join("m.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(ours.len(), want.len());
    for (name, t) in &ours {
        let w = &want[name];
        assert_eq!((t.kind(), t.size()), (w.kind(), w.size()), "{name}");
        assert_eq!(bits(t), bits(w), "{name}");
    }
}
