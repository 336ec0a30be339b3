//! The WAL writer's queue: records that have their place in the log but are not written
//! yet, and the placed writes' data waiting for the placer. Part of `Core`, so changed only
//! under the core lock.

use bytes::Bytes;

use crate::types::{Lsn, WalPos};
use crate::wal::record::{RecordKind, WalRecord};

/// A record that has its place in the log but is not written yet.
pub(crate) struct Queued {
    pub pos: WalPos,
    pub record: WalRecord,
    /// For a placed write (`record` is its `Placed` record): the data the writer puts in the
    /// data file, and syncs there, before it writes the record.
    pub data: Option<Bytes>,
    /// For a placed write: its place among placed writes (see `WriterQueue::copied`).
    pub copy_ticket: u64,
    /// Less than `WAL_SLACK` was free after it when it was appended: the bytes that follow
    /// it in the file may be live (the tail's), so a direct write keeps them instead of
    /// padding with zeroes.
    pub keep_after: bool,
}

/// The WAL writer's queue.
///
/// Invariant (*the queue's LSNs are dense*): each queued entry's LSN follows the one queued
/// before it, and a wrap marker carries the LSN of the entry after it; so a batch holds
/// entries `a, a+1, ..., b` with none missing (`read_wal` takes entries from it by counting).
pub(crate) struct WriterQueue {
    pub queue: Vec<Queued>,
    /// Bytes in `queue` (a placed write's data included).
    pub queued_bytes: u64,
    /// Data bytes of placed writes not yet in the data file (queued or in the writer's hands).
    pub placing_bytes: u64,
    /// The newest placed write appended (see `store::placement`).
    pub placed_through: Lsn,
    /// Placed writes' data, in LSN order, for the placer thread to write (see `placer`).
    pub to_copy: Vec<ToCopy>,
    /// Placed writes appended so far; each takes the next number as its ticket. Counted
    /// rather than named by LSN, since a cut of the log hands out LSNs again.
    pub copy_tickets: u64,
    /// Every placed write with a ticket up to this has its data written by the placer.
    pub copied: u64,
    /// The placer is parked and needs a wake-up.
    pub placer_waiting: bool,
    /// Large writes may be placed (`OpenOptions::place_large_writes`).
    pub places: bool,
    /// The WAL writer is parked and needs a wake-up (waking it costs a syscall, so appends
    /// only do it when a batch is worth writing).
    pub waiting: bool,
}

impl WriterQueue {
    pub(super) fn push(
        &mut self,
        pos: WalPos,
        record: WalRecord,
        data: Option<Bytes>,
        bytes: u64,
        keep_after: bool,
    ) {
        debug_assert!(
            self.queue.last().is_none_or(|q| match q.record.kind {
                RecordKind::Wrap => record.lsn == q.record.lsn && record.kind != RecordKind::Wrap,
                _ => record.lsn == q.record.lsn.next(),
            }),
            "the queue's LSNs are dense: {} queued after {}",
            record.lsn,
            self.queue.last().map_or(Lsn::ZERO, |q| q.record.lsn)
        );
        let mut copy_ticket = 0;
        if let Some(d) = &data {
            self.placing_bytes += d.len() as u64;
            self.placed_through = record.lsn;
            self.copy_tickets += 1;
            copy_ticket = self.copy_tickets;
            self.to_copy.push(ToCopy {
                ticket: copy_ticket,
                lsn: record.lsn,
                offset: record.offset,
                data: d.clone(),
            });
        }
        self.queue.push(Queued {
            pos,
            record,
            data,
            copy_ticket,
            keep_after,
        });
        self.queued_bytes += bytes;
    }

    /// Everything queued so far, for one round of the writer.
    pub fn take(&mut self) -> Vec<Queued> {
        self.queued_bytes = 0;
        std::mem::take(&mut self.queue)
    }

    pub(super) fn clear(&mut self) {
        for q in self.queue.drain(..) {
            if let Some(d) = q.data {
                self.placing_bytes -= d.len() as u64;
            }
        }
        self.to_copy.clear();
        self.copied = self.copy_tickets;
        self.queued_bytes = 0;
    }
}

/// A placed write's data waiting for the placer.
pub(crate) struct ToCopy {
    pub ticket: u64,
    pub lsn: Lsn,
    pub offset: u64,
    pub data: Bytes,
}
