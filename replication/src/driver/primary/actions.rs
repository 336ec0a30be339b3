//! Carrying out the core's actions: each one is a method here, so the dispatch stays a
//! table and every side effect has one place.

use std::sync::atomic::Ordering;

use blockrep_storage::{Epoch, Lsn, ResumeRefusal, StorageError};

use super::base::BaseStream;
use super::{Driver, Input};
use crate::core::primary::{Action, BarrierFailure, Event, PeerState, RebuildRestart};
use crate::core::{ReplicaId, SessionId};
use crate::driver::millis;
use crate::wire::Frame;

impl Driver {
    pub(super) fn execute(&mut self, action: Action) {
        match action {
            Action::Connect { replica, session } => self.connect(replica, session),
            Action::Send {
                replica,
                session,
                frame,
            } => self.send(replica, session, frame),
            Action::Close {
                replica,
                session,
                reason,
            } => self.close(replica, session, &reason),
            Action::ReadWal {
                replica,
                session,
                from,
                max_bytes,
            } => self.read_wal(replica, session, from, max_bytes),
            Action::BeginRebuild {
                replica,
                session,
                resume,
            } => self.begin_rebuild(replica, session, resume),
            Action::StreamBase {
                replica,
                session,
                base,
                from,
                rate,
            } => self.stream_base(replica, session, base, (from, rate)),
            Action::PinWal { from } => {
                self.pin = from;
                self.store.set_retention_pin(from);
            }
            Action::BarrierDone { id } => self.answer_barrier(id, Ok(())),
            Action::BarrierFailed { id, reason } => self.answer_barrier(id, Err(reason)),
            Action::Committed { lsn } => self.store.set_committed(lsn),
            Action::Fenced { epoch, reason } => self.fence(epoch, &reason),
            Action::StateChanged {
                replica,
                state,
                why,
                out_of_space,
            } => self.log_state(replica, state, &why, out_of_space),
        }
    }

    /// Queues `frame` for the session, unless its queue is full: then the session ends.
    fn send(&mut self, replica: ReplicaId, session: SessionId, frame: Frame) {
        let Some(c) = self.conns.get(&replica).filter(|c| c.session == session) else {
            return;
        };
        let size = frame.queued_size();
        if c.queued.load(Ordering::Relaxed) + size > self.max_queued {
            let _ = self.in_tx.send(Input::Event(Event::Disconnected {
                replica,
                session,
                now: millis(self.start),
                reason: "replica cannot keep up (send queue full)".into(),
            }));
            return;
        }
        c.queued.fetch_add(size, Ordering::Relaxed);
        let _ = c.tx.send(frame);
    }

    fn close(&mut self, replica: ReplicaId, session: SessionId, reason: &str) {
        if self
            .conns
            .get(&replica)
            .is_some_and(|c| c.session == session)
        {
            self.end_conn(&replica);
            tracing::debug!(%replica, %session, "replication session closed: {reason}");
        }
    }

    /// Reads retained WAL for a catching-up replica, off the event loop.
    fn read_wal(&self, replica: ReplicaId, session: SessionId, from: Lsn, max_bytes: u64) {
        let store = self.store.clone();
        let tx = self.in_tx.clone();
        let start = self.start;
        tokio::spawn(async move {
            let event = match store.read_wal(from, max_bytes).await {
                Ok(records) => Event::WalRead {
                    replica,
                    session,
                    from,
                    records,
                    now: millis(start),
                },
                Err(StorageError::WalRecycled { .. }) => Event::WalGone {
                    replica,
                    session,
                    from,
                    now: millis(start),
                },
                Err(e) => Event::Disconnected {
                    replica,
                    session,
                    now: millis(start),
                    reason: format!("cannot read the WAL: {e}"),
                },
            };
            let _ = tx.send(Input::Event(event));
        });
    }

    /// Picks the base: the one asked to resume if the WAL after it is still there (pinned
    /// again in the same step), otherwise our checkpoint.
    fn begin_rebuild(&self, replica: ReplicaId, session: SessionId, resume: Option<Lsn>) {
        let store = self.store.clone();
        let tx = self.in_tx.clone();
        tokio::spawn(async move {
            let chosen = tokio::task::spawn_blocking(move || {
                let refused = match resume.map(|b| (b, store.resume_base(b))) {
                    Some((base, Ok(history))) => return (base, history, true, None),
                    Some((_, Err(ResumeRefusal::WalRecycled))) => Some(RebuildRestart::WalRecycled),
                    Some((_, Err(ResumeRefusal::OlderImage))) => Some(RebuildRestart::OlderImage),
                    None => None,
                };
                let (base, history) = store.rebuild_base();
                (base, history, false, refused)
            })
            .await;
            if let Ok((base, history, resumed, refused)) = chosen {
                let _ = tx.send(Input::Event(Event::RebuildBase {
                    replica,
                    session,
                    base,
                    history,
                    resumed,
                    refused,
                }));
            }
        });
    }

    fn stream_base(
        &self,
        replica: ReplicaId,
        session: SessionId,
        base: Lsn,
        (from, rate): (u64, u64),
    ) {
        let Some(c) = self.conns.get(&replica).filter(|c| c.session == session) else {
            return;
        };
        tracing::info!(%replica, "streaming the base image (checkpoint {base}) from byte {from}");
        let stream = BaseStream {
            store: self.store.clone(),
            tx: c.tx.clone(),
            queued: c.queued.clone(),
            events: self.in_tx.clone(),
            replica,
            session,
            rate,
            from,
            clock: self.start,
        };
        tokio::spawn(stream.run());
    }

    fn answer_barrier(&mut self, id: u64, result: Result<(), BarrierFailure>) {
        if let Some(done) = self.barriers.remove(&id) {
            let _ = done.send(result);
        }
    }

    fn fence(&self, epoch: Epoch, reason: &str) {
        self.fenced.store(epoch.0, Ordering::Release);
        tracing::error!(
            "fenced: a primary at epoch {epoch} exists ({reason}); this node refuses \
             every write and flush from now on"
        );
    }

    fn log_state(&mut self, replica: ReplicaId, state: PeerState, why: &str, out_of_space: bool) {
        // Retries cycle through connecting and disconnected; say each reason once.
        let line = format!("{}: {why}", state.name());
        if self.last_logged.get(&replica) == Some(&line) {
            return;
        }
        // A full replica cycles through catching up, in sync and disconnected at every
        // retry until space is freed: the first refusal is said, with what follows, and the
        // cycle is quiet until it stores entries again (the core says that once).
        let quiet = out_of_space && self.full_said.contains(&replica);
        let says_full = out_of_space && !quiet && state == PeerState::Disconnected;
        if !out_of_space {
            self.full_said.remove(&replica);
        }
        let name = state.name();
        match state {
            _ if says_full => tracing::warn!(
                %replica,
                state = name,
                "{why}; its filesystem is full: retrying, quietly, until it stores entries again"
            ),
            _ if quiet => tracing::debug!(%replica, state = name, "{why}"),
            PeerState::Connecting | PeerState::Handshake => {
                tracing::debug!(%replica, state = name, "{why}")
            }
            PeerState::NeedsRebuild | PeerState::Refused => {
                tracing::warn!(%replica, state = name, "{why}")
            }
            _ => tracing::info!(%replica, state = name, "{why}"),
        }
        if says_full {
            self.full_said.insert(replica.clone());
        }
        if quiet || !matches!(state, PeerState::Connecting | PeerState::Handshake) {
            self.last_logged.insert(replica, line);
        }
    }
}
