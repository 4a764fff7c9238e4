//! Decoding: CTC greedy search, CTC prefix beam search, and attention rescoring of the
//! CTC n-best with both decoders (WeNet's `search.py`).

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::asr::AsrModel;
use crate::moe::Routing;

/// One hypothesis: token ids (no blank, no sos/eos) and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Token ids.
    pub tokens: Vec<i64>,
    /// Log-probability score (meaning depends on the search).
    pub score: f64,
}

/// Best path per utterance: argmax per frame, repeats collapsed, blanks (id 0) dropped.
/// `log_probs` `[B, T, V]`, `lens` `[B]`.
pub fn ctc_greedy(log_probs: &Tensor, lens: &Tensor) -> Vec<Hypothesis> {
    let (best, idx) = log_probs.max_dim(-1, false);
    let b = log_probs.size()[0];
    let lens = Vec::<i64>::try_from(lens.to_kind(Kind::Int64)).expect("lengths");
    (0..b)
        .map(|i| {
            let n = lens[i as usize];
            let ids = Vec::<i64>::try_from(idx.get(i).narrow(0, 0, n)).expect("ids");
            let score = best
                .get(i)
                .narrow(0, 0, n)
                .sum(Kind::Double)
                .double_value(&[]);
            let mut tokens = Vec::new();
            let mut prev = -1;
            for id in ids {
                if id != prev && id != 0 {
                    tokens.push(id);
                }
                prev = id;
            }
            Hypothesis { tokens, score }
        })
        .collect()
}

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// CTC prefix beam search over one utterance's log-probabilities `[T, V]`: the
/// `beam` best label sequences with their total CTC log-probability.
pub fn ctc_prefix_beam_search(log_probs: &Tensor, beam: usize) -> Vec<Hypothesis> {
    let (t, v) = log_probs.size2().expect("[T, V]");
    let lp: Vec<f32> = Vec::<f32>::try_from(log_probs.to_kind(Kind::Float).contiguous().view([-1]))
        .expect("floats");
    // prefix -> (log p ending in blank, log p ending in non-blank)
    let mut beams: Vec<(Vec<i64>, (f64, f64))> = vec![(Vec::new(), (0.0, f64::NEG_INFINITY))];
    let k = beam.min(v as usize);
    for f in 0..t as usize {
        let row = &lp[f * v as usize..(f + 1) * v as usize];
        let mut top: Vec<usize> = (0..v as usize).collect();
        top.select_nth_unstable_by(k - 1, |a, b| row[*b].total_cmp(&row[*a]));
        top.truncate(k);
        let mut next: HashMap<Vec<i64>, (f64, f64)> = HashMap::new();
        for &u in &top {
            let p = row[u] as f64;
            for (prefix, (pb, pnb)) in &beams {
                let last = prefix.last().copied();
                if u == 0 {
                    let e = next
                        .entry(prefix.clone())
                        .or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                    e.0 = log_add(e.0, log_add(*pb, *pnb) + p);
                } else if Some(u as i64) == last {
                    // Repeat without blank: stays the same prefix...
                    let e = next
                        .entry(prefix.clone())
                        .or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                    e.1 = log_add(e.1, pnb + p);
                    // ...or, after a blank, extends it.
                    let mut ext = prefix.clone();
                    ext.push(u as i64);
                    let e = next
                        .entry(ext)
                        .or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                    e.1 = log_add(e.1, pb + p);
                } else {
                    let mut ext = prefix.clone();
                    ext.push(u as i64);
                    let e = next
                        .entry(ext)
                        .or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                    e.1 = log_add(e.1, log_add(*pb, *pnb) + p);
                }
            }
        }
        let mut all: Vec<(Vec<i64>, (f64, f64))> = next.into_iter().collect();
        all.sort_by(|a, b| {
            let sa = log_add(a.1 .0, a.1 .1);
            let sb = log_add(b.1 .0, b.1 .1);
            sb.total_cmp(&sa).then_with(|| a.0.cmp(&b.0))
        });
        all.truncate(beam);
        beams = all;
    }
    beams
        .into_iter()
        .map(|(tokens, (pb, pnb))| Hypothesis {
            tokens,
            score: log_add(pb, pnb),
        })
        .collect()
}

