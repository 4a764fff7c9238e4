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
    /// WeNet's time-warp width, which its `spec_aug` takes but does not use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_w: Option<usize>,
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
            max_w: None,
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

/// WeNet's `spec_sub_conf` (U2++, section 3.2.3): time substitution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecSubConf {
    /// Longest substituted span, frames.
    #[serde(default = "twenty")]
    pub max_t: usize,
    /// Number of substitutions.
    #[serde(default = "three")]
    pub num_t_sub: usize,
}

/// WeNet's `spec_trim_conf` (TrimTail, arXiv 2211.00522): trailing frames dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecTrimConf {
    /// Most frames trimmed.
    #[serde(default = "twenty")]
    pub max_t: usize,
}

fn twenty() -> usize {
    20
}
fn three() -> usize {
    3
}

impl Default for SpecSubConf {
    fn default() -> Self {
        Self {
            max_t: twenty(),
            num_t_sub: three(),
        }
    }
}

impl Default for SpecTrimConf {
    fn default() -> Self {
        Self { max_t: twenty() }
    }
}

/// Replaces random time spans by earlier spans of the same features, as WeNet's
/// `spec_sub` does: each span starts uniform over the frames, is 1..=max_t long, and
/// copies the frames `pos` earlier (`pos` uniform in 0..=start) from the input as it
/// was before any substitution.
pub fn spec_substitute<R: Rng + ?Sized>(
    feats: &mut [f32],
    dim: usize,
    conf: &SpecSubConf,
    rng: &mut R,
) {
    let frames = feats.len() / dim;
    if frames == 0 {
        return;
    }
    let original = feats.to_vec();
    for _ in 0..conf.num_t_sub {
        let start = rng.random_range(0..frames);
        let end = (start + rng.random_range(1..=conf.max_t.max(1))).min(frames);
        let pos = rng.random_range(0..=start);
        feats[start * dim..end * dim]
            .copy_from_slice(&original[(start - pos) * dim..(end - pos) * dim]);
    }
}

/// How many trailing frames WeNet's `spec_trim` drops from `frames` frames: a width
/// drawn in 1..=max_t, applied only when it is below half the utterance.
pub fn spec_trim_frames<R: Rng + ?Sized>(frames: usize, conf: &SpecTrimConf, rng: &mut R) -> usize {
    let width = rng.random_range(1..=conf.max_t.max(1));
    if (width as f64) < frames as f64 / 2.0 {
        width
    } else {
        0
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
    fn substitution_copies_earlier_frames_of_the_input() {
        let dim = 3;
        let frames = 40;
        let input: Vec<f32> = (0..frames * dim).map(|i| (i / dim) as f32).collect();
        let conf = SpecSubConf::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut changed = 0;
        for _ in 0..50 {
            let mut x = input.clone();
            spec_substitute(&mut x, dim, &conf, &mut rng);
            for (t, row) in x.chunks(dim).enumerate() {
                // Every frame is a whole frame of the input from no later than itself.
                assert!(row.iter().all(|&v| v == row[0]), "{row:?}");
                assert!(
                    row[0] as usize <= t,
                    "frame {t} took a later frame {}",
                    row[0]
                );
                changed += usize::from(row[0] as usize != t);
            }
        }
        assert!(changed > 0, "nothing was substituted");
    }

    #[test]
    fn trimming_drops_at_most_max_t_and_less_than_half() {
        let conf = SpecTrimConf { max_t: 50 };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let short: Vec<usize> = (0..200)
            .map(|_| spec_trim_frames(20, &conf, &mut rng))
            .collect();
        assert!(
            short.iter().all(|&n| n < 10) && short.contains(&0) && short.iter().any(|&n| n > 0)
        );
        let long: Vec<usize> = (0..200)
            .map(|_| spec_trim_frames(1000, &conf, &mut rng))
            .collect();
        assert!(long.iter().all(|&n| (1..=50).contains(&n)));
    }

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
