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
//!
//! WeNet also registers its sinusoidal position tables as persistent buffers, so every
//! state dict it saves holds them (`encoder.embed.pos_enc.pe`, `D.embed.1.pe` for each
//! decoder `D`; float32 `[1, 5000, d]`). We compute positions on the fly: the tables are
//! checked against the sinusoid and dropped on the way in, and written on the way out so
//! that WeNet's strict `load_state_dict` accepts an export.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::embedding::sinusoid;

/// Rows of the position tables WeNet registers (its `PositionalEncoding`'s `max_len`).
pub const WENET_POSITIONS: i64 = 5000;
/// The encoder's position table.
const ENCODER_PE: &str = "encoder.embed.pos_enc.pe";
/// A decoder's embedding (`D.embed.0.weight`, `[vocab, d]`) and its position table.
const DECODER_EMBED: &str = ".embed.0.weight";
const DECODER_PE: &str = ".embed.1.pe";

fn is_position_table(name: &str) -> bool {
    name == ENCODER_PE || name.ends_with(DECODER_PE)
}

/// Checks that `t` is WeNet's sinusoid table `[1, L, d]` (within 1e-6 in float32, within
/// rounding in half precision), naming the tensor when it is not.
fn check_position_table(name: &str, t: &Tensor) -> Result<(), String> {
    let &[1, len, d] = t.size().as_slice() else {
        return Err(format!(
            "{name}: shape {:?}, but WeNet's position table is [1, max_len, d]",
            t.size()
        ));
    };
    let tolerance = match t.kind() {
        Kind::Half => 2f64.powi(-11),
        Kind::BFloat16 => 2f64.powi(-8),
        _ => 1e-6,
    };
    let want = sinusoid(0, len, d, Device::Cpu).to_kind(t.kind());
    let diff = (t.to_kind(Kind::Float) - want.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[]);
    if diff.is_nan() || diff > tolerance {
        return Err(format!(
            "{name}: not the sinusoidal position table WeNet computes (differs by {diff:.2e}); \
             the checkpoint comes from a model with other position encodings"
        ));
    }
    Ok(())
}

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

/// WeNet-named tensors to ours: experts stacked, gates renamed, position tables checked
/// and dropped. Errors name the layer whose experts are incomplete or of different
/// shapes, and a position table that is not WeNet's sinusoid.
pub fn from_wenet(tensors: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    // (layer, our part) -> expert id -> tensor
    let mut experts: BTreeMap<(String, &str), BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (name, t) in tensors {
        if is_position_table(&name) {
            check_position_table(&name, &t)?;
        } else if let Some((layer, j, rest)) = wenet_expert(&name) {
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

/// Our tensors to WeNet's names: stacked experts split into `experts.{j}`, and WeNet's
/// position tables added beside the encoder's subsampling and each decoder's embedding.
pub fn to_wenet(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let table = |d: i64| sinusoid(0, WENET_POSITIONS, d, Device::Cpu);
        if name == "encoder.embed.out.0.weight" {
            out.insert(ENCODER_PE.to_string(), table(t.size()[0]));
        } else if let Some(decoder) = name.strip_suffix(DECODER_EMBED) {
            out.insert(format!("{decoder}{DECODER_PE}"), table(t.size()[1]));
        }
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
        let _rng = crate::test_rng::lock();
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
    fn position_tables_are_written_checked_and_dropped() {
        let _rng = crate::test_rng::lock();
        let ours: BTreeMap<String, Tensor> = [
            ("encoder.embed.out.0.weight", [8, 12]),
            ("decoder.left_decoder.embed.0.weight", [30, 8]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), Tensor::randn(s, tch::kind::FLOAT_CPU)))
        .collect();
        let wenet = to_wenet(ours.iter().map(|(k, v)| (k.clone(), v.copy())).collect());
        for name in [ENCODER_PE, "decoder.left_decoder.embed.1.pe"] {
            assert_eq!(wenet[name].size(), [1, WENET_POSITIONS, 8], "{name}");
        }
        let back = from_wenet(wenet.iter().map(|(k, v)| (k.clone(), v.copy())).collect()).unwrap();
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            ours.keys().collect::<Vec<_>>()
        );
        // Half precision (a `model.half()` state dict) and another max_len are accepted.
        let mut half = BTreeMap::new();
        half.insert(
            ENCODER_PE.to_string(),
            sinusoid(0, 100, 8, Device::Cpu).to_kind(Kind::Half),
        );
        assert!(from_wenet(half).unwrap().is_empty());
        // Another table is refused by name.
        let mut other = BTreeMap::new();
        other.insert(ENCODER_PE.to_string(), sinusoid(1, 100, 8, Device::Cpu));
        let e = from_wenet(other).unwrap_err();
        assert!(e.contains(ENCODER_PE) && e.contains("sinusoid"), "{e}");
        let mut shape = BTreeMap::new();
        shape.insert(
            "decoder.embed.1.pe".to_string(),
            Tensor::zeros([5000, 8], tch::kind::FLOAT_CPU),
        );
        assert!(from_wenet(shape).unwrap_err().contains("[1, max_len, d]"));
    }

    #[test]
    fn missing_expert_is_named() {
        let _rng = crate::test_rng::lock();
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
