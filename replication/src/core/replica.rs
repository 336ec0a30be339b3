//! The replica's side of replication.
//!
//! A replica serves at most one primary session at a time. It accepts a primary only at an
//! epoch at least its own (persisted before it answers), and only the store that claimed an
//! epoch may use it. After that it accepts WAL and barrier frames only at exactly its current
//! epoch, and entries only in LSN order: a duplicate is ignored, a gap is refused. It reports
//! durability only after its own fsync.

use std::collections::VecDeque;

use blockrep_storage::{Epoch, Lsn, RebuildCursor, VolumeId, WalRecord};

use bytes::Bytes;

use crate::mutants::{active, Mutant};
use crate::wire::validate::{check_placement, check_range};
use crate::wire::{Body, Frame, RejectReason, ReportedRole};

/// One connection to this replica, as the driver numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// What the replica knows about its own store.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    pub volume_id: VolumeId,
    pub volume_size: u64,
    pub store_id: VolumeId,
    /// Never held an entry: may join any volume of its size.
    pub blank: bool,
    pub epoch: Epoch,
    /// The primary store that claimed `epoch`.
    pub epoch_owner: VolumeId,
    /// Newest entry in the store (appended; durable once the store says so).
    pub head: Lsn,
    /// Epoch of the entry at `head`.
    pub head_epoch: Epoch,
    pub durable: Lsn,
    pub committed: Lsn,
    /// The store last served as a primary (reported to promotion probes; an old primary
    /// may rejoin as a replica, and the primary's log comparison decides how).
    pub was_primary: bool,
    /// A rebuild is in progress (or was interrupted): contents incomplete.
    pub rebuilding: bool,
    /// How far that rebuild got, durably (`Store::rebuild_cursor`).
    pub cursor: Option<RebuildCursor>,
}

#[derive(Debug)]
pub enum Event {
    Received {
        conn: ConnId,
        frame: Frame,
    },
    Closed {
        conn: ConnId,
    },
    /// The store is durable through `durable` (answer to `Sync`).
    Synced {
        conn: ConnId,
        durable: Lsn,
    },
    /// The store wrote a new rebuild cursor (`Store::save_rebuild_cursor`): its cursor now
    /// (read when the event is handled, so a rebuild begun since is not undone).
    CursorSaved {
        cursor: Option<RebuildCursor>,
    },
    /// The rebuild finished (answer to `FinishRebuild`), durable through `durable`.
    RebuildFinished {
        conn: ConnId,
        durable: Lsn,
    },
    /// The store refused an entry (`Append`) or base data (`ApplyBase`) handed to it:
    /// nothing of it, nor of what followed it in the same batch, was stored, and its log
    /// still ends at `head` (of `head_epoch`). `no_space`: for lack of space, which passes
    /// once space is freed.
    StoreRefused {
        head: Lsn,
        head_epoch: Epoch,
        no_space: bool,
        message: String,
    },
    /// The answer to `Truncate`: the store's log now ends at `head` (of `head_epoch`), or
    /// the store refused the cut and says why.
    Truncated {
        conn: ConnId,
        head: Lsn,
        head_epoch: Epoch,
        refusal: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send {
        conn: ConnId,
        frame: Frame,
    },
    Close {
        conn: ConnId,
        reason: String,
    },
    /// Make the blank store part of `volume_id` (before answering the primary).
    AdoptVolume {
        volume_id: VolumeId,
    },
    /// Persist `epoch`, claimed by `owner` (before answering the primary).
    AdoptEpoch {
        epoch: Epoch,
        owner: VolumeId,
    },
    /// Append this entry to the store (in order; the driver performs appends one by one).
    Append {
        record: WalRecord,
    },
    /// Answer with `Synced` once the store is durable through `lsn`.
    Sync {
        conn: ConnId,
        lsn: Lsn,
    },
    /// Persist the committed LSN, gate checkpoints at it, and keep the WAL after it while
    /// the WAL has room (`Store::keep_wal_after`): promoted, this store then still holds
    /// every entry an old primary rejoining with the committed prefix may lack.
    SetCommitted {
        lsn: Lsn,
    },
    /// Reset the store to the primary's base (persisted as rebuilding); with `resume`, keep
    /// the base below the store's cursor at that offset.
    BeginRebuild {
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        resume: Option<u64>,
    },
    /// Apply base image contents (`None`: a hole), never over blocks the WAL has written;
    /// they reflect no entry after `reflects`.
    ApplyBase {
        offset: u64,
        length: u64,
        reflects: Lsn,
        data: Option<bytes::Bytes>,
    },
    /// Once durable through `target`, make the base durable and clear the rebuilding mark;
    /// answer with `RebuildFinished`.
    FinishRebuild {
        conn: ConnId,
        target: Lsn,
    },
    /// Discard every entry after `keep` (the store refuses if its data file may hold one);
    /// answer with `Truncated`.
    Truncate {
        conn: ConnId,
        keep: Lsn,
    },
}

pub struct ReplicaCore {
    s: ReplicaState,
    active: Option<ConnId>,
    /// The active session's hello waits for the store to be durable through its head.
    greeting: Option<ConnId>,
    /// A `Truncate` handed to the store and not yet answered (`Truncated`).
    cutting: bool,
    /// Frames that arrived while `cutting`, in order, to be handled once the cut is answered.
    parked: VecDeque<(ConnId, Frame)>,
    /// An fsync that finished while `cutting`: answered once the cut is, from what is left.
    synced_during_cut: Option<(ConnId, Lsn)>,
    out: Vec<Action>,
}

/// How many frames may wait for a cut's answer. An honest primary sends nothing between
/// `Truncate` and its answer, and a new primary's hello is one frame; more is a peer that
/// does not wait, refused before it can make the replica hold its frames without bound.
const MAX_PARKED: usize = 64;

impl ReplicaCore {
    pub fn new(state: ReplicaState) -> ReplicaCore {
        ReplicaCore {
            s: state,
            active: None,
            greeting: None,
            cutting: false,
            parked: VecDeque::new(),
            synced_during_cut: None,
            out: Vec::new(),
        }
    }

