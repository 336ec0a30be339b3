//! Sessions with replicas: dialling, timing out and dropping them, and the two ways a
//! replica that is behind is brought back on one (a catch-up from retained WAL, a rebuild
//! from our base image).

use blockrep_storage::{Epoch, Lsn, WalRecord};

use super::RebuildRestart;
use super::{Action, BarrierFailure, Body, CommitMode, Millis, PeerState, PrimaryCore};
use super::{ReplicaId, SessionId};
use crate::mutants::{active, Mutant};

impl PrimaryCore {
    pub(super) fn set_state(&mut self, i: usize, state: PeerState, now: Millis, why: &str) {
        let p = &mut self.peers[i];
        if p.enter(state, now, why) {
            self.out.push(Action::StateChanged {
                replica: p.id().clone(),
                state,
                why: why.to_string(),
                out_of_space: p.out_of_space(),
            });
            // What the WAL must keep depends on the state: the pin follows every change.
            self.update_pin();
        }
    }

    /// The replica holds our log through our head (or will, as live entries reach it): it
    /// counts from now on, and is asked at once for the barriers still pending.
    pub(super) fn become_in_sync(&mut self, i: usize, now: Millis, why: &str) {
        self.set_state(i, PeerState::InSync, now, why);
        self.resend_barriers(i, now);
    }

    pub(super) fn tick(&mut self, now: Millis, pinned_bytes: u64) {
        if self.fenced.is_some() {
            return;
        }
        self.expire_barriers(now);
        for i in 0..self.peers.len() {
            self.tick_peer(i, now);
        }
        self.enforce_retention(now, pinned_bytes);
    }

    /// FLUSHes that ran out of time fail; the mode never downgrades to let them pass.
    fn expire_barriers(&mut self, now: Millis) {
        while self.barriers.front().is_some_and(|b| b.deadline <= now) {
            let Some(b) = self.barriers.pop_front() else {
                break;
            };
            let full = |p: &super::peer::Peer| p.out_of_space() && p.durable() < b.target;
            // A full replica among the missing copies is the cause an operator can act on.
            let reason = match self.cfg.mode {
                _ if self.peers.iter().any(full) => BarrierFailure::ReplicaNoSpace,
                CommitMode::SyncQuorum => BarrierFailure::QuorumLost,
                _ => BarrierFailure::ReplicaMissing,
            };
            self.counters.barriers_failed += 1;
            self.out.push(Action::BarrierFailed { id: b.id, reason });
        }
    }

    /// What time alone does to one replica: timeouts, redials and progress asks.
    fn tick_peer(&mut self, i: usize, now: Millis) {
        let p = &self.peers[i];
        match p.state() {
            // A replica that does not answer a barrier in time is degraded, in every mode:
            // it stops counting and recovers through a fresh handshake.
            PeerState::InSync | PeerState::CatchingUp | PeerState::Rebuilding
                if p.oldest_unanswered()
                    .is_some_and(|t| now >= t + self.cfg.barrier_timeout) =>
            {
                self.drop_session(i, now, "no barrier acknowledgement in time");
            }
            PeerState::Connecting | PeerState::Handshake
                if now >= p.since() + self.cfg.handshake_timeout =>
            {
                self.drop_session(i, now, "handshake timed out");
            }
            // A replica that needs a rebuild is dialled like any other: the rebuild
            // starts on the next session that reaches a handshake.
            PeerState::Disconnected | PeerState::Refused | PeerState::NeedsRebuild
                if p.session().is_none() && now >= p.reconnect_at() =>
            {
                self.connect(i, now);
            }
            // Before the progress ask, which skips a replica that already holds the head.
            PeerState::InSync
                if self.cfg.confirm_interval > 0
                    && !p.awaits_answer()
                    && p.oldest_unanswered().is_none()
                    && now >= p.last_ask() + self.cfg.confirm_interval =>
            {
                self.confirm(i, now)
            }
            PeerState::InSync | PeerState::Rebuilding
                if self.head > p.asked()
                    && now >= p.last_ask() + self.cfg.progress_interval
                    && (p.state() == PeerState::InSync || p.rebuild_live()) =>
            {
                let head = self.head;
                self.ask(i, head, now);
            }
            _ => {}
        }
    }

