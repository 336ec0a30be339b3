//! The primary's side of replication, one `Peer` per configured replica.
//!
//! ```text
//!  Disconnected ──Connect──► Connecting ──transport up / Hello──► Handshake
//!       ▲                                                          │ HelloOk(durable R)
//!       │ session lost, barrier timeout,                           ├─ R == head ─────────► InSync
//!       │ handshake timeout                                        ├─ R <  head, retained ► CatchingUp ─► InSync
//!       └──────────────────────────────────────────────────────────┤   (retained WAL is streamed to a frozen
//!                                                                   │    target, then live shipping takes over)
//!                                                                   └─ otherwise ──────────► NeedsRebuild
//! ```
//! With `auto_rebuild`, a replica that needs a rebuild gets one at once if its session has
//! passed the hello, otherwise on its next handshake (Rebuilding, then InSync once its
//! completion is accepted). Only InSync peers, and a rebuild whose WAL line has reached our
//! head, receive live entries; only InSync peers count toward the commit mode. Every input
//! that names a session is checked against the peer's current session; anything else is
//! stale and ignored. A `Reject` from a higher epoch fences this primary for good; any other
//! frame at an epoch other than ours is a protocol error that only ends that replica's
//! session.
//!
//! Rooms: `peer` holds one replica's state and its transitions; `sessions` dials, times out
//! and drops sessions and runs catch-ups and rebuilds; `frames` handles each frame kind a
//! replica sends; `durability` ships entries, asks for barriers, computes the commit and pins
//! the WAL. This file holds the types and the dispatch of events.

mod durability;
mod frames;
mod membership;
mod peer;
mod sessions;

use std::collections::VecDeque;

use blockrep_storage::{Epoch, Lsn, VolumeId, WalRecord};

use self::peer::Peer;
pub use self::peer::{PeerState, RebuildProgress, RebuildReport, RebuildRestart};
use super::{CommitMode, Millis, ReplicaId, SessionId};
use crate::wire::{Body, Frame};

/// Static settings of a primary.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub volume_id: VolumeId,
    pub volume_size: u64,
    pub store_id: VolumeId,
    pub epoch: Epoch,
    pub mode: CommitMode,
    pub replicas: Vec<ReplicaId>,
    /// A FLUSH that cannot meet the mode by then fails (EIO at the NBD boundary).
    pub barrier_timeout: Millis,
    /// A replica that does not finish the handshake by then is disconnected.
    pub handshake_timeout: Millis,
    /// Reconnect delays grow from `reconnect_min` to `reconnect_max`.
    pub reconnect_min: Millis,
    pub reconnect_max: Millis,
    /// WAL kept for lagging replicas is bounded: past either budget the replica needs a
    /// rebuild and stops holding the WAL.
    pub retention_bytes: u64,
    pub retention_time: Millis,
    /// Entries shipped per catch-up read.
    pub catch_up_batch_bytes: u64,
    /// In-sync replicas are asked for their durable progress this often when the head has
    /// moved, even without FLUSHes: it keeps the retention pin and the lag figures current,
    /// and a replica that stops answering is found out.
    pub progress_interval: Millis,
    /// An in-sync replica asked nothing for this long is asked again for what it already
    /// holds, so that [`PrimaryCore::confirmed_at`] stays fresh on an idle volume (a
    /// `--failsafe` leader acknowledges only on recent answers). 0: never.
    pub confirm_interval: Millis,
    /// Rebuild a replica that needs it as soon as it is connected (otherwise it waits).
    pub auto_rebuild: bool,
    /// Base image bytes per second during a rebuild (0: as fast as the link goes).
    pub rebuild_rate: u64,
}

