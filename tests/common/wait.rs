//! The one poll-until loop of the suites: wait (bounded) until a condition holds — a process
//! is gone, a lease is free, a log line appeared — and fail naming what was awaited.

use std::thread;
use std::time::{Duration, Instant};

/// How often a wait looks again.
const EVERY: Duration = Duration::from_millis(5);

/// Poll `f` until it gives `Some` (returned with how long that took), at most `bound`; `None`
/// after that. For a caller that words its own failure or measures a wait that may run out.
pub fn poll<T>(bound: Duration, f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    poll_every(EVERY, bound, f)
}

/// [`poll`] looking again every `every` (a finer grain for a test that watches for a short
/// window).
pub fn poll_every<T>(
    every: Duration,
    bound: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<(T, Duration)> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some((v, t0.elapsed()));
        }
        if t0.elapsed() >= bound {
            return None;
        }
        thread::sleep(every);
    }
}

/// Poll `cond` until it holds and return how long that took; after `bound`, panic with
/// "timed out after BOUND waiting until WHAT".
pub fn wait_until(what: &str, bound: Duration, cond: impl FnMut() -> bool) -> Duration {
    wait_until_or(what, bound, String::new, cond)
}

/// [`wait_until`] whose panic message adds `info()` (a log, the state last seen).
pub fn wait_until_or(
    what: &str,
    bound: Duration,
    info: impl FnOnce() -> String,
    mut cond: impl FnMut() -> bool,
) -> Duration {
    match poll(bound, || cond().then_some(())) {
        Some(((), took)) => took,
        None => panic!("timed out after {bound:?} waiting until {what}\n{}", info()),
    }
}
