//! The Mixture-of-Experts feed-forward network (WeNet's `MoEFFNLayer` semantics, computed
//! the way Megatron-Core does): an fp32 router picks k experts per token, token copies
//! are sorted by expert, handed to the [`ExpertDispatch`] (the identity in one process,
//! the all-to-all under expert parallelism), run through the stacked experts with one
//! grouped matrix product, brought back and combined by their routing weights.
//!
//! Parameters under a layer `P`: `P.router.weight` `[E, d]` and the expert bank
//! `P.experts.w_1` `[E, d, f]`, `P.experts.b_1` `[E, f]`, `P.experts.w_2` `[E, f, d]`,
//! `P.experts.b_2` `[E, d]` (expert `j`'s `w_1` is WeNet's `experts.{j}.w_1.weight`
//! transposed). Layers that share a bank hold the same tensors.

use std::sync::Arc;

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::activation::Activation;
use crate::balance::{BalanceStats, EXPERT_BIAS};
use crate::config::{MoeConf, Router};
pub use upcycle_parallel::grads::Placement;

/// The path component under which every expert bank's tensors live
/// (`P.experts.w_1`, ...; WeNet's `P.experts.{j}.w_1.weight`).
pub const EXPERT_BANK: &str = "experts";

/// Where a parameter of this model lives under expert parallelism: the tensors of an
/// expert bank are split over the expert-parallel group by expert, the rest replicated.
/// The model names its tensors, so it is the one to say.
pub fn placement(name: &str) -> Placement {
    if name.split('.').any(|part| part == EXPERT_BANK) {
        Placement::Expert
    } else {
        Placement::Replicated
    }
}

/// How the local experts are computed over tokens sorted by expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertCompute {
    /// One grouped matrix product per weight (`torch._grouped_mm`).
    GroupedMm,
    /// Tokens padded to the largest expert's count, one batched product.
    Bmm,
    /// One matrix product per expert that received tokens.
    Loop,
}

impl ExpertCompute {
    /// The strategy named in `moe_conf.expert_compute` (`auto` is the measured best:
    /// grouped GEMM, on CPU as on GPU; see `bench/RESULTS.md`).
    pub fn from_name(name: &str) -> Self {
        match name {
            "bmm" => ExpertCompute::Bmm,
            "loop" => ExpertCompute::Loop,
            _ => ExpertCompute::GroupedMm,
        }
    }
}

/// Moves token copies to the ranks that hold their experts and back. Single-process
/// training uses [`LocalDispatch`]; expert parallelism implements it with an all-to-all
/// that is an autograd node.
pub trait ExpertDispatch: std::fmt::Debug + Send + Sync {
    /// The global ids of the experts computed here, out of `n_expert`.
    fn local_experts(&self, n_expert: i64) -> std::ops::Range<i64>;

    /// Rows of `x` sorted by global expert (`counts[e]` rows for expert `e`, every
    /// expert; int64 on `x`'s device) to the rows the local experts compute, sorted by
    /// local expert.
    fn dispatch(&self, x: &Tensor, counts: &Tensor) -> Dispatched;

    /// The inverse of `dispatched`: local expert outputs `y` back to the order the rows
    /// were dispatched in.
    fn combine(&self, y: &Tensor, dispatched: &Dispatched) -> Tensor;
}

/// Rows received by the local experts.
#[derive(Debug)]
pub struct Dispatched {
    /// Rows sorted by local expert.
    pub rows: Tensor,
    /// Rows per local expert (int64, on the rows' device: read on the host only by the
    /// expert computations that need the splits there).
    pub counts: Tensor,
    /// What the dispatcher needs to send the results back.
    pub state: Option<Box<dyn std::any::Any + Send>>,
}

/// Every expert is local: dispatch and combine are the identity.
#[derive(Debug, Default)]
pub struct LocalDispatch;

impl ExpertDispatch for LocalDispatch {
    fn local_experts(&self, n_expert: i64) -> std::ops::Range<i64> {
        0..n_expert
    }

    fn dispatch(&self, x: &Tensor, counts: &Tensor) -> Dispatched {
        Dispatched {
            rows: x.shallow_clone(),
            counts: counts.shallow_clone(),
            state: None,
        }
    }

