//! The state shared by writers, readers, the WAL writer and the flusher, behind one mutex.
//!
//! The mutex is held only for in-memory work: assigning an LSN and a WAL position, updating
//! the dirty map, queueing the record. No I/O ever happens under it.
//!
//! `Core` is grouped by concern: the log's positions, the epochs, the dirty maps, the WAL
//! writer's queue, the durability waiters, replication's hooks, a rebuild, and the lifecycle
//! flags. Each group changes through its own methods, so what a rebuild or a cut of the log
//! resets is reset in one place. The invariants are documented on the group that keeps them
//! and asserted (in debug builds: this is the hot path) where it changes.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::wal_direct::WAL_SLACK;
use super::writer_queue::WriterQueue;
use crate::dirty::{BlockState, DirtyMap, Piece, RangeSet};
use crate::error::{Result, StorageError};
use crate::types::{Epoch, Lsn, WalPos};
use crate::wal::record::{RecordKind, WalRecord, HEADER_LEN};
use crate::wal::WalLayout;

/// A rebuild in progress on this (replica) store.
pub(crate) struct Rebuild {
    /// The primary's checkpoint the base image was taken at; entries after it arrive as WAL.
    pub base: Lsn,
    /// The log generation it began in: a cursor written for an earlier attempt at the same
    /// base is never recorded for this one.
    pub generation: u16,
    /// Blocks written by WAL entries since the rebuild began: base blocks never overwrite
    /// them ("WAL wins over base").
    pub touched: RangeSet,
    /// Base chunks applied since the last cursor, in order: where each ends and the newest
    /// entry the base up to there may reflect (the highest the primary declared so far).
    pub chunks: std::collections::VecDeque<(u64, Lsn)>,
    /// What the base below the first of `chunks` may reflect (a resumed cursor's proof).
    pub floor: Lsn,
    /// Where the persisted cursor stands, and when it was written (or the rebuild began).
    pub saved_through: u64,
    pub saved_at: std::time::Instant,
    /// A cursor is being written (one at a time).
    pub saving: bool,
}

impl Rebuild {
    /// A rebuild from a base taken at `base`, with nothing written over it yet.
    pub fn new(base: Lsn, generation: u16) -> Self {
        Rebuild::resumed(base, generation, 0, base)
    }

    /// A rebuild from `base` whose first `through` bytes are durable already and reflect no
    /// entry after `floor`.
    pub fn resumed(base: Lsn, generation: u16, through: u64, floor: Lsn) -> Self {
        Rebuild {
            base,
            generation,
            touched: Default::default(),
            chunks: Default::default(),
            floor,
            saved_through: through,
            saved_at: std::time::Instant::now(),
            saving: false,
        }
    }

    /// Bytes of base received in order from offset 0.
    pub fn received_through(&self) -> u64 {
        self.chunks
            .back()
            .map_or(self.saved_through, |(end, _)| *end)
    }

    /// A base chunk ending at `end`, which may reflect entries through `reflects`.
    pub fn received(&mut self, end: u64, reflects: Lsn) {
        let prior = self.chunks.back().map_or(self.floor, |(_, r)| *r);
        self.chunks.push_back((end, prior.max(reflects)));
    }
}

pub(crate) struct DurableWaiter {
    pub target: Lsn,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Where the log is: its LSNs, and its positions in the ring.
///
/// Invariant (*durable never passes the head*): `written` and `durable` are at most the
/// newest entry's LSN. (A checkpoint makes entries durable through the data file, but only
/// once the WAL writer has written their records: see `wait_for_records_through`.)
///
/// Invariant (*the checkpoint is never ahead of durable*): `checkpoint_lsn <= durable`; what
/// the data file holds is durable.
///
/// Invariant (*the tail never passes the head*): `tail <= head` in the ring and `tail_lsn <=
/// next_lsn`, and `index` holds the entries from the tail on in LSN order, none missing.
pub(crate) struct LogPositions {
    pub next_lsn: Lsn,
    /// Highest LSN known committed under the volume's commit mode (set by replication);
    /// stamped into every record header so it survives a crash.
    pub committed: Lsn,
    /// Every entry in the WAL, oldest first: where to find it for a replica's catch-up.
    pub index: VecDeque<(Lsn, WalPos)>,
    /// LSN of the entry at `tail`.
    pub tail_lsn: Lsn,
    /// The log's incarnation, stamped into every record header.
    pub generation: u16,
    /// Where the next record goes.
    pub head: WalPos,
    /// The oldest position still needed (the entry after the checkpoint).
    pub tail: WalPos,
    pub checkpoint_lsn: Lsn,
    /// Highest LSN written to the WAL file (maybe not synced).
    pub written: Lsn,
    /// Highest LSN fsynced in the WAL (or made durable by a checkpoint).
    pub durable: Lsn,
}

impl LogPositions {
    /// The newest entry's LSN (`Lsn(0)` for an empty store).
    pub fn last(&self) -> Lsn {
        self.next_lsn.prev()
    }

