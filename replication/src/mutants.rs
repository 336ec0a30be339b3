//! Deliberate protocol bugs for proving the simulator's checker can fail.
//!
//! Only with the `mutants` feature; the simulator switches one on at a time. Without the
//! feature, [`active`] is a constant `false` and every check compiles away.

/// A bug the checker must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutant {
    /// Count a replica that is not in sync toward a barrier.
    CountOutOfSyncReplica = 1,
    /// Accept an entry that does not follow the last one (an LSN gap).
    AcceptLsnGap = 2,
    /// A replica accepts primaries and frames of any epoch, stale ones included.
    SkipReplicaEpochCheck = 3,
    /// A replica reports what it received as durable, before its fsync.
    ReportReceivedAsDurable = 4,
    /// The handshake trusts a replica's LSN without comparing epochs: a diverged log (an old
    /// primary's tail) is caught up as if it were a prefix of ours.
    IgnoreDivergedLog = 5,
    /// Promotion ignores whether the candidate holds the committed prefix.
    PromoteWithoutPrefix = 6,
    /// The WAL pin follows in-sync replicas only: a lagging replica's entries are recycled
    /// while it still needs them.
    RecycleNeededWal = 7,
    /// A replica answers a cut of its log as done without cutting: the discarded tail stays
    /// and is merged with the new primary's log.
    AckCutWithoutCutting = 8,
    /// The primary resumes an interrupted rebuild from any cursor the replica reports,
    /// without checking that the partial base's lineage is its own.
    TrustCursorWithoutLineage = 9,
    /// The primary skips the cut: a replica whose log diverged is caught up from the last
    /// entry both logs share as if its tail had been discarded, so the tail survives.
    SkipCut = 10,
}

impl Mutant {
    /// The name used on the simulator's command line.
    pub fn name(self) -> &'static str {
        match self {
            Mutant::CountOutOfSyncReplica => "count-out-of-sync-replica",
            Mutant::AcceptLsnGap => "accept-lsn-gap",
            Mutant::SkipReplicaEpochCheck => "skip-replica-epoch-check",
            Mutant::ReportReceivedAsDurable => "report-received-as-durable",
            Mutant::IgnoreDivergedLog => "ignore-diverged-log",
            Mutant::PromoteWithoutPrefix => "promote-without-prefix",
            Mutant::RecycleNeededWal => "recycle-needed-wal",
            Mutant::AckCutWithoutCutting => "ack-cut-without-cutting",
            Mutant::TrustCursorWithoutLineage => "trust-cursor-without-lineage",
            Mutant::SkipCut => "skip-cut",
        }
    }

    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == name)
    }

    pub const ALL: [Mutant; 10] = [
        Mutant::CountOutOfSyncReplica,
        Mutant::AcceptLsnGap,
        Mutant::SkipReplicaEpochCheck,
        Mutant::ReportReceivedAsDurable,
        Mutant::IgnoreDivergedLog,
        Mutant::PromoteWithoutPrefix,
        Mutant::RecycleNeededWal,
        Mutant::AckCutWithoutCutting,
        Mutant::TrustCursorWithoutLineage,
        Mutant::SkipCut,
    ];
}

#[cfg(feature = "mutants")]
mod switch {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::Mutant;

    static ACTIVE: AtomicU8 = AtomicU8::new(0);

    /// Switches `m` on (or every mutant off with `None`), for the whole process.
    pub fn set(m: Option<Mutant>) {
        ACTIVE.store(m.map_or(0, |m| m as u8), Ordering::SeqCst);
    }

    pub fn active(m: Mutant) -> bool {
        ACTIVE.load(Ordering::Relaxed) == m as u8
    }
}

#[cfg(feature = "mutants")]
pub use switch::set;

/// Whether mutant `m` is on.
#[cfg(feature = "mutants")]
pub fn active(m: Mutant) -> bool {
    switch::active(m)
}

/// Whether mutant `m` is on: never, in a real build.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub const fn active(_: Mutant) -> bool {
    false
}
