use bytes::Bytes;

use super::*;

const VOL: VolumeId = VolumeId([1; 16]);
const P1: VolumeId = VolumeId([2; 16]);
const P2: VolumeId = VolumeId([3; 16]);
const C: ConnId = ConnId(1);

fn state(epoch: u64, head: u64) -> ReplicaState {
    ReplicaState {
        volume_id: VOL,
        volume_size: 1 << 30,
        store_id: VolumeId([7; 16]),
        blank: false,
        epoch: Epoch(epoch),
        epoch_owner: if epoch > 0 { P1 } else { VolumeId([0; 16]) },
        head: Lsn(head),
        head_epoch: Epoch(epoch),
        durable: Lsn(head),
        committed: Lsn(0),
        was_primary: false,
        rebuilding: false,
        cursor: None,
    }
}

fn hello(epoch: u64, primary: VolumeId) -> Frame {
    Frame {
        epoch: Epoch(epoch),
        body: Body::Hello {
            volume_id: VOL,
            volume_size: 1 << 30,
            primary_store: primary,
            head: Lsn(0),
            committed: Lsn(0),
        },
    }
}

fn entries(epoch: u64, lsns: &[u64]) -> Frame {
    Frame {
        epoch: Epoch(epoch),
        body: Body::Entries {
            committed: Lsn(0),
            records: lsns
                .iter()
                .map(|&l| {
                    WalRecord::new(
                        Lsn(l),
                        Epoch(epoch),
                        blockrep_storage::RecordKind::Write,
                        0,
                        4096,
                        Bytes::from(vec![0u8; 4096]),
                    )
                })
                .collect(),
        },
    }
}

fn rejected(actions: &[Action]) -> Option<RejectReason> {
    actions.iter().find_map(|a| match a {
        Action::Send {
            frame:
                Frame {
                    body: Body::Reject { reason, .. },
                    ..
                },
            ..
        } => Some(*reason),
        _ => None,
    })
}

/// Runs a hello through to its HelloOk.
fn greet(r: &mut ReplicaCore, conn: ConnId, epoch: u64, primary: VolumeId) -> Vec<Action> {
    let mut a = r.step(Event::Received {
        conn,
        frame: hello(epoch, primary),
    });
    let head = r.state().head;
    a.extend(r.step(Event::Synced {
        conn,
        durable: head,
    }));
    a
}

#[test]
fn replica_rejects_stale_epoch_hello_and_keeps_serving() {
    let mut r = ReplicaCore::new(state(5, 10));
    let a = r.step(Event::Received {
        conn: C,
        frame: hello(4, P1),
    });
    assert_eq!(rejected(&a), Some(RejectReason::StaleEpoch));
    // The reject carries the replica's own epoch, so the old primary learns it is fenced.
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Send { frame, .. } if frame.epoch == Epoch(5))));
    let a = greet(&mut r, ConnId(2), 5, P1);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            frame: Frame {
                body: Body::HelloOk { .. },
                ..
            },
            ..
        }
    )));
}

#[test]
fn replica_refuses_a_second_primary_claiming_the_same_epoch() {
    let mut r = ReplicaCore::new(state(5, 10));
    let a = r.step(Event::Received {
        conn: C,
        frame: hello(5, P2),
    });
    assert_eq!(rejected(&a), Some(RejectReason::EpochOwned));
}

#[test]
fn replica_adopts_a_higher_epoch_before_answering_and_supersedes_the_old_session() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let a = greet(&mut r, ConnId(2), 6, P2);
    let adopt = a
        .iter()
        .position(|x| matches!(x, Action::AdoptEpoch { epoch: Epoch(6), owner } if *owner == P2));
    let ok = a.iter().position(|x| {
        matches!(
            x,
            Action::Send {
                frame: Frame {
                    body: Body::HelloOk { .. },
                    ..
                },
                ..
            }
        )
    });
    assert!(
        adopt.unwrap() < ok.unwrap(),
        "the epoch is persisted before the answer"
    );
    assert!(a.contains(&Action::Close {
        conn: C,
        reason: "superseded by a new session".into()
    }));
    // The old primary's stream is now refused.
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11]),
    });
    assert_eq!(rejected(&a), Some(RejectReason::StaleEpoch));
}

