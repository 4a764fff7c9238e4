//! `upcycle data fbank` writes the same features as the goldens (made by
//! `scripts/make_fbank_goldens.py` with kaldi-native-fbank 1.22.4) into a `.npy` file.
//! The filterbank itself is checked against every golden in `dataset/tests/fbank_parity.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use upcycle_dataset::npy::read_f32;

const TOLERANCE: f32 = 1e-3;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/fbank")
}

#[test]
fn fbank_command_writes_the_same_features_as_npy() {
    let item = "cards-001";
    let src = "/usr/share/pocketsphinx/test/data/cards/001.wav";
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f.npy");
    let st = Command::new(env!("CARGO_BIN_EXE_upcycle"))
        .args(["data", "fbank", src, "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let ours = read_f32(&out).unwrap();
    let want = read_f32(&golden_dir().join(format!("{item}.npy"))).unwrap();
    let diff = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(ours.len(), want.len());
    assert!(diff <= TOLERANCE);
}
