use bytes::Bytes;

use super::*;
use crate::wire::{Body, RejectReason};

const E: Epoch = Epoch(3);

fn rid(n: &str) -> ReplicaId {
    ReplicaId(n.into())
}

fn rec(lsn: u64, epoch: Epoch) -> WalRecord {
    WalRecord::new(
        Lsn(lsn),
        epoch,
        blockrep_storage::RecordKind::Write,
        0,
        4096,
        Bytes::from(vec![lsn as u8; 4096]),
    )
}

fn core(mode: CommitMode, replicas: &[&str], head: u64) -> PrimaryCore {
    // Its WAL still holds the whole log, as a fresh store's does.
    core_keeping(mode, replicas, head, 1)
}

/// A primary (re)started on a store whose WAL holds the entries from `kept_from` on.
fn core_keeping(mode: CommitMode, replicas: &[&str], head: u64, kept_from: u64) -> PrimaryCore {
    let cfg = PrimaryConfig::new(
        VolumeId([1; 16]),
        1 << 30,
        VolumeId([2; 16]),
        E,
        mode,
        replicas.iter().map(|r| rid(r)).collect(),
    );
    let history = if head > 0 { vec![(E, Lsn(1))] } else { vec![] };
    PrimaryCore::new(cfg, Lsn(head), history, Lsn(head), Lsn(kept_from), 0)
}

fn sessions(actions: &[Action]) -> Vec<(ReplicaId, SessionId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Connect { replica, session } => Some((replica.clone(), *session)),
            _ => None,
        })
        .collect()
}

fn frames_to(actions: &[Action], who: &str) -> Vec<Body> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { replica, frame, .. } if replica.0 == who => Some(frame.body.clone()),
            _ => None,
        })
        .collect()
}

fn reply(c: &mut PrimaryCore, r: &ReplicaId, s: SessionId, body: Body, now: Millis) -> Vec<Action> {
    c.step(Event::Received {
        replica: r.clone(),
        session: s,
        frame: Frame { epoch: E, body },
        now,
    })
}

/// Connects every replica and answers its hello with `durable` (epoch `E`).
fn bring_up(c: &mut PrimaryCore, durable: u64) -> Vec<(ReplicaId, SessionId)> {
    let dialled = tick(c, 0);
    for (r, _) in sessions(&dialled) {
        hello(c, &dialled, &r.0, durable, 0);
    }
    sessions(&dialled)
}

/// Connects replica `r` (dialled by `actions`) and answers its hello with `durable`.
fn hello(
    c: &mut PrimaryCore,
    actions: &[Action],
    r: &str,
    durable: u64,
    now: Millis,
) -> Vec<Action> {
    let (id, session) = sessions(actions)
        .into_iter()
        .find(|(id, _)| id.0 == r)
        .unwrap();
    let a = c.step(Event::Connected {
        replica: id.clone(),
        session,
        now,
    });
    assert!(matches!(frames_to(&a, r)[..], [Body::Hello { .. }]));
    let body = Body::HelloOk {
        replica_store: VolumeId([9; 16]),
        durable: Lsn(durable),
        durable_epoch: E,
        committed: Lsn(0),
        rebuilding: false,
        cursor: None,
    };
    reply(c, &id, session, body, now)
}

fn done(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::BarrierDone { id } => Some(*id),
            _ => None,
        })
        .collect()
}

fn failed(actions: &[Action]) -> Vec<(u64, BarrierFailure)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::BarrierFailed { id, reason } => Some((*id, *reason)),
            _ => None,
        })
        .collect()
}

fn state(c: &PrimaryCore, r: &str) -> PeerState {
    c.peers().into_iter().find(|p| p.id.0 == r).unwrap().state
}

/// Entries `from..=to` appended at epoch `E`.
fn append(c: &mut PrimaryCore, from: u64, to: u64) -> Vec<Action> {
    c.step(Event::Appended {
        records: (from..=to).map(|l| rec(l, E)).collect(),
    })
}

fn tick(c: &mut PrimaryCore, now: Millis) -> Vec<Action> {
    tick_pinned(c, now, 0)
}

/// A tick that finds `pinned_bytes` of WAL held for the replicas.
fn tick_pinned(c: &mut PrimaryCore, now: Millis, pinned_bytes: u64) -> Vec<Action> {
    c.step(Event::Tick { now, pinned_bytes })
}

/// Replica `r` (of the sessions `bring_up` returned) reports itself durable through `lsn`.
fn ack(c: &mut PrimaryCore, s: &[(ReplicaId, SessionId)], r: &str, lsn: u64, now: Millis) {
    let (id, session) = s.iter().find(|(id, _)| id.0 == r).unwrap();
    reply(c, id, *session, Body::BarrierAck { durable: Lsn(lsn) }, now);
}

