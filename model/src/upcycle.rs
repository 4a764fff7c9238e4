//! Upcycling (UME, Megatron-Core's `upcycling_utils`): every expert of an MoE layer is
//! made from the dense feed-forward network at the same path by a [`Method`], routers
//! start fresh, and every other tensor is copied. `copy` and `granular` keep the parent's
//! function at step 0 (see `moe::gate` for the routing side of that argument); `noise`
//! and `drop` move away from it on purpose, to break the experts' symmetry.

use std::collections::{BTreeMap, BTreeSet};

use tch::{nn, Kind, Tensor};

/// How the experts of a layer are made from its parent's network `f(x) = w_2 act(w_1 x +
/// b_1) + b_2` of `F` hidden units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Every expert an exact copy of `f`.
    Copy,
    /// Copies multiplied elementwise by `1 + std * N(0, 1)` (every expert tensor).
    Noise {
        /// Relative standard deviation of the noise.
        std: f64,
    },
    /// Drop-Upcycling (arXiv 2502.19261): copies in which a random `ratio` of the hidden
    /// units, a different subset per expert, is re-initialised: their `w_1` columns,
    /// `b_1` entries and `w_2` rows drawn from N(mean, std) of the parent's matrix (or
    /// bias); `b_2` is kept.
    Drop {
        /// Fraction of each expert's hidden units re-initialised.
        ratio: f64,
    },
    /// Granular upcycling (He et al., arXiv 2410.07524): the parent's `F` hidden units
    /// split into `granularity` slices of `F / G`; expert `i` holds slice `i % G` of copy
    /// `i / G`, its `w_2` and `b_2` multiplied by G so that a virtual group (the G experts
    /// of one copy, whose router rows are made equal) sums to `G f`.
    Granular {
        /// G: slices per copy of the parent.
        granularity: i64,
    },
}

impl Method {
    /// The names `convert upcycle --method` takes.
    pub const NAMES: [&'static str; 4] = ["copy", "noise", "drop", "granular"];

    /// The method's name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Copy => "copy",
            Method::Noise { .. } => "noise",
            Method::Drop { .. } => "drop",
            Method::Granular { .. } => "granular",
        }
    }

    /// The noise method's default relative standard deviation: small enough that the
    /// child stays close to its parent, large enough to separate the copies.
    pub const DEFAULT_NOISE: f64 = 0.01;
    /// Drop-Upcycling's default ratio (the paper's r = 0.5).
    pub const DEFAULT_DROP_RATIO: f64 = 0.5;

    /// The method `name` with its options (`convert upcycle --method NAME [--noise S]
    /// [--drop-ratio R] [--granularity G]`); an option the method does not take is
    /// refused, naming the method that does.
    pub fn parse(
        name: &str,
        noise: Option<f64>,
        drop_ratio: Option<f64>,
        granularity: Option<i64>,
    ) -> Result<Self, String> {
        let method = match name {
            "copy" => Method::Copy,
            "noise" => Method::Noise {
                std: noise.unwrap_or(Self::DEFAULT_NOISE),
            },
            "drop" => Method::Drop {
                ratio: drop_ratio.unwrap_or(Self::DEFAULT_DROP_RATIO),
            },
            "granular" => Method::Granular {
                granularity: granularity
                    .ok_or("--method granular needs --granularity G (experts per copy)")?,
            },
            other => {
                return Err(format!(
                    "--method {other}: not a method (supported: {})",
                    Self::NAMES.join(", ")
                ))
            }
        };
        for (option, given, owner) in [
            ("--noise", noise.is_some(), "noise"),
            ("--drop-ratio", drop_ratio.is_some(), "drop"),
            ("--granularity", granularity.is_some(), "granular"),
        ] {
            if given && name != owner {
                return Err(format!(
                    "{option} is an option of --method {owner}, not of --method {name}"
                ));
            }
        }
        method.validate()?;
        Ok(method)
    }

    /// G: experts per copy of the parent (1 unless granular).
    pub fn granularity(&self) -> i64 {
        match self {
            Method::Granular { granularity } => *granularity,
            _ => 1,
        }
    }

    /// Refuses parameters that cannot work, naming the option.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Method::Noise { std } if !(std.is_finite() && std > 0.0) => Err(format!(
                "--noise {std}: the noise method needs a finite standard deviation > 0"
            )),
            Method::Drop { ratio } if !(0.0..=1.0).contains(&ratio) => {
                Err(format!("--drop-ratio {ratio}: must be between 0 and 1"))
            }
            Method::Granular { granularity } if granularity < 1 => {
                Err(format!("--granularity {granularity}: must be at least 1"))
            }
            _ => Ok(()),
        }
    }
}

