//! One replica as the primary tracks it, and the transitions that move it.
//!
//! Every change to a peer goes through a method here, and each method resets what it owns in
//! one place (as raft-rs `Progress::become_probe` and friends do): a session's bookkeeping is
//! cleared where a session begins, not wherever one happens to end. The core decides *when*;
//! these methods decide *what* a transition touches. None of them emits an action.

use std::collections::VecDeque;

use blockrep_storage::{Lsn, RebuildCursor, VolumeId};

use crate::core::{Millis, ReplicaId, SessionId};

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

    /// A replica in one of these states is in a session that keeps it current.
    pub(super) fn present(self) -> bool {
        matches!(
            self,
            PeerState::InSync | PeerState::CatchingUp | PeerState::Rebuilding
        )
    }

    /// A replica in one of these states has answered a hello in its current session.
    pub(super) fn talking(self) -> bool {
        matches!(
            self,
            PeerState::Handshake
                | PeerState::CatchingUp
                | PeerState::InSync
                | PeerState::Rebuilding
        )
    }
}

/// Why an interrupted rebuild started over instead of resuming from the replica's cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildRestart {
    /// The replica wrote no cursor before it was interrupted.
    NoCursor,
    /// Its cursor describes nothing a primary could have sent (`check_cursor`).
    BadCursor,
    /// Our log does not hold the base's history, or its entry at the cursor's proof: the
    /// partial base may reflect entries we never had.
    LineageChanged,
    /// The WAL after the base is no longer retained (or the hold for it was given up to the
    /// retention budget).
    WalRecycled,
    /// Our data file is older than the base (we took over with an older checkpoint): the
    /// image we would send past the cursor could miss entries before the base.
    OlderImage,
}

impl RebuildRestart {
    pub const ALL: [RebuildRestart; 5] = [
        RebuildRestart::NoCursor,
        RebuildRestart::BadCursor,
        RebuildRestart::LineageChanged,
        RebuildRestart::WalRecycled,
        RebuildRestart::OlderImage,
    ];

    /// The label in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            RebuildRestart::NoCursor => "no-cursor",
            RebuildRestart::BadCursor => "bad-cursor",
            RebuildRestart::LineageChanged => "lineage-changed",
            RebuildRestart::WalRecycled => "wal-recycled",
            RebuildRestart::OlderImage => "older-image",
        }
    }

    /// Its place in `RebuildRestart::ALL` (and `PrimaryCounters::rebuild_restarts`).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What one completed rebuild cost, from its first start to the replica counting again,
/// across the interruptions it survived (as far as this primary saw it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Base image data bytes sent, every attempt together.
    pub sent_bytes: u64,
    /// From the first start to in sync (the core's clock).
    pub took: Millis,
    pub resumes: u32,
    pub restarts: u32,
}