impl PrimaryConfig {
    pub fn new(
        volume_id: VolumeId,
        volume_size: u64,
        store_id: VolumeId,
        epoch: Epoch,
        mode: CommitMode,
        replicas: Vec<ReplicaId>,
    ) -> PrimaryConfig {
        PrimaryConfig {
            volume_id,
            volume_size,
            store_id,
            epoch,
            mode,
            replicas,
            barrier_timeout: 5_000,
            handshake_timeout: 5_000,
            reconnect_min: 100,
            reconnect_max: 2_000,
            retention_bytes: 128 << 20,
            retention_time: 5 * 60_000,
            catch_up_batch_bytes: 4 << 20,
            progress_interval: 100,
            confirm_interval: 0,
            auto_rebuild: true,
            rebuild_rate: 0,
        }
    }
}

/// Why a barrier (FLUSH) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierFailure {
    /// sync-all: some replica was not durable through the target in time.
    ReplicaMissing,
    /// sync-quorum: no majority was durable through the target in time.
    QuorumLost,
    /// A newer primary exists; this one accepts nothing any more.
    Fenced,
    /// A replica that was not durable through the target in time had refused entries
    /// because its filesystem is full (the client is told ENOSPC), under sync-all or
    /// sync-quorum (where it was one of the copies the quorum lacked).
    ReplicaNoSpace,
}

impl BarrierFailure {
    /// Every kind, for the metrics that must exist at zero before the first failure.
    pub const ALL: [BarrierFailure; 4] = [
        BarrierFailure::ReplicaMissing,
        BarrierFailure::QuorumLost,
        BarrierFailure::Fenced,
        BarrierFailure::ReplicaNoSpace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BarrierFailure::ReplicaMissing => "replica_missing",
            BarrierFailure::QuorumLost => "quorum_lost",
            BarrierFailure::Fenced => "fenced",
            BarrierFailure::ReplicaNoSpace => "replica_no_space",
        }
    }
}

