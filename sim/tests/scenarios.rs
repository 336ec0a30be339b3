//! The scenario catalogue (protocol brief, section 6): each named scenario, with the fault
//! placed by hand, run through the real cores under the simulator's checker. Every test ends
//! by letting the cluster converge, which also compares every replica's volume with the
//! primary's. The table in docs/PROTOCOL.md maps scenario names to these tests.

mod common;

use blockrep_replication::core::primary::PeerState;
use blockrep_replication::core::CommitMode::{self, BestEffort, SyncAll, SyncQuorum};
use blockrep_sim::{Cluster, FlushOutcome};

use common::*;

/// Sends n1 away long enough (past the retention budget) that it needs a rebuild.
fn force_rebuild_of_n1(c: &mut Cluster) {
    c.partition(N0, N1);
    write(c, N0, 0, 260);
    c.settle(50);
    reach(c, N0, N1, PeerState::NeedsRebuild, WAIT);
}

/// n1 needs a rebuild, comes back, and n0 starts rebuilding it.
fn rebuild_n1(c: &mut Cluster) {
    force_rebuild_of_n1(c);
    c.heal();
    reach(c, N0, N1, PeerState::Rebuilding, WAIT);
}

/// As `rebuild_n1`, until n1's store has begun the rebuild (its old contents are gone).
fn n1_mid_rebuild(c: &mut Cluster) {
    rebuild_n1(c);
    assert!(c.run_until_true(WAIT, |c| c.is_rebuilding(N1)));
}

/// n0 writes `count` blocks while n1 is away; n1 then comes back, behind.
fn n1_misses(c: &mut Cluster, count: u64) -> Vec<(u64, u64)> {
    c.partition(N0, N1);
    let w = write(c, N0, 0, count);
    c.heal();
    w
}

/// n0 writes `count` blocks from `first` that only n2 hears (n1 is away), lets `settle_ms`
/// pass and crashes; n1 and n2 are left unable to reach each other, so a promotion of n1
/// sees only itself. Returns the tail only n2 holds.
fn tail_only_n2_heard(c: &mut Cluster, first: u64, count: u64, settle_ms: u64) -> Vec<(u64, u64)> {
    c.partition(N0, N1);
    let tail = write(c, N0, first, count);
    c.settle(settle_ms);
    c.crash(N0);
    c.heal();
    c.partition(N1, N2);
    tail
}

/// n0 acknowledges 10 writes that `away` never sees, and crashes.
fn n0_commits_without(c: &mut Cluster, away: usize) {
    c.partition(N0, away);
    write(c, N0, 0, 10);
    acked(c, N0);
    c.crash(N0);
    c.heal();
}

/// n0 is cut off and n1 promoted in its place; n0 lives on as a zombie.
fn zombie_n0_replaced_by_n1(c: &mut Cluster) {
    c.cut_off(N0);
    assert!(c.promote(N1), "{}", c.describe());
}

// ---- 6.1 the core S-scenarios --------------------------------------------------------

#[test]
fn s1_ack_then_primary_crash() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted(mode);
        let w = write(&mut c, N0, 0, 20);
        acked(&mut c, N0);
        c.crash_losing_unsynced(N0);
        assert!(c.promote(N1), "{mode}");
        assert!(
            holds(&c, N1, &w),
            "{mode}: the promoted replica lacks acknowledged data"
        );
        c.restart(N0);
        assert!(c.all_in_sync(5_000), "{mode}: {}", c.describe());
        assert!(holds(&c, N0, &w) && holds(&c, N2, &w));
        converge(&mut c);
    }
}

#[test]
fn s2_non_quorum_write_then_crash_is_not_exposed() {
    let mut c = Cluster::scripted(SyncQuorum);
    c.partition(N0, N1);
    c.partition(N0, N2);
    let lost = write(&mut c, N0, 0, 5);
    assert_eq!(failed(&mut c, N0), "quorum_lost");
    c.crash(N0);
    c.heal();
    assert!(c.promote(N1));
    assert!(holds_none(&c, N1, &lost));
    write(&mut c, N1, 10, 3);
    acked(&mut c, N1);
    converge(&mut c);
    // The old primary's unacknowledged tail is never revived: it was rebuilt away.
    nobody_holds(&c, &lost);
}

