//! Audio: WAV reading and writing (via `hound`), header checks that find broken files
//! without decoding them, and band-limited resampling.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use thiserror::Error;

/// The sample rate every model input has.
pub const SAMPLE_RATE: u32 = 16_000;

/// Why an audio file cannot be used. Each variant is one counted kind of bad input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AudioError {
    /// The file does not exist or cannot be opened.
    #[error("missing or unreadable: {0}")]
    Missing(String),
    /// The file has zero bytes.
    #[error("empty file")]
    Empty,
    /// The file is not a WAV file hound can read (or is not audio at all).
    #[error("not a readable WAV file: {0}")]
    NotAudio(String),
    /// The header promises more sample data than the file holds.
    #[error("truncated: header says {expected} data bytes, file holds at most {actual}")]
    Truncated {
        /// Bytes of sample data the header declares.
        expected: u64,
        /// Bytes the file can hold after the smallest possible header.
        actual: u64,
    },
    /// The file has no samples.
    #[error("no samples")]
    NoSamples,
    /// The sample rate is not the one expected.
    #[error("sample rate {found} Hz, expected {expected} Hz (run `upcycle data prepare --corpus dir` to convert)")]
    WrongSampleRate {
        /// Rate in the header.
        found: u32,
        /// Rate required.
        expected: u32,
    },
    /// More than one channel where mono is required.
    #[error("{0} channels, expected mono (run `upcycle data prepare --corpus dir` to convert)")]
    NotMono(u16),
}

impl AudioError {
    /// A short stable name for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            AudioError::Missing(_) => "missing file",
            AudioError::Empty => "empty file",
            AudioError::NotAudio(_) => "not audio",
            AudioError::Truncated { .. } => "truncated audio",
            AudioError::NoSamples => "no samples",
            AudioError::WrongSampleRate { .. } => "wrong sample rate",
            AudioError::NotMono(_) => "not mono",
        }
    }
}

/// What a WAV header says, after checking it against the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    /// Samples per channel.
    pub num_samples: usize,
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Channel count.
    pub channels: u16,
}

impl WavInfo {
    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.num_samples as f64 / self.sample_rate as f64
    }
}

/// The smallest WAV header: RIFF (12) + `fmt ` chunk (8 + 16) + `data` header (8).
const MIN_WAV_HEADER: u64 = 44;

fn open(path: &Path) -> Result<(hound::WavReader<BufReader<File>>, u64), AudioError> {
    let meta = std::fs::metadata(path).map_err(|e| AudioError::Missing(e.to_string()))?;
    if meta.len() == 0 {
        return Err(AudioError::Empty);
    }
    let reader = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::IoError(io) => AudioError::NotAudio(io.to_string()),
        other => AudioError::NotAudio(other.to_string()),
    })?;
    Ok((reader, meta.len()))
}

/// Reads and checks a WAV header without decoding samples: finds missing, empty,
/// non-audio and truncated files.
pub fn probe(path: &Path) -> Result<WavInfo, AudioError> {
    let (reader, file_len) = open(path)?;
    let spec = reader.spec();
    let frames = reader.duration() as u64;
    let data_bytes = frames * spec.channels as u64 * (spec.bits_per_sample as u64).div_ceil(8);
    if data_bytes + MIN_WAV_HEADER > file_len {
        return Err(AudioError::Truncated {
            expected: data_bytes,
            actual: file_len.saturating_sub(MIN_WAV_HEADER),
        });
    }
    if frames == 0 {
        return Err(AudioError::NoSamples);
    }
    Ok(WavInfo {
        num_samples: frames as usize,
        sample_rate: spec.sample_rate,
        channels: spec.channels,
    })
}

/// Checks that a probed file is what the model consumes: mono at [`SAMPLE_RATE`].
pub fn check_model_input(info: &WavInfo) -> Result<(), AudioError> {
    if info.sample_rate != SAMPLE_RATE {
        return Err(AudioError::WrongSampleRate {
            found: info.sample_rate,
            expected: SAMPLE_RATE,
        });
    }
    if info.channels != 1 {
        return Err(AudioError::NotMono(info.channels));
    }
    Ok(())
}

