//! The model FLOP count (`upcycle_model::flops`, behind the benchmarks' TFLOP/s and MFU)
//! against an independent counter: PyTorch's own `torch.utils.flop_counter.FlopCounterMode`
//! over the forward of the WeNet-style PyTorch model (bench/reference/u2pp.py) on the same
//! real utterance. The backward is 2x the forward by convention (Megatron-Core, PaLM), so
//! the forward is what must agree, exactly.

mod common;

use std::path::Path;

use common::{configs, librivox, ok, python, upcycle};

const FORWARD_FLOPS: &str = r#"
import sys, yaml, torch
sys.path.insert(0, "../")
from train_step import batch
from u2pp import build_model
from torch.utils.flop_counter import FlopCounterMode
config = yaml.safe_load(open(sys.argv[1]))
x, xl, y, yl, vocab = batch(sys.argv[2], 1)
model = build_model(config, vocab)
model.train()
with FlopCounterMode(display=False) as counter:
    model.compute(x, xl, y, yl, decoding_chunk_size=-1)
print(counter.get_total_flops())
"#;

#[test]
fn forward_flops_equal_pytorchs_flop_counter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = librivox(&tmp.path().join("librivox"));
    let list = data.join("train/data.list");
    // Dense and MoE (MoE encoder and decoder), causal convolutions (padded before their
    // first pointwise product), decoder in both directions.
    for config in ["tiny.yaml", "small-moe-scratch.yaml"] {
        let config = configs().join(config);
        let theirs: f64 = python(FORWARD_FLOPS, &[&config, &list])
            .trim()
            .parse()
            .unwrap();
        let out = ok(&upcycle(&[
            "bench",
            "train-step",
            "--config",
            config.to_str().unwrap(),
            "--list",
            list.to_str().unwrap(),
            "--utts",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
        ]));
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ours = r["model_flops_per_step"].as_f64().unwrap() / 3.0;
        assert!(theirs > 1e6, "{}: {theirs}", config.display());
        assert_eq!(ours, theirs, "{}", Path::new(&config).display());
    }
}