    pub fn wal_used(&self) -> u64 {
        self.head.0 - self.tail.0
    }

    /// The invariants above, checked where the marks move (debug builds only).
    fn check(&self) {
        debug_assert!(
            self.written <= self.last() && self.durable <= self.last(),
            "durable never passes the head: written {}, durable {}, head {}",
            self.written,
            self.durable,
            self.last()
        );
        debug_assert!(
            self.checkpoint_lsn <= self.durable,
            "the checkpoint is never ahead of durable: checkpoint {}, durable {}",
            self.checkpoint_lsn,
            self.durable
        );
        debug_assert!(
            self.tail.0 <= self.head.0 && self.tail_lsn <= self.next_lsn,
            "the tail never passes the head: tail {:?} ({}), head {:?} ({})",
            self.tail,
            self.tail_lsn,
            self.head,
            self.next_lsn
        );
    }

    /// Gives entry `lsn` (`size` bytes, after `pad` bytes of wrap padding) its place at the
    /// head. Returns where it goes.
    fn append(&mut self, lsn: Lsn, pad: u64, size: u64) -> WalPos {
        debug_assert_eq!(lsn, self.next_lsn);
        debug_assert!(
            self.index.back().is_none_or(|(l, _)| l.next() == lsn),
            "the tail never passes the head: the index skips to {lsn}"
        );
        let at = WalPos(self.head.0 + pad);
        self.index.push_back((lsn, at));
        self.head = WalPos(at.0 + size);
        self.next_lsn = lsn.next();
        at
    }

    /// The WAL file holds the entries through `lsn`.
    pub fn mark_written(&mut self, lsn: Lsn) {
        self.written = self.written.max(lsn);
        self.check();
    }

    /// Everything written so far is on stable storage. Returns the durable LSN.
    pub fn mark_synced(&mut self) -> Lsn {
        self.durable = self.durable.max(self.written);
        self.check();
        self.durable
    }

    /// A checkpoint through `target` is in the superblock: the WAL before `tail` is
    /// released, and everything through `target` is durable. Returns whether `durable`
    /// moved.
    pub fn mark_checkpoint(&mut self, target: Lsn, tail: WalPos, tail_lsn: Lsn) -> bool {
        self.tail = tail;
        self.tail_lsn = tail_lsn;
        while self.index.front().is_some_and(|(lsn, _)| *lsn < tail_lsn) {
            self.index.pop_front();
        }
        self.checkpoint_lsn = target;
        let moved = target > self.durable;
        if moved {
            self.durable = target;
        }
        self.check();
        moved
    }

    /// The log starts over, empty, after `base` (a rebuild), in generation `generation`.
    fn restart_after(&mut self, base: Lsn, generation: u16) {
        self.generation = generation;
        self.index.clear();
        self.tail = self.head;
        self.tail_lsn = base.next();
        self.checkpoint_lsn = base;
        self.rewind_to(base);
    }

    /// The log ends at `keep` (a cut), its next record goes at `head`, in generation
    /// `generation`.
    fn cut_after(&mut self, keep: Lsn, head: WalPos, generation: u16) {
        self.generation = generation;
        while self.index.back().is_some_and(|(lsn, _)| *lsn > keep) {
            self.index.pop_back();
        }
        self.head = head;
        self.rewind_to(keep);
    }