#[test]
fn zero_gap_handshake_goes_in_sync_and_ships_live_entries() {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 10);
    bring_up(&mut c, 10);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    let a = append(&mut c, 11, 12);
    for r in ["a", "b"] {
        match &frames_to(&a, r)[..] {
            [Body::Entries { records, .. }] => {
                assert_eq!(
                    records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
                    vec![11, 12]
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn sync_all_barrier_needs_every_replica_durable() {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    let a = c.step(Event::Barrier {
        id: 7,
        target: Lsn(1),
        now: 10,
    });
    assert!(matches!(
        frames_to(&a, "a")[..],
        [Body::Barrier { lsn: Lsn(1), .. }]
    ));
    assert!(done(&c.step(Event::LocalDurable { lsn: Lsn(1) })).is_empty());
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        11,
    );
    assert!(
        done(&a).is_empty(),
        "one replica is not enough for sync-all"
    );
    let a = reply(
        &mut c,
        &s[1].0,
        s[1].1,
        Body::BarrierAck { durable: Lsn(1) },
        12,
    );
    assert_eq!(done(&a), vec![7]);
    assert!(a.contains(&Action::Committed { lsn: Lsn(1) }));
}

#[test]
fn sync_all_with_a_replica_missing_fails_after_the_timeout_and_never_downgrades() {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    c.step(Event::Disconnected {
        replica: s[1].0.clone(),
        session: s[1].1,
        now: 5,
        reason: "gone".into(),
    });
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 10,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        11,
    );
    assert!(done(&a).is_empty());
    assert!(failed(&tick(&mut c, 5009)).is_empty());
    let a = tick(&mut c, 5010);
    assert_eq!(failed(&a), vec![(1, BarrierFailure::ReplicaMissing)]);
    assert_eq!(c.committed(), Lsn(0));
}

#[test]
fn a_barrier_is_answered_by_the_copies_in_sync_now() {
    // Everything through LSN 1 was durable on both replicas once (committed = 1); then b
    // goes away. A FLUSH through 1 (or through 0, nothing new written) is a promise about
    // every replica *now*: sync-all must not answer it from the high-water mark.
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 10,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    for (r, sess) in &s {
        reply(&mut c, r, *sess, Body::BarrierAck { durable: Lsn(1) }, 11);
    }
    assert_eq!(c.committed(), Lsn(1));
    c.step(Event::Disconnected {
        replica: s[1].0.clone(),
        session: s[1].1,
        now: 20,
        reason: "gone".into(),
    });
    for (id, target) in [(2, 1), (3, 0)] {
        let a = c.step(Event::Barrier {
            id,
            target: Lsn(target),
            now: 30,
        });
        assert!(done(&a).is_empty(), "FLUSH through {target} with b away");
    }
    let a = tick(&mut c, 5030);
    let mut f = failed(&a);
    f.sort_by_key(|(id, _)| *id);
    assert_eq!(
        f,
        vec![
            (2, BarrierFailure::ReplicaMissing),
            (3, BarrierFailure::ReplicaMissing)
        ]
    );
    assert_eq!(c.committed(), Lsn(1), "the high-water mark never goes down");
}

#[test]
fn sync_quorum_commits_with_one_replica_down() {
    let mut c = core(CommitMode::SyncQuorum, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    c.step(Event::Disconnected {
        replica: s[1].0.clone(),
        session: s[1].1,
        now: 5,
        reason: "gone".into(),
    });
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 10,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        11,
    );
    assert_eq!(done(&a), vec![1]);
}

#[test]
fn best_effort_completes_on_the_local_fsync_and_marks_a_silent_replica() {
    let mut c = core(CommitMode::BestEffort, &["a"], 0);
    bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 10,
    });
    let a = c.step(Event::LocalDurable { lsn: Lsn(1) });
    assert_eq!(done(&a), vec![1]);
    // The replica never answers its barrier: it is degraded, even though nothing failed.
    let a = tick(&mut c, 5010);
    assert!(a.iter().any(|x| matches!(x, Action::Close { .. })));
    assert_eq!(state(&c, "a"), PeerState::Disconnected);
}

#[test]
fn a_received_but_not_durable_lsn_never_counts() {
    // The only durability input is BarrierAck (sent after the replica's fsync); a barrier
    // ack below the target does not complete it.
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 2);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(2),
        now: 0,
    });
    c.step(Event::LocalDurable { lsn: Lsn(2) });
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        1,
    );
    assert!(done(&a).is_empty());
    assert_eq!(c.committed(), Lsn(1));
}

#[test]
fn stale_session_results_are_ignored() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    c.step(Event::Disconnected {
        replica: s[0].0.clone(),
        session: s[0].1,
        now: 1,
        reason: "x".into(),
    });
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 1,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    // A late ack from the dead session must not count.
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        2,
    );
    assert!(done(&a).is_empty());
    assert!(a.is_empty());
}

#[test]
fn a_higher_epoch_fences_the_primary() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 4,
        target: Lsn(1),
        now: 0,
    });
    let a = c.step(Event::Received {
        replica: s[0].0.clone(),
        session: s[0].1,
        frame: Frame {
            epoch: Epoch(4),
            body: Body::Reject {
                reason: RejectReason::StaleEpoch,
                message: "newer primary".into(),
            },
        },
        now: 1,
    });
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Fenced {
            epoch: Epoch(4),
            ..
        }
    )));
    assert_eq!(failed(&a), vec![(4, BarrierFailure::Fenced)]);
    let a = c.step(Event::Barrier {
        id: 5,
        target: Lsn(1),
        now: 2,
    });
    assert_eq!(failed(&a), vec![(5, BarrierFailure::Fenced)]);
    // And nothing is shipped any more.
    let a = append(&mut c, 2, 2);
    assert!(a.is_empty());
}

