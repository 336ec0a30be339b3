//! Seeds that once broke an invariant, kept as they were found. The protocol has changed
//! since, so a seed no longer replays the same history; each bug also has a unit test in
//! `blockrep-replication` named after it, which is the regression that stays precise.

use blockrep_replication::core::CommitMode::{self, BestEffort, SyncAll, SyncQuorum};
use blockrep_sim::{run, Config};

fn passes(seed: u64, mode: CommitMode) {
    if let Err(f) = run(Config::new(seed, mode), false) {
        panic!(
            "seed {seed} ({mode}): {}\n{}",
            f.violation,
            f.trace[f.trace.len().saturating_sub(40)..].join("\n")
        );
    }
}

/// A catch-up read answered after the replica had moved on to a rebuild steered the rebuild
/// (`a_stale_wal_read_never_steers_a_rebuild`).
#[test]
fn seed_492_stale_wal_read_during_a_rebuild() {
    passes(492, SyncAll);
}

/// A replica released to a rebuild while disconnected was never dialled again
/// (`retention_budget_releases_a_lagging_replica`).
#[test]
fn seed_14_released_replica_is_redialled() {
    passes(14, BestEffort);
}

/// sync-quorum committed on two replicas without the primary's own fsync; the primary then
/// restarted without those entries (`commit_local_fsync_gates_quorum`).
#[test]
fn seed_7468_quorum_commit_needs_the_local_fsync() {
    passes(7468, SyncQuorum);
}

/// A promotion did not fence the members it consulted, so the old primary kept committing
/// with one of them (`a_fenced_member_stops_following_the_old_primary`).
#[test]
fn seed_7465_promotion_fences_its_members() {
    passes(7465, SyncQuorum);
}

/// Promotion compared logs by LSN alone and chose an old primary's longer tail
/// (`promotion_compares_logs_by_epoch_before_length`).
#[test]
fn seed_1435_promotion_compares_epochs_first() {
    passes(1435, SyncQuorum);
}

/// A replica that joined with a zero gap did not pin the WAL
/// (`a_zero_gap_replica_pins_the_wal_from_its_durable_lsn`).
#[test]
fn seed_9_zero_gap_join_pins_the_wal() {
    passes(9, SyncAll);
}

/// Right after a promotion, sync-all answered a FLUSH through LSN 0 from the committed
/// high-water mark while both replicas were still connecting and one was mid-rebuild
/// (`a_barrier_is_answered_by_the_copies_in_sync_now`).
#[test]
fn seed_345162_sync_all_flush_answered_without_its_replicas() {
    passes(345162, SyncAll);
}
