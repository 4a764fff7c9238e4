//! Every upcycling method and routing at step 0, on real speech: WeNet's own dense tiny
//! model (`tests/golden/wenet/dense`, trained by WeNet on pocketsphinx's five LibriVox
//! clips) is imported and upcycled by `convert upcycle`; parent and child then run on the
//! five clips (WeNet's fbank of them) in one padded batch, full context and chunk 16, with
//! WeNet's greedy transcripts as decoder targets. Copy and granular children, under both
//! routings, must give the parent's CTC log-probabilities and both decoders' outputs
//! within 1e-5; noise stays within its bound; drop moves, and says how far.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{ok, upcycle};
use tch::{Device, Kind, Tensor};
use upcycle_model::mask::ChunkMode;
use upcycle_trainer::checkpoint::{self, LoadedModel};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/wenet")
}

/// The five clips as one padded batch: features, their lengths, targets (padded with
/// -1) and target lengths.
struct Batch {
    feats: Tensor,
    lens: Tensor,
    target: Tensor,
    target_lens: Tensor,
}

fn batch(units: &upcycle_dataset::text::Units) -> Batch {
    let expected: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(fixture().join("dense/expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let hyps: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("dense/hyps.json")).unwrap()).unwrap();
    let text = &hyps["text"]["ctc_greedy_search"]["full"];
    let (mut feats, mut targets) = (Vec::new(), Vec::new());
    for (name, f) in &expected {
        let Some(key) = name.strip_prefix("feats.") else {
            continue;
        };
        feats.push(f.shallow_clone());
        let (ids, _) = units.encode(text[key].as_str().unwrap());
        assert!(!ids.is_empty(), "{key}: a transcript");
        targets.push(Tensor::from_slice(&ids));
    }
    assert_eq!(feats.len(), 5, "the five LibriVox clips");
    let lens: Vec<i64> = feats.iter().map(|f| f.size()[0]).collect();
    let target_lens: Vec<i64> = targets.iter().map(|t| t.size()[0]).collect();
    Batch {
        feats: Tensor::pad_sequence(&feats, true, 0.0, "right"),
        lens: Tensor::from_slice(&lens),
        target: Tensor::pad_sequence(&targets, true, -1.0, "right"),
        target_lens: Tensor::from_slice(&target_lens),
    }
}

/// CTC log-probabilities, left and right decoder outputs, with padding zeroed.
fn outputs(m: &LoadedModel, b: &Batch, chunk: ChunkMode) -> [Tensor; 3] {
    let o = tch::no_grad(|| {
        m.model
            .forward(&b.feats, &b.lens, &b.target, &b.target_lens, chunk, false)
    });
    let frames = o.encoder_out.1.transpose(1, 2).to_kind(Kind::Float);
    let l = b.target.size()[1] + 1;
    let tokens = Tensor::arange(l, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .lt_tensor(&(&b.target_lens + 1).unsqueeze(1))
        .unsqueeze(2)
        .to_kind(Kind::Float);
    [
        o.ctc_log_probs * frames,
        o.decoder_out * &tokens,
        o.r_decoder_out.expect("a right-to-left decoder") * &tokens,
    ]
}

const CHUNKS: [ChunkMode; 2] = [
    ChunkMode::Full,
    ChunkMode::Chunk {
        size: 16,
        left_chunks: -1,
    },
];

/// Largest absolute difference of the child's outputs from the parent's, over all three
/// outputs and both chunk modes.
fn distance(parent: &LoadedModel, child: &LoadedModel, b: &Batch) -> f64 {
    let mut worst = 0f64;
    for chunk in CHUNKS {
        for (p, c) in outputs(parent, b, chunk)
            .iter()
            .zip(outputs(child, b, chunk))
        {
            worst = worst.max((p - c).abs().max().double_value(&[]));
        }
    }
    worst
}

/// WeNet's dense model imported under `dir`; its checkpoint directory.
fn import_dense(dir: &Path) -> PathBuf {
    let dense = dir.join("dense");
    let golden = fixture().join("dense");
    ok(&upcycle(&[
        "convert",
        "import-wenet",
        "--checkpoint",
        golden.join("final.pt").to_str().unwrap(),
        "--config",
        golden.join("train.yaml").to_str().unwrap(),
        "--units",
        golden.join("lang_char.txt").to_str().unwrap(),
        "--cmvn",
        fixture().join("global_cmvn").to_str().unwrap(),
        "--out",
        dense.to_str().unwrap(),
    ]));
    dense
}

/// `convert upcycle` of `dense` into `out` with `args`; the child, loaded whole.
fn convert(dense: &Path, out: &Path, args: &[&str]) -> LoadedModel {
    let mut all = vec![
        "convert",
        "upcycle",
        "--from",
        dense.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--experts",
        "8",
        "--seed",
        "3",
    ];
    all.extend_from_slice(args);
    let printed = ok(&upcycle(&all));
    assert!(printed.contains("expert banks filled"), "{printed}");
    checkpoint::load_model(out, Device::Cpu).unwrap()
}

#[test]
fn upcycling_methods_and_routings_at_step_0_on_real_speech() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = import_dense(tmp.path());
    let parent = checkpoint::load_model(&dense, Device::Cpu).unwrap();
    let b = batch(&parent.units);

    // (name, options): the methods meant to keep the parent's function.
    let exact: [(&str, &[&str]); 5] = [
        ("copy top-2 topk_softmax", &["--top-k", "2"]),
        (
            "copy top-1 softmax_topk",
            &[
                "--top-k",
                "1",
                "--router",
                "softmax_topk",
                "--router-init",
                "zero",
            ],
        ),
        (
            "copy top-2 softmax_topk",
            &[
                "--top-k",
                "2",
                "--router",
                "softmax_topk",
                "--router-init",
                "zero",
            ],
        ),
        (
            "granular G=4 top-4 topk_softmax",
            &["--method", "granular", "--granularity", "4", "--top-k", "4"],
        ),
        (
            "granular G=4 top-4 softmax_topk",
            &[
                "--method",
                "granular",
                "--granularity",
                "4",
                "--top-k",
                "4",
                "--router",
                "softmax_topk",
                "--router-init",
                "zero",
                // Sharded over 2 expert-parallel workers; it loads whole.
                "--world",
                "2",
                "--ep",
                "2",
            ],
        ),
    ];
    for (i, (name, args)) in exact.iter().enumerate() {
        let child = convert(&dense, &tmp.path().join(format!("exact-{i}")), args);
        let d = distance(&parent, &child, &b);
        eprintln!("{name}: max |child - parent| = {d:.2e}");
        assert!(d <= 1e-5, "{name}: the child moved {d:.3e} from its parent");
    }
    let granular = checkpoint::load_model(&tmp.path().join("exact-4"), Device::Cpu).unwrap();
    let e = &granular.config.encoder_conf;
    assert_eq!((e.n_expert, e.expert_linear_units), (8, Some(16)));
    assert!(
        granular.vs.variables()["encoder.encoders.0.feed_forward.experts.w_1"]
            .size()
            .ends_with(&[32, 16])
    );

    // A normal router under softmax_topk only approximates the parent.
    let approx = convert(
        &dense,
        &tmp.path().join("approx"),
        &["--top-k", "1", "--router", "softmax_topk"],
    );
    eprintln!(
        "copy top-1 softmax_topk, normal router (std 0.02): max |child - parent| = {:.2e}",
        distance(&parent, &approx, &b)
    );

    // Noise S = 0.01 on every expert weight: the outputs move, by about S times the
    // outputs' scale at most (measured: see the printed distance).
    let noisy = convert(
        &dense,
        &tmp.path().join("noise"),
        &["--method", "noise", "--noise", "0.01"],
    );
    let d = distance(&parent, &noisy, &b);
    eprintln!("noise S=0.01: max |child - parent| = {d:.2e}");
    assert!(
        (1e-5..0.1).contains(&d),
        "noise 0.01 moved the child {d:.3e}"
    );

    // Drop-Upcycling is not meant to keep the function: it must move, and says how far.
    let dropped = convert(
        &dense,
        &tmp.path().join("drop"),
        &["--method", "drop", "--drop-ratio", "0.5"],
    );
    let d = distance(&parent, &dropped, &b);
    eprintln!("drop r=0.5: max |child - parent| = {d:.2e}");
    assert!(d > 1e-3, "drop r=0.5 moved the child only {d:.3e}");
}

/// Top-1 under softmax_topk learns: on real utterances the copy-upcycled child (zero
/// router, so exactly its parent) gets a non-zero gradient in every router, while
/// WeNet's routing refuses top-1.
#[test]
fn top_1_softmax_topk_gives_every_router_a_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = import_dense(tmp.path());
    let refused = upcycle(&[
        "convert",
        "upcycle",
        "--from",
        dense.to_str().unwrap(),
        "--out",
        tmp.path().join("wenet-top-1").to_str().unwrap(),
        "--top-k",
        "1",
    ]);
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(e.contains("moe_conf.router: softmax_topk"), "{e}");

    let child = convert(
        &dense,
        &tmp.path().join("top-1"),
        &[
            "--top-k",
            "1",
            "--router",
            "softmax_topk",
            "--router-init",
            "zero",
        ],
    );
    let b = batch(&child.units);
    let o = child.model.forward(
        &b.feats,
        &b.lens,
        &b.target,
        &b.target_lens,
        ChunkMode::Full,
        false,
    );
    o.loss.backward();
    let routers: Vec<(String, Tensor)> = child
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".router.weight"))
        .collect();
    assert_eq!(
        routers.len(),
        2 * 2 + 2,
        "every feed-forward network is MoE"
    );
    for (name, router) in routers {
        let g = router.grad().abs().max().double_value(&[]);
        eprintln!("{name}: max |grad| {g:.2e}");
        assert!(g > 1e-6, "{name}: no gradient ({g})");
    }
}
