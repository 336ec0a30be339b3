//! The replica's side: appending entries received from the primary, adopting its epoch
//! and volume, a rebuild from its base image (begin, apply base, finish), and cutting an
//! uncommitted tail after a failover (`truncate_after`).

use std::pin::pin;
use std::sync::MutexGuard;

use bytes::Bytes;

use super::core::{KeptLog, Rebuild};
use super::files::io_err;
use super::Store;
use crate::dirty::{BlockState, DirtyMap};
use crate::error::{Result, StorageError};
use crate::superblock::{Role, Superblock, FLAG_CLEAN, FLAG_REBUILDING};
use crate::types::{Epoch, Lsn, VolumeId, WalPos, BLOCK_SIZE};
use crate::wal::{self, ReplayInput};

impl Store {
    /// Appends an entry received from the primary, with its own LSN and epoch. Its LSN must
    /// be exactly the next one; the caller (the replica's protocol core) has already dropped
    /// duplicates and refused gaps. Waits for WAL space like any write.
    ///
    /// Like a client's write, an entry that will take space in the data file has it
    /// reserved first: on a full filesystem the entry is refused with
    /// [`StorageError::NoSpace`] before anything of it is logged, and the store goes on (the
    /// primary resends it once space is freed) instead of a later checkpoint failing it.
    pub async fn append_replicated(&self, record: crate::WalRecord) -> Result<Lsn> {
        self.check_range(record.offset, record.length)?;
        let first = record.offset / BLOCK_SIZE;
        let end = (record.offset + record.length).div_ceil(BLOCK_SIZE);
        let takes_space = matches!(
            record.kind,
            crate::RecordKind::Write | crate::RecordKind::WriteZeroes { punch: false }
        );
        if takes_space && end > first {
            self.reserve(first, end)?;
        }
        loop {
            let mut space = pin!(self.shared.space.notified());
            space.as_mut().enable();
            {
                let mut core = self.shared.lock_core();
                core.check_writable()?;
                if record.lsn != core.log.next_lsn {
                    return Err(StorageError::LsnGap {
                        expected: core.log.next_lsn,
                        got: record.lsn,
                    });
                }
                if let Some(lsn) = core.try_push(&self.shared.layout, record.clone()) {
                    self.after_append(&mut core);
                    return Ok(lsn);
                }
                self.shared.wait_for_room(&mut core);
            }
            space.await;
        }
    }

    /// Keeps the WAL entries after `committed` through every checkpoint (a gated one, one
    /// past the gate, a clean close's), while the WAL has room: a write that finds it full
    /// takes the hold back. Set by a replica at each committed LSN it learns.
    ///
    /// Why: this store may be promoted, and the old primary's log holds at least the
    /// committed prefix (its own fsync gates every commit mode). Whatever of ours it lacks
    /// after that is then still in our WAL when it rejoins, and it catches up from there
    /// (`keep_retained_wal` keeps the hold across the restart into a primary) instead of
    /// being rebuilt because our data file had passed its log end.
    pub fn keep_wal_after(&self, committed: Lsn) {
        // No checkpoint is asked for: a hold that moves up only lets the next one release
        // more, and an extra checkpoint at each commit would race the gate (one frozen just
        // as an entry past the commit arrives waits for it, then gives its map back).
        self.shared
            .lock_core()
            .repl
            .set_yielding_pin(committed.next());
    }

    /// Makes this store a replica at `epoch`, claimed by the primary store `owner`. The
    /// epoch is fsynced before this returns. The caller decides whether the claim is valid.
    pub fn adopt_epoch(&self, epoch: Epoch, owner: VolumeId) -> Result<()> {
        let mut sb = self
            .shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if epoch < sb.epoch {
            return Err(StorageError::EpochRegression {
                requested: epoch,
                current: sb.epoch,
            });
        }
        if sb.epoch == epoch && sb.epoch_owner == owner && sb.role == Role::Replica {
            return Ok(());
        }
        sb.epoch = epoch;
        sb.epoch_owner = owner;
        sb.role = Role::Replica;
        sb.persist(&self.shared.sb_file, &self.shared.sb_path)?;
        self.shared.lock_core().epochs.epoch = epoch;
        Ok(())
    }

