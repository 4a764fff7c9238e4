//! Writing NumPy `.npy` files (version 1.0, little-endian float32, C order): enough
//! for `numpy.load` to read features for inspection and comparison.

use std::io::Write;
use std::path::Path;

/// Writes a 2-D float32 array of `rows x cols` (row-major `data`).
pub fn write_f32_2d(path: &Path, data: &[f32], rows: usize, cols: usize) -> std::io::Result<()> {
    assert_eq!(data.len(), rows * cols, "npy shape does not match the data");
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for v in data {
        out.write_all(&v.to_le_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_is_aligned_and_data_follows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        super::write_f32_2d(&p, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3).unwrap();
        let b = std::fs::read(&p).unwrap();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert!(std::str::from_utf8(&b[10..10 + hlen])
            .unwrap()
            .contains("(2, 3)"));
        assert_eq!(&b[10 + hlen..10 + hlen + 4], &1f32.to_le_bytes());
        assert_eq!(b.len(), 10 + hlen + 24);
    }
}
