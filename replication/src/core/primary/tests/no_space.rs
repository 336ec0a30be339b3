//! A replica whose filesystem is full (`Reject(NoSpace)`).

use super::*;

fn refuse_for_space(c: &mut PrimaryCore, r: &ReplicaId, s: SessionId, now: Millis) -> Vec<Action> {
    let body = Body::Reject {
        reason: RejectReason::NoSpace,
        message: "the replica's filesystem is full".into(),
    };
    reply(c, r, s, body, now)
}

fn state_of(c: &PrimaryCore, r: &str) -> PeerStatus {
    c.peers()
        .into_iter()
        .find(|p| p.id.0 == r)
        .expect("a configured replica")
}

#[test]
fn a_replica_out_of_space_is_away_as_a_lagging_one_and_its_flushes_fail_as_no_space() {
    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 10,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    refuse_for_space(&mut c, &s[0].0, s[0].1, 11);
    // Not parked as refused (whose WAL hold goes): away, its hold kept, redialled.
    let a = state_of(&c, "a");
    assert_eq!(a.state, PeerState::Disconnected, "{a:?}");
    assert!(a.recoverable, "{a:?}");
    // Redialled only at the longest backoff: freeing space takes longer than a fast retry.
    assert!(sessions(&tick(&mut c, 11 + 1999)).is_empty());
    let mut dialled = tick(&mut c, 5010);
    assert_eq!(failed(&dialled), vec![(1, BarrierFailure::ReplicaNoSpace)]);
    // Redialled: it catches up and acknowledges, and a later FLUSH that times out for
    // another reason says so.
    dialled.extend(tick(&mut c, 8000));
    hello(&mut c, &dialled, "a", 0, 8000);
    let s = sessions(&dialled);
    let a = c.step(Event::WalRead {
        replica: s[0].0.clone(),
        session: s[0].1,
        from: Lsn(1),
        records: vec![rec(1, E)],
        now: 8000,
    });
    assert!(
        frames_to(&a, "a")
            .iter()
            .any(|b| matches!(b, Body::Entries { .. })),
        "{a:?}"
    );
    reply(
        &mut c,
        &s[0].0,
        s[0].1,
        Body::BarrierAck { durable: Lsn(1) },
        8001,
    );
    assert_eq!(state_of(&c, "a").state, PeerState::InSync);
    append(&mut c, 2, 2);
    c.step(Event::Barrier {
        id: 2,
        target: Lsn(2),
        now: 8002,
    });
    c.step(Event::LocalDurable { lsn: Lsn(2) });
    c.step(Event::Disconnected {
        replica: s[0].0.clone(),
        session: s[0].1,
        now: 8003,
        reason: "gone".into(),
    });
    let failure = failed(&tick(&mut c, 13_010));
    assert_eq!(failure, vec![(2, BarrierFailure::ReplicaMissing)]);
}

#[test]
fn under_sync_quorum_a_flush_whose_missing_copies_are_full_fails_as_no_space() {
    let mut c = core(CommitMode::SyncQuorum, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(1),
        now: 10,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    for (r, session) in &s {
        refuse_for_space(&mut c, r, *session, 11);
    }
    assert_eq!(
        failed(&tick(&mut c, 5010)),
        vec![(1, BarrierFailure::ReplicaNoSpace)]
    );
}
