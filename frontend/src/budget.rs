//! The memory budget of the NBD server: how much request payload and reply data may be
//! resident at once, per connection and across every connection of the server.
//!
//! The invariant (tested by `resident_payload_never_exceeds_the_budget`): every request holds
//! [`Units`] of both its connection's budget and the server's global budget from before its
//! WRITE payload is read past the read-ahead window (see `intake`) until its reply is handed
//! to the socket. A request's units are its payload or reply data in 4 KiB units (at least
//! one), capped at the smaller of the two budgets, so one request larger than a whole budget
//! still runs (alone) instead of waiting forever. What is resident is therefore at most the
//! global budget plus one read-ahead window per connection.
//!
//! Units are always taken in the same order (the connection's, then the global ones), and
//! only a connection's own reader takes its connection's units, so no two waiters can each
//! hold what the other needs. A connection waiting for global units simply stops reading:
//! the client sees TCP back-pressure, never an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::proto::{CMD_READ, CMD_WRITE};

/// What one unit of the budget stands for.
pub(crate) const UNIT_BYTES: u64 = 4096;
/// 64 MiB per connection, in units.
pub(crate) const CONNECTION_UNITS: u32 = 16 << 10;
/// The global budget when none is given: 256 MiB across all connections.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

/// The server-wide budget, shared by every connection.
#[derive(Clone)]
pub(crate) struct Budget {
    global: Arc<Semaphore>,
    units: u32,
}

impl Budget {
    /// A budget of `bytes` (rounded down to whole units, and at least one unit).
    pub fn new(bytes: u64) -> Budget {
        let units = (bytes / UNIT_BYTES).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Budget {
            global: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// A new connection's own budget, drawing on this one.
    pub fn connection(&self) -> ConnectionBudget {
        let units = CONNECTION_UNITS.min(self.units);
        ConnectionBudget {
            own: Arc::new(Semaphore::new(units as usize)),
            units,
            global: self.clone(),
            activity: Arc::new(Activity {
                born: Instant::now(),
                last_release_ms: AtomicU64::new(0),
            }),
        }
    }

    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.global.available_permits()
    }
}

/// When a connection last finished a request, for the idle timeout.
struct Activity {
    born: Instant,
    last_release_ms: AtomicU64,
}

impl Activity {
    fn released(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_release_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last_release(&self) -> Instant {
        self.born + Duration::from_millis(self.last_release_ms.load(Ordering::Relaxed))
    }
}

/// The budget was closed; never happens while the server runs.
#[derive(Debug, thiserror::Error)]
#[error("the memory budget was closed")]
pub(crate) struct BudgetClosed;

/// One connection's budget: its own units, and the global budget behind them.
pub(crate) struct ConnectionBudget {
    own: Arc<Semaphore>,
    units: u32,
    global: Budget,
    activity: Arc<Activity>,
}

impl ConnectionBudget {
    /// What a request holds until its reply is on the wire: its payload or its reply data,
    /// in units, at least one, and never more than either budget holds.
    pub fn units_for(&self, cmd: u16, length: u32) -> u32 {
        match cmd {
            CMD_READ | CMD_WRITE => 1 + (u64::from(length) / UNIT_BYTES) as u32,
            _ => 1,
        }
        .min(self.units)
    }

    /// Waits until both budgets have room for the request, and takes it.
    pub async fn take(&self, cmd: u16, length: u32) -> Result<Units, BudgetClosed> {
        let n = self.units_for(cmd, length);
        let own = self
            .own
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| BudgetClosed)?;
        let global = self
            .global
            .global
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| BudgetClosed)?;
        Ok(Units {
            _global: global,
            _own: own,
            activity: self.activity.clone(),
        })
    }

    /// Whether any request of this connection still holds units (is read and not yet
    /// answered on the wire).
    pub fn in_flight(&self) -> bool {
        self.own.available_permits() < self.units as usize
    }

    /// When this connection last had a reply handed to the socket (its start if never).
    pub fn last_release(&self) -> Instant {
        self.activity.last_release()
    }

    /// Waits until every request of this connection has released its units.
    pub async fn drained(&self) {
        // The semaphore is never closed; an error would mean there is nothing to wait for.
        let _ = self.own.acquire_many(self.units).await;
    }
}

/// Budget held by one request, released (both parts) when dropped.
pub(crate) struct Units {
    _global: OwnedSemaphorePermit,
    _own: OwnedSemaphorePermit,
    activity: Arc<Activity>,
}

impl Drop for Units {
    fn drop(&mut self) {
        self.activity.released();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::CMD_FLUSH;

    #[test]
    fn a_request_larger_than_the_budget_is_capped_at_it() {
        let budget = Budget::new(1 << 20);
        let conn = budget.connection();
        assert_eq!(conn.units_for(CMD_WRITE, 32 << 20), 256);
        assert_eq!(conn.units_for(CMD_FLUSH, 32 << 20), 1);
        assert_eq!(conn.units_for(CMD_READ, 0), 1);
        let big = Budget::new(1 << 30).connection();
        assert_eq!(big.units_for(CMD_READ, 32 << 20), 8193);
        assert_eq!(big.units_for(u16::MAX, u32::MAX), 1);
        assert_eq!(Budget::new(0).connection().units_for(CMD_WRITE, 8192), 1);
    }

    #[tokio::test]
    async fn units_are_held_in_both_budgets_until_dropped() {
        let budget = Budget::new(64 << 20);
        let a = budget.connection();
        let b = budget.connection();
        let held = a.take(CMD_WRITE, 32 << 20).await.unwrap();
        assert!(a.in_flight());
        assert!(!b.in_flight());
        assert_eq!(budget.available(), (16 << 10) - 8193);
        let before = a.last_release();
        drop(held);
        assert!(!a.in_flight());
        assert_eq!(budget.available(), 16 << 10);
        assert!(a.last_release() >= before);
        a.drained().await;
    }
}
