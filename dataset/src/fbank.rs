//! Log-mel filterbank features computed exactly as Kaldi's `compute-fbank-feats`
//! (and so `kaldi-native-fbank` and `torchaudio.compliance.kaldi.fbank`, which WeNet
//! uses): povey window, pre-emphasis, DC removal, `snip_edges`, power spectrum,
//! triangular mel banks on Kaldi's mel scale, natural log floored at `f32::EPSILON`.
//!
//! Arithmetic follows Kaldi's single-precision choices (window in f64 stored as f32,
//! mel scale in f32) so that the result matches its reference within 1e-3 on real audio
//! (`tests/fbank_parity.rs` against goldens from `scripts/make_fbank_goldens.py`).

use std::sync::Arc;

use rand::Rng;
use rand_distr::StandardNormal;
use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

/// Options of the filterbank; the field names are WeNet's `fbank_conf` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FbankOptions {
    /// Number of mel bins (WeNet: 80).
    #[serde(default = "default_num_mel_bins")]
    pub num_mel_bins: usize,
    /// Frame length in milliseconds.
    #[serde(default = "default_frame_length")]
    pub frame_length: f32,
    /// Frame shift in milliseconds.
    #[serde(default = "default_frame_shift")]
    pub frame_shift: f32,
    /// Gaussian dither added to each sample at int16 scale (training only; 0 disables).
    #[serde(default)]
    pub dither: f32,
    /// Sample rate of the input in Hz.
    #[serde(default = "default_sample_rate", skip_serializing)]
    pub sample_rate: u32,
    /// WeNet's window choice; only `povey` (its default) is computed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_type: Option<String>,
}

fn default_num_mel_bins() -> usize {
    80
}
fn default_frame_length() -> f32 {
    25.0
}
fn default_frame_shift() -> f32 {
    10.0
}
fn default_sample_rate() -> u32 {
    crate::audio::SAMPLE_RATE
}

impl Default for FbankOptions {
    fn default() -> Self {
        Self {
            num_mel_bins: default_num_mel_bins(),
            frame_length: default_frame_length(),
            frame_shift: default_frame_shift(),
            dither: 0.0,
            sample_rate: default_sample_rate(),
            window_type: None,
        }
    }
}

const PREEMPH_COEFF: f32 = 0.97;
const LOW_FREQ: f32 = 20.0;

/// Kaldi's mel scale, in single precision as Kaldi computes it.
fn mel_scale(freq: f32) -> f32 {
    1127.0 * (1.0 + freq / 700.0).ln()
}

/// One triangular filter: weights for the FFT bins `first..first + weights.len()`.
#[derive(Debug, Clone)]
struct MelBin {
    first: usize,
    weights: Vec<f32>,
}

/// A reusable filterbank extractor: window, FFT plan and mel matrix computed once.
/// Cheap to clone (the FFT plan is shared); one per thread.
#[derive(Clone)]
pub struct Fbank {
    opts: FbankOptions,
    window_size: usize,
    window_shift: usize,
    padded_size: usize,
    window: Vec<f32>,
    mel_bins: Vec<MelBin>,
    // Double precision like kaldi-native-fbank's FFT: log-mel of quiet bands
    // (e.g. above 4 kHz in upsampled telephone audio) is sensitive to rounding.
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for Fbank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fbank").field("opts", &self.opts).finish()
    }
}

impl Fbank {
    /// Builds the extractor. Panics only on nonsensical options (zero-sized frames),
    /// which configuration validation rejects earlier.
    pub fn new(opts: FbankOptions) -> Self {
        let sr = opts.sample_rate as f32;
        let window_size = (sr * 0.001 * opts.frame_length) as usize;
        let window_shift = (sr * 0.001 * opts.frame_shift) as usize;
        assert!(
            window_size > 0 && window_shift > 0,
            "frame length and shift must be positive"
        );
        let padded_size = window_size.next_power_of_two();

        // Povey window: a Hann window raised to 0.85 (Kaldi computes it in double).
        let a = 2.0 * std::f64::consts::PI / (window_size as f64 - 1.0);
        let window = (0..window_size)
            .map(|i| (0.5 - 0.5 * (a * i as f64).cos()).powf(0.85) as f32)
            .collect();

        let mel_bins = Self::mel_bins(opts.num_mel_bins, padded_size, sr);
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(padded_size);
        Self {
            opts,
            window_size,
            window_shift,
            padded_size,
            window,
            mel_bins,
            fft,
        }
    }

    /// Kaldi's `MelBanks`: `num_bins` triangles evenly spaced on the mel scale between
    /// 20 Hz and Nyquist, over the FFT bins below Nyquist.
    fn mel_bins(num_bins: usize, padded_size: usize, sr: f32) -> Vec<MelBin> {
        let num_fft_bins = padded_size / 2;
        let nyquist = 0.5 * sr;
        let fft_bin_width = sr / padded_size as f32;
        let mel_low = mel_scale(LOW_FREQ);
        let mel_high = mel_scale(nyquist);
        let delta = (mel_high - mel_low) / (num_bins as f32 + 1.0);
        (0..num_bins)
            .map(|b| {
                let left = mel_low + b as f32 * delta;
                let center = mel_low + (b as f32 + 1.0) * delta;
                let right = mel_low + (b as f32 + 2.0) * delta;
                let mut first = None;
                let mut weights = Vec::new();
                for i in 0..num_fft_bins {
                    let mel = mel_scale(fft_bin_width * i as f32);
                    if mel > left && mel < right {
                        let w = if mel <= center {
                            (mel - left) / (center - left)
                        } else {
                            (right - mel) / (right - center)
                        };
                        first.get_or_insert(i);
                        weights.push(w);
                    }
                }
                MelBin {
                    first: first.unwrap_or(0),
                    weights,
                }
            })
            .collect()
    }