    /// `last` is the newest entry, written and durable.
    fn rewind_to(&mut self, last: Lsn) {
        self.next_lsn = last.next();
        self.written = last;
        self.durable = last;
        self.check();
    }
}

/// The epochs of the log.
pub(crate) struct Epochs {
    /// The epoch new entries are written at (a primary's own; a replica's adopted one).
    pub epoch: Epoch,
    /// Epoch of the newest entry; wrap markers carry it so replay's epoch order holds even
    /// when a replica receives entries of an older epoch.
    pub last: Epoch,
    /// Where each epoch begins in the log (see `Superblock::epoch_history`).
    pub history: Vec<(Epoch, Lsn)>,
}

impl Epochs {
    /// Entry `lsn` was written at `epoch`.
    fn note(&mut self, epoch: Epoch, lsn: Lsn) {
        if self.history.last().is_none_or(|(e, _)| *e != epoch) {
            self.history.push((epoch, lsn));
        }
        self.last = epoch;
    }

    fn reset(&mut self, history: Vec<(Epoch, Lsn)>, last: Epoch) {
        self.history = history;
        self.last = last;
    }
}

/// What the WAL holds that the data file does not, as block maps.
pub(crate) struct DirtyMaps {
    /// Writes since the flusher last froze the map.
    pub active: DirtyMap,
    /// The map the flusher is writing to the data file right now.
    pub flushing: Option<Arc<DirtyMap>>,
    /// Bumped after every checkpoint; lets read-modify-write detect that a block it read from
    /// the data file may have changed underneath it.
    pub checkpoint_gen: u64,
}

impl DirtyMaps {
    /// The newest state of one block, if the WAL holds it.
    pub fn lookup_block(&self, block: u64) -> Option<BlockState> {
        self.resolve(block, block + 1)
            .into_iter()
            .next()
            .and_then(|p| p.state)
    }

    /// Where every block of `[start, end)` is.
    pub fn resolve(&self, start: u64, end: u64) -> Vec<Piece> {
        match self.flushing.as_deref() {
            Some(f) => crate::dirty::resolve(&[&self.active, f], start, end),
            None => crate::dirty::resolve(&[&self.active], start, end),
        }
    }

    /// Data bytes held in memory, in both maps.
    pub fn data_bytes(&self) -> u64 {
        self.active.data_bytes() + self.flushing.as_ref().map_or(0, |f| f.data_bytes())
    }

    /// Hands the active map to the flusher; new writes go to a fresh one.
    pub fn freeze(&mut self) -> Arc<DirtyMap> {
        let frozen = Arc::new(std::mem::take(&mut self.active));
        self.flushing = Some(frozen.clone());
        frozen
    }

    /// The checkpoint that froze the map wrote none of it: its entries go back under the
    /// writes made since, as if it had never frozen.
    pub fn thaw(&mut self) {
        let Some(frozen) = self.flushing.take() else {
            return;
        };
        let mut older = Arc::try_unwrap(frozen).unwrap_or_else(|shared| (*shared).clone());
        older.overlay(std::mem::take(&mut self.active));
        self.active = older;
    }

    /// The frozen map is in the data file, which changed under anything read from it before.
    pub fn flushed(&mut self) {
        self.flushing = None;
        self.checkpoint_gen += 1;
    }

    /// The log was reset or cut: `active` is all the WAL holds now.
    fn reset(&mut self, active: DirtyMap) {
        self.active = active;
        self.flushed();
    }
}

/// Who waits for durability, and how far the writer must sync for them.
pub(crate) struct Waiters {
    /// Highest LSN somebody is waiting to see durable.
    pub sync_target: Lsn,
    pub list: Vec<DurableWaiter>,
}

impl Waiters {
    pub fn add(&mut self, target: Lsn, done: oneshot::Sender<Result<(), String>>) {
        self.list.push(DurableWaiter { target, done });
        if self.sync_target < target {
            self.sync_target = target;
        }
    }

