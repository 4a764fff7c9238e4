//! Optional wall-clock timers around the parts of a forward pass: attention, convolution,
//! dense feed-forward networks, the subsampling, the decoders' output layers, the CTC and
//! attention losses, and in MoE layers the routing, the dispatch of tokens to
//! their experts and back, and the experts' computation. Off unless [`enable`]d (a span
//! then costs one atomic load). On the CPU the times are the work's; on a GPU they would
//! be the time to queue it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

/// Turns the timers on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// A timed part; its time is added to its name's total when it is dropped.
#[derive(Debug)]
pub struct Span {
    name: &'static str,
    start: Instant,
}

impl Drop for Span {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let mut totals = TOTALS.lock().expect("profile totals");
        match totals.iter_mut().find(|(n, _)| *n == self.name) {
            Some((_, t)) => *t += secs,
            None => totals.push((self.name, secs)),
        }
    }
}

/// Times the enclosing scope as `name` when the timers are on. Spans must not nest
/// (each part of the forward pass is counted once).
pub fn span(name: &'static str) -> Option<Span> {
    ENABLED.load(Ordering::Relaxed).then(|| Span {
        name,
        start: Instant::now(),
    })
}

/// Seconds per part since the last call, in the order the parts first ran.
pub fn take() -> Vec<(&'static str, f64)> {
    std::mem::take(&mut *TOTALS.lock().expect("profile totals"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_only_when_enabled() {
        let _rng = crate::test_rng::lock();
        drop(span("off"));
        assert!(take().iter().all(|(n, _)| *n != "off"));
        enable(true);
        for _ in 0..2 {
            let _s = span("part");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        enable(false);
        let got = take();
        let part = got.iter().find(|(n, _)| *n == "part").unwrap().1;
        assert!(part >= 0.009, "{got:?}");
    }
}