/// A rebuild in progress for one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    /// Resuming an interrupted rebuild: the base image continues from this offset.
    pub resumed_from: Option<u64>,
    /// Base image data bytes sent on this attempt.
    pub sent_bytes: u64,
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
pub(super) struct Peer {
    id: ReplicaId,
    state: PeerState,
    session: Option<SessionId>,
    /// The newest session it was ever given.
    ///
    /// Invariant (*a session id is never reused*): every session a peer begins is newer than
    /// any it had before, so a result naming an old session can never pass for the current
    /// one. Asserted in [`Peer::begin_session`].
    last_session: Option<SessionId>,
    /// A session was ever started with it (it has been dialled at least once).
    contacted: bool,
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
    /// The furthest its log can reach in this session: where its handshake placed it (never
    /// past our head), a rebuild base, or the newest entry shipped to it since, whichever is
    /// highest. Never lowered within the session: a barrier ack from before a
    /// `RebuildStart` may still arrive after it, and it was true when sent.
    ///
    /// Invariant (*a barrier ack past what was shipped is clamped*): what the replica
    /// reports durable counts only up to here, so a replica that lies (`BarrierAck` at
    /// `u64::MAX`, a `HelloOk` ahead of our log) can never make a FLUSH succeed for data it
    /// was never sent. Kept in [`Peer::acked`] and [`Peer::rebuilt`].
    shipped: Lsn,
    /// The targets asked and not yet answered, oldest first, with when each was sent: each
    /// must be answered within the barrier timeout. (Only the oldest is timed; a replica
    /// that answers every ask in time is never dropped, however far the head runs ahead.)
    unanswered: VecDeque<(Lsn, Millis)>,
    /// When each `Barrier` frame of this session was sent, oldest first, until its
    /// `BarrierAck` arrives: the replica answers every barrier with exactly one ack, in order
    /// (one sync each), so the oldest entry is the ask the next ack answers. (Were acks ever
    /// coalesced, an entry older than the true one would be taken: an earlier time, which
    /// only shortens what it vouches for.)
    sent_asks: VecDeque<Millis>,
    /// The send time of the newest ask this session's replica has answered: it was at our
    /// epoch (frames at any other end the session) at some instant after this.
    confirmed_at: Option<Millis>,
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
    /// The base of a running or interrupted rebuild that may still be resumed: the WAL after
    /// it is held (within the retention budgets), across sessions.
    kept_base: Option<Lsn>,
    /// The cursor the next rebuild resumes from (the handshake vouched for it).
    resume: Option<RebuildCursor>,
    /// The rebuild under way, across its interruptions (first start, bytes, tries).
    cost: Option<(Millis, RebuildReport)>,
    last_rebuild: Option<RebuildReport>,
    /// Its last refusal said its filesystem is full (`Reject(NoSpace)`), and it has not
    /// acknowledged a newer entry since: a sync-all FLUSH that times out for want of it
    /// fails as ENOSPC.
    out_of_space: bool,
}

impl Peer {
    /// A configured replica this primary has not dialled yet; it holds the WAL from
    /// `kept_from` until it is heard from.
    pub(super) fn new(id: ReplicaId, kept_from: Lsn, backoff: Millis, now: Millis) -> Peer {
        Peer {
            id,
            state: PeerState::Disconnected,
            session: None,
            last_session: None,
            contacted: false,
            durable: Lsn::ZERO,
            has_progress: false,
            held_from: Some(kept_from),
            catch_up_next: Lsn::ZERO,
            asked: Lsn::ZERO,
            shipped: Lsn::ZERO,
            unanswered: VecDeque::new(),
            sent_asks: VecDeque::new(),
            confirmed_at: None,
            last_ask: now,
            since: now,
            away_since: Some(now),
            reconnect_at: now,
            backoff,
            store_id: None,
            why: "not contacted yet".into(),
            rebuild: None,
            rebuilt_this_session: false,
            truncating: None,
            truncated_this_session: false,
            released: false,
            kept_base: None,
            resume: None,
            cost: None,
            last_rebuild: None,
            out_of_space: false,
        }
    }

    pub(super) fn out_of_space(&self) -> bool {
        self.out_of_space
    }

    /// It refused entries for lack of space: redial only slowly (freeing space takes an
    /// operator, not milliseconds), but keep its hold, as for any replica that is away.
    pub(super) fn out_of_space_now(&mut self, backoff_max: Millis) {
        self.out_of_space = true;
        self.backoff = backoff_max;
    }

    pub(super) fn id(&self) -> &ReplicaId {
        &self.id
    }

    pub(super) fn state(&self) -> PeerState {
        self.state
    }

    pub(super) fn session(&self) -> Option<SessionId> {
        self.session
    }

    pub(super) fn contacted(&self) -> bool {
        self.contacted
    }

    pub(super) fn durable(&self) -> Lsn {
        self.durable
    }

    pub(super) fn has_progress(&self) -> bool {
        self.has_progress
    }

