//! The Rust MoE layer against WeNet's `MoEFFNLayer` (`bench/reference/u2pp.py`, eager
//! PyTorch 2.11 from the project's environment): forward output, auxiliary losses, tokens
//! per expert and every gradient (input, router, experts), for WeNet's semantics, for
//! masked positions with capacity-limited token dropping, and for `router: softmax_topk`;
//! in each case one expert receives no token. Every expert computation (grouped GEMM,
//! padded bmm, loop) is checked. Tolerance: fp32, 1e-5.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tch::{nn, Device, Kind, Tensor};
use upcycle_model::activation::Activation;
use upcycle_model::config::MoeConf;
use upcycle_model::moe::{ExpertBank, LocalDispatch, MoeFeedForward, MoeSpec, Routing};
use upcycle_model::naming::from_wenet;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn close(what: &str, ours: &Tensor, want: &Tensor) {
    assert_eq!(ours.size(), want.size(), "{what}: shape");
    let (a, b) = (ours.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let excess = ((&a - &b).abs() - b.abs() * 1e-5).max().double_value(&[]);
    assert!(
        excess <= 1e-5,
        "{what}: differs from the PyTorch reference by {excess:.3e}"
    );
}

#[test]
fn moe_layer_matches_wenet_forward_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("bench/reference/moe_parity.py"))
        .arg("--out")
        .arg(tmp.path())
        .status()
        .expect("the project's Python environment exists (scripts/setup.sh)");
    assert!(status.success(), "moe_parity.py failed");
    for case in ["wenet", "masked_cap", "pre_softmax"] {
        let file = tmp.path().join(format!("{case}.safetensors"));
        let io: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
            .unwrap()
            .into_iter()
            .collect();
        let meta = safetensors_metadata(&file);
        for compute in ["grouped_mm", "bmm", "loop"] {
            check_case(case, &meta, &io, compute);
        }
    }
}

fn safetensors_metadata(file: &Path) -> serde_json::Value {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_str(header["__metadata__"]["case"].as_str().unwrap()).unwrap()
}

fn check_case(case: &str, meta: &serde_json::Value, io: &BTreeMap<String, Tensor>, compute: &str) {
    let label = format!("{case}/{compute}");
    let int = |k: &str| meta[k].as_i64().unwrap();
    let (e, d, f, k) = (int("n_expert"), int("d"), int("hidden"), int("k"));
    let conf = MoeConf {
        router: meta["router"].as_str().unwrap().into(),
        capacity_factor: meta["capacity_factor"].as_f64().unwrap(),
        expert_compute: compute.into(),
        ..Default::default()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let path = vs.root() / "ffn";
    let spec = MoeSpec {
        d,
        n_expert: e,
        k,
        activation: Activation::Swish,
        dropout: 0.0,
        conf,
        dispatch: Arc::new(LocalDispatch),
        balance: Arc::default(),
    };
    let layer = MoeFeedForward::new(&path, ExpertBank::new(&(&path / "experts"), e, d, f), &spec);
    let params: BTreeMap<String, Tensor> = io
        .iter()
        .filter(|(n, _)| n.starts_with("gate.") || n.starts_with("experts."))
        .map(|(n, t)| (format!("ffn.{n}"), t.copy()))
        .collect();
    let params = from_wenet(params).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&params[&name]);
        }
    });

    let x = io["x"].copy().set_requires_grad(true);
    let valid = io["valid"].to_kind(Kind::Bool);
    let masked = meta["masked"].as_bool().unwrap();
    let mut routing = Routing::recording();
    let y = layer.forward(&x, masked.then_some(&valid), true, &mut routing);
    let r = &routing.layers[0];
    close(&format!("{label}: y"), &y, &io["y"]);
    close(
        &format!("{label}: balance"),
        &r.balance_loss,
        &io["balance"],
    );
    close(&format!("{label}: z"), &r.z_loss, &io["z"]);
    assert!(
        r.tokens_per_expert.equal(&io["tokens_per_expert"]),
        "{label}: tokens per expert {:?}",
        Vec::<i64>::try_from(&r.tokens_per_expert).unwrap()
    );
    let loss = (&y * &io["g"]).sum(Kind::Float) + &r.balance_loss + &r.z_loss;
    loss.backward();
    close(&format!("{label}: grad x"), &x.grad(), &io["grad.x"]);
    let grads: BTreeMap<String, Tensor> = io
        .iter()
        .filter_map(|(n, t)| Some((format!("ffn.{}", n.strip_prefix("grad.")?), t.copy())))
        .filter(|(n, _)| n != "ffn.x")
        .collect();
    let grads = from_wenet(grads).unwrap();
    for (name, var) in vs.variables() {
        close(&format!("{label}: grad {name}"), &var.grad(), &grads[&name]);
    }
    let last = vs.variables()["ffn.experts.w_1"].grad().get(e - 1);
    assert_eq!(
        last.abs().max().double_value(&[]),
        0.0,
        "{label}: idle expert"
    );
}
