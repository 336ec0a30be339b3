//! How far behind a replica is, in seconds: when the entries it lacks were appended.

use std::collections::VecDeque;
use std::time::Duration;

use blockrep_storage::Lsn;
use tokio::time::Instant;

/// Samples at most this many appends (older ones are forgotten first).
const MAX_SAMPLES: usize = 100_000;

/// When entries were appended (the last LSN of each batch, sampled): the age of the oldest
/// entry a replica lacks is its lag in seconds.
#[derive(Debug, Default)]
pub(super) struct AppendTimes {
    samples: VecDeque<(Lsn, Instant)>,
}

impl AppendTimes {
    /// Entries through `lsn` were appended just now; every replica is durable through
    /// `min_durable` (`None`: no replica has reported yet).
    pub(super) fn note(&mut self, lsn: Lsn, min_durable: Option<Lsn>) {
        let now = Instant::now();
        // One sample per millisecond is plenty for a lag in seconds.
        if self
            .samples
            .back()
            .is_none_or(|(_, t)| now.duration_since(*t) >= Duration::from_millis(1))
        {
            self.samples.push_back((lsn, now));
        } else if let Some(last) = self.samples.back_mut() {
            last.0 = lsn;
        }
        // Forget what every replica already has (and bound the memory either way).
        while self.samples.len() > MAX_SAMPLES
            || self
                .samples
                .front()
                .zip(min_durable)
                .is_some_and(|((l, _), d)| *l <= d)
        {
            self.samples.pop_front();
        }
    }

    /// Seconds since the first entry after `durable` was appended, for a log whose newest
    /// entry is `head`.
    pub(super) fn lag_seconds(&self, durable: Lsn, head: Lsn) -> f64 {
        if durable >= head {
            return 0.0;
        }
        let first_missing = self.samples.iter().find(|(l, _)| *l > durable);
        first_missing.map_or(0.0, |(_, t)| t.elapsed().as_secs_f64())
    }
}
