//! Bugs the random sweep once found. Most are replayed as a scripted scenario that fails
//! without its fix (checked by reverting the fix in the replication core); each bug also has
//! a unit test in `blockrep-replication`, named in the doc of its test here.
//!
//! Bugs whose scenario lives in `scenarios.rs`: promotion comparing logs by LSN alone (seed
//! 1435, `promotion_compares_logs_by_epoch_before_length`) fails
//! `s12_promotion_prefers_the_best_lineage_over_the_longest_log` and `figure8_...`; a replica
//! released to a rebuild while disconnected never being dialled again (seed 14,
//! `retention_budget_releases_a_lagging_replica`) fails `s7_retention_expiry_...`,
//! `s5_flapping_past_the_retention_budget_...` and every other scenario that waits for a
//! rebuild.
//!
//! Two bugs have no scenario here: a catch-up read answered after its replica had moved on to
//! a rebuild (seed 492) and a zero-gap join that did not pin the WAL (seed 9). Their seeds no
//! longer replay the bug's history, so a replay could not fail without the fix and was
//! removed; the unit tests `a_stale_wal_read_never_steers_a_rebuild` and
//! `a_zero_gap_replica_pins_the_wal_from_its_durable_lsn` in `blockrep-replication` are what
//! keeps them fixed.

mod common;

use blockrep_replication::core::primary::PeerState;
use blockrep_replication::core::CommitMode::{SyncAll, SyncQuorum};
use blockrep_sim::Cluster;

use common::*;

/// sync-quorum committed on two replicas without the primary's own fsync, so a primary that
/// restarted without those entries would serve, and overwrite, committed LSNs (seed 7468,
/// `commit_local_fsync_gates_quorum`). Here both replicas report a write durable before the
/// primary has fsynced it; a FLUSH must still wait for the primary's fsync.
#[test]
fn the_local_fsync_gates_a_sync_quorum_commit() {
    let mut c = Cluster::scripted(SyncQuorum);
    let ahead = |c: &Cluster| {
        let head = c.head(N0);
        c.durable(N0) < head
            && [N1, N2]
                .iter()
                .all(|&r| c.peer_durable(N0, r) == Some(head))
    };
    // The primary's progress barriers make the replicas fsync; its own store syncs only at a
    // FLUSH or a checkpoint. Write until the replicas get there first.
    let mut block = 0;
    while !ahead(&c) && block < 100 {
        write(&mut c, N0, block, 1);
        let head = c.head(N0);
        c.run_until_true(WAIT, |c| ahead(c) || c.durable(N0) == head);
        block += 1;
    }
    assert!(ahead(&c), "the replicas never got ahead:{}", c.describe());
    acked(&mut c, N0);
    clean(&c);
    converge(&mut c);
}

/// A promotion did not fence the members it consulted, so the old primary kept committing
/// with one of them (seed 7465, `a_fenced_member_stops_following_the_old_primary`). Here the
/// old primary still reaches n2 after n1's promotion consulted n2, and n1 has not taken n2
/// over yet: only the fence stops n2 from giving the old primary its quorum.
#[test]
fn a_promotion_fences_its_members_against_the_old_primary() {
    let mut c = Cluster::scripted(SyncQuorum);
    let before = write(&mut c, N0, 0, 5);
    acked(&mut c, N0);
    c.partition(N0, N1);
    assert!(c.promote(N1), "{}", c.describe());
    c.partition(N1, N2);
    let stale = write(&mut c, N0, 10, 5);
    // Fenced, or short of a quorum: never acknowledged.
    failed(&mut c, N0);
    assert!(holds_none(&c, N2, &stale));
    assert!(holds(&c, N1, &before) && holds(&c, N2, &before));
    clean(&c);
    c.heal();
    converge(&mut c);
}

/// Right after a promotion, sync-all answered a FLUSH from the committed high-water mark
/// while both replicas were still connecting and one was mid-rebuild (seed 345162,
/// `a_barrier_is_answered_by_the_copies_in_sync_now`). Here n1 learns the committed LSN and
/// is cut off; n2 is sent to a rebuild and crashes in the middle of it; n0 crashes and n1 is
/// promoted with nothing after its committed LSN. Its first FLUSH has a target it already
/// counts as committed, but neither replica is in sync, and n2 holds no usable copy.
#[test]
fn a_barrier_is_answered_by_the_copies_in_sync_now() {
    let mut c = Cluster::scripted(SyncAll);
    write(&mut c, N0, 0, 5);
    acked(&mut c, N0);
    // A new session's hello tells n1 what is committed.
    c.blip(N1);
    assert!(c.run_until_true(WAIT, |c| c.peer_state(N0, N1) != Some(PeerState::InSync)));
    reach(&mut c, N0, N1, PeerState::InSync, WAIT);
    c.partition(N0, N1);
    c.partition(N0, N2);
    write(&mut c, N0, 10, 260);
    c.settle(50);
    reach(&mut c, N0, N2, PeerState::NeedsRebuild, WAIT);
    c.heal();
    c.partition(N0, N1);
    assert!(
        c.run_until_true(WAIT, |c| c.is_rebuilding(N2)),
        "{}",
        c.describe()
    );
    c.crash(N2);
    c.crash(N0);
    c.heal();
    assert!(c.promote(N1), "{}", c.describe());
    assert!(c.flush_and_wait(N1, WAIT).is_some(), "{}", c.describe());
    clean(&c);
    converge(&mut c);
}