    pub fn state(&self) -> &ReplicaState {
        &self.s
    }

    pub fn active(&self) -> Option<ConnId> {
        self.active
    }

    pub fn step(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Received { conn, frame } => self.received(conn, frame),
            Event::Closed { conn } => self.closed(conn),
            Event::RebuildFinished { conn, durable } => self.rebuild_finished(conn, durable),
            Event::CursorSaved { cursor } => {
                if self.s.rebuilding {
                    self.s.cursor = cursor;
                }
            }
            Event::Truncated {
                conn,
                head,
                head_epoch,
                refusal,
            } => self.store_truncated(conn, head, head_epoch, refusal),
            Event::Synced { conn, durable } => self.synced(conn, durable),
            Event::StoreRefused {
                head,
                head_epoch,
                no_space,
                message,
            } => self.store_refused(head, head_epoch, no_space, message),
        }
        std::mem::take(&mut self.out)
    }

    fn closed(&mut self, conn: ConnId) {
        self.parked.retain(|(c, _)| *c != conn);
        if self.active == Some(conn) {
            self.active = None;
            self.greeting = None;
        }
    }

    fn rebuild_finished(&mut self, conn: ConnId, durable: Lsn) {
        self.s.rebuilding = false;
        self.s.cursor = None;
        if durable > self.s.durable {
            self.s.durable = durable;
        }
        if self.active == Some(conn) {
            self.send(conn, Body::RebuildDone { durable });
        }
    }

    fn store_truncated(
        &mut self,
        conn: ConnId,
        head: Lsn,
        head_epoch: Epoch,
        refusal: Option<String>,
    ) {
        self.cutting = false;
        if refusal.is_none() {
            self.s.head = head;
            self.s.head_epoch = head_epoch;
            self.s.durable = self.s.durable.min(head);
        }
        if self.active == Some(conn) {
            self.answer_cut(conn, refusal.unwrap_or_default());
        }
        if let Some((synced, durable)) = self.synced_during_cut.take() {
            self.synced(synced, durable.min(self.s.head));
        }
        // What arrived meanwhile is handled on the log as it is now, in order; a frame
        // among them may start another cut, which parks the rest again.
        while !self.cutting {
            let Some((conn, frame)) = self.parked.pop_front() else {
                break;
            };
            self.received(conn, frame);
        }
    }

