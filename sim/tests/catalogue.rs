//! The scenario catalogue, continued (protocol brief, sections 5.2, 6.2 and 6.3): the timer
//! races that need a cluster (our reservation timer is the retention time budget), the
//! five-node rows, ranking after a partition and stale traffic after a promotion. Each runs
//! the real cores under the simulator's checker (committed never regresses, acknowledged
//! FLUSHes durable, promoted nodes hold the committed prefix) and ends by converging. The
//! table in docs/PROTOCOL.md maps scenario names to these tests.

mod common;

use blockrep_replication::core::primary::PeerState;
use blockrep_replication::core::CommitMode::{BestEffort, SyncAll, SyncQuorum};
use blockrep_sim::Cluster;

use common::*;

/// The simulator's retention time budget (`primary_config` in `sim/src/cluster/mod.rs`).
const RETENTION_TIME: u64 = 5_000;

const N3: usize = 3;
const N4: usize = 4;

// ---- 5.2 timer races ------------------------------------------------------------------

/// Race_PromotionThenStaleCatchupTimeout: n1 is catching up from n0 when n0 is cut off and
/// n2 promoted. The zombie's retention deadline for n1 passes while it is still running; its
/// timer acts only on its own core, whose every frame is at an epoch n1 now refuses: n1 is
/// never rebuilt for it, follows the new primary by catch-up, the zombie is fenced once the
/// network heals, and the committed prefix never regresses (the checker).
#[test]
fn race_promotion_then_stale_catch_up_timeout_regresses_nothing() {
    let mut c = Cluster::scripted(SyncQuorum);
    c.partition(N0, N1);
    let w = write(&mut c, N0, 0, 150);
    acked(&mut c, N0);
    c.heal();
    reach(&mut c, N0, N1, PeerState::CatchingUp, WAIT);
    c.cut_off(N0);
    assert!(c.promote(N2), "{}", c.describe());
    reach(&mut c, N2, N1, PeerState::InSync, WAIT);
    // The zombie's deadline for n1 passes.
    c.settle(RETENTION_TIME + 1_000);
    assert_eq!(
        c.peer_state(N0, N1),
        Some(PeerState::NeedsRebuild),
        "the zombie's stale timer never fired"
    );
    clean(&c);
    assert!(!c.is_rebuilding(N1));
    c.heal();
    assert!(
        c.run_until_true(WAIT, |c| c.is_fenced(N0)),
        "{}",
        c.describe()
    );
    let k = c.counters(N2).expect("primary");
    assert_eq!(k.rebuilds_started, 0, "{}", c.describe());
    lands(&mut c, N1, &w);
    lands(&mut c, N2, &w);
    acked(&mut c, N2);
    converge(&mut c);
}

/// Race_EpochBumpsDuringCatchupTimeout: n1 has been away from n0 for most of the retention
/// time when n0 restarts at a new epoch. The old epoch's deadline then passes and is
/// ignored: the timer belonged to the old core, and the new one holds the WAL its store kept
/// for n1 on a clock of its own (`Peer::new`), so n1 comes back by catch-up, not a rebuild.
#[test]
fn race_epoch_bumps_during_the_retention_timeout_ignores_it() {
    let mut c = Cluster::scripted(BestEffort);
    acked(&mut c, N0);
    c.partition(N0, N1);
    let w = write(&mut c, N0, 0, 40);
    acked(&mut c, N0);
    c.settle(RETENTION_TIME - 500);
    assert_ne!(c.peer_state(N0, N1), Some(PeerState::NeedsRebuild));
    let before = c.epoch(N0);
    c.crash(N0);
    c.settle(50);
    c.restart(N0);
    assert!(c.epoch(N0) > before);
    // Past the old epoch's deadline for n1.
    c.settle(1_500);
    assert_ne!(
        c.peer_state(N0, N1),
        Some(PeerState::NeedsRebuild),
        "{}",
        c.describe()
    );
    c.heal();
    reach(&mut c, N0, N1, PeerState::InSync, WAIT);
    let k = c.counters(N0).expect("primary");
    assert_eq!((k.rebuilds_needed, k.rebuilds_started), (0, 0), "{k:?}");
    assert!(k.catch_ups >= 1, "{k:?}");
    lands(&mut c, N1, &w);
    converge(&mut c);
}