/// Decoded audio: interleaved channels at int16 scale (so a full-scale 16-bit sample is
/// 32767), as Kaldi and WeNet feed their filterbanks.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Interleaved samples at int16 scale.
    pub samples: Vec<f32>,
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Channel count.
    pub channels: u16,
}

impl Audio {
    /// The average of the channels (the samples themselves when mono).
    pub fn into_mono(self) -> Vec<f32> {
        let c = self.channels as usize;
        if c == 1 {
            return self.samples;
        }
        self.samples
            .chunks_exact(c)
            .map(|f| f.iter().sum::<f32>() / c as f32)
            .collect()
    }
}

/// Reads a whole WAV file (PCM 8..32 bit or float) at int16 scale.
pub fn read_wav(path: &Path) -> Result<Audio, AudioError> {
    probe(path)?;
    let (reader, _) = open(path)?;
    let spec = reader.spec();
    let truncated = |e: hound::Error| AudioError::NotAudio(format!("while decoding: {e}"));
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .map(|s| s.map(|v| v * 32768.0))
            .collect::<Result<_, _>>()
            .map_err(truncated)?,
        hound::SampleFormat::Int => {
            let scale = 2f32.powi(16 - spec.bits_per_sample as i32);
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(truncated)?
        }
    };
    Ok(Audio {
        samples,
        sample_rate: spec.sample_rate,
        channels: spec.channels,
    })
}

/// Reads a model input: a mono WAV at [`SAMPLE_RATE`], at int16 scale.
pub fn read_model_input(path: &Path) -> Result<Vec<f32>, AudioError> {
    let info = probe(path)?;
    check_model_input(&info)?;
    Ok(read_wav(path)?.samples)
}

/// Writes mono samples (int16 scale) as a 16-bit PCM WAV, rounding and clipping.
pub fn write_wav_i16(path: &Path, samples: &[f32], sample_rate: u32) -> std::io::Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).map_err(std::io::Error::other)?;
    for &s in samples {
        let v = s.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16;
        w.write_sample(v).map_err(std::io::Error::other)?;
    }
    w.finalize().map_err(std::io::Error::other)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Band-limited resampling by a rational ratio with a Hann-windowed sinc kernel, the
/// method of `torchaudio.functional.resample` (6 zero crossings, roll-off 0.99).
/// The output has `ceil(len * to / from)` samples.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || samples.is_empty() {
        return samples.to_vec();
    }
    let g = gcd(from, to);
    let (orig, new) = ((from / g) as usize, (to / g) as usize);
    const WIDTH_ZEROS: f64 = 6.0;
    const ROLLOFF: f64 = 0.99;
    let base = ROLLOFF * orig.min(new) as f64;
    let width = (WIDTH_ZEROS * orig as f64 / base).ceil() as i64;
    let taps = (2 * width + orig as i64) as usize;
    let scale = base / orig as f64;
    // kernel[phase][k] weights input sample (block * orig - width + k) for output
    // sample (block * new + phase).
    let kernel: Vec<Vec<f32>> = (0..new)
        .map(|phase| {
            (0..taps)
                .map(|k| {
                    let idx = k as f64 - width as f64;
                    let t = (-(phase as f64) / new as f64 + idx / orig as f64) * base;
                    let t = t.clamp(-WIDTH_ZEROS, WIDTH_ZEROS);
                    let window = (t * std::f64::consts::PI / WIDTH_ZEROS / 2.0).cos().powi(2);
                    let t = t * std::f64::consts::PI;
                    let sinc = if t == 0.0 { 1.0 } else { t.sin() / t };
                    (sinc * window * scale) as f32
                })
                .collect()
        })
        .collect();
    let out_len = (samples.len() * new).div_ceil(orig);
    let n = samples.len() as i64;
    (0..out_len)
        .map(|j| {
            let (block, phase) = (j / new, j % new);
            let start = (block * orig) as i64 - width;
            kernel[phase]
                .iter()
                .enumerate()
                .map(|(k, w)| {
                    let i = start + k as i64;
                    if (0..n).contains(&i) {
                        w * samples[i as usize]
                    } else {
                        0.0
                    }
                })
                .sum()
        })
        .collect()
}

