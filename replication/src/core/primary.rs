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
//! Only InSync peers receive live entries and count toward the commit mode. Every input that
//! names a session is checked against the peer's current session; anything else is stale and
//! ignored. A frame from a higher epoch fences this primary for good.

use std::collections::VecDeque;

use blockrep_storage::{Epoch, Lsn, VolumeId, WalRecord};

use super::commit::{self, Vote};
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
            auto_rebuild: true,
            rebuild_rate: 0,
        }
    }
}

/// Where a replica is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Disconnected,
    Connecting,
    Handshake,
    CatchingUp,
    InSync,
    /// Its gap is not in the retained WAL, or its log diverged: only a rebuild brings it back.
    NeedsRebuild,
    /// Receiving our base image and the WAL after it; counts for nothing until it is done.
    Rebuilding,
    /// It refused the session for a reason other than our epoch (wrong volume...).
    Refused,
}

impl PeerState {
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Disconnected => "disconnected",
            PeerState::Connecting => "connecting",
            PeerState::Handshake => "handshake",
            PeerState::CatchingUp => "catching_up",
            PeerState::InSync => "in_sync",
            PeerState::NeedsRebuild => "needs_rebuild",
            PeerState::Rebuilding => "rebuilding",
            PeerState::Refused => "refused",
        }
    }

    pub const ALL: [PeerState; 8] = [
        PeerState::Disconnected,
        PeerState::Connecting,
        PeerState::Handshake,
        PeerState::CatchingUp,
        PeerState::InSync,
        PeerState::NeedsRebuild,
        PeerState::Rebuilding,
        PeerState::Refused,
    ];
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
}

