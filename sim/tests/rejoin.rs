//! An old primary rejoining after a failover: brought in line by a cut and a catch-up
//! whenever what it must lose is only in its WAL and what it lacks is still in the new
//! primary's WAL, rebuilt only when its data file holds entries the new primary never had.
//! Every scenario ends with the liveness phase, which compares every volume block for block,
//! and the checker running throughout (no acknowledged write lost, none unacknowledged
//! revived).

mod common;

use blockrep_replication::core::primary::PeerState;
use blockrep_replication::core::CommitMode::{SyncAll, SyncQuorum};
use blockrep_sim::Cluster;
use common::*;

/// The trace lines that say how replicas recovered, for a failure message.
fn recovery(c: &Cluster) -> String {
    let lines = c.trace.iter().filter(|l| {
        ["rebuil", "cut", "crash", "checkpoint"]
            .iter()
            .any(|w| l.contains(w))
    });
    lines.fold(String::new(), |out, l| out + "\n" + l)
}

/// Writes on n0 until n1 holds entries n0 has not made durable (n0 ships entries before
/// its own fsync); returns what was written.
fn n1_holds_entries_n0_never_synced(c: &mut Cluster) -> Vec<(u64, u64)> {
    let mut written = Vec::new();
    for block in 20..60 {
        written.extend(write(c, N0, block, 1));
        if c.run_until_true(3, |c| c.head(N1) > c.durable(N0)) {
            return written;
        }
    }
    panic!("n1 never got ahead of n0's fsync:{}", c.describe());
}

/// The case that used to need a rebuild: n1's data file passed n0's log end before n1 was
/// promoted (a clean close, or a checkpoint that stopped waiting for its gate), so the
/// entries n0 lacks were no longer in n1's WAL. n1 kept its WAL after the committed LSN as
/// a replica, and n0 (whose log holds the committed prefix) catches up from there.
fn old_primary_behind_the_new_primarys_data_file(c: &mut Cluster) -> Vec<(u64, u64)> {
    let mut acked_writes = write(c, N0, 0, 10);
    acked(c, N0);
    acked_writes.extend(n1_holds_entries_n0_never_synced(c));
    c.checkpoint_past_the_gate(N1);
    c.crash_losing_unsynced(N0);
    let (image, wal_from) = c.checkpointed(N1);
    assert!(
        image > c.head(N0),
        "n1's data file ({image}) must be past n0's log end ({}):{}",
        c.head(N0),
        c.describe()
    );
    assert!(
        wal_from <= c.head(N0).next(),
        "n1 kept its WAL from {wal_from} only; n0 needs it from {}",
        c.head(N0).next()
    );
    assert!(c.promote(N1), "{}", c.describe());
    acked_writes
}

#[test]
fn rejoin_after_failover_behind_the_new_primarys_data_file_is_caught_up_not_rebuilt() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted(mode);
        let before = old_primary_behind_the_new_primarys_data_file(&mut c);
        let after = write(&mut c, N1, 0, 30);
        c.restart_as_replica(N0);
        reach(&mut c, N1, N0, PeerState::InSync, WAIT);
        acked(&mut c, N1);
        let k = c.counters(N1).expect("n1 is primary");
        assert_eq!(k.rebuilds_started, 0, "{}{}", c.describe(), recovery(&c));
        assert!(k.catch_ups >= 1, "{k:?}");
        lands(&mut c, N0, &[before, after].concat());
        converge(&mut c);
    }
}

#[test]
fn rejoin_interrupted_mid_catch_up_resumes_the_catch_up_not_a_rebuild() {
    let mut c = Cluster::scripted(SyncAll);
    let before = old_primary_behind_the_new_primarys_data_file(&mut c);
    // Enough for a catch-up of several reads.
    let after = write(&mut c, N1, 0, 100);
    c.restart_as_replica(N0);
    reach(&mut c, N1, N0, PeerState::CatchingUp, WAIT);
    c.crash_losing_unsynced(N0);
    let more = write(&mut c, N1, 5, 20);
    c.restart_as_replica(N0);
    reach(&mut c, N1, N0, PeerState::InSync, 5 * WAIT);
    acked(&mut c, N1);
    let k = c.counters(N1).expect("n1 is primary");
    assert_eq!(k.rebuilds_started, 0, "{}{}", c.describe(), recovery(&c));
    assert!(k.catch_ups >= 2, "{k:?}");
    lands(&mut c, N0, &[before, after, more].concat());
    converge(&mut c);
}

#[test]
fn rejoin_with_a_divergent_tail_only_in_the_wal_is_cut_and_caught_up() {
    let mut c = Cluster::scripted(SyncAll);
    let before = write(&mut c, N0, 0, 10);
    acked(&mut c, N0);
    // A tail n1 never hears of; n0 crashes before the barrier timeout drops n1, so its
    // checkpoints still wait for n1 and the tail is only in its WAL.
    c.partition(N0, N1);
    let tail = write(&mut c, N0, 30, 10);
    c.settle(20);
    c.crash_keeping(N0, 10);
    c.heal();
    // n1 promoted after a clean close: its data file holds all it had.
    c.checkpoint_past_the_gate(N1);
    assert!(c.promote(N1), "{}", c.describe());
    let after = write(&mut c, N1, 40, 10);
    c.restart_as_replica(N0);
    reach(&mut c, N1, N0, PeerState::InSync, WAIT);
    let k = c.counters(N1).expect("n1 is primary");
    assert!(k.truncations >= 1, "{k:?}{}", recovery(&c));
    assert_eq!(k.rebuilds_started, 0, "{}{}", c.describe(), recovery(&c));
    lands(&mut c, N0, &[before, after.clone()].concat());
    let revived: Vec<_> = tail
        .iter()
        .filter(|(b, _)| !after.iter().any(|(a, _)| a == b))
        .copied()
        .collect();
    assert!(holds_none(&c, N0, &revived), "the cut tail came back");
    converge(&mut c);
}

#[test]
fn rejoin_with_a_checkpointed_divergent_tail_is_rebuilt() {
    let mut c = Cluster::scripted(SyncAll);
    let before = write(&mut c, N0, 0, 10);
    acked(&mut c, N0);
    c.cut_off(N0);
    let tail = write(&mut c, N0, 30, 10);
    failed(&mut c, N0);
    // The tail reached n0's data file: no cut can take it back.
    c.checkpoint_past_the_gate(N0);
    c.crash_losing_unsynced(N0);
    c.heal();
    assert!(c.promote(N1), "{}", c.describe());
    let after = write(&mut c, N1, 40, 10);
    c.restart_as_replica(N0);
    reach(&mut c, N1, N0, PeerState::InSync, 5 * WAIT);
    let k = c.counters(N1).expect("n1 is primary");
    assert!(k.rebuilds_done >= 1, "{k:?}");
    lands(&mut c, N0, &[before, after].concat());
    assert!(holds_none(&c, N0, &tail), "the checkpointed tail survived");
    converge(&mut c);
}
