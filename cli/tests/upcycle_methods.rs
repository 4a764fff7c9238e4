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
use upcycle_model::upcycle::Method;
use upcycle_trainer::checkpoint::{self, Layout, LoadedModel};
use upcycle_trainer::convert;

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

/// `m` on the batch, in evaluation mode (no dropout), with gradients.
fn forward(m: &LoadedModel, b: &Batch, chunk: ChunkMode) -> upcycle_model::asr::Losses {
    m.model
        .forward(&b.feats, &b.lens, &b.target, &b.target_lens, chunk, false)
}

/// CTC log-probabilities, left and right decoder outputs, with padding zeroed.
fn outputs(m: &LoadedModel, b: &Batch, chunk: ChunkMode) -> [Tensor; 3] {
    let o = tch::no_grad(|| forward(m, b, chunk));
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

/// Largest `|child - parent| - 1e-5 |parent|` (allclose with atol = rtol = 1e-5 when
/// <= 1e-5) and largest `|child - parent|`, over all three outputs and both chunk modes.
fn distance(parent: &LoadedModel, child: &LoadedModel, b: &Batch) -> (f64, f64) {
    let (mut excess, mut worst) = (f64::MIN, 0f64);
    for chunk in CHUNKS {
        for (p, c) in outputs(parent, b, chunk)
            .iter()
            .zip(outputs(child, b, chunk))
        {
            let diff = (&c - p).abs();
            excess = excess.max((&diff - p.abs() * 1e-5).max().double_value(&[]));
            worst = worst.max(diff.max().double_value(&[]));
        }
    }
    (excess, worst)
}

/// WeNet's dense model imported under `dir`; its checkpoint directory.
fn import_dense(dir: &Path) -> PathBuf {
    let golden = fixture().join("dense");
    convert::wenet::import_wenet(&convert::wenet::ImportOptions {
        checkpoint: golden.join("final.pt"),
        config: golden.join("train.yaml"),
        units: Some(golden.join("lang_char.txt")),
        cmvn: Some(fixture().join("global_cmvn")),
        out: dir.join("dense"),
    })
    .unwrap();
    dir.join("dense")
}

/// The child of `dense` in `out` by `method`, 8 experts, `k` per token, routing by
/// `router`, initialised `init` (`zero` or `normal`), loaded whole.
fn child(dense: &Path, out: &Path, method: Method, k: i64, (router, init): Routing) -> LoadedModel {
    convert::upcycle_checkpoint(&convert::UpcycleOptions {
        from: dense.to_path_buf(),
        out: out.to_path_buf(),
        experts: 8,
        top_k: k,
        method,
        router: router.into(),
        router_init: init.into(),
        router_std: 0.02,
        router_data: None,
        encoder_only: false,
        seed: 3,
        layout: Layout::new(1, 1),
    })
    .unwrap();
    checkpoint::load_model(out, Device::Cpu).unwrap()
}

/// `moe_conf.router` and `router_init`.
type Routing = (&'static str, &'static str);
/// WeNet's routing, normal router: exact for copies under any router.
const WENET: Routing = ("topk_softmax", "normal");
/// Softmax then top-k times E/k from a zero router: exact.
const SOFTMAX_TOPK: Routing = ("softmax_topk", "zero");

#[test]
fn upcycling_methods_and_routings_at_step_0_on_real_speech() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = import_dense(tmp.path());
    let parent = checkpoint::load_model(&dense, Device::Cpu).unwrap();
    let b = batch(&parent.units);

    // The methods meant to keep the parent's function, under both routings.
    let granular = Method::Granular { granularity: 4 };
    let exact = [
        ("copy top-2 topk_softmax", Method::Copy, 2, WENET),
        ("copy top-1 softmax_topk", Method::Copy, 1, SOFTMAX_TOPK),
        ("copy top-2 softmax_topk", Method::Copy, 2, SOFTMAX_TOPK),
        ("granular G=4 top-4 topk_softmax", granular, 4, WENET),
    ];
    for (i, (name, method, k, router)) in exact.into_iter().enumerate() {
        let out = tmp.path().join(format!("exact-{i}"));
        let (excess, d) = distance(&parent, &child(&dense, &out, method, k, router), &b);
        eprintln!("{name}: max |child - parent| = {d:.2e}");
        assert!(
            excess <= 1e-5,
            "{name}: the child moved {d:.3e} from its parent"
        );
    }
    // The same through the command line, sharded over 2 expert-parallel workers.
    let out = tmp.path().join("granular");
    let printed = ok(&upcycle(&[
        "convert",
        "upcycle",
        "--from",
        dense.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "granular",
        "--granularity",
        "4",
        "--experts",
        "8",
        "--top-k",
        "4",
        "--router",
        "softmax_topk",
        "--router-init",
        "zero",
        "--world",
        "2",
        "--ep",
        "2",
    ]));
    assert!(printed.contains("upcycled (granular)"), "{printed}");
    let granular = checkpoint::load_model(&out, Device::Cpu).unwrap();
    let (excess, d) = distance(&parent, &granular, &b);
    eprintln!("granular G=4 top-4 softmax_topk: max |child - parent| = {d:.2e}");
    assert!(
        excess <= 1e-5,
        "granular softmax_topk: the child moved {d:.3e}"
    );
    let e = &granular.config.encoder_conf;
    assert_eq!((e.n_expert, e.expert_linear_units), (8, Some(16)));
    assert!(
        granular.vs.variables()["encoder.encoders.0.feed_forward.experts.w_1"]
            .size()
            .ends_with(&[32, 16])
    );

    // A normal router under softmax_topk only approximates the parent (its top-1
    // probability times E is not 1).
    let approx = child(
        &dense,
        &tmp.path().join("approx"),
        Method::Copy,
        1,
        ("softmax_topk", "normal"),
    );
    let (_, d) = distance(&parent, &approx, &b);
    eprintln!("copy top-1 softmax_topk, normal router (std 0.02): max |child - parent| = {d:.2e}");

    // Noise S = 0.01 on every expert weight: the outputs move, a little.
    let noise = Method::Noise { std: 0.01 };
    let noisy = child(&dense, &tmp.path().join("noise"), noise, 2, WENET);
    let (_, d) = distance(&parent, &noisy, &b);
    eprintln!("noise S=0.01: max |child - parent| = {d:.2e}");
    assert!(
        (1e-5..0.1).contains(&d),
        "noise 0.01 moved the child {d:.3e}"
    );

    // Drop-Upcycling is not meant to keep the function: it must move, and says how far.
    let drop = Method::Drop { ratio: 0.5 };
    let dropped = child(&dense, &tmp.path().join("drop"), drop, 2, WENET);
    let (_, d) = distance(&parent, &dropped, &b);
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

    let out = tmp.path().join("top-1");
    let child = child(&dense, &out, Method::Copy, 1, SOFTMAX_TOPK);
    let b = batch(&child.units);
    let o = forward(&child, &b, ChunkMode::Full);
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

/// `--router-init kmeans` on real speech: the routers are fitted to the tokens WeNet's
/// dense model gives on the LibriVox clips, and the copy child still computes its
/// parent's outputs (exactly under topk_softmax, whatever the router; within 0.1% under
/// softmax_topk, whose kmeans routers are made small). Why it exists: a
/// normal router over identical copies gets no gradient from the task's loss (the k
/// weights sum to 1 over equal outputs), so it starts and stays near uniform.
#[test]
fn kmeans_routers_fit_the_parents_tokens_and_keep_its_function() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = import_dense(tmp.path());
    let data = common::librivox(&tmp.path().join("data")).join("train");
    let parent = checkpoint::load_model(&dense, Device::Cpu).unwrap();
    let b = batch(&parent.units);
    // `convert upcycle --router-init kmeans` into `out`, fitted on `data` (if any),
    // with `extra` arguments (which may name another --router-init).
    let convert = |out: &str, data: Option<&Path>, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "convert".to_string(),
            "upcycle".into(),
            "--from".into(),
            dense.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if !extra.contains(&"--router-init") {
            args.extend(["--router-init".into(), "kmeans".into()]);
        }
        if let Some(data) = data {
            args.extend(["--router-data".into(), data.display().to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (upcycle(&args), out)
    };
    let refused = |out: &str, data: Option<&Path>, extra: &[&str]| {
        let (o, _) = convert(out, data, extra);
        assert!(!o.status.success(), "{out}: accepted");
        String::from_utf8_lossy(&o.stderr).to_string()
    };

    let (o, out) = convert("kmeans", Some(&data), &[]);
    let printed = ok(&o);
    assert!(
        printed.contains("6 fresh routers (6 fitted by k-means)"),
        "{printed}"
    );
    let fitted = checkpoint::load_model(&out, Device::Cpu).unwrap();
    let (excess, d) = distance(&parent, &fitted, &b);
    eprintln!("copy top-2, kmeans routers: max |child - parent| = {d:.2e}");
    assert!(excess <= 1e-5, "kmeans routers moved the child {d:.3e}");

    // The routing of the five clips: nearer to a choice than a normal router's.
    let normal = child(&dense, &tmp.path().join("normal"), Method::Copy, 2, WENET);
    let entropy = |m: &LoadedModel| {
        let o = tch::no_grad(|| forward(m, &b, ChunkMode::Full));
        let layers = &o.routing.layers;
        layers
            .iter()
            .map(|l| l.entropy.double_value(&[]))
            .sum::<f64>()
            / layers.len() as f64
    };
    let (k, n) = (entropy(&fitted), entropy(&normal));
    eprintln!(
        "mean router entropy: kmeans {k:.4}, normal {n:.4} (ln 8 = {:.4})",
        8f64.ln()
    );
    assert!(k < n, "kmeans entropy {k} not below a normal router's {n}");

    // The task's loss gives a normal router over copies no gradient (without dropout,
    // which would make the copies' outputs differ).
    let o = forward(&normal, &b, ChunkMode::Full);
    (&o.ctc + &o.att).backward();
    for (name, router) in normal.vs.variables() {
        if name.ends_with(".router.weight") {
            let g = router.grad().abs().max().double_value(&[]);
            assert!(g < 1e-6, "{name}: a gradient {g} through identical copies");
        }
    }

    let e = refused("no-data", None, &[]);
    assert!(e.contains("name the data with --router-data"), "{e}");
    let e = refused("missing-data", Some(&tmp.path().join("data")), &[]);
    assert!(e.contains("data.list does not exist"), "{e}");
    let e = refused("data-unread", Some(&data), &["--router-init", "normal"]);
    assert!(
        e.contains("--router-data is read only by --router-init kmeans"),
        "{e}"
    );

    // Top-1 under softmax_topk: the kmeans rows made small keep each chosen expert's
    // weight E p near 1, so the child stays within about 0.1% of its parent.
    let top_1 = ["--router", "softmax_topk", "--top-k", "1", "--experts", "4"];
    let (o, out) = convert("kmeans-top-1", Some(&data), &top_1);
    ok(&o);
    let top_1 = checkpoint::load_model(&out, Device::Cpu).unwrap();
    let (_, d) = distance(&parent, &top_1, &b);
    eprintln!("copy top-1 softmax_topk, kmeans routers: max |child - parent| = {d:.2e}");
    assert!(d < 1e-2, "kmeans top-1 moved the child {d:.3e}");
}
