//! Scripted steps toward an interrupted rebuild, shared by the resume scenarios and the
//! mutant that trusts a cursor without its lineage.

#![allow(dead_code)]

use blockrep_replication::core::primary::PeerState;
use blockrep_sim::Cluster;

use crate::common::*;

/// n1 misses enough to need a rebuild; it comes back and n0 starts rebuilding it, with
/// writes going on so the WAL line has work too.
pub fn rebuild_n1(c: &mut Cluster) {
    c.partition(N0, N1);
    write(c, N0, 0, 260);
    c.settle(50);
    reach(c, N0, N1, PeerState::NeedsRebuild, WAIT);
    c.heal();
    reach(c, N0, N1, PeerState::Rebuilding, WAIT);
}

/// Runs until n1's durable cursor covers at least `bytes` of the base.
pub fn cursor_reaches(c: &mut Cluster, bytes: u64) {
    assert!(
        c.run_until_true(WAIT, |c| c
            .rebuild_cursor(N1)
            .is_some_and(|k| k.through >= bytes)),
        "n1 never wrote a cursor through {bytes}:{}",
        c.describe()
    );
}

/// Kills n1 (losing what it had not synced) and brings it back.
pub fn bounce_n1(c: &mut Cluster) {
    c.crash_losing_unsynced(N1);
    c.settle(20);
    c.restart(N1);
}

/// The base n1 holds part of came from n0's log, which ran on past what n2 has; n2 takes
/// over while n1 is down and writes its own entries at those LSNs. n1's cursor cannot be
/// vouched for (n2's history through the base is not the base's), so it starts over: a
/// resume would keep blocks from entries n2 never had.
pub fn lineage_changes_while_n1_is_away(c: &mut Cluster) {
    c.partition(N0, N1);
    write(c, N0, 0, 260);
    reach(c, N0, N1, PeerState::NeedsRebuild, WAIT);
    // n2 goes too; n0 writes on alone and, with nobody in sync, checkpoints past n2.
    c.partition(N0, N2);
    write(c, N0, 260, 20);
    assert!(c.run_until_true(WAIT, |c| c.peer_state(N0, N2) != Some(PeerState::InSync)));
    c.settle(200);
    c.heal();
    c.partition(N0, N2);
    c.partition(N1, N2);
    reach(c, N0, N1, PeerState::Rebuilding, WAIT);
    cursor_reaches(c, 8 * 4096);
    c.crash_losing_unsynced(N1);
    c.crash(N0);
    c.heal();
    assert!(c.promote(N2), "{}", c.describe());
    // n2 writes past the old base at its own epoch (to blocks n0's lone writes never
    // touched, so nothing later covers what a wrongly kept base would hold), and keeps its
    // WAL for the replicas it has not heard from.
    write(c, N2, 290, 30);
    c.restart(N1);
}
