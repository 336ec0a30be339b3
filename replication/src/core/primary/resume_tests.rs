//! The resume rule for an interrupted rebuild: when a replica's cursor is trusted, when the
//! rebuild starts over (and why), and the WAL it holds meanwhile.

use blockrep_storage::RebuildCursor;

use super::*;
use crate::wire::Body;

const E: Epoch = Epoch(3);
const MIB: u64 = 1 << 20;

fn rid(n: &str) -> ReplicaId {
    ReplicaId(n.into())
}

/// A primary at epoch `E` whose log is `history` through `head`, one replica "a".
fn primary(head: u64, history: Vec<(Epoch, Lsn)>) -> PrimaryCore {
    let mut cfg = PrimaryConfig::new(
        VolumeId([1; 16]),
        1 << 30,
        VolumeId([2; 16]),
        E,
        CommitMode::SyncAll,
        vec![rid("a")],
    );
    cfg.retention_bytes = 64 * MIB;
    PrimaryCore::new(cfg, Lsn(head), history, Lsn(head), Lsn(1), 0)
}

fn cursor(base: u64, proof: u64, proof_epoch: Epoch) -> RebuildCursor {
    RebuildCursor {
        base: Lsn(base),
        history: vec![(Epoch(1), Lsn(1))],
        through: 8 * MIB,
        proof: Lsn(proof),
        proof_epoch,
    }
}

/// Dials "a" and answers the hello as a replica whose rebuild was interrupted at `cursor`.
fn interrupted(
    c: &mut PrimaryCore,
    cursor: Option<RebuildCursor>,
    now: Millis,
) -> (SessionId, Vec<Action>) {
    let a = c.step(Event::Tick {
        now,
        pinned_bytes: 0,
    });
    let session = a
        .iter()
        .find_map(|x| match x {
            Action::Connect { session, .. } => Some(*session),
            _ => None,
        })
        .expect("dialled");
    c.step(Event::Connected {
        replica: rid("a"),
        session,
        now,
    });
    let body = Body::HelloOk {
        replica_store: VolumeId([9; 16]),
        durable: Lsn(0),
        durable_epoch: Epoch(0),
        committed: Lsn(0),
        rebuilding: true,
        cursor,
    };
    let a = c.step(Event::Received {
        replica: rid("a"),
        session,
        frame: Frame { epoch: E, body },
        now,
    });
    (session, a)
}

fn asked_to_resume(a: &[Action]) -> Option<Option<Lsn>> {
    a.iter().find_map(|x| match x {
        Action::BeginRebuild { resume, .. } => Some(*resume),
        _ => None,
    })
}

fn restarts(c: &PrimaryCore, reason: RebuildRestart) -> u64 {
    c.counters().rebuild_restarts[reason.index()]
}

/// The base is chosen as the driver would: `resumed` says whether the old one was kept.
fn base_chosen(c: &mut PrimaryCore, s: SessionId, base: u64, resumed: bool) -> Vec<Action> {
    c.step(Event::RebuildBase {
        replica: rid("a"),
        session: s,
        base: Lsn(base),
        history: vec![(Epoch(1), Lsn(1))],
        resumed,
        refused: None,
    })
}

/// The store could not resume (for `why`) and chose a fresh base at `base`.
fn base_refused(c: &mut PrimaryCore, s: SessionId, base: u64, why: RebuildRestart) -> Vec<Action> {
    c.step(Event::RebuildBase {
        replica: rid("a"),
        session: s,
        base: Lsn(base),
        history: vec![(Epoch(1), Lsn(1))],
        resumed: false,
        refused: Some(why),
    })
}

fn stream_from(a: &[Action]) -> Option<u64> {
    a.iter().find_map(|x| match x {
        Action::StreamBase { from, .. } => Some(*from),
        _ => None,
    })
}