#[test]
fn replica_ignores_duplicates_and_refuses_gaps() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[9, 10, 11, 12]),
    });
    let appended: Vec<u64> = a
        .iter()
        .filter_map(|x| match x {
            Action::Append { record } => Some(record.lsn.0),
            _ => None,
        })
        .collect();
    assert_eq!(appended, vec![11, 12]);
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[14]),
    });
    assert_eq!(rejected(&a), Some(RejectReason::Gap));
    assert!(!a.iter().any(|x| matches!(x, Action::Append { .. })));
}

#[test]
fn replica_reports_durable_only_after_its_fsync() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11, 12]),
    });
    let a = r.step(Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body: Body::Barrier {
                lsn: Lsn(12),
                committed: Lsn(10),
            },
        },
    });
    assert!(a.contains(&Action::Sync {
        conn: C,
        lsn: Lsn(12)
    }));
    assert!(!a.iter().any(|x| matches!(
        x,
        Action::Send {
            frame: Frame {
                body: Body::BarrierAck { .. },
                ..
            },
            ..
        }
    )));
    let a = r.step(Event::Synced {
        conn: C,
        durable: Lsn(12),
    });
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            frame: Frame {
                body: Body::BarrierAck { durable: Lsn(12) },
                ..
            },
            ..
        }
    )));
}

#[test]
fn replica_hello_reports_a_durable_head_with_its_epoch() {
    let mut s = state(5, 10);
    s.durable = Lsn(8); // appended but not yet synced: 9 and 10
    let mut r = ReplicaCore::new(s);
    let a = r.step(Event::Received {
        conn: C,
        frame: hello(5, P1),
    });
    assert!(a.contains(&Action::Sync {
        conn: C,
        lsn: Lsn(10)
    }));
    assert!(!a.iter().any(|x| matches!(x, Action::Send { .. })));
    let a = r.step(Event::Synced {
        conn: C,
        durable: Lsn(10),
    });
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            frame: Frame {
                body: Body::HelloOk {
                    durable: Lsn(10),
                    durable_epoch: Epoch(5),
                    ..
                },
                ..
            },
            ..
        }
    )));
}

#[test]
fn replica_refuses_another_volume_unless_blank() {
    let mut s = state(0, 0);
    s.volume_id = VolumeId([8; 16]);
    let mut r = ReplicaCore::new(s.clone());
    s.blank = false;
    let a = r.step(Event::Received {
        conn: C,
        frame: hello(1, P1),
    });
    assert_eq!(rejected(&a), Some(RejectReason::WrongVolume));
    s.blank = true;
    let mut r = ReplicaCore::new(s);
    let a = r.step(Event::Received {
        conn: C,
        frame: hello(1, P1),
    });
    assert!(a.contains(&Action::AdoptVolume { volume_id: VOL }));
}

#[test]
fn replica_frames_before_hello_are_refused() {
    let mut r = ReplicaCore::new(state(5, 10));
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11]),
    });
    assert_eq!(rejected(&a), Some(RejectReason::Protocol));
}

fn probe(epoch: u64, fence: Option<VolumeId>) -> Frame {
    Frame {
        epoch: Epoch(epoch),
        body: Body::Probe { fence },
    }
}

#[test]
fn a_fenced_member_stops_following_the_old_primary() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11]),
    });
    // A plain probe changes nothing.
    let a = r.step(Event::Received {
        conn: ConnId(2),
        frame: probe(5, None),
    });
    assert!(!a.iter().any(|x| matches!(x, Action::AdoptEpoch { .. })));
    assert_eq!(r.active(), Some(C));
    // A fencing probe at epoch 6 for P2: persisted, the old session closed, then the answer.
    let a = r.step(Event::Received {
        conn: ConnId(3),
        frame: probe(6, Some(P2)),
    });
    let adopt = a.iter().position(|x| {
        *x == Action::AdoptEpoch {
            epoch: Epoch(6),
            owner: P2,
        }
    });
    let reply = a.iter().position(|x| {
        matches!(x, Action::Send { frame: Frame { body: Body::ProbeReply { head, .. }, epoch }, .. }
            if *head == Lsn(11) && *epoch == Epoch(6))
    });
    assert!(adopt.is_some() && reply.is_some() && adopt < reply, "{a:?}");
    assert!(a.contains(&Action::Close {
        conn: C,
        reason: "fenced by a promotion at epoch 6".into()
    }));
    // The old primary's entries and hellos are refused from now on.
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[12]),
    });
    assert_eq!(rejected(&a), Some(RejectReason::StaleEpoch));
    assert_eq!(r.state().head, Lsn(11));
    let a = r.step(Event::Received {
        conn: ConnId(4),
        frame: hello(5, P1),
    });
    assert_eq!(rejected(&a), Some(RejectReason::StaleEpoch));
    // Another candidate at the same epoch is refused; the fencing candidate is welcome.
    let a = r.step(Event::Received {
        conn: ConnId(5),
        frame: probe(6, Some(P1)),
    });
    assert_eq!(rejected(&a), Some(RejectReason::EpochOwned));
    let a = greet(&mut r, ConnId(6), 6, P2);
    assert!(rejected(&a).is_none(), "{a:?}");
}

