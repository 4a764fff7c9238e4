//! Deadlines for blocking collectives. MPI has no timeouts: a rank that died or issued a
//! different collective leaves the others blocked for ever. Each blocking call registers
//! here; a watchdog thread ends the process (exit status 4) with a message naming the
//! operation, the group, this rank and (where the backend can find out) the ranks that
//! did not arrive, when a call outlives its deadline, so that the launcher (or the
//! scheduler) can restart the job from its last checkpoint.
//!
//! Backends may install a [`set_responder`], run on every tick of the watchdog thread
//! (the MPI backend answers other ranks' "where are you?" probes there), and give each
//! call a diagnosis, run once on expiry, whose text ends the message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// Exit status of a process ended by a collective's deadline.
pub const TIMEOUT_EXIT: i32 = 4;

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
            let waited = call.start.elapsed().as_secs_f64();
            let found = call.diagnose.map(|d| d()).unwrap_or_default();
            eprintln!(
                "error: {} did not complete within {waited:.0} s: another rank of the group died, \
                 hangs, or issued a different collective.{}{found} Stopping (exit \
                 {TIMEOUT_EXIT}) so that the job can restart from its last checkpoint.",
                call.what,
                if found.is_empty() { "" } else { " " },
            );
            std::process::exit(TIMEOUT_EXIT);
        }
    }
}