/// What [`upcycle`] did.
#[derive(Debug, Default)]
pub struct UpcycleReport {
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Expert banks filled from a dense network.
    pub banks: usize,
    /// Routers left at their fresh initialisation (granular: made into virtual groups).
    pub routers: usize,
    /// Of those, routers then fitted to the parent's tokens (`kmeans`; set by the caller,
    /// which runs the data).
    pub fitted: usize,
    /// Dense feed-forward tensors no expert bank took (layers that share a bank take
    /// the owner block's network).
    pub unused: Vec<String>,
}

/// The dense network's tensors, by their name under a layer, and each expert tensor's.
const BANK: [(&str, &str); 4] = [
    ("w_1", "w_1.weight"),
    ("b_1", "w_1.bias"),
    ("w_2", "w_2.weight"),
    ("b_2", "w_2.bias"),
];

/// Fills every variable of `moe` from the `dense` parent's tensors by `method` (random
/// draws from tch's generator: seed it for a reproducible result). Errors name the tensor
/// that has no source or whose shape does not fit.
pub fn upcycle(
    dense: &BTreeMap<String, Tensor>,
    moe: &nn::VarStore,
    method: Method,
) -> Result<UpcycleReport, String> {
    method.validate()?;
    let mut report = UpcycleReport::default();
    let mut used = BTreeSet::new();
    let vars: BTreeMap<String, Tensor> = moe.variables().into_iter().collect();
    tch::no_grad(|| {
        for (name, var) in &vars {
            if name.ends_with(".router.weight") {
                virtual_groups(name, var, method.granularity())?;
                report.routers += 1;
            } else if let Some(src) = dense.get(name) {
                if src.size() != var.size() {
                    return Err(format!(
                        "{name}: shape {:?} in the dense checkpoint, {:?} in the MoE model",
                        src.size(),
                        var.size()
                    ));
                }
                var.shallow_clone().copy_(src);
                used.insert(name.clone());
                report.copied += 1;
            } else if let Some(layer) = name.strip_suffix("experts.w_1") {
                fill_bank(layer, &vars, dense, method, &mut used)?;
                report.banks += 1;
            } else if !BANK
                .iter()
                .any(|(ours, _)| name.ends_with(&format!("experts.{ours}")))
            {
                return Err(format!(
                    "{name}: the dense checkpoint has no tensor of this name"
                ));
            }
        }
        Ok(())
    })?;
    report.unused = dense
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    if let Some(bad) = report
        .unused
        .iter()
        .find(|k| !BANK.iter().any(|(_, dense)| k.ends_with(dense)))
    {
        return Err(format!(
            "{bad}: a dense tensor the MoE model has no place for (do the configs match?)"
        ));
    }
    Ok(report)
}

/// Granular routers: the G rows of a virtual group made equal (the group's first), so
/// the group is chosen whole at step 0.
fn virtual_groups(name: &str, router: &Tensor, granularity: i64) -> Result<(), String> {
    let n = router.size()[0];
    if granularity == 1 {
        return Ok(());
    }
    if n % granularity != 0 {
        return Err(format!(
            "{name}: {n} experts are not a whole number of virtual groups of {granularity} \
             (choose --experts a multiple of --granularity)"
        ));
    }
    let groups = router
        .view([n / granularity, granularity, -1])
        .select(1, 0)
        .repeat_interleave_self_int(granularity, 0, None);
    router.shallow_clone().copy_(&groups);
    Ok(())
}

