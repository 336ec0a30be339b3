//! The primary's side: starting an epoch, the hooks replication ships from (the entry
//! subscription, the durable watch, retention pins, the checkpoint gate), WAL reads for a
//! replica's catch-up, and the base image a rebuild reads.

use bytes::Bytes;

use super::files::{data_file_extent, io_err};
use super::Store;
use crate::error::{Result, StorageError};
use crate::superblock::Role;
use crate::types::{Epoch, Lsn};
use crate::wal;
use crate::wal::record::RecordKind;

impl Store {
    /// Starts serving at a new epoch: `requested`, or the stored epoch plus one. The epoch is
    /// fsynced in the superblock before this returns, so no entry of the new epoch can exist
    /// on disk without the epoch itself.
    pub fn begin_epoch(&self, requested: Option<Epoch>) -> Result<Epoch> {
        let mut sb = self
            .shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = sb.epoch.max(self.shared.lock_core().epochs.epoch);
        let epoch = requested.unwrap_or(current.next());
        if epoch <= current {
            return Err(StorageError::EpochRegression {
                requested: epoch,
                current,
            });
        }
        sb.epoch = epoch;
        sb.epoch_owner = sb.store_id;
        sb.role = Role::Primary;
        sb.persist(&self.shared.sb_file, &self.shared.sb_path)?;
        self.shared.lock_core().epochs.epoch = epoch;
        Ok(epoch)
    }

    /// Appends an entry that changes no block, at the store's current epoch, and makes it
    /// durable. A sync-quorum primary writes one when it starts at a new epoch, before it
    /// serves: every FLUSH it answers then covers an entry of its own epoch on a majority, so
    /// a log that lacks it (a primary of an earlier, failed epoch) can never win a later
    /// promotion by (head epoch, head) over the copies that hold acknowledged writes
    /// (Raft's rule: entries of older terms commit only through one of the current term).
    pub async fn append_epoch_start(&self) -> Result<Lsn> {
        let lsn = self
            .append(
                RecordKind::EpochStart,
                0,
                0,
                Bytes::new(),
                crc32c::crc32c(&[]),
            )
            .await?;
        self.shared.wait_durable(lsn).await?;
        Ok(lsn)
    }

