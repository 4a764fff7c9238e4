//! Seeded mutation fuzzing for the tests of every reader of hostile bytes (`.pt` files,
//! checkpoints, configs, lists, wire framing): committed seed inputs, mutated by a plain
//! seeded generator, a fixed number of inputs per target, so a run is the same every time
//! and fits in `cargo test`. A panic fails the test naming the input; so does an input
//! that runs past its time bound (a watchdog aborts the process, printing it), and, in a
//! test binary that installs [`Bounded`] as its allocator, an allocation above the bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A small, fast, seeded generator (SplitMix64): the same seed gives the same inputs.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values that make readers take edges: zero, one, all ones, sign bits, large lengths.
const INTERESTING: [u64; 8] = [
    0,
    1,
    0x7f,
    0xff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// One mutation of `input`, 1 to 4 edits: flip a bit, set a byte, write an interesting
/// little-endian integer, delete or duplicate a span, truncate, or splice in part of `other`.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        let at = if len == 0 { 0 } else { rng.below(len) };
        match rng.below(7) {
            0 if len > 0 => v[at] ^= 1 << rng.below(8),
            1 if len > 0 => v[at] = rng.next_u64() as u8,
            2 => {
                let bytes = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let n = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in bytes[..n].iter().enumerate() {
                    if let Some(x) = v.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            3 if len > 0 => {
                let n = 1 + rng.below((len - at).min(64));
                v.drain(at..at + n);
            }
            4 if len > 0 => {
                let n = 1 + rng.below((len - at).min(64));
                let span = v[at..at + n].to_vec();
                v.splice(at..at, span);
            }
            5 => v.truncate(at),
            _ if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(64));
                v.splice(at..at, other[from..from + n].iter().copied());
            }
            _ => {}
        }
    }
    v
}

/// The files of a seed folder (`tests/fuzz/<target>/`), sorted by name, read whole.
pub fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("seed folder {}: {e}", dir.display()))
        .map(|e| e.expect("a seed file").path())
        .collect();
    paths.sort();
    let seeds: Vec<_> = paths
        .iter()
        .map(|p| std::fs::read(p).expect("a seed file"))
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `target` on every seed and on `inputs` mutations of them drawn from `rng_seed`.
/// Panics naming the target, the input's number and its first bytes when `target` panics;
/// aborts the process the same way when one input runs longer than `per_input`.
/// Returns how many inputs were tried.
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    rng_seed: u64,
    inputs: usize,
    per_input: Duration,
    target: impl Fn(&[u8]),
) -> usize {
    let current: Arc<Mutex<(usize, Vec<u8>, Instant)>> =
        Arc::new(Mutex::new((0, Vec::new(), Instant::now())));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, done, name) = (current.clone(), done.clone(), name.to_string());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let c = current.lock().unwrap_or_else(|e| e.into_inner());
                if c.2.elapsed() > per_input && !done.load(Ordering::Relaxed) {
                    eprintln!(
                        "fuzz {name}: input {} ran past {per_input:?} (a hang): {}",
                        c.0,
                        show(&c.1)
                    );
                    std::process::abort();
                }
            }
        })
    };
    let mut rng = Rng::new(rng_seed);
    let start = Instant::now();
    for i in 0..seeds.len() + inputs {
        let input = match seeds.get(i) {
            Some(s) => s.clone(),
            None => {
                let base = &seeds[rng.below(seeds.len())];
                let other = &seeds[rng.below(seeds.len())];
                mutate(base, other, &mut rng)
            }
        };
        *current.lock().unwrap_or_else(|e| e.into_inner()) = (i, input.clone(), Instant::now());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        if outcome.is_err() {
            done.store(true, Ordering::Relaxed);
            panic!(
                "fuzz {name}: input {i} (rng seed {rng_seed}) panicked: {}",
                show(&input)
            );
        }
    }
    done.store(true, Ordering::Relaxed);
    watchdog.join().expect("the watchdog");
    let tried = seeds.len() + inputs;
    eprintln!(
        "fuzz {name}: {tried} inputs (rng seed {rng_seed}) in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    tried
}

fn show(input: &[u8]) -> String {
    let head: String = input.iter().take(256).map(|b| format!("{b:02x}")).collect();
    format!("{} bytes, starting {head}", input.len())
}

/// An allocator that refuses any single allocation above a bound (the process then
/// aborts, naming the size): a test binary installs it with `#[global_allocator]` so a
/// reader that believes a file's claim of a huge size fails its fuzz test. Counts the
/// largest allocation it served.
pub struct Bounded {
    limit: usize,
    largest: AtomicUsize,
}

impl Bounded {
    /// At most `limit` bytes per allocation.
    pub const fn new(limit: usize) -> Self {
        Self {
            limit,
            largest: AtomicUsize::new(0),
        }
    }

    /// The largest allocation served so far.
    pub fn largest(&self) -> usize {
        self.largest.load(Ordering::Relaxed)
    }
}

// SAFETY: every call is passed to the system allocator unchanged, or refused with null.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.limit {
            return std::ptr::null_mut();
        }
        self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.limit {
            return std::ptr::null_mut();
        }
        self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > self.limit {
            return std::ptr::null_mut();
        }
        self.largest.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| mutate(b"hello world", b"other", &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(draw(7).iter().any(|m| m != b"hello world"));
    }

    #[test]
    #[should_panic(expected = "fuzz demo: input")]
    fn a_panicking_target_fails_naming_the_input() {
        run(
            "demo",
            &[b"ab".to_vec()],
            1,
            100,
            Duration::from_secs(5),
            |b| assert!(b.len() < 3, "too long"),
        );
    }
}
