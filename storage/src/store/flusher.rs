//! The flusher: moves what the WAL holds into the data file and recycles the WAL.
//!
//! A checkpoint freezes the dirty map at LSN `target` (new writes go to a fresh map), raises
//! `data_through` to `target` in the superblock, writes the frozen blocks to the data file,
//! fdatasyncs it, and only then records `checkpoint_lsn = target` in the superblock, releases
//! the WAL before it and raises `durable` to `target`.
//!
//! On a single node it does not sync the WAL: the data file's fdatasync and the superblock
//! make the entries through `target` durable, whether or not their WAL records ever reached
//! the disk. It does wait until the WAL writer has *written* every record through `target`,
//! so a killed process leaves nothing in the data file the WAL lacks (the page cache keeps
//! both); a power loss between the data file's writes and the superblock may still leave
//! blocks of entries the WAL has lost, and `data_through` bounds how far that reaches. A
//! store whose entries other copies hold syncs the WAL through `target` first, so that even
//! a power loss leaves its log reaching everything its data file holds (the replicas would
//! otherwise cut those entries when it came back); so does one with a retention pin at or
//! below `target` (the next open replays through the entries the pin keeps).
//!
//! During a rebuild, a checkpoint that only moves base blocks skips the fdatasync (see
//! `checkpoint_with`); the one `finish_rebuild` runs does not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::aligned::refused_here;
use super::core::Core;
use super::direct::DirectWriter;
use super::files::zero_data_range;
use super::shared::Shared;
use crate::dirty::{BlockState, DirtyMap};
use crate::io::MAX_IOVECS;
use crate::types::{Epoch, Lsn, WalPos, BLOCK_SIZE};

/// Start a checkpoint once the WAL is this full, so writers rarely wait for space.
pub(crate) const EAGER_FRACTION: u64 = 4;
const MAX_WRITE: u64 = 16 << 20;
/// Runs gathered before they are written (one `pwritev` each).
const MAX_OUTSTANDING: usize = 64;
/// How long a gated checkpoint, once it has frozen its target, waits for the entries that
/// arrived while it waited to start (it holds the checkpoint lock meanwhile); then it gives
/// the map back and tries again later.
const GATE_WAIT: Duration = Duration::from_millis(100);
/// A gated flusher stops waiting once the WAL is this full (1/2), before writers stall.
const GATE_PRESSURE_FRACTION: u64 = 2;
/// How often a waiting gated flusher looks at the WAL's fill (appends do not wake it).
const GATE_POLL: Duration = Duration::from_millis(50);

/// Whether a checkpoint may skip its fdatasync and wait for the checkpoint gate (see
/// `checkpoint_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lazy {
    /// The flusher's own checkpoints: during a rebuild, those that only move base blocks
    /// skip the fdatasync; on a gated store, every one waits (a bounded time) for the gate.
    DuringRebuild,
    /// Every checkpoint that must leave the data file durable at once (close,
    /// finish_rebuild): no skipped fdatasync, no waiting for the gate.
    Never,
}

/// How a checkpoint that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checkpoint {
    /// It ran (or had nothing to do).
    Ran,
    /// Its gate did not pass in time: it gave the frozen map back and wrote nothing.
    GaveBack,
}

/// What a checkpoint writes: the dirty map frozen at `target` (the newest entry then).
struct Frozen {
    target: Lsn,
    /// The WAL head when it froze.
    head: WalPos,
    map: Arc<DirtyMap>,
    /// The epoch of the entry at `target`.
    epoch: Epoch,
}