#[test]
fn a_lagging_replica_catches_up_from_retained_wal_then_ships_live() {
    let mut c = core(CommitMode::SyncAll, &["a"], 10);
    let a = tick(&mut c, 0);
    let (r, sid) = sessions(&a)[0].clone();
    c.step(Event::Connected {
        replica: r.clone(),
        session: sid,
        now: 0,
    });
    let a = reply(
        &mut c,
        &r,
        sid,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(6),
            durable_epoch: E,
            committed: Lsn(0),
            rebuilding: false,
            cursor: None,
        },
        0,
    );
    assert_eq!(state(&c, "a"), PeerState::CatchingUp);
    assert!(a.contains(&Action::PinWal { from: Some(Lsn(7)) }));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::ReadWal { from: Lsn(7), .. })));
    // Meanwhile a live entry arrives; it is not shipped to a catching-up replica.
    let a = append(&mut c, 11, 11);
    assert!(frames_to(&a, "a").is_empty());
    let a = c.step(Event::WalRead {
        replica: r.clone(),
        session: sid,
        from: Lsn(7),
        records: (7..=8).map(|l| rec(l, E)).collect(),
        now: 1,
    });
    match &frames_to(&a, "a")[..] {
        [Body::Entries { records, .. }] => {
            assert_eq!(
                records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
                vec![7, 8]
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::ReadWal { from: Lsn(9), .. })));
    // The read returns past the core's head (12 is not appended yet): only through 11.
    let a = c.step(Event::WalRead {
        replica: r.clone(),
        session: sid,
        from: Lsn(9),
        records: (9..=12).map(|l| rec(l, E)).collect(),
        now: 2,
    });
    match &frames_to(&a, "a")[..] {
        [Body::Entries { records, .. }] => {
            assert_eq!(
                records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
                vec![9, 10, 11]
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(state(&c, "a"), PeerState::InSync);
    let a = append(&mut c, 12, 12);
    assert!(
        matches!(&frames_to(&a, "a")[..], [Body::Entries { records, .. }] if records[0].lsn == Lsn(12))
    );
}

/// A primary at head 10 whose log has epoch 2 from LSN 1 and epoch 3 (E) from LSN 5, with
/// replica "a" connected and its hello answered with `durable` of `durable_epoch`.
fn diverged(
    durable: u64,
    durable_epoch: Epoch,
    auto_rebuild: bool,
) -> (PrimaryCore, ReplicaId, SessionId, Vec<Action>) {
    let mut cfg = PrimaryConfig::new(
        VolumeId([1; 16]),
        1 << 30,
        VolumeId([2; 16]),
        E,
        CommitMode::SyncAll,
        vec![rid("a")],
    );
    cfg.auto_rebuild = auto_rebuild;
    let mut c = PrimaryCore::new(
        cfg,
        Lsn(10),
        vec![(Epoch(2), Lsn(1)), (E, Lsn(5))],
        Lsn(10),
        Lsn(11),
        0,
    );
    let a = tick(&mut c, 0);
    let (r, sid) = sessions(&a)[0].clone();
    c.step(Event::Connected {
        replica: r.clone(),
        session: sid,
        now: 0,
    });
    let a = reply(
        &mut c,
        &r,
        sid,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(durable),
            durable_epoch,
            committed: Lsn(0),
            rebuilding: false,
            cursor: None,
        },
        0,
    );
    (c, r, sid, a)
}

fn truncated(durable: u64, epoch: Epoch, refusal: &str) -> Body {
    Body::Truncated {
        durable: Lsn(durable),
        durable_epoch: epoch,
        refusal: refusal.into(),
    }
}

#[test]
fn a_diverged_replica_is_cut_back_to_the_shared_log_never_merged() {
    // The replica's entry 6 is from epoch 2: it came from an old primary that we never
    // followed past LSN 4, where our epoch 2 ends.
    let (mut c, r, sid, a) = diverged(6, Epoch(2), true);
    assert_eq!(frames_to(&a, "a"), vec![Body::Truncate { keep: Lsn(4) }]);
    assert_eq!(state(&c, "a"), PeerState::Handshake);
    // Cut: the logs now agree through 4, and it catches up from 5 on the same session.
    let a = reply(&mut c, &r, sid, truncated(4, Epoch(2), ""), 1);
    assert_eq!(state(&c, "a"), PeerState::CatchingUp);
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::ReadWal { from, .. } if *from == Lsn(5))));
    assert_eq!(c.counters().truncations, 1);
    assert_eq!(c.counters().rebuilds_started, 0);

    // A store that refuses the cut (its data file holds a discarded entry) is rebuilt.
    let (mut c, r, sid, _) = diverged(6, Epoch(2), true);
    let a = reply(
        &mut c,
        &r,
        sid,
        truncated(6, Epoch(2), "data file ahead"),
        1,
    );
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);
    assert!(a.iter().any(|x| matches!(x, Action::BeginRebuild { .. })));
    assert_eq!(c.counters().truncations, 0);

    // An epoch our history does not hold cannot be compared: rebuilt, never cut.
    let (c, _, _, a) = diverged(6, Epoch(1), true);
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);
    assert!(frames_to(&a, "a")
        .iter()
        .all(|b| !matches!(b, Body::Truncate { .. })));

    // A cut that still leaves a mismatch (the replica lied, or its log changed meanwhile)
    // is not cut twice in one session: rebuilt.
    let (mut c, r, sid, _) = diverged(6, Epoch(2), true);
    reply(&mut c, &r, sid, truncated(4, Epoch(1), ""), 1);
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);

    // The same replica with entry 4 of epoch 2 shares our history: it catches up.
    let (c, _, _, a) = diverged(4, Epoch(2), true);
    assert_eq!(state(&c, "a"), PeerState::CatchingUp);
    assert!(frames_to(&a, "a")
        .iter()
        .all(|b| !matches!(b, Body::Truncate { .. })));
}

#[test]
fn a_replica_ahead_of_the_primary_is_never_merged() {
    // Its log runs to 9 in our epoch; ours ends at 5: cut back to 5, then zero gap.
    let mut c = core(CommitMode::SyncAll, &["a"], 5);
    let s = bring_up(&mut c, 9);
    assert_eq!(state(&c, "a"), PeerState::Handshake);
    let a = reply(&mut c, &s[0].0, s[0].1, truncated(5, E, ""), 1);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    assert!(a.iter().all(|x| !matches!(x, Action::BeginRebuild { .. })));
    // Refused: rebuilt on the same session.
    let mut c = core(CommitMode::SyncAll, &["a"], 5);
    let s = bring_up(&mut c, 9);
    reply(&mut c, &s[0].0, s[0].1, truncated(9, E, "no"), 1);
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);
    // Refused without automatic rebuilds: it waits, disconnected, in NeedsRebuild.
    let mut cfg = PrimaryConfig::new(
        VolumeId([1; 16]),
        1 << 30,
        VolumeId([2; 16]),
        E,
        CommitMode::SyncAll,
        vec![rid("a")],
    );
    cfg.auto_rebuild = false;
    let mut c = PrimaryCore::new(cfg, Lsn(5), vec![(E, Lsn(1))], Lsn(5), Lsn(6), 0);
    let s = bring_up(&mut c, 9);
    reply(&mut c, &s[0].0, s[0].1, truncated(9, E, "no"), 1);
    assert_eq!(state(&c, "a"), PeerState::NeedsRebuild);
}

