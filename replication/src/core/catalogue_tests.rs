//! The protocol brief's scenario catalogue (sections 5.2 and 6.5) where a scenario is one
//! state machine's rule: each test is named after its scenario, drives the real core through
//! its public events only, and names the line of the core that enforces the rule. The table in
//! docs/PROTOCOL.md ("Scenario catalogue") maps every scenario to a test or to the reason it
//! cannot arise in this design.

use bytes::Bytes;

use blockrep_storage::{Epoch, Lsn, RecordKind, VolumeId, WalRecord};

use super::primary::{
    Action, BarrierFailure, Event, PeerState, PrimaryConfig, PrimaryCore, PrimaryCounters,
};
use super::replica::{self, ConnId, ReplicaCore, ReplicaState};
use super::{CommitMode, Millis, ReplicaId, SessionId};
use crate::wire::{Body, Frame, RejectReason};

const E: Epoch = Epoch(3);
const RETENTION_TIME: Millis = 1_000;
const TIMEOUT: Millis = 5_000;

fn rid(n: &str) -> ReplicaId {
    ReplicaId(n.into())
}

fn rec(lsn: u64) -> WalRecord {
    WalRecord::new(
        Lsn(lsn),
        E,
        RecordKind::Write,
        0,
        4096,
        Bytes::from(vec![lsn as u8; 4096]),
    )
}

/// A primary at epoch `E` whose log holds entries 1..=`head`, all of them still in its WAL,
/// with a short retention time so the budget can be crossed in a test.
fn primary(mode: CommitMode, replicas: &[&str], head: u64) -> PrimaryCore {
    let mut cfg = PrimaryConfig::new(
        VolumeId([1; 16]),
        1 << 30,
        VolumeId([2; 16]),
        E,
        mode,
        replicas.iter().map(|r| rid(r)).collect(),
    );
    cfg.retention_time = RETENTION_TIME;
    cfg.barrier_timeout = TIMEOUT;
    let history = if head > 0 { vec![(E, Lsn(1))] } else { vec![] };
    PrimaryCore::new(cfg, Lsn(head), history, Lsn(0), Lsn(1), 0)
}

/// The drive of one primary core, remembering each replica's newest session.
struct Drive {
    c: PrimaryCore,
    sessions: Vec<(ReplicaId, SessionId)>,
}

impl Drive {
    fn new(mode: CommitMode, replicas: &[&str], head: u64) -> Drive {
        Drive {
            c: primary(mode, replicas, head),
            sessions: Vec::new(),
        }
    }

    /// Steps the core, noting every session it dials.
    fn step(&mut self, e: Event) -> Vec<Action> {
        let a = self.c.step(e);
        for x in &a {
            if let Action::Connect { replica, session } = x {
                self.sessions.retain(|(r, _)| r != replica);
                self.sessions.push((replica.clone(), *session));
            }
        }
        a
    }

    fn session(&self, r: &str) -> SessionId {
        self.sessions
            .iter()
            .find(|(id, _)| id.0 == r)
            .map(|(_, s)| *s)
            .expect("dialled")
    }

    fn tick(&mut self, now: Millis) -> Vec<Action> {
        self.tick_pinned(now, 0)
    }

    fn tick_pinned(&mut self, now: Millis, pinned_bytes: u64) -> Vec<Action> {
        self.step(Event::Tick { now, pinned_bytes })
    }

    fn connected(&mut self, r: &str, now: Millis) -> Vec<Action> {
        let session = self.session(r);
        self.step(Event::Connected {
            replica: rid(r),
            session,
            now,
        })
    }

    fn disconnected(&mut self, r: &str, now: Millis) -> Vec<Action> {
        let session = self.session(r);
        self.step(Event::Disconnected {
            replica: rid(r),
            session,
            now,
            reason: "transport lost".into(),
        })
    }

    /// A frame from `r` on its current session, at epoch `E`.
    fn reply(&mut self, r: &str, body: Body, now: Millis) -> Vec<Action> {
        let session = self.session(r);
        self.reply_on(r, session, E, body, now)
    }

    fn reply_on(
        &mut self,
        r: &str,
        session: SessionId,
        epoch: Epoch,
        body: Body,
        now: Millis,
    ) -> Vec<Action> {
        self.step(Event::Received {
            replica: rid(r),
            session,
            frame: Frame { epoch, body },
            now,
        })
    }

    /// `r`'s transport comes up and it answers the hello: its log ends at `durable`.
    fn handshake(&mut self, r: &str, durable: u64, now: Millis) -> Vec<Action> {
        self.connected(r, now);
        self.reply(r, hello_ok(durable), now)
    }

    fn ack(&mut self, r: &str, durable: u64, now: Millis) -> Vec<Action> {
        self.reply(
            r,
            Body::BarrierAck {
                durable: Lsn(durable),
            },
            now,
        )
    }

    /// The retained entries `from..=to` a catch-up of `r` asked for.
    fn wal_read(&mut self, r: &str, from: u64, to: u64, now: Millis) -> Vec<Action> {
        let session = self.session(r);
        self.step(Event::WalRead {
            replica: rid(r),
            session,
            from: Lsn(from),
            records: (from..=to).map(rec).collect(),
            now,
        })
    }