fn sent(actions: &[Action]) -> Vec<Body> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { frame, .. } => Some(frame.body.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_cut_is_asked_of_the_store_and_never_below_what_is_known_committed() {
    let mut s = state(2, 9);
    s.committed = Lsn(5);
    let mut r = ReplicaCore::new(s);
    greet(&mut r, C, 3, P2);
    let cut = |keep| Frame {
        epoch: Epoch(3),
        body: Body::Truncate { keep: Lsn(keep) },
    };
    // Below the commit point it knows: refused at once, the store is not touched.
    let a = r.step(Event::Received {
        conn: C,
        frame: cut(4),
    });
    assert!(a.iter().all(|x| !matches!(x, Action::Truncate { .. })));
    assert!(
        matches!(&sent(&a)[..], [Body::Truncated { durable: Lsn(9), refusal, .. }] if refusal.contains("committed"))
    );
    // At or after it: the store cuts, and the answer reports where the log ends now.
    let a = r.step(Event::Received {
        conn: C,
        frame: cut(6),
    });
    assert_eq!(
        a,
        vec![Action::Truncate {
            conn: C,
            keep: Lsn(6)
        }]
    );
    let a = r.step(Event::Truncated {
        conn: C,
        head: Lsn(6),
        head_epoch: Epoch(2),
        refusal: None,
    });
    assert_eq!(
        sent(&a),
        vec![Body::Truncated {
            durable: Lsn(6),
            durable_epoch: Epoch(2),
            refusal: String::new()
        }]
    );
    assert_eq!(r.state().head, Lsn(6));
    assert_eq!(r.state().durable, Lsn(6));
    // The next entry must follow the cut: 7 is accepted, a stale 10 would be a gap.
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(3, &[7]),
    });
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Append { record } if record.lsn == Lsn(7))));
}

#[test]
fn an_acknowledged_barrier_target_never_exceeds_the_local_durable_lsn() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11, 12]),
    });
    r.step(Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body: Body::Barrier {
                lsn: Lsn(12),
                committed: Lsn(10),
            },
        },
    });
    // The store got only through 11 so far: the ack says 11, not the target 12.
    let a = r.step(Event::Synced {
        conn: C,
        durable: Lsn(11),
    });
    let acks: Vec<Lsn> = sent(&a)
        .into_iter()
        .filter_map(|b| match b {
            Body::BarrierAck { durable } => Some(durable),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![Lsn(11)]);
    assert_eq!(r.state().durable, Lsn(11));
}

/// What a store would be asked to do: anything but sending and closing.
fn touches_store(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| !matches!(a, Action::Send { .. } | Action::Close { .. }))
}

fn one_entry(epoch: u64, record: WalRecord) -> Frame {
    Frame {
        epoch: Epoch(epoch),
        body: Body::Entries {
            committed: Lsn(0),
            records: vec![record],
        },
    }
}

fn write(lsn: u64, offset: u64, length: u64, payload: usize) -> WalRecord {
    WalRecord::new(
        Lsn(lsn),
        Epoch(5),
        blockrep_storage::RecordKind::Write,
        offset,
        length,
        Bytes::from(vec![7u8; payload]),
    )
}