#[test]
fn retention_budget_releases_a_lagging_replica() {
    let mut c = core(CommitMode::BestEffort, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 3);
    reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(3) },
        1,
    );
    // b never acks anything and goes away: its pin (1) holds the WAL.
    let a = c.step(Event::Disconnected {
        replica: s[1].0.clone(),
        session: s[1].1,
        now: 2,
        reason: "x".into(),
    });
    assert!(!a.iter().any(|x| matches!(x, Action::PinWal { .. })));
    let a = tick_pinned(&mut c, 3, 200 << 20);
    assert_eq!(state(&c, "b"), PeerState::NeedsRebuild);
    assert!(a.contains(&Action::PinWal { from: Some(Lsn(4)) }));
    // The in-sync replica is not punished for the stale measure on the next tick.
    tick(&mut c, 4);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    // It is dialled again after its backoff, and the new session starts its rebuild.
    let a = tick(&mut c, 2_000);
    let again = sessions(&a);
    assert_eq!(again.len(), 1, "{a:?}");
    assert_eq!(again[0].0, rid("b"));
    c.step(Event::Connected {
        replica: rid("b"),
        session: again[0].1,
        now: 2_000,
    });
    reply(
        &mut c,
        &rid("b"),
        again[0].1,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(0),
            durable_epoch: Epoch(0),
            committed: Lsn(0),
            rebuilding: true,
            cursor: None,
        },
        2_000,
    );
    assert_eq!(state(&c, "b"), PeerState::Rebuilding);
}

#[test]
fn a_restarted_primary_keeps_its_wal_for_replicas_it_has_not_heard_from() {
    let mut c = core_keeping(CommitMode::BestEffort, &["a", "b"], 20, 8);
    assert_eq!(c.pin(), Some(Lsn(8)), "held before anybody answers");
    let dialled = tick(&mut c, 0);
    // a had everything; b is still away, so its hold stays.
    let a = hello(&mut c, &dialled, "a", 20, 1);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    assert!(
        !a.iter().any(|x| matches!(x, Action::PinWal { .. })),
        "{a:?}"
    );
    assert_eq!(c.pin(), Some(Lsn(8)));
    // b comes back from 12: the hold becomes what it needs, and it catches up.
    let a = hello(&mut c, &dialled, "b", 12, 2);
    assert_eq!(state(&c, "b"), PeerState::CatchingUp);
    assert!(
        a.contains(&Action::PinWal {
            from: Some(Lsn(13))
        }),
        "{a:?}"
    );
    assert_eq!(c.counters().rebuilds_needed, 0);
}

#[test]
fn a_restarted_primary_lets_the_hold_go_past_the_budget_without_rebuilding_anyone() {
    let mut c = core_keeping(CommitMode::BestEffort, &["a", "b"], 20, 8);
    let dialled = tick(&mut c, 0);
    hello(&mut c, &dialled, "a", 20, 1);
    // b never answers; the hold is bounded like any other, but costs b nothing more: it
    // catches up later if what it lacks is still there.
    let a = tick_pinned(&mut c, 2, 200 << 20);
    assert!(
        a.contains(&Action::PinWal {
            from: Some(Lsn(21))
        }),
        "{a:?}"
    );
    assert_ne!(state(&c, "b"), PeerState::NeedsRebuild);
    assert_eq!(c.counters().rebuilds_needed, 0);
}

#[test]
fn a_hold_over_budget_at_the_first_tick_sends_no_replica_to_a_rebuild() {
    // The WAL kept before the restart is over the budget already (a slow replica in sync
    // under sync-all may hold all of it): the hold goes, and neither replica is rebuilt for
    // it, though both have yet to answer.
    let mut c = core_keeping(CommitMode::SyncAll, &["a", "b"], 20, 8);
    let a = tick_pinned(&mut c, 0, 200 << 20);
    assert!(a.contains(&Action::PinWal { from: None }), "{a:?}");
    assert_eq!(c.pin(), None);
    let dialled = a;
    hello(&mut c, &dialled, "a", 20, 1);
    hello(&mut c, &dialled, "b", 20, 1);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    assert_eq!(state(&c, "b"), PeerState::InSync);
    assert_eq!(c.counters().rebuilds_needed, 0);
}

#[test]
fn a_replica_that_refuses_before_its_handshake_gives_up_its_hold() {
    let mut c = core_keeping(CommitMode::BestEffort, &["a"], 20, 8);
    let dialled = tick(&mut c, 0);
    let (id, session) = sessions(&dialled)[0].clone();
    c.step(Event::Connected {
        replica: id.clone(),
        session,
        now: 1,
    });
    let body = Body::Reject {
        reason: crate::wire::RejectReason::WrongVolume,
        message: "another volume".into(),
    };
    let a = reply(&mut c, &id, session, body, 1);
    assert_eq!(state(&c, "a"), PeerState::Refused);
    assert!(a.contains(&Action::PinWal { from: None }), "{a:?}");
    // Dialled again later, it holds nothing from before.
    let a = tick(&mut c, 10_000);
    assert_eq!(sessions(&a).len(), 1, "{a:?}");
    assert_eq!(c.pin(), None);
}