    fn combine(&self, y: &Tensor, _dispatched: &Dispatched) -> Tensor {
        y.shallow_clone()
    }
}

/// Stacked expert weights: `E` feed-forward networks `w_2(act(w_1 x + b_1)) + b_2`.
#[derive(Debug)]
pub struct ExpertBank {
    w_1: Tensor,
    b_1: Tensor,
    w_2: Tensor,
    b_2: Tensor,
}

impl ExpertBank {
    /// `n_expert` experts of shape `d -> hidden -> d` under `path`, each initialised as
    /// a pair of `torch.nn.Linear` layers.
    pub fn new(path: &nn::Path<'_>, n_expert: i64, d: i64, hidden: i64) -> Self {
        Self::part(path, 0..n_expert, n_expert, d, hidden)
    }

    /// Experts `local` (global ids) of a bank of `n_expert`: the tensors hold only these
    /// rows, and they equal the same rows of [`ExpertBank::new`]'s bank from the same
    /// generator state. Every expert is drawn, one at a time (the CPU generator draws
    /// element by element, so expert-wise draws are the whole bank's stream), and only the
    /// local ones are kept: the generator ends where the whole bank leaves it, so what is
    /// built after the bank is the same whatever the split, and no worker ever holds more
    /// than one foreign expert.
    pub fn part(
        path: &nn::Path<'_>,
        local: std::ops::Range<i64>,
        n_expert: i64,
        d: i64,
        hidden: i64,
    ) -> Self {
        let rows = local.end - local.start;
        let var = |name: &str, expert: &[i64], fan_in: i64| {
            let shape: Vec<i64> = std::iter::once(rows)
                .chain(expert.iter().copied())
                .collect();
            let v = path.var(name, &shape, Init::Const(0.0));
            let bound = 1.0 / (fan_in as f64).sqrt();
            tch::no_grad(|| {
                for e in 0..n_expert {
                    let draw =
                        Tensor::zeros(expert, (v.kind(), v.device())).uniform_(-bound, bound);
                    if local.contains(&e) {
                        v.get(e - local.start).copy_(&draw);
                    }
                }
            });
            v
        };
        Self {
            w_1: var("w_1", &[d, hidden], d),
            b_1: var("b_1", &[hidden], d),
            w_2: var("w_2", &[hidden, d], hidden),
            b_2: var("b_2", &[d], hidden),
        }
    }

    /// The same tensors, for a layer that shares this bank.
    pub fn share(&self) -> Self {
        Self {
            w_1: self.w_1.shallow_clone(),
            b_1: self.b_1.shallow_clone(),
            w_2: self.w_2.shallow_clone(),
            b_2: self.b_2.shallow_clone(),
        }
    }

    /// Experts in the bank.
    pub fn len(&self) -> i64 {
        self.w_1.size()[0]
    }

    /// Whether the bank has no expert.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies expert `e` to its `counts[e]` rows of `x` (rows sorted by expert; `counts`
    /// int64 on `x`'s device). The grouped GEMM takes the counts as they are; the bmm and
    /// loop paths need them on the host and read them once.
    pub fn forward(
        &self,
        x: &Tensor,
        counts: &Tensor,
        activation: Activation,
        dropout: f64,
        train: bool,
        compute: ExpertCompute,
    ) -> Tensor {
        let device = x.device();
        let rows = x.size()[0];
        let row_expert = Tensor::arange(self.len(), (Kind::Int64, device))
            .repeat_interleave_self_tensor(counts, 0, rows);
        // Under autocast the tokens arrive in bf16; grouped_mm has no autocast rule, so the
        // fp32 weights are cast to the tokens' type here (a no-op in fp32).
        let kind = x.kind();
        let bias = |b: &Tensor| b.to_kind(kind).index_select(0, &row_expert);
        let host_counts = match compute {
            ExpertCompute::GroupedMm => Vec::new(),
            ExpertCompute::Bmm | ExpertCompute::Loop => {
                crate::host::to_vec_i64(counts).expect("int64 counts")
            }
        };
        let matmul = |x: &Tensor, w: &Tensor| match compute {
            ExpertCompute::GroupedMm => grouped_mm(x, &w.to_kind(kind), counts),
            ExpertCompute::Bmm => padded_bmm(x, &w.to_kind(kind), &host_counts, &row_expert),
            ExpertCompute::Loop => loop_mm(x, &w.to_kind(kind), &host_counts),
        };
        let h = activation
            .apply(&(matmul(x, &self.w_1) + bias(&self.b_1)))
            .dropout(dropout, train);
        matmul(&h, &self.w_2) + bias(&self.b_2)
    }
}

