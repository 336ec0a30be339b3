//! The state shared by writers, readers, the WAL writer and the flusher, behind one mutex.
//!
//! The mutex is held only for in-memory work: assigning an LSN and a WAL position, updating
//! the dirty map, queueing the record. No I/O ever happens under it.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::dirty::{BlockState, DirtyMap, Piece, RangeSet};
use crate::error::{Result, StorageError};
use crate::types::{Epoch, Lsn, WalPos};
use crate::wal::record::{RecordKind, WalRecord, HEADER_LEN};
use crate::wal::WalLayout;

/// A rebuild in progress on this (replica) store.
pub(crate) struct Rebuild {
    /// The primary's checkpoint the base image was taken at; entries after it arrive as WAL.
    pub base: Lsn,
    /// Blocks written by WAL entries since the rebuild began: base blocks never overwrite
    /// them ("WAL wins over base").
    pub touched: RangeSet,
}

/// A record that has its place in the log but is not written yet.
pub(crate) struct Queued {
    pub pos: WalPos,
    pub record: WalRecord,
}

pub(crate) struct DurableWaiter {
    pub target: Lsn,
    pub done: oneshot::Sender<Result<(), String>>,
}

pub(crate) struct Core {
    /// The epoch new entries are written at (a primary's own; a replica's adopted one).
    pub epoch: Epoch,
    /// Epoch of the newest entry; wrap markers carry it so replay's epoch order holds even
    /// when a replica receives entries of an older epoch.
    pub last_epoch: Epoch,
    pub next_lsn: Lsn,
    /// Highest LSN known committed under the volume's commit mode (set by replication);
    /// stamped into every record header so it survives a crash.
    pub committed: Lsn,
    /// Every entry in the WAL, oldest first: where to find it for a replica's catch-up.
    pub index: VecDeque<(Lsn, WalPos)>,
    /// LSN of the entry at `tail`.
    pub tail_lsn: Lsn,
    /// The oldest entry a lagging replica still needs; checkpoints keep the WAL from here.
    pub retention_pin: Option<Lsn>,
    /// `retention_pin` is still the one `OpenOptions::keep_retained_wal` set, not one a
    /// caller chose: it gives way to a write that finds the WAL full (nobody has said yet
    /// that the WAL is needed, and a write must not wait for somebody who may never come).
    pub pin_from_open: bool,
    /// Where each epoch begins in the log (see `Superblock::epoch_history`).
    pub epoch_history: Vec<(Epoch, Lsn)>,
    /// The log's incarnation, stamped into every record header.
    pub generation: u16,
    /// Set while this store is being rebuilt from a primary's base image.
    pub rebuild: Option<Rebuild>,
    /// Receives a copy of every appended entry, in LSN order (the replication shipper).
    pub tap: Option<mpsc::UnboundedSender<WalRecord>>,
    /// Where the next record goes.
    pub head: WalPos,
    /// The oldest position still needed (the entry after the checkpoint).
    pub tail: WalPos,
    pub checkpoint_lsn: Lsn,
    /// Writes since the flusher last froze the map.
    pub active: DirtyMap,
    /// The map the flusher is writing to the data file right now.
    pub flushing: Option<Arc<DirtyMap>>,
    pub queue: Vec<Queued>,
    /// Bytes in `queue`.
    pub queued_bytes: u64,
    /// The WAL writer is parked and needs a wake-up (waking it costs a syscall, so appends
    /// only do it when a batch is worth writing).
    pub writer_waiting: bool,
    /// Highest LSN written to the WAL file (maybe not synced).
    pub written: Lsn,
    /// Highest LSN fsynced in the WAL.
    pub durable: Lsn,
    /// Highest LSN somebody is waiting to see durable.
    pub sync_target: Lsn,
    pub waiters: Vec<DurableWaiter>,
    /// Set by the first I/O failure; the store then refuses writes (a failed fsync leaves the
    /// page cache in an unknown state, so retrying it could report durability falsely).
    pub failed: Option<String>,
    /// Bumped after every checkpoint; lets read-modify-write detect that a block it read from
    /// the data file may have changed underneath it.
    pub checkpoint_gen: u64,
    /// Checkpoints wait for this LSN to reach their target before they write the data file
    /// (see `Store::set_checkpoint_gate`); `None`: they never wait.
    pub gate: Option<Lsn>,
    pub closing: bool,
    pub flush_requested: bool,
    pub writer_stop: bool,
    pub flusher_stop: bool,
}