    /// Completes every waiter whose target is durable now.
    pub fn complete(&mut self, durable: Lsn) {
        let mut i = 0;
        while i < self.list.len() {
            if self.list[i].target <= durable {
                let w = self.list.swap_remove(i);
                let _ = w.done.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    fn fail_all(&mut self, msg: &str) {
        for w in self.list.drain(..) {
            let _ = w.done.send(Err(msg.to_string()));
        }
    }

    /// The log now ends at `last`: nothing past it is left to sync.
    fn lower_target_to(&mut self, last: Lsn) {
        self.sync_target = self.sync_target.min(last);
    }
}

/// What replication hooks into the log.
pub(crate) struct Replication {
    /// Receives a copy of every appended entry, in LSN order (the replication shipper).
    pub tap: Option<mpsc::UnboundedSender<WalRecord>>,
    /// The oldest entry a lagging replica still needs; checkpoints keep the WAL from here.
    pub retention_pin: Option<Lsn>,
    /// `retention_pin` is still the one `OpenOptions::keep_retained_wal` set, not one a
    /// caller chose: it gives way to a write that finds the WAL full (nobody has said yet
    /// that the WAL is needed, and a write must not wait for somebody who may never come).
    pub pin_from_open: bool,
    /// `retention_pin` is a replica's hold on the WAL after its committed LSN
    /// (`Store::keep_wal_after`): it too gives way to a write that finds the WAL full.
    pub pin_yields: bool,
    /// Checkpoints wait for this LSN to reach their target before they write the data file
    /// (see `Store::set_checkpoint_gate`); `None`: they never wait.
    pub gate: Option<Lsn>,
}

impl Replication {
    fn ship(&mut self, record: &WalRecord) {
        if let Some(tap) = &self.tap {
            // Sent under the lock, so the shipper sees entries in LSN order.
            if tap.send(record.clone()).is_err() {
                self.tap = None;
            }
        }
    }

    /// A caller sets the pin. Returns whether it changed.
    pub fn set_pin(&mut self, pin: Option<Lsn>) -> bool {
        let changed = self.retention_pin != pin;
        self.retention_pin = pin;
        self.pin_from_open = false;
        self.pin_yields = false;
        changed
    }

    /// A replica keeps the WAL from `lsn` on while it has room.
    pub fn set_yielding_pin(&mut self, lsn: Lsn) {
        self.retention_pin = Some(lsn);
        self.pin_from_open = false;
        self.pin_yields = true;
    }

    /// A caller needs the WAL from `lsn` on, besides whatever it is pinned for already.
    pub fn pin_from(&mut self, lsn: Lsn) {
        self.retention_pin = Some(self.retention_pin.map_or(lsn, |p| p.min(lsn)));
        self.pin_from_open = false;
        self.pin_yields = false;
    }

    /// Drops a pin nobody has confirmed since the open, or a replica's yielding one.
    /// Returns which it was, if any.
    pub fn drop_open_pin(&mut self) -> Option<YieldedPin> {
        let had = if self.pin_from_open {
            YieldedPin::FromOpen
        } else if self.pin_yields {
            YieldedPin::Replica
        } else {
            return None;
        };
        self.pin_from_open = false;
        self.pin_yields = false;
        self.retention_pin = None;
        Some(had)
    }

    /// What holds the WAL back now, if anything.
    pub fn hold(&self) -> Option<(Lsn, WalHold)> {
        let why = if self.pin_from_open {
            WalHold::KeptFromLastRun
        } else if self.pin_yields {
            WalHold::AfterCommitted
        } else {
            WalHold::LaggingReplica
        };
        self.retention_pin.map(|pin| (pin, why))
    }

    /// Whether a checkpoint through `target` keeps WAL entries from before it.
    pub fn keeps_before(&self, target: Lsn) -> bool {
        self.retention_pin.is_some_and(|p| p <= target)
    }

    /// Whether other copies may hold this store's entries: it ships them (a primary's
    /// subscriber), gates its checkpoints on them or keeps WAL for a replica.
    ///
    /// Invariant (*a replicated store's data file holds no entry its WAL could lose*): a
    /// checkpoint of such a store makes its WAL durable through its target before it
    /// writes a block. Otherwise a power loss could leave blocks of entries its log no
    /// longer has, which the replicas then cut from theirs: the copies would differ there.
    pub fn copies_elsewhere(&self) -> bool {
        self.tap.is_some() || self.gate.is_some() || self.retention_pin.is_some()
    }
}

/// Why checkpoints keep WAL entries they have written to the data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalHold {
    /// A lagging replica will read them (its catch-up); holds until it has them.
    LaggingReplica,
    /// A replica keeps what follows the committed LSN it learned, so that if it is promoted
    /// its old primary can rejoin by catch-up; gives way when the WAL is full.
    AfterCommitted,
    /// Kept from the last run until replication says what its replicas need; gives way when
    /// the WAL is full.
    KeptFromLastRun,
}

impl WalHold {
    /// Its name in `/v1/status`.
    pub fn name(self) -> &'static str {
        match self {
            WalHold::LaggingReplica => "lagging-replica",
            WalHold::AfterCommitted => "after-committed",
            WalHold::KeptFromLastRun => "kept-from-last-run",
        }
    }
}

/// Which pin gave way to a full WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum YieldedPin {
    FromOpen,
    Replica,
}

/// Failure, closing, and the requests and stops for the two threads.
pub(crate) struct Lifecycle {
    /// Set by the first I/O failure; the store then refuses writes (a failed fsync leaves the
    /// page cache in an unknown state, so retrying it could report durability falsely).
    pub failed: Option<String>,
    pub closing: bool,
    pub flush_requested: bool,
    pub writer_stop: bool,
    pub flusher_stop: bool,
}

impl Lifecycle {
    pub fn check_writable(&self) -> Result<()> {
        if let Some(msg) = &self.failed {
            return Err(StorageError::Failed(msg.clone()));
        }
        if self.closing {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// Both threads are to stop.
    pub fn stop(&mut self) {
        self.writer_stop = true;
        self.flusher_stop = true;
    }
}

/// What a cut of the log keeps: the entries through `last`, replayed (see
/// `Store::truncate_after`).
pub(crate) struct KeptLog {
    pub last: Lsn,
    /// Right after the last kept record.
    pub head: WalPos,
    /// The dirty map of the kept entries after the checkpoint.
    pub active: DirtyMap,
    pub history: Vec<(Epoch, Lsn)>,
    pub last_epoch: Epoch,
}

/// What an append that found no room waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backlog {
    /// The WAL ring is full: the flusher must free space.
    Wal,
    /// The placement queue is full: the WAL writer frees it as it places, and a checkpoint
    /// would free nothing (it would write the queued data a second time).
    Placement,
}

pub(crate) struct Core {
    pub log: LogPositions,
    pub epochs: Epochs,
    pub maps: DirtyMaps,
    pub writer: WriterQueue,
    pub waiters: Waiters,
    pub repl: Replication,
    /// Set while this store is being rebuilt from a primary's base image.
    pub rebuild: Option<Rebuild>,
    pub life: Lifecycle,
}

impl Core {
    pub fn check_writable(&self) -> Result<()> {
        self.life.check_writable()
    }

