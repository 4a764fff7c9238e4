//! The Rust filterbank against kaldi-native-fbank 1.22.4 on real utterances of every
//! corpus (goldens made by `scripts/make_fbank_goldens.py`): max abs difference <= 1e-3.

use std::path::{Path, PathBuf};
use std::process::Command;

use upcycle_dataset::audio;
use upcycle_dataset::fbank::{Fbank, FbankOptions};
use upcycle_dataset::npy::read_f32;

const TOLERANCE: f32 = 1e-3;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/fbank")
}

/// Makes the 16 kHz input exactly as the golden script did.
fn input_16k(source: &str, how: &str, tmp: &Path) -> PathBuf {
    if how == "wav16k" {
        return PathBuf::from(source);
    }
    let mut src = PathBuf::from(source);
    if let Some(args) = how.strip_prefix("espeak:") {
        src = tmp.join("espeak.wav");
        let ok = Command::new("espeak-ng")
            .args(args.split_whitespace())
            .arg("-w")
            .arg(&src)
            .arg(source)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let out = tmp.join("in16k.wav");
    let ok = Command::new("sox")
        .args(["-D", "-R"])
        .arg(&src)
        .args(["-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("sox is installed by scripts/setup.sh");
    assert!(ok.success(), "sox failed on {source}");
    out
}

fn pcm_sha256(wav: &Path) -> String {
    // The data chunk of a canonical 16-bit WAV, hashed by the system tool.
    let samples = audio::read_model_input(wav).unwrap();
    let bytes: Vec<u8> = samples
        .iter()
        .flat_map(|&s| (s as i16).to_le_bytes())
        .collect();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &bytes).unwrap();
    let out = Command::new("sha256sum").arg(tmp.path()).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn fbank_matches_kaldi_native_fbank_on_real_audio() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap())
            .unwrap();
    let items = manifest["items"].as_array().unwrap();
    assert!(items.len() >= 5, "goldens cover every corpus");
    let fb = Fbank::new(FbankOptions::default());
    let mut worst = 0f32;
    for item in items {
        let name = item["name"].as_str().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let wav = input_16k(
            item["source"].as_str().unwrap(),
            item["how"].as_str().unwrap(),
            tmp.path(),
        );
        assert_eq!(
            pcm_sha256(&wav),
            item["pcm_sha256"].as_str().unwrap(),
            "{name}: the 16 kHz input differs from the one the goldens were made from \
             (another sox/espeak-ng version?); regenerate with scripts/make_fbank_goldens.py"
        );
        let samples = audio::read_model_input(&wav).unwrap();
        let ours = fb.compute(&samples, &mut rand::rng());
        let want = read_f32(&golden_dir().join(format!("{name}.npy"))).unwrap();
        assert_eq!(ours.len(), want.len(), "{name}: frame count");
        assert_eq!(ours.len() / 80, item["frames"].as_u64().unwrap() as usize);
        let diff = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: {} frames, max abs diff {diff:.2e}",
            ours.len() / 80
        );
        assert!(
            diff <= TOLERANCE,
            "{name}: max abs diff {diff} > {TOLERANCE}"
        );
        worst = worst.max(diff);
    }
    eprintln!("worst max abs diff over all goldens: {worst:.2e}");
}
