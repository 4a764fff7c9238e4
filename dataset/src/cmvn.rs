//! Global CMVN statistics in WeNet's `global_cmvn` JSON form
//! (`mean_stat`, `var_stat`, `frame_num`), accumulated in f64.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Running sums of features and their squares over all frames of a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CmvnStats {
    /// Per-dimension sum of features.
    pub mean_stat: Vec<f64>,
    /// Per-dimension sum of squared features.
    pub var_stat: Vec<f64>,
    /// Number of frames summed.
    pub frame_num: u64,
}

impl CmvnStats {
    /// Empty statistics for `dim`-dimensional features.
    pub fn new(dim: usize) -> Self {
        Self {
            mean_stat: vec![0.0; dim],
            var_stat: vec![0.0; dim],
            frame_num: 0,
        }
    }

    /// Adds the frames of row-major `frames x dim` features.
    pub fn accumulate(&mut self, feats: &[f32]) {
        let dim = self.mean_stat.len();
        for row in feats.chunks_exact(dim) {
            for ((m, v), &x) in self.mean_stat.iter_mut().zip(&mut self.var_stat).zip(row) {
                let x = x as f64;
                *m += x;
                *v += x * x;
            }
            self.frame_num += 1;
        }
    }

    /// Adds another accumulator (from another thread or shard).
    pub fn merge(&mut self, other: &CmvnStats) {
        for (a, b) in self.mean_stat.iter_mut().zip(&other.mean_stat) {
            *a += b;
        }
        for (a, b) in self.var_stat.iter_mut().zip(&other.var_stat) {
            *a += b;
        }
        self.frame_num += other.frame_num;
    }

    /// Mean and inverse standard deviation per dimension, as WeNet's `load_cmvn`
    /// computes them (variance floored at 1e-20).
    pub fn mean_istd(&self) -> (Vec<f32>, Vec<f32>) {
        let n = self.frame_num.max(1) as f64;
        let mean: Vec<f64> = self.mean_stat.iter().map(|s| s / n).collect();
        let istd = self
            .var_stat
            .iter()
            .zip(&mean)
            .map(|(v, m)| (1.0 / (v / n - m * m).max(1e-20).sqrt()) as f32)
            .collect();
        (mean.into_iter().map(|m| m as f32).collect(), istd)
    }

    /// Writes the JSON file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, serde_json::to_string(self)?)
    }

    /// Reads the JSON file, checking that the sums have one dimension.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read CMVN file {}: {e}", path.display()))?;
        let s: CmvnStats = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a WeNet global_cmvn JSON file: {e}",
                path.display()
            )
        })?;
        anyhow::ensure!(
            s.mean_stat.len() == s.var_stat.len() && !s.mean_stat.is_empty(),
            "{}: mean_stat and var_stat must be non-empty and of equal length",
            path.display()
        );
        Ok(s)
    }
}

/// Applies `(x - mean) * istd` in place to row-major features.
pub fn apply(feats: &mut [f32], mean: &[f32], istd: &[f32]) {
    for row in feats.chunks_exact_mut(mean.len()) {
        for ((x, m), s) in row.iter_mut().zip(mean).zip(istd) {
            *x = (*x - m) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_features_have_zero_mean_unit_variance() {
        let feats: Vec<f32> = (0..300)
            .map(|i| (i % 7) as f32 * 1.5 + (i % 3) as f32)
            .collect();
        let mut half = CmvnStats::new(3);
        half.accumulate(&feats[..150]);
        let mut other = CmvnStats::new(3);
        other.accumulate(&feats[150..]);
        half.merge(&other);
        let mut all = CmvnStats::new(3);
        all.accumulate(&feats);
        assert_eq!(half, all);

        let (mean, istd) = all.mean_istd();
        let mut x = feats.clone();
        apply(&mut x, &mean, &istd);
        for d in 0..3 {
            let col: Vec<f32> = x.iter().skip(d).step_by(3).copied().collect();
            let m = col.iter().sum::<f32>() / col.len() as f32;
            let v = col.iter().map(|c| (c - m) * (c - m)).sum::<f32>() / col.len() as f32;
            assert!(m.abs() < 1e-4 && (v - 1.0).abs() < 1e-3, "dim {d}: {m} {v}");
        }
    }
}