/// Everything that can happen to a primary.
#[derive(Debug)]
pub enum Event {
    /// Time passed; `pinned_bytes` is how much WAL lies between the current pin (the last
    /// `PinWal`) and the head: what lagging replicas are holding.
    Tick { now: Millis, pinned_bytes: u64 },
    /// The store appended these entries (in LSN order, none skipped).
    Appended { records: Vec<WalRecord> },
    /// The primary's own WAL is durable through `lsn`.
    LocalDurable { lsn: Lsn },
    /// A FLUSH wants the mode's durability through `target`.
    Barrier { id: u64, target: Lsn, now: Millis },
    /// The transport for `session` is up.
    Connected {
        replica: ReplicaId,
        session: SessionId,
        now: Millis,
    },
    /// The transport for `session` could not be set up, or went down.
    Disconnected {
        replica: ReplicaId,
        session: SessionId,
        now: Millis,
        reason: String,
    },
    Received {
        replica: ReplicaId,
        session: SessionId,
        frame: Frame,
        now: Millis,
    },
    /// Retained entries read for a catch-up (`ReadWal`).
    WalRead {
        replica: ReplicaId,
        session: SessionId,
        from: Lsn,
        records: Vec<WalRecord>,
        now: Millis,
    },
    /// The entries a catch-up needs are no longer retained.
    WalGone {
        replica: ReplicaId,
        session: SessionId,
        from: Lsn,
        now: Millis,
    },
    /// The base chosen for a rebuild (`BeginRebuild`): our checkpoint and the epoch history
    /// through it; the WAL after it is pinned.
    /// `resumed`: this is the base the `BeginRebuild` asked to resume, pinned again. A
    /// fresh base otherwise, and with `refused` why a resume asked for could not be done.
    RebuildBase {
        replica: ReplicaId,
        session: SessionId,
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        resumed: bool,
        refused: Option<RebuildRestart>,
    },
    /// The base image streamed through offset `done` of `total`; `sent` bytes of data went
    /// out in this stream so far.
    BaseProgress {
        replica: ReplicaId,
        session: SessionId,
        done: u64,
        total: u64,
        sent: u64,
    },
    /// The whole base image is queued for the replica.
    BaseSent {
        replica: ReplicaId,
        session: SessionId,
    },
    /// The volume's replicas are these from now on: members join and leave in place;
    /// `kept_from` is the oldest entry the WAL still holds.
    SetReplicas {
        replicas: Vec<ReplicaId>,
        kept_from: Lsn,
        now: Millis,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a transport to the replica's current address for `session`.
    Connect {
        replica: ReplicaId,
        session: SessionId,
    },
    Send {
        replica: ReplicaId,
        session: SessionId,
        frame: Frame,
    },
    /// Tear the session's transport down.
    Close {
        replica: ReplicaId,
        session: SessionId,
        reason: String,
    },
    /// Read retained WAL entries `from..` for a catch-up; answer with `WalRead` or `WalGone`.
    ReadWal {
        replica: ReplicaId,
        session: SessionId,
        from: Lsn,
        max_bytes: u64,
    },
    /// Keep the WAL from this LSN on (`None`: keep nothing extra).
    PinWal {
        from: Option<Lsn>,
    },
    BarrierDone {
        id: u64,
    },
    BarrierFailed {
        id: u64,
        reason: BarrierFailure,
    },
    /// The mode is met through `lsn` (persist the knowledge; report it).
    Committed {
        lsn: Lsn,
    },
    /// A higher epoch exists: refuse every write from now on.
    Fenced {
        epoch: Epoch,
        reason: String,
    },
    /// A replica changed state (for logs and metrics).
    StateChanged {
        replica: ReplicaId,
        state: PeerState,
        why: String,
        /// Its filesystem was full at its last refusal and it has stored nothing since: a
        /// change within its retry cycle, which the log says once, not every cycle.
        out_of_space: bool,
    },
    /// Choose a rebuild base (pinning the WAL after it); answer with `RebuildBase`. With
    /// `resume`, that base again if the WAL still holds every entry after it
    /// (`Store::resume_base`), otherwise a fresh one.
    BeginRebuild {
        replica: ReplicaId,
        session: SessionId,
        resume: Option<Lsn>,
    },
    /// Stream the base image (our data file as of `base` or newer) from offset `from` to the
    /// replica, at most `rate` bytes per second (0: unlimited); report `BaseProgress` and
    /// `BaseSent`.
    StreamBase {
        replica: ReplicaId,
        session: SessionId,
        base: Lsn,
        from: u64,
        rate: u64,
    },
}

#[derive(Debug)]
struct PendingBarrier {
    id: u64,
    target: Lsn,
    deadline: Millis,
}

/// Counters for the metrics.
#[derive(Debug, Default, Clone)]
pub struct PrimaryCounters {
    pub barriers_done: u64,
    pub barriers_failed: u64,
    pub sessions: u64,
    pub catch_ups: u64,
    /// Replicas whose divergent tail was cut in place (instead of a rebuild).
    pub truncations: u64,
    pub rebuilds_needed: u64,
    pub rebuilds_started: u64,
    pub rebuilds_done: u64,
    /// Interrupted rebuilds resumed from the replica's cursor.
    pub rebuilds_resumed: u64,
    /// Interrupted rebuilds started over, by reason (indexed as [`RebuildRestart::ALL`]).
    pub rebuild_restarts: [u64; RebuildRestart::ALL.len()],
    /// Base image data bytes sent, all rebuilds together.
    pub rebuild_sent_bytes: u64,
}

/// A replica as reported by [`PrimaryCore::peers`].
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub id: ReplicaId,
    pub state: PeerState,
    pub durable: Lsn,
    /// Its log is known to be a prefix of ours through `durable` (it answered a handshake
    /// and was not sent to a rebuild since): the WAL after `durable` is kept for it.
    pub recoverable: bool,
    pub session: Option<SessionId>,
    /// Why it entered its state (for people; test `contacted` for whether it was dialled).
    pub why: String,
    pub rebuild: Option<RebuildProgress>,
    /// What its last completed rebuild cost (since this primary started).
    pub last_rebuild: Option<RebuildReport>,
    /// It has been dialled at least once since this primary started. Until then its state is
    /// `Disconnected` only because nothing was tried yet, and `why` says so.
    pub contacted: bool,
}