    fn wal_gone(&mut self, r: &str, from: u64, now: Millis) -> Vec<Action> {
        let session = self.session(r);
        self.step(Event::WalGone {
            replica: rid(r),
            session,
            from: Lsn(from),
            now,
        })
    }

    /// The base the driver chose for `r`'s rebuild (our log has one epoch, `E`).
    fn rebuild_base(&mut self, r: &str, base: u64) -> Vec<Action> {
        let session = self.session(r);
        self.step(Event::RebuildBase {
            replica: rid(r),
            session,
            base: Lsn(base),
            history: vec![(E, Lsn(1))],
            resumed: false,
            refused: None,
        })
    }

    fn base_sent(&mut self, r: &str) -> Vec<Action> {
        let session = self.session(r);
        self.step(Event::BaseSent {
            replica: rid(r),
            session,
        })
    }

    fn append(&mut self, from: u64, to: u64) -> Vec<Action> {
        self.step(Event::Appended {
            records: (from..=to).map(rec).collect(),
        })
    }

    fn barrier(&mut self, id: u64, target: u64, now: Millis) -> Vec<Action> {
        self.step(Event::Barrier {
            id,
            target: Lsn(target),
            now,
        })
    }

    fn state(&self, r: &str) -> PeerState {
        self.c
            .peers()
            .into_iter()
            .find(|p| p.id.0 == r)
            .map(|p| p.state)
            .expect("configured")
    }

    fn durable(&self, r: &str) -> Lsn {
        self.c
            .peers()
            .into_iter()
            .find(|p| p.id.0 == r)
            .map(|p| p.durable)
            .expect("configured")
    }

    fn counters(&self) -> PrimaryCounters {
        self.c.counters().clone()
    }
}

fn hello_ok(durable: u64) -> Body {
    Body::HelloOk {
        replica_store: VolumeId([9; 16]),
        durable: Lsn(durable),
        durable_epoch: E,
        committed: Lsn(0),
        rebuilding: false,
        cursor: None,
    }
}

fn truncated(durable: u64) -> Body {
    Body::Truncated {
        durable: Lsn(durable),
        durable_epoch: E,
        refusal: String::new(),
    }
}

fn closes(a: &[Action]) -> bool {
    a.iter().any(|x| matches!(x, Action::Close { .. }))
}

fn done(a: &[Action]) -> Vec<u64> {
    a.iter()
        .filter_map(|x| match x {
            Action::BarrierDone { id } => Some(*id),
            _ => None,
        })
        .collect()
}

fn failed(a: &[Action]) -> Vec<(u64, BarrierFailure)> {
    a.iter()
        .filter_map(|x| match x {
            Action::BarrierFailed { id, reason } => Some((*id, *reason)),
            _ => None,
        })
        .collect()
}

fn frames(a: &[Action]) -> Vec<Body> {
    a.iter()
        .filter_map(|x| match x {
            Action::Send { frame, .. } => Some(frame.body.clone()),
            _ => None,
        })
        .collect()
}

fn reads(a: &[Action]) -> Vec<Lsn> {
    a.iter()
        .filter_map(|x| match x {
            Action::ReadWal { from, .. } => Some(*from),
            _ => None,
        })
        .collect()
}

fn begins_rebuild(a: &[Action]) -> bool {
    a.iter().any(|x| matches!(x, Action::BeginRebuild { .. }))
}

/// Every replica dialled at 0 and in sync at `head` (zero gap).
fn all_in_sync(mode: CommitMode, replicas: &[&str], head: u64) -> Drive {
    let mut d = Drive::new(mode, replicas, head);
    d.tick(0);
    for r in replicas {
        d.handshake(r, head, 0);
        assert_eq!(d.state(r), PeerState::InSync);
    }
    d
}

/// `a` is catching up from 1 (its log is empty) towards our head 10, read outstanding.
fn catching_up() -> Drive {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    let a = d.handshake("a", 0, 0);
    assert_eq!(d.state("a"), PeerState::CatchingUp);
    assert_eq!(reads(&a), vec![Lsn(1)]);
    d
}

// ---- 5.2 timers ---------------------------------------------------------------------

/// P2_BothTimeout_NoQuorum: under sync-quorum with three copies, neither replica answers in
/// time: the FLUSH fails with `QuorumLost`, nothing is committed, and both replicas, which
/// left an ask unanswered for the barrier timeout, are dropped. (`expire_barriers` and
/// `tick_peer` in `core/primary/sessions.rs`; `committed_now` counts only durable votes.)
#[test]
fn timer_both_replicas_time_out_no_quorum_fails_and_commits_nothing() {
    let mut d = all_in_sync(CommitMode::SyncQuorum, &["a", "b"], 0);
    d.append(1, 1);
    d.step(Event::LocalDurable { lsn: Lsn(1) });
    assert!(done(&d.barrier(1, 1, 0)).is_empty());
    assert!(failed(&d.tick(TIMEOUT - 1)).is_empty());
    let a = d.tick(TIMEOUT);
    assert_eq!(failed(&a), vec![(1, BarrierFailure::QuorumLost)]);
    assert_eq!(d.c.committed(), Lsn(0));
    assert_eq!(d.state("a"), PeerState::Disconnected);
    assert_eq!(d.state("b"), PeerState::Disconnected);
}

