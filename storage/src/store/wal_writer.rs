//! The WAL writer thread: writes queued records and runs group commit.
//!
//! Each round takes everything queued so far, writes it with as few vectored writes as it
//! can (one per physically contiguous run), and fdatasyncs once if anybody wants
//! durability. Waiters that arrive while a round runs are served by the next round's single
//! fdatasync; that is the group commit.
//!
//! A plain write needs nothing from this thread before it is acknowledged (it is visible from
//! the dirty map at once), so the writer is only woken for a sync or a full batch; otherwise
//! it collects appends for up to [`LINGER`]. That keeps wake-ups, and their syscalls, off the
//! request path.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::aligned::refused_here;
use super::shared::Shared;
use super::wal_direct::DirectWal;
use crate::io::MAX_IOVECS;
use crate::types::Lsn;
use crate::wal::record::HEADER_LEN;

/// Queue this much and the writer is woken at once.
pub(crate) const BATCH_BYTES: u64 = 1 << 20;
/// How long queued records may wait for a batch to fill.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

pub(crate) fn run(shared: Arc<Shared>) {
    // This thread does its own I/O with plain blocking syscalls, whatever the store's engine:
    // it has nothing else to do meanwhile. Through io_uring, ext4 cannot take a buffered
    // write without blocking, and an fdatasync never, so the kernel handed both to its own
    // worker thread: a hand-off and a wake-up on every group commit. Plain syscalls made
    // write+FLUSH cycles ~8% faster, on a single node and under sync-all alike.
    let mut direct = DirectWal::open(&shared.wal_path);
    match &direct {
        Some(d) => tracing::debug!(
            "WAL {}: direct I/O, {}-byte alignment",
            shared.wal_path.display(),
            d.alignment()
        ),
        None => tracing::debug!("WAL {}: buffered I/O", shared.wal_path.display()),
    }
    loop {
        let (batch, hint, want_sync) = {
            let mut core = shared.lock_core();
            let mut lingered = false;
            loop {
                if core.life.failed.is_none() {
                    let sync = core.waiters.sync_target > core.log.durable;
                    let full = core.writer.queued_bytes >= BATCH_BYTES;
                    if sync || full || (lingered && !core.writer.queue.is_empty()) {
                        break;
                    }
                }
                if core.life.writer_stop {
                    if core.writer.queue.is_empty() || core.life.failed.is_some() {
                        return;
                    }
                    break;
                }
                core.writer.waiting = true;
                core = if core.writer.queue.is_empty() {
                    shared
                        .writer_cv
                        .wait(core)
                        .unwrap_or_else(|p| p.into_inner())
                } else {
                    lingered = true;
                    shared
                        .writer_cv
                        .wait_timeout(core, LINGER)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                };
                core.writer.waiting = false;
            }
            let batch = core.writer.take();
            let hints = (core.log.durable, core.log.committed, core.log.generation);
            (batch, hints, core.waiters.sync_target > core.log.durable)
        };
        let last = batch
            .iter()
            .rev()
            .find(|q| q.record.kind != crate::wal::record::RecordKind::Wrap)
            .map(|q| q.record.lsn);
        let observer = shared.observer();
        // Placed data first, synced: a record never reaches the disk before its data. (Not
        // timed as the WAL's: the WAL metrics stay what the WAL costs.)
        let placed = shared.place(&batch);
        let started = std::time::Instant::now();
        let runs = batch_runs(&shared, &batch, hint);
        let result = placed.and_then(|placed| {
            runs.iter()
                .try_for_each(|(at, bufs, keep)| {
                    write_run(&shared, &mut direct, want_sync, *at, bufs, *keep)
                })
                .and_then(|_| {
                    if want_sync {
                        crate::io::sync_data(&shared.wal)
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| format!("write or fdatasync {}: {e}", shared.wal_path.display()))
                .map(|_| placed)
        });
        if let (Ok(placed), false) = (&result, batch.is_empty()) {
            if !placed.is_empty() {
                observer.placed(placed.iter().map(|p| p.bytes).sum());
            }
            let bytes = batch.iter().map(|q| q.record.encoded_len()).sum();
            observer.wal_write(bytes, started.elapsed());
            if want_sync {
                observer.wal_sync(started.elapsed());
            }
        }
        let mut core = shared.lock_core();
        match result {
            Ok(placed) => {
                if let Some(lsn) = last {
                    core.log.mark_written(lsn);
                }
                if !placed.is_empty() {
                    core.placed(&placed, hint.2);
                    shared.space.notify_waiters();
                }
                if want_sync {
                    // Everything handed to the writer so far is now on stable storage.
                    let durable = core.log.mark_synced();
                    shared.durable.publish(durable);
                    core.waiters.complete(durable);
                }
            }
            Err(msg) => {
                core.fail(msg);
                drop(core);
                shared.space.notify_waiters();
            }
        }
        shared.written_cv.notify_all();
    }
}

/// Writes one run: with O_DIRECT when somebody waits for the batch's sync (the direct write
/// is the device write, so the fdatasync after it only flushes the device cache), through the
/// page cache otherwise (a ring the writer laps before writeback costs the disk nothing) or
/// where direct I/O is not to be had.
fn write_run(
    shared: &Shared,
    direct: &mut Option<DirectWal>,
    want_sync: bool,
    at: u64,
    bufs: &[Bytes],
    keep_after: bool,
) -> std::io::Result<()> {
    if let Some(d) = direct.as_mut().filter(|_| !want_sync) {
        crate::io::pwritev_all(&shared.wal, at, bufs)?;
        d.note_buffered(at, bufs);
        return Ok(());
    }
    if let Some(d) = direct {
        match d.write(at, bufs, keep_after) {
            Err(e) if refused_here(&e, d.wrote) => {
                tracing::debug!("direct I/O refused on {}: {e}", shared.wal_path.display());
                *direct = None;
            }
            other => return other,
        }
    }
    crate::io::pwritev_all(&shared.wal, at, bufs)
}

/// A physically contiguous run of records: where it starts, its buffers, and whether the
/// bytes after its last record must be kept (see `Queued::keep_after`).
type Run = (u64, Vec<Bytes>, bool);

/// The batch as file writes: one vectored write per physically contiguous run of records.
fn batch_runs(
    shared: &Shared,
    batch: &[super::writer_queue::Queued],
    (durable_hint, commit_hint, generation): (Lsn, Lsn, u16),
) -> Vec<Run> {
    if batch.is_empty() {
        return Vec::new();
    }
    let mut headers = BytesMut::with_capacity(batch.len() * HEADER_LEN);
    for q in batch {
        headers.extend_from_slice(
            &q.record
                .encode_header(durable_hint, commit_hint, generation),
        );
    }
    let headers = headers.freeze();
    let mut pending = Vec::new();
    let mut run: Vec<Bytes> = Vec::new();
    let mut run_at = 0u64;
    let mut run_end = 0u64;
    let mut keep_after = false;
    for (i, q) in batch.iter().enumerate() {
        let at = shared.layout.file_offset(q.pos);
        let contiguous = !run.is_empty() && at == run_end && run.len() + 2 <= MAX_IOVECS;
        if !contiguous && !run.is_empty() {
            pending.push((run_at, std::mem::take(&mut run), keep_after));
        }
        if run.is_empty() {
            run_at = at;
            run_end = at;
        }
        run.push(headers.slice(i * HEADER_LEN..(i + 1) * HEADER_LEN));
        run_end += HEADER_LEN as u64;
        if !q.record.payload.is_empty() {
            run.push(q.record.payload.clone());
            run_end += q.record.payload.len() as u64;
        }
        keep_after = q.keep_after;
    }
    if !run.is_empty() {
        pending.push((run_at, run, keep_after));
    }
    pending
}
