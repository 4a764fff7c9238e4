//! AdamW on tch tensors, with state that can be saved and restored (tch's own
//! optimizer cannot save or shard its state), global-norm gradient clipping, and the
//! learning-rate schedules.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::{OptimConf, SchedulerConf};

/// Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's `AdamW` update.
#[derive(Debug)]
pub struct AdamW {
    conf: OptimConf,
    /// Parameters by name, in a fixed order.
    params: Vec<(String, Tensor)>,
    exp_avg: BTreeMap<String, Tensor>,
    exp_avg_sq: BTreeMap<String, Tensor>,
    step: u64,
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
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
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

    /// The global L2 norm of all gradients, then scales them so that it is at most
    /// `max_norm` (as `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norms: Vec<Tensor> = self
            .grads()
            .iter()
            .map(|g| g.norm().to_kind(Kind::Double))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        self.clip_to(total, max_norm);
        total
    }

    /// Scales the gradients whose global norm is `total` (computed elsewhere, e.g.
    /// across ranks) so that it is at most `max_norm`.
    pub fn clip_to(&mut self, total: f64, max_norm: f64) {
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for mut g in self.grads() {
                    let _ = g.g_mul_scalar_(coef);
                }
            });
        }
    }

    /// One update at learning rate `lr`, by libtorch's fused AdamW kernel (the update of
    /// `torch.optim.AdamW`, one pass over each tensor). Frozen parameters and those without
    /// a gradient are skipped (they get no optimizer state).
    pub fn step(&mut self, lr: f64) -> anyhow::Result<()> {
        self.step += 1;
        let (mut params, mut grads, mut exp_avgs, mut exp_avg_sqs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Frozen parameters (requires_grad off) keep a stale gradient: skip them.
        for (name, p) in self.params.iter().filter(|(_, p)| p.requires_grad()) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let m = self
                .exp_avg
                .entry(name.clone())
                .or_insert_with(|| p.zeros_like());
            let v = self
                .exp_avg_sq
                .entry(name.clone())
                .or_insert_with(|| p.zeros_like());
            // The kernel walks raw storage: every tensor of a parameter must be laid out
            // alike (dense, row-major), or it silently pairs the wrong elements.
            if ![p, &*m, &*v].iter().all(|t| t.is_contiguous()) {
                anyhow::bail!("AdamW: parameter {name} or its moments are not contiguous");
            }
            params.push(p.shallow_clone());
            grads.push(if g.is_contiguous() { g } else { g.contiguous() });
            exp_avgs.push(m.shallow_clone());
            exp_avg_sqs.push(v.shallow_clone());
        }
        let (beta1, beta2) = self.conf.betas;
        fused_adamw(
            &params,
            &grads,
            &exp_avgs,
            &exp_avg_sqs,
            self.step,
            lr,
            (beta1, beta2),
            self.conf.weight_decay,
            self.conf.eps,
        )
    }

    /// The state to save: step and moments by parameter name (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`).
    pub fn state(&self) -> (u64, Vec<(String, Tensor)>) {
        let mut v = Vec::new();
        for (k, t) in &self.exp_avg {
            v.push((format!("exp_avg.{k}"), t.shallow_clone()));
        }
        for (k, t) in &self.exp_avg_sq {
            v.push((format!("exp_avg_sq.{k}"), t.shallow_clone()));
        }
        (self.step, v)
    }

    /// Restores what [`AdamW::state`] saved; names that match no parameter are errors.
    pub fn load_state(&mut self, step: u64, tensors: Vec<(String, Tensor)>) -> Result<(), String> {
        let names: std::collections::HashSet<&str> =
            self.params.iter().map(|(n, _)| n.as_str()).collect();
        for (k, t) in tensors {
            let (slot, name) = if let Some(n) = k.strip_prefix("exp_avg_sq.") {
                (&mut self.exp_avg_sq, n.to_string())
            } else if let Some(n) = k.strip_prefix("exp_avg.") {
                (&mut self.exp_avg, n.to_string())
            } else {
                return Err(format!("optimizer state has an unknown tensor {k}"));
            };
            if !names.contains(name.as_str()) {
                return Err(format!(
                    "optimizer state names {name}, which is not a trainable parameter"
                ));
            }
            slot.insert(name, t);
        }
        self.step = step;
        Ok(())
    }
}

extern "C" {
    fn upcycle_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        n: i64,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// `at::_fused_adamw_` over equally long lists (trainer/csrc/fused_adamw.cpp).
#[allow(clippy::too_many_arguments)]
fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: u64,
    lr: f64,
    (beta1, beta2): (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> anyhow::Result<()> {
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut _).collect::<Vec<_>>();
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: the four lists hold `n` live tensors each, borrowed for the call; the
    // kernel updates params and moments in place and frees nothing.
    let status = unsafe {
        upcycle_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            p.len() as i64,
            step as f64,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
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
}

impl Schedule {
    /// The schedule named in the config.
    pub fn new(name: &str, lr: f64, conf: &SchedulerConf) -> Schedule {
        match name {
            "cosine" => Schedule::Cosine {
                lr,
                warmup: conf.warmup_steps,
                total: conf.total_steps,
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
            } => {
                if s <= warmup as f64 {
                    return lr * s / warmup as f64;
                }
                let progress =
                    ((s - warmup as f64) / (total.saturating_sub(warmup).max(1)) as f64).min(1.0);
                min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
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
            opt.step(0.01).unwrap();
        }
        // step 1: p = 1*(1-0.001) - 0.01*2/(2+1e-8) ~ 0.989; step 2: *(1-0.001) - 0.01.
        let want = (1.0 * 0.999 - 0.01) * 0.999 - 0.01;
        assert!(
            (p.double_value(&[0]) - want).abs() < 1e-6,
            "{}",
            p.double_value(&[0])
        );
        let (step, state) = opt.state();
        assert_eq!(step, 2);
        assert_eq!(state.len(), 2);
        let mut fresh = AdamW::new(OptimConf::default(), vec![("p".into(), p.shallow_clone())]);
        fresh.load_state(step, state).unwrap();
        assert!(fresh
            .load_state(
                0,
                vec![(
                    "exp_avg.q".into(),
                    Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))
                )]
            )
            .is_err());
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
            opt.step(lr).unwrap();
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
        let n = opt.clip_grad_norm(5.0);
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
    }
}