pub struct PrimaryCore {
    cfg: PrimaryConfig,
    peers: Vec<Peer>,
    head: Lsn,
    /// Where each epoch begins in our log: the epoch of any LSN, to compare logs by.
    history: Vec<(Epoch, Lsn)>,
    local_durable: Lsn,
    committed: Lsn,
    barriers: VecDeque<PendingBarrier>,
    fenced: Option<Epoch>,
    next_session: u64,
    pin: Option<Lsn>,
    counters: PrimaryCounters,
    out: Vec<Action>,
}

impl PrimaryCore {
    /// A primary whose store holds entries through `head` (its epoch history is `history`,
    /// see `Superblock::epoch_history`), all durable locally, and knows `committed` to be
    /// committed. Its WAL still holds the entries from `kept_from` on
    /// (`Store::oldest_retained`); they stay pinned ([`PrimaryCore::pin`]) for each replica
    /// until it is heard from.
    pub fn new(
        cfg: PrimaryConfig,
        head: Lsn,
        history: Vec<(Epoch, Lsn)>,
        committed: Lsn,
        kept_from: Lsn,
        now: Millis,
    ) -> PrimaryCore {
        let peers = cfg
            .replicas
            .iter()
            .map(|id| Peer::new(id.clone(), kept_from, cfg.reconnect_min, now))
            .collect();
        let mut core = PrimaryCore {
            cfg,
            peers,
            head,
            history,
            local_durable: head,
            committed,
            barriers: VecDeque::new(),
            fenced: None,
            next_session: 1,
            pin: None,
            counters: PrimaryCounters::default(),
            out: Vec::new(),
        };
        // The caller applies the first pin itself (`pin`), before any checkpoint can run.
        core.update_pin();
        core.out.clear();
        core
    }

    /// Where the WAL must be kept from (`None`: nowhere): the last `PinWal`, or the first
    /// pin of a new core.
    pub fn pin(&self) -> Option<Lsn> {
        self.pin
    }

    pub fn epoch(&self) -> Epoch {
        self.cfg.epoch
    }

    pub fn mode(&self) -> CommitMode {
        self.cfg.mode
    }

    pub fn head(&self) -> Lsn {
        self.head
    }

    pub fn committed(&self) -> Lsn {
        self.committed
    }

    pub fn fenced(&self) -> Option<Epoch> {
        self.fenced
    }

    pub fn counters(&self) -> &PrimaryCounters {
        &self.counters
    }

    /// How far our data file may go while the WAL has room (see
    /// `Store::set_checkpoint_gate`): what every in-sync replica holds durably. If we are
    /// replaced by one of them and rejoin, whatever we hold past its log is still only in
    /// our WAL and can be cut in place. `None` when no replica is in sync: none of them
    /// could take over without a rebuild of ours anyway.
    pub fn checkpoint_gate(&self) -> Option<Lsn> {
        self.peers
            .iter()
            .filter(|p| p.state() == PeerState::InSync)
            .map(|p| p.durable())
            .min()
    }

    /// The send time of the newest barrier (or progress ask) that every replica the commit
    /// mode needs has answered at our epoch and is in sync now: under sync-all every
    /// replica, under sync-quorum the majority's. `None` under best-effort (no replica
    /// stands in for anything), without replicas, once fenced, or when too few have
    /// answered in their current session.
    ///
    /// Invariant (*a confirmation is never later than the answer it rests on*): each
    /// replica's figure is the send time of an ask its `BarrierAck` answered (acks come one
    /// per ask, in order), so at some instant after it the replica still followed this
    /// primary at its epoch; a replica promoted or fenced by a newer epoch since answers
    /// nothing more at ours.
    pub fn confirmed_at(&self) -> Option<Millis> {
        if self.fenced.is_some() || self.peers.is_empty() {
            return None;
        }
        let mut times: Vec<Millis> = self
            .peers
            .iter()
            .filter(|p| p.state() == PeerState::InSync)
            .filter_map(|p| p.confirmed_at())
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        let needed = match self.cfg.mode {
            CommitMode::BestEffort => return None,
            CommitMode::SyncAll => self.peers.len(),
            // As the commit rule counts: the primary and half of the copies.
            CommitMode::SyncQuorum => self.peers.len().div_ceil(2),
        };
        needed.checked_sub(1).and_then(|k| times.get(k).copied())
    }