#[test]
fn an_interrupted_rebuild_resumes_from_a_cursor_whose_lineage_is_ours() {
    // Our log: epoch 1 from 1, epoch 3 from 8; the cursor's proof (9) is an entry of 3.
    let mut c = primary(20, vec![(Epoch(1), Lsn(1)), (E, Lsn(8))]);
    let (s, a) = interrupted(&mut c, Some(cursor(5, 9, E)), 0);
    assert_eq!(asked_to_resume(&a), Some(Some(Lsn(5))));
    // From the handshake on, the WAL after the old base is held for it.
    assert_eq!(c.pin(), Some(Lsn(6)));
    let a = base_chosen(&mut c, s, 5, true);
    let start = a.iter().find_map(|x| match x {
        Action::Send { frame, .. } => match &frame.body {
            Body::RebuildStart { base, resume, .. } => Some((*base, *resume)),
            _ => None,
        },
        _ => None,
    });
    assert_eq!(start, Some((Lsn(5), Some(8 * MIB))));
    assert_eq!(stream_from(&a), Some(8 * MIB));
    // The WAL line still starts right after the base.
    assert!(a.contains(&Action::ReadWal {
        replica: rid("a"),
        session: s,
        from: Lsn(6),
        max_bytes: 4 << 20,
    }));
    assert_eq!(c.counters().rebuilds_resumed, 1);
    assert_eq!(
        c.counters().rebuild_restarts,
        [0; RebuildRestart::ALL.len()]
    );
    let progress = c.peers()[0].rebuild.clone().expect("rebuilding");
    assert_eq!(progress.resumed_from, Some(8 * MIB));
}

#[test]
fn no_partial_base_is_trusted_without_proof_of_its_lineage() {
    let history = vec![(Epoch(1), Lsn(1)), (E, Lsn(8))];
    let cases = [
        // No cursor at all.
        (None, RebuildRestart::NoCursor),
        // Nonsense: a proof below its base.
        (Some(cursor(5, 4, Epoch(1))), RebuildRestart::BadCursor),
        // Our entry 9 is of epoch 3; the base came from a log whose entry 9 was of epoch 2.
        (Some(cursor(5, 9, Epoch(2))), RebuildRestart::LineageChanged),
        // The base may reflect entries past our head.
        (Some(cursor(5, 30, E)), RebuildRestart::LineageChanged),
        // Our history through the base differs (it was taken at epoch 2, we were at 1).
        (
            Some(RebuildCursor {
                history: vec![(Epoch(2), Lsn(1))],
                ..cursor(5, 6, Epoch(2))
            }),
            RebuildRestart::LineageChanged,
        ),
    ];
    for (cursor, reason) in cases {
        let mut c = primary(20, history.clone());
        let (s, a) = interrupted(&mut c, cursor.clone(), 0);
        assert_eq!(asked_to_resume(&a), Some(None), "{cursor:?}");
        assert_eq!(restarts(&c, reason), 1, "{cursor:?}");
        let a = base_chosen(&mut c, s, 12, false);
        assert_eq!(stream_from(&a), Some(0));
        assert_eq!(c.counters().rebuilds_resumed, 0);
    }
    // Vouched for, but the store cannot: the WAL after the base is gone, or our data file
    // is older than the base (what we would send past the cursor could miss entries before
    // it). It chose a fresh base.
    for why in [RebuildRestart::WalRecycled, RebuildRestart::OlderImage] {
        let mut c = primary(20, history.clone());
        let (s, a) = interrupted(&mut c, Some(cursor(5, 9, E)), 0);
        assert_eq!(asked_to_resume(&a), Some(Some(Lsn(5))));
        let a = base_refused(&mut c, s, 12, why);
        assert_eq!(stream_from(&a), Some(0));
        assert_eq!(restarts(&c, why), 1);
        assert_eq!(c.counters().rebuilds_resumed, 0);
        let progress = c.peers()[0].rebuild.clone().expect("rebuilding");
        assert_eq!(progress.resumed_from, None);
    }
}

#[test]
fn an_interrupted_rebuild_holds_the_wal_after_its_base_only_within_the_budget() {
    let mut c = primary(20, vec![(Epoch(1), Lsn(1))]);
    let (s, _) = interrupted(&mut c, None, 0);
    base_chosen(&mut c, s, 12, false);
    assert_eq!(c.pin(), Some(Lsn(13)));
    // It acknowledges progress; the WAL after the base stays held, for a resume.
    c.step(Event::WalRead {
        replica: rid("a"),
        session: s,
        from: Lsn(13),
        records: vec![],
        now: 1,
    });
    c.step(Event::Disconnected {
        replica: rid("a"),
        session: s,
        now: 2,
        reason: "killed".into(),
    });
    assert_eq!(c.peers()[0].state, PeerState::NeedsRebuild);
    assert_eq!(c.pin(), Some(Lsn(13)));
    // Past the byte budget the hold goes, and nobody is sent anywhere for it.
    let before = c.counters().rebuilds_needed;
    c.step(Event::Tick {
        now: 3,
        pinned_bytes: 65 * MIB,
    });
    assert_eq!(c.pin(), None);
    assert_eq!(c.counters().rebuilds_needed, before);
}
