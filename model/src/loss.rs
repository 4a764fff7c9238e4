//! Target preparation and the attention loss (WeNet's `add_sos_eos`,
//! `reverse_pad_list`, `LabelSmoothingLoss`).

use tch::{Kind, Tensor};

/// The id that pads targets.
pub const IGNORE_ID: i64 = -1;

/// `(ys_in, ys_out)`: `<sos> y` padded with `eos`, and `y <eos>` padded with
/// [`IGNORE_ID`], `[B, L+1]`, from `ys` `[B, L]` padded with [`IGNORE_ID`] to its longest
/// row (as batches are) and lengths `[B]`. The width comes from the shape, not from the
/// lengths' maximum, so that the training step does not wait to read it.
pub fn add_sos_eos(ys: &Tensor, ys_lens: &Tensor, sos: i64, eos: i64) -> (Tensor, Tensor) {
    let (b, l) = ys.size2().expect("2-d targets");
    let dev = ys.device();
    let col = Tensor::arange(l + 1, (Kind::Int64, dev)).unsqueeze(0); // [1, L+1]
    let lens = ys_lens.unsqueeze(1);
    let padded = Tensor::cat(
        &[
            ys.shallow_clone(),
            Tensor::full([b, 1], IGNORE_ID, (Kind::Int64, dev)),
        ],
        1,
    );
    let shifted = Tensor::cat(
        &[
            Tensor::full([b, 1], sos, (Kind::Int64, dev)),
            ys.shallow_clone(),
        ],
        1,
    );
    // ys_in[j] = sos at 0, y[j-1] for j <= len, eos after.
    let ys_in = shifted.where_self(
        &col.le_tensor(&lens),
        &Tensor::full([b, l + 1], eos, (Kind::Int64, dev)),
    );
    // ys_out[j] = y[j] for j < len, eos at len, ignore after.
    let ys_out = padded
        .where_self(
            &col.lt_tensor(&lens),
            &Tensor::full([b, l + 1], IGNORE_ID, (Kind::Int64, dev)),
        )
        .masked_fill(&col.eq_tensor(&lens), eos);
    (ys_in, ys_out)
}

/// Each row's first `len` entries reversed, the rest `pad`.
pub fn reverse_pad_list(ys: &Tensor, ys_lens: &Tensor, pad: i64) -> Tensor {
    let (b, l) = ys.size2().expect("2-d targets");
    let dev = ys.device();
    let col = Tensor::arange(l, (Kind::Int64, dev)).unsqueeze(0);
    let lens = ys_lens.unsqueeze(1);
    let src = (&lens - 1 - &col).clamp_min(0);
    let gathered = ys.gather(1, &src, false);
    gathered.where_self(
        &col.lt_tensor(&lens),
        &Tensor::full([b, l], pad, (Kind::Int64, dev)),
    )
}

/// Label-smoothed cross entropy as WeNet's `LabelSmoothingLoss`: KL divergence to a
/// target distribution with `1 - smoothing` on the label and `smoothing / (V - 1)`
/// elsewhere, summed over non-padding positions and divided by the batch size (or by
/// the number of tokens when `normalize_length`).
pub fn label_smoothing_loss(
    logits: &Tensor,
    target: &Tensor,
    smoothing: f64,
    normalize_length: bool,
) -> Tensor {
    let (b, _, v) = logits.size3().expect("3-d logits");
    let x = logits.view([-1, v]);
    let t = target.view([-1]);
    let ignore = t.eq(IGNORE_ID);
    let t = t.masked_fill(&ignore, 0);
    let confidence = 1.0 - smoothing;
    let low = smoothing / (v - 1) as f64;
    let true_dist = Tensor::full([x.size()[0], v], low, (Kind::Float, x.device())).scatter_value(
        1,
        &t.unsqueeze(1),
        confidence,
    );
    let logp = x.log_softmax(1, Kind::Float);
    // xlogy-style: a zero target probability contributes zero.
    let plogp = if low > 0.0 {
        &true_dist * true_dist.log()
    } else {
        (&true_dist * true_dist.clamp_min(1e-30).log()).masked_fill(&true_dist.eq(0.0), 0.0)
    };
    let kl = (plogp - &true_dist * logp).masked_fill(&ignore.unsqueeze(1), 0.0);
    if normalize_length {
        // Counted on the device: the step does not wait for it.
        let tokens = ignore.logical_not().sum(Kind::Float).clamp_min(1.0);
        kl.sum(Kind::Float) / tokens
    } else {
        kl.sum(Kind::Float) / b as f64
    }
}

/// Knowledge distillation (Bai et al.): mean over real frames of the mean squared
/// difference between student and teacher encoder outputs `[B, T, d]` (mask `[B, 1, T]`).
pub fn distillation_loss(student: &Tensor, teacher: &Tensor, mask: &Tensor) -> Tensor {
    // In fp32 whatever the encoders ran in (bf16 under autocast).
    let (student, teacher) = (student.to_kind(Kind::Float), teacher.to_kind(Kind::Float));
    let valid = mask.transpose(1, 2).to_kind(Kind::Float);
    let frames = valid.sum(Kind::Float).clamp_min(1.0);
    let per_frame = (student - teacher).square().mean_dim(-1, true, Kind::Float);
    (per_frame * valid).sum(Kind::Float) / frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn sos_eos_and_reverse_as_wenet() {
        let _rng = crate::test_rng::lock();
        let ys = Tensor::from_slice(&[1i64, 2, 3, 4, 5, -1, -1, -1]).view([2, 4]);
        let lens = Tensor::from_slice(&[4i64, 1]);
        let (yin, yout) = add_sos_eos(&ys, &lens, 10, 11);
        assert_eq!(v(&yin), vec![10, 1, 2, 3, 4, 10, 5, 11, 11, 11]);
        assert_eq!(v(&yout), vec![1, 2, 3, 4, 11, 5, 11, -1, -1, -1]);
        let r = reverse_pad_list(&ys, &lens, -1);
        assert_eq!(v(&r), vec![4, 3, 2, 1, 5, -1, -1, -1]);
    }

    #[test]
    fn label_smoothing_without_smoothing_is_cross_entropy() {
        let _rng = crate::test_rng::lock();
        let logits = Tensor::from_slice(&[0.1f32, 2.0, -1.0, 0.5, 0.3, 0.2]).view([1, 2, 3]);
        let target = Tensor::from_slice(&[1i64, -1]).view([1, 2]);
        let got = label_smoothing_loss(&logits, &target, 0.0, false).double_value(&[]);
        let lse = (0.1f64.exp() + 2f64.exp() + (-1f64).exp()).ln();
        assert!((got - (lse - 2.0)).abs() < 1e-5, "{got}");
    }
}