    /// From now on, every appended entry is also sent here, in LSN order. Replaces any
    /// earlier subscriber.
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<crate::WalRecord> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.lock_core().repl.tap = Some(tx);
        rx
    }

    /// Every change of [`Store::durable`], as it happens: it moves forward with each WAL
    /// sync and checkpoint, and back only when a rebuild or a cut resets the log. Watchers
    /// need not poll.
    pub fn watch_durable(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.shared.durable.watch()
    }

    /// Checkpoints write only entries through `gate` to the data file while the WAL has
    /// room (`None`: no gate). Replication sets it to what every copy that could take over
    /// already holds, so that the tail a failover discards is still only in the WAL and can
    /// be cut in place ([`Store::truncate_after`]) instead of rebuilding the whole copy. A
    /// single node has no one to wait for.
    pub fn set_checkpoint_gate(&self, gate: Option<Lsn>) {
        let mut core = self.shared.lock_core();
        if core.repl.gate != gate {
            core.repl.gate = gate;
            self.shared.gate_cv.notify_all();
        }
    }

    /// Keeps WAL entries from `pin` on (for a replica that will need them), or releases the
    /// hold with `None`. Entries already released are not brought back.
    pub fn set_retention_pin(&self, pin: Option<Lsn>) {
        let mut core = self.shared.lock_core();
        if core.repl.set_pin(pin) {
            // A released pin may free space at once.
            self.shared.request_flush(&mut core);
        }
    }

    /// Bytes of WAL from entry `lsn` to the head (0 if `lsn` is not in the WAL).
    pub fn wal_bytes_since(&self, lsn: Lsn) -> u64 {
        let core = self.shared.lock_core();
        let i = core.log.index.partition_point(|(l, _)| *l < lsn);
        core.log
            .index
            .get(i)
            .map_or(0, |&(_, pos)| core.log.head.0 - pos.0)
    }

    /// The oldest LSN still in the WAL.
    pub fn oldest_retained(&self) -> Lsn {
        self.shared.lock_core().log.tail_lsn
    }

    /// Reads entries `from..` out of the WAL, up to about `max_bytes` of payload (always at
    /// least one entry if any exists). Fails with `WalRecycled` when `from` is no longer
    /// retained.
    ///
    /// Invariant (*a WAL read has no hole*): the entries returned are exactly `from, from+1,
    /// ...` with none missing. Entries live in three places: the file (up to `written`), the
    /// writer's batch in flight (taken from the queue, not yet written), and the queue. The
    /// batch in flight is in neither of the places this reads, so a read that reaches it
    /// stops there, and a read that starts inside it waits for the writer first.
    pub async fn read_wal(&self, from: Lsn, max_bytes: u64) -> Result<Vec<crate::WalRecord>> {
        let (positions, mut queued) = loop {
            let found = {
                let core = self.shared.lock_core();
                if from < core.log.tail_lsn {
                    return Err(StorageError::WalRecycled {
                        requested: from,
                        oldest: core.log.tail_lsn,
                    });
                }
                // Entries already in the file are read from it; newer ones are still in the
                // writer's queue and are taken from memory.
                let start = core.log.index.partition_point(|(lsn, _)| *lsn < from);
                let mut positions = Vec::new();
                let mut bytes = 0u64;
                let mut next = from;
                for (i, &(lsn, pos)) in core.log.index.iter().enumerate().skip(start) {
                    if lsn > core.log.written || (bytes >= max_bytes && !positions.is_empty()) {
                        break;
                    }
                    let end = core.log.index.get(i + 1).map_or(core.log.head, |&(_, p)| p);
                    // A record never straddles the end of the ring; what follows it there is a
                    // wrap marker's padding.
                    let len = (end.0 - pos.0).min(self.shared.layout.room(pos));
                    bytes += len;
                    positions.push((lsn, pos, len));
                    next = lsn.next();
                }
                let mut queued = Vec::new();
                if bytes < max_bytes || positions.is_empty() {
                    for q in core.writer.queue.iter() {
                        if q.record.lsn < next || q.record.kind == crate::RecordKind::Wrap {
                            continue;
                        }
                        if q.record.lsn != next
                            || (bytes >= max_bytes && !(positions.is_empty() && queued.is_empty()))
                        {
                            break; // the batch in flight lies between the file and the queue
                        }
                        // A placed write ships with its data: that is what it weighs.
                        bytes += q
                            .data
                            .as_ref()
                            .map_or(q.record.encoded_len(), |d| d.len() as u64);
                        queued.push(super::placement::with_data(q));
                        next = next.next();
                    }
                }
                // Empty although `from` exists: it is in the writer's hands.
                let in_flight =
                    positions.is_empty() && queued.is_empty() && from < core.log.next_lsn;
                (!in_flight).then_some((positions, queued))
            };
            match found {
                Some(found) => break found,
                None => self.shared.wait_durable(from).await?,
            }
        };
        let mut records = Vec::with_capacity(positions.len() + queued.len());
        if !positions.is_empty() {
            let logged = wal::read_entries(
                &self.shared.io,
                &self.shared.wal,
                &self.shared.wal_path,
                self.shared.layout,
                &positions,
            )
            .await?;
            // A placed write's record is small and its data is read back here, so the limit
            // is checked on the data: entries past it wait for the next read (the ones
            // returned stay `from, from+1, ...`).
            let mut read = 0u64;
            for record in logged {
                if read >= max_bytes && !records.is_empty() {
                    queued.clear();
                    break;
                }
                let record = self.shared.unplace(record).await?;
                read += record.encoded_len();
                records.push(record);
            }
        }
        // The ring may have been reused while it was read: trust only what is still retained.
        let oldest = self.oldest_retained();
        if oldest > from {
            return Err(StorageError::WalRecycled {
                requested: from,
                oldest,
            });
        }
        records.extend(queued);
        Ok(records)
    }

    /// Primary side: the base for a replica's rebuild. Returns the checkpoint LSN (the data
    /// file holds exactly the volume as of it) and the epoch history through it, and pins the
    /// WAL after it (in the same step, so no checkpoint can release those entries first).
    pub fn rebuild_base(&self) -> (Lsn, Vec<(Epoch, Lsn)>) {
        let _no_checkpoint = self
            .shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut core = self.shared.lock_core();
        let base = core.log.checkpoint_lsn;
        core.repl.pin_from(base.next());
        let history = crate::superblock::history_through(&core.epochs.history, base);
        (base, history)
    }

    /// Primary side: `[offset, offset+len)` of the data file as it is on disk (the flushed
    /// image, not what the WAL holds).
    pub async fn read_base(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        self.shared
            .io
            .read(&self.shared.data, offset, len as usize)
            .await
            .map_err(io_err(&self.shared.data_path))
    }

    /// Primary side: the run of the data file that starts at `offset` (at most `len` bytes):
    /// its length and whether it holds data (a hole reads as zeroes); `None` past the end.
    /// Only the first run: a rebuild asks again at the next offset, and walking every
    /// extent of a fragmented file up front for each chunk made a rebuild quadratic.
    pub fn base_extent(&self, offset: u64, len: u64) -> Option<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.shared.volume_size);
        (offset < end).then(|| {
            let (data, until) = data_file_extent(&self.shared.data, offset, end);
            (until - offset, data)
        })
    }
}