/// P2_EpochBumpDuringBarrierTimeout_CrossSurface: one barrier meets epoch fencing, barrier
/// expiry and a late ack at once. A replica's refusal at a higher epoch fences us (`rejected`
/// in `core/primary/frames.rs`): the pending FLUSH fails `Fenced` once (`fence` drains the
/// barrier queue), its deadline passing later fires nothing more (a fenced `tick` returns at
/// once), and the other replica's late ack, on a session the fence abandoned, counts for
/// nothing (`PrimaryCore::current`).
#[test]
fn timer_epoch_bump_during_a_barrier_timeout_fences_expires_once_and_drops_the_late_ack() {
    let mut d = all_in_sync(CommitMode::SyncAll, &["a", "b"], 0);
    d.append(1, 1);
    d.step(Event::LocalDurable { lsn: Lsn(1) });
    d.barrier(7, 1, 0);
    let old_b = d.session("b");
    let reject = Body::Reject {
        reason: RejectReason::StaleEpoch,
        message: "a newer primary claimed this replica".into(),
    };
    let s = d.session("a");
    let a = d.reply_on("a", s, Epoch(4), reject, 10);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Fenced {
            epoch: Epoch(4),
            ..
        }
    )));
    assert_eq!(failed(&a), vec![(7, BarrierFailure::Fenced)]);
    assert!(d.tick(TIMEOUT + 10).is_empty(), "the deadline fires again");
    let late = d.reply_on("b", old_b, E, Body::BarrierAck { durable: Lsn(1) }, 20);
    assert!(
        late.is_empty(),
        "a late ack after the fence counted: {late:?}"
    );
    assert_eq!(d.c.committed(), Lsn(0));
}

/// Race_CatchupConverges_CancelsTimeout (our reservation timer is the retention time
/// budget): a replica away for almost the whole budget catches up; once it is in sync the
/// budget's deadline passes and must not undo that. The clock stops when a peer enters a
/// present state (`Peer::enter` clears `away_since`, `core/primary/peer.rs`), which is what
/// `enforce_retention` reads.
#[test]
fn race_catch_up_converges_cancels_the_retention_timeout() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    d.disconnected("a", 0);
    d.tick(RETENTION_TIME - 200);
    d.handshake("a", 4, RETENTION_TIME - 200);
    assert_eq!(d.state("a"), PeerState::CatchingUp);
    d.wal_read("a", 5, 10, RETENTION_TIME - 100);
    assert_eq!(d.state("a"), PeerState::InSync);
    for now in [RETENTION_TIME, RETENTION_TIME + 1, 3 * RETENTION_TIME] {
        d.ack("a", 10, now);
        let a = d.tick(now);
        assert!(!begins_rebuild(&a) && !closes(&a), "{a:?}");
        assert_eq!(d.state("a"), PeerState::InSync);
    }
    assert_eq!(d.counters().rebuilds_needed, 0);
}

/// StaleReservationTimeout_AfterRecoverySuccess, for a rebuild: a replica released to a
/// rebuild and rebuilt stays in sync when the time budget that released it would have run
/// out again (the rebuild is a present state; `Peer::enter`).
#[test]
fn stale_retention_timeout_after_a_rebuild_succeeds_never_undoes_in_sync() {
    let mut d = all_in_sync(CommitMode::SyncAll, &["a"], 10);
    d.disconnected("a", 0);
    d.tick(RETENTION_TIME);
    assert_eq!(d.state("a"), PeerState::NeedsRebuild);
    let now = RETENTION_TIME + 500;
    d.tick(now);
    d.handshake("a", 2, now);
    let a = d.wal_gone("a", 3, now);
    assert!(begins_rebuild(&a), "{a:?}");
    d.rebuild_base("a", 6);
    d.base_sent("a");
    let a = d.wal_read("a", 7, 10, now);
    assert!(frames(&a).contains(&Body::RebuildFinish { target: Lsn(10) }));
    d.reply("a", Body::RebuildDone { durable: Lsn(10) }, now);
    assert_eq!(d.state("a"), PeerState::InSync);
    let needed = d.counters().rebuilds_needed;
    for t in [now + RETENTION_TIME, now + 3 * RETENTION_TIME] {
        d.ack("a", 10, t);
        d.tick(t);
        assert_eq!(d.state("a"), PeerState::InSync);
    }
    assert_eq!(d.counters().rebuilds_needed, needed);
}

/// Race_PromotionThenStaleCatchupTimeout: a replica is catching up from us when a newer
/// primary's refusal fences us; our retention deadline for it then passes. A fenced primary
/// acts on no timer (`tick` in `core/primary/sessions.rs` returns when `fenced` is set): the
/// replica is not released, nothing is dialled, and a catch-up read answered after the fence
/// ships nothing (the fence abandoned the session; `PrimaryCore::current`). The committed
/// LSN does not move.
#[test]
fn race_promotion_then_stale_catch_up_timeout_changes_nothing() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a", "b"], 10);
    d.tick(0);
    d.handshake("a", 0, 0);
    d.handshake("b", 10, 0);
    assert_eq!(d.state("a"), PeerState::CatchingUp);
    let committed = d.c.committed();
    let s = d.session("b");
    let reject = Body::Reject {
        reason: RejectReason::StaleEpoch,
        message: "fenced by a promotion".into(),
    };
    d.reply_on("b", s, Epoch(4), reject, 5);
    assert_eq!(d.c.fenced(), Some(Epoch(4)));
    for now in [RETENTION_TIME, 10 * RETENTION_TIME] {
        let a = d.tick_pinned(now, u64::MAX);
        assert!(a.is_empty(), "a fenced primary acted on a timer: {a:?}");
    }
    assert!(d.wal_read("a", 1, 10, 20).is_empty());
    assert_eq!(d.counters().rebuilds_needed, 0);
    assert_eq!(d.c.committed(), committed);
}

