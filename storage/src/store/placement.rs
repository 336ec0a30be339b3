//! Large writes written once: placed in the data file, with only their record in the WAL.
//!
//! A logged write reaches the disk twice (its WAL record, then the data file at a
//! checkpoint), so sequential writes ran at half of what the disk takes. A write of at least
//! [`PLACE_MIN`] bytes on a store that replicates to nobody is *placed* instead: the WAL gets a
//! small `Placed` record (the range and its contents' CRC32C) and the WAL writer puts the data
//! in the data file itself. The promises stay those of a logged write:
//!
//! - **Reads** see the data at once: until it is in the data file, the dirty map holds it as
//!   for any write; afterwards the map says `Placed` (the data file's, whatever an older map
//!   says) and the memory is released.
//! - **Durability.** Invariant (*a placed record follows its data to the disk*): the writer
//!   writes a batch's placed data to the data file and fdatasyncs it before it writes any of
//!   the batch's records. A `Placed` record that replay finds, synced or not, names data that
//!   reached stable storage; a FLUSH that covers the record covers the data; and a torn tail
//!   that loses the record leaves the blocks old or new, which an unflushed write allows.
//! - **The data file never holds an entry the superblock does not admit**: `data_through` is
//!   raised past a placed write before its data is written (ahead in steps of
//!   [`DATA_THROUGH_STEP`] entries, so it costs a superblock sync per step, not per write). So a
//!   cut of the log below a placed write is refused, as for a checkpointed one, and the copy is
//!   rebuilt.
//! - **The checkpoint never writes older data over it.** A write is placed only if the map a
//!   checkpoint is writing holds none of its blocks, and a checkpoint waits for every placed
//!   write up to its target to be in the data file before it writes any block (`durable`
//!   through them, which the writer reaches only after placing them). So the data file sees a
//!   block's writes in LSN order, as the log does.
//! - **Replicas** get the write with its data: a subscriber is sent the write itself, and a
//!   catch-up that reads a `Placed` record from the WAL reads its blocks back from the data
//!   file and checks them against the record's CRC. Blocks that a newer write has changed since
//!   fail the check, and the replica is rebuilt instead ([`StorageError::WalRecycled`]): it must
//!   never get newer contents under an older LSN. A store that replicates does not place writes
//!   (its checkpoint gate keeps the tail a failover may discard out of the data file).

use bytes::Bytes;

use super::core::Core;
use super::shared::Shared;
use super::writer_queue::Queued;
use crate::error::{Result, StorageError};
use crate::types::{Lsn, BLOCK_SIZE};
use crate::wal::record::{RecordKind, WalRecord};

/// The smallest write that is placed rather than logged.
pub(crate) const PLACE_MIN: u64 = 256 << 10;
/// Placed data waiting for the writer, at most: a writer slower than its clients makes them
/// wait here, as a full WAL does.
pub(crate) const PLACE_QUEUE_LIMIT: u64 = 64 << 20;
/// How far past a placed write `data_through` is raised at once.
pub(crate) const DATA_THROUGH_STEP: u64 = 4096;

impl Core {
    /// Whether a write of `length` bytes at `offset` is placed: it is large, the store
    /// replicates to nobody (no subscriber, no gate, no WAL kept for a replica) and is not
    /// being rebuilt, and the map a checkpoint is writing holds none of its blocks.
    pub(super) fn may_place(&self, offset: u64, length: u64) -> bool {
        let (first, end) = (offset / BLOCK_SIZE, (offset + length) / BLOCK_SIZE);
        length >= PLACE_MIN
            && self.writer.places
            && !self.repl.copies_elsewhere()
            && self.rebuild.is_none()
            && self
                .maps
                .flushing
                .as_deref()
                .is_none_or(|f| f.overlapping(first, end).is_empty())
    }

    /// Whether `length` more bytes may wait for placement (one write always may).
    pub(super) fn room_to_place(&self, length: u64) -> bool {
        self.writer.placing_bytes == 0 || self.writer.placing_bytes + length <= PLACE_QUEUE_LIMIT
    }