    /// Invariant (*a refused append leaves the core on the store's head*): the core moves
    /// its head as it hands entries to the store; when the store refuses one, the head goes
    /// back to where the store's log ends and the session that sent it ends with a typed
    /// reason (`NoSpace`, or `StorageFailed`), so the next hello reports only what the store
    /// holds and the primary ships the rest again. The driver logs the cause, once; the core
    /// does not log each session it refuses for it.
    fn store_refused(&mut self, head: Lsn, head_epoch: Epoch, no_space: bool, message: String) {
        self.s.head = head;
        self.s.head_epoch = head_epoch;
        self.s.durable = self.s.durable.min(head);
        let Some(conn) = self.active.take() else {
            return;
        };
        self.greeting = None;
        let reason = if no_space {
            RejectReason::NoSpace
        } else {
            RejectReason::StorageFailed
        };
        self.send(
            conn,
            Body::Reject {
                reason,
                message: message.clone(),
            },
        );
        self.out.push(Action::Close {
            conn,
            reason: message,
        });
    }

    fn synced(&mut self, conn: ConnId, durable: Lsn) {
        // What the store was durable through may be cut away under it: nothing is reported
        // (no hello, no barrier ack) until the cut is answered.
        if self.cutting {
            self.synced_during_cut = Some((conn, durable));
            return;
        }
        if durable > self.s.durable {
            self.s.durable = durable;
        }
        if self.active != Some(conn) {
            return;
        }
        if self.greeting == Some(conn) {
            // The log is durable through its head: report exactly that.
            self.greeting = None;
            self.send(
                conn,
                Body::HelloOk {
                    replica_store: self.s.store_id,
                    durable: self.s.head,
                    durable_epoch: self.s.head_epoch,
                    committed: self.s.committed,
                    rebuilding: self.s.rebuilding,
                    cursor: self.s.cursor.clone().filter(|_| self.s.rebuilding),
                },
            );
        } else {
            self.ack_barrier(conn, self.s.durable);
        }
    }

    /// Answers a barrier with `durable`.
    ///
    /// Invariant (*an acknowledged barrier target never exceeds the local durable LSN*): a
    /// replica acknowledges only what its own store reported durable after an fsync, never
    /// what it merely received or what the barrier asked for; the primary counts the ack
    /// toward commits as a durable copy.
    fn ack_barrier(&mut self, conn: ConnId, durable: Lsn) {
        assert!(
            durable <= self.s.durable,
            "an acknowledged barrier target never exceeds the local durable LSN: {durable} > {}",
            self.s.durable
        );
        self.send(conn, Body::BarrierAck { durable });
    }

    fn send(&mut self, conn: ConnId, body: Body) {
        self.out.push(Action::Send {
            conn,
            frame: Frame {
                epoch: self.s.epoch,
                body,
            },
        });
    }

    /// Answers a `Truncate`: where the log ends now, and why it was not cut (empty if it was
    /// or needed no cut).
    fn answer_cut(&mut self, conn: ConnId, refusal: String) {
        let body = Body::Truncated {
            durable: self.s.head,
            durable_epoch: self.s.head_epoch,
            refusal,
        };
        self.send(conn, body);
    }

    fn reject(&mut self, conn: ConnId, reason: RejectReason, message: String) {
        tracing::info!(conn = conn.0, ?reason, "refusing: {message}");
        self.send(
            conn,
            Body::Reject {
                reason,
                message: message.clone(),
            },
        );
        self.out.push(Action::Close {
            conn,
            reason: message,
        });
        if self.active == Some(conn) {
            self.active = None;
            self.greeting = None;
        }
    }

