//! Deadlines for blocking collectives. MPI has no timeouts: a rank that died or issued a
//! different collective leaves the others blocked for ever. Each blocking call registers
//! here; when a call outlives its deadline, a watchdog thread describes it ([`Expired`]:
//! the operation, the group, this rank and, where the backend can find out, the ranks
//! that did not arrive), records it ([`take_expired`]) and calls the handler the program
//! installed with [`on_expiry`]. The call itself stays blocked, so only the program can
//! end it: the `upcycle` binary's handler ends the process with [`TIMEOUT_EXIT`], so that
//! the launcher (or the scheduler) can restart the job from its last checkpoint. A
//! library never exits on its own.
//!
//! Backends may install a [`set_responder`], run on every tick of the watchdog thread
//! (the MPI backend answers other ranks' "where are you?" probes there), and give each
//! call a diagnosis, run once on expiry, whose text ends the message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// Exit status of the `upcycle` binary when a collective's deadline passed.
pub const TIMEOUT_EXIT: i32 = 4;

/// A blocking call that outlived its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The call (operation, group, rank).
    pub what: String,
    /// How long it had waited, in whole seconds.
    pub waited_s: u64,
    /// What the backend found out (who did not arrive); may be empty.
    pub diagnosis: String,
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} did not complete within {} s: another rank of the group died, hangs, or \
             issued a different collective.",
            self.what, self.waited_s
        )?;
        if !self.diagnosis.is_empty() {
            write!(f, " {}", self.diagnosis)?;
        }
        Ok(())
    }
}

impl std::error::Error for Expired {}

static EXPIRED: Mutex<Option<Expired>> = Mutex::new(None);
static ON_EXPIRY: OnceLock<fn(&Expired)> = OnceLock::new();

/// Installs what the watchdog thread does with an expired call after recording it (the
/// first call wins). The `upcycle` binary ends the process there.
pub fn on_expiry(handler: fn(&Expired)) {
    let _ = ON_EXPIRY.set(handler);
}

/// The first expired call not yet taken.
pub fn take_expired() -> Option<Expired> {
    EXPIRED.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// What a backend finds out about an expired call (who did not arrive).
pub type Diagnosis = Box<dyn FnOnce() -> String + Send>;

struct InFlight {
    what: String,
    start: Instant,
    timeout: Duration,
    diagnose: Option<Diagnosis>,
}

static IN_FLIGHT: Mutex<BTreeMap<u64, InFlight>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCHDOG: Once = Once::new();
static RESPONDER: OnceLock<fn()> = OnceLock::new();
/// How often the watchdog looks at deadlines (and runs the responder).
const TICK: Duration = Duration::from_millis(200);

/// A registered call; dropping it (the call returned) clears the deadline.
#[derive(Debug)]
pub struct Watch(u64);

impl Drop for Watch {
    fn drop(&mut self) {
        IN_FLIGHT.lock().expect("watchdog").remove(&self.0);
    }
}

/// Registers a blocking call described by `what` that must finish within `timeout`.
pub fn watch(what: String, timeout: Duration) -> Watch {
    watch_diagnosed(what, timeout, None)
}

/// As [`watch`], with a diagnosis run on expiry whose text is added to the message.
pub fn watch_diagnosed(what: String, timeout: Duration, diagnose: Option<Diagnosis>) -> Watch {
    start_watchdog();
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    IN_FLIGHT.lock().expect("watchdog").insert(
        id,
        InFlight {
            what,
            start: Instant::now(),
            timeout,
            diagnose,
        },
    );
    Watch(id)
}

/// Installs the function the watchdog thread runs on every tick (the first call wins)
/// and starts the thread.
pub fn set_responder(responder: fn()) {
    let _ = RESPONDER.set(responder);
    start_watchdog();
}

fn start_watchdog() {
    WATCHDOG.call_once(|| {
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(watchdog)
            .expect("starting the collective watchdog");
    });
}

fn watchdog() {
    loop {
        std::thread::sleep(TICK);
        if let Some(respond) = RESPONDER.get() {
            respond();
        }
        let expired = {
            let mut in_flight = IN_FLIGHT.lock().expect("watchdog");
            let id = in_flight
                .iter()
                .find(|(_, call)| call.start.elapsed() > call.timeout)
                .map(|(id, _)| *id);
            id.and_then(|id| in_flight.remove(&id))
        };
        if let Some(call) = expired {
            let expired = Expired {
                what: call.what,
                waited_s: call.start.elapsed().as_secs_f64().round() as u64,
                diagnosis: call.diagnose.map(|d| d()).unwrap_or_default(),
            };
            EXPIRED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| expired.clone());
            if let Some(handler) = ON_EXPIRY.get() {
                handler(&expired);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expired call is recorded and reported; the process goes on (a library does
    /// not decide to exit).
    #[test]
    fn an_expired_call_is_recorded_not_fatal() {
        let _watch = watch("barrier on group test".into(), Duration::from_millis(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        let expired = loop {
            if let Some(e) = take_expired() {
                break e;
            }
            assert!(Instant::now() < deadline, "the watchdog did not report");
            std::thread::sleep(TICK / 4);
        };
        assert_eq!(expired.what, "barrier on group test");
        assert!(
            expired
                .to_string()
                .starts_with("barrier on group test did not complete within"),
            "{expired}"
        );
    }
}
