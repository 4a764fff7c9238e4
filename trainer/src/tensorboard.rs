//! TensorBoard event files: scalars and histograms that `tensorboard --logdir RUN_DIR`
//! shows, written without TensorFlow.
//!
//! A file is a sequence of TFRecords (little-endian u64 length, masked CRC32C of the
//! length, the payload, masked CRC32C of the payload), each holding one `Event` protobuf
//! (`tensorflow/core/util/event.proto`): first `file_version: "brain.Event:2"`, then
//! events with a wall time, a step and a `Summary` of tagged values. Only the few
//! message fields used here are encoded, by hand: a protobuf compiler and its generated
//! code would outweigh them. `cli/tests/report.rs` reads the files back with
//! TensorBoard's own `EventAccumulator`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The folder of a run directory that holds its event files.
pub const DIR: &str = "tensorboard";

/// Appends events to one new event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix secs>.<hostname>.<pid>` (the name
    /// TensorBoard looks for; the pid keeps a restarted run from reusing a name) and
    /// writes the file-version event.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            wall_time() as u64,
            std::process::id()
        ));
        let mut w = Self {
            file: BufWriter::new(File::create(&path)?),
            path,
        };
        let mut event = Vec::new();
        double_field(&mut event, 1, wall_time());
        bytes_field(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A scalar (`simple_value`, stored as f32 as TensorBoard does).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> io::Result<()> {
        let mut v = Vec::new();
        bytes_field(&mut v, 1, tag.as_bytes());
        key(&mut v, 2, FIXED32);
        v.extend_from_slice(&(value as f32).to_le_bytes());
        self.summary(step, &v)
    }

    /// A histogram of weighted points: `counts[i]` in the bucket that ends at `limits[i]`
    /// and starts at the previous limit (the first one bucket-width 1 wide). `min` and
    /// `max` are the edges of the outermost non-empty buckets, `num` and the sums follow
    /// from the bucket centres and counts.
    pub fn histogram(
        &mut self,
        tag: &str,
        step: i64,
        limits: &[f64],
        counts: &[f64],
    ) -> io::Result<()> {
        assert_eq!(limits.len(), counts.len(), "one count per bucket limit");
        let lower = |i: usize| {
            if i == 0 {
                limits[0] - 1.0
            } else {
                limits[i - 1]
            }
        };
        let centre = |i: usize| (lower(i) + limits[i]) / 2.0;
        let used: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0.0).collect();
        let mut h = Vec::new();
        double_field(&mut h, 1, used.first().map_or(0.0, |&i| lower(i)));
        double_field(&mut h, 2, used.last().map_or(0.0, |&i| limits[i]));
        double_field(&mut h, 3, counts.iter().sum());
        double_field(
            &mut h,
            4,
            (0..counts.len()).map(|i| centre(i) * counts[i]).sum(),
        );
        double_field(
            &mut h,
            5,
            (0..counts.len())
                .map(|i| centre(i) * centre(i) * counts[i])
                .sum(),
        );
        packed_doubles(&mut h, 6, limits);
        packed_doubles(&mut h, 7, counts);
        let mut v = Vec::new();
        bytes_field(&mut v, 1, tag.as_bytes());
        bytes_field(&mut v, 5, &h);
        self.summary(step, &v)
    }

    /// Writes buffered events to the file, so that a running TensorBoard sees them.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    /// An event holding a summary with one value (a `Summary.Value` message).
    fn summary(&mut self, step: i64, value: &[u8]) -> io::Result<()> {
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, value);
        let mut event = Vec::new();
        double_field(&mut event, 1, wall_time());
        key(&mut event, 2, VARINT);
        varint(&mut event, step as u64);
        bytes_field(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn double_field(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn packed_doubles(out: &mut Vec<u8>, field: u32, vs: &[f64]) {
    key(out, field, LEN);
    varint(out, 8 * vs.len() as u64);
    for v in vs {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: records are
/// small and written once per log interval.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// TFRecord's masking, so that CRCs of data holding CRCs stay well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // RFC 3720 B.4 and the CRC catalogue's check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varints_and_records() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 7, 1.5).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Walk the records: lengths and both CRCs agree, two events.
        let (mut at, mut n) = (0, 0);
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            at += 16 + len;
            n += 1;
        }
        assert_eq!(n, 2);
        assert!(w
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents."));
    }
}
