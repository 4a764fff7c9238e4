//! The training step waits for the device only where it must: outside log intervals it
//! reads nothing back on the host for a dense model, and at most 2 values for MoE (the
//! budget of issue 18). Step code reads through `upcycle_model::host`, which counts every
//! read; each metrics line carries the count per update of its window
//! (`host_reads_per_step`), the line's own reads excluded. With `log_interval: 1` every
//! line is one update.

mod common;
use common::*;

fn reads_per_step(out: &std::path::Path) -> Vec<f64> {
    metrics(out)
        .iter()
        .filter_map(|l| l.get("host_reads_per_step").and_then(|v| v.as_f64()))
        .collect()
}

/// The MoE layers a metrics line reports.
fn moe_layers(out: &std::path::Path) -> usize {
    metrics(out)
        .iter()
        .find_map(|l| l.get("moe").and_then(|m| m.as_object()).map(|m| m.len()))
        .expect("MoE metrics")
}

#[test]
fn training_steps_read_nothing_back_outside_log_intervals() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dense) = setup(&tmp.path().join("dense"), "upcycle_conf: {seed: 3}\n");
    let out = tmp.path().join("dense-out");
    train(&dense, &data, &out, 4, None);
    assert_eq!(reads_per_step(&out), [0.0; 4], "dense model");

    // MoE with what reads counts on the host elsewhere: the expert bias and its load,
    // global balance statistics, a capacity, two micro-batches per update.
    let moe_config = |name: &str, compute: &str| {
        let path = deterministic_moe_config(tmp.path(), 4, 100);
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "moe_conf: {",
            &format!(
                "moe_conf: {{expert_bias: true, balance_scope: global, capacity_factor: 1.0, \
                 expert_compute: {compute}, "
            ),
        ) + "accum_grad: 2\n";
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let out = tmp.path().join("moe-out");
    train(&moe_config("moe.yaml", "auto"), &data, &out, 3, None);
    let reads = reads_per_step(&out);
    assert_eq!(reads.len(), 3);
    assert!(
        reads.iter().all(|&r| r <= 2.0),
        "MoE over budget: {reads:?}"
    );
    assert_eq!(
        reads, [0.0; 3],
        "the grouped GEMM takes its counts on the device"
    );

    // The counter sees the reads there are: the per-expert loop needs its splits on the
    // host, one read per MoE layer and micro-batch.
    let out = tmp.path().join("loop-out");
    train(&moe_config("loop.yaml", "loop"), &data, &out, 3, None);
    let want = (2 * moe_layers(&out)) as f64;
    assert_eq!(reads_per_step(&out), [want; 3], "expert_compute: loop");
}
