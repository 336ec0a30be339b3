//! The leader's local lease deadline.
//!
//! etcd expires a lease `ttl` after it *received* the last keep-alive; the node cannot know
//! when that was, only when it *sent* it, which is earlier. So the deadline counts from the
//! send time of the last keep-alive etcd answered, minus a safety margin that covers the rate
//! difference between the node's clock and etcd's (a margin of ttl/8 tolerates a node clock
//! running up to 12.5% slow). Past the deadline the node acknowledges nothing: by the time
//! etcd hands the leader key to someone else, the old leader has stopped.

use thiserror::Error;

use crate::Millis;

/// How long leases live and how often they are renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: Millis,
    /// How often a keep-alive is sent.
    pub renew: Millis,
    /// How long one etcd request may take before it is given up and retried.
    pub retry: Millis,
    /// How long before etcd's earliest expiry the leader stops acknowledging.
    pub margin: Millis,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TimingError {
    #[error(
        "renew interval {renew} ms + 2 x retry timeout {retry} ms exceeds the lease TTL {ttl} ms: \
         a leader could lose its lease between two renewals without a retry; raise --etcd-ttl"
    )]
    TooTight {
        ttl: Millis,
        renew: Millis,
        retry: Millis,
    },
    #[error("the lease TTL must be at least 2 seconds (etcd's minimum), not {0} ms")]
    TooShort(Millis),
}

impl Timing {
    pub const DEFAULT_TTL: Millis = 15_000;

    /// A timing whose renewals always have a retry left before the lease could expire:
    /// `renew + 2 * retry <= ttl`.
    pub fn new(ttl: Millis, renew: Millis, retry: Millis) -> Result<Timing, TimingError> {
        if ttl < 2_000 {
            return Err(TimingError::TooShort(ttl));
        }
        if renew.saturating_add(retry.saturating_mul(2)) > ttl {
            return Err(TimingError::TooTight { ttl, renew, retry });
        }
        Ok(Timing {
            ttl,
            renew,
            retry,
            margin: ttl / 8,
        })
    }

    /// renew = retry = ttl / 3 (the defaults: 15 s, 5 s, 5 s).
    pub fn from_ttl(ttl: Millis) -> Result<Timing, TimingError> {
        Timing::new(ttl, ttl / 3, ttl / 3)
    }
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            ttl: Timing::DEFAULT_TTL,
            renew: 5_000,
            retry: 5_000,
            margin: Timing::DEFAULT_TTL / 8,
        }
    }
}

/// The lease as this node knows it.
#[derive(Debug, Clone, Default)]
pub struct LeaseClock {
    deadline: Option<Millis>,
}

impl LeaseClock {
    /// etcd answered a keep-alive (or the grant) sent at `sent_at`, granting `granted_ttl`.
    /// A grant of 0 means the lease is gone. The deadline never moves back for an answer to an
    /// older keep-alive that arrives late.
    pub fn answered(&mut self, timing: &Timing, sent_at: Millis, granted_ttl: Millis) {
        if granted_ttl == 0 {
            self.deadline = None;
            return;
        }
        let ttl = granted_ttl.min(timing.ttl);
        let deadline = sent_at.saturating_add(ttl.saturating_sub(timing.margin));
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.max(deadline)));
    }

    /// The lease is gone (etcd said so, or this node gave it up).
    pub fn lost(&mut self) {
        self.deadline = None;
    }

    pub fn deadline(&self) -> Option<Millis> {
        self.deadline
    }

    /// Whether the lease certainly still holds at `now`.
    pub fn holds(&self, now: Millis) -> bool {
        self.deadline.is_some_and(|d| now < d)
    }

    pub fn remaining(&self, now: Millis) -> Millis {
        self.deadline.map_or(0, |d| d.saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_plus_two_retries_may_not_exceed_the_ttl() {
        assert!(Timing::new(15_000, 5_000, 5_000).is_ok());
        assert_eq!(
            Timing::new(15_000, 6_000, 5_000),
            Err(TimingError::TooTight {
                ttl: 15_000,
                renew: 6_000,
                retry: 5_000
            })
        );
        assert_eq!(
            Timing::new(1_000, 300, 300),
            Err(TimingError::TooShort(1_000))
        );
        let t = Timing::from_ttl(3_000).unwrap();
        assert_eq!((t.renew, t.retry, t.margin), (1_000, 1_000, 375));
        assert_eq!(Timing::default(), Timing::from_ttl(15_000).unwrap());
    }

    #[test]
    fn the_deadline_counts_from_the_send_time_minus_the_margin() {
        let t = Timing::from_ttl(8_000).unwrap();
        let mut lease = LeaseClock::default();
        assert!(!lease.holds(0));
        lease.answered(&t, 1_000, 8_000);
        assert_eq!(lease.deadline(), Some(1_000 + 8_000 - 1_000));
        assert!(lease.holds(7_999));
        assert!(!lease.holds(8_000));
        // A late answer to an older keep-alive never pulls the deadline back.
        lease.answered(&t, 500, 8_000);
        assert_eq!(lease.deadline(), Some(8_000));
        // etcd granting more than we asked for is not trusted beyond our TTL.
        lease.answered(&t, 2_000, 60_000);
        assert_eq!(lease.deadline(), Some(9_000));
        lease.answered(&t, 3_000, 0);
        assert!(!lease.holds(3_000));
    }
}