impl BarrierFailure {
    pub fn name(self) -> &'static str {
        match self {
            BarrierFailure::ReplicaMissing => "replica_missing",
            BarrierFailure::QuorumLost => "quorum_lost",
            BarrierFailure::Fenced => "fenced",
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
    RebuildBase {
        replica: ReplicaId,
        session: SessionId,
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
    },
    /// Base image bytes sent so far.
    BaseProgress {
        replica: ReplicaId,
        session: SessionId,
        done: u64,
        total: u64,
    },
    /// The whole base image is queued for the replica.
    BaseSent {
        replica: ReplicaId,
        session: SessionId,
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
    },
    /// Choose a rebuild base (pinning the WAL after it); answer with `RebuildBase`.
    BeginRebuild {
        replica: ReplicaId,
        session: SessionId,
    },
    /// Stream the base image (our data file as of `base` or newer) to the replica, at most
    /// `rate` bytes per second (0: unlimited); report `BaseProgress` and `BaseSent`.
    StreamBase {
        replica: ReplicaId,
        session: SessionId,
        base: Lsn,
        rate: u64,
    },
}

#[derive(Debug)]
struct Peer {
    id: ReplicaId,
    state: PeerState,
    session: Option<SessionId>,
    /// Durable on the replica, from its handshake and barrier acks.
    durable: Lsn,
    /// Whether `durable` is known.
    has_progress: bool,
    /// Until it is first heard from: the WAL the store had kept when this primary started,
    /// held for it. The store may have kept it for this very replica before a restart; were
    /// it let go at the first checkpoint, a replica merely away across the restart would come
    /// back to a full rebuild instead of a catch-up. The retention budgets bound it like any
    /// other hold.
    held_from: Option<Lsn>,
    /// Next entry a catch-up will read.
    catch_up_next: Lsn,
    /// Highest barrier target sent in this session.
    asked: Lsn,
    /// The targets asked and not yet answered, oldest first, with when each was sent: each
    /// must be answered within the barrier timeout. (Only the oldest is timed; a replica
    /// that answers every ask in time is never dropped, however far the head runs ahead.)
    unanswered: std::collections::VecDeque<(Lsn, Millis)>,
    /// When it was last asked for progress.
    last_ask: Millis,
    /// When the current state began (handshake timeout).
    since: Millis,
    /// When it was last in a session that counts as present (in sync, catching up,
    /// rebuilding), or when this primary started: the retention time runs from here. Not
    /// `since`, which every failed reconnect attempt restarts.
    away_since: Option<Millis>,
    reconnect_at: Millis,
    backoff: Millis,
    store_id: Option<VolumeId>,
    why: String,
    rebuild: Option<RebuildProgress>,
    /// A rebuild already ran in this session: another need for one ends the session, so the
    /// next starts clean and nothing from the first attempt can be mistaken for the second.
    rebuilt_this_session: bool,
    /// Asked to cut its log after this LSN, answer pending.
    truncating: Option<Lsn>,
    /// A cut already ran in this session: a second divergence goes to a rebuild.
    truncated_this_session: bool,
    /// Sent to a rebuild and not back yet: between sessions it shows as NeedsRebuild rather
    /// than Disconnected, so operators see what it is waiting for.
    released: bool,
}

/// A rebuild in progress for one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    /// The base LSN, once chosen.
    pub base: Option<Lsn>,
    /// The WAL after the base has reached our head; live entries flow to it.
    pub live: bool,
    /// The whole base image is queued.
    pub base_sent: bool,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Asked to finish through this LSN.
    pub finishing: Option<Lsn>,
    /// When it started (the core's clock), for rates and ETAs.
    pub started: Millis,
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
    /// Why it entered its state.
    pub why: String,
    pub rebuild: Option<RebuildProgress>,
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
            .map(|id| Peer {
                id: id.clone(),
                state: PeerState::Disconnected,
                session: None,
                durable: Lsn::ZERO,
                has_progress: false,
                held_from: Some(kept_from),
                catch_up_next: Lsn::ZERO,
                asked: Lsn::ZERO,
                unanswered: std::collections::VecDeque::new(),
                last_ask: now,
                since: now,
                away_since: Some(now),
                reconnect_at: now,
                backoff: cfg.reconnect_min,
                store_id: None,
                why: "not contacted yet".into(),
                rebuild: None,
                rebuilt_this_session: false,
                truncating: None,
                truncated_this_session: false,
                released: false,
            })
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
            .filter(|p| p.state == PeerState::InSync)
            .map(|p| p.durable)
            .min()
    }

    /// The lowest durable LSN of any replica (`None` without replicas), without building
    /// the whole status: the driver asks on every batch of appended entries.
    pub fn min_durable(&self) -> Option<Lsn> {
        self.peers.iter().map(|p| p.durable).min()
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| PeerStatus {
                id: p.id.clone(),
                state: p.state,
                durable: p.durable,
                recoverable: p.has_progress && Self::peer_pin(p).is_some(),
                session: p.session,
                why: p.why.clone(),
                rebuild: p.rebuild.clone(),
            })
            .collect()
    }

    /// Feeds one event; returns what to do, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Tick { now, pinned_bytes } => self.tick(now, pinned_bytes),
            Event::Appended { records } => self.appended(records),
            Event::LocalDurable { lsn } => {
                if lsn > self.local_durable {
                    self.local_durable = lsn;
                    self.evaluate();
                }
            }
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
                if let Some(i) = self.current(&replica, session) {
                    if from == self.peers[i].catch_up_next {
                        self.wal_read(i, records, now);
                    }
                }
            }
            Event::WalGone {
                replica,
                session,
                from,
                now,
            } => {
                if let Some(i) = self
                    .current(&replica, session)
                    .filter(|&i| from == self.peers[i].catch_up_next)
                {
                    self.needs_rebuild(i, now, "the entries it lacks are no longer retained");
                }
            }
            Event::RebuildBase {
                replica,
                session,
                base,
                history,
            } => {
                if let Some(i) = self.current(&replica, session) {
                    self.rebuild_base(i, base, history);
                }
            }
            Event::BaseProgress {
                replica,
                session,
                done,
                total,
            } => {
                if let Some(i) = self.current(&replica, session) {
                    if let Some(r) = &mut self.peers[i].rebuild {
                        r.bytes_done = done;
                        r.bytes_total = total;
                    }
                }
            }
            Event::BaseSent { replica, session } => {
                if let Some(i) = self.current(&replica, session) {
                    if let Some(r) = &mut self.peers[i].rebuild {
                        r.base_sent = true;
                        r.bytes_done = r.bytes_total;
                    }
                    self.maybe_finish_rebuild(i);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// The peer index for `replica` if `session` is its current session.
    fn current(&self, replica: &ReplicaId, session: SessionId) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| &p.id == replica && p.session == Some(session))
    }

    /// A replica in one of these states is in a session that keeps it current.
    fn present(state: PeerState) -> bool {
        matches!(
            state,
            PeerState::InSync | PeerState::CatchingUp | PeerState::Rebuilding
        )
    }

    fn set_state(&mut self, i: usize, state: PeerState, now: Millis, why: &str) {
        let p = &mut self.peers[i];
        if p.state != state {
            p.state = state;
            p.since = now;
            if Self::present(state) {
                p.away_since = None;
            } else if p.away_since.is_none() {
                p.away_since = Some(now);
            }
            p.why = why.to_string();
            self.out.push(Action::StateChanged {
                replica: p.id.clone(),
                state,
                why: why.to_string(),
            });
            // What the WAL must keep depends on the state: the pin follows every change.
            self.update_pin();
        }
    }

    fn send(&mut self, i: usize, body: Body) {
        let p = &self.peers[i];
        if let Some(session) = p.session {
            self.out.push(Action::Send {
                replica: p.id.clone(),
                session,
                frame: Frame {
                    epoch: self.cfg.epoch,
                    body,
                },
            });
        }
    }

    fn tick(&mut self, now: Millis, pinned_bytes: u64) {
        if self.fenced.is_some() {
            return;
        }
        // FLUSHes that ran out of time fail; the mode never downgrades to let them pass.
        while self.barriers.front().is_some_and(|b| b.deadline <= now) {
            let b = self.barriers.pop_front().expect("front exists");
            let reason = match self.cfg.mode {
                CommitMode::SyncQuorum => BarrierFailure::QuorumLost,
                _ => BarrierFailure::ReplicaMissing,
            };
            self.counters.barriers_failed += 1;
            self.out.push(Action::BarrierFailed { id: b.id, reason });
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            match p.state {
                // A replica that does not answer a barrier in time is degraded, in every mode:
                // it stops counting and recovers through a fresh handshake.
                PeerState::InSync | PeerState::CatchingUp | PeerState::Rebuilding
                    if p.unanswered
                        .front()
                        .is_some_and(|(_, t)| now >= t + self.cfg.barrier_timeout) =>
                {
                    self.drop_session(i, now, "no barrier acknowledgement in time");
                }
                PeerState::Connecting | PeerState::Handshake
                    if now >= p.since + self.cfg.handshake_timeout =>
                {
                    self.drop_session(i, now, "handshake timed out");
                }
                // A replica that needs a rebuild is dialled like any other: the rebuild
                // starts on the next session that reaches a handshake.
                PeerState::Disconnected | PeerState::Refused | PeerState::NeedsRebuild
                    if p.session.is_none() && now >= p.reconnect_at =>
                {
                    self.connect(i, now);
                }
                PeerState::InSync | PeerState::Rebuilding
                    if self.head > p.asked
                        && now >= p.last_ask + self.cfg.progress_interval
                        && (p.state == PeerState::InSync
                            || p.rebuild.as_ref().is_some_and(|r| r.live)) =>
                {
                    let head = self.head;
                    self.ask(i, head, now);
                }
                _ => {}
            }
        }
        self.enforce_retention(now, pinned_bytes);
    }

    fn connect(&mut self, i: usize, now: Millis) {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.counters.sessions += 1;
        let p = &mut self.peers[i];
        p.session = Some(session);
        p.asked = Lsn::ZERO;
        p.unanswered.clear();
        p.rebuilt_this_session = false;
        p.truncating = None;
        p.truncated_this_session = false;
        let id = p.id.clone();
        self.set_state(i, PeerState::Connecting, now, "connecting");
        self.out.push(Action::Connect {
            replica: id,
            session,
        });
    }

    fn connected(&mut self, replica: &ReplicaId, session: SessionId, now: Millis) {
        let Some(i) = self.current(replica, session) else {
            return;
        };
        if self.peers[i].state != PeerState::Connecting {
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
    fn drop_session(&mut self, i: usize, now: Millis, reason: &str) {
        let p = &mut self.peers[i];
        let Some(session) = p.session.take() else {
            return;
        };
        let id = p.id.clone();
        p.unanswered.clear();
        p.reconnect_at = now + p.backoff;
        p.backoff = (p.backoff * 2).min(self.cfg.reconnect_max);
        self.out.push(Action::Close {
            replica: id,
            session,
            reason: reason.to_string(),
        });
        match p.state {
            PeerState::NeedsRebuild | PeerState::Refused => {}
            // An interrupted rebuild leaves nothing usable: the replica still needs one.
            _ if p.released => self.set_state(i, PeerState::NeedsRebuild, now, reason),
            _ => self.set_state(i, PeerState::Disconnected, now, reason),
        }
        self.update_pin();
        self.evaluate();
    }

    /// The replica can only come back by a rebuild. If its session is up (it has answered a
    /// hello) the rebuild starts at once on that session; otherwise it starts at the next
    /// handshake.
    fn needs_rebuild(&mut self, i: usize, now: Millis, why: &str) {
        self.counters.rebuilds_needed += 1;
        self.peers[i].released = true;
        let talking = matches!(
            self.peers[i].state,
            PeerState::Handshake
                | PeerState::CatchingUp
                | PeerState::InSync
                | PeerState::Rebuilding
        );
        self.peers[i].has_progress = false;
        self.peers[i].held_from = None;
        self.peers[i].rebuild = None;
        self.set_state(i, PeerState::NeedsRebuild, now, why);
        if talking
            && self.cfg.auto_rebuild
            && self.peers[i].session.is_some()
            && !self.peers[i].rebuilt_this_session
        {
            self.begin_rebuild(i, now);
        } else {
            // Its state is NeedsRebuild already, which dropping the session keeps.
            self.drop_session(i, now, why);
        }
        self.update_pin();
        self.evaluate();
    }

    fn begin_rebuild(&mut self, i: usize, now: Millis) {
        let Some(session) = self.peers[i].session else {
            return;
        };
        self.peers[i].rebuilt_this_session = true;
        self.peers[i].rebuild = Some(RebuildProgress {
            started: now,
            ..RebuildProgress::default()
        });
        self.counters.rebuilds_started += 1;
        self.set_state(
            i,
            PeerState::Rebuilding,
            now,
            "rebuilding from our base image",
        );
        self.out.push(Action::BeginRebuild {
            replica: self.peers[i].id.clone(),
            session,
        });
    }

    /// The base is chosen (and the WAL after it pinned): reset the replica to it, start the
    /// base image, and stream the WAL after the base as for a catch-up.
    fn rebuild_base(&mut self, i: usize, base: Lsn, history: Vec<(Epoch, Lsn)>) {
        if self.peers[i].state != PeerState::Rebuilding {
            return;
        }
        let p = &mut self.peers[i];
        if let Some(r) = &mut p.rebuild {
            r.base = Some(base);
        }
        p.durable = base;
        p.has_progress = true;
        p.catch_up_next = base.next();
        let Some(session) = p.session else { return };
        let replica = p.id.clone();
        self.send(i, Body::RebuildStart { base, history });
        self.out.push(Action::StreamBase {
            replica,
            session,
            base,
            rate: self.cfg.rebuild_rate,
        });
        self.update_pin();
        self.request_wal(i, base.next());
    }

    /// Both lines are done (the base image is queued, the WAL reaches our head): ask the
    /// replica to finish, durable through our head.
    fn maybe_finish_rebuild(&mut self, i: usize) {
        let head = self.head;
        let Some(r) = &mut self.peers[i].rebuild else {
            return;
        };
        if !(r.base_sent && r.live) || r.finishing.is_some() {
            return;
        }
        r.finishing = Some(head);
        self.send(i, Body::RebuildFinish { target: head });
    }

    fn received(&mut self, i: usize, frame: Frame, now: Millis) {
        if let Body::Reject { reason, message } = &frame.body {
            if frame.epoch > self.cfg.epoch {
                self.fence(
                    frame.epoch,
                    format!(
                        "replica {} is at epoch {}: {message}",
                        self.peers[i].id, frame.epoch
                    ),
                );
                return;
            }
            let why = format!("refused: {reason:?}: {message}");
            let p = &mut self.peers[i];
            p.backoff = self.cfg.reconnect_max;
            // Heard from: whatever the WAL was kept for, it was not this store's session.
            p.held_from = None;
            self.set_state(i, PeerState::Refused, now, &why);
            self.drop_session(i, now, &why);
            return;
        }
        if frame.epoch != self.cfg.epoch {
            // Replicas answer at the epoch we gave them; anything else is a protocol error.
            self.drop_session(i, now, "reply at a different epoch");
            return;
        }
        match frame.body {
            Body::HelloOk {
                replica_store,
                durable,
                durable_epoch,
                rebuilding,
                ..
            } if self.peers[i].state == PeerState::Handshake => {
                self.peers[i].store_id = Some(replica_store);
                if rebuilding {
                    self.needs_rebuild(i, now, "its last rebuild did not finish");
                } else {
                    self.handshake(i, durable, durable_epoch, now);
                }
            }
            Body::RebuildDone { durable } if self.peers[i].state == PeerState::Rebuilding => {
                let target = self.peers[i].rebuild.as_ref().and_then(|r| r.finishing);
                if target.is_none_or(|t| durable < t) {
                    self.drop_session(i, now, "rebuild reported done too early");
                    return;
                }
                // The replica counts again only now that we accept its completion.
                let p = &mut self.peers[i];
                p.durable = durable;
                p.rebuild = None;
                p.released = false;
                self.counters.rebuilds_done += 1;
                self.set_state(i, PeerState::InSync, now, "rebuilt");
                self.resend_barriers(i, now);
                self.update_pin();
                self.evaluate();
            }
            Body::Truncated {
                durable,
                durable_epoch,
                refusal,
            } if self.peers[i].state == PeerState::Handshake
                && self.peers[i].truncating.is_some() =>
            {
                let keep = self.peers[i].truncating.take().unwrap_or(Lsn::ZERO);
                if !refusal.is_empty() {
                    let why = format!("it could not cut its log after {keep}: {refusal}");
                    self.needs_rebuild(i, now, &why);
                } else if durable != keep {
                    let why = format!("asked to cut its log after {keep}, it ends at {durable}");
                    self.drop_session(i, now, &why);
                } else {
                    self.counters.truncations += 1;
                    self.peers[i].truncated_this_session = true;
                    self.handshake(i, durable, durable_epoch, now);
                }
            }
            Body::BarrierAck { durable } => {
                let p = &mut self.peers[i];
                if durable > p.durable {
                    p.durable = durable;
                }
                while p.unanswered.front().is_some_and(|(l, _)| *l <= p.durable) {
                    p.unanswered.pop_front();
                }
                p.backoff = self.cfg.reconnect_min;
                self.update_pin();
                self.evaluate();
            }
            other => {
                let why = format!("unexpected {} frame", other.name());
                self.drop_session(i, now, &why);
            }
        }
    }

    /// Decides how the replica rejoins, from facts only: where its log ends (LSN and epoch of
    /// its last entry) and our log. Same LSN and epoch means the same history up to there.
    fn handshake(&mut self, i: usize, durable: Lsn, durable_epoch: Epoch, now: Millis) {
        let p = &mut self.peers[i];
        p.durable = durable;
        p.has_progress = true;
        p.held_from = None;
        p.released = false;
        // From now on the WAL after `durable` is kept for it, whichever way it goes on.
        self.update_pin();
        let diverged = if durable > self.head {
            // It holds entries we do not: an old primary's unacknowledged tail.
            Some(format!(
                "its log ({durable}) is ahead of ours ({})",
                self.head
            ))
        } else {
            match blockrep_storage::epoch_at(&self.history, durable) {
                // An empty log is a prefix of every log.
                _ if durable == Lsn::ZERO => None,
                Some(e) if e == durable_epoch => None,
                Some(_) if crate::mutants::active(crate::mutants::Mutant::IgnoreDivergedLog) => {
                    None
                }
                Some(e) => Some(format!(
                    "its entry {durable} is from epoch {durable_epoch}, ours from {e}: the logs diverged"
                )),
                None => {
                    let why = format!(
                        "entry {durable} is older than our epoch history; cannot compare logs"
                    );
                    self.needs_rebuild(i, now, &why);
                    return;
                }
            }
        };
        if let Some(why) = diverged {
            // Never merged: cut back to the entries both logs share, or rebuilt.
            match common_prefix(&self.history, self.head, durable, durable_epoch) {
                Some(keep) if !self.peers[i].truncated_this_session => {
                    self.peers[i].truncating = Some(keep);
                    self.peers[i].durable = keep.min(durable);
                    self.update_pin();
                    tracing::info!(replica = %self.peers[i].id, "{why}: asking it to cut its log after {keep}");
                    self.send(i, Body::Truncate { keep });
                }
                _ => self.needs_rebuild(i, now, &why),
            }
            return;
        }
        if durable == self.head {
            self.set_state(i, PeerState::InSync, now, "zero gap");
            self.resend_barriers(i, now);
            self.evaluate();
            return;
        }
        let p = &mut self.peers[i];
        p.catch_up_next = durable.next();
        self.counters.catch_ups += 1;
        let from = p.catch_up_next;
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
        if let Some(session) = p.session {
            self.out.push(Action::ReadWal {
                replica: p.id.clone(),
                session,
                from,
                max_bytes: self.cfg.catch_up_batch_bytes,
            });
        }
    }

    fn wal_read(&mut self, i: usize, mut records: Vec<WalRecord>, now: Millis) {
        let rebuilding = self.peers[i].state == PeerState::Rebuilding;
        if self.peers[i].state != PeerState::CatchingUp && !rebuilding {
            return;
        }
        let next = self.peers[i].catch_up_next;
        // Entries the core has not seen appended yet will come through live shipping.
        records.retain(|r| r.lsn >= next && r.lsn <= self.head);
        let contiguous = records.windows(2).all(|w| w[1].lsn == w[0].lsn.next());
        if records.first().is_some_and(|r| r.lsn != next) || !contiguous {
            self.needs_rebuild(i, now, "retained WAL has a hole");
            return;
        }
        if let Some(last) = records.last() {
            self.peers[i].catch_up_next = last.lsn.next();
            self.send(
                i,
                Body::Entries {
                    committed: self.committed,
                    records,
                },
            );
        }
        let next = self.peers[i].catch_up_next;
        if next <= self.head {
            self.request_wal(i, next);
        } else if rebuilding {
            // The WAL line reaches our head: live entries flow from here on.
            if let Some(r) = &mut self.peers[i].rebuild {
                r.live = true;
            }
            self.maybe_finish_rebuild(i);
        } else {
            // Caught up: live shipping continues from head + 1 with no gap and no duplicate.
            self.set_state(i, PeerState::InSync, now, "caught up");
            self.resend_barriers(i, now);
            self.update_pin();
        }
    }

    fn appended(&mut self, records: Vec<WalRecord>) {
        let Some(last) = records.last().map(|r| r.lsn) else {
            return;
        };
        debug_assert_eq!(records[0].lsn, self.head.next(), "entries arrive in order");
        self.head = last;
        for r in &records {
            if self.history.last().is_none_or(|(e, _)| *e != r.epoch) {
                self.history.push((r.epoch, r.lsn));
            }
        }
        if self.fenced.is_some() {
            return;
        }
        let in_sync: Vec<usize> = (0..self.peers.len())
            .filter(|&i| {
                let p = &self.peers[i];
                p.state == PeerState::InSync
                    || (p.state == PeerState::Rebuilding
                        && p.rebuild.as_ref().is_some_and(|r| r.live))
            })
            .collect();
        for i in in_sync {
            self.send(
                i,
                Body::Entries {
                    committed: self.committed,
                    records: records.clone(),
                },
            );
        }
    }

    fn barrier(&mut self, id: u64, target: Lsn, now: Millis) {
        if self.fenced.is_some() {
            self.out.push(Action::BarrierFailed {
                id,
                reason: BarrierFailure::Fenced,
            });
            return;
        }
        self.barriers.push_back(PendingBarrier {
            id,
            target,
            deadline: now + self.cfg.barrier_timeout,
        });
        for i in 0..self.peers.len() {
            if self.peers[i].state == PeerState::InSync {
                self.ask(i, target, now);
            }
        }
        self.evaluate();
    }

    /// Asks an in-sync replica to report durability through `target` (once per target).
    fn ask(&mut self, i: usize, target: Lsn, now: Millis) {
        let p = &mut self.peers[i];
        if p.durable >= target || p.asked >= target {
            return;
        }
        p.asked = target;
        p.unanswered.push_back((target, now));
        p.last_ask = now;
        let committed = self.committed;
        self.send(
            i,
            Body::Barrier {
                lsn: target,
                committed,
            },
        );
    }

    /// A replica that just became in sync is asked for the barriers still pending.
    fn resend_barriers(&mut self, i: usize, now: Millis) {
        if let Some(max) = self.barriers.iter().map(|b| b.target).max() {
            self.ask(i, max.min(self.head), now);
        }
    }

    /// Recomputes the committed LSN and completes the barriers it covers.
    fn evaluate(&mut self) {
        let votes: Vec<Vote> = self
            .peers
            .iter()
            .map(|p| Vote {
                in_sync: p.state == PeerState::InSync,
                durable: p.durable,
            })
            .collect();
        let now = commit::committed_now(self.cfg.mode, self.local_durable, &votes);
        let c = now.unwrap_or(Lsn::ZERO);
        if c > self.committed {
            self.committed = c;
            self.out.push(Action::Committed { lsn: c });
        }
        let Some(answered) = now else { return };
        let mut i = 0;
        while i < self.barriers.len() {
            if self.barriers[i].target <= answered {
                let b = self.barriers.remove(i).expect("index in range");
                self.counters.barriers_done += 1;
                self.out.push(Action::BarrierDone { id: b.id });
            } else {
                i += 1;
            }
        }
    }

    /// The oldest entry `p` still needs from the WAL, if it is recoverable at all.
    fn peer_pin(p: &Peer) -> Option<Lsn> {
        if matches!(p.state, PeerState::NeedsRebuild | PeerState::Refused) {
            return None;
        }
        if !p.has_progress {
            return p.held_from;
        }
        // Released to a rebuild: only a running rebuild (its WAL after the base) holds the
        // WAL; between sessions its old LSN means nothing.
        if p.released && p.state != PeerState::Rebuilding {
            return None;
        }
        Some(match p.state {
            PeerState::CatchingUp | PeerState::Rebuilding => p.catch_up_next.min(p.durable.next()),
            _ => p.durable.next(),
        })
    }

    /// The WAL is kept from the oldest entry a recoverable replica has not made durable.
    fn update_pin(&mut self) {
        let pin = self
            .peers
            .iter()
            .filter(|p| {
                !crate::mutants::active(crate::mutants::Mutant::RecycleNeededWal)
                    || p.state == PeerState::InSync
            })
            .filter_map(Self::peer_pin)
            .min();
        if pin != self.pin {
            self.pin = pin;
            self.out.push(Action::PinWal { from: pin });
        }
    }

    /// One dead replica must never stop writes: past the byte or time budget, the replica
    /// holding the oldest pin gives it up and will need a rebuild. One per tick: the next
    /// tick measures the WAL the new pin holds.
    ///
    /// Except a replica in sync under sync-all: every FLUSH waits for it anyway, so while its
    /// session lives (it answers barriers within the barrier timeout) the WAL it holds makes
    /// writers wait for it, as a full WAL always does, instead of throwing its copy away for
    /// a full rebuild because it is slower than the primary. One that stops answering loses
    /// its session, and then the budget applies as to any replica away.
    fn enforce_retention(&mut self, now: Millis, pinned_bytes: u64) {
        let Some(pin) = self.pin else { return };
        let Some(i) = self
            .peers
            .iter()
            .position(|p| Self::peer_pin(p) == Some(pin))
        else {
            return;
        };
        let p = &self.peers[i];
        let paces_writers = self.cfg.mode == CommitMode::SyncAll && p.state == PeerState::InSync;
        let over_bytes = pinned_bytes > self.cfg.retention_bytes && !paces_writers;
        let over_time = p
            .away_since
            .is_some_and(|t| now >= t + self.cfg.retention_time);
        if !(over_bytes || over_time) {
            return;
        }
        if !p.has_progress {
            // The hold a new primary keeps for replicas it has not heard from (`held_from`):
            // past a budget it goes for all of them at once, and nobody is sent to a rebuild
            // for it. Each still catches up when it comes back if its entries are still
            // there. (One of them may never have needed any: it may be fully in sync.)
            for p in &mut self.peers {
                p.held_from = None;
            }
            self.update_pin();
            return;
        }
        let why = if over_bytes {
            format!(
                "the WAL kept for it exceeds {} bytes",
                self.cfg.retention_bytes
            )
        } else {
            format!("away longer than {} ms", self.cfg.retention_time)
        };
        self.needs_rebuild(i, now, &why);
    }

    fn fence(&mut self, epoch: Epoch, reason: String) {
        if self.fenced.is_some() {
            return;
        }
        self.fenced = Some(epoch);
        self.out.push(Action::Fenced {
            epoch,
            reason: reason.clone(),
        });
        for b in std::mem::take(&mut self.barriers) {
            self.counters.barriers_failed += 1;
            self.out.push(Action::BarrierFailed {
                id: b.id,
                reason: BarrierFailure::Fenced,
            });
        }
        for p in &mut self.peers {
            if let Some(session) = p.session.take() {
                self.out.push(Action::Close {
                    replica: p.id.clone(),
                    session,
                    reason: "fenced by a higher epoch".into(),
                });
            }
        }
    }
}

/// The last entry our log (`history` through `head`) shares with a replica's log that ends
/// at `theirs`, an entry of epoch `their_epoch`; `None` when our history cannot tell.
///
/// Invariant (*logs agree through the shorter run of a shared epoch*): every entry of one
/// epoch was written by that epoch's one primary, and every copy took them in LSN order on
/// top of a prefix of that primary's log. So two logs that both hold entries of epoch `e`
/// agree on everything up to where the shorter of their `e` runs ends: a replica whose last
/// entry is of `e` shares our log through `min(theirs, our last entry of e)`.
fn common_prefix(
    history: &[(Epoch, Lsn)],
    head: Lsn,
    theirs: Lsn,
    their_epoch: Epoch,
) -> Option<Lsn> {
    let i = history.iter().position(|(e, _)| *e == their_epoch)?;
    let start = history[i].1;
    let end = history.get(i + 1).map_or(head, |(_, next)| next.prev());
    (theirs >= start && end >= start).then(|| theirs.min(end))
}

#[cfg(test)]
#[path = "primary_tests.rs"]
mod tests;
