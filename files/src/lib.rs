//! The file-system rules every crate of `upcycle` follows when it writes or reads files
//! that other people (or a crash) may have touched:
//! - [`atomic`]: a file or directory appears whole or not at all (temp + fsync + rename).
//! - [`confine`]: a path read from a file (a manifest entry, a pointer, a list line) stays
//!   inside the directory it is relative to.
//! - [`fuzz`]: seeded mutation of committed seed inputs, for the fuzz tests of every
//!   reader of such files (and of the wire framing), with a bounded allocator.

pub mod atomic;
pub mod confine;
pub mod fuzz;