/// Router rows `[E, d]` fitted to the tokens `[N, d]` a layer's router sees: spherical
/// k-means (cosine similarity; k-means++ seeding, then `rounds` of Lloyd's updates) makes
/// E / `granularity` centroids, each repeated for the G experts of its virtual group. A
/// token's largest logits are then its nearest centroids, so from step 0 every expert
/// (copy) is trained on one coherent region of the token space instead of a random share
/// of it: a normal router over identical copies gets no gradient (the k weights sum to 1
/// over equal outputs) and stays near uniform. The rows are the unit centroids divided
/// by the tokens' mean norm, so a logit is about the cosine of token and centroid.
/// Seeded by libtorch's generator (`tch::manual_seed`).
pub fn kmeans_router(
    tokens: &Tensor,
    experts: i64,
    granularity: i64,
    rounds: usize,
) -> Result<Tensor, String> {
    let clusters = experts / granularity.max(1);
    let n = tokens.size()[0];
    if clusters < 1 || experts % granularity.max(1) != 0 {
        return Err(format!(
            "{experts} experts are not a whole number of virtual groups of {granularity}"
        ));
    }
    if n < clusters {
        return Err(format!(
            "{n} tokens cannot be split into {clusters} clusters (fit on more utterances)"
        ));
    }
    tch::no_grad(|| {
        let x = tokens.to_kind(Kind::Float);
        let norms = x.norm_scalaropt_dim(2, [-1].as_slice(), true);
        let unit = &x / norms.clamp_min(1e-12);
        // k-means++: each next seed drawn with probability proportional to its cosine
        // distance from the nearest seed so far.
        let first = Tensor::randint(n, [1], (Kind::Int64, x.device()));
        let mut seeds = vec![unit.index_select(0, &first)];
        let cosine_distance = |seed: &Tensor| -> Tensor {
            (unit.matmul(&seed.tr()).squeeze_dim(1) * -1.0 + 1.0).clamp_min(0.0)
        };
        let mut distance = cosine_distance(&seeds[0]);
        for _ in 1..clusters {
            // Every token on a seed already (up to rounding): no new direction to draw.
            if distance.max().double_value(&[]) <= 1e-6 {
                return Err(format!(
                    "the tokens have fewer than {clusters} distinct directions: nothing to \
                     cluster (fit on more, or more varied, utterances)"
                ));
            }
            let pick = distance.multinomial(1, false);
            let seed = unit.index_select(0, &pick);
            distance = distance.minimum(&cosine_distance(&seed));
            seeds.push(seed);
        }
        let mut centroids = Tensor::cat(&seeds, 0);
        for _ in 0..rounds {
            let nearest = unit.matmul(&centroids.tr()).argmax(-1, false);
            let sums = centroids.zeros_like().index_add(0, &nearest, &unit);
            let moved = &sums
                / sums
                    .norm_scalaropt_dim(2, [-1].as_slice(), true)
                    .clamp_min(1e-12);
            // A cluster left without tokens keeps its centroid.
            let empty = nearest
                .bincount(None::<&Tensor>, clusters)
                .eq(0)
                .unsqueeze(1);
            centroids = centroids.where_self(&empty, &moved);
        }
        let mean_norm = norms.mean(Kind::Float).clamp_min(1e-12);
        Ok((centroids / mean_norm).repeat_interleave_self_int(granularity.max(1), 0, None))
    })
}

/// Fills the expert bank under `layer` (e.g. `encoder.encoders.0.feed_forward.`) from
/// the dense network under the same prefix.
fn fill_bank(
    layer: &str,
    vars: &BTreeMap<String, Tensor>,
    dense: &BTreeMap<String, Tensor>,
    method: Method,
    used: &mut BTreeSet<String>,
) -> Result<(), String> {
    let g = method.granularity();
    let w_1 = &vars[&format!("{layer}experts.w_1")];
    let (n, d, units) = (w_1.size()[0], w_1.size()[1], w_1.size()[2]);
    if n % g != 0 {
        return Err(format!(
            "{layer}experts.w_1: {n} experts are not a whole number of copies split {g} ways \
             (choose --experts a multiple of --granularity)"
        ));
    }
    let f = units * g;
    // Each dense tensor's shape for an expert of `units` hidden units, granularity g.
    let want = [vec![f, d], vec![f], vec![d, f], vec![d]];
    let mut parent = Vec::with_capacity(4);
    for ((ours, source), want) in BANK.iter().zip(want) {
        let name = format!("{layer}{source}");
        let src = dense.get(&name).ok_or_else(|| {
            format!("{layer}experts.{ours}: its source {name} is not in the dense checkpoint")
        })?;
        if src.size() != want {
            return Err(format!(
                "{layer}experts.{ours}: the dense {name} is {:?}, but {n} experts of {units} \
                 hidden units (granularity {g}) need {want:?}",
                src.size()
            ));
        }
        used.insert(name);
        parent.push(src.to_kind(w_1.kind()));
    }
    let [w_1_dense, b_1_dense, w_2_dense, b_2_dense] = &parent[..] else {
        unreachable!("four tensors")
    };
    // Our layout: w_1 [n, d, units], b_1 [n, units], w_2 [n, units, d], b_2 [n, d]; the
    // hidden units of slice s are s * units .. (s + 1) * units.
    let copies = n / g;
    let mut bank = [
        w_1_dense
            .tr()
            .view([d, g, units])
            .permute([1, 0, 2])
            .repeat([copies, 1, 1]),
        b_1_dense.view([g, units]).repeat([copies, 1]),
        (w_2_dense.tr() * g as f64)
            .view([g, units, d])
            .repeat([copies, 1, 1]),
        b_2_dense.unsqueeze(0).repeat([n, 1]),
    ];
    match method {
        Method::Noise { std } => {
            for t in &mut bank {
                *t = &*t * (t.randn_like() * std + 1.0);
            }
        }
        Method::Drop { ratio } => drop_units(&mut bank, [w_1_dense, b_1_dense, w_2_dense], ratio),
        Method::Copy | Method::Granular { .. } => {}
    }
    for ((ours, _), t) in BANK.iter().zip(&bank) {
        vars[&format!("{layer}experts.{ours}")]
            .shallow_clone()
            .copy_(t);
    }
    Ok(())
}