// ---- 6.5 ownership and sessions ---------------------------------------------------------

/// Endpoint change during catch-up: the core knows replicas by `ReplicaId` only; a replica
/// that moved loses its transport, which ends the session (`Disconnected` → `drop_session`).
/// The old session's catch-up read, answered late, is stale (`PrimaryCore::current_read`),
/// and the next session decides afresh from the hello the moved replica sends.
#[test]
fn endpoint_change_during_catch_up_invalidates_the_session() {
    let mut d = catching_up();
    let old = d.session("a");
    d.disconnected("a", 1);
    assert_eq!(d.state("a"), PeerState::Disconnected);
    let stale = d.step(Event::WalRead {
        replica: rid("a"),
        session: old,
        from: Lsn(1),
        records: (1..=10).map(rec).collect(),
        now: 2,
    });
    assert!(stale.is_empty(), "{stale:?}");
    d.tick(1_000);
    assert_ne!(d.session("a"), old);
    let a = d.handshake("a", 3, 1_000);
    assert_eq!(
        reads(&a),
        vec![Lsn(4)],
        "the new session reads from its hello"
    );
}

/// Every call with a stale session id is rejected: after the session is replaced, each
/// event naming it changes nothing and emits nothing (`PrimaryCore::current` and
/// `current_read`, `core/primary.rs`).
#[test]
fn every_call_with_a_stale_session_id_is_rejected() {
    let mut d = catching_up();
    let old = d.session("a");
    d.disconnected("a", 1);
    d.tick(1_000);
    assert_eq!(d.state("a"), PeerState::Connecting);
    let r = rid("a");
    let stale = vec![
        Event::Connected {
            replica: r.clone(),
            session: old,
            now: 1_001,
        },
        Event::Received {
            replica: r.clone(),
            session: old,
            frame: Frame {
                epoch: E,
                body: hello_ok(10),
            },
            now: 1_001,
        },
        Event::WalRead {
            replica: r.clone(),
            session: old,
            from: Lsn(1),
            records: vec![rec(1)],
            now: 1_001,
        },
        Event::WalGone {
            replica: r.clone(),
            session: old,
            from: Lsn(1),
            now: 1_001,
        },
        Event::RebuildBase {
            replica: r.clone(),
            session: old,
            base: Lsn(5),
            history: vec![(E, Lsn(1))],
            resumed: false,
            refused: None,
        },
        Event::BaseProgress {
            replica: r.clone(),
            session: old,
            done: 1,
            total: 2,
            sent: 0,
        },
        Event::BaseSent {
            replica: r.clone(),
            session: old,
        },
        Event::Disconnected {
            replica: r.clone(),
            session: old,
            now: 1_001,
            reason: "late".into(),
        },
    ];
    for e in stale {
        let what = format!("{e:?}");
        let a = d.step(e);
        assert!(a.is_empty(), "{what} -> {a:?}");
        assert_eq!(d.state("a"), PeerState::Connecting, "{what}");
    }
}

/// Duplicate trigger while active: a second need for a rebuild while one runs on the
/// session starts no second rebuild; it ends the session (`needs_rebuild` checks
/// `rebuilt_this_session`, `core/primary/sessions.rs`). A repeated `Connected` sends no
/// second hello (`connected` acts only in `Connecting`).
#[test]
fn a_duplicate_trigger_while_a_recovery_is_active_is_rejected() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    let hello = d.connected("a", 0);
    assert_eq!(frames(&hello).len(), 1);
    assert!(frames(&d.connected("a", 0)).is_empty(), "a second hello");
    let mut body = hello_ok(0);
    if let Body::HelloOk { rebuilding, .. } = &mut body {
        *rebuilding = true;
    }
    assert!(begins_rebuild(&d.reply("a", body, 0)));
    d.rebuild_base("a", 6);
    let a = d.wal_gone("a", 7, 1);
    assert!(
        !begins_rebuild(&a),
        "a second rebuild on one session: {a:?}"
    );
    assert!(closes(&a));
    assert_eq!(d.state("a"), PeerState::NeedsRebuild);
    assert_eq!(d.counters().rebuilds_started, 1);
}

/// Wrong phase order: a frame a replica's state does not expect ends the session
/// (`received` in `core/primary/frames.rs`, its `other` arm): a `RebuildDone` while it
/// catches up, a `Truncated` we never asked for, a second `HelloOk` once in sync.
#[test]
fn a_wrong_phase_order_is_rejected() {
    let unexpected = [
        Body::RebuildDone { durable: Lsn(10) },
        truncated(10),
        hello_ok(10),
    ];
    for body in unexpected {
        let mut d = catching_up();
        if matches!(body, Body::HelloOk { .. }) {
            d.wal_read("a", 1, 10, 1);
            assert_eq!(d.state("a"), PeerState::InSync);
        }
        let what = body.name();
        let a = d.reply("a", body, 2);
        assert!(closes(&a), "{what} was accepted: {a:?}");
        assert_eq!(d.state("a"), PeerState::Disconnected, "{what}");
    }
}