#[test]
fn a_replica_away_past_the_retention_time_is_released_however_often_it_is_redialled() {
    let mut c = core(CommitMode::BestEffort, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 3);
    ack(&mut c, &s, "a", 3, 1);
    let (b, session) = s.iter().find(|(id, _)| id.0 == "b").unwrap().clone();
    c.step(Event::Disconnected {
        replica: b.clone(),
        session,
        now: 10,
        reason: "gone".into(),
    });
    // Every reconnect fails at once; the WAL it holds stays far inside the byte budget.
    let limit = c.cfg.retention_time;
    let mut now = 10;
    let mut dialled = 0;
    while now < 10 + limit + 5_000 && state(&c, "b") != PeerState::NeedsRebuild {
        now += 500;
        let a = tick_pinned(&mut c, now, 3 * 4096);
        for (r, session) in sessions(&a) {
            dialled += 1;
            c.step(Event::Disconnected {
                replica: r,
                session,
                now,
                reason: "connection refused".into(),
            });
        }
    }
    assert!(dialled > 10, "redialled {dialled} times");
    assert_eq!(
        state(&c, "b"),
        PeerState::NeedsRebuild,
        "still held at {now} ms"
    );
    assert!(
        now >= 10 + limit,
        "released at {now} ms, before the retention time"
    );
    assert_eq!(state(&c, "a"), PeerState::InSync);
}

#[test]
fn commit_mode_validation_refuses_vacuous_configurations() {
    assert!(CommitMode::SyncAll.validate(0).is_err());
    assert!(CommitMode::SyncQuorum.validate(1).is_err());
    assert!(CommitMode::SyncQuorum.validate(2).is_ok());
    assert!(CommitMode::BestEffort.validate(0).is_ok());
}

#[test]
fn in_sync_replicas_report_progress_without_flushes() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 5);
    // No FLUSH at all: the next tick past the interval asks for progress anyway.
    let a = tick(&mut c, 50);
    assert!(frames_to(&a, "a").is_empty());
    let a = tick(&mut c, 100);
    assert!(matches!(
        frames_to(&a, "a")[..],
        [Body::Barrier { lsn: Lsn(5), .. }]
    ));
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(5) },
        101,
    );
    // The pin follows, so the retention budget never blames an in-sync replica.
    assert!(a.contains(&Action::PinWal { from: Some(Lsn(6)) }));
    // Nothing new: no more asking.
    let a = tick(&mut c, 500);
    assert!(frames_to(&a, "a").is_empty());
}

#[test]
fn a_replica_beyond_retention_is_rebuilt_and_counts_only_once_accepted() {
    let mut c = core(CommitMode::SyncAll, &["a"], 100);
    let a = tick(&mut c, 0);
    let (r, sid) = sessions(&a)[0].clone();
    c.step(Event::Connected {
        replica: r.clone(),
        session: sid,
        now: 0,
    });
    // A blank replica of a volume whose first entries are long gone.
    reply(
        &mut c,
        &r,
        sid,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(0),
            durable_epoch: Epoch(0),
            committed: Lsn(0),
            rebuilding: false,
            cursor: None,
        },
        0,
    );
    let a = c.step(Event::WalGone {
        replica: r.clone(),
        session: sid,
        from: Lsn(1),
        now: 0,
    });
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);
    assert!(a.contains(&Action::BeginRebuild {
        replica: r.clone(),
        session: sid,
        resume: None,
    }));
    // The session stays up: the rebuild runs on it.
    assert!(!a.iter().any(|x| matches!(x, Action::Close { .. })));
    let a = c.step(Event::RebuildBase {
        replica: r.clone(),
        session: sid,
        base: Lsn(90),
        history: vec![(E, Lsn(1))],
        resumed: false,
        refused: None,
    });
    assert!(matches!(
        &frames_to(&a, "a")[..],
        [Body::RebuildStart { base: Lsn(90), .. }]
    ));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::StreamBase { base: Lsn(90), .. })));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::ReadWal { from: Lsn(91), .. })));
    assert!(a.contains(&Action::PinWal {
        from: Some(Lsn(91))
    }));
    // A FLUSH now cannot count on the rebuilding replica.
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(100),
        now: 1,
    });
    c.step(Event::LocalDurable { lsn: Lsn(100) });
    // The WAL line reaches the head; a new entry flows live.
    c.step(Event::WalRead {
        replica: r.clone(),
        session: sid,
        from: Lsn(91),
        records: (91..=100).map(|l| rec(l, E)).collect(),
        now: 2,
    });
    let a = append(&mut c, 101, 101);
    assert!(matches!(&frames_to(&a, "a")[..], [Body::Entries { .. }]));
    let a = c.step(Event::BaseSent {
        replica: r.clone(),
        session: sid,
    });
    assert!(matches!(
        &frames_to(&a, "a")[..],
        [Body::RebuildFinish { target: Lsn(101) }]
    ));
    assert!(done(&a).is_empty());
    // Too early a "done" is not accepted.
    let a = reply(&mut c, &r, sid, Body::RebuildDone { durable: Lsn(100) }, 3);
    assert!(a.iter().any(|x| matches!(x, Action::Close { .. })));
    assert_ne!(state(&c, "a"), PeerState::InSync);
}

#[test]
fn a_completed_rebuild_makes_the_replica_count_again() {
    let mut c = core(CommitMode::SyncAll, &["a"], 10);
    let a = tick(&mut c, 0);
    let (r, sid) = sessions(&a)[0].clone();
    c.step(Event::Connected {
        replica: r.clone(),
        session: sid,
        now: 0,
    });
    // It says its last rebuild was interrupted.
    let a = reply(
        &mut c,
        &r,
        sid,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(10),
            durable_epoch: E,
            committed: Lsn(0),
            rebuilding: true,
            cursor: None,
        },
        0,
    );
    assert!(a.contains(&Action::BeginRebuild {
        replica: r.clone(),
        session: sid,
        resume: None,
    }));
    c.step(Event::RebuildBase {
        replica: r.clone(),
        session: sid,
        base: Lsn(10),
        history: vec![(E, Lsn(1))],
        resumed: false,
        refused: None,
    });
    c.step(Event::WalRead {
        replica: r.clone(),
        session: sid,
        from: Lsn(11),
        records: vec![],
        now: 1,
    });
    append(&mut c, 11, 11);
    let a = c.step(Event::BaseSent {
        replica: r.clone(),
        session: sid,
    });
    assert!(matches!(
        &frames_to(&a, "a")[..],
        [Body::RebuildFinish { target: Lsn(11) }]
    ));
    c.step(Event::Barrier {
        id: 3,
        target: Lsn(11),
        now: 2,
    });
    assert!(done(&c.step(Event::LocalDurable { lsn: Lsn(11) })).is_empty());
    let a = reply(&mut c, &r, sid, Body::RebuildDone { durable: Lsn(11) }, 3);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    assert_eq!(done(&a), vec![3]);
}

