//! Members joining and leaving a running primary (`Event::SetReplicas`).

use super::*;

fn set_replicas(
    c: &mut PrimaryCore,
    replicas: &[&str],
    kept_from: u64,
    now: Millis,
) -> Vec<Action> {
    c.step(Event::SetReplicas {
        replicas: replicas.iter().map(|r| rid(r)).collect(),
        kept_from: Lsn(kept_from),
        now,
    })
}

fn closed(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { replica, .. } => Some(replica.0.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_member_leaves_only_with_what_its_caller_decided() {
    // sync-all over a and b: b never acknowledges, so the FLUSH waits for it; once the
    // caller drops b, a alone meets the mode and the FLUSH completes.
    let mut c = core(CommitMode::SyncAll, &["a", "b"], 0);
    let s = bring_up(&mut c, 0);
    append(&mut c, 1, 1);
    c.step(Event::Barrier {
        id: 4,
        target: Lsn(1),
        now: 10,
    });
    c.step(Event::LocalDurable { lsn: Lsn(1) });
    ack(&mut c, &s, "a", 1, 11);
    assert!(done(&tick(&mut c, 12)).is_empty(), "b still counts");
    let a = set_replicas(&mut c, &["a"], 1, 13);
    assert_eq!(closed(&a), vec!["b".to_string()], "{a:?}");
    assert_eq!(done(&a), vec![4]);
    assert!(a.contains(&Action::Committed { lsn: Lsn(1) }));
    assert_eq!(
        c.peers()
            .iter()
            .map(|p| p.id.0.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    // Frames from the old session are not taken for a member's.
    let gone = s.iter().find(|(id, _)| id.0 == "b").unwrap().clone();
    let a = reply(
        &mut c,
        &gone.0,
        gone.1,
        Body::BarrierAck { durable: Lsn(1) },
        14,
    );
    assert!(a.is_empty(), "{a:?}");
}

#[test]
fn a_member_that_joins_is_dialled_and_caught_up_while_the_others_keep_their_sessions() {
    let mut c = core(CommitMode::SyncAll, &["a"], 10);
    bring_up(&mut c, 10);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    let a = set_replicas(&mut c, &["a", "b"], 3, 20);
    assert!(closed(&a).is_empty(), "{a:?}");
    assert_eq!(state(&c, "b"), PeerState::Disconnected);
    assert_eq!(
        c.pin(),
        Some(Lsn(3)),
        "the WAL is held for b until it is heard from"
    );
    // Only b is dialled; a stays in sync on its session.
    let dialled = tick(&mut c, 20);
    let who: Vec<_> = sessions(&dialled).into_iter().map(|(r, _)| r.0).collect();
    assert_eq!(who, ["b"]);
    assert_eq!(state(&c, "a"), PeerState::InSync);
    let a = hello(&mut c, &dialled, "b", 6, 21);
    assert_eq!(state(&c, "b"), PeerState::CatchingUp);
    assert!(
        a.iter().any(
            |x| matches!(x, Action::ReadWal { replica, from: Lsn(7), .. } if replica.0 == "b")
        ),
        "{a:?}"
    );
    // Until b is in sync, sync-all commits nothing new.
    append(&mut c, 11, 11);
    c.step(Event::Barrier {
        id: 1,
        target: Lsn(11),
        now: 22,
    });
    assert!(done(&c.step(Event::LocalDurable { lsn: Lsn(11) })).is_empty());
}

#[test]
fn a_member_named_twice_is_one_peer() {
    let mut c = core(CommitMode::SyncQuorum, &["a"], 0);
    set_replicas(&mut c, &["b", "a", "b"], 1, 5);
    let mut names: Vec<_> = c.peers().into_iter().map(|p| p.id.0).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
}
