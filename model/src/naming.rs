//! WeNet's parameter names and ours. They are the same except in MoE layers, where WeNet
//! keeps a list of experts and we keep them stacked:
//!
//! | WeNet (layer `P`, expert `j`) | ours |
//! |---|---|
//! | `P.gate.weight` `[E, d]` | `P.router.weight` `[E, d]` |
//! | `P.experts.{j}.w_1.weight` `[f, d]` | `P.experts.w_1[j]` `[E, d, f]` (transposed) |
//! | `P.experts.{j}.w_1.bias` `[f]` | `P.experts.b_1[j]` `[E, f]` |
//! | `P.experts.{j}.w_2.weight` `[d, f]` | `P.experts.w_2[j]` `[E, f, d]` (transposed) |
//! | `P.experts.{j}.w_2.bias` `[d]` | `P.experts.b_2[j]` `[E, d]` |

use std::collections::BTreeMap;

use tch::Tensor;

/// WeNet's expert parameter, ours, and whether ours is transposed.
const PARTS: [(&str, &str, bool); 4] = [
    ("w_1.weight", "w_1", true),
    ("w_1.bias", "b_1", false),
    ("w_2.weight", "w_2", true),
    ("w_2.bias", "b_2", false),
];

/// Splits `P.experts.{j}.rest` into `(P, j, rest)`.
fn wenet_expert(name: &str) -> Option<(&str, usize, &str)> {
    let at = name.find(".experts.")?;
    let (layer, tail) = (&name[..at], &name[at + ".experts.".len()..]);
    let (j, rest) = tail.split_once('.')?;
    Some((layer, j.parse().ok()?, rest))
}

/// WeNet-named tensors to ours: experts stacked, gates renamed. Errors name the layer
/// whose experts are incomplete or of different shapes.
pub fn from_wenet(tensors: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    // (layer, our part) -> expert id -> tensor
    let mut experts: BTreeMap<(String, &str), BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (name, t) in tensors {
        if let Some((layer, j, rest)) = wenet_expert(&name) {
            let (_, ours, transpose) = PARTS
                .iter()
                .find(|(theirs, _, _)| *theirs == rest)
                .ok_or_else(|| format!("{name}: unknown expert parameter {rest:?}"))?;
            let t = if *transpose { t.tr().contiguous() } else { t };
            experts
                .entry((layer.to_string(), ours))
                .or_default()
                .insert(j, t);
        } else if let Some(layer) = name.strip_suffix(".gate.weight") {
            out.insert(format!("{layer}.router.weight"), t);
        } else {
            out.insert(name, t);
        }
    }
    for ((layer, part), by_id) in experts {
        let n = by_id.len();
        if by_id.keys().copied().ne(0..n) {
            return Err(format!(
                "{layer}.experts: expert ids {:?} are not 0..{n}",
                by_id.keys().collect::<Vec<_>>()
            ));
        }
        let parts: Vec<Tensor> = by_id.into_values().collect();
        if parts.windows(2).any(|w| w[0].size() != w[1].size()) {
            return Err(format!("{layer}.experts: experts' {part} differ in shape"));
        }
        out.insert(format!("{layer}.experts.{part}"), Tensor::stack(&parts, 0));
    }
    Ok(out)
}

/// Our tensors to WeNet's names: stacked experts split into `experts.{j}`.
pub fn to_wenet(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let stacked = PARTS.iter().find_map(|(theirs, ours, transpose)| {
            name.strip_suffix(&format!(".experts.{ours}"))
                .map(|layer| (layer.to_string(), *theirs, *transpose))
        });
        if let Some((layer, theirs, transpose)) = stacked {
            for j in 0..t.size()[0] {
                let e = t.get(j);
                let e = if transpose { e.tr() } else { e };
                out.insert(format!("{layer}.experts.{j}.{theirs}"), e.contiguous());
            }
        } else if let Some(layer) = name.strip_suffix(".router.weight") {
            out.insert(format!("{layer}.gate.weight"), t);
        } else {
            out.insert(name, t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacking_round_trips_bit_for_bit() {
        let mut wenet = BTreeMap::new();
        for j in 0..3 {
            wenet.insert(
                format!("l.experts.{j}.w_1.weight"),
                Tensor::randn([5, 4], tch::kind::FLOAT_CPU),
            );
            wenet.insert(
                format!("l.experts.{j}.w_1.bias"),
                Tensor::randn([5], tch::kind::FLOAT_CPU),
            );
            wenet.insert(
                format!("l.experts.{j}.w_2.weight"),
                Tensor::randn([4, 5], tch::kind::FLOAT_CPU),
            );
            wenet.insert(
                format!("l.experts.{j}.w_2.bias"),
                Tensor::randn([4], tch::kind::FLOAT_CPU),
            );
        }
        wenet.insert(
            "l.gate.weight".into(),
            Tensor::randn([3, 4], tch::kind::FLOAT_CPU),
        );
        wenet.insert(
            "other.weight".into(),
            Tensor::randn([2], tch::kind::FLOAT_CPU),
        );
        let ours = from_wenet(wenet.iter().map(|(k, v)| (k.clone(), v.copy())).collect()).unwrap();
        assert_eq!(ours["l.experts.w_1"].size(), [3, 4, 5]);
        assert_eq!(ours["l.experts.w_2"].size(), [3, 5, 4]);
        assert!(ours.contains_key("l.router.weight"));
        let back = to_wenet(ours);
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            wenet.keys().collect::<Vec<_>>()
        );
        for (k, v) in &wenet {
            assert!(back[k].equal(v), "{k}");
        }
    }

    #[test]
    fn missing_expert_is_named() {
        let mut wenet = BTreeMap::new();
        for j in [0, 2] {
            wenet.insert(
                format!("l.experts.{j}.w_1.bias"),
                Tensor::zeros([5], tch::kind::FLOAT_CPU),
            );
        }
        let e = from_wenet(wenet).unwrap_err();
        assert!(e.contains("l.experts") && e.contains("0..2"), "{e}");
    }
}