pub(crate) fn run(shared: Arc<Shared>, interval: Duration) {
    loop {
        {
            let mut core = shared.lock_core();
            if !core.life.flush_requested && !core.life.flusher_stop {
                core = shared
                    .flusher_cv
                    .wait_timeout(core, interval)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if core.life.flusher_stop {
                return;
            }
            core.life.flush_requested = false;
            if core.life.failed.is_some() {
                continue;
            }
        }
        shared.wait_for_gate();
        let started = std::time::Instant::now();
        let result = shared.checkpoint_with(Lazy::DuringRebuild);
        if result == Ok(Checkpoint::Ran) {
            shared.observer().checkpoint(started.elapsed());
        }
        if let Err(msg) = result {
            shared.lock_core().fail(msg);
            shared.space.notify_waiters();
        }
    }
}

impl Shared {
    /// One checkpoint that leaves the data file durable at once.
    pub(crate) fn checkpoint(&self) -> Result<(), String> {
        self.checkpoint_with(Lazy::Never).map(|_| ())
    }

    /// One checkpoint (see the module doc). Returns an error message on I/O failure.
    /// Serialized by `checkpoint_lock`, so `close` can run a last one safely.
    pub(crate) fn checkpoint_with(&self, lazy: Lazy) -> Result<Checkpoint, String> {
        let _one_at_a_time = self
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(Frozen {
            target,
            head,
            map: frozen,
            epoch: target_epoch,
        }) = self.freeze()?
        else {
            return Ok(Checkpoint::Ran);
        };
        // The data file's own fsync makes these entries durable; the WAL only has to be
        // durable first when entries before the checkpoint stay in it for a lagging replica
        // (replay then reads through them, so they must be intact), or when other copies
        // hold them (*a replicated store's data file holds no entry its WAL could lose*).
        // Skipping that sync keeps a single node's flush-free workloads from writing every
        // byte to disk twice.
        let must_sync = {
            let core = self.lock_core();
            core.repl.keeps_before(target) || core.repl.copies_elsewhere()
        };
        if must_sync {
            self.wait_durable_blocking(target)?;
        } else {
            self.wait_for_placed_through(target)?;
        }
        // During a rebuild, a checkpoint that only moves base blocks (nothing new in the WAL
        // to release) needs no fdatasync: the store stays marked rebuilding until
        // `finish_rebuild` runs a durable checkpoint, and a crash before that discards the
        // whole base anyway. Writeback is started now, so that last fdatasync finds little
        // left and the disk works while the rest of the base streams in.
        let (rebuilding, base_only) = {
            let core = self.lock_core();
            let rebuilding = core.rebuild.is_some();
            let base_only =
                lazy == Lazy::DuringRebuild && rebuilding && target <= core.log.checkpoint_lsn;
            (rebuilding, base_only)
        };
        if !base_only {
            if lazy == Lazy::DuringRebuild && !self.wait_for_gate_through(target) {
                // Going ahead would put entries no other copy may hold in the data file,
                // and a failover that discards them would then rebuild this copy instead of
                // cutting its log: give the map back and try again once the gate moves.
                drop(frozen);
                self.lock_core().maps.thaw();
                tracing::debug!(target = target.0, "checkpoint waits for its gate");
                return Ok(Checkpoint::GaveBack);
            }
            self.wait_for_records_through(target)?;
            self.record_data_through(target)?;
        }
        // During a rebuild, long runs (the base) go to the disk directly when they can:
        // copying the base into the page cache cost more CPU than the network and the disk
        // together, and left all of the writeback to the checkpoint that ends the rebuild. A
        // rebuilding store serves no reads, so nothing is lost by bypassing the cache.
        let direct = rebuilding && self.write_direct(&frozen)?;
        if !direct {
            self.write_to_data_file(&frozen)?;
        }
        if base_only {
            self.base_written(&frozen, direct);
            return Ok(Checkpoint::Ran);
        }
        crate::io::sync_data(&self.data)
            .map_err(|e| format!("fdatasync {}: {e}", self.data_path.display()))?;
        self.record_checkpoint(target, head, target_epoch)?;
        Ok(Checkpoint::Ran)
    }

    /// Freezes the dirty map for a checkpoint; `None` when there is nothing to write or
    /// release.
    fn freeze(&self) -> Result<Option<Frozen>, String> {
        let mut core = self.lock_core();
        if let Some(msg) = &core.life.failed {
            return Err(msg.clone());
        }
        let (releasable, _) = core.release_point(core.log.last(), core.log.head);
        // Nothing to write and nothing to release is no checkpoint, unless entries with no
        // data (an epoch's start) lie past the last one: with the WAL held (a replica's hold
        // after its commit) nothing is releasable, and a clean close must still record them.
        if core.maps.active.is_empty()
            && core.log.tail == releasable
            && core.log.checkpoint_lsn >= core.log.last()
        {
            return Ok(None);
        }
        Ok(Some(Frozen {
            target: core.log.last(),
            head: core.log.head,
            map: core.maps.freeze(),
            epoch: core.epochs.last,
        }))
    }

    /// A rebuild checkpoint that only moved base blocks is done: writeback is started for
    /// what went through the page cache, and nothing is recorded.
    fn base_written(&self, frozen: &DirtyMap, direct: bool) {
        if !direct {
            for (start, extent) in frozen.iter() {
                crate::io::start_writeback(
                    &self.data,
                    start * BLOCK_SIZE,
                    (extent.end - start) * BLOCK_SIZE,
                );
            }
        }
        self.lock_core().maps.flushed();
        tracing::debug!(
            bytes = frozen.data_bytes(),
            "rebuild checkpoint (writeback started)"
        );
        self.space.notify_waiters();
    }

    /// The data file holds the volume as of `target`: the superblock says so, then the WAL
    /// before it is released (except what a lagging replica still needs) and everything
    /// through it counts as durable.
    fn record_checkpoint(
        &self,
        target: Lsn,
        head: WalPos,
        target_epoch: Epoch,
    ) -> Result<(), String> {
        let (new_tail, new_tail_lsn, committed, history) = {
            let core = self.lock_core();
            let (tail, tail_lsn) = core.release_point(target, head);
            let history = crate::superblock::history_through(&core.epochs.history, target);
            (tail, tail_lsn, core.log.committed, history)
        };
        {
            let mut sb = self.superblock.lock().unwrap_or_else(|p| p.into_inner());
            sb.checkpoint_lsn = target;
            sb.checkpoint_epoch = target_epoch;
            sb.wal_tail = new_tail;
            sb.wal_tail_lsn = new_tail_lsn;
            sb.committed_lsn = sb.committed_lsn.max(committed);
            sb.epoch_history = history;
            sb.persist(&self.sb_file, &self.sb_path)
                .map_err(|e| e.to_string())?;
        }
        {
            let mut core = self.lock_core();
            // Everything through the checkpoint is durable now (in the data file), whether or
            // not its WAL records were ever synced. Only after the superblock says so: a
            // record's durable hint must never run ahead of what recovery will know.
            let durable_moved = core.log.mark_checkpoint(target, new_tail, new_tail_lsn);
            core.maps.flushed();
            if durable_moved {
                self.durable.publish(target);
                core.waiters.complete(target);
            }
        }
        self.space.notify_waiters();
        tracing::debug!(lsn = target.0, "checkpoint");
        Ok(())
    }

    /// A gated store (see `Store::set_checkpoint_gate`) starts a checkpoint only once the
    /// gate covers what the log held when it began to wait, so that the data file holds only
    /// entries every copy that could take over has, and a tail that a failover discards can
    /// still be cut in place (`Store::truncate_after`). It waits as long as that takes,
    /// without the checkpoint lock (a cut or a rebuild may run meanwhile), and stops waiting
    /// when the WAL is half full: writers never stall on the gate. A checkpoint that goes
    /// ahead of the commit point (only under that pressure: otherwise it gives its map back,
    /// see `checkpoint_with`) only means a later cut is refused and the copy is rebuilt.
    fn wait_for_gate(&self) {
        let mut core = self.lock_core();
        let began = core.log.last();
        while self.gate_holds_back(&core, began.min(core.log.last())) {
            core = self
                .gate_cv
                .wait_timeout(core, GATE_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The second half of the gate: the checkpoint froze its target, which may include
    /// entries written while `wait_for_gate` waited; give the gate a moment to pass. Returns
    /// whether it did (or stopped holding back).
    fn wait_for_gate_through(&self, target: Lsn) -> bool {
        let deadline = Instant::now() + GATE_WAIT;
        let mut core = self.lock_core();
        while self.gate_holds_back(&core, target) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            core = self
                .gate_cv
                .wait_timeout(core, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Whether the gate still keeps a checkpoint through `target` from the data file: it is
    /// below `target`, and nothing overrides it (a rebuild, a stop or close, a failure, or a
    /// WAL half full).
    fn gate_holds_back(&self, core: &Core, target: Lsn) -> bool {
        core.repl.gate.is_some_and(|g| g < target)
            && core.rebuild.is_none()
            && !core.life.flusher_stop
            && !core.life.closing
            && core.life.failed.is_none()
            && core.log.wal_used() < self.layout.capacity / GATE_PRESSURE_FRACTION
    }

    /// Invariant (*a process crash leaves no entry in the data file that the WAL lost*): a
    /// checkpoint writes no block before the WAL file holds the record of every entry through
    /// its target (written, not synced: the page cache outlives a killed process). Without
    /// it a `kill -9` in the middle of a checkpoint could leave blocks of entries still in
    /// the writer's queue, whose LSNs the restarted log hands out again; a replica that held
    /// those entries is cut back to the restarted log and never gets the blocks. (A power
    /// loss can still keep a data-file block whose record it lost: `data_through` says so.)
    fn wait_for_records_through(&self, target: Lsn) -> Result<(), String> {
        let mut core = self.lock_core();
        loop {
            if let Some(msg) = &core.life.failed {
                return Err(msg.clone());
            }
            // A reset of the log (a cut, a rebuild) marks what it keeps as written.
            if core.log.written >= target.min(core.log.last()) {
                return Ok(());
            }
            self.wake_writer(&mut core);
            core = self
                .written_cv
                .wait_timeout(core, GATE_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Invariant (*the data file never holds an entry the superblock does not admit*):
    /// before a checkpoint writes any block, `data_through` is raised to its target and
    /// fsynced, even after a crash in the middle of the writes the superblock bounds what
    /// the data file may contain.
    ///
    /// A rebuild cursor's proof is raised with it: the checkpoint writes this store's entries
    /// anywhere, below the cursor too, and a primary that lacks them (one restarted after
    /// losing entries it had shipped) must not keep that base (*no partial base is trusted
    /// without proof of its lineage*).
    pub(crate) fn record_data_through(&self, target: Lsn) -> Result<(), String> {
        let mut sb = self.superblock.lock().unwrap_or_else(|p| p.into_inner());
        if target <= sb.data_through {
            return Ok(());
        }
        sb.data_through = target;
        if let Some(cursor) = sb.rebuild_cursor.as_mut().filter(|c| c.proof < target) {
            let core = self.lock_core();
            cursor.proof = target;
            cursor.proof_epoch = crate::superblock::epoch_at(&core.epochs.history, target)
                .unwrap_or(core.epochs.last);
        }
        sb.persist(&self.sb_file, &self.sb_path)
            .map_err(|e| e.to_string())
    }

    /// Writes `frozen` to the data file with O_DIRECT, through an aligned buffer; `false` when
    /// direct I/O is not available here (the caller writes through the page cache instead).
    /// Trims and zeroes are hole punches either way.
    fn write_direct(&self, frozen: &DirtyMap) -> Result<bool, String> {
        let mut slot = self.direct.lock().unwrap_or_else(|p| p.into_inner());
        let writer = slot.get_or_insert_with(|| DirectWriter::open(&self.data_path));
        let Some(w) = writer.as_mut() else {
            return Ok(false);
        };
        match w.write(
            &self.io,
            &self.data,
            &self.data_path,
            &self.reserved,
            frozen,
        ) {
            Ok(()) => Ok(true),
            Err(e) if refused_here(&e, w.wrote) => {
                tracing::debug!("direct I/O refused on {}: {e}", self.data_path.display());
                *writer = None;
                Ok(false)
            }
            Err(e) => Err(format!("write {}: {e}", self.data_path.display())),
        }
    }

    /// Writes the frozen blocks into the data file with plain `pwritev` on this thread, even
    /// when the store's engine is io_uring: these are scattered buffered writes, which ext4
    /// cannot take without blocking, so io_uring would hand each one to a kernel worker
    /// thread, at the price of a context switch per block (docs/BENCHMARKS.md, "Where a
    /// replicated write's CPU goes").
    fn write_to_data_file(&self, frozen: &DirtyMap) -> Result<(), String> {
        let path = self.data_path.display();
        let mut runs: Vec<(u64, Vec<Bytes>)> = Vec::new();
        let mut run: Vec<Bytes> = Vec::new();
        let mut run_start = 0u64;
        let mut run_end = 0u64;
        let mut run_bytes = 0u64;
        let flush = |runs: &mut Vec<(u64, Vec<Bytes>)>| -> Result<(), String> {
            let result = runs
                .iter()
                .try_for_each(|(at, bufs)| crate::io::pwritev_all(&self.data, *at, bufs));
            runs.clear();
            result.map_err(|e| format!("write {path}: {e}"))
        };
        for (start, extent) in frozen.iter() {
            match &extent.state {
                BlockState::Data(bytes) => {
                    let joins = !run.is_empty()
                        && start == run_end
                        && run.len() < MAX_IOVECS
                        && run_bytes < MAX_WRITE;
                    if !joins && !run.is_empty() {
                        runs.push((run_start * BLOCK_SIZE, std::mem::take(&mut run)));
                        run_bytes = 0;
                    }
                    if run.is_empty() {
                        run_start = start;
                    }
                    run.push(bytes.clone());
                    run_bytes += bytes.len() as u64;
                    run_end = extent.end;
                }
                BlockState::Placed => {}
                BlockState::Zero { punch } => {
                    let (offset, len) = (start * BLOCK_SIZE, (extent.end - start) * BLOCK_SIZE);
                    zero_data_range(
                        &self.io,
                        &self.data,
                        &self.data_path,
                        &self.reserved,
                        *punch,
                        offset,
                        len,
                    )?;
                }
            }
            if runs.len() >= MAX_OUTSTANDING {
                flush(&mut runs)?;
            }
        }
        if !run.is_empty() {
            runs.push((run_start * BLOCK_SIZE, run));
        }
        flush(&mut runs)
    }
}

pub(crate) fn eager_threshold(capacity: u64) -> u64 {
    capacity / EAGER_FRACTION
}