#[test]
fn s3_zombie_old_primary_is_fenced() {
    let mut c = Cluster::scripted(SyncAll);
    zombie_n0_replaced_by_n1(&mut c);
    c.heal();
    // The zombie still believes it is primary and takes writes, but can never make them
    // durable anywhere the new primary's replicas would accept.
    let stale = write(&mut c, N0, 0, 5);
    let why = failed(&mut c, N0);
    assert!(why == "fenced" || why == "replica_missing", "{why}");
    c.settle(500);
    assert!(c.is_fenced(N0), "{}", c.describe());
    assert!(holds_none(&c, N1, &stale) && holds_none(&c, N2, &stale));
    converge(&mut c);
    assert!(holds_none(&c, N0, &stale));
}

#[test]
fn s4_brief_disconnect_catches_up_from_the_wal() {
    let mut c = Cluster::scripted(SyncAll);
    let w = n1_misses(&mut c, 30);
    reach(&mut c, N0, N1, PeerState::InSync, WAIT);
    let k = c.counters(N0).expect("primary");
    assert!(k.catch_ups >= 1);
    assert_eq!(
        k.rebuilds_started, 0,
        "a short outage must not cost a rebuild"
    );
    acked(&mut c, N0);
    assert!(holds(&c, N1, &w));
    converge(&mut c);
}

#[test]
fn s5_flapping_replica_never_needs_a_rebuild() {
    let mut c = Cluster::scripted(SyncQuorum);
    for round in 0..5 {
        c.partition(N0, N1);
        write(&mut c, N0, round * 5, 5);
        c.settle(30);
        c.heal();
        assert!(c.wait_for(N0, N1, PeerState::InSync, WAIT), "round {round}");
    }
    assert_eq!(c.counters(N0).expect("primary").rebuilds_started, 0);
    acked(&mut c, N0);
    converge(&mut c);
}

#[test]
fn s5_flapping_past_the_retention_budget_escalates_to_a_rebuild() {
    let mut c = Cluster::scripted(SyncQuorum);
    force_rebuild_of_n1(&mut c);
    c.heal();
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    assert!(c.counters(N0).expect("primary").rebuilds_done >= 1);
    converge(&mut c);
}

#[test]
fn s6_tail_chasing_converges_while_writes_continue() {
    let mut c = Cluster::scripted(SyncAll);
    n1_misses(&mut c, 150);
    // The primary keeps writing while n1 catches up.
    let mut caught_up = false;
    for i in 0..2_000u64 {
        write(&mut c, N0, i, 1);
        c.settle(1);
        if c.peer_state(N0, N1) == Some(PeerState::InSync) {
            caught_up = true;
            break;
        }
    }
    assert!(caught_up, "{}", c.describe());
    acked(&mut c, N0);
    converge(&mut c);
}

#[test]
fn s7_retention_expiry_during_an_outage_aborts_to_needs_rebuild() {
    let mut c = Cluster::scripted(BestEffort);
    force_rebuild_of_n1(&mut c);
    // Partial progress is not success: n1 counts for nothing until it is rebuilt.
    assert_ne!(c.peer_state(N0, N1), Some(PeerState::InSync));
    c.heal();
    reach(&mut c, N0, N1, PeerState::Rebuilding, WAIT);
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    converge(&mut c);
}

#[test]
fn s9_rebuild_base_plus_tail_under_live_writes_matches_the_primary() {
    let mut c = Cluster::scripted(SyncQuorum);
    rebuild_n1(&mut c);
    // Writes land while the base streams: the WAL wins over the base.
    let mut i = 0;
    while c.peer_state(N0, N1) == Some(PeerState::Rebuilding) && i < 5_000 {
        write(&mut c, N0, i, 1);
        c.settle(1);
        i += 1;
    }
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    converge(&mut c);
}

