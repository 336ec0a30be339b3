//! Waiting on a condition with a deadline: the one polling loop of the harness. Tests wait
//! for what they need (a log line, a status field, a port, a metric), never for a time.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// What a condition polled by `wait_until` returns: whether it holds yet, and its value.
/// `bool` holds when true; `Option<T>` when Some; `Result<T, E>` when Ok, and the latest
/// `E` says, on a timeout, how far things got.
pub trait Outcome {
    type Value;
    /// The value if the condition holds, else what was seen instead (if anything).
    fn check(self) -> Result<Self::Value, Option<String>>;
}

impl Outcome for bool {
    type Value = ();
    fn check(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// The first poll comes at once; the pause between polls grows from 10 ms to this, so a
/// fast condition is seen fast and a slow one does not load the (small, shared) machine.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Polls `condition` until it holds and returns its value; panics with `what` (and the last
/// thing the condition reported) if `deadline` passes first. A condition may itself panic to
/// fail at once (a process that died while it was awaited).
pub fn wait_until<O: Outcome>(
    deadline: Duration,
    what: impl Display,
    mut condition: impl FnMut() -> O,
) -> O::Value {
    let mut last = None;
    let found = poll_until(deadline, || match condition().check() {
        Ok(v) => Some(v),
        Err(seen) => {
            if seen.is_some() {
                last = seen;
            }
            None
        }
    });
    match found {
        Some(v) => v,
        None => match last {
            Some(seen) => panic!("{what}: not reached within {deadline:?}; last seen: {seen}"),
            None => panic!("{what}: not reached within {deadline:?}"),
        },
    }
}

/// As `wait_until`, but None on a timeout instead of a panic: for the callers that do
/// something else when the time runs out (kill a process, then say what it printed).
pub fn poll_until<T>(deadline: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = condition() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(pause.min(end.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