/// Sends `frame` on an established session and checks it is refused as `BadEntry`, the
/// session ends, and nothing reaches the store.
fn assert_refused_bad(frame: Frame) {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let a = r.step(Event::Received { conn: C, frame });
    assert_eq!(rejected(&a), Some(RejectReason::BadEntry), "{a:?}");
    assert!(a.iter().any(|x| matches!(x, Action::Close { conn: C, .. })));
    assert!(!touches_store(&a), "{a:?}");
    assert_eq!(r.active(), None);
    assert_eq!(r.state().head, Lsn(10));
}

#[test]
fn a_replica_refuses_an_entry_off_the_block_grid_or_past_the_volume() {
    assert_refused_bad(one_entry(5, write(11, 512, 4096, 4096)));
    assert_refused_bad(one_entry(5, write(11, 1 << 30, 4096, 4096)));
    let mut trim = write(11, 1 << 30, 1 << 40, 0);
    trim.kind = blockrep_storage::RecordKind::Trim;
    assert_refused_bad(one_entry(5, trim));
    let mut future = write(11, 0, 4096, 4096);
    future.epoch = Epoch(6);
    assert_refused_bad(one_entry(5, future));
}

#[test]
fn a_replica_stores_only_entries_it_validated() {
    // A good entry ahead of a bad one in the same frame is not appended either.
    let frame = Frame {
        epoch: Epoch(5),
        body: Body::Entries {
            committed: Lsn(0),
            records: vec![write(11, 0, 4096, 4096), write(12, 100, 4096, 4096)],
        },
    };
    assert_refused_bad(frame);
}

#[test]
fn a_replica_stores_only_entries_it_validated_even_when_the_gap_comes_after_good_ones() {
    // Found by the replica_core fuzz target: 11 and 12 follow the head, 14 does not; the
    // whole frame is refused and nothing of it reaches the store.
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11, 12, 14]),
    });
    assert_eq!(rejected(&a), Some(RejectReason::Gap), "{a:?}");
    assert!(!touches_store(&a), "{a:?}");
    assert_eq!(r.state().head, Lsn(10));
    assert_eq!(r.state().committed, Lsn(0));
}

#[test]
fn a_replica_refuses_an_entry_at_the_last_lsn() {
    let mut r = ReplicaCore::new(state(5, u64::MAX - 1));
    greet(&mut r, C, 5, P1);
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[u64::MAX]),
    });
    assert_eq!(rejected(&a), Some(RejectReason::BadEntry), "{a:?}");
    assert!(!touches_store(&a), "{a:?}");
    assert_eq!(r.state().head, Lsn(u64::MAX - 1));
}

#[test]
fn a_replica_refuses_a_base_chunk_off_the_block_grid_or_past_the_volume() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body: Body::RebuildStart {
                base: Lsn(10),
                history: vec![(Epoch(5), Lsn(1))],
                resume: None,
            },
        },
    });
    for (offset, length, data) in [(100, 4096, None), (0, 1 << 31, None), (1 << 30, 4096, None)] {
        let a = r.step(Event::Received {
            conn: C,
            frame: Frame {
                epoch: Epoch(5),
                body: Body::BaseChunk {
                    offset,
                    length,
                    reflects: Lsn::ZERO,
                    data,
                },
            },
        });
        assert_eq!(rejected(&a), Some(RejectReason::BadEntry), "{a:?}");
        assert!(!touches_store(&a), "{a:?}");
        greet(&mut r, C, 5, P1);
    }
}

#[test]
fn a_replica_refuses_a_rebuild_base_that_cannot_be_followed() {
    assert_refused_bad(Frame {
        epoch: Epoch(5),
        body: Body::RebuildStart {
            base: Lsn::MAX,
            history: vec![],
            resume: None,
        },
    });
}