/// Progress regression: a replica reporting less than it reported before in the same
/// session lowers nothing it counts for (`Peer::acked` only raises `durable`), and a rebuild
/// reported done short of its finish target is refused (`rebuild_done`, "too early").
#[test]
fn a_progress_regression_is_rejected() {
    let mut d = all_in_sync(CommitMode::SyncAll, &["a"], 0);
    d.append(1, 10);
    d.step(Event::LocalDurable { lsn: Lsn(10) });
    d.ack("a", 10, 1);
    assert_eq!(d.durable("a"), Lsn(10));
    d.ack("a", 4, 2);
    assert_eq!(d.durable("a"), Lsn(10), "a regression lowered its progress");
    assert_eq!(d.c.committed(), Lsn(10));

    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    d.connected("a", 0);
    let mut body = hello_ok(0);
    if let Body::HelloOk { rebuilding, .. } = &mut body {
        *rebuilding = true;
    }
    d.reply("a", body, 0);
    d.rebuild_base("a", 6);
    d.base_sent("a");
    d.wal_read("a", 7, 10, 1);
    let a = d.reply("a", Body::RebuildDone { durable: Lsn(8) }, 2);
    assert!(closes(&a), "a rebuild done short of its target counted");
    assert_ne!(d.state("a"), PeerState::InSync);
}

/// Completion (a replica counted in sync) from init, from connecting, from a handshake with
/// a gap, or from a catch-up before it converges is rejected: only `become_in_sync` makes a
/// replica count, reached from a zero-gap handshake (`handshake`), a catch-up that reached
/// our head (`wal_read`) or an accepted rebuild (`rebuild_done`). A sync-all FLUSH proves it.
#[test]
fn completion_from_init_connecting_or_a_handshake_with_a_gap_is_rejected() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.step(Event::LocalDurable { lsn: Lsn(10) });
    // Init: never dialled; nothing it could send is on a session.
    let a = d.reply_on("a", SessionId(99), E, hello_ok(10), 0);
    assert!(a.is_empty());
    assert_eq!(d.state("a"), PeerState::Disconnected);
    // Connecting: the transport is not up; a completion is out of order.
    d.tick(0);
    let a = d.reply("a", Body::RebuildDone { durable: Lsn(10) }, 0);
    assert!(closes(&a));
    assert_ne!(d.state("a"), PeerState::InSync);
    // Handshake with a gap: catching up, not in sync, and its acks cannot complete a FLUSH.
    d.tick(1_000);
    d.handshake("a", 5, 1_000);
    assert_eq!(d.state("a"), PeerState::CatchingUp);
    d.barrier(1, 10, 1_000);
    assert!(done(&d.ack("a", 10, 1_001)).is_empty());
    // A catch-up before convergence: part of the gap shipped, still not in sync.
    let a = d.wal_read("a", 6, 8, 1_002);
    assert_eq!(reads(&a), vec![Lsn(9)]);
    assert_eq!(d.state("a"), PeerState::CatchingUp);
    assert!(done(&d.ack("a", 10, 1_003)).is_empty());
    // Converged: now it counts, and the pending FLUSH completes.
    d.wal_read("a", 9, 10, 1_004);
    assert_eq!(d.state("a"), PeerState::InSync);
    assert_eq!(done(&d.ack("a", 10, 1_005)), vec![1]);
}

/// Completion from a handshake with zero gap is allowed: a replica whose log ends at our
/// head, same epoch, is in sync at once, with no catch-up read (`handshake`,
/// `durable == self.head`).
#[test]
fn completion_from_a_handshake_with_zero_gap_is_allowed() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    let a = d.handshake("a", 10, 0);
    assert!(reads(&a).is_empty());
    assert_eq!(d.state("a"), PeerState::InSync);
    assert_eq!(d.counters().catch_ups, 0);
}

/// Repeated reconnect cycles keep the sender identity: the one `Peer` a replica has for the
/// life of the core (`PrimaryCore::new`) survives every session; each session gets a new id
/// (`Peer::begin_session`), and what it knows of the replica's log carries over, so the WAL
/// stays pinned for it between sessions.
#[test]
fn repeated_reconnect_cycles_keep_the_sender_identity() {
    let mut d = all_in_sync(CommitMode::BestEffort, &["a"], 0);
    let mut last = d.session("a");
    let mut now = 0;
    for cycle in 1..=5u64 {
        d.append(cycle * 10 - 9, cycle * 10);
        d.ack("a", cycle * 10 - 5, now + 1);
        d.disconnected("a", now + 2);
        let p = d.c.peers();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].id, rid("a"));
        assert!(
            p[0].recoverable,
            "cycle {cycle}: its progress was forgotten"
        );
        assert_eq!(d.c.pin(), Some(Lsn(cycle * 10 - 4)), "cycle {cycle}");
        now += 500;
        d.tick(now);
        assert!(d.session("a") > last, "cycle {cycle}: a session id reused");
        last = d.session("a");
        let a = d.handshake("a", cycle * 10 - 5, now);
        assert_eq!(reads(&a), vec![Lsn(cycle * 10 - 4)]);
        d.wal_read("a", cycle * 10 - 4, cycle * 10, now);
        assert_eq!(d.state("a"), PeerState::InSync, "cycle {cycle}");
    }
    let k = d.counters();
    assert_eq!((k.sessions, k.catch_ups, k.rebuilds_needed), (6, 5, 0));
}