/// Drop-Upcycling on a bank of copies: per expert, `ratio` of the hidden units (a fresh
/// random subset) get new `w_1` columns, `b_1` entries and `w_2` rows drawn from the
/// normal distribution with the mean and standard deviation of the parent's tensor.
fn drop_units(bank: &mut [Tensor; 4], parent: [&Tensor; 3], ratio: f64) {
    let (n, units) = (bank[1].size()[0], bank[1].size()[1]);
    let dropped = (ratio * units as f64).round() as i64;
    let stats = parent.map(|t| {
        let (std, mean) = t.std_mean(true);
        (mean.double_value(&[]), std.double_value(&[]))
    });
    // Where the hidden unit is in each tensor: w_1 [d, units] columns, b_1 entries, w_2
    // [units, d] rows.
    let unit_dim = [1, 0, 0];
    for e in 0..n {
        let units_out =
            Tensor::randperm(units, (Kind::Int64, bank[0].device())).narrow(0, 0, dropped);
        for (i, &(mean, std)) in stats.iter().enumerate() {
            let mut expert = bank[i].get(e);
            let mut shape = expert.size();
            shape[unit_dim[i]] = dropped;
            let fresh = Tensor::empty(&shape, (expert.kind(), expert.device())).normal_(mean, std);
            let _ = expert.index_copy_(unit_dim[i] as i64, &units_out, &fresh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffn::FfnFactory;
    use crate::moe::MoeContext;
    use tch::{Device, Kind};

    /// A dense network `8 -> 12 -> 8` and an MoE layer of `n` experts of `units` hidden
    /// units at the same path.
    fn dense_and_moe(n: i64, units: i64) -> (BTreeMap<String, Tensor>, nn::VarStore) {
        let ctx = MoeContext::default();
        let act = crate::activation::Activation::Swish;
        let dense = nn::VarStore::new(Device::Cpu);
        FfnFactory::new(8, 12, act, 0.0, (n, 2, units), &ctx).dense(&(dense.root() / "ff"));
        let moe = nn::VarStore::new(Device::Cpu);
        let root = moe.root();
        FfnFactory::new(8, 12, act, 0.0, (n, 2, units), &ctx)
            .moe(&(&root / "ff"), &(&root / "ff" / crate::moe::EXPERT_BANK));
        (dense.variables().into_iter().collect(), moe)
    }

    fn var(moe: &nn::VarStore, name: &str) -> Tensor {
        moe.variables()[name].shallow_clone()
    }

    /// Tokens around `groups` random directions of `d` dimensions (norms 2-6), 50 each,
    /// and the group of each.
    fn clustered_tokens(groups: i64, d: i64) -> (Tensor, Tensor) {
        let centres = Tensor::randn([groups, d], (Kind::Float, Device::Cpu));
        let group = Tensor::arange(groups, (Kind::Int64, Device::Cpu))
            .repeat_interleave_self_int(50, 0, None);
        let noise = Tensor::randn([groups * 50, d], (Kind::Float, Device::Cpu)) * 0.05;
        let scale = Tensor::rand([groups * 50, 1], (Kind::Float, Device::Cpu)) * 4.0 + 2.0;
        ((centres.index_select(0, &group) + noise) * scale, group)
    }

    /// Every token's largest logit is the row of its own group, a different row for each
    /// group; logits are about cosines; granular rows come in equal virtual groups.
    #[test]
    fn a_kmeans_router_sends_each_cluster_of_tokens_to_its_own_expert() {
        let _rng = crate::test_rng::lock();
        tch::manual_seed(3);
        let (tokens, group) = clustered_tokens(4, 16);
        let router = kmeans_router(&tokens, 4, 1, 20).unwrap();
        assert_eq!(router.size(), [4, 16]);
        let logits = tokens.matmul(&router.tr());
        let chosen = Vec::<i64>::try_from(&logits.argmax(-1, false)).unwrap();
        let group = Vec::<i64>::try_from(&group).unwrap();
        let mut expert_of = BTreeMap::new();
        for (g, e) in group.iter().zip(&chosen) {
            assert_eq!(*expert_of.entry(*g).or_insert(*e), *e, "group {g} split");
        }
        let experts: BTreeSet<i64> = expert_of.values().copied().collect();
        assert_eq!(
            experts.len(),
            4,
            "two groups share an expert: {expert_of:?}"
        );
        let top = logits.amax(-1, false).abs().max().double_value(&[]);
        assert!(top < 2.5, "logits should be about cosines, largest {top}");

        let router = kmeans_router(&tokens, 8, 2, 20).unwrap();
        let pairs = router.view([4, 2, 16]);
        assert!(pairs.select(1, 0).equal(&pairs.select(1, 1)));
    }

    #[test]
    fn kmeans_refuses_too_few_or_identical_tokens_by_name() {
        let _rng = crate::test_rng::lock();
        let few = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let e = kmeans_router(&few, 4, 1, 5).unwrap_err();
        assert!(
            e.contains("3 tokens cannot be split into 4 clusters"),
            "{e}"
        );
        let same = Tensor::ones([20, 8], (Kind::Float, Device::Cpu));
        let e = kmeans_router(&same, 4, 1, 5).unwrap_err();
        assert!(e.contains("fewer than 4 distinct directions"), "{e}");
        let e = kmeans_router(&few, 6, 4, 5).unwrap_err();
        assert!(e.contains("not a whole number of virtual groups"), "{e}");
    }

    #[test]
    fn experts_are_exact_copies_unless_noise_is_asked_for() {
        let _rng = crate::test_rng::lock();
        let (dense, moe) = dense_and_moe(4, 12);
        let r = upcycle(&dense, &moe, Method::Copy).unwrap();
        assert_eq!((r.banks, r.routers, r.unused.len()), (1, 1, 0));
        let w_1 = var(&moe, "ff.experts.w_1");
        for e in 0..4 {
            assert!(w_1.get(e).equal(&dense["ff.w_1.weight"].tr()), "expert {e}");
        }
        upcycle(&dense, &moe, Method::Noise { std: 0.1 }).unwrap();
        let w_1 = var(&moe, "ff.experts.w_1");
        assert!(!w_1.get(0).equal(&w_1.get(1)));
        let rel = ((w_1.get(0) - dense["ff.w_1.weight"].tr()).abs()
            / dense["ff.w_1.weight"].tr().abs())
        .mean(Kind::Float)
        .double_value(&[]);
        assert!((0.03..0.2).contains(&rel), "{rel}");
    }

    /// Drop-Upcycling: in each expert exactly round(r F) hidden units are new, the same
    /// units in w_1, b_1 and w_2, a different subset per expert; the rest and b_2 are the
    /// parent's.
    #[test]
    fn drop_reinitialises_a_fraction_of_each_experts_units() {
        let _rng = crate::test_rng::lock();
        let (dense, moe) = dense_and_moe(4, 12);
        tch::manual_seed(3);
        upcycle(&dense, &moe, Method::Drop { ratio: 0.5 }).unwrap();
        let parent_w_1 = dense["ff.w_1.weight"].tr();
        let parent_w_2 = dense["ff.w_2.weight"].tr();
        let mut subsets = BTreeSet::new();
        for e in 0..4 {
            let changed = |bank: &str, parent: &Tensor, unit_dim: i64| -> Vec<i64> {
                let t = var(&moe, bank).get(e);
                (0..12)
                    .filter(|&u| !t.select(unit_dim, u).equal(&parent.select(unit_dim, u)))
                    .collect()
            };
            let w_1 = changed("ff.experts.w_1", &parent_w_1, 1);
            assert_eq!(w_1.len(), 6, "expert {e}: {w_1:?}");
            assert_eq!(changed("ff.experts.b_1", &dense["ff.w_1.bias"], 0), w_1);
            assert_eq!(changed("ff.experts.w_2", &parent_w_2, 0), w_1);
            assert!(var(&moe, "ff.experts.b_2")
                .get(e)
                .equal(&dense["ff.w_2.bias"]));
            subsets.insert(w_1);
        }
        assert_eq!(
            subsets.len(),
            4,
            "a different subset per expert: {subsets:?}"
        );
        // Drawn at the parent's scale.
        let new_std = var(&moe, "ff.experts.w_1").std(true).double_value(&[]);
        let parent_std = parent_w_1.std(true).double_value(&[]);
        assert!(
            (new_std / parent_std - 1.0).abs() < 0.3,
            "{new_std} {parent_std}"
        );
        // Seeded: the same seed gives the same experts.
        let first = var(&moe, "ff.experts.w_1").copy();
        tch::manual_seed(3);
        upcycle(&dense, &moe, Method::Drop { ratio: 0.5 }).unwrap();
        assert!(var(&moe, "ff.experts.w_1").equal(&first));
    }

    /// Granular, G = 3 and 6 experts: experts of 4 hidden units whose slices put back
    /// together give the parent (w_2 and b_2 carrying the factor G), two virtual groups of
    /// equal router rows.
    #[test]
    fn granular_slices_put_back_together_are_the_parent() {
        let _rng = crate::test_rng::lock();
        let (dense, moe) = dense_and_moe(6, 4);
        upcycle(&dense, &moe, Method::Granular { granularity: 3 }).unwrap();
        let (w_1, b_1) = (var(&moe, "ff.experts.w_1"), var(&moe, "ff.experts.b_1"));
        let (w_2, b_2) = (var(&moe, "ff.experts.w_2"), var(&moe, "ff.experts.b_2"));
        assert_eq!(w_1.size(), [6, 8, 4]);
        assert_eq!(w_2.size(), [6, 4, 8]);
        for group in 0..2 {
            let experts: Vec<i64> = (group * 3..group * 3 + 3).collect();
            let cat = |t: &Tensor, dim: i64| {
                Tensor::cat(&experts.iter().map(|&e| t.get(e)).collect::<Vec<_>>(), dim)
            };
            assert!(cat(&w_1, 1).equal(&dense["ff.w_1.weight"].tr()));
            assert!(cat(&b_1, 0).equal(&dense["ff.w_1.bias"]));
            let w_2_back = cat(&w_2, 0) / 3.0;
            assert!(w_2_back.allclose(&dense["ff.w_2.weight"].tr(), 1e-6, 1e-7, false));
            for &e in &experts {
                assert!(b_2.get(e).equal(&dense["ff.w_2.bias"]));
            }
        }
        let router = var(&moe, "ff.router.weight");
        assert!(router.get(0).equal(&router.get(2)) && router.get(3).equal(&router.get(5)));
        assert!(!router.get(0).equal(&router.get(3)));
        // 6 experts are not whole groups of 4; 4 units x 4 is not the parent's 12.
        let e = upcycle(&dense, &moe, Method::Granular { granularity: 4 }).unwrap_err();
        assert!(e.contains("--granularity"), "{e}");
    }

    #[test]
    fn a_missing_or_misshapen_source_is_named() {
        let _rng = crate::test_rng::lock();
        let (mut dense, moe) = dense_and_moe(4, 12);
        let w = dense.remove("ff.w_2.weight").unwrap();
        let e = upcycle(&dense, &moe, Method::Copy).unwrap_err();
        assert!(e.contains("ff.w_2.weight"), "{e}");
        dense.insert("ff.w_2.weight".into(), w.narrow(1, 0, 5));
        let e = upcycle(&dense, &moe, Method::Copy).unwrap_err();
        assert!(e.contains("ff.experts.w_2"), "{e}");
        let e = upcycle(&dense, &moe, Method::Drop { ratio: 1.5 }).unwrap_err();
        assert!(e.contains("--drop-ratio"), "{e}");
    }
}
