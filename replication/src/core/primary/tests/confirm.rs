//! `PrimaryCore::confirmed_at`: what a `--failsafe` leader acknowledges on.

use super::*;

/// A barrier through `target` sent at `now`, with the frames it sends.
fn barrier(c: &mut PrimaryCore, id: u64, target: u64, now: Millis) -> Vec<Action> {
    c.step(Event::Barrier {
        id,
        target: Lsn(target),
        now,
    })
}

#[test]
fn a_confirmation_is_never_later_than_the_answer_it_rests_on() {
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    assert_eq!(c.confirmed_at(), None, "nobody has answered an ask yet");
    append(&mut c, 1, 2);
    c.step(Event::LocalDurable { lsn: Lsn(2) });
    barrier(&mut c, 1, 1, 10);
    barrier(&mut c, 2, 2, 20);
    // One ack answers the ask sent at 10, even though it reports enough for both: it may
    // have left the replica before the ask of 20 arrived.
    ack(&mut c, &s, "a", 2, 25);
    ack(&mut c, &s, "b", 2, 26);
    assert_eq!(c.confirmed_at(), Some(10));
    ack(&mut c, &s, "a", 2, 27);
    assert_eq!(
        c.confirmed_at(),
        Some(10),
        "sync-all waits for every replica"
    );
    ack(&mut c, &s, "b", 2, 28);
    assert_eq!(c.confirmed_at(), Some(20));
    // An ack nothing asked for vouches for nothing newer.
    ack(&mut c, &s, "a", 2, 29);
    ack(&mut c, &s, "b", 2, 29);
    assert_eq!(c.confirmed_at(), Some(20));
}

#[test]
fn sync_all_loses_its_confirmation_with_a_replica_and_sync_quorum_keeps_a_majority() {
    for (mode, after) in [
        (CommitMode::SyncAll, None),
        (CommitMode::SyncQuorum, Some(10)),
    ] {
        let mut c = core(mode, &["a", "b"], 0);
        let s = bring_up(&mut c, 0);
        append(&mut c, 1, 1);
        c.step(Event::LocalDurable { lsn: Lsn(1) });
        barrier(&mut c, 1, 1, 10);
        ack(&mut c, &s, "a", 1, 11);
        ack(&mut c, &s, "b", 1, 11);
        assert_eq!(c.confirmed_at(), Some(10), "{mode:?}");
        let (id, session) = s[1].clone();
        c.step(Event::Disconnected {
            replica: id,
            session,
            now: 12,
            reason: "killed".into(),
        });
        assert_eq!(c.confirmed_at(), after, "{mode:?} with b gone");
    }
}

#[test]
fn best_effort_and_a_fenced_primary_confirm_nothing() {
    let mut c = core(CommitMode::BestEffort, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    barrier(&mut c, 1, 1, 10);
    ack(&mut c, &s, "a", 1, 11);
    assert_eq!(c.confirmed_at(), None);

    let mut c = core(CommitMode::SyncAll, &["a"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    barrier(&mut c, 1, 1, 10);
    ack(&mut c, &s, "a", 1, 11);
    assert_eq!(c.confirmed_at(), Some(10));
    let reject = Body::Reject {
        reason: RejectReason::StaleEpoch,
        message: "promoted".into(),
    };
    let (id, session) = s[0].clone();
    c.step(Event::Received {
        replica: id,
        session,
        frame: Frame {
            epoch: Epoch(E.0 + 1),
            body: reject,
        },
        now: 12,
    });
    assert_eq!(c.confirmed_at(), None);
}

#[test]
fn an_idle_replica_is_asked_again_every_confirm_interval() {
    let mut c = core(CommitMode::SyncAll, &["a"], 5);
    c.cfg.confirm_interval = 200;
    let s = bring_up(&mut c, 5);
    assert!(frames_to(&tick(&mut c, 100), "a").is_empty());
    let a = tick(&mut c, 200);
    assert!(matches!(
        frames_to(&a, "a")[..],
        [Body::Barrier { lsn: Lsn(5), .. }]
    ));
    // Nothing more while that ask is outstanding.
    assert!(frames_to(&tick(&mut c, 450), "a").is_empty());
    ack(&mut c, &s, "a", 5, 460);
    assert_eq!(c.confirmed_at(), Some(200));
    let a = tick(&mut c, 460);
    assert!(matches!(frames_to(&a, "a")[..], [Body::Barrier { .. }]));
    // Without the interval an idle replica is left alone.
    let mut c = core(CommitMode::SyncAll, &["a"], 5);
    bring_up(&mut c, 5);
    assert!(frames_to(&tick(&mut c, 10_000), "a").is_empty());
}