impl Core {
    pub fn check_writable(&self) -> Result<()> {
        if let Some(msg) = &self.failed {
            return Err(StorageError::Failed(msg.clone()));
        }
        if self.closing {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    pub fn wal_used(&self) -> u64 {
        self.head.0 - self.tail.0
    }

    /// The newest state of one block, if the WAL holds it.
    pub fn lookup_block(&self, block: u64) -> Option<BlockState> {
        let from = |m: &DirtyMap| {
            m.overlapping(block, block + 1)
                .into_iter()
                .next()
                .and_then(|p| p.state)
        };
        from(&self.active).or_else(|| self.flushing.as_deref().and_then(from))
    }

    /// Where every block of `[start, end)` is.
    pub fn resolve(&self, start: u64, end: u64) -> Vec<Piece> {
        match self.flushing.as_deref() {
            Some(f) => crate::dirty::resolve(&[&self.active, f], start, end),
            None => crate::dirty::resolve(&[&self.active], start, end),
        }
    }

    /// Gives the next LSN to a new entry and queues it for the WAL writer, or returns `None`
    /// when the ring has no room for it yet (the caller waits for the flusher).
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
    ) -> Option<Lsn> {
        let record = WalRecord {
            lsn: self.next_lsn,
            epoch: self.epoch,
            kind,
            offset,
            length,
            payload,
            payload_crc,
        };
        self.try_push(layout, record)
    }

    /// Appends `record` as the next entry; its LSN must be `next_lsn` (callers check).
    /// Returns `None` when the ring has no room for it yet.
    pub fn try_push(&mut self, layout: &WalLayout, record: WalRecord) -> Option<Lsn> {
        debug_assert_eq!(record.lsn, self.next_lsn);
        assert!(
            record.kind != RecordKind::Wrap,
            "wrap markers are not appended by callers"
        );
        let size = record.encoded_len();
        let room = layout.room(self.head);
        let pad = if room < size { room } else { 0 };
        if self.wal_used() + pad + size > layout.capacity {
            return None;
        }
        let lsn = record.lsn;
        if pad > 0 {
            let marker = WalRecord::new(lsn, self.last_epoch, RecordKind::Wrap, 0, 0, Bytes::new());
            self.queue.push(Queued {
                pos: self.head,
                record: marker,
            });
            self.queued_bytes += HEADER_LEN as u64;
            self.head = WalPos(self.head.0 + pad);
        }
        if let Some((first, end)) = self.active.apply(&record) {
            if let Some(r) = &mut self.rebuild {
                r.touched.insert(first, end);
            }
        }
        if let Some(tap) = &self.tap {
            // Sent under the lock, so the shipper sees entries in LSN order.
            if tap.send(record.clone()).is_err() {
                self.tap = None;
            }
        }
        self.index.push_back((lsn, self.head));
        if self
            .epoch_history
            .last()
            .is_none_or(|(e, _)| *e != record.epoch)
        {
            self.epoch_history.push((record.epoch, lsn));
        }
        self.last_epoch = record.epoch;
        self.queue.push(Queued {
            pos: self.head,
            record,
        });
        self.queued_bytes += size;
        self.head = WalPos(self.head.0 + size);
        self.next_lsn = lsn.next();
        Some(lsn)
    }

    /// Where the WAL may be released up to after a checkpoint at `target` whose head was
    /// `head`: everything, unless a lagging replica still needs entries from `pin` on.
    pub fn release_point(&self, target: Lsn, head: WalPos) -> (WalPos, Lsn) {
        match self.retention_pin {
            Some(pin) if pin <= target => {
                let i = self.index.partition_point(|(lsn, _)| *lsn < pin);
                match self.index.get(i) {
                    Some(&(lsn, pos)) => (pos, lsn),
                    None => (head, target.next()),
                }
            }
            _ => (head, target.next()),
        }
    }

    /// Forgets index entries before the new tail.
    pub fn release(&mut self, tail: WalPos, tail_lsn: Lsn) {
        self.tail = tail;
        self.tail_lsn = tail_lsn;
        while self.index.front().is_some_and(|(lsn, _)| *lsn < tail_lsn) {
            self.index.pop_front();
        }
    }

    /// Completes every waiter whose target is durable now.
    pub fn complete_waiters(&mut self) {
        let durable = self.durable;
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].target <= durable {
                let w = self.waiters.swap_remove(i);
                let _ = w.done.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    /// Records a fatal I/O failure and fails everybody waiting for durability.
    pub fn fail(&mut self, msg: String) {
        if self.failed.is_none() {
            tracing::error!("storage failure, refusing further writes: {msg}");
            self.failed = Some(msg.clone());
        }
        for w in self.waiters.drain(..) {
            let _ = w.done.send(Err(msg.clone()));
        }
    }
}
