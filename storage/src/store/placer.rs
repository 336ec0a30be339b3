//! The placer thread: writes placed writes' data into the data file as they are appended, so
//! that the WAL writer's sync of one round's data overlaps the copy of the next round's.
//!
//! The WAL writer used to copy a round's placed data into the page cache and then fdatasync
//! it, one after the other: the disk idled during the copy and the writer's core during the
//! sync. Now the placer writes each placed write's data as soon as it is appended, in LSN
//! order, and a round of the writer only waits until the placer has written the round's
//! newest placed write before its fdatasync (which covers everything written before the call).
//! The invariant of `placement` stands as it was: a `Placed` record is written only after a
//! sync that began after its data was written.

use std::sync::Arc;

use bytes::Bytes;

use super::shared::Shared;
use super::writer_queue::ToCopy;

pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        let work = {
            let mut core = shared.lock_core();
            loop {
                if core.life.failed.is_some() {
                    return;
                }
                if !core.writer.to_copy.is_empty() {
                    break;
                }
                if core.life.writer_stop {
                    return;
                }
                core.writer.placer_waiting = true;
                core = shared
                    .placer_cv
                    .wait(core)
                    .unwrap_or_else(|p| p.into_inner());
                core.writer.placer_waiting = false;
            }
            std::mem::take(&mut core.writer.to_copy)
        };
        let result = shared.copy_placed(&work);
        let mut core = shared.lock_core();
        match result {
            Ok(()) => {
                let written = work.last().map_or(0, |w| w.ticket);
                // A cleared queue may have moved the mark past this work already.
                core.writer.copied = core.writer.copied.max(written);
            }
            Err(msg) => {
                core.fail(msg);
                drop(core);
                shared.space.notify_waiters();
                shared.written_cv.notify_all();
                shared.copied_cv.notify_all();
                return;
            }
        }
        drop(core);
        shared.copied_cv.notify_all();
    }
}

impl Shared {
    /// Writes `work`'s data to the data file (unsynced), one vectored write per contiguous
    /// run, after `data_through` covers the newest of it (see `placement`).
    fn copy_placed(&self, work: &[ToCopy]) -> Result<(), String> {
        let Some(newest) = work.last().map(|w| w.lsn) else {
            return Ok(());
        };
        self.record_data_through_ahead(newest)?;
        // Contiguous writes as one run each: (start, end, buffers). `pwritev_all` splits a run
        // with more buffers than one call takes.
        let mut runs: Vec<(u64, u64, Vec<Bytes>)> = Vec::new();
        for w in work {
            let (at, len) = (w.offset, w.data.len() as u64);
            match runs.last_mut() {
                Some((_, end, bufs)) if *end == at => {
                    bufs.push(w.data.clone());
                    *end += len;
                }
                _ => runs.push((at, at + len, vec![w.data.clone()])),
            }
        }
        for (at, _, bufs) in &runs {
            crate::io::pwritev_all(&self.data, *at, bufs)
                .map_err(|e| format!("write {}: {e}", self.data_path.display()))?;
        }
        Ok(())
    }

    /// Waits until the placer has written every placed write up to `ticket`.
    pub(super) fn wait_copied(&self, ticket: u64) -> Result<(), String> {
        let mut core = self.lock_core();
        loop {
            if let Some(msg) = &core.life.failed {
                return Err(msg.clone());
            }
            if core.writer.copied >= ticket {
                return Ok(());
            }
            core = self.copied_cv.wait(core).unwrap_or_else(|p| p.into_inner());
        }
    }
}