/// Budget (duration): a replica away longer than the retention time is released to a
/// rebuild (`enforce_retention`, `over_time`), however often it is redialled meanwhile.
#[test]
fn budget_duration_escalates_to_needs_rebuild() {
    let mut d = all_in_sync(CommitMode::BestEffort, &["a"], 10);
    d.disconnected("a", 0);
    let mut now = 0;
    while now < RETENTION_TIME - 100 {
        now += 300;
        d.tick(now);
        if d.state("a") == PeerState::Connecting {
            d.disconnected("a", now);
        }
        assert_ne!(d.state("a"), PeerState::NeedsRebuild, "released early");
    }
    d.tick(RETENTION_TIME);
    assert_eq!(d.state("a"), PeerState::NeedsRebuild);
    assert_eq!(d.c.pin(), None, "the WAL is still held for it");
}

/// Budget (entries): a catch-up that has more WAL to cover than the byte budget (ours counts
/// bytes, not entries) escalates on its own session to a rebuild (`enforce_retention`,
/// `over_bytes`; `needs_rebuild` starts it at once since the session is talking). This is
/// also what stops tail chasing: the catch-up never freezes a target, it follows our head,
/// and a replica that cannot close the gap is released by this budget.
#[test]
fn budget_entries_escalates_a_catch_up_to_a_rebuild() {
    let mut d = catching_up();
    let budget = PrimaryConfig::new(
        VolumeId([0; 16]),
        0,
        VolumeId([0; 16]),
        E,
        CommitMode::SyncAll,
        vec![],
    )
    .retention_bytes;
    let a = d.tick_pinned(1, budget);
    assert!(!begins_rebuild(&a));
    let a = d.tick_pinned(2, budget + 1);
    assert!(begins_rebuild(&a), "{a:?}");
    assert_eq!(d.state("a"), PeerState::Rebuilding);
}

/// Budget (entries) versus a replica that is merely unasked: `a` is in sync, has answered
/// every ask, and the WAL behind its last report passes the byte budget only because a burst
/// arrived between two progress asks (`progress_interval`). Outside sync-all,
/// `enforce_retention` releases it to a full rebuild on that stale figure, although asking
/// it would show it holds nearly everything. (The sim test
/// `budget_entries_never_release_an_in_sync_replica_on_stale_progress` is the same bug
/// in a cluster.)
#[test]
fn budget_entries_never_release_an_in_sync_replica_on_stale_progress() {
    for mode in [CommitMode::BestEffort, CommitMode::SyncQuorum] {
        let mut d = all_in_sync(mode, &["a", "b"], 0);
        d.append(1, 1_000);
        // Nothing unanswered: no ask has gone out since the burst began.
        let a = d.tick_pinned(1, u64::MAX);
        assert!(!begins_rebuild(&a) && !closes(&a), "{mode}: {a:?}");
        assert_eq!(d.state("a"), PeerState::InSync, "{mode}");
    }
}

/// Budget (stall): a replica in sync that stops answering is dropped at the barrier timeout
/// (`tick_peer`, `oldest_unanswered`), and the time budget runs from then: a replica that
/// stays stalled is released to a rebuild.
#[test]
fn budget_stall_escalates_to_needs_rebuild() {
    let mut d = all_in_sync(CommitMode::BestEffort, &["a"], 0);
    d.append(1, 5);
    d.barrier(1, 5, 0);
    d.tick(TIMEOUT - 1);
    assert_eq!(d.state("a"), PeerState::InSync);
    let a = d.tick(TIMEOUT);
    assert!(closes(&a));
    assert_ne!(d.state("a"), PeerState::InSync);
    d.tick(TIMEOUT + RETENTION_TIME);
    if d.state("a") != PeerState::NeedsRebuild {
        // The redial of the stalled replica is still pending: it never answers.
        d.disconnected("a", TIMEOUT + RETENTION_TIME);
        d.tick(TIMEOUT + RETENTION_TIME + 1);
    }
    assert_eq!(d.state("a"), PeerState::NeedsRebuild);
}

/// Rebuild calls are exclusive with catch-up calls: once a catch-up became a rebuild, the
/// catch-up's outstanding read is stale (`current_read` matches `from` against the read the
/// rebuild waits for), and a rebuild base chosen for a peer that is not rebuilding is
/// ignored (`rebuild_base` checks `Rebuilding`).
#[test]
fn rebuild_and_catch_up_calls_are_exclusive() {
    let mut d = catching_up();
    let a = d.rebuild_base("a", 6);
    assert!(a.is_empty(), "a catch-up took a rebuild base: {a:?}");
    assert_eq!(d.state("a"), PeerState::CatchingUp);
    let a = d.tick_pinned(1, u64::MAX);
    assert!(begins_rebuild(&a));
    d.rebuild_base("a", 6);
    let stale = d.wal_read("a", 1, 10, 2);
    assert!(
        stale.is_empty(),
        "the catch-up's read fed the rebuild: {stale:?}"
    );
    assert_eq!(d.state("a"), PeerState::Rebuilding);
}