    /// Makes a blank store part of the volume `volume_id` (a replica joining it). Refused
    /// for a store that has held anything.
    pub fn adopt_volume(&self, volume_id: VolumeId) -> Result<()> {
        if !self.is_blank() {
            return Err(StorageError::BadGeometry(format!(
                "{}: only a blank store can join another volume",
                self.dir.display()
            )));
        }
        let mut sb = self
            .shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        wal::write_header(
            &self.shared.wal,
            &self.shared.wal_path,
            volume_id,
            sb.wal_capacity,
        )?;
        self.shared
            .wal
            .sync_data()
            .map_err(io_err(&self.shared.wal_path))?;
        sb.volume_id = volume_id;
        sb.persist(&self.shared.sb_file, &self.shared.sb_path)
    }

    /// True while a rebuild is incomplete: the store's contents cannot be trusted.
    pub fn is_rebuilding(&self) -> bool {
        self.superblock().is_rebuilding()
    }

    /// Before the log is reset or cut: every entry appended so far is written and durable
    /// (nothing moves under the change), no checkpoint runs, and the superblock is ours.
    /// Returns the head it waited for and the two guards (lock order: checkpoint, then
    /// superblock, then core).
    fn quiesce_log(&self) -> Result<(Lsn, MutexGuard<'_, ()>, MutexGuard<'_, Superblock>)> {
        let head = self.head();
        self.shared
            .wait_durable_blocking(head)
            .map_err(StorageError::Failed)?;
        let no_checkpoint = self
            .shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let sb = self
            .shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok((head, no_checkpoint, sb))
    }

    /// Replica side: starts a rebuild. The log is reset to begin after `base` (in a new
    /// generation, so nothing left in the ring can be mistaken for the new entries), the
    /// store is marked rebuilding (persisted first), and from now on entries are appended as
    /// usual while base blocks arrive through [`Store::apply_base`].
    ///
    /// With `resume` (the offset of this store's cursor, which the primary vouched for), the
    /// base already durable below it is kept and the cursor with it; the WAL line starts over
    /// after `base` all the same, so every block written since the base is written again.
    /// Without it, any cursor is dropped: nothing of an earlier base is trusted.
    pub fn begin_rebuild(
        &self,
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
        resume: Option<u64>,
    ) -> Result<()> {
        let (_, _no_checkpoint, mut sb) = self.quiesce_log()?;
        let mut core = self.shared.lock_core();
        core.check_writable()?;
        let generation = sb.wal_generation.wrapping_add(1);
        let rebuild = match resume {
            None => Rebuild::new(base, generation),
            Some(through) => match &sb.rebuild_cursor {
                Some(c)
                    if sb.is_rebuilding()
                        && c.base == base
                        && c.history == history
                        && c.through == through =>
                {
                    Rebuild::resumed(base, generation, through, c.proof)
                }
                other => {
                    return Err(StorageError::Failed(format!(
                        "cannot resume a rebuild from base {base} at {through}: this store's \
                         cursor is {other:?}"
                    )))
                }
            },
        };
        let base_epoch = crate::superblock::epoch_at(&history, base).unwrap_or(Epoch(0));
        sb.flags |= FLAG_REBUILDING;
        sb.flags &= !FLAG_CLEAN;
        if resume.is_none() {
            sb.rebuild_cursor = None;
            // Nothing of the data file is trusted: base chunks and the WAL line write every
            // block again. Lowered here so that a cursor's proof, raised with every
            // checkpoint past it, starts from this log's own LSNs (a store rebuilt in place
            // kept its old log's, maybe far past this one's head, and wrote no cursor).
            sb.data_through = base;
        }
        sb.checkpoint_lsn = base;
        sb.checkpoint_epoch = base_epoch;
        sb.wal_tail = core.log.head;
        sb.wal_tail_lsn = base.next();
        sb.wal_generation = generation;
        sb.generation_start = base.next();
        sb.epoch_history = history.clone();
        sb.persist(&self.shared.sb_file, &self.shared.sb_path)?;
        core.restart_for_rebuild(base, history, base_epoch, sb.wal_generation, rebuild);
        self.shared.durable.publish(base);
        Ok(())
    }