fn grouped_mm(x: &Tensor, w: &Tensor, counts: &Tensor) -> Tensor {
    let offs = counts.cumsum(0, Kind::Int);
    x.internal_grouped_mm(w, Some(&offs), None::<&Tensor>, None)
}

fn loop_mm(x: &Tensor, w: &Tensor, counts: &[i64]) -> Tensor {
    let parts: Vec<Tensor> = x
        .split_with_sizes(counts, 0)
        .iter()
        .enumerate()
        .map(|(e, xe)| xe.matmul(&w.get(e as i64)))
        .collect();
    Tensor::cat(&parts, 0)
}

fn padded_bmm(x: &Tensor, w: &Tensor, counts: &[i64], row_expert: &Tensor) -> Tensor {
    let (n_expert, width) = (w.size()[0], x.size()[1]);
    let longest = counts.iter().copied().max().unwrap_or(0);
    let starts: Vec<i64> = counts
        .iter()
        .scan(0, |s, &c| {
            let start = *s;
            *s += c;
            Some(start)
        })
        .collect();
    let starts = Tensor::from_slice(&starts).to_device(x.device());
    let rows = x.size()[0];
    let position =
        Tensor::arange(rows, (Kind::Int64, x.device())) - starts.index_select(0, row_expert);
    let slot = row_expert * longest + position;
    let padded = Tensor::zeros([n_expert * longest, width], (x.kind(), x.device()))
        .index_copy(0, &slot, x)
        .view([n_expert, longest, width]);
    padded
        .bmm(w)
        .view([n_expert * longest, -1])
        .index_select(0, &slot)
}

/// What one MoE layer's routing did in one forward pass.
#[derive(Debug)]
pub struct LayerRouting {
    /// The layer's parameter path (e.g. `encoder.encoders.0.feed_forward`).
    pub layer: String,
    /// Load-balancing loss `E * sum_i f_i * P_i` (differentiable; 1 when balanced).
    pub balance_loss: Tensor,
    /// Router z-loss `mean(logsumexp(logits)^2)` (differentiable).
    pub z_loss: Tensor,
    /// Token copies each expert computed `[E]` (after dropping).
    pub tokens_per_expert: Tensor,
    /// Token copies dropped by the capacity limit.
    pub dropped: Tensor,
    /// Mean entropy of the router's distribution over experts, in nats.
    pub entropy: Tensor,
    /// The tokens the router saw `[N, d]` (fp32, detached), kept only by a collector
    /// from [`Routing::capturing_inputs`].
    pub inputs: Option<Tensor>,
}

/// Collects [`LayerRouting`] of every MoE layer through a forward pass; a disabled
/// collector (decoding) records nothing and costs nothing.
#[derive(Debug, Default)]
pub struct Routing {
    enabled: bool,
    capture_inputs: bool,
    /// The layers' records, in forward order.
    pub layers: Vec<LayerRouting>,
}

impl Routing {
    /// A collector that records.
    pub fn recording() -> Self {
        Self {
            enabled: true,
            capture_inputs: false,
            layers: Vec::new(),
        }
    }

    /// A collector that records and also keeps every layer's router inputs
    /// ([`LayerRouting::inputs`]), e.g. to fit routers to them.
    pub fn capturing_inputs() -> Self {
        Self {
            capture_inputs: true,
            ..Self::recording()
        }
    }

    /// A collector that records nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Whether layers should record.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Mean load-balancing loss over the recorded layers (`None` without MoE layers).
    pub fn balance_loss(&self) -> Option<Tensor> {
        self.mean(|r| &r.balance_loss)
    }

