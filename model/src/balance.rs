//! Load balancing of the MoE routers, beside the routing itself (`moe.rs`):
//!
//! - the load-balancing loss `E * sum_i f_i * P_i`, its token fractions `f_i` taken per
//!   micro-batch or over the global batch ([`BalanceStats`], `moe_conf.balance_scope`):
//!   summed over every data-parallel worker and over the optimizer step's micro-batches so
//!   far (Qiu et al., arXiv 2501.11873; Megatron-Core's `global_aux_loss`), while the
//!   gradient flows through each worker's own router probabilities;
//! - the aux-loss-free expert bias (DeepSeek-V3; Megatron-Core's
//!   `--moe-router-enable-expert-bias`): a per-expert offset added to the router's scores
//!   to choose the top-k only, moved after each optimizer step towards an even load by
//!   [`update_expert_bias`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};
use upcycle_parallel::collective::{Collective, ReduceOp};

/// The name of a router's expert bias under MoE layer `layer` (a buffer: saved,
/// replicated, never trained).
pub fn expert_bias_name(layer: &str) -> String {
    format!("{layer}.router.{EXPERT_BIAS}")
}

/// The last path component of every expert bias.
pub const EXPERT_BIAS: &str = "expert_bias";

/// Whether `name` is a router's expert bias.
pub fn is_expert_bias(name: &str) -> bool {
    name.ends_with(&format!(".router.{EXPERT_BIAS}"))
}

/// The aux-loss-free update of one router's bias from the token copies each expert got in
/// a step, summed over every worker: `bias += rate * sign(mean - load)` (an overloaded
/// expert becomes less likely to be chosen, an idle one more).
pub fn update_expert_bias(bias: &mut Tensor, load: &Tensor, rate: f64) {
    tch::no_grad(|| {
        let load = load.to_kind(Kind::Float).to_device(bias.device());
        let offset = load.mean(Kind::Float) - &load;
        let _ = bias.g_add_(&(offset.sign() * rate));
    });
}

/// The token statistics of the load-balancing loss, shared by every MoE layer of a
/// model: over which workers they are summed, and their sums over the optimizer step's
/// micro-batches so far.
#[derive(Debug, Default)]
pub struct BalanceStats {
    /// The data-parallel workers (the whole world: routers are replicated); `None` in
    /// one process.
    world: Option<Arc<dyn Collective>>,
    /// Per layer: token copies per expert `[E]` then tokens, summed over the workers and
    /// the step's micro-batches so far (f64).
    step: Mutex<HashMap<String, Tensor>>,
}

impl BalanceStats {
    /// Statistics summed over `world` (`None`: one process).
    pub fn new(world: Option<Arc<dyn Collective>>) -> Self {
        Self {
            world,
            step: Mutex::default(),
        }
    }

    /// Starts a new optimizer step: the global scope's sums start again.
    pub fn new_step(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tensor>> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The global-batch loss `E * sum_i f_i * P_i` of layer `layer` in training: `f_i` the
    /// share of token copies expert `i` got over every worker and the step's micro-batches
    /// so far; `P_i` this worker's router probability mass over the mean tokens per
    /// worker of this micro-batch, so that the workers' mean loss (and gradient) is that
    /// of one process holding the whole batch. `probs` `[N, E]`, `routed` copies per
    /// expert `[E]` of this worker's `N` tokens, `k` copies per token.
    pub fn global_loss(&self, layer: &str, probs: &Tensor, routed: &Tensor, k: i64) -> Tensor {
        let (n, e) = (probs.size()[0], probs.size()[1]);
        let mut now = Tensor::cat(
            &[
                routed.to_kind(Kind::Double),
                Tensor::from_slice(&[n as f64]).to_device(routed.device()),
            ],
            0,
        );
        let workers = match &self.world {
            Some(world) => {
                world
                    .all_reduce(&mut now, ReduceOp::Sum)
                    .unwrap_or_else(|err| {
                        eprintln!("error: load-balance statistics over the workers: {err}");
                        std::process::exit(3)
                    });
                world.size()
            }
            None => 1,
        };
        let summed = {
            let mut step = self.lock();
            let sum = match step.remove(layer) {
                Some(before) => before + &now,
                None => now.shallow_clone(),
            };
            step.insert(layer.to_string(), sum.shallow_clone());
            sum
        };
        if n == 0 {
            // No tokens here: nothing to weigh, but the sums above were joined.
            return probs.sum(Kind::Float) * 0.0;
        }
        // Token totals stay on the device (0-d float64): the step does not wait for them.
        let (tokens_now, tokens_step) = (now.get(e), summed.get(e));
        let fraction = summed.narrow(0, 0, e).to_kind(Kind::Float) / (tokens_step * k as f64);
        let mass = probs.sum_dim_intlist(0, false, Kind::Float) / (tokens_now / workers as f64);
        (fraction * mass).sum(Kind::Float) * e as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bias_moves_towards_an_even_load() {
        let _rng = crate::test_rng::lock();
        let mut bias = Tensor::from_slice(&[0.0f32, 0.5, -0.25, 0.0]);
        // Mean load 25: expert 0 over it, 1 and 2 under, 3 exactly even.
        update_expert_bias(
            &mut bias,
            &Tensor::from_slice(&[40i64, 10, 25 - 1, 26]),
            0.01,
        );
        let got = Vec::<f32>::try_from(&bias).unwrap();
        // (40+10+24+26)/4 = 25: signs -, +, +, -.
        assert_eq!(got, vec![-0.01, 0.51, -0.24, -0.01]);
        update_expert_bias(&mut bias, &Tensor::from_slice(&[5i64, 5, 5, 5]), 0.01);
        assert_eq!(Vec::<f32>::try_from(&bias).unwrap(), got, "even: no move");
    }

    /// One process, no accumulation: the global loss is the per-micro-batch formula.
    #[test]
    fn one_process_global_loss_is_the_micro_batch_loss() {
        let _rng = crate::test_rng::lock();
        tch::manual_seed(0);
        let probs =
            Tensor::randn([10, 4], (Kind::Float, tch::Device::Cpu)).softmax(-1, Kind::Float);
        let routed = probs
            .topk(2, -1, true, true)
            .1
            .reshape([-1])
            .bincount(None::<&Tensor>, 4);
        let stats = BalanceStats::default();
        let got = stats.global_loss("l", &probs, &routed, 2).double_value(&[]);
        let f = routed.to_kind(Kind::Float) / 20.0;
        let want = (f * probs.mean_dim(0, false, Kind::Float))
            .sum(Kind::Float)
            .double_value(&[])
            * 4.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // A second micro-batch of the same step counts the first's copies too.
        let twice = stats.global_loss("l", &probs, &routed, 2).double_value(&[]);
        assert!((twice - want).abs() < 1e-6, "same batch twice: same shares");
        let other = Tensor::from_slice(&[20i64, 0, 0, 0]);
        let mixed = stats.global_loss("l", &probs, &other, 2).double_value(&[]);
        assert!((mixed - want).abs() > 1e-3, "the step's sums changed f");
        stats.new_step();
        let fresh = stats.global_loss("l", &probs, &routed, 2).double_value(&[]);
        assert!((fresh - want).abs() < 1e-6, "a new step starts again");
    }
}