    /// Gives the next LSN to a new entry and queues it for the WAL writer, or says what it
    /// must wait for. A large write may be placed in the data file rather than logged (see
    /// `store::placement`).
    ///
    /// LSN order, WAL order and dirty-map order are the same because all three are decided
    /// here, under one lock.
    pub fn try_append(
        &mut self,
        layout: &WalLayout,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: Bytes,
        payload_crc: u32,
    ) -> std::result::Result<Lsn, Backlog> {
        let record = WalRecord {
            lsn: self.log.next_lsn,
            epoch: self.epochs.epoch,
            kind,
            offset,
            length,
            payload,
            payload_crc,
        };
        let place = kind == RecordKind::Write && self.may_place(offset, length);
        if place && !self.room_to_place(length) {
            return Err(Backlog::Placement);
        }
        self.push(layout, record, place).ok_or(Backlog::Wal)
    }

    /// Appends `record` as the next entry; its LSN must be `next_lsn` (callers check).
    /// Returns `None` when the ring has no room for it yet.
    pub fn try_push(&mut self, layout: &WalLayout, record: WalRecord) -> Option<Lsn> {
        self.push(layout, record, false)
    }

    /// Appends `record`; with `place`, the log gets its `Placed` record and the writer puts
    /// its data in the data file. The dirty map and a replication subscriber see the write
    /// with its data either way.
    fn push(&mut self, layout: &WalLayout, record: WalRecord, place: bool) -> Option<Lsn> {
        assert!(
            record.kind != RecordKind::Wrap,
            "wrap markers are not appended by callers"
        );
        let logged = place.then(|| {
            WalRecord::placed(
                record.lsn,
                record.epoch,
                record.offset,
                record.length,
                record.payload_crc,
            )
        });
        let size = logged.as_ref().unwrap_or(&record).encoded_len();
        let room = layout.room(self.log.head);
        let pad = if room < size { room } else { 0 };
        let used_after = self.log.wal_used() + pad + size;
        if used_after > layout.capacity {
            return None;
        }
        let keep_after = layout.capacity - used_after < WAL_SLACK;
        let lsn = record.lsn;
        if pad > 0 {
            let marker =
                WalRecord::new(lsn, self.epochs.last, RecordKind::Wrap, 0, 0, Bytes::new());
            self.writer
                .push(self.log.head, marker, None, HEADER_LEN as u64, false);
        }
        if let Some((first, end)) = self.maps.active.apply(&record) {
            if let Some(r) = &mut self.rebuild {
                r.touched.insert(first, end);
            }
        }
        self.repl.ship(&record);
        let at = self.log.append(lsn, pad, size);
        self.epochs.note(record.epoch, lsn);
        match logged {
            Some(placed) => {
                let bytes = size + record.length;
                self.writer
                    .push(at, placed, Some(record.payload), bytes, keep_after)
            }
            None => self.writer.push(at, record, None, size, keep_after),
        }
        Some(lsn)
    }