    /// Mean router z-loss over the recorded layers.
    pub fn z_loss(&self) -> Option<Tensor> {
        self.mean(|r| &r.z_loss)
    }

    fn mean(&self, part: impl Fn(&LayerRouting) -> &Tensor) -> Option<Tensor> {
        let parts: Vec<&Tensor> = self.layers.iter().map(part).collect();
        (!parts.is_empty()).then(|| Tensor::stack(&parts, 0).mean(Kind::Float))
    }
}

/// The routing decision for a set of tokens: token copies in dispatch order.
struct Route {
    /// Token index of each kept copy, sorted by expert.
    token: Tensor,
    /// Routing weight of each kept copy.
    weight: Tensor,
    /// Kept copies per expert (int64, on the device).
    counts: Tensor,
}

/// The `k` experts of each token `[N, k]` and their weights `[N, k]`, from the router's
/// `logits` `[N, E]` (`probs` is their softmax over the E).
///
/// The chosen are the k largest logits, ties going to the lower expert index (a stable
/// sort): under a zero router every logit ties, and the first k experts are then whole
/// virtual groups of a granular upcycle, which lays its experts out group by group.
///
/// `softmax_topk` multiplies the k probabilities by E/k so that an upcycled layer starts
/// as its parent f. Its experts are copies of f, or, granular with G, virtual groups of G
/// experts whose outputs sum to G f (slices of f's hidden units, scaled by G) with
/// k = T G choosing T whole groups. A zero router gives every expert 1/E, so the chosen
/// weigh k/E in all: copies give (k/E) f, granular T (1/E) G f = (k/E) f; the factor E/k
/// makes both f exactly. Renormalising over the k would too, but gives top-1 weight 1 and
/// its router no gradient. A non-zero router's chosen probabilities do not sum to k/E, so
/// there the parent is approximated (`router_init: zero` for exact). `topk_softmax`'s
/// weights sum to 1 over the k: exact for copies under any router, and for granular
/// groups chosen whole (equal logits within a group).
///
/// An `expert_bias` (`moe_conf.expert_bias`, the aux-loss-free balancing) is added to the
/// scores the rule ranks (the logits, or the probabilities for `softmax_topk`) to choose
/// the k, and to nothing else: the weights stay the unbiased ones.
fn gate(
    router: Router,
    logits: &Tensor,
    probs: &Tensor,
    k: i64,
    expert_bias: Option<&Tensor>,
) -> (Tensor, Tensor) {
    let n_expert = logits.size()[1];
    let ranked = match (expert_bias, router) {
        (None, _) => logits.shallow_clone(),
        (Some(bias), Router::TopkSoftmax) => logits + bias,
        (Some(bias), Router::SoftmaxTopk) => probs + bias,
    };
    let expert = ranked.sort_stable(true, -1, true).1.narrow(-1, 0, k);
    let weight = match router {
        Router::TopkSoftmax => logits.gather(-1, &expert, false).softmax(-1, Kind::Float),
        Router::SoftmaxTopk => probs.gather(-1, &expert, false) * (n_expert as f64 / k as f64),
    };
    (weight, expert)
}

/// A mixture-of-experts feed-forward layer.
#[derive(Debug)]
pub struct MoeFeedForward {
    layer: String,
    router: Tensor,
    /// Added to the router's scores to choose the top-k (`moe_conf.expert_bias`).
    expert_bias: Option<Tensor>,
    balance: Arc<BalanceStats>,
    experts: ExpertBank,
    k: i64,
    conf: MoeConf,
    compute: ExpertCompute,
    activation: Activation,
    dropout: f64,
    dispatch: Arc<dyn ExpertDispatch>,
}

/// What every MoE layer of a model shares: the options and where the experts are.
#[derive(Debug, Clone)]
pub struct MoeContext {
    /// Routing and loss options.
    pub conf: MoeConf,
    /// Where the experts are.
    pub dispatch: Arc<dyn ExpertDispatch>,
    /// The load-balance statistics every layer shares.
    pub balance: Arc<BalanceStats>,
}