#[test]
fn s10_mixed_states_under_sync_quorum_still_commit() {
    let mut c = Cluster::scripted(SyncQuorum);
    force_rebuild_of_n1(&mut c);
    // n1 needs a rebuild, n2 is in sync: a quorum (n0 + n2) still commits.
    let w = write(&mut c, N0, 0, 3);
    acked(&mut c, N0);
    assert!(holds(&c, N2, &w));
    c.heal();
    converge(&mut c);
}

#[test]
fn s11_mixed_states_under_sync_all_fail_and_never_downgrade() {
    let mut c = Cluster::scripted(SyncAll);
    force_rebuild_of_n1(&mut c);
    write(&mut c, N0, 0, 3);
    assert_eq!(failed(&mut c, N0), "replica_missing");
    c.heal();
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    acked(&mut c, N0);
    converge(&mut c);
}

/// n1 ends at epoch 2 with a short log, n2 at epoch 1 with a longer one.
fn n2_longer_on_a_stale_epoch(mode: CommitMode) -> Cluster {
    let mut c = Cluster::scripted(mode);
    tail_only_n2_heard(&mut c, 0, 20, 50);
    if mode == SyncQuorum {
        // Alone, n1 cannot prove it holds the committed prefix.
        assert!(!c.promote(N1));
        c.heal();
        // With n2 reachable, n2's longer log must be promoted instead.
        assert!(!c.promote(N1));
        return c;
    }
    assert!(c.promote(N1));
    write(&mut c, N1, 30, 5);
    c.crash(N1);
    c.restart_as_replica(N1);
    c.heal();
    assert!(c.head(N2) > c.head(N1));
    c
}

#[test]
fn s12_promotion_prefers_the_best_lineage_over_the_longest_log() {
    let mut c = n2_longer_on_a_stale_epoch(SyncAll);
    assert!(!c.promote(N2), "n2's longer log is from a stale epoch");
    assert!(c.promote(N1));
    converge(&mut c);
    let mut c = n2_longer_on_a_stale_epoch(SyncQuorum);
    assert!(c.promote(N2));
    converge(&mut c);
}

#[test]
fn s12_a_rebuilding_node_is_never_promoted() {
    let mut c = Cluster::scripted(SyncAll);
    n1_mid_rebuild(&mut c);
    c.crash(N0);
    assert!(!c.promote(N1));
    assert!(c.promote(N2));
    converge(&mut c);
}

#[test]
fn s16_restart_during_catch_up() {
    let mut c = Cluster::scripted(SyncAll);
    n1_misses(&mut c, 150);
    reach(&mut c, N0, N1, PeerState::CatchingUp, WAIT);
    c.crash(N1);
    c.settle(100);
    c.restart(N1);
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    converge(&mut c);
}

#[test]
fn s17_restart_during_rebuild_trusts_no_partial_base() {
    let mut c = Cluster::scripted(SyncQuorum);
    n1_mid_rebuild(&mut c);
    c.crash(N1);
    c.restart(N1);
    // It comes back still marked rebuilding, and only a fresh rebuild brings it in sync.
    assert!(c.is_rebuilding(N1));
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    assert!(!c.is_rebuilding(N1));
    converge(&mut c);
}

#[test]
fn s18_primary_restart_bumps_the_epoch_and_drops_in_flight_barriers() {
    let mut c = Cluster::scripted(SyncAll);
    let w = write(&mut c, N0, 0, 10);
    acked(&mut c, N0);
    write(&mut c, N0, 10, 5);
    let in_flight = c.flush_on(N0).expect("primary");
    c.crash(N0);
    let before = c.epoch(N0);
    c.settle(50);
    c.restart(N0);
    assert!(c.epoch(N0) > before);
    c.settle(1_000);
    // The barrier died with its primary: never acknowledged, never failed late.
    assert!(!c.outcomes.contains_key(&in_flight));
    assert!(holds(&c, N0, &w));
    converge(&mut c);
}

