//! Device-to-host reads of the training step. Each one waits for the device to finish
//! what it was given, so the step makes as few as it can (none for a dense model outside
//! log intervals); every read of step code goes through here and is counted, so that a
//! test can hold the step to its budget.

use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Kind, TchError, Tensor};

static READS: AtomicU64 = AtomicU64::new(0);

/// Reads made through this module since the process started (all threads).
pub fn reads() -> u64 {
    READS.load(Ordering::Relaxed)
}

fn count() {
    READS.fetch_add(1, Ordering::Relaxed);
}

/// The value of a one-element tensor as `f64`.
pub fn scalar_f64(t: &Tensor) -> f64 {
    count();
    t.double_value(&[])
}

/// The value of a one-element tensor as `i64`.
pub fn scalar_i64(t: &Tensor) -> i64 {
    count();
    t.int64_value(&[])
}

/// The elements of a tensor, flattened, as `f64`.
pub fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>, TchError> {
    count();
    Vec::<f64>::try_from(t.flatten(0, -1).to_kind(Kind::Double))
}

/// The elements of a tensor, flattened, as `i64`.
pub fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>, TchError> {
    count();
    Vec::<i64>::try_from(t.flatten(0, -1).to_kind(Kind::Int64))
}