impl MoeContext {
    /// All experts in this process.
    pub fn local(conf: MoeConf) -> Self {
        Self {
            conf,
            dispatch: Arc::new(LocalDispatch),
            balance: Arc::default(),
        }
    }
}

impl Default for MoeContext {
    fn default() -> Self {
        Self::local(MoeConf::default())
    }
}

/// Everything an [`MoeFeedForward`] is built from besides its path and bank.
#[derive(Debug, Clone)]
pub struct MoeSpec {
    /// Model width.
    pub d: i64,
    /// Experts.
    pub n_expert: i64,
    /// Experts per token.
    pub k: i64,
    /// Expert activation.
    pub activation: Activation,
    /// Dropout between the expert's two products.
    pub dropout: f64,
    /// Routing and loss options.
    pub conf: MoeConf,
    /// Where the experts are.
    pub dispatch: Arc<dyn ExpertDispatch>,
    /// The load-balance statistics every layer shares.
    pub balance: Arc<BalanceStats>,
}

impl MoeFeedForward {
    /// A layer under `path` (router `path.router`) computing with `experts`.
    pub fn new(path: &nn::Path<'_>, experts: ExpertBank, spec: &MoeSpec) -> Self {
        let init = match spec.conf.router_init.as_str() {
            "zero" => Init::Const(0.0),
            // `kmeans` is fitted after the build (`kmeans_router`); normal until then.
            _ => Init::Randn {
                mean: 0.0,
                stdev: spec.conf.router_init_std,
            },
        };
        let router = (path / "router").var("weight", &[spec.n_expert, spec.d], init);
        let expert_bias = spec
            .conf
            .expert_bias
            .then(|| (path / "router").zeros_no_train(EXPERT_BIAS, &[spec.n_expert]));
        Self {
            layer: path.components().collect::<Vec<_>>().join("."),
            router,
            expert_bias,
            balance: spec.balance.clone(),
            experts,
            k: spec.k,
            conf: spec.conf.clone(),
            compute: ExpertCompute::from_name(&spec.conf.expert_compute),
            activation: spec.activation,
            dropout: spec.dropout,
            dispatch: spec.dispatch.clone(),
        }
    }

    /// Applies the layer to `x` `[B, T, d]`; only positions where `valid` `[B, T]` is
    /// true are routed (the others give zeros), all of them when `valid` is `None`.
    pub fn forward(
        &self,
        x: &Tensor,
        valid: Option<&Tensor>,
        train: bool,
        routing: &mut Routing,
    ) -> Tensor {
        crate::mask::on_valid_rows(x, valid, |tokens| self.forward_rows(tokens, train, routing))
    }

    /// The layer on rows `[N, d]`, all of them routed.
    fn forward_rows(&self, tokens: &Tensor, train: bool, routing: &mut Routing) -> Tensor {
        let (route, sorted) = {
            let _t = crate::profile::span("moe_route");
            let route = self.route(tokens, train, routing);
            let sorted = tokens.index_select(0, &route.token);
            (route, sorted)
        };
        let local = {
            let _t = crate::profile::span("moe_dispatch");
            self.dispatch.dispatch(&sorted, &route.counts)
        };
        let computed = {
            let _t = crate::profile::span("moe_experts");
            self.experts.forward(
                &local.rows,
                &local.counts,
                self.activation,
                self.dropout,
                train,
                self.compute,
            )
        };
        let back = {
            let _t = crate::profile::span("moe_dispatch");
            self.dispatch.combine(&computed, &local)
        };
        let weighted = back * route.weight.to_kind(tokens.kind()).unsqueeze(1);
        tokens.zeros_like().index_add(0, &route.token, &weighted)
    }