/// A primary that restarts while a replica is away keeps the WAL it had kept for that
/// replica: the replica comes back by catch-up, not by a rebuild of the whole volume. (Before,
/// a restarted primary held WAL only for replicas it had heard from since it started, so its
/// first checkpoint recycled what the absent one needed.)
#[test]
fn s18_primary_restart_keeps_the_wal_an_absent_replica_needs() {
    for mode in [BestEffort, SyncQuorum] {
        let mut c = Cluster::scripted(mode);
        write(&mut c, N0, 0, 10);
        acked(&mut c, N0);
        c.partition(N0, N1);
        let w = write(&mut c, N0, 10, 40);
        acked(&mut c, N0);
        c.crash(N0);
        c.settle(50);
        c.restart(N0);
        // Still away while the restarted primary writes (other blocks) and checkpoints.
        write(&mut c, N0, 50, 14);
        c.settle(500);
        assert_ne!(
            c.peer_state(N0, N1),
            Some(PeerState::NeedsRebuild),
            "{mode}"
        );
        c.heal();
        reach(&mut c, N0, N1, PeerState::InSync, WAIT);
        let k = c.counters(N0).expect("primary");
        assert_eq!(
            (k.rebuilds_needed, k.rebuilds_started),
            (0, 0),
            "{mode}: a replica away across a primary restart must not cost a rebuild"
        );
        assert!(k.catch_ups >= 1, "{mode}: {k:?}");
        acked(&mut c, N0);
        assert!(holds(&c, N1, &w), "{mode}: {}", c.describe());
        converge(&mut c);
    }
}

#[test]
fn s19_chain_of_custody_keeps_every_committed_write() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted(mode);
        let mut kept = Vec::new();
        let mut primary = N0;
        for (round, next) in [N1, N2, N0].into_iter().enumerate() {
            kept.extend(write(&mut c, primary, round as u64 * 10, 10));
            acked(&mut c, primary);
            c.crash(primary);
            assert!(c.promote(next), "{mode}: round {round}");
            assert!(
                holds(&c, next, &kept),
                "{mode}: n{next} lost committed writes"
            );
            c.restart(primary);
            assert!(c.all_in_sync(5_000), "{mode}: {}", c.describe());
            primary = next;
        }
        for n in [N0, N1, N2] {
            assert!(holds(&c, n, &kept), "{mode}: n{n}");
        }
        // (The liveness phase writes at random, so it comes after the checks.)
        converge(&mut c);
    }
}

#[test]
fn s20_live_partition_minority_primary_cannot_commit() {
    let mut c = Cluster::scripted(SyncQuorum);
    zombie_n0_replaced_by_n1(&mut c);
    let stale = write(&mut c, N0, 0, 5);
    assert_eq!(failed(&mut c, N0), "quorum_lost");
    let fresh = write(&mut c, N1, 0, 5);
    acked(&mut c, N1);
    c.heal();
    c.settle(1_000);
    assert!(c.is_fenced(N0));
    assert!(holds(&c, N2, &fresh) && holds_none(&c, N2, &stale));
    converge(&mut c);
    nobody_holds(&c, &stale);
}

// ---- 6.2 candidates and eligibility --------------------------------------------------

#[test]
fn candidate_all_equal_ties_break_by_name() {
    let mut c = Cluster::scripted(SyncAll);
    acked(&mut c, N0);
    c.crash(N0);
    assert_eq!(c.elect(N0), Some(N1));
    converge(&mut c);
}

#[test]
fn candidate_higher_lsn_wins() {
    let mut c = Cluster::scripted(SyncQuorum);
    n0_commits_without(&mut c, N1);
    assert_eq!(c.elect(N0), Some(N2));
    converge(&mut c);
}

#[test]
fn candidate_stopped_nodes_are_excluded_and_nothing_eligible_elects_nobody() {
    let mut c = Cluster::scripted(SyncAll);
    c.crash(N0);
    c.crash(N1);
    assert_eq!(c.elect(N0), Some(N2));
    let mut c = Cluster::scripted(SyncQuorum);
    c.crash(N0);
    c.crash(N1);
    assert_eq!(
        c.elect(N0),
        None,
        "one copy of three cannot prove the committed prefix"
    );
}