/// Rebuild source selection needs the handshake phase: a replica released while it is only
/// connecting gets no rebuild base chosen for it (`needs_rebuild` begins a rebuild only on a
/// session that is `talking`); the rebuild starts on the next session's handshake.
#[test]
fn rebuild_source_selection_needs_the_handshake_phase() {
    let mut d = all_in_sync(CommitMode::BestEffort, &["a"], 10);
    d.disconnected("a", 0);
    d.tick(RETENTION_TIME - 1);
    assert_eq!(d.state("a"), PeerState::Connecting);
    let a = d.tick(RETENTION_TIME);
    assert!(!begins_rebuild(&a), "a base chosen before any hello: {a:?}");
    assert_eq!(d.state("a"), PeerState::NeedsRebuild);
    // The next session's handshake decides: its log still ends at 4, the WAL after it is
    // gone, and only now, on a talking session, is a base chosen. (Had it come back holding
    // our whole log it would simply be in sync: the log comparison decides, not the label.)
    let now = RETENTION_TIME + 1_000;
    d.tick(now);
    let a = d.handshake("a", 4, now);
    assert!(!begins_rebuild(&a));
    let a = d.wal_gone("a", 5, now);
    assert!(begins_rebuild(&a), "{a:?}");
}

/// NeedsRebuild persists across an endpoint update: redials of a released replica that fail
/// (it moved, the old address answers nothing) leave it NeedsRebuild, not Disconnected
/// (`drop_session` keeps it while `released`), and no WAL is held for it; when it is found
/// and its gap is gone, it is rebuilt.
#[test]
fn needs_rebuild_persists_across_an_endpoint_update() {
    let mut d = all_in_sync(CommitMode::BestEffort, &["a"], 10);
    d.disconnected("a", 0);
    d.tick(RETENTION_TIME);
    d.tick(RETENTION_TIME + 1);
    assert_eq!(d.state("a"), PeerState::NeedsRebuild);
    let mut now = RETENTION_TIME + 1;
    for _ in 0..4 {
        now += 2_500;
        d.tick(now);
        assert_eq!(d.state("a"), PeerState::Connecting);
        d.disconnected("a", now);
        assert_eq!(d.state("a"), PeerState::NeedsRebuild);
        assert_eq!(d.c.pin(), None);
    }
    now += 2_500;
    d.tick(now);
    d.handshake("a", 4, now);
    let a = d.wal_gone("a", 5, now);
    assert!(begins_rebuild(&a), "{a:?}");
}

/// Truncation: the replica ahead must cut its log before it is in sync. Its hello shows
/// entries past our head; it is asked to cut (`handshake` → `begin_cut`), counts only
/// through what it keeps while the answer is pending (`Peer::begin_cut` lowers `durable`),
/// and is in sync only after `Truncated` confirms the cut (`truncated` → `handshake`).
#[test]
fn truncation_the_replica_ahead_must_cut_before_in_sync() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.step(Event::LocalDurable { lsn: Lsn(10) });
    d.tick(0);
    let a = d.handshake("a", 12, 0);
    assert_eq!(frames(&a), vec![Body::Truncate { keep: Lsn(10) }]);
    assert_eq!(d.state("a"), PeerState::Handshake);
    d.barrier(1, 10, 0);
    assert!(done(&d.ack("a", 12, 1)).is_empty());
    assert!(d.durable("a") <= Lsn(10));
    d.reply("a", truncated(10), 2);
    assert_eq!(d.state("a"), PeerState::InSync);
    assert_eq!(d.counters().truncations, 1);
}

/// Truncation: a wrong truncate LSN is rejected. A `Truncated` that reports a log ending
/// anywhere but where it was asked to cut ends the session (`truncated`, "asked to cut its
/// log after ..."), and the replica is not counted.
#[test]
fn truncation_a_wrong_truncate_lsn_is_rejected() {
    for wrong in [9, 11, 12] {
        let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
        d.tick(0);
        d.handshake("a", 12, 0);
        let a = d.reply("a", truncated(wrong), 1);
        assert!(closes(&a), "a cut reported at {wrong} was accepted");
        assert_eq!(d.state("a"), PeerState::Disconnected);
        assert_eq!(d.counters().truncations, 0);
    }
}