#[test]
fn an_epoch_that_cannot_be_followed_is_refused() {
    let mut r = ReplicaCore::new(state(5, 10));
    let a = r.step(Event::Received {
        conn: C,
        frame: probe(u64::MAX, Some(P2)),
    });
    assert_eq!(rejected(&a), Some(RejectReason::UnfollowableEpoch));
    assert!(!touches_store(&a), "{a:?}");
    assert_eq!(r.state().epoch, Epoch(5));
    // A hello at it, even to a blank store of another volume, adopts nothing.
    let mut blank = state(0, 0);
    blank.blank = true;
    let mut r = ReplicaCore::new(blank);
    let mut frame = hello(u64::MAX, P1);
    if let Body::Hello { volume_id, .. } = &mut frame.body {
        *volume_id = VolumeId([9; 16]);
    }
    let a = r.step(Event::Received { conn: C, frame });
    assert_eq!(rejected(&a), Some(RejectReason::UnfollowableEpoch));
    assert!(!touches_store(&a), "{a:?}");
    assert_eq!(r.state().epoch, Epoch(0));
    assert_eq!(r.active(), None);
    // The one below it is still a valid claim.
    let a = r.step(Event::Received {
        conn: C,
        frame: hello(u64::MAX - 1, P1),
    });
    assert_eq!(rejected(&a), None);
}

/// Found by the replica_core fuzz target: the core took frames while a cut it asked the
/// store for was outstanding. A `RebuildStart` in between reset the store to its base; the
/// cut's answer then named the head the store had at the cut and put the core back on it,
/// so core and store disagreed on the head from then on (the next entries failed in the
/// store with `LsnGap`). Frames are now parked until the cut is answered.
#[test]
fn a_cut_answered_after_a_rebuild_began_leaves_the_core_on_the_rebuilt_head() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let on_session = |body| Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body,
        },
    };
    let a = r.step(on_session(Body::Truncate { keep: Lsn(7) }));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Truncate { keep: Lsn(7), .. })));
    r.step(on_session(Body::RebuildStart {
        base: Lsn(9),
        history: vec![(Epoch(5), Lsn(1))],
        resume: None,
    }));
    // The store cut its log after 7, then reset it to the base at 9.
    r.step(Event::Truncated {
        conn: C,
        head: Lsn(7),
        head_epoch: Epoch(5),
        refusal: None,
    });
    assert_eq!(r.state().head, Lsn(9));
}

fn on(conn: ConnId, body: Body) -> Event {
    Event::Received {
        conn,
        frame: Frame {
            epoch: Epoch(5),
            body,
        },
    }
}

#[test]
fn entries_sent_during_a_cut_are_checked_against_the_cut_log() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(on(C, Body::Truncate { keep: Lsn(7) }));
    // Entry 11 follows the head before the cut, not the log the store is cutting to.
    let a = r.step(entries_event(C, &[11]));
    assert!(a.is_empty(), "a frame during a cut is held: {a:?}");
    let a = r.step(Event::Truncated {
        conn: C,
        head: Lsn(7),
        head_epoch: Epoch(5),
        refusal: None,
    });
    assert_eq!(rejected(&a), Some(RejectReason::Gap), "{a:?}");
    assert!(!a.iter().any(|x| matches!(x, Action::Append { .. })));
    assert_eq!(r.state().head, Lsn(7));
    // The answer to the cut went out before the refusal of what followed it.
    let first = a.iter().find_map(|x| match x {
        Action::Send { frame, .. } => Some(&frame.body),
        _ => None,
    });
    assert!(
        matches!(
            first,
            Some(Body::Truncated {
                durable: Lsn(7),
                ..
            })
        ),
        "{a:?}"
    );
}

fn entries_event(conn: ConnId, lsns: &[u64]) -> Event {
    Event::Received {
        conn,
        frame: entries(5, lsns),
    }
}

#[test]
fn a_hello_during_a_cut_is_answered_with_the_cut_head() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(on(C, Body::Truncate { keep: Lsn(7) }));
    let other = ConnId(2);
    assert!(r
        .step(Event::Received {
            conn: other,
            frame: hello(6, P2)
        })
        .is_empty());
    // A probe changes no log: answered at once.
    let a = r.step(Event::Received {
        conn: other,
        frame: probe(6, None),
    });
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Send {
                frame: Frame {
                    body: Body::ProbeReply { .. },
                    ..
                },
                ..
            }
        )),
        "{a:?}"
    );
    let a = r.step(Event::Truncated {
        conn: C,
        head: Lsn(7),
        head_epoch: Epoch(5),
        refusal: None,
    });
    assert!(
        a.contains(&Action::Sync {
            conn: other,
            lsn: Lsn(7)
        }),
        "{a:?}"
    );
    assert_eq!(r.active(), Some(other));
    let a = r.step(Event::Synced {
        conn: other,
        durable: Lsn(7),
    });
    let reported = a.iter().find_map(|x| match x {
        Action::Send {
            frame:
                Frame {
                    body: Body::HelloOk { durable, .. },
                    ..
                },
            ..
        } => Some(*durable),
        _ => None,
    });
    assert_eq!(reported, Some(Lsn(7)));
}

