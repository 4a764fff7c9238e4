//! Our AdamW against PyTorch's own `torch.optim.AdamW` on a small model whose
//! parameters are frozen and released by a freezing schedule mid-run, as in UME's
//! training: PyTorch keeps one step count per parameter (created at its first update,
//! not advanced while it is frozen), and so must we.

mod common;

use std::collections::BTreeMap;

use common::python;
use tch::{Kind, Tensor};
use upcycle_trainer::config::OptimConf;
use upcycle_trainer::freeze::{FreezePhase, FreezeSchedule};
use upcycle_trainer::optim::{AdamW, Schedule};

/// Trains `torch.nn.Sequential(Linear(6, 8), Tanh(), Linear(8, 4))` with
/// `torch.optim.AdamW` for the steps of `plan.json` (learning rate, hyper-parameters and
/// freezing phases; frozen means `requires_grad` off, and `zero_grad` leaves no gradient,
/// so PyTorch skips the parameter), and saves in `adamw.safetensors` the initial
/// parameters (`init.<name>`), and after each step `s` every gradient it used
/// (`grad.<s>.<name>`), every parameter (`param.<s>.<name>`) and every step count
/// (`step.<s>.<name>`).
const TORCH_ADAMW: &str = r#"
import fnmatch, json, sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
plan = json.load(open(out + "/plan.json"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
saved = {f"init.{n}": p.detach().clone() for n, p in model.named_parameters()}
opt = torch.optim.AdamW(model.parameters(), lr=plan["lrs"][0], betas=plan["betas"],
                        eps=plan["eps"], weight_decay=plan["weight_decay"])

def trainable(step, name):
    phase = [p for p in plan["phases"] if p["from_step"] <= step][-1]
    return any(fnmatch.fnmatchcase(name, g) for g in phase["trainable"])

for step, lr in enumerate(plan["lrs"]):
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(step, n))
    for group in opt.param_groups:
        group["lr"] = lr
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    ((model(x) - y) ** 2).mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            saved[f"grad.{step}.{n}"] = p.grad.clone()
    opt.step()
    opt.zero_grad()
    for n, p in model.named_parameters():
        saved[f"param.{step}.{n}"] = p.detach().clone()
        if p in opt.state:
            saved[f"step.{step}.{n}"] = opt.state[p]["step"].clone().reshape(1)
save_file(saved, out + "/adamw.safetensors")
"#;

/// Runs a PyTorch `script` on `plan` (written to `dir/plan.json`); returns the tensors it
/// saved in `dir/out` and the parameters it started from (its `init.*` tensors, as fresh
/// leaves that require gradients).
fn run_torch(
    script: &str,
    dir: &std::path::Path,
    plan: &serde_json::Value,
    out: &str,
) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    std::fs::write(dir.join("plan.json"), plan.to_string()).unwrap();
    python(script, &[dir]);
    let torch: BTreeMap<String, Tensor> = Tensor::read_safetensors(dir.join(out))
        .unwrap()
        .into_iter()
        .collect();
    let params = torch
        .iter()
        .filter_map(|(k, t)| {
            let name = k.strip_prefix("init.")?;
            Some((name.to_string(), t.copy().set_requires_grad(true)))
        })
        .collect();
    (torch, params)
}