    pub(super) fn held_from(&self) -> Option<Lsn> {
        self.held_from
    }

    pub(super) fn catch_up_next(&self) -> Lsn {
        self.catch_up_next
    }

    pub(super) fn asked(&self) -> Lsn {
        self.asked
    }

    /// When the oldest unanswered ask was sent.
    pub(super) fn oldest_unanswered(&self) -> Option<Millis> {
        self.unanswered.front().map(|(_, t)| *t)
    }

    /// See [`Peer::confirmed_at`]'s field: `None` before this session answered any ask.
    pub(super) fn confirmed_at(&self) -> Option<Millis> {
        self.confirmed_at
    }

    /// Whether an ask of this session is still unanswered.
    pub(super) fn awaits_answer(&self) -> bool {
        !self.sent_asks.is_empty()
    }

    pub(super) fn last_ask(&self) -> Millis {
        self.last_ask
    }

    pub(super) fn since(&self) -> Millis {
        self.since
    }

    pub(super) fn away_since(&self) -> Option<Millis> {
        self.away_since
    }

    pub(super) fn reconnect_at(&self) -> Millis {
        self.reconnect_at
    }

    pub(super) fn why(&self) -> &str {
        &self.why
    }

    pub(super) fn rebuild(&self) -> Option<&RebuildProgress> {
        self.rebuild.as_ref()
    }

    /// A running rebuild whose WAL line has reached our head: live entries flow to it.
    pub(super) fn rebuild_live(&self) -> bool {
        self.rebuild.as_ref().is_some_and(|r| r.live)
    }

    pub(super) fn rebuilt_this_session(&self) -> bool {
        self.rebuilt_this_session
    }

    pub(super) fn truncating(&self) -> Option<Lsn> {
        self.truncating
    }

    pub(super) fn truncated_this_session(&self) -> bool {
        self.truncated_this_session
    }

    pub(super) fn released(&self) -> bool {
        self.released
    }

    /// Enters `state` for `why`; `false` (and nothing changes) if it is there already.
    pub(super) fn enter(&mut self, state: PeerState, now: Millis, why: &str) -> bool {
        if self.state == state {
            return false;
        }
        self.state = state;
        self.since = now;
        if state.present() {
            self.away_since = None;
        } else if self.away_since.is_none() {
            self.away_since = Some(now);
        }
        self.why = why.to_string();
        true
    }

    /// A new session: what the last one asked, cut or rebuilt is forgotten.
    pub(super) fn begin_session(&mut self, session: SessionId) {
        assert!(
            self.session.is_none() && self.last_session.is_none_or(|s| s < session),
            "a session id is never reused: {session} after {:?}",
            self.last_session
        );
        self.session = Some(session);
        self.last_session = Some(session);
        self.contacted = true;
        self.asked = Lsn::ZERO;
        self.shipped = Lsn::ZERO;
        self.unanswered.clear();
        self.sent_asks.clear();
        self.confirmed_at = None;
        self.rebuilt_this_session = false;
        self.truncating = None;
        self.truncated_this_session = false;
    }

    /// The session ends and a retry is scheduled after the current backoff, which grows up
    /// to `backoff_max`. Returns the session that ended (`None`: there was none).
    pub(super) fn end_session(&mut self, now: Millis, backoff_max: Millis) -> Option<SessionId> {
        let session = self.session.take()?;
        self.unanswered.clear();
        self.sent_asks.clear();
        self.confirmed_at = None;
        self.reconnect_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(backoff_max);
        Some(session)
    }

    /// The session is abandoned for good (this primary is fenced): no retry.
    pub(super) fn abandon_session(&mut self) -> Option<SessionId> {
        self.session.take()
    }

    /// It refused us: redial only slowly, and hold nothing for it (whatever the WAL was kept
    /// for, it was not this store's session).
    pub(super) fn refused(&mut self, backoff_max: Millis) {
        self.backoff = backoff_max;
        self.held_from = None;
    }

