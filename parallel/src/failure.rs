//! Failures of collectives issued where no error can be returned: inside the all-to-all's
//! autograd node (libtorch calls it during `backward()`) and in a model's forward (the
//! expert-parallel dispatch). The first failure is recorded here; while one is recorded
//! the expert-parallel exchanges are skipped (they return zeros of the right shape, so
//! the forward and backward finish without waiting on peers that are gone), and the
//! caller asks [`check`] after its forward and its backward and returns the error. Only
//! the binary turns it into an exit status ([`CollectiveFailed::EXIT_CODE`]).

use std::sync::Mutex;

/// An expert-parallel exchange failed (a peer died or the connection broke).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expert-parallel {what} failed: {message}")]
pub struct CollectiveFailed {
    /// Which exchange (`dispatch counts`, `all-to-all (backward)`, ...).
    pub what: String,
    /// What the backend said.
    pub message: String,
}

impl CollectiveFailed {
    /// The `upcycle` binary's exit status for it (the launcher restarts the job from its
    /// last checkpoint).
    pub const EXIT_CODE: i32 = 3;
}

static FAILED: Mutex<Option<CollectiveFailed>> = Mutex::new(None);

fn slot() -> std::sync::MutexGuard<'static, Option<CollectiveFailed>> {
    // The slot holds plain data: a panic elsewhere while it was held leaves it valid.
    FAILED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records that `what` failed with `message` (the first failure is kept).
pub fn record(what: &str, message: &dyn std::fmt::Display) {
    slot().get_or_insert_with(|| CollectiveFailed {
        what: what.to_string(),
        message: message.to_string(),
    });
}

/// Whether a failure is recorded and not yet checked.
pub fn failed() -> bool {
    slot().is_some()
}

/// The recorded failure, as an error (and cleared); `Ok` when there is none.
pub fn check() -> Result<(), CollectiveFailed> {
    slot().take().map_or(Ok(()), Err)
}
