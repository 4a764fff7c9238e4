//! Deadlines for blocking collectives. MPI has no timeouts: a rank that died or issued a
//! different collective leaves the others blocked for ever. Each blocking call registers
//! here; a watchdog thread ends the process (exit status 4) with a message naming the
//! operation, the group and this rank when a call outlives its deadline, so that the
//! launcher (or the scheduler) can restart the job from its last checkpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Exit status of a process ended by a collective's deadline.
pub const TIMEOUT_EXIT: i32 = 4;

static IN_FLIGHT: Mutex<BTreeMap<u64, (String, Instant, Duration)>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCHDOG: Once = Once::new();

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
    WATCHDOG.call_once(|| {
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(watchdog)
            .expect("starting the collective watchdog");
    });
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    IN_FLIGHT
        .lock()
        .expect("watchdog")
        .insert(id, (what, Instant::now(), timeout));
    Watch(id)
}

fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let expired = IN_FLIGHT
            .lock()
            .expect("watchdog")
            .values()
            .find(|(_, start, timeout)| start.elapsed() > *timeout)
            .map(|(what, start, _)| (what.clone(), start.elapsed()));
        if let Some((what, waited)) = expired {
            eprintln!(
                "error: {what} did not complete within {:.0} s: another rank of the group died, \
                 hangs, or issued a different collective. Stopping (exit {TIMEOUT_EXIT}) so that \
                 the job can restart from its last checkpoint.",
                waited.as_secs_f64()
            );
            std::process::exit(TIMEOUT_EXIT);
        }
    }
}