    /// The hold a new primary keeps for it until it is heard from goes.
    pub(super) fn let_hold_go(&mut self) {
        self.held_from = None;
    }

    /// It answered our hello from this store.
    pub(super) fn greeted(&mut self, store: VolumeId) {
        self.store_id = Some(store);
    }

    /// Its handshake told us where its log ends, a prefix of ours or not: its progress is
    /// known from here on, and it is no longer released to a rebuild. Only what lies within
    /// our log (through `head`) can count: anything past it we never wrote.
    pub(super) fn heard(&mut self, durable: Lsn, head: Lsn) {
        let durable = durable.min(head);
        self.durable = durable;
        self.shipped = self.shipped.max(durable);
        self.has_progress = true;
        self.held_from = None;
        self.released = false;
        // Its store is not rebuilding (a handshake runs only then): no base to resume.
        self.kept_base = None;
        self.resume = None;
    }

    /// Its log diverged after `keep`: it is asked to cut there, and counts only through it.
    pub(super) fn begin_cut(&mut self, keep: Lsn) {
        self.truncating = Some(keep);
        self.durable = keep.min(self.durable);
    }

    /// The answer to the cut arrived: returns what it was asked to keep.
    pub(super) fn cut_answered(&mut self) -> Option<Lsn> {
        self.truncating.take()
    }

    /// The cut succeeded: a second divergence in this session goes to a rebuild.
    pub(super) fn cut_done(&mut self) {
        self.truncated_this_session = true;
    }

    /// Catch-up starts after its durable LSN.
    pub(super) fn begin_catch_up(&mut self) {
        self.catch_up_next = self.durable.next();
    }

    /// Retained entries through `last` were shipped; the next read starts after them.
    ///
    /// Invariant (*a catch-up never ships past our head*): entries the core has not seen
    /// appended come through live shipping, so a catch-up and live shipping never both send
    /// one entry, and the replica is never sent one we could still lose. `head` is ours.
    pub(super) fn shipped_through(&mut self, last: Lsn, head: Lsn) {
        assert!(
            last <= head,
            "a catch-up never ships past our head: {last} > {head}"
        );
        self.catch_up_next = last.next();
    }

    /// Entries through `last` went out to it on this session.
    pub(super) fn sent_through(&mut self, last: Lsn) {
        self.shipped = self.shipped.max(last);
    }

    /// Only a rebuild brings it back: what it had is worth nothing to us any more.
    pub(super) fn release_to_rebuild(&mut self) {
        self.released = true;
        self.has_progress = false;
        self.held_from = None;
        self.rebuild = None;
    }

    /// A rebuild begins on this session (only one per session). Returns the base it asks to
    /// resume, if the handshake vouched for a cursor.
    pub(super) fn begin_rebuild(&mut self, now: Millis) -> Option<Lsn> {
        self.rebuilt_this_session = true;
        let resume = self.resume.as_ref().map(|c| (c.base, c.through));
        self.rebuild = Some(RebuildProgress {
            started: now,
            resumed_from: resume.map(|(_, at)| at),
            ..RebuildProgress::default()
        });
        self.cost.get_or_insert((now, RebuildReport::default()));
        resume.map(|(base, _)| base)
    }

    /// The cursor the next rebuild resumes from; its base's WAL is held from now on.
    pub(super) fn resume_from(&mut self, cursor: RebuildCursor) {
        self.kept_base = Some(cursor.base);
        self.resume = Some(cursor);
    }

    /// The resume asked for did not happen (or the interrupted rebuild starts over).
    pub(super) fn restart(&mut self) {
        self.resume = None;
        if let Some(r) = &mut self.rebuild {
            r.resumed_from = None;
        }
        if let Some((_, c)) = &mut self.cost {
            c.restarts += 1;
        }
    }

    /// The cursor a resume was asked for, once (the base is chosen now).
    pub(super) fn take_resume(&mut self) -> Option<RebuildCursor> {
        self.resume.take()
    }