#[test]
fn a_peer_that_does_not_wait_for_its_cut_is_refused() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    r.step(on(C, Body::Truncate { keep: Lsn(7) }));
    let barrier = || {
        on(
            C,
            Body::Barrier {
                lsn: Lsn(7),
                committed: Lsn(0),
            },
        )
    };
    for _ in 0..MAX_PARKED {
        assert!(r.step(barrier()).is_empty());
    }
    let a = r.step(barrier());
    assert_eq!(rejected(&a), Some(RejectReason::Protocol));
    assert_eq!(r.active(), None);
    // Its cut still completes; nothing it parked is handled.
    let a = r.step(Event::Truncated {
        conn: C,
        head: Lsn(7),
        head_epoch: Epoch(5),
        refusal: None,
    });
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(r.state().head, Lsn(7));
}

#[test]
fn a_replica_reports_its_cursor_and_resumes_only_the_base_it_names() {
    let cursor = blockrep_storage::RebuildCursor {
        base: Lsn(4),
        history: vec![(Epoch(5), Lsn(1))],
        through: 1 << 20,
        proof: Lsn(6),
        proof_epoch: Epoch(5),
    };
    let mut s = state(5, 4);
    s.rebuilding = true;
    s.cursor = Some(cursor.clone());
    let mut r = ReplicaCore::new(s);
    let a = greet(&mut r, C, 5, P1);
    let reported = a.iter().find_map(|x| match x {
        Action::Send {
            frame:
                Frame {
                    body: Body::HelloOk { cursor, .. },
                    ..
                },
            ..
        } => Some(cursor.clone()),
        _ => None,
    });
    assert_eq!(reported, Some(Some(cursor.clone())));
    let start = |resume: Option<u64>, base: u64| Frame {
        epoch: Epoch(5),
        body: Body::RebuildStart {
            base: Lsn(base),
            history: vec![(Epoch(5), Lsn(1))],
            resume,
        },
    };
    // Another base, or another offset, is nothing this store holds.
    for frame in [start(Some(1 << 20), 3), start(Some(2 << 20), 4)] {
        let mut r = ReplicaCore::new(r.state().clone());
        greet(&mut r, C, 5, P1);
        let a = r.step(Event::Received { conn: C, frame });
        assert_eq!(rejected(&a), Some(RejectReason::Protocol));
        assert!(!touches_store(&a), "{a:?}");
    }
    let a = r.step(Event::Received {
        conn: C,
        frame: start(Some(1 << 20), 4),
    });
    assert!(a.contains(&Action::BeginRebuild {
        base: Lsn(4),
        history: vec![(Epoch(5), Lsn(1))],
        resume: Some(1 << 20),
    }));
    // A fresh start forgets the cursor: the next hello reports none.
    let a = r.step(Event::Received {
        conn: C,
        frame: start(None, 4),
    });
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::BeginRebuild { resume: None, .. })));
    assert_eq!(r.state().cursor, None);
}

/// A barrier's fsync that finishes while a cut runs must not report entries the cut takes
/// away: the ack waits for the cut's answer and says only what is left (found by the
/// `replica_core` fuzz target once cuts were answered late).
#[test]
fn a_sync_that_finishes_during_a_cut_acknowledges_only_what_the_cut_left() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let on_session = |body| Event::Received {
        conn: C,
        frame: Frame {
            epoch: Epoch(5),
            body,
        },
    };
    r.step(on_session(Body::Barrier {
        lsn: Lsn(10),
        committed: Lsn(0),
    }));
    r.step(on_session(Body::Truncate { keep: Lsn(7) }));
    let acks = |a: &[Action]| -> Vec<Lsn> {
        a.iter()
            .filter_map(|x| match x {
                Action::Send {
                    frame:
                        Frame {
                            body: Body::BarrierAck { durable },
                            ..
                        },
                    ..
                } => Some(*durable),
                _ => None,
            })
            .collect()
    };
    let a = r.step(Event::Synced {
        conn: C,
        durable: Lsn(10),
    });
    assert!(acks(&a).is_empty(), "acknowledged during the cut: {a:?}");
    let a = r.step(Event::Truncated {
        conn: C,
        head: Lsn(7),
        head_epoch: Epoch(5),
        refusal: None,
    });
    assert_eq!(acks(&a), vec![Lsn(7)], "{a:?}");
}