    fn route(&self, tokens: &Tensor, train: bool, routing: &mut Routing) -> Route {
        let n = tokens.size()[0];
        let (e, k) = (self.router.size()[0], self.k);
        let mut input = tokens.to_kind(Kind::Float);
        if train && self.conf.jitter_noise > 0.0 {
            let j = self.conf.jitter_noise;
            let noise = Tensor::empty_like(&input).uniform_(1.0 - j, 1.0 + j);
            input *= noise;
        }
        // fp32 even under bf16 autocast: the top-k choice is sensitive to rounding.
        let logits = crate::precision::full_precision(|| {
            input.matmul(&self.router.to_kind(Kind::Float).tr())
        });
        let probs = logits.softmax(-1, Kind::Float);
        let bias = self.expert_bias.as_ref();
        let (weight, expert) = gate(self.conf.router(), &logits, &probs, k, bias);
        // Token copies in token order (token i's copies at i*k..i*k+k).
        let copy_expert = expert.reshape([-1]);
        let copy_weight = weight.reshape([-1]);
        let device = tokens.device();
        let routed = copy_expert.bincount(None::<&Tensor>, e);
        let capacity = (train && self.conf.capacity_factor > 0.0)
            .then(|| (self.conf.capacity_factor * (n * k) as f64 / e as f64).ceil() as i64);
        // Copies sorted by expert; with a capacity, by falling weight within an expert.
        let order = match capacity {
            None => copy_expert.sort_stable(true, 0, false).1,
            Some(_) => {
                let by_weight = copy_weight.sort_stable(true, 0, true).1;
                let by_expert = copy_expert
                    .index_select(0, &by_weight)
                    .sort_stable(true, 0, false)
                    .1;
                by_weight.index_select(0, &by_expert)
            }
        };
        let order = match capacity {
            None => order,
            Some(cap) => {
                let sorted_expert = copy_expert.index_select(0, &order);
                let starts = routed.cumsum(0, Kind::Int64) - &routed;
                let position = Tensor::arange(n * k, (Kind::Int64, device))
                    - starts.index_select(0, &sorted_expert);
                order.masked_select(&position.lt(cap))
            }
        };
        let kept_expert = copy_expert.index_select(0, &order);
        let kept = kept_expert.bincount(None::<&Tensor>, e);
        if routing.enabled() {
            let mut record = self.statistics(&logits, &probs, &routed, &kept, train);
            record.inputs = routing.capture_inputs.then(|| input.detach());
            routing.layers.push(record);
        }
        Route {
            token: order.divide_scalar_mode(k, "trunc"),
            weight: copy_weight.index_select(0, &order),
            counts: kept,
        }
    }

    /// The load-balancing loss `E * sum_i f_i * P_i` of `routed` copies per expert and
    /// router probabilities `probs`: over this micro-batch, or in training with
    /// `balance_scope: global` over the global batch ([`BalanceStats::global_loss`]).
    fn balance_loss(&self, probs: &Tensor, routed: &Tensor, train: bool) -> Tensor {
        if train && self.conf.balance_scope == "global" {
            return self.balance.global_loss(&self.layer, probs, routed, self.k);
        }
        let fraction = routed.to_kind(Kind::Float) / (probs.size()[0] * self.k) as f64;
        let mean_prob = probs.mean_dim(0, false, Kind::Float);
        (fraction * mean_prob).sum(Kind::Float) * probs.size()[1] as f64
    }