#[test]
fn a_stale_wal_read_never_steers_a_rebuild() {
    // A catch-up read is in flight when the replica is sent to a rebuild; its late answer
    // (for the old `from`) must be ignored, not restart the rebuild.
    let mut c = core(CommitMode::SyncAll, &["a"], 100);
    let a = tick(&mut c, 0);
    let (r, sid) = sessions(&a)[0].clone();
    c.step(Event::Connected {
        replica: r.clone(),
        session: sid,
        now: 0,
    });
    reply(
        &mut c,
        &r,
        sid,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(10),
            durable_epoch: E,
            committed: Lsn(0),
            rebuilding: false,
            cursor: None,
        },
        0,
    );
    assert_eq!(state(&c, "a"), PeerState::CatchingUp);
    // Retention gives up on it while the read from 11 is outstanding: it is rebuilt.
    tick_pinned(&mut c, 1, u64::MAX);
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);
    c.step(Event::RebuildBase {
        replica: r.clone(),
        session: sid,
        base: Lsn(90),
        history: vec![(E, Lsn(1))],
        resumed: false,
        refused: None,
    });
    // The stale answer to the catch-up read arrives.
    let a = c.step(Event::WalGone {
        replica: r.clone(),
        session: sid,
        from: Lsn(11),
        now: 1,
    });
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(state(&c, "a"), PeerState::Rebuilding);
    // A second need for a rebuild in the same session ends the session instead.
    let a = c.step(Event::WalGone {
        replica: r.clone(),
        session: sid,
        from: Lsn(91),
        now: 1,
    });
    assert!(a.iter().any(|x| matches!(x, Action::Close { .. })), "{a:?}");
    assert!(!a.iter().any(|x| matches!(x, Action::BeginRebuild { .. })));
}

// ---- timer races (protocol brief 5.2) ---------------------------------------------------

/// A sync-all core with both replicas in sync, entry 1 appended and locally durable, and a
/// FLUSH (id 1) for it issued at time 0; the barrier timeout is 5000.
fn barrier_pending() -> (PrimaryCore, Vec<(ReplicaId, SessionId)>) {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 0,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        1,
    );
    (c, s)
}

#[test]
fn timer_ack_arriving_before_the_timeout_cancels_it() {
    let (mut c, s) = barrier_pending();
    let a = reply(
        &mut c,
        &s[1].0,
        s[1].1,
        Body::BarrierAck { durable: Lsn(1) },
        4_999,
    );
    assert_eq!(done(&a), vec![1]);
    assert!(failed(&tick(&mut c, 5_000)).is_empty());
    assert!(failed(&tick(&mut c, 60_000)).is_empty());
    assert_eq!(c.committed(), Lsn(1));
}

#[test]
fn timer_timeout_before_the_ack_fires_and_the_late_ack_is_rejected() {
    let (mut c, s) = barrier_pending();
    let a = tick(&mut c, 5_000);
    assert_eq!(failed(&a), vec![(1, BarrierFailure::ReplicaMissing)]);
    // The silent replica was dropped; its late ack comes on a dead session and counts for
    // nothing: no completion, no commit, no durable progress.
    let a = reply(
        &mut c,
        &s[1].0,
        s[1].1,
        Body::BarrierAck { durable: Lsn(1) },
        5_001,
    );
    assert!(done(&a).is_empty());
    assert_eq!(c.committed(), Lsn(0));
    let b = c
        .peers()
        .into_iter()
        .find(|p| p.id == s[1].0)
        .expect("peer b");
    assert_ne!(b.state, PeerState::InSync);
}

#[test]
fn timer_ack_and_timeout_in_the_same_millisecond_fire_exactly_once() {
    // Data before timers: the ack is delivered first, then the tick finds nothing due.
    let (mut c, s) = barrier_pending();
    let mut all = reply(
        &mut c,
        &s[1].0,
        s[1].1,
        Body::BarrierAck { durable: Lsn(1) },
        5_000,
    );
    all.extend(tick(&mut c, 5_000));
    assert_eq!(done(&all), vec![1]);
    assert!(failed(&all).is_empty());
    // The other order: the tick first fails it, and the ack cannot complete it again.
    let (mut c, s) = barrier_pending();
    let mut all = tick(&mut c, 5_000);
    all.extend(reply(
        &mut c,
        &s[1].0,
        s[1].1,
        Body::BarrierAck { durable: Lsn(1) },
        5_000,
    ));
    assert!(done(&all).is_empty());
    assert_eq!(failed(&all).len(), 1);
}

#[test]
fn timer_quorum_edge_one_ack_plus_one_timeout_commits() {
    let mut c = core(CommitMode::SyncQuorum, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 0,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        1,
    );
    assert_eq!(done(&a), vec![1]);
    // b never answers: its timeout degrades it but fails nothing already committed.
    let a = tick(&mut c, 5_000);
    assert!(failed(&a).is_empty());
    assert_eq!(c.committed(), Lsn(1));
}

