//! Resumable rebuilds, scripted: a rebuild interrupted at each of its phases, interrupted
//! twice, across a restart of the primary, and after the base's lineage changed while the
//! replica was away (which must start over). Each ends with the cluster converging, every
//! volume compared block for block, and the checker clean.

mod common;
mod resume;

use blockrep_replication::core::primary::{PeerState, RebuildRestart};
use blockrep_replication::core::CommitMode::{BestEffort, SyncAll, SyncQuorum};
use blockrep_sim::Cluster;
use common::*;
use resume::*;

fn restarts(c: &Cluster, p: usize, reason: RebuildRestart) -> u64 {
    c.counters(p).expect("primary").rebuild_restarts[reason as usize]
}

/// Interrupted before its store began (the base was not even chosen), while the base
/// streams, once the whole base is there, and while it finishes: each time it comes back
/// in sync and byte for byte the primary's; from a cursor, it is resumed.
#[test]
fn an_interrupted_rebuild_resumes_from_its_cursor_at_every_phase() {
    for mode in [SyncAll, SyncQuorum, BestEffort] {
        // Mid base: resumed, and the image continues from the cursor.
        let mut c = Cluster::scripted(mode);
        rebuild_n1(&mut c);
        cursor_reaches(&mut c, 8 * 4096);
        let at = c.rebuild_cursor(N1).expect("cursor").through;
        bounce_n1(&mut c);
        assert!(c.is_rebuilding(N1), "{mode}");
        assert!(
            c.run_until_true(WAIT, |c| c
                .peer_rebuild(N0, N1)
                .is_some_and(|r| r.resumed_from.is_some())),
            "{mode}: not resumed:{}",
            c.describe()
        );
        let from = c.peer_rebuild(N0, N1).and_then(|r| r.resumed_from);
        assert!(from.is_some_and(|f| f >= at), "{mode}: {from:?} < {at}");
        write(&mut c, N0, 300, 30);
        reach(&mut c, N0, N1, PeerState::InSync, 5_000);
        assert_eq!(
            c.counters(N0).expect("primary").rebuilds_resumed,
            1,
            "{mode}"
        );
        converge(&mut c);

        // The whole base received (the cursor at the volume's end), finishing or not.
        let mut c = Cluster::scripted(mode);
        rebuild_n1(&mut c);
        cursor_reaches(&mut c, 64 * 4096);
        bounce_n1(&mut c);
        reach(&mut c, N0, N1, PeerState::InSync, 5_000);
        assert_eq!(
            c.counters(N0).expect("primary").rebuilds_resumed,
            1,
            "{mode}"
        );
        converge(&mut c);

        // Before any cursor: it starts over, and says why.
        let mut c = Cluster::scripted(mode);
        rebuild_n1(&mut c);
        assert!(c.run_until_true(WAIT, |c| c.is_rebuilding(N1)));
        assert_eq!(c.rebuild_cursor(N1), None);
        bounce_n1(&mut c);
        reach(&mut c, N0, N1, PeerState::InSync, 5_000);
        let k = c.counters(N0).expect("primary");
        assert_eq!(k.rebuilds_resumed, 0, "{mode}");
        assert_eq!(
            restarts(&c, N0, RebuildRestart::NoCursor),
            1,
            "{mode}: {k:?}"
        );
        converge(&mut c);
    }
}

#[test]
fn a_rebuild_interrupted_twice_resumes_twice() {
    let mut c = Cluster::scripted(SyncAll);
    rebuild_n1(&mut c);
    cursor_reaches(&mut c, 8 * 4096);
    bounce_n1(&mut c);
    let first = c.rebuild_cursor(N1).expect("cursor").through;
    cursor_reaches(&mut c, first + 8 * 4096);
    bounce_n1(&mut c);
    write(&mut c, N0, 300, 20);
    reach(&mut c, N0, N1, PeerState::InSync, 5_000);
    assert_eq!(c.counters(N0).expect("primary").rebuilds_resumed, 2);
    converge(&mut c);
}

/// The primary restarts (a new epoch, the same store and log) while the replica rebuilds:
/// its WAL after the base was held across the restart, so the new run vouches for the base
/// and resumes.
#[test]
fn a_rebuild_resumes_across_a_primary_restart() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted(mode);
        rebuild_n1(&mut c);
        cursor_reaches(&mut c, 8 * 4096);
        c.crash(N0);
        c.settle(20);
        c.restart(N0);
        write(&mut c, N0, 300, 20);
        reach(&mut c, N0, N1, PeerState::InSync, 5_000);
        let k = c.counters(N0).expect("primary");
        assert_eq!(k.rebuilds_resumed, 1, "{mode}: {k:?}");
        converge(&mut c);
    }
}

/// (Once it has started over from n2's own base, a later interruption of that rebuild may
/// resume: that base is n2's.)
#[test]
fn a_rebuild_whose_lineage_changed_while_the_replica_was_away_starts_over() {
    let mut c = Cluster::scripted(BestEffort);
    lineage_changes_while_n1_is_away(&mut c);
    assert!(c.run_until_true(WAIT, |c| c.peer_rebuild(N2, N1).is_some()));
    let k = c.counters(N2).expect("primary");
    assert_eq!(k.rebuilds_resumed, 0, "{k:?}");
    assert_eq!(restarts(&c, N2, RebuildRestart::LineageChanged), 1, "{k:?}");
    reach(&mut c, N2, N1, PeerState::InSync, 5_000);
    converge(&mut c);
}