    /// The writer placed `placed` (taken in log generation `generation`): their blocks that
    /// still hold their data are the data file's now.
    pub(super) fn placed(&mut self, placed: &[PlacedWrite], generation: u16) {
        let mut moved = false;
        for p in placed {
            self.writer.placing_bytes -= p.bytes;
            if generation == self.log.generation {
                moved |= self.maps.active.mark_placed(p.first, p.end, p.lsn);
            }
        }
        if moved {
            // Read-modify-write must not trust a block it read from the data file before.
            self.maps.checkpoint_gen += 1;
        }
    }
}

/// A write the writer put in the data file.
pub(crate) struct PlacedWrite {
    lsn: Lsn,
    first: u64,
    end: u64,
    pub bytes: u64,
}

impl Shared {
    /// The WAL writer's first step for a batch: its placed writes' data is in the data file
    /// (the placer wrote it, see `placer`) and synced there (see the module doc). Returns what
    /// it placed.
    pub(super) fn place(&self, batch: &[Queued]) -> std::result::Result<Vec<PlacedWrite>, String> {
        let mut placed = Vec::new();
        let mut newest_ticket = 0;
        for q in batch {
            let Some(data) = &q.data else { continue };
            let (at, len) = (q.record.offset, data.len() as u64);
            newest_ticket = q.copy_ticket;
            placed.push(PlacedWrite {
                lsn: q.record.lsn,
                first: at / BLOCK_SIZE,
                end: (at + len) / BLOCK_SIZE,
                bytes: len,
            });
        }
        if placed.is_empty() {
            return Ok(placed);
        }
        self.wait_copied(newest_ticket)?;
        crate::io::sync_data(&self.data)
            .map_err(|e| format!("fdatasync {}: {e}", self.data_path.display()))?;
        Ok(placed)
    }

    /// `data_through` covers `lsn`: raised [`DATA_THROUGH_STEP`] entries past it when it
    /// does not yet.
    pub(super) fn record_data_through_ahead(&self, lsn: Lsn) -> std::result::Result<(), String> {
        let covered = self
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .data_through
            >= lsn;
        if covered {
            return Ok(());
        }
        self.record_data_through(Lsn(lsn.0.saturating_add(DATA_THROUGH_STEP)))
    }

    /// A checkpoint through `target` writes no block before every placed write up to it is in
    /// the data file (see the module doc).
    pub(super) fn wait_for_placed_through(&self, target: Lsn) -> std::result::Result<(), String> {
        let due = self.lock_core().writer.placed_through.min(target);
        self.wait_durable_blocking(due)
    }

    /// A record read back from the WAL for a replica, with its data: a placed write's blocks
    /// are read from the data file and must still be what it wrote (see the module doc).
    pub(super) async fn unplace(&self, record: WalRecord) -> Result<WalRecord> {
        let Some(crc) = record.placed_crc() else {
            return Ok(record);
        };
        let data = self
            .io
            .read(&self.data, record.offset, record.length as usize)
            .await
            .map_err(super::files::io_err(&self.data_path))?;
        if crc32c::crc32c(&data) != crc {
            tracing::debug!(
                lsn = record.lsn.0,
                "a placed write's blocks were overwritten since: the replica needs a rebuild"
            );
            return Err(StorageError::WalRecycled {
                requested: record.lsn,
                oldest: record.lsn.next(),
            });
        }
        Ok(write_of(record, data, crc))
    }
}

/// The write a placed record stands for: `data` (with CRC32C `crc`) at its range.
fn write_of(record: WalRecord, data: Bytes, crc: u32) -> WalRecord {
    WalRecord {
        kind: RecordKind::Write,
        payload: data,
        payload_crc: crc,
        ..record
    }
}

/// A queued record as a replica must get it: a placed write with its data.
pub(super) fn with_data(q: &Queued) -> WalRecord {
    match &q.data {
        Some(data) => {
            let crc = q
                .record
                .placed_crc()
                .unwrap_or_else(|| crc32c::crc32c(data));
            write_of(q.record.clone(), data.clone(), crc)
        }
        None => q.record.clone(),
    }
}
