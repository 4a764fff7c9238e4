//! NumPy `.npy` files of little-endian float32 in C order (version 1.0 written; 1.0 to
//! 3.0 read): features for inspection, and reference features (`numpy.save`) to compare
//! with.

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

/// Reads the elements of a float32 C-order `.npy` file of any shape (as `numpy.save`
/// writes it); another dtype or order is an error.
pub fn read_f32(path: &Path) -> std::io::Result<Vec<f32>> {
    let bad = |m: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {m}", path.display()),
        )
    };
    let b = std::fs::read(path)?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file".into()));
    }
    // Version 1.0 has a 2-byte header length, 2.0 and 3.0 a 4-byte one.
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        _ if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        _ => return Err(bad("truncated header".into())),
    };
    let header = b
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header".into()))?;
    if !header.contains("'<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad(format!(
            "not little-endian float32 in C order: {}",
            header.trim()
        )));
    }
    Ok(b[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
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
        assert_eq!(super::read_f32(&p).unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        std::fs::write(&p, b"not numpy").unwrap();
        assert!(super::read_f32(&p)
            .unwrap_err()
            .to_string()
            .contains("not a .npy"));
    }
}