#[test]
fn adamw_equals_torch_when_frozen_parameters_are_released() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = OptimConf {
        weight_decay: 0.01,
        ..Default::default()
    };
    let phases: Vec<FreezePhase> = [
        // The second layer starts frozen and is released at step 3; the first layer's
        // bias is frozen again at 5 and released at 7 (its count waits meanwhile).
        (0, &["0.*"][..]),
        (3, &["*"][..]),
        (5, &["0.weight", "2.*"][..]),
        (7, &["*"][..]),
    ]
    .iter()
    .map(|(from_step, globs)| FreezePhase {
        from_step: *from_step,
        trainable: globs.iter().map(|g| g.to_string()).collect(),
        lr_schedule: None,
    })
    .collect();
    let (release, steps) = (3, 12);
    let schedule = Schedule::Warmup {
        lr: 0.01,
        warmup: 4,
    };
    let lrs: Vec<f64> = (0..steps).map(|s| schedule.lr(s)).collect();
    let plan = serde_json::json!({
        "lrs": lrs, "betas": conf.betas, "eps": conf.eps,
        "weight_decay": conf.weight_decay, "phases": phases,
    });
    let (torch, params) = run_torch(TORCH_ADAMW, tmp.path(), &plan, "adamw.safetensors");
    assert_eq!(params.len(), 4);
    let freeze = FreezeSchedule::new(&phases, &params).unwrap();
    let mut opt = AdamW::new(
        conf,
        params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect(),
    );
    let mut worst_after_release = 0f64;
    for step in 0..steps {
        // As the training loop: phase, backward, clip (nothing to clip here), step, zero.
        freeze.apply(step);
        // PyTorch's gradients, given to the parameters it computed them for: the
        // gradient of sum(p * g) is g exactly.
        let mut surrogate = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        for (name, p) in &params {
            let grad = torch.get(&format!("grad.{step}.{name}"));
            assert_eq!(
                grad.is_some(),
                p.requires_grad(),
                "step {step}: {name} is trainable in one of the two only"
            );
            if let Some(g) = grad {
                surrogate += (p * g).sum(Kind::Float);
            }
        }
        surrogate.backward();
        opt.step(lrs[step as usize], None).unwrap();
        opt.zero_grad();
        let counts = opt.state().0.per_tensor;
        for (name, p) in &params {
            let want = &torch[&format!("param.{step}.{name}")];
            let diff = (p - want).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-6,
                "step {step}: {name} differs from torch.optim.AdamW by {diff}"
            );
            if step >= release {
                worst_after_release = worst_after_release.max(diff);
            }
            let torch_count = torch
                .get(&format!("step.{step}.{name}"))
                .map(|t| t.double_value(&[0]) as u64);
            assert_eq!(
                counts.get(name).copied(),
                torch_count,
                "step {step}: {name}'s step count"
            );
        }
    }
    let counts = opt.state().0.per_tensor;
    // Released at 3, and 0.bias waited two steps.
    assert_eq!(counts["2.weight"], steps - release);
    assert_eq!(counts["0.bias"], steps - 2);
    assert_eq!(counts["0.weight"], steps);
    eprintln!(
        "max |ours - torch.optim.AdamW| over every tensor from the release (step {release}) \
         to step {steps}: {worst_after_release:.3e}"
    );
}

/// PyTorch's own schedulers for our `linear` and `cosine`: `LinearLR` warm-up from
/// `1/w` over `w - 1` steps, then (`SequentialLR`) `LinearLR` down to the floor or
/// `CosineAnnealingLR`, over `total - w` steps; the rate of each of `n` steps as JSON.
const TORCH_SCHEDULES: &str = r#"
import json, torch
lr, w, total, floor, n = 1e-3, 10, 60, 1e-4, 60
def run(decay):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / w, total_iters=w - 1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay(opt)], milestones=[w - 1])
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out
L = torch.optim.lr_scheduler
print(json.dumps({
    "linear": run(lambda o: L.LinearLR(o, start_factor=1.0, end_factor=floor / lr, total_iters=total - w)),
    "cosine": run(lambda o: L.CosineAnnealingLR(o, T_max=total - w, eta_min=floor)),
}))
"#;

