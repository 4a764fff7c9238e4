//! Benchmarks of the Rust side; `bench/` holds the scripts that run them beside their
//! peers and print ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::data::audio;
use crate::data::fbank::{Fbank, FbankOptions};

/// One timing of the filterbank over a set of files.
#[derive(Debug, Serialize)]
pub struct FbankTiming {
    /// Frames computed per repetition.
    pub frames: usize,
    /// Seconds of audio per repetition.
    pub audio_seconds: f64,
    /// Wall seconds of each repetition (audio already in memory).
    pub seconds: Vec<f64>,
    /// Median frames per second.
    pub frames_per_second: f64,
}

/// Times feature extraction of `files` (already decoded) on one thread, `repeat` times.
pub fn fbank(files: &[PathBuf], repeat: usize) -> Result<FbankTiming> {
    let audio: Vec<Vec<f32>> = files
        .iter()
        .map(|f| audio::read_model_input(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display())))
        .collect::<Result<_>>()?;
    let fb = Fbank::new(FbankOptions::default());
    let frames: usize = audio.iter().map(|a| fb.num_frames(a.len())).sum();
    let audio_seconds =
        audio.iter().map(|a| a.len()).sum::<usize>() as f64 / audio::SAMPLE_RATE as f64;
    let mut rng = rand::rng();
    let mut seconds = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let mut sink = 0f32;
        for a in &audio {
            sink += fb.compute(a, &mut rng)[0];
        }
        std::hint::black_box(sink);
        seconds.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(FbankTiming {
        frames,
        audio_seconds,
        seconds,
        frames_per_second: frames as f64 / median,
    })
}