    fn connect(&mut self, i: usize, now: Millis) {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.counters.sessions += 1;
        let p = &mut self.peers[i];
        p.begin_session(session);
        let id = p.id().clone();
        self.set_state(i, PeerState::Connecting, now, "connecting");
        self.out.push(Action::Connect {
            replica: id,
            session,
        });
    }

    pub(super) fn connected(&mut self, replica: &ReplicaId, session: SessionId, now: Millis) {
        let Some(i) = self.current(replica, session) else {
            return;
        };
        if self.peers[i].state() != PeerState::Connecting {
            return;
        }
        self.set_state(i, PeerState::Handshake, now, "transport up");
        self.send(
            i,
            Body::Hello {
                volume_id: self.cfg.volume_id,
                volume_size: self.cfg.volume_size,
                primary_store: self.cfg.store_id,
                head: self.head,
                committed: self.committed,
            },
        );
    }

    /// Ends the current session (the transport is gone or must go) and schedules a retry.
    pub(super) fn drop_session(&mut self, i: usize, now: Millis, reason: &str) {
        let p = &mut self.peers[i];
        let Some(session) = p.end_session(now, self.cfg.reconnect_max) else {
            return;
        };
        self.out.push(Action::Close {
            replica: p.id().clone(),
            session,
            reason: reason.to_string(),
        });
        match p.state() {
            PeerState::NeedsRebuild | PeerState::Refused => {}
            // An interrupted rebuild leaves nothing usable: the replica still needs one.
            _ if p.released() => self.set_state(i, PeerState::NeedsRebuild, now, reason),
            _ => self.set_state(i, PeerState::Disconnected, now, reason),
        }
        self.update_pin();
        self.evaluate();
    }

    /// The replica can only come back by a rebuild. If its session is up (it has answered a
    /// hello) the rebuild starts at once on that session; otherwise it starts at the next
    /// handshake.
    pub(super) fn needs_rebuild(&mut self, i: usize, now: Millis, why: &str) {
        self.counters.rebuilds_needed += 1;
        let talking = self.peers[i].state().talking();
        self.peers[i].release_to_rebuild();
        self.set_state(i, PeerState::NeedsRebuild, now, why);
        let p = &self.peers[i];
        if talking && self.cfg.auto_rebuild && p.session().is_some() && !p.rebuilt_this_session() {
            self.begin_rebuild(i, now);
        } else {
            // Its state is NeedsRebuild already, which dropping the session keeps.
            self.drop_session(i, now, why);
        }
        self.update_pin();
        self.evaluate();
    }

    fn begin_rebuild(&mut self, i: usize, now: Millis) {
        let Some(session) = self.peers[i].session() else {
            return;
        };
        let resume = self.peers[i].begin_rebuild(now);
        self.counters.rebuilds_started += 1;
        self.set_state(
            i,
            PeerState::Rebuilding,
            now,
            "rebuilding from our base image",
        );
        self.out.push(Action::BeginRebuild {
            replica: self.peers[i].id().clone(),
            session,
            resume,
        });
    }