    fn statistics(
        &self,
        logits: &Tensor,
        probs: &Tensor,
        routed: &Tensor,
        kept: &Tensor,
        train: bool,
    ) -> LayerRouting {
        let (balance_loss, z_loss, entropy) = if probs.size()[0] == 0 {
            let zero = || self.router.sum(Kind::Float) * 0.0;
            // Every worker joins the global statistics' sum, with or without tokens.
            let balance = if train && self.conf.balance_scope == "global" {
                self.balance_loss(probs, routed, train)
            } else {
                zero()
            };
            (balance, zero(), Tensor::from(0f32))
        } else {
            let entropy = tch::no_grad(|| {
                -(probs * probs.clamp_min(1e-20).log())
                    .sum_dim_intlist(-1, false, Kind::Float)
                    .mean(Kind::Float)
            });
            (
                self.balance_loss(probs, routed, train),
                logits.logsumexp(-1, false).square().mean(Kind::Float),
                entropy,
            )
        };
        LayerRouting {
            layer: self.layer.clone(),
            balance_loss,
            z_loss,
            dropped: (routed - kept).sum(Kind::Int64),
            tokens_per_expert: kept.shallow_clone(),
            entropy,
            inputs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn layer(vs: &nn::VarStore, conf: MoeConf) -> MoeFeedForward {
        let spec = MoeSpec {
            d: 16,
            n_expert: 4,
            k: 2,
            activation: Activation::Swish,
            dropout: 0.0,
            conf,
            dispatch: Arc::new(LocalDispatch),
            balance: Arc::default(),
        };
        let path = vs.root() / "ffn";
        MoeFeedForward::new(
            &path,
            ExpertBank::new(&(&path / "experts"), 4, 16, 24),
            &spec,
        )
    }

    /// A zero router ties every logit: the first k experts are chosen (whole virtual
    /// groups of a granular upcycle) and softmax_topk's weights are 1/k, as WeNet's.
    #[test]
    fn ties_go_to_the_lower_experts_and_softmax_topk_scales_by_e_over_k() {
        let _rng = crate::test_rng::lock();
        let logits = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu));
        let probs = logits.softmax(-1, Kind::Float);
        for router in [Router::TopkSoftmax, Router::SoftmaxTopk] {
            let (weight, expert) = gate(router, &logits, &probs, 4, None);
            let first: Vec<i64> = (0..4).collect();
            for row in 0..3 {
                assert_eq!(Vec::<i64>::try_from(expert.get(row)).unwrap(), first);
            }
            let quarter = Tensor::full([3, 4], 0.25, (Kind::Float, Device::Cpu));
            assert!(weight.allclose(&quarter, 1e-6, 1e-7, false), "{router:?}");
        }
        // Otherwise softmax_topk's weights are the k largest probabilities times E/k.
        let logits = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0]).view([1, 4]);
        let probs = logits.softmax(-1, Kind::Float);
        let (weight, expert) = gate(Router::SoftmaxTopk, &logits, &probs, 1, None);
        assert_eq!(expert.int64_value(&[0, 0]), 2);
        let want = probs.double_value(&[0, 2]) * 4.0;
        assert!((weight.double_value(&[0, 0]) - want).abs() < 1e-6);
    }

    /// Drawn expert by expert, the bank is the one `torch.nn.init.uniform_` of each whole
    /// tensor gives (the CPU generator's stream), so models built before experts were
    /// drawn one at a time keep their initial weights.
    #[test]
    fn experts_drawn_one_at_a_time_are_the_whole_draw() {
        let _rng = crate::test_rng::lock();
        let (e, d, f) = (3, 5, 7);
        tch::manual_seed(11);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bank = ExpertBank::new(&(vs.root() / "experts"), e, d, f);
        tch::manual_seed(11);
        let whole = |shape: &[i64], fan_in: i64| {
            let b = 1.0 / (fan_in as f64).sqrt();
            Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)).uniform_(-b, b)
        };
        assert!(bank.w_1.equal(&whole(&[e, d, f], d)));
        assert!(bank.b_1.equal(&whole(&[e, f], d)));
        assert!(bank.w_2.equal(&whole(&[e, f, d], f)));
        assert!(bank.b_2.equal(&whole(&[e, d], f)));
    }

    /// Same input, same gradients, bit for bit (resume and parity rely on it).
    #[test]
    fn forward_and_backward_are_deterministic() {
        let _rng = crate::test_rng::lock();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let moe = layer(
            &vs,
            MoeConf {
                expert_compute: "loop".into(),
                ..Default::default()
            },
        );
        let x = Tensor::randn([8, 300, 16], (Kind::Float, Device::Cpu));
        let run = || {
            for (_, v) in vs.variables() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let x = x.copy().set_requires_grad(true);
            let y = moe.forward(&x, None, true, &mut Routing::off());
            (y.square().sum(Kind::Float)).backward();
            let mut all = vec![("y".to_string(), y.detach()), ("x".into(), x.grad())];
            let vars: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
            all.extend(vars.into_iter().map(|(n, v)| (n, v.grad().copy())));
            all
        };
        let a = run();
        let b = run();
        for ((name, a), (_, b)) in a.iter().zip(&b) {
            assert!(a.equal(b), "{name} differs between two runs");
        }
    }

    /// The expert bias chooses experts only (a chosen copy keeps its unbiased score), and
    /// moved after each batch it evens out a router that favours one expert.
    #[test]
    fn expert_bias_evens_the_load_and_leaves_the_weights() {
        let _rng = crate::test_rng::lock();
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let moe = layer(
            &vs,
            MoeConf {
                expert_bias: true,
                ..Default::default()
            },
        );
        let mut bias = moe.expert_bias.as_ref().unwrap().shallow_clone();
        assert!(!bias.requires_grad(), "the bias is not trained");
        let scores = Tensor::from_slice(&[0.1f32, 0.5, 0.2, 0.3]).view([1, 4]);
        tch::no_grad(|| bias.copy_(&Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0])));
        // softmax_topk ranks the probabilities: 1.1 and 0.5 with the bias; the weights are
        // the unbiased 0.1 and 0.5, times E/k = 2.
        let (weight, expert) = gate(Router::SoftmaxTopk, &scores, &scores, 2, Some(&bias));
        assert_eq!(Vec::<i64>::try_from(expert.view([-1])).unwrap(), [0, 1]);
        assert_eq!(Vec::<f32>::try_from(weight.view([-1])).unwrap(), [0.2, 1.0]);
        let _ = bias.zero_();
        // Expert 0's logit is the tokens' mean feature (about 1), the others' about 0:
        // expert 0 takes half of the top-2 copies, twice an even share.
        let _ = tch::no_grad(|| moe.router.get(0).fill_(1.0 / 16.0));
        let mut imbalance = |bias_on: bool| -> Vec<f64> {
            let _ = tch::no_grad(|| bias.zero_());
            (0..100)
                .map(|_| {
                    let x = Tensor::randn([1, 256, 16], (Kind::Float, Device::Cpu)) + 1.0;
                    let mut r = Routing::recording();
                    let _ = moe.forward(&x, None, true, &mut r);
                    let load = &r.layers[0].tokens_per_expert;
                    if bias_on {
                        crate::balance::update_expert_bias(&mut bias, load, 0.02);
                    }
                    load.max().double_value(&[]) / (256.0 * 2.0 / 4.0)
                })
                .collect()
        };
        let last = |v: &[f64]| v[v.len() - 20..].iter().sum::<f64>() / 20.0;
        let (without, with) = (imbalance(false), imbalance(true));
        eprintln!(
            "busiest expert over an even share, last 20 batches: {:.3} without the bias, {:.3} with",
            last(&without),
            last(&with)
        );
        assert!(
            last(&without) > 1.8,
            "the router favours expert 0: {}",
            last(&without)
        );
        assert!(
            last(&with) < 1.3,
            "with the bias the busiest expert takes {} even shares",
            last(&with)
        );
    }

    /// Jitter noise changes routing inputs in training only; a capacity drops copies and
    /// says how many.
    #[test]
    fn jitter_is_training_only_and_dropped_copies_are_counted() {
        let _rng = crate::test_rng::lock();
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let moe = layer(
            &vs,
            MoeConf {
                jitter_noise: 0.5,
                capacity_factor: 0.5,
                ..Default::default()
            },
        );
        let x = Tensor::randn([2, 50, 16], (Kind::Float, Device::Cpu));
        let run = |train: bool| {
            let mut r = Routing::recording();
            let y = moe.forward(&x, None, train, &mut r);
            (y, r)
        };
        let (eval_a, r) = run(false);
        let (eval_b, _) = run(false);
        assert!(eval_a.equal(&eval_b));
        assert_eq!(
            r.layers[0].dropped.int64_value(&[]),
            0,
            "evaluation is dropless"
        );
        let (train_a, r) = run(true);
        let (train_b, _) = run(true);
        assert!(!train_a.equal(&train_b), "jitter differs between passes");
        // 100 tokens x 2 copies over 4 experts at capacity factor 0.5: 25 per expert.
        let kept = Vec::<i64>::try_from(&r.layers[0].tokens_per_expert).unwrap();
        assert!(kept.iter().all(|&c| c <= 25), "{kept:?}");
        let dropped = r.layers[0].dropped.int64_value(&[]);
        assert_eq!(dropped + kept.iter().sum::<i64>(), 200);
        assert!(dropped >= 100);
    }
}