#[test]
fn timer_stale_barrier_timeout_after_a_promotion_never_regresses_the_commit() {
    let (mut c, s) = barrier_pending();
    reply(
        &mut c,
        &s[1].0,
        s[1].1,
        Body::BarrierAck { durable: Lsn(1) },
        2,
    );
    assert_eq!(c.committed(), Lsn(1));
    append(&mut c, 2, 2);
    c.step(Event::Barrier {
        id: 2,
        target: Lsn(2),
        now: 3,
    });
    // A newer primary fences this one; its barrier fails at once, as fenced.
    let a = c.step(Event::Received {
        replica: s[0].0.clone(),
        session: s[0].1,
        frame: Frame {
            epoch: Epoch(E.0 + 1),
            body: Body::Reject {
                reason: RejectReason::StaleEpoch,
                message: "promoted".into(),
            },
        },
        now: 4,
    });
    assert_eq!(failed(&a), vec![(2, BarrierFailure::Fenced)]);
    // Its old timers fire later: nothing fails twice and the commit stays where it was.
    let a = tick(&mut c, 60_000);
    assert!(failed(&a).is_empty() && done(&a).is_empty());
    assert_eq!(c.committed(), Lsn(1));
}

#[test]
fn a_zero_gap_replica_pins_the_wal_from_its_durable_lsn() {
    // Found by the simulator: an in-sync replica that joined with a zero gap did not pin the
    // WAL, so a checkpoint could recycle entries it had not acknowledged yet.
    let mut c = core(CommitMode::BestEffort, &["a"], 5);
    let a = tick(&mut c, 0);
    let s = sessions(&a);
    c.step(Event::Connected {
        replica: s[0].0.clone(),
        session: s[0].1,
        now: 0,
    });
    let a = reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::HelloOk {
            replica_store: VolumeId([9; 16]),
            durable: Lsn(5),
            durable_epoch: E,
            committed: Lsn(0),
            rebuilding: false,
            cursor: None,
        },
        0,
    );
    assert_eq!(state(&c, "a"), PeerState::InSync);
    assert!(a.contains(&Action::PinWal { from: Some(Lsn(6)) }), "{a:?}");
}

#[test]
fn a_slow_replica_in_sync_under_sync_all_paces_writers_instead_of_being_rebuilt() {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 3);
    tick(&mut c, 200);
    ack(&mut c, &s, "a", 3, 210);
    // b is slow but answering: the WAL it holds is past the budget, and it keeps holding it
    // (writers wait for WAL space, as for any full WAL) rather than being sent to a rebuild.
    let a = tick_pinned(&mut c, 300, 200 << 20);
    assert_eq!(state(&c, "b"), PeerState::InSync);
    assert!(
        !a.iter().any(|x| matches!(x, Action::PinWal { .. })),
        "{a:?}"
    );
    ack(&mut c, &s, "b", 3, 4_000);
    assert_eq!(state(&c, "b"), PeerState::InSync);
    // Once it stops answering it loses its session, and the budget applies to it as to any
    // replica away: one dead replica never stops writes for longer than the barrier timeout.
    append(&mut c, 4, 5);
    tick(&mut c, 4_200);
    ack(&mut c, &s, "a", 5, 4_210);
    tick_pinned(&mut c, 4_200 + 5_001, 200 << 20);
    assert_eq!(state(&c, "b"), PeerState::NeedsRebuild);
}

#[test]
fn a_slow_replica_outside_sync_all_is_released_by_the_budget() {
    for mode in [CommitMode::BestEffort, CommitMode::SyncQuorum] {
        let mut c = core(mode, &["a", "b"], 0);
        let s = bring_up(&mut c, 0);
        append(&mut c, 1, 3);
        tick(&mut c, 200);
        ack(&mut c, &s, "a", 3, 210);
        tick_pinned(&mut c, 300, 200 << 20);
        // Its session lives, so its rebuild starts at once.
        assert!(
            matches!(
                state(&c, "b"),
                PeerState::NeedsRebuild | PeerState::Rebuilding
            ),
            "{mode:?}: {:?}",
            state(&c, "b")
        );
    }
}

#[test]
fn a_replica_that_answers_every_ask_in_time_is_never_dropped_however_far_the_head_runs_ahead() {
    // A replica pacing the writers under sync-all: each ask is answered ~3.8 s after it went
    // (inside the 5 s barrier timeout), but by then the head has moved and a newer ask is
    // out, so the replica is never fully caught up. It must stay in sync.
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    let full = 200 << 20;
    append(&mut c, 1, 3);
    tick_pinned(&mut c, 200, full); // asks through 3
    ack(&mut c, &s, "a", 3, 210);
    append(&mut c, 4, 5);
    tick_pinned(&mut c, 300, full); // asks through 5
    ack(&mut c, &s, "a", 5, 310);
    ack(&mut c, &s, "b", 3, 4_000);
    append(&mut c, 6, 7);
    tick_pinned(&mut c, 4_000, full); // asks through 7
    ack(&mut c, &s, "a", 7, 4_010);
    ack(&mut c, &s, "b", 5, 4_100);
    tick_pinned(&mut c, 5_201, full); // the first ask went out 5.0 s ago, and was answered in time
    assert_eq!(state(&c, "b"), PeerState::InSync);
    // The ask through 7 is never answered: that one times out.
    tick_pinned(&mut c, 9_001, full);
    assert_ne!(state(&c, "b"), PeerState::InSync);
}

fn committed_lsns(actions: &[Action]) -> Vec<Lsn> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Committed { lsn } => Some(*lsn),
            _ => None,
        })
        .collect()
}

#[test]
fn committed_only_grows() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 3);
    c.step(Event::LocalDurable { lsn: Lsn(3) });
    let mut seen = Vec::new();
    reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(2) },
        1,
    );
    seen.push(c.committed());
    // The only replica goes: sync-all can meet nothing now, and that takes nothing back.
    let a = c.step(Event::Disconnected {
        replica: s[0].0.clone(),
        session: s[0].1,
        now: 2,
        reason: "gone".into(),
    });
    assert!(committed_lsns(&a).is_empty(), "{a:?}");
    seen.push(c.committed());
    assert_eq!(seen, vec![Lsn(2), Lsn(2)]);
}