    /// The base is chosen (and the WAL after it pinned): reset the replica to it, start the
    /// base image, and stream the WAL after the base as for a catch-up. A resumed base keeps
    /// what the replica's cursor holds and the image continues from there; the WAL line
    /// starts after the base all the same, so every block written since is written again.
    pub(super) fn rebuild_base(
        &mut self,
        i: usize,
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        resumed: Result<(), Option<RebuildRestart>>,
    ) {
        if self.peers[i].state() != PeerState::Rebuilding {
            return;
        }
        let asked = self.peers[i].rebuild().and_then(|r| r.resumed_from);
        let cursor = self.peers[i].take_resume();
        // The mutant takes the replica's word for the base's history too.
        let history = match cursor {
            Some(c) if resumed.is_ok() && active(Mutant::TrustCursorWithoutLineage) => c.history,
            _ => history,
        };
        let resume = match (asked, resumed) {
            (Some(at), Ok(())) => {
                self.peers[i].resumed();
                self.counters.rebuilds_resumed += 1;
                tracing::info!(
                    replica = %self.peers[i].id(),
                    "resuming the rebuild from byte {at} of the base at {base}"
                );
                Some(at)
            }
            (Some(_), Err(why)) => {
                self.restarted(i, why.unwrap_or(RebuildRestart::WalRecycled));
                None
            }
            (None, _) => None,
        };
        let p = &mut self.peers[i];
        p.rebuild_from(base);
        let Some(session) = p.session() else { return };
        let replica = p.id().clone();
        self.send(
            i,
            Body::RebuildStart {
                base,
                history,
                resume,
            },
        );
        self.out.push(Action::StreamBase {
            replica,
            session,
            base,
            from: resume.unwrap_or(0),
            rate: self.cfg.rebuild_rate,
        });
        self.update_pin();
        self.request_wal(i, base.next());
    }

    /// Both lines are done (the base image is queued, the WAL reaches our head): ask the
    /// replica to finish, durable through our head.
    pub(super) fn maybe_finish_rebuild(&mut self, i: usize) {
        let head = self.head;
        if self.peers[i].finish_rebuild(head) {
            self.send(i, Body::RebuildFinish { target: head });
        }
    }

    /// The replica's log is a prefix of ours ending at its durable LSN, behind our head:
    /// stream the retained WAL after it.
    pub(super) fn begin_catch_up(&mut self, i: usize, now: Millis) {
        let p = &mut self.peers[i];
        p.begin_catch_up();
        self.counters.catch_ups += 1;
        let from = p.catch_up_next();
        self.set_state(
            i,
            PeerState::CatchingUp,
            now,
            &format!("catching up from {from} to {}", self.head),
        );
        self.update_pin();
        self.request_wal(i, from);
    }

    fn request_wal(&mut self, i: usize, from: Lsn) {
        let p = &self.peers[i];
        if let Some(session) = p.session() {
            self.out.push(Action::ReadWal {
                replica: p.id().clone(),
                session,
                from,
                max_bytes: self.cfg.catch_up_batch_bytes,
            });
        }
    }

    pub(super) fn wal_read(&mut self, i: usize, mut records: Vec<WalRecord>, now: Millis) {
        let rebuilding = self.peers[i].state() == PeerState::Rebuilding;
        if self.peers[i].state() != PeerState::CatchingUp && !rebuilding {
            return;
        }
        let next = self.peers[i].catch_up_next();
        // Entries the core has not seen appended yet will come through live shipping.
        records.retain(|r| r.lsn >= next && r.lsn <= self.head);
        let contiguous = records.windows(2).all(|w| w[1].lsn == w[0].lsn.next());
        if records.first().is_some_and(|r| r.lsn != next) || !contiguous {
            self.needs_rebuild(i, now, "retained WAL has a hole");
            return;
        }
        if let Some(last) = records.last() {
            self.peers[i].shipped_through(last.lsn, self.head);
            self.send(
                i,
                Body::Entries {
                    committed: self.committed,
                    records,
                },
            );
        }
        let next = self.peers[i].catch_up_next();
        if next <= self.head {
            self.request_wal(i, next);
        } else if rebuilding {
            // The WAL line reaches our head: live entries flow from here on.
            self.peers[i].rebuild_goes_live();
            self.maybe_finish_rebuild(i);
        } else {
            // Invariant (*a caught-up replica continues from our head with no gap*): the
            // catch-up shipped through our head and no further, so live shipping, which
            // sends what is appended after the head, misses and repeats nothing.
            assert_eq!(
                next,
                self.head.next(),
                "a caught-up replica continues from our head with no gap"
            );
            self.become_in_sync(i, now, "caught up");
            self.update_pin();
        }
    }
}
