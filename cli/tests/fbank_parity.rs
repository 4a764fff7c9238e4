//! `upcycle data fbank` writes the same features as the goldens (made by
//! `scripts/make_fbank_goldens.py` with kaldi-native-fbank 1.22.4) into a `.npy` file.
//! The filterbank itself is checked against every golden in `data/tests/fbank_parity.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

const TOLERANCE: f32 = 1e-3;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/fbank")
}

/// Reads a float32 C-order .npy of any shape (as numpy.save writes it).
fn read_npy_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("False"),
        "{header}"
    );
    b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
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
    let ours = read_npy_f32(&out);
    let want = read_npy_f32(&golden_dir().join(format!("{item}.npy")));
    let diff = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(ours.len(), want.len());
    assert!(diff <= TOLERANCE);
}
