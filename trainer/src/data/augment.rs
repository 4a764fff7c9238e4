//! Training-time augmentation: SpecAugment masks and speed perturbation choices, both
//! drawn from a caller-provided RNG so that a batch is reproducible from its seed.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// SpecAugment options; WeNet's `spec_aug_conf` keys and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecAugConf {
    /// Number of time masks.
    #[serde(default = "two")]
    pub num_t_mask: usize,
    /// Number of frequency masks.
    #[serde(default = "two")]
    pub num_f_mask: usize,
    /// Longest time mask, frames.
    #[serde(default = "fifty")]
    pub max_t: usize,
    /// Widest frequency mask, bins.
    #[serde(default = "ten")]
    pub max_f: usize,
}

fn two() -> usize {
    2
}
fn fifty() -> usize {
    50
}
fn ten() -> usize {
    10
}

impl Default for SpecAugConf {
    fn default() -> Self {
        Self {
            num_t_mask: 2,
            num_f_mask: 2,
            max_t: 50,
            max_f: 10,
        }
    }
}

/// Zeroes random time and frequency bands of row-major `frames x dim` features, as
/// WeNet's `spec_aug` does (start uniform over the axis, width uniform in 1..=max).
pub fn spec_augment<R: Rng + ?Sized>(
    feats: &mut [f32],
    dim: usize,
    conf: &SpecAugConf,
    rng: &mut R,
) {
    let frames = feats.len() / dim;
    if frames == 0 {
        return;
    }
    for _ in 0..conf.num_t_mask {
        let start = rng.random_range(0..frames);
        let end = (start + rng.random_range(1..=conf.max_t.max(1))).min(frames);
        feats[start * dim..end * dim].fill(0.0);
    }
    for _ in 0..conf.num_f_mask {
        let start = rng.random_range(0..dim);
        let end = (start + rng.random_range(1..=conf.max_f.max(1))).min(dim);
        for row in feats.chunks_exact_mut(dim) {
            row[start..end].fill(0.0);
        }
    }
}

/// The speed factors WeNet's `speed_perturb` chooses from, uniformly.
pub const SPEEDS: [f32; 3] = [0.9, 1.0, 1.1];

/// Draws a speed factor.
pub fn draw_speed<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    SPEEDS[rng.random_range(0..SPEEDS.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn masks_stay_within_limits() {
        let conf = SpecAugConf::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            let mut x = vec![1.0f32; 200 * 80];
            spec_augment(&mut x, 80, &conf, &mut rng);
            let zero_rows = x.chunks(80).filter(|r| r.iter().all(|&v| v == 0.0)).count();
            let zero_cols = (0..80)
                .filter(|&c| x.iter().skip(c).step_by(80).all(|&v| v == 0.0))
                .count();
            assert!((1..=2 * 50).contains(&zero_rows), "{zero_rows}");
            assert!((1..=2 * 10).contains(&zero_cols), "{zero_cols}");
        }
    }
}