#[test]
fn continuation_schedules_equal_torch_schedulers() {
    let torch: BTreeMap<String, Vec<f64>> =
        serde_json::from_str(&python(TORCH_SCHEDULES, &[])).unwrap();
    let conf = upcycle_trainer::config::SchedulerConf {
        warmup_steps: 10,
        total_steps: 60,
        min_lr: 1e-4,
    };
    for (name, want) in &torch {
        let ours = Schedule::new(name, 1e-3, &conf, 0);
        assert_eq!(want.len(), 60);
        for (step, w) in want.iter().enumerate() {
            let got = ours.lr(step as u64);
            assert!(
                (got - w).abs() <= 1e-12,
                "{name} step {step}: {got} vs torch {w}"
            );
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_` then `torch.optim.AdamW(fused=True)` with the
/// `found_inf` a `GradScaler` hands it (1 when the norm is not finite), on the model of
/// [`TORCH_ADAMW`] with inputs large enough to clip and a NaN loss at the steps
/// `plan["nan_steps"]`; saves each step's gradients before clipping (`grad.<s>.<name>`),
/// the norm (`norm.<s>`), and after it every parameter, moment and step count.
const TORCH_CLIP_SKIP: &str = r#"
import json, sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
plan = json.load(open(out + "/plan.json"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
saved = {f"init.{n}": p.detach().clone() for n, p in model.named_parameters()}
opt = torch.optim.AdamW(model.parameters(), lr=plan["lr"], betas=plan["betas"], eps=plan["eps"],
                        weight_decay=plan["weight_decay"], fused=True)
for step in range(plan["steps"]):
    x, y = torch.randn(16, 6) * 10, torch.randn(16, 4)
    loss = ((model(x) - y) ** 2).mean()
    if step in plan["nan_steps"]:
        loss = loss * float("nan")
    loss.backward()
    for n, p in model.named_parameters():
        saved[f"grad.{step}.{n}"] = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), plan["max_norm"])
    opt.found_inf = (~torch.isfinite(norm)).float()
    opt.step()
    opt.zero_grad()
    saved[f"norm.{step}"] = norm.double().reshape(1)
    for n, p in model.named_parameters():
        state = opt.state[p]
        saved[f"param.{step}.{n}"] = p.detach().clone()
        saved[f"exp_avg.{step}.{n}"] = state["exp_avg"].clone()
        saved[f"exp_avg_sq.{step}.{n}"] = state["exp_avg_sq"].clone()
        saved[f"step.{step}.{n}"] = state["step"].clone().reshape(1)
save_file(saved, out + "/clip_skip.safetensors")
"#;

/// Clipping by a coefficient on the device and a non-finite step skipped on the device
/// (the fused kernel's `found_inf`) leave parameters, moments and per-parameter step
/// counts as PyTorch's do, the first step and a later one skipped.
#[test]
fn clipping_and_skipping_a_nonfinite_step_equal_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = OptimConf {
        weight_decay: 0.01,
        ..Default::default()
    };
    let (lr, max_norm, steps, nan_steps) = (0.01, 1.0, 7, [0u64, 3]);
    let plan = serde_json::json!({
        "lr": lr, "betas": conf.betas, "eps": conf.eps, "weight_decay": conf.weight_decay,
        "steps": steps, "nan_steps": nan_steps, "max_norm": max_norm,
    });
    let (torch, params) = run_torch(TORCH_CLIP_SKIP, tmp.path(), &plan, "clip_skip.safetensors");
    let mut opt = AdamW::new(
        conf,
        params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect(),
    );
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let mut clipped = 0;
    for step in 0..steps {
        let mut surrogate = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        for (name, p) in &params {
            surrogate += (p * &torch[&format!("grad.{step}.{name}")]).sum(Kind::Float);
        }
        surrogate.backward();
        let norm = opt.clip_grad_norm(max_norm).unwrap();
        let found_inf = norm.isfinite().logical_not().to_kind(Kind::Float);
        opt.step(lr, Some(&found_inf)).unwrap();
        opt.zero_grad();

        let (ours, want) = (
            norm.double_value(&[]),
            torch[&format!("norm.{step}")].double_value(&[0]),
        );
        let skipped = nan_steps.contains(&step);
        assert_eq!(ours.is_finite(), !skipped, "step {step}: norm {ours}");
        if !skipped {
            assert!(
                (ours - want).abs() <= 1e-5 * want,
                "step {step}: norm {ours} vs {want}"
            );
            clipped += usize::from(want > max_norm);
        }
        let (counts, moments) = opt.state();
        let moments: BTreeMap<String, Tensor> = moments.into_iter().collect();
        for (name, p) in &params {
            let at = |what: &str| &torch[&format!("{what}.{step}.{name}")];
            for (what, got) in [
                ("param", p),
                ("exp_avg", &moments[&format!("exp_avg.{name}")]),
                ("exp_avg_sq", &moments[&format!("exp_avg_sq.{name}")]),
            ] {
                let diff = max_diff(got, at(what));
                assert!(
                    diff <= 1e-6,
                    "step {step}: {what} of {name} differs by {diff}"
                );
            }
            assert_eq!(
                counts.per_tensor[name],
                at("step").double_value(&[0]) as u64,
                "step {step}: {name}'s step count"
            );
        }
    }
    assert!(clipped >= 2, "the inputs clip: {clipped} steps clipped");
    let counts = opt.state().0;
    assert_eq!(
        counts.per_tensor["0.weight"],
        steps - nan_steps.len() as u64
    );
}
