//! The fused attention kernel (`scaled_dot_product_attention` with the relative-position
//! term and the mask as an additive bias; what CUDA runs) against the explicit one
//! (WeNet's arithmetic, held bit-exact with WeNet by `reference_parity.rs`), both forced
//! on the CPU: the whole model's outputs, losses and every parameter's gradient within
//! 1e-5 (fp32), in full context and chunks of 16, on a batch with padding.

use tch::{nn, Device, Kind, Tensor};
use upcycle_model::asr::Vocab;
use upcycle_model::attention::AttentionKernel;
use upcycle_model::mask::ChunkMode;
use upcycle_trainer::config::TrainConfig;

const VOCAB: i64 = 40;

/// Losses, outputs and gradients of one forward and backward, in one list.
fn run(
    vs: &nn::VarStore,
    model: &upcycle_model::asr::AsrModel,
    chunk: ChunkMode,
) -> Vec<(String, Tensor)> {
    for (_, mut var) in vs.variables() {
        var.zero_grad();
    }
    let feats = Tensor::randn([3, 300, 80], (Kind::Float, Device::Cpu));
    let lens = Tensor::from_slice(&[300i64, 211, 97]);
    let target =
        Tensor::from_slice2(&[[3i64, 7, 9, 11, 2], [5, 6, 8, -1, -1], [4, -1, -1, -1, -1]]);
    let tlens = Tensor::from_slice(&[5i64, 3, 1]);
    let l = model.forward(&feats, &lens, &target, &tlens, chunk, false);
    // Gradients through fixed random projections of the outputs: the losses' own
    // gradients (CTC's above all) would amplify the outputs' last-bit differences.
    let probe = |t: &Tensor| (t * Tensor::randn_like(t)).sum(Kind::Float);
    let r_dec = l.r_decoder_out.as_ref().expect("a right decoder");
    (probe(&l.encoder_out.0) + probe(&l.decoder_out) + probe(r_dec)).backward();
    let mut out = vec![
        ("loss".to_string(), l.loss.detach()),
        ("ctc".to_string(), l.ctc.detach()),
        ("att".to_string(), l.att.detach()),
        ("encoder_out".to_string(), l.encoder_out.0.detach()),
        ("decoder_out".to_string(), l.decoder_out.detach()),
        ("r_decoder_out".to_string(), r_dec.detach()),
    ];
    // By name: `variables()` is a hash map, its order differs between calls.
    let vars: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
    for (name, var) in vars {
        if var.requires_grad() && var.grad().defined() {
            out.push((format!("grad.{name}"), var.grad().copy()));
        }
    }
    out
}

#[test]
fn fused_attention_matches_the_explicit_path_with_gradients() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let c = TrainConfig::load(&root.join("configs/small.yaml")).unwrap();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = c
        .build_model(&vs.root(), Vocab::sos_eos_last(VOCAB))
        .unwrap();
    for (mode, chunk) in [
        ("full", ChunkMode::Full),
        (
            "chunk16",
            ChunkMode::Chunk {
                size: 16,
                left_chunks: -1,
            },
        ),
    ] {
        let mut results = [AttentionKernel::Explicit, AttentionKernel::Fused].map(|kernel| {
            tch::manual_seed(1);
            kernel.force(|| run(&vs, &model, chunk))
        });
        let [explicit, fused] = &mut results;
        assert_eq!(explicit.len(), fused.len());
        let mut worst = 0f64;
        let mut report = Vec::new();
        for ((name, want), (fused_name, got)) in explicit.iter().zip(fused.iter()) {
            assert_eq!(name, fused_name);
            let scale = want.abs().max().double_value(&[]).max(1.0);
            let diff = (got - want).abs().max().double_value(&[]) / scale;
            if diff > 1e-5 {
                report.push(format!("{name}: {diff:.2e}"));
            }
            worst = worst.max(diff);
        }
        assert!(
            report.is_empty(),
            "{mode}: fused differs from explicit (relative to max |x|): {report:?}"
        );
        // The comparison sees the padding and the chunks: gradients are not all zero.
        let g = &explicit
            .iter()
            .find(|(n, _)| n.ends_with("pos_bias_v"))
            .unwrap()
            .1;
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        eprintln!("{mode}: worst difference {worst:.2e}");
    }
}