/// Found in issue 15's review: a blank store adopted the hello's volume before its epoch
/// claim was checked, so a hello refused for its epoch still made the store part of that
/// volume (and no longer blank to the real primary of another).
#[test]
fn a_refused_hello_leaves_the_store_as_it_was() {
    let theirs = VolumeId([8; 16]);
    // A blank store a candidate fenced at epoch 5 for P1 (blank stores answer probes too).
    let mut blank = state(5, 0);
    blank.blank = true;
    blank.volume_id = theirs;
    for (epoch, primary, reason) in [
        (4, P1, RejectReason::StaleEpoch),
        (5, P2, RejectReason::EpochOwned),
        (u64::MAX, P1, RejectReason::UnfollowableEpoch),
    ] {
        let mut r = ReplicaCore::new(blank.clone());
        let a = r.step(Event::Received {
            conn: C,
            frame: hello(epoch, primary),
        });
        assert_eq!(rejected(&a), Some(reason), "{a:?}");
        assert!(!touches_store(&a), "{a:?}");
        let s = r.state();
        assert_eq!((s.volume_id, s.blank), (theirs, true));
        assert_eq!((s.epoch, s.epoch_owner), (Epoch(5), P1));
        assert_eq!(r.active(), None);
        // The primary that owns the epoch still joins it.
        let a = greet(&mut r, ConnId(2), 5, P1);
        assert_eq!(rejected(&a), None, "{a:?}");
        assert!(a.contains(&Action::AdoptVolume { volume_id: VOL }));
        assert_eq!(r.state().volume_id, VOL);
    }
}

fn appended(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Append { record } => Some(record.lsn.0),
            _ => None,
        })
        .collect()
}

#[test]
fn a_refused_append_leaves_the_core_on_the_stores_head() {
    let mut r = ReplicaCore::new(state(5, 10));
    greet(&mut r, C, 5, P1);
    let a = r.step(Event::Received {
        conn: C,
        frame: entries(5, &[11, 12, 13]),
    });
    assert_eq!(appended(&a), [11, 12, 13]);
    // The store took 11 and refused 12 for lack of space (and so never saw 13).
    let a = r.step(Event::StoreRefused {
        head: Lsn(11),
        head_epoch: Epoch(5),
        no_space: true,
        message: "no space left".into(),
    });
    assert_eq!(rejected(&a), Some(RejectReason::NoSpace), "{a:?}");
    assert!(a.iter().any(|x| matches!(x, Action::Close { conn: C, .. })));
    assert!(!touches_store(&a), "{a:?}");
    assert_eq!(r.active(), None);
    assert_eq!(r.state().head, Lsn(11));
    // The next session hears of the store's head and is sent 12 and 13 again: they are
    // appended, not skipped as duplicates.
    let a = greet(&mut r, ConnId(2), 5, P1);
    let reported = a.iter().find_map(|x| match x {
        Action::Send {
            frame:
                Frame {
                    body: Body::HelloOk { durable, .. },
                    ..
                },
            ..
        } => Some(*durable),
        _ => None,
    });
    assert_eq!(reported, Some(Lsn(11)), "{a:?}");
    let a = r.step(Event::Received {
        conn: ConnId(2),
        frame: entries(5, &[12, 13]),
    });
    assert_eq!(appended(&a), [12, 13]);
    // Any other store failure is told as one.
    let a = r.step(Event::StoreRefused {
        head: Lsn(12),
        head_epoch: Epoch(5),
        no_space: false,
        message: "I/O error".into(),
    });
    assert_eq!(rejected(&a), Some(RejectReason::StorageFailed), "{a:?}");
    assert_eq!(r.state().head, Lsn(12));
}
