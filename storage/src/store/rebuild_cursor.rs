//! A resumable rebuild: the replica's durable cursor (how far the base got, written at a
//! bounded interval, never per chunk), and on the primary, what a resume needs from the
//! store (the WAL after the old base, pinned again if it is still there).

use std::time::Duration;

use super::Store;
use crate::error::{Result, StorageError};
use crate::types::{Epoch, Lsn, RebuildCursor};

/// Why a primary cannot resume a rebuild from a base it vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefusal {
    /// The WAL no longer holds every entry after the base.
    WalRecycled,
    /// Our data file is older than the base (a primary that took over with an older
    /// checkpoint): what it would send past the cursor could miss entries before the base.
    OlderImage,
}

/// A cursor is written once this much more base has arrived...
pub const CURSOR_EVERY_BYTES: u64 = 64 << 20;
/// ...or this long after the last one, whichever comes first.
pub const CURSOR_EVERY: Duration = Duration::from_secs(1);

impl Store {
    /// The cursor of the rebuild this store is in, if one was written.
    pub fn rebuild_cursor(&self) -> Option<RebuildCursor> {
        let sb = self.superblock();
        sb.is_rebuilding().then_some(sb.rebuild_cursor).flatten()
    }

    /// Whether enough base arrived since the last cursor (by bytes or by time) to write the
    /// next one now ([`Store::save_rebuild_cursor`]). Marks the save as started when true.
    pub fn rebuild_cursor_due(&self) -> bool {
        let mut core = self.shared.lock_core();
        let Some(r) = &mut core.rebuild else {
            return false;
        };
        let new = r.received_through().saturating_sub(r.saved_through);
        let due = !r.saving
            && new > 0
            && (new >= CURSOR_EVERY_BYTES || r.saved_at.elapsed() >= CURSOR_EVERY);
        r.saving |= due;
        due
    }

    /// Writes the cursor: the base received so far is checkpointed (the data file written
    /// and fdatasynced, which makes the log durable through its head H too), then the
    /// superblock records the furthest offset whose base reflects no entry after H, with H as
    /// its proof. Returns the new cursor (`None`: nothing new could be vouched for yet, as
    /// when the base reflects entries the WAL line has not brought yet).
    pub fn save_rebuild_cursor(&self) -> Result<Option<RebuildCursor>> {
        let result = self.write_cursor();
        if let Some(r) = &mut self.shared.lock_core().rebuild {
            r.saving = false;
            r.saved_at = std::time::Instant::now();
        }
        result
    }

    fn write_cursor(&self) -> Result<Option<RebuildCursor>> {
        // The chunks come first: only what the checkpoint below makes durable may be named.
        let (base, generation, chunks) = {
            let core = self.shared.lock_core();
            let Some(r) = &core.rebuild else {
                return Ok(None);
            };
            (r.base, r.generation, r.chunks.clone())
        };
        self.shared.checkpoint().map_err(StorageError::Failed)?;
        // The checkpoint skips its fdatasync when the flusher already wrote everything (its
        // base-only checkpoints sync nothing): the base below the cursor must be on disk.
        crate::io::sync_data(&self.shared.data)
            .map_err(|e| StorageError::io(&self.shared.data_path, e))?;
        let mut sb = self
            .shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The proof is our head, taken after the checkpoint and under the superblock lock
        // (which every raise of `data_through` holds), not just what the base chunks may
        // reflect: a block skipped for the WAL holds its pre-rebuild contents until the WAL
        // line writes it again, and checkpoints write our WAL entries into the data file,
        // below the cursor too. A primary that lost entries it had shipped to us (a crash
        // before its WAL had them) therefore cannot vouch, and the rebuild starts over.
        let (proof, proof_epoch) = {
            let core = self.shared.lock_core();
            let head = core.log.last();
            if sb.data_through > head {
                return Ok(None);
            }
            let epoch =
                crate::superblock::epoch_at(&core.epochs.history, head).unwrap_or(core.epochs.last);
            (head, epoch)
        };
        // Chunks arrive in order and `reflects` only grows along them.
        let Some(through) = chunks
            .iter()
            .take_while(|(_, reflects)| *reflects <= proof)
            .map(|(end, _)| *end)
            .last()
        else {
            return Ok(None);
        };
        let same_rebuild = self.shared.lock_core().rebuild.as_ref().is_some_and(|r| {
            r.base == base && r.generation == generation && r.saved_through < through
        });
        if !sb.is_rebuilding() || !same_rebuild {
            return Ok(None);
        }
        let cursor = RebuildCursor {
            base,
            history: crate::superblock::history_through(&sb.epoch_history, base),
            through,
            proof,
            proof_epoch,
        };
        sb.rebuild_cursor = Some(cursor.clone());
        sb.persist(&self.shared.sb_file, &self.shared.sb_path)?;
        if let Some(r) = &mut self.shared.lock_core().rebuild {
            r.saved_through = through;
            r.floor = r.floor.max(proof);
            while r.chunks.front().is_some_and(|(end, _)| *end <= through) {
                r.chunks.pop_front();
            }
        }
        tracing::debug!(through, proof = proof.0, "rebuild cursor written");
        Ok(Some(cursor))
    }

    /// Primary side: the base a replica's cursor names, again. If our data file is at least
    /// as new as `base` (what we stream past the cursor must be "as of the base or newer")
    /// and the WAL still holds every entry after it, the WAL is pinned from there (in the
    /// same step, so no checkpoint can release it first) and the epoch history through
    /// `base` is returned. Otherwise the rebuild must start over, for the reason returned.
    pub fn resume_base(&self, base: Lsn) -> std::result::Result<Vec<(Epoch, Lsn)>, ResumeRefusal> {
        let _no_checkpoint = self
            .shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut core = self.shared.lock_core();
        if core.log.checkpoint_lsn < base {
            return Err(ResumeRefusal::OlderImage);
        }
        if base > core.log.last() || core.log.tail_lsn > base.next() {
            return Err(ResumeRefusal::WalRecycled);
        }
        core.repl.pin_from(base.next());
        Ok(crate::superblock::history_through(
            &core.epochs.history,
            base,
        ))
    }

    /// Primary side: the newest entry the data file may hold (a checkpoint raises this,
    /// durably, before it writes a block). A base chunk read before this was asked reflects
    /// no entry after it.
    pub fn data_may_hold(&self) -> Lsn {
        let sb = self.superblock();
        // Never clamped to the head: after a crash the data file may hold entries the WAL
        // lost, at LSNs the log has handed out again since. (Placed writes raise
        // `data_through` ahead of the log; overstating only makes a cursor harder to vouch
        // for.)
        sb.data_through.max(sb.checkpoint_lsn)
    }
}