/// Speed perturbation as WeNet does it with sox's `speed`: tempo and pitch change
/// together, the length becomes `len / factor`.
pub fn change_speed(samples: &[f32], factor: f32) -> Vec<f32> {
    if factor == 1.0 {
        return samples.to_vec();
    }
    // Pretend the audio was recorded at `SAMPLE_RATE * factor` and resample to 16 kHz.
    let from = (SAMPLE_RATE as f32 * factor).round() as u32;
    resample(samples, from, SAMPLE_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, rate: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| 1000.0 * (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin())
            .collect()
    }

    fn max_err_inside(a: &[f32], b: &[f32], margin: usize) -> f32 {
        a[margin..a.len() - margin]
            .iter()
            .zip(&b[margin..])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn upsampling_keeps_a_tone() {
        let x = sine(440.0, 8000, 8000);
        let y = resample(&x, 8000, 16000);
        assert_eq!(y.len(), 16000);
        let want = sine(440.0, 16000, 16000);
        // 1000-amplitude tone: within 0.5% away from the edges.
        assert!(max_err_inside(&y, &want, 200) < 5.0);
    }

    #[test]
    fn downsampling_keeps_a_tone_and_removes_what_cannot_be_kept() {
        let x = sine(1000.0, 22050, 22050);
        let y = resample(&x, 22050, 16000);
        assert_eq!(y.len(), 16000);
        assert!(max_err_inside(&y, &sine(1000.0, 16000, 16000), 200) < 5.0);
        // 10 kHz is above the new Nyquist: it must vanish, not alias.
        let hi = resample(&sine(10000.0, 22050, 22050), 22050, 16000);
        let rms = (hi[200..15800].iter().map(|v| v * v).sum::<f32>() / 15600.0).sqrt();
        assert!(rms < 10.0, "aliasing rms {rms}");
    }

    #[test]
    fn speed_changes_length() {
        let x = vec![0.0; 16000];
        assert_eq!(change_speed(&x, 1.1).len(), 14546);
        assert_eq!(change_speed(&x, 0.9).len(), 17778);
        assert_eq!(change_speed(&x, 1.0).len(), 16000);
    }

    #[test]
    fn wav_roundtrip_and_header_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.wav");
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 3.0).collect();
        write_wav_i16(&p, &x, 16000).unwrap();
        let info = probe(&p).unwrap();
        assert_eq!(info.num_samples, 1000);
        assert_eq!(read_model_input(&p).unwrap(), x);

        // Truncated: cut the data in half.
        let bytes = std::fs::read(&p).unwrap();
        let t = dir.path().join("t.wav");
        std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(probe(&t), Err(AudioError::Truncated { .. })));
        // Empty, missing, not audio.
        let e = dir.path().join("e.wav");
        std::fs::write(&e, b"").unwrap();
        assert_eq!(probe(&e), Err(AudioError::Empty));
        assert!(matches!(
            probe(&dir.path().join("nope.wav")),
            Err(AudioError::Missing(_))
        ));
        let n = dir.path().join("n.wav");
        std::fs::write(&n, b"this is a text file, not a RIFF header at all").unwrap();
        assert!(matches!(probe(&n), Err(AudioError::NotAudio(_))));
        // Wrong rate.
        let r = dir.path().join("r.wav");
        write_wav_i16(&r, &x, 8000).unwrap();
        assert!(matches!(
            read_model_input(&r),
            Err(AudioError::WrongSampleRate { found: 8000, .. })
        ));
    }
}