/// Truncation when not required is rejected: a replica whose log is a prefix of ours is
/// never asked to cut (`divergence` is `Ok(None)`), an unsolicited `Truncated` ends the
/// session (`received` accepts it only while a cut is pending), and on the replica a cut at
/// or past its head changes nothing while one below what it knows committed is refused
/// (`ReplicaCore::truncate`).
#[test]
fn truncation_when_not_required_is_rejected() {
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    let a = d.handshake("a", 7, 0);
    assert!(!frames(&a)
        .iter()
        .any(|b| matches!(b, Body::Truncate { .. })));
    assert!(closes(&d.reply("a", truncated(7), 1)));
    // Nor in the handshake, before any cut was asked (the `truncating()` guard).
    let mut d = Drive::new(CommitMode::SyncAll, &["a"], 10);
    d.tick(0);
    d.connected("a", 0);
    assert_eq!(d.state("a"), PeerState::Handshake);
    assert!(closes(&d.reply("a", truncated(0), 1)));
    assert_eq!(d.counters().truncations, 0);

    let mut r = replica_following(5, 10);
    let a = r.step(replica::Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body: Body::Truncate { keep: Lsn(10) },
        },
    });
    assert!(!a
        .iter()
        .any(|x| matches!(x, replica::Action::Truncate { .. })));
    assert!(matches!(
        &frames_of(&a)[..],
        [Body::Truncated { durable: Lsn(10), refusal, .. }] if refusal.is_empty()
    ));
    let a = r.step(replica::Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body: Body::Truncate { keep: Lsn(2) },
        },
    });
    assert!(!a
        .iter()
        .any(|x| matches!(x, replica::Action::Truncate { .. })));
    assert!(matches!(
        &frames_of(&a)[..],
        [Body::Truncated { refusal, .. }] if refusal.contains("committed")
    ));
}

// ---- 6.3 stale traffic, on the replica -------------------------------------------------------

const C: ConnId = ConnId(1);
const OWNER: VolumeId = VolumeId([2; 16]);

/// A replica at `epoch` whose log ends at `head` (committed through 4), following the
/// primary on connection `C` after a hello.
fn replica_following(epoch: u64, head: u64) -> ReplicaCore {
    let mut r = ReplicaCore::new(ReplicaState {
        volume_id: VolumeId([1; 16]),
        volume_size: 1 << 30,
        store_id: VolumeId([7; 16]),
        blank: false,
        epoch: Epoch(epoch),
        epoch_owner: OWNER,
        head: Lsn(head),
        head_epoch: Epoch(epoch),
        durable: Lsn(head),
        committed: Lsn(4),
        was_primary: false,
        rebuilding: false,
        cursor: None,
    });
    r.step(replica::Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(epoch),
            body: Body::Hello {
                volume_id: VolumeId([1; 16]),
                volume_size: 1 << 30,
                primary_store: OWNER,
                head: Lsn(head),
                committed: Lsn(4),
            },
        },
    });
    r.step(replica::Event::Synced {
        conn: C,
        durable: Lsn(head),
    });
    assert_eq!(r.active(), Some(C));
    r
}

fn frames_of(a: &[replica::Action]) -> Vec<Body> {
    a.iter()
        .filter_map(|x| match x {
            replica::Action::Send { frame, .. } => Some(frame.body.clone()),
            _ => None,
        })
        .collect()
}

/// Every frame kind a primary sends after its hello.
fn primary_frames() -> Vec<Body> {
    vec![
        Body::Entries {
            committed: Lsn(4),
            records: vec![rec(11)],
        },
        Body::Barrier {
            lsn: Lsn(10),
            committed: Lsn(4),
        },
        Body::RebuildStart {
            base: Lsn(3),
            history: vec![],
            resume: None,
        },
        Body::BaseChunk {
            offset: 0,
            length: 4096,
            reflects: Lsn::ZERO,
            data: None,
        },
        Body::RebuildFinish { target: Lsn(10) },
        Body::Truncate { keep: Lsn(8) },
    ]
}

/// The only actions a refused frame may cause: its refusal and the close.
fn only_refused(a: &[replica::Action]) -> Option<(RejectReason, String)> {
    match a {
        [replica::Action::Send { frame, .. }, replica::Action::Close { .. }] => match &frame.body {
            Body::Reject { reason, message } => Some((*reason, message.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// All stale traffic is rejected with an explicit reason: every kind of frame a primary
/// sends after its hello, at an older epoch, is refused `StaleEpoch` with both epochs named
/// (`ReplicaCore::current`, first check), and on a connection that is not the active session
/// `Protocol` ("no session"); neither touches the store (no append, sync, cut, base or
/// rebuild action) and the refused connection is closed.
#[test]
fn all_stale_traffic_is_rejected_with_explicit_reasons() {
    for body in primary_frames() {
        let what = body.name();
        let mut r = replica_following(5, 10);
        let a = r.step(replica::Event::Received {
            conn: C,
            frame: Frame {
                epoch: Epoch(4),
                body: body.clone(),
            },
        });
        let (reason, message) = only_refused(&a).unwrap_or_else(|| panic!("{what}: {a:?}"));
        assert_eq!(reason, RejectReason::StaleEpoch, "{what}");
        assert!(
            message.contains("epoch 4") && message.contains('5'),
            "{what}: {message}"
        );
        assert_eq!(r.state().head, Lsn(10), "{what}");
        assert_eq!(r.state().epoch, Epoch(5), "{what}");

        let mut r = replica_following(5, 10);
        let a = r.step(replica::Event::Received {
            conn: ConnId(2),
            frame: Frame {
                epoch: Epoch(5),
                body,
            },
        });
        let (reason, message) = only_refused(&a).unwrap_or_else(|| panic!("{what}: {a:?}"));
        assert_eq!(reason, RejectReason::Protocol, "{what}");
        assert!(message.contains("no session"), "{what}: {message}");
        assert_eq!(
            r.active(),
            Some(C),
            "{what}: a stray frame ended the session"
        );
    }
}