    /// The resume goes ahead.
    pub(super) fn resumed(&mut self) {
        if let Some((_, c)) = &mut self.cost {
            c.resumes += 1;
        }
    }

    pub(super) fn kept_base(&self) -> Option<Lsn> {
        self.kept_base
    }

    /// The WAL held for a resume is given up (retention): the rebuild, running or not, can
    /// only start over after its next interruption.
    pub(super) fn forget_base(&mut self) {
        self.kept_base = None;
    }

    pub(super) fn last_rebuild(&self) -> Option<&RebuildReport> {
        self.last_rebuild.as_ref()
    }

    /// The rebuild's base is chosen: the replica is reset to it, and the WAL after it is
    /// streamed as for a catch-up.
    pub(super) fn rebuild_from(&mut self, base: Lsn) {
        if let Some(r) = &mut self.rebuild {
            r.base = Some(base);
        }
        self.kept_base = Some(base);
        self.durable = base;
        self.shipped = self.shipped.max(base);
        self.has_progress = true;
        self.catch_up_next = base.next();
    }

    /// Returns the data bytes sent since the last report.
    pub(super) fn base_progress(&mut self, done: u64, total: u64, sent: u64) -> u64 {
        let Some(r) = &mut self.rebuild else {
            return 0;
        };
        r.bytes_done = done;
        r.bytes_total = total;
        let new = sent.saturating_sub(r.sent_bytes);
        r.sent_bytes = r.sent_bytes.max(sent);
        if let Some((_, c)) = &mut self.cost {
            c.sent_bytes += new;
        }
        new
    }

    pub(super) fn base_sent(&mut self) {
        if let Some(r) = &mut self.rebuild {
            r.base_sent = true;
            r.bytes_done = r.bytes_total;
        }
    }

    /// The rebuild's WAL line reached our head.
    pub(super) fn rebuild_goes_live(&mut self) {
        if let Some(r) = &mut self.rebuild {
            r.live = true;
        }
    }

    /// Both lines of the rebuild are done: it is asked to finish through `head`, once.
    /// Returns whether it was asked now.
    pub(super) fn finish_rebuild(&mut self, head: Lsn) -> bool {
        let Some(r) = &mut self.rebuild else {
            return false;
        };
        if !(r.base_sent && r.live) || r.finishing.is_some() {
            return false;
        }
        r.finishing = Some(head);
        true
    }

    /// Its rebuild is accepted, durable through `durable`: it counts again.
    pub(super) fn rebuilt(&mut self, durable: Lsn, now: Millis) {
        self.durable = durable.min(self.shipped);
        self.rebuild = None;
        self.released = false;
        self.kept_base = None;
        self.resume = None;
        self.last_rebuild = self.cost.take().map(|(began, mut c)| {
            c.took = now.saturating_sub(began);
            c
        });
    }

    /// It was asked to report durability through `target`.
    pub(super) fn asked_for(&mut self, target: Lsn, now: Millis) {
        self.asked = target;
        self.unanswered.push_back((target, now));
        self.sent_asks.push_back(now);
        self.last_ask = now;
    }

    /// It reported `durable`: asks it covers are answered, and it is healthy enough to be
    /// redialled quickly again.
    pub(super) fn acked(&mut self, durable: Lsn, backoff_min: Millis) {
        if let Some(sent) = self.sent_asks.pop_front() {
            self.confirmed_at = Some(self.confirmed_at.map_or(sent, |t| t.max(sent)));
        }
        let durable = durable.min(self.shipped);
        if durable > self.durable {
            self.durable = durable;
            // It stored entries it had not: it has space again.
            self.out_of_space = false;
        }
        while self
            .unanswered
            .front()
            .is_some_and(|(l, _)| *l <= self.durable)
        {
            self.unanswered.pop_front();
        }
        self.backoff = backoff_min;
    }
}