    /// Each frame kind goes to its own handler. All kinds but `Probe` and `Hello` need the
    /// active session at our epoch: the `current` guard refuses the frame itself when it
    /// fails (once: a guard runs only for the arm whose pattern matched), and the kind then
    /// falls through to the empty arm.
    ///
    /// Invariant (*a cut answered after a rebuild began leaves the core on the rebuilt
    /// head*): while the store runs a cut, every frame but `Probe` (which changes no log) is
    /// parked and handled after the cut's answer, in order. Handled at once, it would be
    /// checked against a head the store no longer has (an entry after the old head appended
    /// on the cut log, a hello answered with it), and a log reset it started (a rebuild)
    /// would be undone by the late answer.
    fn received(&mut self, conn: ConnId, frame: Frame) {
        if self.cutting && !matches!(frame.body, Body::Probe { .. }) {
            if self.parked.len() >= MAX_PARKED {
                let msg = format!("more than {MAX_PARKED} frames sent while a cut is outstanding");
                self.parked.retain(|(c, _)| *c != conn);
                self.reject(conn, RejectReason::Protocol, msg);
                return;
            }
            self.parked.push_back((conn, frame));
            return;
        }
        let epoch = frame.epoch;
        match frame.body {
            Body::Probe { fence } => self.probe(conn, epoch, fence),
            Body::Hello {
                volume_id,
                volume_size,
                primary_store,
                committed,
                ..
            } => self.hello(
                conn,
                epoch,
                volume_id,
                volume_size,
                primary_store,
                committed,
            ),
            Body::Entries { committed, records } if self.current(conn, epoch) => {
                self.entries(conn, committed, records)
            }
            Body::RebuildStart {
                base,
                history,
                resume,
            } if self.current(conn, epoch) => self.rebuild_start(conn, base, history, resume),
            Body::BaseChunk {
                offset,
                length,
                reflects,
                data,
            } if self.current(conn, epoch) => {
                self.base_chunk(conn, (offset, length, reflects), data)
            }
            Body::RebuildFinish { target } if self.current(conn, epoch) => {
                self.out.push(Action::FinishRebuild {
                    conn,
                    target: target.min(self.s.head),
                });
            }
            Body::Truncate { keep } if self.current(conn, epoch) => self.truncate(conn, keep),
            Body::Barrier { lsn, committed } if self.current(conn, epoch) => {
                self.barrier(conn, lsn, committed)
            }
            // Refused by `current` already.
            Body::Entries { .. }
            | Body::RebuildStart { .. }
            | Body::BaseChunk { .. }
            | Body::RebuildFinish { .. }
            | Body::Truncate { .. }
            | Body::Barrier { .. } => {}
            other => {
                let msg = format!("a replica does not expect a {} frame", other.name());
                self.reject(conn, RejectReason::Protocol, msg);
            }
        }
    }

    fn probe(&mut self, conn: ConnId, epoch: Epoch, fence: Option<VolumeId>) {
        if let Some(owner) = fence {
            if !self.fence(conn, epoch, owner) {
                return;
            }
        }
        let body = Body::ProbeReply {
            volume_id: self.s.volume_id,
            store_id: self.s.store_id,
            role: if self.s.was_primary {
                ReportedRole::Primary
            } else {
                ReportedRole::Replica
            },
            head: self.s.head,
            head_epoch: self.s.head_epoch,
            committed: self.s.committed,
            needs_rebuild: self.s.rebuilding,
        };
        self.send(conn, body);
    }

    /// Entries in LSN order: a duplicate is skipped, a gap refused.
    ///
    /// Invariant (*a replica stores only entries it validated*): every entry of the frame is
    /// placed ([`check_placement`]: aligned, inside the volume, no later epoch than ours;
    /// the decoder checked its payload) and found in order before the first is appended, so
    /// a frame holding one bad entry, or a gap after good ones, ends the session with
    /// `BadEntry` or `Gap` and leaves the store as it was.
    fn entries(&mut self, conn: ConnId, committed: Lsn, records: Vec<WalRecord>) {
        let (size, epoch) = (self.s.volume_size, self.s.epoch);
        if let Some((lsn, e)) = records
            .iter()
            .find_map(|r| check_placement(r, size, epoch).err().map(|e| (r.lsn, e)))
        {
            let msg = format!("entry {lsn} refused: {e}");
            self.reject(conn, RejectReason::BadEntry, msg);
            return;
        }
        let mut head = self.s.head;
        let mut fresh = Vec::with_capacity(records.len());
        for record in records {
            if record.lsn <= head {
                continue; // a duplicate (a resent entry): already have it
            }
            if record.lsn != head.next() && !active(Mutant::AcceptLsnGap) {
                let msg = format!(
                    "entry {} does not follow {head}; refusing the gap",
                    record.lsn
                );
                self.reject(conn, RejectReason::Gap, msg);
                return;
            }
            head = record.lsn;
            fresh.push(record);
        }
        for record in fresh {
            self.s.head = record.lsn;
            self.s.head_epoch = record.epoch;
            self.out.push(Action::Append { record });
        }
        self.learn_committed(committed);
    }