/// Attention rescoring of one utterance: the CTC n-best `hyps` are scored by the
/// left-to-right decoder (and the right-to-left one with `reverse_weight`), plus
/// `ctc_weight` times their CTC score; the best is returned. `encoder_out` `[1, T, d]`.
pub fn attention_rescoring(
    model: &AsrModel,
    encoder_out: &Tensor,
    hyps: &[Hypothesis],
    ctc_weight: f64,
    reverse_weight: f64,
) -> Hypothesis {
    if hyps.is_empty() {
        return Hypothesis {
            tokens: Vec::new(),
            score: f64::NEG_INFINITY,
        };
    }
    let dev = encoder_out.device();
    let n = hyps.len() as i64;
    let eos = model.sos_eos();
    let max_len = hyps.iter().map(|h| h.tokens.len()).max().unwrap_or(0) as i64;
    // <sos> y padded with eos, for each direction.
    let mut l2r = vec![eos; (n * (max_len + 1)) as usize];
    let mut r2l = l2r.clone();
    for (i, h) in hyps.iter().enumerate() {
        let row = i * (max_len as usize + 1);
        for (j, &tok) in h.tokens.iter().enumerate() {
            l2r[row + 1 + j] = tok;
            r2l[row + 1 + j] = h.tokens[h.tokens.len() - 1 - j];
        }
    }
    let lens: Vec<i64> = hyps.iter().map(|h| h.tokens.len() as i64 + 1).collect();
    let lens_t = Tensor::from_slice(&lens).to_device(dev);
    let memory = encoder_out.expand([n, -1, -1], false);
    let mask = Tensor::ones([n, 1, encoder_out.size()[1]], (Kind::Bool, dev));
    let score =
        |decoder: &crate::decoder::TransformerDecoder, ys: &[i64], reversed: bool| -> Vec<f64> {
            let ys_in = Tensor::from_slice(ys).view([n, max_len + 1]).to_device(dev);
            let logp = decoder
                .forward(&memory, &mask, &ys_in, &lens_t, false, &mut Routing::off())
                .log_softmax(-1, Kind::Float);
            hyps.iter()
                .enumerate()
                .map(|(i, h)| {
                    let row = logp.get(i as i64);
                    let mut s = 0.0;
                    for j in 0..h.tokens.len() {
                        let tok = if reversed {
                            h.tokens[h.tokens.len() - 1 - j]
                        } else {
                            h.tokens[j]
                        };
                        s += row.double_value(&[j as i64, tok]);
                    }
                    s + row.double_value(&[h.tokens.len() as i64, eos])
                })
                .collect()
        };
    let fwd = score(model.decoder().left(), &l2r, false);
    let bwd = match model.decoder().right().filter(|_| reverse_weight > 0.0) {
        Some(right) => score(right, &r2l, true),
        None => vec![0.0; hyps.len()],
    };
    hyps.iter()
        .enumerate()
        .map(|(i, h)| Hypothesis {
            tokens: h.tokens.clone(),
            score: fwd[i] * (1.0 - reverse_weight) + bwd[i] * reverse_weight + ctc_weight * h.score,
        })
        .max_by(|a, b| a.score.total_cmp(&b.score))
        .expect("non-empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log-probabilities from per-frame probability rows.
    fn lp(rows: &[&[f32]]) -> Tensor {
        let v = rows[0].len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().map(|p| p.ln())).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, v])
    }

    #[test]
    fn greedy_collapses_repeats_and_drops_blanks() {
        let _rng = crate::test_rng::lock();
        let x = lp(&[
            &[0.1, 0.8, 0.1],
            &[0.1, 0.8, 0.1],
            &[0.8, 0.1, 0.1],
            &[0.1, 0.8, 0.1],
            &[0.1, 0.1, 0.8],
        ]);
        let h = ctc_greedy(&x.unsqueeze(0), &Tensor::from_slice(&[5i64]));
        assert_eq!(h[0].tokens, vec![1, 1, 2]);
        // Length limits the frames read.
        let h = ctc_greedy(&x.unsqueeze(0), &Tensor::from_slice(&[2i64]));
        assert_eq!(h[0].tokens, vec![1]);
    }

    #[test]
    fn prefix_beam_finds_the_sequence_greedy_misses() {
        let _rng = crate::test_rng::lock();
        // Greedy path is blank-blank (p = 0.36) but "a" has total probability
        // 0.4*0.6 + 0.6*0.4 + 0.4*0.4 = 0.64 over its three alignments.
        let x = lp(&[&[0.6, 0.4], &[0.6, 0.4]]);
        let g = ctc_greedy(&x.unsqueeze(0), &Tensor::from_slice(&[2i64]));
        assert!(g[0].tokens.is_empty());
        let b = ctc_prefix_beam_search(&x, 4);
        assert_eq!(b[0].tokens, vec![1]);
        assert!((b[0].score - 0.64f64.ln()).abs() < 1e-6, "{}", b[0].score);
        assert!(b[1].tokens.is_empty());
        assert!((b[1].score - 0.36f64.ln()).abs() < 1e-6);
    }
}