#[test]
fn a_session_id_is_never_reused() {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let mut ids = Vec::new();
    // Every redial (after a handshake timeout each time) is a new session.
    for round in 0..5u64 {
        let now = round * 10_000;
        let a = tick(&mut c, now);
        ids.extend(sessions(&a).into_iter().map(|(_, s)| s));
    }
    assert!(ids.len() >= 6, "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[test]
#[should_panic(expected = "a session id is never reused")]
fn a_session_id_is_never_reused_is_asserted_where_a_session_begins() {
    let mut p = peer::Peer::new(rid("a"), Lsn(1), 100, 0);
    p.begin_session(SessionId(7));
    p.end_session(1, 1_000);
    p.begin_session(SessionId(7));
}

#[test]
fn a_never_contacted_replica_is_a_state_not_a_string() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let p = &c.peers()[0];
    assert!(!p.contacted);
    assert_eq!(p.state, PeerState::Disconnected);
    tick(&mut c, 0);
    assert!(c.peers()[0].contacted);
}

#[test]
fn a_catch_up_never_ships_past_our_head() {
    let mut c = core(CommitMode::SyncAll, &["a"], 4);
    let dialled = tick(&mut c, 0);
    let a = hello(&mut c, &dialled, "a", 2, 0);
    let (from, session) = a
        .iter()
        .find_map(|a| match a {
            Action::ReadWal { from, session, .. } => Some((*from, *session)),
            _ => None,
        })
        .unwrap();
    // The store read more than the core has seen appended: only through the head ships.
    let a = c.step(Event::WalRead {
        replica: rid("a"),
        session,
        from,
        records: (3..=6).map(|l| rec(l, E)).collect(),
        now: 1,
    });
    let shipped: Vec<u64> = frames_to(&a, "a")
        .iter()
        .flat_map(|b| match b {
            Body::Entries { records, .. } => records.iter().map(|r| r.lsn.0).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(shipped, vec![3, 4]);
    assert_eq!(state(&c, "a"), PeerState::InSync);
}

#[test]
fn only_a_reject_from_a_higher_epoch_fences_other_frames_end_the_session() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    let a = c.step(Event::Received {
        replica: s[0].0.clone(),
        session: s[0].1,
        frame: Frame {
            epoch: Epoch(E.0 + 1),
            body: Body::BarrierAck { durable: Lsn(0) },
        },
        now: 1,
    });
    assert_eq!(c.fenced(), None);
    assert!(a.iter().any(|a| matches!(a, Action::Close { .. })), "{a:?}");
    assert_eq!(state(&c, "a"), PeerState::Disconnected);
}

#[test]
fn a_caught_up_replica_continues_from_our_head_with_no_gap() {
    let mut c = core(CommitMode::SyncAll, &["a"], 3);
    let dialled = tick(&mut c, 0);
    let a = hello(&mut c, &dialled, "a", 1, 0);
    let session = sessions(&dialled)[0].1;
    assert!(a.contains(&Action::ReadWal {
        replica: rid("a"),
        session,
        from: Lsn(2),
        max_bytes: 4 << 20,
    }));
    // The head moves on while the read is out: the read covers only 2..=3 of it.
    let live = append(&mut c, 4, 4);
    assert!(frames_to(&live, "a").is_empty(), "{live:?}");
    let a = c.step(Event::WalRead {
        replica: rid("a"),
        session,
        from: Lsn(2),
        records: vec![rec(2, E), rec(3, E)],
        now: 1,
    });
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::ReadWal { from: Lsn(4), .. })));
    let a = c.step(Event::WalRead {
        replica: rid("a"),
        session,
        from: Lsn(4),
        records: vec![rec(4, E)],
        now: 2,
    });
    assert_eq!(state(&c, "a"), PeerState::InSync);
    let shipped: Vec<u64> = frames_to(&a, "a")
        .iter()
        .chain(frames_to(&append(&mut c, 5, 5), "a").iter())
        .flat_map(|b| match b {
            Body::Entries { records, .. } => records.iter().map(|r| r.lsn.0).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(shipped, vec![4, 5]);
}

#[test]
fn a_barrier_ack_past_what_was_shipped_is_clamped() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    // It claims everything there will ever be before anything was sent to it.
    ack(&mut c, &s, "a", u64::MAX, 1);
    assert_eq!(c.peers()[0].durable, Lsn::ZERO);
    append(&mut c, 1, 2);
    c.step(Event::LocalDurable { lsn: Lsn(2) });
    let a = c.step(Event::Barrier {
        id: 7,
        target: Lsn(2),
        now: 2,
    });
    assert!(done(&a).is_empty(), "the lie made a FLUSH succeed: {a:?}");
    assert!(matches!(
        frames_to(&a, "a")[..],
        [Body::Barrier { lsn: Lsn(2), .. }]
    ));
    // Past what was shipped again: it counts only through the entries it was sent.
    let (id, session) = s[0].clone();
    let a = reply(
        &mut c,
        &id,
        session,
        Body::BarrierAck { durable: Lsn::MAX },
        3,
    );
    assert_eq!(done(&a), vec![7]);
    assert_eq!(c.peers()[0].durable, Lsn(2));
}

#[test]
fn a_hello_ok_past_our_head_never_counts() {
    let mut c = core(CommitMode::SyncAll, &["a"], 5);
    let dialled = tick(&mut c, 0);
    let (id, session) = sessions(&dialled)[0].clone();
    c.step(Event::Connected {
        replica: id.clone(),
        session,
        now: 0,
    });
    let body = Body::HelloOk {
        replica_store: VolumeId([9; 16]),
        durable: Lsn::MAX,
        durable_epoch: Epoch(2),
        committed: Lsn::MAX,
        rebuilding: false,
        cursor: None,
    };
    reply(&mut c, &id, session, body, 1);
    assert_ne!(state(&c, "a"), PeerState::InSync);
    assert!(c.peers()[0].durable <= Lsn(5), "{:?}", c.peers()[0]);
    assert!(c.min_durable() <= Some(Lsn(5)));
    assert_eq!(c.committed(), Lsn(5));
}

mod confirm;
mod membership;
mod no_space;
