//! The sans-IO protocol core: plain state machines that take events and return actions.
//!
//! Nothing in here reads a clock, touches a socket or a file, or imports tokio. Time arrives
//! as `now` (milliseconds) inside events; I/O leaves as actions for a driver to perform. The
//! tokio driver and the deterministic simulator run this same code.

pub mod commit;
pub mod primary;
pub mod promotion;
pub mod replica;

use std::fmt;

/// Milliseconds on the driver's monotonic clock (or the simulator's).
pub type Millis = u64;

/// A replica's stable identity, as configured (`--replica NAME=HOST:PORT`). The address is
/// only where it lives now; the identity survives address changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(pub String);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One transport session with a replica. Session ids are never reused, so a result that
/// names an old session is recognised as stale and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// What a FLUSH (or FUA write) waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Every configured replica has fsynced it.
    SyncAll,
    /// A majority of all copies (the primary counts) has fsynced it; needs 3 or more copies.
    SyncQuorum,
    /// The primary has fsynced it; replicas follow as they can.
    BestEffort,
}

impl CommitMode {
    pub fn name(self) -> &'static str {
        match self {
            CommitMode::SyncAll => "sync-all",
            CommitMode::SyncQuorum => "sync-quorum",
            CommitMode::BestEffort => "best-effort",
        }
    }

    /// Refuses configurations that would make the mode's promise vacuous or impossible.
    pub fn validate(self, replicas: usize) -> Result<(), String> {
        match self {
            CommitMode::SyncAll if replicas == 0 => Err(
                "sync-all with no replica would promise nothing beyond the local disk; \
                 configure --replica or use --commit best-effort"
                    .into(),
            ),
            CommitMode::SyncQuorum if replicas + 1 < 3 => Err(format!(
                "sync-quorum needs 3 or more copies (the primary and at least 2 replicas); \
                 {} configured",
                replicas + 1
            )),
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for CommitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<CommitMode, String> {
        match s {
            "sync-all" => Ok(CommitMode::SyncAll),
            "sync-quorum" => Ok(CommitMode::SyncQuorum),
            "best-effort" => Ok(CommitMode::BestEffort),
            other => Err(format!(
                "unknown commit mode {other:?} (sync-all, sync-quorum, best-effort)"
            )),
        }
    }
}

impl fmt::Display for CommitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod catalogue_tests;