    fn rebuild_start(
        &mut self,
        conn: ConnId,
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        resume: Option<u64>,
    ) {
        if base.checked_next().is_none() || history.iter().any(|(e, _)| *e > self.s.epoch) {
            let msg = format!("a rebuild base at {base} (history {history:?}) cannot be followed");
            self.reject(conn, RejectReason::BadEntry, msg);
            return;
        }
        if let Some(at) = resume {
            // A resume keeps base we hold; it must be exactly the base our cursor names.
            let ours = self.s.cursor.as_ref().filter(|_| self.s.rebuilding);
            if !ours.is_some_and(|c| c.base == base && c.history == history && c.through == at) {
                let msg = format!(
                    "asked to resume a rebuild from base {base} at {at}; our cursor is {ours:?}"
                );
                self.reject(conn, RejectReason::Protocol, msg);
                return;
            }
        } else {
            self.s.cursor = None;
        }
        self.s.rebuilding = true;
        self.s.head = base;
        self.s.head_epoch = blockrep_storage::epoch_at(&history, base).unwrap_or(Epoch(0));
        self.s.durable = base;
        self.out.push(Action::BeginRebuild {
            base,
            history,
            resume,
        });
    }

    fn base_chunk(
        &mut self,
        conn: ConnId,
        (offset, length, reflects): (u64, u64, Lsn),
        data: Option<Bytes>,
    ) {
        if !self.s.rebuilding {
            self.reject(
                conn,
                RejectReason::Protocol,
                "base data outside a rebuild".into(),
            );
            return;
        }
        let size = self.s.volume_size;
        // The decoder made sure the data (if any) is exactly `length` bytes.
        if let Err(e) = check_range(offset, length, size) {
            let msg = format!("base chunk refused: {e}");
            self.reject(conn, RejectReason::BadEntry, msg);
            return;
        }
        self.out.push(Action::ApplyBase {
            offset,
            length,
            reflects,
            data,
        });
    }

    fn truncate(&mut self, conn: ConnId, keep: Lsn) {
        if keep >= self.s.head {
            self.answer_cut(conn, String::new());
            return;
        }
        if keep < self.s.committed {
            // The primary says entries we know committed are not in its log.
            let why = format!("entries through {} are committed", self.s.committed);
            self.answer_cut(conn, why);
            return;
        }
        if active(Mutant::AckCutWithoutCutting) {
            let body = Body::Truncated {
                durable: keep,
                durable_epoch: self.s.head_epoch,
                refusal: String::new(),
            };
            self.send(conn, body);
            return;
        }
        self.cutting = true;
        self.out.push(Action::Truncate { conn, keep });
    }

    fn barrier(&mut self, conn: ConnId, lsn: Lsn, committed: Lsn) {
        self.learn_committed(committed);
        if active(Mutant::ReportReceivedAsDurable) {
            let head = self.s.head;
            self.send(conn, Body::BarrierAck { durable: head });
            return;
        }
        // Durability is reported only after the store's own fsync (never "received").
        self.out.push(Action::Sync {
            conn,
            lsn: lsn.min(self.s.head),
        });
    }

    /// Whether `conn` is the active session at our epoch; refuses it otherwise.
    fn current(&mut self, conn: ConnId, epoch: Epoch) -> bool {
        if epoch != self.s.epoch && !active(Mutant::SkipReplicaEpochCheck) {
            let msg = format!(
                "frame at epoch {epoch}, this replica is at {}",
                self.s.epoch
            );
            self.reject(conn, RejectReason::StaleEpoch, msg);
            return false;
        }
        if self.active != Some(conn) || self.greeting == Some(conn) {
            self.reject(
                conn,
                RejectReason::Protocol,
                "no session: send hello first".into(),
            );
            return false;
        }
        true
    }

    fn learn_committed(&mut self, committed: Lsn) {
        if committed > self.s.committed {
            self.s.committed = committed;
            self.out.push(Action::SetCommitted { lsn: committed });
        }
    }
}

mod claims;
#[cfg(test)]
mod tests;
