//! AdamW on tch tensors, with state that can be saved and restored (tch's own
//! optimizer cannot save or shard its state), global-norm gradient clipping, and the
//! learning-rate schedules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::{OptimConf, SchedulerConf};
use crate::freeze::FreezePhase;

/// Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's `AdamW` update.
#[derive(Debug)]
pub struct AdamW {
    conf: OptimConf,
    /// Parameters by name, in a fixed order.
    params: Vec<(String, Tensor)>,
    /// By parameter name, created at its first update (as PyTorch's per-parameter state).
    state: BTreeMap<String, ParamState>,
    step: u64,
}

/// One parameter's state.
#[derive(Debug)]
struct ParamState {
    /// Its own update count, the step of its bias correction: a parameter released by
    /// the freezing schedule starts at 1, whatever the global step. A float32 scalar on
    /// the parameter's device (as PyTorch's fused AdamW keeps it), so that a step skipped
    /// on the device ([`AdamW::step`]'s `found_inf`) leaves it as it was without a read.
    step: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// The optimizer's step counts, saved in a checkpoint's manifest (scalars: the same on
/// every shard of a tensor).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptimSteps {
    /// Updates taken ([`AdamW::step`] calls).
    pub global: u64,
    /// Each parameter's own update count, by name (those with moments).
    pub per_tensor: BTreeMap<String, u64>,
}

impl AdamW {
    /// An optimizer over named parameters (only those that require a gradient).
    pub fn new(conf: OptimConf, params: Vec<(String, Tensor)>) -> Self {
        let params = params
            .into_iter()
            .filter(|(_, p)| p.requires_grad())
            .collect();
        Self {
            conf,
            params,
            state: BTreeMap::new(),
            step: 0,
        }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Clears gradients.
    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .filter(|(_, p)| p.requires_grad())
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .collect()
    }

