//! Upcycling (UME, Megatron-Core's `upcycling_utils`): every expert of an MoE layer starts
//! as a copy of the dense feed-forward network at the same path, routers start fresh, and
//! every other tensor is copied. With softmax over the k chosen logits the weights sum to
//! one, so the upcycled model computes its parent's function.

use std::collections::BTreeMap;

use tch::{nn, Tensor};

/// What [`upcycle`] did.
#[derive(Debug, Default)]
pub struct UpcycleReport {
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Expert banks filled from a dense network.
    pub banks: usize,
    /// Routers left at their fresh initialisation.
    pub routers: usize,
    /// Dense feed-forward tensors no expert bank took (layers that share a bank take
    /// the owner block's network).
    pub unused: Vec<String>,
}

/// The dense tensor an expert parameter is copied from and whether it is transposed.
fn dense_source(name: &str) -> Option<(String, bool)> {
    [
        ("experts.w_1", "w_1.weight", true),
        ("experts.b_1", "w_1.bias", false),
        ("experts.w_2", "w_2.weight", true),
        ("experts.b_2", "w_2.bias", false),
    ]
    .iter()
    .find_map(|(ours, dense, transpose)| {
        name.strip_suffix(ours)
            .map(|layer| (format!("{layer}{dense}"), *transpose))
    })
}

/// Fills every variable of `moe` from the `dense` parent's tensors. `noise` > 0
/// multiplies each expert's copy by `1 + noise * N(0, 1)` elementwise (breaking the
/// copies' symmetry at the cost of exactness). Errors name the tensor that has no source
/// or whose shape differs.
pub fn upcycle(
    dense: &BTreeMap<String, Tensor>,
    moe: &nn::VarStore,
    noise: f64,
) -> Result<UpcycleReport, String> {
    let mut report = UpcycleReport::default();
    let mut used = std::collections::BTreeSet::new();
    let vars: BTreeMap<String, Tensor> = moe.variables().into_iter().collect();
    tch::no_grad(|| {
        for (name, mut var) in vars {
            if name.ends_with(".router.weight") {
                report.routers += 1;
                continue;
            }
            let (source, transpose) = match dense.get(&name) {
                Some(_) => (name.clone(), false),
                None => dense_source(&name).ok_or_else(|| {
                    format!("{name}: the dense checkpoint has no tensor of this name")
                })?,
            };
            let src = dense.get(&source).ok_or_else(|| {
                format!("{name}: its source {source} is not in the dense checkpoint")
            })?;
            used.insert(source.clone());
            if source == name {
                if src.size() != var.size() {
                    return Err(format!(
                        "{name}: shape {:?} in the dense checkpoint, {:?} in the MoE model",
                        src.size(),
                        var.size()
                    ));
                }
                var.copy_(src);
                report.copied += 1;
                continue;
            }
            let one = if transpose {
                src.tr()
            } else {
                src.shallow_clone()
            };
            let want = &var.size()[1..];
            if one.size() != want {
                return Err(format!(
                    "{name}: one expert is {want:?} but the dense {source} gives {:?}",
                    one.size()
                ));
            }
            let mut copies = one.unsqueeze(0).expand_as(&var).to_kind(var.kind());
            if noise > 0.0 {
                copies = &copies * (copies.randn_like() * noise + 1.0);
            }
            var.copy_(&copies);
            if name.ends_with("experts.w_1") {
                report.banks += 1;
            }
        }
        Ok(())
    })?;
    report.unused = dense
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    if let Some(bad) = report.unused.iter().find(|k| {
        !["w_1.weight", "w_1.bias", "w_2.weight", "w_2.bias"]
            .iter()
            .any(|s| k.ends_with(s))
    }) {
        return Err(format!(
            "{bad}: a dense tensor the MoE model has no place for (do the configs match?)"
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffn::FfnFactory;
    use crate::moe::MoeContext;
    use tch::{Device, Kind};

    fn dense_and_moe() -> (BTreeMap<String, Tensor>, nn::VarStore) {
        let ctx = MoeContext::default();
        let act = crate::activation::Activation::Swish;
        let dense = nn::VarStore::new(Device::Cpu);
        FfnFactory::new(8, 12, act, 0.0, (4, 2), &ctx).dense(&(dense.root() / "ff"));
        let moe = nn::VarStore::new(Device::Cpu);
        let root = moe.root();
        FfnFactory::new(8, 12, act, 0.0, (4, 2), &ctx)
            .moe(&(&root / "ff"), &(&root / "ff" / crate::moe::EXPERT_BANK));
        (dense.variables().into_iter().collect(), moe)
    }

    #[test]
    fn experts_are_exact_copies_unless_noise_is_asked_for() {
        let (dense, moe) = dense_and_moe();
        let r = upcycle(&dense, &moe, 0.0).unwrap();
        assert_eq!((r.banks, r.routers, r.unused.len()), (1, 1, 0));
        let w_1 = moe.variables()["ff.experts.w_1"].shallow_clone();
        for e in 0..4 {
            assert!(w_1.get(e).equal(&dense["ff.w_1.weight"].tr()), "expert {e}");
        }
        upcycle(&dense, &moe, 0.1).unwrap();
        let w_1 = moe.variables()["ff.experts.w_1"].shallow_clone();
        assert!(!w_1.get(0).equal(&w_1.get(1)));
        let rel = ((w_1.get(0) - dense["ff.w_1.weight"].tr()).abs()
            / dense["ff.w_1.weight"].tr().abs())
        .mean(Kind::Float)
        .double_value(&[]);
        assert!((0.03..0.2).contains(&rel), "{rel}");
    }

    #[test]
    fn a_missing_or_misshapen_source_is_named() {
        let (mut dense, moe) = dense_and_moe();
        let w = dense.remove("ff.w_2.weight").unwrap();
        let e = upcycle(&dense, &moe, 0.0).unwrap_err();
        assert!(e.contains("ff.w_2.weight"), "{e}");
        dense.insert("ff.w_2.weight".into(), w.narrow(1, 0, 5));
        let e = upcycle(&dense, &moe, 0.0).unwrap_err();
        assert!(e.contains("ff.experts.w_2"), "{e}");
    }
}