/// StaleReservationTimeout_AfterRecoverySuccess (and Race_CatchupConverges_CancelsTimeout,
/// end to end): n1 is away for most of the retention time, comes back and catches up; the
/// deadline that would have released it passes while it is in sync and under load, and
/// nothing is undone: every FLUSH (sync-all, so n1 must count) is acknowledged and no
/// rebuild is ever needed.
#[test]
fn stale_retention_timeout_after_recovery_success_keeps_in_sync() {
    let mut c = Cluster::scripted(SyncAll);
    c.partition(N0, N1);
    write(&mut c, N0, 0, 30);
    c.settle(RETENTION_TIME - 1_000);
    c.heal();
    reach(&mut c, N0, N1, PeerState::InSync, WAIT);
    for round in 0..30 {
        let w = write(&mut c, N0, round * 3, 3);
        acked(&mut c, N0);
        lands(&mut c, N1, &w);
        c.settle(100);
        assert_eq!(
            c.peer_state(N0, N1),
            Some(PeerState::InSync),
            "round {round}"
        );
    }
    let k = c.counters(N0).expect("primary");
    assert_eq!((k.rebuilds_needed, k.rebuilds_started), (0, 0), "{k:?}");
    converge(&mut c);
}

// ---- 6.2 candidates ---------------------------------------------------------------------

/// Ranking updates after a partition: while n1 is cut off, n2 holds the longer log and
/// would be the candidate; once the partition heals and n1 catches up, both hold the same
/// log and the tie goes to the lower name. The ranking is computed from the facts at
/// promotion time (`promotion::check` on fresh probes), never cached.
#[test]
fn candidate_ranking_updates_after_a_partition() {
    let mut c = Cluster::scripted(SyncQuorum);
    c.partition(N0, N1);
    write(&mut c, N0, 0, 10);
    acked(&mut c, N0);
    assert!(c.head(N2) > c.head(N1));
    c.heal();
    assert!(c.all_in_sync(WAIT), "{}", c.describe());
    // In sync means the catch-up has shipped through the head; wait for it to land.
    assert!(c.run_until_true(WAIT, |c| c.durable(N1) == c.head(N0)));
    assert_eq!(c.head(N1), c.head(N2));
    c.crash(N0);
    assert_eq!(c.elect(N0), Some(N1));
    converge(&mut c);
}

// ---- 6.3 network and delivery -----------------------------------------------------------

/// 5-node reservation expiry with mixed outcomes: with two of four replicas away, n1 comes
/// back within the budget and catches up, while n2 stays away past the byte budget and is
/// released to a rebuild; n3 and n4 stay in sync and sync-quorum keeps committing
/// throughout (a majority of five is three).
#[test]
fn five_node_retention_expiry_with_mixed_outcomes() {
    let mut c = Cluster::scripted_nodes(SyncQuorum, 5);
    c.partition(N0, N1);
    c.partition(N0, N2);
    let early = write(&mut c, N0, 0, 30);
    acked(&mut c, N0);
    // n1 comes back; n2 stays away.
    c.heal();
    c.partition(N0, N2);
    reach(&mut c, N0, N1, PeerState::InSync, WAIT);
    lands(&mut c, N1, &early);
    // Paced so the in-sync replicas' progress is asked about as the WAL grows (see
    // `budget_entries_never_release_an_in_sync_replica_on_stale_progress`).
    let mut late = Vec::new();
    for chunk in 0..10 {
        late.extend(write(&mut c, N0, 30 + chunk * 25, 25));
        acked(&mut c, N0);
    }
    reach(&mut c, N0, N2, PeerState::NeedsRebuild, WAIT);
    for n in [N1, N3, N4] {
        assert_eq!(c.peer_state(N0, n), Some(PeerState::InSync), "n{n}");
        lands(&mut c, n, &late);
    }
    c.heal();
    reach(&mut c, N0, N2, PeerState::InSync, 5_000);
    let k = c.counters(N0).expect("primary");
    assert_eq!(k.rebuilds_started, 1, "only n2 is rebuilt: {k:?}");
    assert!(k.catch_ups >= 1, "{k:?}");
    converge(&mut c);
}