    /// The lowest durable LSN of any replica (`None` without replicas), without building
    /// the whole status: the driver asks on every batch of appended entries.
    pub fn min_durable(&self) -> Option<Lsn> {
        self.peers.iter().map(|p| p.durable()).min()
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| PeerStatus {
                id: p.id().clone(),
                state: p.state(),
                durable: p.durable(),
                recoverable: p.has_progress() && Self::peer_pin(p).is_some(),
                session: p.session(),
                why: p.why().to_string(),
                rebuild: p.rebuild().cloned(),
                last_rebuild: p.last_rebuild().cloned(),
                contacted: p.contacted(),
            })
            .collect()
    }

    /// Feeds one event; returns what to do, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Tick { now, pinned_bytes } => self.tick(now, pinned_bytes),
            Event::Appended { records } => self.appended(records),
            Event::LocalDurable { lsn } => self.locally_durable(lsn),
            Event::Barrier { id, target, now } => self.barrier(id, target, now),
            Event::Connected {
                replica,
                session,
                now,
            } => self.connected(&replica, session, now),
            Event::Disconnected {
                replica,
                session,
                now,
                reason,
            } => {
                if let Some(i) = self.current(&replica, session) {
                    self.drop_session(i, now, &reason);
                }
            }
            Event::Received {
                replica,
                session,
                frame,
                now,
            } => {
                if let Some(i) = self.current(&replica, session) {
                    self.received(i, frame, now);
                }
            }
            Event::WalRead {
                replica,
                session,
                from,
                records,
                now,
            } => {
                // Only the answer to the read outstanding now counts: a read issued before
                // the replica changed course (a catch-up that became a rebuild) is stale.
                if let Some(i) = self.current_read(&replica, session, from) {
                    self.wal_read(i, records, now);
                }
            }
            Event::WalGone {
                replica,
                session,
                from,
                now,
            } => {
                if let Some(i) = self.current_read(&replica, session, from) {
                    self.needs_rebuild(i, now, "the entries it lacks are no longer retained");
                }
            }
            Event::RebuildBase {
                replica,
                session,
                base,
                history,
                resumed,
                refused,
            } => {
                if let Some(i) = self.current(&replica, session) {
                    let resumed = if resumed { Ok(()) } else { Err(refused) };
                    self.rebuild_base(i, base, history, resumed);
                }
            }
            Event::BaseProgress {
                replica,
                session,
                done,
                total,
                sent,
            } => {
                if let Some(i) = self.current(&replica, session) {
                    self.counters.rebuild_sent_bytes +=
                        self.peers[i].base_progress(done, total, sent);
                }
            }
            Event::BaseSent { replica, session } => {
                if let Some(i) = self.current(&replica, session) {
                    self.peers[i].base_sent();
                    self.maybe_finish_rebuild(i);
                }
            }
            Event::SetReplicas {
                replicas,
                kept_from,
                now,
            } => self.set_replicas(replicas, kept_from, now),
        }
        std::mem::take(&mut self.out)
    }

    /// The peer index for `replica` if `session` is its current session.
    fn current(&self, replica: &ReplicaId, session: SessionId) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| p.id() == replica && p.session() == Some(session))
    }

    /// The peer index for `replica` if `session` is its current session and a read from
    /// `from` is the one it waits for.
    fn current_read(&self, replica: &ReplicaId, session: SessionId, from: Lsn) -> Option<usize> {
        self.current(replica, session)
            .filter(|&i| from == self.peers[i].catch_up_next())
    }

    fn send(&mut self, i: usize, body: Body) {
        let p = &mut self.peers[i];
        if let Some(session) = p.session() {
            if let Body::Entries { records, .. } = &body {
                if let Some(last) = records.last() {
                    p.sent_through(last.lsn);
                }
            }
            self.out.push(Action::Send {
                replica: p.id().clone(),
                session,
                frame: Frame {
                    epoch: self.cfg.epoch,
                    body,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod resume_tests;