#[test]
fn candidate_needing_a_rebuild_is_skipped() {
    let mut c = Cluster::scripted(SyncQuorum);
    rebuild_n1(&mut c);
    c.crash(N0);
    assert_eq!(c.elect(N0), Some(N2));
    converge(&mut c);
}

#[test]
fn candidate_lagging_below_the_committed_lsn_is_refused() {
    let mut c = Cluster::scripted(SyncQuorum);
    n0_commits_without(&mut c, N2);
    assert!(
        !c.promote(N2),
        "n2 lacks entries n1 holds and n0 + n1 committed"
    );
    assert!(c.promote(N1));
    converge(&mut c);
}

// ---- 6.3 network and delivery ---------------------------------------------------------

#[test]
fn network_stale_traffic_after_a_promotion_is_rejected() {
    let mut c = Cluster::scripted(SyncQuorum);
    zombie_n0_replaced_by_n1(&mut c);
    let head = c.head(N2);
    // The old primary's traffic arrives after the promotion fenced n2.
    c.heal();
    let stale = write(&mut c, N0, 0, 3);
    c.settle(500);
    assert!(holds_none(&c, N2, &stale));
    assert!(c.head(N2) >= head);
    converge(&mut c);
}

#[test]
fn network_write_lost_before_its_barrier_is_never_falsely_acked() {
    let mut c = Cluster::scripted(SyncAll);
    let w = write(&mut c, N0, 0, 3);
    c.blip(N1);
    match c.flush_and_wait(N0, WAIT) {
        // Acknowledged only once the replica really holds it (the checker verifies too).
        Some(FlushOutcome::Acked) => assert!(holds(&c, N1, &w)),
        Some(FlushOutcome::Failed(_)) => {}
        None => panic!("the flush never answered"),
    }
    converge(&mut c);
}

#[test]
fn network_partition_mid_rebuild_starts_a_fresh_rebuild() {
    let mut c = Cluster::scripted(SyncQuorum);
    n1_mid_rebuild(&mut c);
    let started = c.counters(N0).expect("primary").rebuilds_started;
    c.partition(N0, N1);
    c.settle(300);
    assert!(c.is_rebuilding(N1), "a half-copied base is not a volume");
    c.heal();
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    assert!(c.counters(N0).expect("primary").rebuilds_started > started);
    converge(&mut c);
}

#[test]
fn network_late_barrier_ack_to_a_dead_primary_is_ignored() {
    let mut c = Cluster::scripted(SyncAll);
    write(&mut c, N0, 0, 3);
    let id = c.flush_on(N0).expect("primary");
    // The acks are in flight when the primary dies; its next life never sees them.
    c.crash(N0);
    c.restart(N0);
    c.settle(1_000);
    assert!(!c.outcomes.contains_key(&id));
    converge(&mut c);
}

// ---- 6.5 ownership and sessions ---------------------------------------------------------

#[test]
fn session_epoch_bump_during_catch_up_invalidates_it() {
    let mut c = Cluster::scripted(SyncAll);
    c.partition(N0, N1);
    write(&mut c, N0, 0, 150);
    // Under sync-all with n1 away, the flush fails; the writes stay on n0 and n2.
    let _ = c.flush_and_wait(N0, WAIT);
    c.heal();
    reach(&mut c, N0, N1, PeerState::CatchingUp, WAIT);
    c.crash(N0);
    assert!(c.promote(N2));
    // n1 follows the new primary through a fresh session decided by the new facts.
    reach(&mut c, N2, N1, PeerState::InSync, 5_000);
    converge(&mut c);
}

#[test]
fn session_replica_ahead_of_the_new_primary_is_never_merged() {
    // Under best-effort the tail was committed as far as n2 knew, so n2 refuses to cut it
    // and is rebuilt; either way nothing of the tail survives.
    let mut c = Cluster::scripted(BestEffort);
    // n2 receives an unacknowledged tail that n1 never sees.
    let tail = tail_only_n2_heard(&mut c, 0, 10, 50);
    assert!(c.promote(N1));
    c.heal();
    converge(&mut c);
    assert!(
        holds_none(&c, N2, &tail),
        "the old primary's tail was merged"
    );
}