    /// The options this extractor was built with.
    pub fn options(&self) -> &FbankOptions {
        &self.opts
    }

    /// Number of mel bins per frame.
    pub fn dim(&self) -> usize {
        self.opts.num_mel_bins
    }

    /// Frames that `num_samples` samples give with `snip_edges` (no partial frames).
    pub fn num_frames(&self, num_samples: usize) -> usize {
        if num_samples < self.window_size {
            0
        } else {
            1 + (num_samples - self.window_size) / self.window_shift
        }
    }

    /// Features of `samples` (at int16 scale, as Kaldi and WeNet use), row-major
    /// `frames x num_mel_bins`. Dither, when enabled, draws from `rng`.
    pub fn compute<R: Rng + ?Sized>(&self, samples: &[f32], rng: &mut R) -> Vec<f32> {
        let frames = self.num_frames(samples.len());
        let dim = self.dim();
        let mut out = vec![0f32; frames * dim];
        let mut window = vec![0f32; self.window_size];
        let mut frame = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; self.padded_size / 2 + 1];
        for (f, row) in out.chunks_exact_mut(dim).enumerate() {
            let start = f * self.window_shift;
            let w = &mut window[..];
            w.copy_from_slice(&samples[start..start + self.window_size]);
            if self.opts.dither != 0.0 {
                for x in w.iter_mut() {
                    let g: f32 = rng.sample(StandardNormal);
                    *x += self.opts.dither * g;
                }
            }
            let mean = w.iter().sum::<f32>() / self.window_size as f32;
            w.iter_mut().for_each(|x| *x -= mean);
            for i in (1..self.window_size).rev() {
                w[i] -= PREEMPH_COEFF * w[i - 1];
            }
            w[0] -= PREEMPH_COEFF * w[0];
            for ((y, x), c) in frame.iter_mut().zip(w.iter()).zip(&self.window) {
                *y = (x * c) as f64;
            }
            frame[self.window_size..].fill(0.0);

            self.fft
                .process_with_scratch(&mut frame, &mut spectrum, &mut scratch)
                .expect("FFT buffers are sized by the plan");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = (c.re * c.re + c.im * c.im) as f32;
            }
            for (y, bin) in row.iter_mut().zip(&self.mel_bins) {
                let energy: f32 = bin
                    .weights
                    .iter()
                    .zip(&power[bin.first..])
                    .map(|(w, p)| w * p)
                    .sum();
                *y = energy.max(f32::EPSILON).ln();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn no_rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(0)
    }

    #[test]
    fn frame_count_follows_snip_edges() {
        let fb = Fbank::new(FbankOptions::default());
        assert_eq!(fb.num_frames(399), 0);
        assert_eq!(fb.num_frames(400), 1);
        assert_eq!(fb.num_frames(559), 1);
        assert_eq!(fb.num_frames(560), 2);
        assert_eq!(fb.num_frames(16000), 98);
    }

    #[test]
    fn mel_banks_match_kaldi_layout() {
        let fb = Fbank::new(FbankOptions::default());
        assert_eq!(fb.mel_bins.len(), 80);
        // Kaldi's first 16 kHz / 512-point bank starts at FFT bin 1 (31.25 Hz > 20 Hz).
        assert_eq!(fb.mel_bins[0].first, 1);
        // Every bank is a triangle with weights in (0, 1].
        for b in &fb.mel_bins {
            assert!(!b.weights.is_empty());
            assert!(b.weights.iter().all(|&w| w > 0.0 && w <= 1.0));
        }
        // The last bank ends below Nyquist (bin 256 is never used).
        let last = fb.mel_bins.last().unwrap();
        assert!(last.first + last.weights.len() <= 256);
    }

    #[test]
    fn a_tone_peaks_in_the_right_bank() {
        let fb = Fbank::new(FbankOptions::default());
        let tone: Vec<f32> = (0..16000)
            .map(|i| 10000.0 * (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin())
            .collect();
        let feats = fb.compute(&tone, &mut no_rng());
        let row = &feats[40 * 80..41 * 80];
        let argmax = (0..80).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        // 1 kHz on Kaldi's mel scale between 20 Hz and 8 kHz lies at about bin 23.
        let mel = |f: f32| 1127.0 * (1.0 + f / 700.0).ln();
        let expected = (mel(1000.0) - mel(20.0)) / ((mel(8000.0) - mel(20.0)) / 81.0) - 1.0;
        assert!(
            (argmax as f32 - expected).abs() <= 1.0,
            "{argmax} vs {expected}"
        );
    }

    #[test]
    fn silence_is_floored_not_minus_infinity() {
        let fb = Fbank::new(FbankOptions::default());
        let feats = fb.compute(&[0.0; 1600], &mut no_rng());
        assert!(feats.iter().all(|&x| x == f32::EPSILON.ln()));
    }

    #[test]
    fn dither_changes_features_and_is_reproducible() {
        let opts = FbankOptions {
            dither: 1.0,
            ..FbankOptions::default()
        };
        let fb = Fbank::new(opts);
        let x = vec![0.0; 1600];
        let a = fb.compute(&x, &mut ChaCha8Rng::seed_from_u64(7));
        let b = fb.compute(&x, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v > f32::EPSILON.ln()));
    }
}