    /// Replica side: base image contents for `[offset, offset+len)` (block-aligned): `Some`
    /// data, or `None` for a hole, which the primary says may reflect entries through
    /// `reflects`. Blocks already written by WAL entries since the rebuild began are skipped.
    /// Waits while too much base data is waiting for the flusher.
    pub async fn apply_base(
        &self,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        reflects: Lsn,
    ) -> Result<()> {
        const MAX_PENDING: u64 = 128 << 20;
        const REBUILD_CHECKPOINT_BYTES: u64 = 8 << 20;
        self.check_range(offset, len)?;
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::BadGeometry(
                "base chunk is not block-aligned".into(),
            ));
        }
        let (first, end) = (offset / BLOCK_SIZE, (offset + len) / BLOCK_SIZE);
        // Base data takes its blocks in the data file before it is taken in, as an entry
        // does (see `append_replicated`): on a full filesystem the chunk is refused with
        // `NoSpace` and counts as not received, instead of a checkpoint failing the store.
        if data.is_some() && end > first {
            self.reserve(first, end)?;
        }
        loop {
            let mut space = pin!(self.shared.space.notified());
            space.as_mut().enable();
            {
                let mut core = self.shared.lock_core();
                core.check_writable()?;
                let pending = core.maps.data_bytes();
                if pending < MAX_PENDING || data.is_none() {
                    let Some(rebuild) = &mut core.rebuild else {
                        return Err(StorageError::Failed("no rebuild in progress".into()));
                    };
                    rebuild.received(offset + len, reflects);
                    let base = rebuild.base;
                    let fresh = rebuild.touched.uncovered(first, end);
                    for (s, e) in fresh {
                        let state = match &data {
                            Some(d) => BlockState::Data(d.slice(
                                ((s - first) * BLOCK_SIZE) as usize
                                    ..((e - first) * BLOCK_SIZE) as usize,
                            )),
                            None => BlockState::Zero { punch: true },
                        };
                        core.maps.active.insert(s, e, base, state);
                    }
                    // Small checkpoints keep the data file's writeback going while base
                    // data streams in, so the one that ends the rebuild has little left.
                    if core.maps.active.data_bytes() >= REBUILD_CHECKPOINT_BYTES {
                        self.shared.request_flush(&mut core);
                    }
                    return Ok(());
                }
                self.shared.request_flush(&mut core);
            }
            space.await;
        }
    }

    /// Replica side: the base image is complete and the WAL has been applied through what the
    /// primary asked for. Everything is made durable (base blocks exist only in memory until
    /// a checkpoint writes them), then the store stops being marked rebuilding.
    pub fn finish_rebuild(&self) -> Result<()> {
        let head = self.head();
        let started = std::time::Instant::now();
        self.shared
            .wait_durable_blocking(head)
            .and_then(|_| self.shared.checkpoint())
            .map_err(StorageError::Failed)?;
        tracing::debug!(
            "rebuild: last checkpoint took {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        let mut sb = self
            .shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        sb.flags &= !FLAG_REBUILDING;
        sb.rebuild_cursor = None;
        sb.persist(&self.shared.sb_file, &self.shared.sb_path)?;
        self.shared.lock_core().rebuild = None;
        Ok(())
    }

    /// Replica side: discards every entry after `keep`, as if it had never been written: the
    /// uncommitted tail an old primary (or a replica that heard more of it) holds after a
    /// failover. The log continues at `keep + 1` in a new generation, so the discarded
    /// records left in the ring can never be replayed (*a cut log never grows back*).
    ///
    /// Invariant (*a log is cut only where the data file is not ahead*): the cut is refused
    /// when the data file may hold a discarded entry (`keep` below the checkpoint or below
    /// `data_through`), when it would drop an entry the store knows committed, when the
    /// entries after the checkpoint are no longer all in the WAL, or during a rebuild. The
    /// caller then rebuilds the copy instead.
    pub fn truncate_after(&self, keep: Lsn) -> Result<()> {
        if keep >= self.head() {
            return Ok(());
        }
        let (head, _no_checkpoint, mut sb) = self.quiesce_log()?;
        let start = self.cut_start(keep, head, &sb)?;
        let (new_head, active) = self.replay_kept(keep, head, start, &sb)?;
        self.commit_cut(keep, head, new_head, active, &mut sb)
    }

    /// Where the entries a cut after `keep` keeps begin (the one after the checkpoint): its
    /// position, its LSN and the log's generation. Refuses the cut for the reasons
    /// `truncate_after` gives.
    fn cut_start(&self, keep: Lsn, head: Lsn, sb: &Superblock) -> Result<(WalPos, Lsn, u16)> {
        let refuse = |reason: String| Err(StorageError::CannotTruncate { keep, reason });
        let core = self.shared.lock_core();
        core.check_writable()?;
        if core.rebuild.is_some() {
            return refuse("a rebuild is in progress".into());
        }
        if core.log.last() != head || !core.writer.queue.is_empty() || core.log.written < head {
            return refuse("entries are still being appended".into());
        }
        if keep < core.log.checkpoint_lsn {
            return refuse(format!(
                "the data file holds entries through {}",
                core.log.checkpoint_lsn
            ));
        }
        if keep < sb.data_through {
            return refuse(format!(
                "the data file may hold entries through {}",
                sb.data_through
            ));
        }
        if keep < core.log.committed {
            return refuse(format!(
                "entries through {} are committed",
                core.log.committed
            ));
        }
        let first = core.log.checkpoint_lsn.next();
        let i = core.log.index.partition_point(|(lsn, _)| *lsn < first);
        match core.log.index.get(i) {
            Some(&(lsn, pos)) if lsn == first => Ok((pos, first, core.log.generation)),
            _ => refuse(format!(
                "entry {first} is no longer in the WAL (the oldest is {})",
                core.log.tail_lsn
            )),
        }
    }

    /// Reads the entries from `start` through `keep` back from the WAL: where the head goes
    /// after the cut, and the dirty map they make. A discarded entry may have overwritten a
    /// block whose kept value only the log still has, so the map is rebuilt, not trimmed.
    fn replay_kept(
        &self,
        keep: Lsn,
        head: Lsn,
        (start, start_lsn, generation): (WalPos, Lsn, u16),
        sb: &Superblock,
    ) -> Result<(WalPos, DirtyMap)> {
        let mut active = DirtyMap::default();
        // Right after the last kept record (not where the first discarded one sits: a wrap
        // marker of the discarded entry may lie between, and replay would stop at it).
        let mut new_head = start;
        let replay = wal::replay(
            ReplayInput {
                io: &self.shared.io,
                file: &self.shared.wal,
                path: self.shared.wal_path.clone(),
                layout: self.shared.layout,
                volume_size: self.shared.volume_size,
                start,
                first_lsn: start_lsn,
                clean: true,
                generation: wal::Generation {
                    current: generation,
                    start: sb.generation_start,
                },
            },
            |pos, rec| {
                if rec.lsn > keep {
                    return;
                }
                new_head = WalPos(pos.0 + rec.encoded_len());
                active.apply(&rec);
            },
        )?;
        if replay.next_lsn <= head {
            return Err(StorageError::CannotTruncate {
                keep,
                reason: format!(
                    "the WAL reads back only through {}, the log ends at {head}",
                    replay.next_lsn.prev()
                ),
            });
        }
        Ok((new_head, active))
    }

    /// Persists the cut (a new generation from `keep + 1`, the epochs through `keep`), then
    /// makes memory agree: the log ends at `keep`, its next record goes at `new_head`.
    fn commit_cut(
        &self,
        keep: Lsn,
        head: Lsn,
        new_head: WalPos,
        active: DirtyMap,
        sb: &mut Superblock,
    ) -> Result<()> {
        let mut core = self.shared.lock_core();
        let history = crate::superblock::history_through(&core.epochs.history, keep);
        let keep_epoch = crate::superblock::epoch_at(&history, keep).unwrap_or(sb.checkpoint_epoch);
        sb.flags &= !FLAG_CLEAN;
        sb.wal_generation = sb.wal_generation.wrapping_add(1);
        sb.generation_start = keep.next();
        sb.epoch_history = history.clone();
        if let Err(e) = sb.persist(&self.shared.sb_file, &self.shared.sb_path) {
            // The superblock on disk may already cut the log; memory must not disagree.
            core.fail(format!("persisting a cut of the log after {keep}: {e}"));
            return Err(e);
        }
        let kept = KeptLog {
            last: keep,
            head: new_head,
            active,
            history,
            last_epoch: keep_epoch,
        };
        core.cut(kept, sb.wal_generation);
        self.shared.durable.publish(keep);
        tracing::info!("cut the log after entry {keep} (it ended at {head})");
        Ok(())
    }
}