/// The common case after a failover: n2 heard an uncommitted tail (sync-all never committed
/// it, n1 was cut off) that the new primary n1 lacks. n2 holds it only in its WAL (checkpoints
/// wait for the commit point), so the new primary has it cut in place, with no rebuild.
#[test]
fn session_replica_ahead_is_cut_in_place_not_rebuilt() {
    let mut c = Cluster::scripted(SyncAll);
    let before = write(&mut c, N0, 0, 5);
    acked(&mut c, N0);
    let tail = tail_only_n2_heard(&mut c, 10, 10, 20);
    assert!(c.promote(N1), "{}", c.describe());
    c.heal();
    reach(&mut c, N1, N2, PeerState::InSync, WAIT);
    let k = c.counters(N1).expect("primary");
    assert!(k.truncations >= 1, "{}", c.describe());
    assert_eq!(k.rebuilds_started, 0, "{}", c.describe());
    assert!(holds(&c, N2, &before));
    assert!(
        holds_none(&c, N2, &tail),
        "the old primary's tail was merged"
    );
    converge(&mut c);
}

#[test]
fn session_rebuild_completes_then_epoch_bumps() {
    let mut c = Cluster::scripted(SyncQuorum);
    force_rebuild_of_n1(&mut c);
    c.heal();
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    c.crash(N0);
    assert!(c.promote(N2));
    // The rebuilt replica must earn its place again with the new primary.
    reach(&mut c, N2, N1, PeerState::InSync, 5_000);
    converge(&mut c);
}

/// Raft's "figure 8" (Ongaro's thesis, §3.6.2), in blockrep's terms. n0 (epoch 1) writes an
/// entry at LSN 6 that only it holds, and crashes; n1 is promoted (epoch 2), writes a
/// different entry at LSN 6 that only it holds, and crashes; n0 comes back, is promoted
/// (epoch 3), catches n2 up with its old entry and answers a FLUSH on n0 + n2 (a majority).
/// n0 crashes. n1 must now be refused: n2 holds n0's epoch-3 entry, so n1's epoch-2 log is
/// older. Without that entry (the epoch-start record) n2's log ends at epoch 1, n1's
/// (epoch 2, LSN 6) compares higher, and promoting n1 loses the acknowledged write.
#[test]
fn figure8_an_older_epoch_entry_commits_only_through_the_current_epoch() {
    let mut c = Cluster::scripted(SyncQuorum);
    let before = write(&mut c, N0, 0, 5);
    acked(&mut c, N0);
    // n0 alone: its entry becomes durable there (the FLUSH syncs it, then fails).
    c.cut_off(N0);
    let only_n0 = write(&mut c, N0, 10, 1);
    failed(&mut c, N0);
    c.crash_keeping(N0, 0);
    c.heal();
    assert!(c.promote(N1), "{}", c.describe());
    c.cut_off(N1);
    let only_n1 = write(&mut c, N1, 20, 1);
    failed(&mut c, N1);
    c.crash_keeping(N1, 0);
    c.heal();
    c.restart_as_replica(N0);
    assert!(c.promote(N0), "{}", c.describe());
    assert!(
        c.wait_for(N0, N2, PeerState::InSync, WAIT),
        "{}",
        c.describe()
    );
    acked(&mut c, N0);
    assert!(holds(&c, N2, &only_n0), "{}", c.describe());
    c.crash_keeping(N0, 0);
    c.restart_as_replica(N1);
    assert!(
        !c.promote(N1),
        "n1's log must lose to n2's after n0's FLUSH at epoch 3\n{}",
        c.describe()
    );
    assert!(c.promote(N2), "{}", c.describe());
    clean(&c);
    converge(&mut c);
    assert!(holds(&c, N2, &before) && holds(&c, N2, &only_n0));
    assert!(holds_none(&c, N2, &only_n1));
}