    /// The global L2 norm of all gradients (a float64 scalar on the device, `None`
    /// without gradients), then scales them so that it is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Option<Tensor> {
        let norms: Vec<Tensor> = self
            .grads()
            .iter()
            .map(|g| g.norm().to_kind(Kind::Double))
            .collect();
        if norms.is_empty() {
            return None;
        }
        let total = Tensor::stack(&norms, 0).norm();
        self.clip_to(&total, max_norm);
        Some(total)
    }

    /// Scales the gradients whose global norm is `total` (a scalar tensor, computed
    /// elsewhere, e.g. across ranks) so that it is at most `max_norm`: by
    /// `min(1, max_norm / (total + 1e-6))` on the device, as `clip_grad_norm_` does, so
    /// that nothing waits for the norm. A non-finite norm makes the gradients non-finite
    /// (the update is then skipped, [`AdamW::step`]).
    pub fn clip_to(&mut self, total: &Tensor, max_norm: f64) {
        let coef = (Tensor::full([], max_norm, (Kind::Double, total.device())) / (total + 1e-6))
            .clamp_max(1.0);
        tch::no_grad(|| {
            for mut g in self.grads() {
                let _ = g.g_mul_(&coef);
            }
        });
    }

    /// One update at learning rate `lr`, by libtorch's fused AdamW kernel (the update of
    /// `torch.optim.AdamW`, one pass over each tensor). Frozen parameters and those without
    /// a gradient are skipped: they get no optimizer state, and their step count stays.
    /// Where `found_inf` (a float32 scalar on the device) is 1, nothing changes but the
    /// moments' creation and [`AdamW::steps`], as in `torch.optim.AdamW(fused=True)` under a
    /// `GradScaler`: the step is skipped without the host reading anything.
    pub fn step(&mut self, lr: f64, found_inf: Option<&Tensor>) -> anyhow::Result<()> {
        self.step += 1;
        let (mut params, mut grads, mut exp_avgs, mut exp_avg_sqs, mut steps) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Frozen parameters (requires_grad off) keep a stale gradient: skip them.
        for (name, p) in self.params.iter().filter(|(_, p)| p.requires_grad()) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let s = self
                .state
                .entry(name.clone())
                .or_insert_with(|| ParamState {
                    step: Tensor::zeros([], (Kind::Float, p.device())),
                    exp_avg: p.zeros_like(),
                    exp_avg_sq: p.zeros_like(),
                });
            // The kernel walks raw storage: every tensor of a parameter must be laid out
            // alike (dense, row-major), or it silently pairs the wrong elements.
            if ![p, &s.exp_avg, &s.exp_avg_sq]
                .iter()
                .all(|t| t.is_contiguous())
            {
                anyhow::bail!("AdamW: parameter {name} or its moments are not contiguous");
            }
            params.push(p.shallow_clone());
            grads.push(if g.is_contiguous() { g } else { g.contiguous() });
            exp_avgs.push(s.exp_avg.shallow_clone());
            exp_avg_sqs.push(s.exp_avg_sq.shallow_clone());
            steps.push(s.step.shallow_clone());
        }
        let (beta1, beta2) = self.conf.betas;
        fused_adamw(
            &params,
            &grads,
            &exp_avgs,
            &exp_avg_sqs,
            &steps,
            lr,
            (beta1, beta2),
            self.conf.weight_decay,
            self.conf.eps,
            found_inf,
        )
    }

    /// The state to save: step counts (read from the device: not a call of the training
    /// step), and moments by parameter name (`exp_avg.<name>`, `exp_avg_sq.<name>`).
    pub fn state(&self) -> (OptimSteps, Vec<(String, Tensor)>) {
        let mut v = Vec::new();
        for (k, s) in &self.state {
            v.push((format!("exp_avg.{k}"), s.exp_avg.shallow_clone()));
        }
        for (k, s) in &self.state {
            v.push((format!("exp_avg_sq.{k}"), s.exp_avg_sq.shallow_clone()));
        }
        // One read for all the counts (a process's parameters share a device).
        let counts: Vec<&Tensor> = self.state.values().map(|s| &s.step).collect();
        let counts = if counts.is_empty() {
            Vec::new()
        } else {
            Vec::<f64>::try_from(Tensor::stack(&counts, 0).to_kind(Kind::Double))
                .expect("float step counts")
        };
        let per_tensor = self
            .state
            .keys()
            .zip(counts)
            .map(|(k, c)| (k.clone(), c as u64))
            .collect();
        (
            OptimSteps {
                global: self.step,
                per_tensor,
            },
            v,
        )
    }

    /// Restores what [`AdamW::state`] saved; names that match no parameter, and a
    /// parameter with one moment only or a step but no moments, are errors. A parameter
    /// with moments but no step of its own (checkpoints of versions that kept one step
    /// for all) takes the global step, the one its bias correction used.
    pub fn load_state(
        &mut self,
        steps: &OptimSteps,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<(), String> {
        let names: std::collections::HashSet<&str> =
            self.params.iter().map(|(n, _)| n.as_str()).collect();
        let mut moments: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (k, t) in tensors {
            let (name, second) = if let Some(n) = k.strip_prefix("exp_avg_sq.") {
                (n, true)
            } else if let Some(n) = k.strip_prefix("exp_avg.") {
                (n, false)
            } else {
                return Err(format!("optimizer state has an unknown tensor {k}"));
            };
            if !names.contains(name) {
                return Err(format!(
                    "optimizer state names {name}, which is not a trainable parameter"
                ));
            }
            let slot = moments.entry(name.to_string()).or_default();
            *if second { &mut slot.1 } else { &mut slot.0 } = Some(t);
        }
        if let Some(name) = steps.per_tensor.keys().find(|n| !moments.contains_key(*n)) {
            return Err(format!(
                "optimizer state has a step for {name} but no moments"
            ));
        }
        let mut state = BTreeMap::new();
        for (name, pair) in moments {
            let (Some(exp_avg), Some(exp_avg_sq)) = pair else {
                return Err(format!("optimizer state has one moment of {name} only"));
            };
            let step = steps.per_tensor.get(&name).copied().unwrap_or(steps.global);
            state.insert(
                name,
                ParamState {
                    step: Tensor::full([], step as f64, (Kind::Float, exp_avg.device())),
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        self.state = state;
        self.step = steps.global;
        Ok(())
    }
}

extern "C" {
    fn upcycle_fused_adamw_device_steps(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        steps: *const *mut torch_sys::C_tensor,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *mut torch_sys::C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// `at::_fused_adamw_` over equally long lists (trainer/csrc/fused_adamw.cpp), each
/// parameter at its own step tensor (advanced by one unless `found_inf` is 1).
#[allow(clippy::too_many_arguments)]
fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    lr: f64,
    (beta1, beta2): (f64, f64),
    weight_decay: f64,
    eps: f64,
    found_inf: Option<&Tensor>,
) -> anyhow::Result<()> {
    let n = params.len();
    anyhow::ensure!(
        [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()] == [n; 4],
        "AdamW: lists of different lengths"
    );
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut _).collect::<Vec<_>>();
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let s = ptrs(steps);
    let inf = found_inf.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut _);
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: the five lists hold `n` live tensors each, borrowed for the call, and
    // `inf` is null or a live tensor; the kernel updates params, moments and steps in
    // place and frees nothing.
    let status = unsafe {
        upcycle_fused_adamw_device_steps(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n as i64,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
            inf,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if status != 0 {
        // SAFETY: the C++ side wrote a NUL-terminated message into `err`.
        let why = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        anyhow::bail!("AdamW's fused update failed: {}", why.to_string_lossy());
    }
    Ok(())
}

/// Learning rate at optimizer step `step` (counting from 0).
#[derive(Debug, Clone)]
pub enum Schedule {
    /// WeNet's `WarmupLR`: `lr * w^0.5 * min(s^-0.5, s * w^-1.5)` with `s = step + 1`:
    /// linear warm-up to `lr` at `w`, then inverse square root.
    Warmup {
        /// Peak rate.
        lr: f64,
        /// Warm-up steps.
        warmup: u64,
    },
    /// Linear warm-up, then half a cosine down to `min_lr` at `total` steps.
    Cosine {
        /// Peak rate.
        lr: f64,
        /// Warm-up steps.
        warmup: u64,
        /// Steps of the whole schedule.
        total: u64,
        /// Final rate.
        min_lr: f64,
    },
    /// Linear warm-up, then a straight line down to `min_lr` at `total` steps.
    Linear {
        /// Peak rate.
        lr: f64,
        /// Warm-up steps.
        warmup: u64,
        /// Steps of the whole schedule.
        total: u64,
        /// Final rate.
        min_lr: f64,
    },
}

impl Schedule {
    /// The schedule named in the config; `run_steps` is the length a `total_steps` of 0
    /// stands for (the steps from the schedule's start to the run's end).
    pub fn new(name: &str, lr: f64, conf: &SchedulerConf, run_steps: u64) -> Schedule {
        let total = match conf.total_steps {
            0 => run_steps,
            n => n,
        };
        match name {
            "cosine" => Schedule::Cosine {
                lr,
                warmup: conf.warmup_steps,
                total,
                min_lr: conf.min_lr,
            },
            "linear" => Schedule::Linear {
                lr,
                warmup: conf.warmup_steps,
                total,
                min_lr: conf.min_lr,
            },
            _ => Schedule::Warmup {
                lr,
                warmup: conf.warmup_steps,
            },
        }
    }

    /// The rate for step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let s = (step + 1) as f64;
        match *self {
            Schedule::Warmup { lr, warmup } => {
                if warmup == 0 {
                    return lr * s.powf(-0.5);
                }
                let w = warmup as f64;
                lr * w.powf(0.5) * s.powf(-0.5).min(s * w.powf(-1.5))
            }
            Schedule::Cosine {
                lr,
                warmup,
                total,
                min_lr,
            }
            | Schedule::Linear {
                lr,
                warmup,
                total,
                min_lr,
            } => {
                if s <= warmup as f64 {
                    return lr * s / warmup as f64;
                }
                let progress =
                    ((s - warmup as f64) / (total.saturating_sub(warmup).max(1)) as f64).min(1.0);
                let falling = match self {
                    Schedule::Linear { .. } => 1.0 - progress,
                    _ => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
                };
                min_lr + (lr - min_lr) * falling
            }
        }
    }
}

/// The run's schedule, restarted by the freezing phases that have their own: the rate
/// at a global step is a function of that step alone, so a resumed run continues it.
#[derive(Debug, Clone)]
pub struct StagedSchedule {
    run: Schedule,
    /// Phases' first steps and schedules, in step order.
    phases: Vec<(u64, Schedule)>,
}

impl StagedSchedule {
    /// The config's `scheduler` at peak `lr`, and each phase's `lr_schedule` (its peak
    /// `lr` unless it sets one) from its `from_step`, for a run of `run_steps` steps.
    pub fn new(
        name: &str,
        lr: f64,
        conf: &SchedulerConf,
        phases: &[FreezePhase],
        run_steps: u64,
    ) -> Self {
        Self {
            run: Schedule::new(name, lr, conf, run_steps),
            phases: phases
                .iter()
                .filter_map(|p| {
                    let s = p.lr_schedule.as_ref()?;
                    let peak = s.lr.unwrap_or(lr);
                    Some((
                        p.from_step,
                        Schedule::new(
                            &s.scheduler,
                            peak,
                            &s.scheduler_conf,
                            run_steps.saturating_sub(p.from_step),
                        ),
                    ))
                })
                .collect(),
        }
    }

    /// The rate for global step `step` (0-based): the last phase that started by then
    /// and has a schedule counts from its first step; before any, the run's.
    pub fn lr(&self, step: u64) -> f64 {
        match self.phases.iter().rev().find(|(from, _)| *from <= step) {
            Some((from, s)) => s.lr(step - from),
            None => self.run.lr(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_the_closed_form_first_steps() {
        // One scalar parameter, gradient 2 every step: Adam's update is lr * sign(g)
        // at step 1 (m/(sqrt(v)) = 1 after bias correction).
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(
            OptimConf {
                weight_decay: 0.1,
                ..Default::default()
            },
            vec![("p".into(), p.shallow_clone())],
        );
        for _ in 0..2 {
            opt.zero_grad();
            (&p * 2.0).sum(Kind::Float).backward();
            opt.step(0.01, None).unwrap();
        }
        // step 1: p = 1*(1-0.001) - 0.01*2/(2+1e-8) ~ 0.989; step 2: *(1-0.001) - 0.01.
        let want = (1.0 * 0.999 - 0.01) * 0.999 - 0.01;
        assert!(
            (p.double_value(&[0]) - want).abs() < 1e-6,
            "{}",
            p.double_value(&[0])
        );
        let (steps, state) = opt.state();
        assert_eq!(steps.global, 2);
        assert_eq!(steps.per_tensor, BTreeMap::from([("p".to_string(), 2)]));
        assert_eq!(state.len(), 2);
        let mut fresh = AdamW::new(OptimConf::default(), vec![("p".into(), p.shallow_clone())]);
        fresh.load_state(&steps, state).unwrap();
        let zeros = || Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        let refused = |opt: &mut AdamW, steps: &OptimSteps, tensors: Vec<(String, Tensor)>| {
            opt.load_state(steps, tensors).unwrap_err()
        };
        let none = OptimSteps::default();
        let e = refused(&mut fresh, &none, vec![("exp_avg.q".into(), zeros())]);
        assert!(e.contains("q, which is not a trainable parameter"), "{e}");
        let e = refused(&mut fresh, &none, vec![("exp_avg.p".into(), zeros())]);
        assert!(e.contains("one moment of p"), "{e}");
        let e = refused(&mut fresh, &steps, Vec::new());
        assert!(e.contains("a step for p but no moments"), "{e}");
    }

    #[test]
    fn a_parameter_without_its_own_step_takes_the_global_one() {
        // Checkpoints of earlier versions kept one step for every tensor.
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(OptimConf::default(), vec![("p".into(), p.shallow_clone())]);
        let moments = ["exp_avg.p", "exp_avg_sq.p"]
            .into_iter()
            .map(|n| (n.to_string(), Tensor::from_slice(&[0.5f32])))
            .collect();
        let old = OptimSteps {
            global: 7,
            per_tensor: BTreeMap::new(),
        };
        opt.load_state(&old, moments).unwrap();
        assert_eq!(opt.state().0.per_tensor["p"], 7);
        opt.zero_grad();
        (&p * 2.0).sum(Kind::Float).backward();
        opt.step(0.01, None).unwrap();
        assert_eq!(opt.state().0.per_tensor["p"], 8);
    }

    #[test]
    fn fused_update_equals_the_element_wise_formula() {
        // PyTorch's single-tensor AdamW, written out: the reference for the fused kernel,
        // over several steps, with weight decay and a frozen parameter.
        tch::manual_seed(3);
        let conf = OptimConf {
            weight_decay: 0.05,
            ..Default::default()
        };
        let (b1, b2) = conf.betas;
        let (lr, eps, wd) = (3e-3, conf.eps, conf.weight_decay);
        let w = Tensor::randn([24, 16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let b = Tensor::randn([16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let frozen = Tensor::randn([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let frozen_before = frozen.copy();
        let mut opt = AdamW::new(
            conf,
            vec![
                ("w".into(), w.shallow_clone()),
                ("b".into(), b.shallow_clone()),
                ("frozen".into(), frozen.shallow_clone()),
            ],
        );
        let (mut rw, mut rb) = (w.detach().copy(), b.detach().copy());
        let (mut mw, mut vw) = (rw.zeros_like(), rw.zeros_like());
        let (mut mb, mut vb) = (rb.zeros_like(), rb.zeros_like());
        for step in 1..=5 {
            opt.zero_grad();
            let x = Tensor::randn([16, 24], (Kind::Float, tch::Device::Cpu));
            let loss =
                (x.matmul(&w) + &b).square().sum(Kind::Float) + (&frozen * 2.0).sum(Kind::Float);
            loss.backward();
            let _ = frozen.set_requires_grad(false);
            let (gw, gb) = (w.grad().copy(), b.grad().copy());
            let bc1 = 1.0 - b1.powi(step);
            let bc2 = 1.0 - b2.powi(step);
            for (p, g, m, v) in [
                (&mut rw, &gw, &mut mw, &mut vw),
                (&mut rb, &gb, &mut mb, &mut vb),
            ] {
                *p = &*p * (1.0 - lr * wd);
                *m = &*m * b1 + g * (1.0 - b1);
                *v = &*v * b2 + g * g * (1.0 - b2);
                let denom = v.sqrt() / bc2.sqrt() + eps;
                *p = &*p - &*m / denom * (lr / bc1);
            }
            opt.step(lr, None).unwrap();
            let _ = frozen.set_requires_grad(true);
        }
        for (got, want) in [(&w, &rw), (&b, &rb)] {
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(
                diff < 1e-6,
                "fused AdamW differs from the formula by {diff}"
            );
        }
        assert_eq!(frozen, frozen_before, "a frozen parameter moved");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(OptimConf::default(), vec![("p".into(), p.shallow_clone())]);
        (&p * &p).sum(Kind::Float).backward(); // grad (6, 8), norm 10
        let n = opt.clip_grad_norm(5.0).unwrap().double_value(&[]);
        assert!((n - 10.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!(
            (g[0] - 3.0).abs() < 1e-4 && (g[1] - 4.0).abs() < 1e-4,
            "{g:?}"
        );
    }

    #[test]
    fn schedules() {
        let w = Schedule::Warmup {
            lr: 1e-3,
            warmup: 100,
        };
        assert!((w.lr(99) - 1e-3).abs() < 1e-12);
        assert!((w.lr(49) - 0.5e-3).abs() < 1e-12);
        assert!((w.lr(399) - 0.5e-3).abs() < 1e-12);
        let c = Schedule::Cosine {
            lr: 1.0,
            warmup: 10,
            total: 110,
            min_lr: 0.0,
        };
        assert!((c.lr(9) - 1.0).abs() < 1e-12);
        assert!((c.lr(59) - 0.5).abs() < 1e-12);
        assert!(c.lr(200).abs() < 1e-12);
        let l = Schedule::Linear {
            lr: 1.0,
            warmup: 10,
            total: 110,
            min_lr: 0.1,
        };
        // Step s (0-based) is the (s+1)-th: 5/10 of the peak, the peak, half way down.
        assert!((l.lr(4) - 0.5).abs() < 1e-12);
        assert!((l.lr(9) - 1.0).abs() < 1e-12);
        assert!((l.lr(59) - 0.55).abs() < 1e-12);
        assert!((l.lr(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn a_phase_schedule_rewarms_from_its_first_step() {
        use crate::config::PhaseSchedule;
        let phase = |from_step, lr_schedule| FreezePhase {
            from_step,
            trainable: vec!["*".into()],
            lr_schedule,
        };
        let run = SchedulerConf {
            warmup_steps: 4,
            total_steps: 0,
            min_lr: 0.0,
        };
        let rewarm = PhaseSchedule {
            scheduler: "cosine".into(),
            lr: Some(1e-3),
            scheduler_conf: SchedulerConf {
                warmup_steps: 10,
                total_steps: 50,
                min_lr: 1e-4,
            },
        };
        let s = StagedSchedule::new(
            "warmuplr",
            2e-3,
            &run,
            &[phase(0, None), phase(100, Some(rewarm)), phase(200, None)],
            1000,
        );
        let close = |step: u64, want: f64| {
            let got = s.lr(step);
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "step {step}: {got} vs {want}"
            );
        };
        // WeNet's WarmupLR on the global step: the peak at s = 4, then lr * 2 / sqrt(s).
        close(3, 2e-3);
        close(99, 2e-3 * 2.0 / 10.0);
        // From step 100 the phase's own: (j+1)/10 of its peak, the peak, half way down
        // the cosine (mean of peak and floor), the floor.
        close(100, 1e-4);
        close(109, 1e-3);
        close(129, 5.5e-4);
        close(149, 1e-4);
        // A later phase without a schedule keeps the one in force.
        close(250, 1e-4);
        // A total of 0 decays until the run's last step: half way at the middle of the
        // run (steps 1..=100 after 4 of warm-up), the floor at its end.
        let to_end = SchedulerConf {
            warmup_steps: 4,
            total_steps: 0,
            min_lr: 1e-4,
        };
        let s = Schedule::new("linear", 1e-3, &to_end, 104);
        assert!((s.lr(53) - 5.5e-4).abs() < 1e-12, "{}", s.lr(53));
        assert!((s.lr(103) - 1e-4).abs() < 1e-12, "{}", s.lr(103));
    }
}