/// 5-node, all lagging replicas need a rebuild: the primary is cut off from all four and
/// writes past the byte budget (best-effort, so it keeps acknowledging on its own fsync).
/// One dead replica, or four, never stops writes: each is released in turn (one per tick),
/// and when the network heals each comes back and ends holding the primary's volume: by a
/// rebuild, or by a catch-up when the entries it lacks happen to be still in the WAL (a
/// rebuild running for another replica holds the WAL after its base).
#[test]
fn five_node_all_lagging_replicas_need_a_rebuild() {
    let mut c = Cluster::scripted_nodes(BestEffort, 5);
    c.cut_off(N0);
    let w = write(&mut c, N0, 0, 260);
    acked(&mut c, N0);
    for n in [N1, N2, N3, N4] {
        reach(&mut c, N0, n, PeerState::NeedsRebuild, WAIT);
    }
    c.heal();
    for n in [N1, N2, N3, N4] {
        reach(&mut c, N0, n, PeerState::InSync, 10_000);
        lands(&mut c, n, &w);
    }
    let k = c.counters(N0).expect("primary");
    assert!(k.rebuilds_needed >= 4, "{k:?}");
    assert!(
        k.rebuilds_done >= 3 && k.rebuilds_done + k.catch_ups >= 4,
        "{k:?}"
    );
    converge(&mut c);
}

/// All stale traffic is rejected, with an explicit reason: after a promotion the zombie's
/// frames reach the fenced members, which refuse them and say why; the zombie records the
/// refusal that fenced it (the epoch that replaced it and the replica's own reason) and
/// nothing it wrote after the promotion is in any other store. The per-frame reasons are
/// the core test `all_stale_traffic_is_rejected_with_explicit_reasons`.
#[test]
fn network_all_stale_traffic_is_rejected_with_a_reason() {
    let mut c = Cluster::scripted(SyncQuorum);
    c.cut_off(N0);
    assert!(c.promote(N1), "{}", c.describe());
    let new_epoch = c.epoch(N1);
    let stale = write(&mut c, N0, 0, 5);
    c.heal();
    assert!(
        c.run_until_true(WAIT, |c| c.is_fenced(N0)),
        "{}",
        c.describe()
    );
    let fence = format!("n0 fenced by epoch {new_epoch}: replica ");
    let line = c
        .trace
        .iter()
        .find(|l| l.contains(&fence))
        .unwrap_or_else(|| panic!("no fence with its reason in the trace"));
    assert!(line.contains("epoch"), "{line}");
    assert!(holds_none(&c, N1, &stale) && holds_none(&c, N2, &stale));
    converge(&mut c);
    nobody_holds(&c, &stale);
}

/// A burst that outruns the progress asks: every replica is in sync and answers every ask,
/// but 250 writes land (10 per millisecond) faster than the primary asks for progress
/// (every 30 ms). The byte budget must not release a replica that is in sync and answering:
/// the WAL it seems to hold is only what the primary has not asked about yet.
///
/// Bug: `enforce_retention` (`core/primary/durability.rs`) releases the peer holding the
/// oldest pin once the WAL behind it passes `retention_bytes`, and an in-sync replica's pin is
/// its last *reported* durable LSN, which lags by up to `progress_interval`; outside sync-all
/// nothing exempts it. Proposed fix in the final report of the catalogue branch.
#[test]
fn budget_entries_never_release_an_in_sync_replica_on_stale_progress() {
    for mode in [BestEffort, SyncQuorum] {
        let mut c = Cluster::scripted(mode);
        write(&mut c, N0, 0, 250);
        acked(&mut c, N0);
        let k = c.counters(N0).expect("primary");
        assert_eq!(k.rebuilds_needed, 0, "{mode}: {}", c.describe());
        converge(&mut c);
    }
}