    /// Where the WAL may be released up to after a checkpoint at `target` whose head was
    /// `head`: everything, unless a lagging replica still needs entries from `pin` on.
    pub fn release_point(&self, target: Lsn, head: WalPos) -> (WalPos, Lsn) {
        match self.repl.retention_pin {
            Some(pin) if pin <= target => {
                let i = self.log.index.partition_point(|(lsn, _)| *lsn < pin);
                match self.log.index.get(i) {
                    Some(&(lsn, pos)) => (pos, lsn),
                    None => (head, target.next()),
                }
            }
            _ => (head, target.next()),
        }
    }

    /// The log starts over after `base` for a rebuild from a base image taken there: nothing
    /// of the old log is kept, in the ring, the queue or the maps.
    pub fn restart_for_rebuild(
        &mut self,
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        base_epoch: Epoch,
        generation: u16,
        rebuild: Rebuild,
    ) {
        self.log.restart_after(base, generation);
        self.writer.clear();
        self.rewound(base, DirtyMap::default(), history, base_epoch);
        self.rebuild = Some(rebuild);
    }

    /// The log is cut after `kept.last` (see `Store::truncate_after`); the writer's queue is
    /// empty (the caller checked).
    pub fn cut(&mut self, kept: KeptLog, generation: u16) {
        self.log.cut_after(kept.last, kept.head, generation);
        self.rewound(kept.last, kept.active, kept.history, kept.last_epoch);
    }

    /// What every reset of the log does besides its positions.
    fn rewound(
        &mut self,
        last: Lsn,
        active: DirtyMap,
        history: Vec<(Epoch, Lsn)>,
        last_epoch: Epoch,
    ) {
        self.maps.reset(active);
        self.waiters.lower_target_to(last);
        self.epochs.reset(history, last_epoch);
    }

    /// Records a fatal I/O failure and fails everybody waiting for durability.
    pub fn fail(&mut self, msg: String) {
        if self.life.failed.is_none() {
            tracing::error!("storage failure, refusing further writes: {msg}");
            self.life.failed = Some(msg.clone());
        }
        self.waiters.fail_all(&msg);
    }
}
