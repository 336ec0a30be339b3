//! Opening and recovery: creating a store, opening it (lock, replay of the WAL from the
//! checkpoint, the threads), and closing it cleanly.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use tokio::sync::Notify;

use super::core::{self, Core};
use super::files::{
    create_dir_all_durable, io_err, sync_dir, zero_fill, DATA, LOCK, SUPERBLOCK, WAL,
};
use super::shared::{DurableMark, NoStoreObserver, Shared};
use super::{flusher, wal_writer, CreateOptions, OpenOptions, Store};
use crate::dirty::DirtyMap;
use crate::error::{Result, StorageError};
use crate::io::IoEngine;
use crate::superblock::{Superblock, FLAG_CLEAN};
use crate::types::{Lsn, VolumeId, BLOCK_SIZE};
use crate::wal::record::RecordKind;
use crate::wal::{self, ReplayInput, WalLayout, MIN_WAL_CAPACITY};

impl Store {
    /// Creates a new, empty store at `dir`, which must not exist yet. The store is built in a
    /// sibling temporary directory and renamed into place, so a crash never leaves a
    /// half-made store under the final name.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<VolumeId> {
        if opts.size == 0 || !opts.size.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::BadGeometry(format!(
                "size {} must be a positive multiple of {BLOCK_SIZE} bytes",
                opts.size
            )));
        }
        if opts.wal_capacity < MIN_WAL_CAPACITY || !opts.wal_capacity.is_multiple_of(BLOCK_SIZE) {
            return Err(StorageError::BadGeometry(format!(
                "WAL size {} must be a multiple of {BLOCK_SIZE} and at least {} MiB",
                opts.wal_capacity,
                MIN_WAL_CAPACITY >> 20
            )));
        }
        if dir.exists() {
            return Err(StorageError::AlreadyExists(dir.to_path_buf()));
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dir.file_name().ok_or_else(|| {
            StorageError::BadGeometry(format!("{} is not a directory name", dir.display()))
        })?;
        let tmp = parent.join(format!(
            ".{}.creating-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&tmp);
        create_dir_all_durable(&parent)?;
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let id = opts.volume_id.unwrap_or_else(VolumeId::random);
        let result = (|| -> Result<()> {
            let create = |name: &str| {
                let p = tmp.join(name);
                File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map_err(io_err(&p))
                    .map(|f| (f, p))
            };
            let (lock, _) = create(LOCK)?;
            drop(lock);
            let (data, data_path) = create(DATA)?;
            data.set_len(opts.size).map_err(io_err(&data_path))?;
            data.sync_all().map_err(io_err(&data_path))?;
            let (walf, wal_path) = create(WAL)?;
            zero_fill(&walf, wal::WAL_HEADER_LEN + opts.wal_capacity).map_err(io_err(&wal_path))?;
            wal::write_header(&walf, &wal_path, id, opts.wal_capacity)?;
            walf.sync_all().map_err(io_err(&wal_path))?;
            let (sbf, sb_path) = create(SUPERBLOCK)?;
            let mut sb = Superblock::new(id, opts.size, opts.wal_capacity);
            sb.persist_both(&sbf, &sb_path)?;
            sbf.sync_all().map_err(io_err(&sb_path))?;
            sync_dir(&tmp)
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, dir).map_err(io_err(dir))?;
        sync_dir(&parent)?;
        Ok(id)
    }

    /// Reads a store's superblock without opening (or locking) the store.
    pub fn read_superblock(dir: &Path) -> Result<Superblock> {
        let path = dir.join(SUPERBLOCK);
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StorageError::NotAStore(dir.to_path_buf()),
            _ => StorageError::io(&path, e),
        })?;
        Superblock::read(&file, &path)
    }

    /// Opens a store: takes its lock, replays the WAL from the checkpoint, and (unless
    /// read-only) starts the WAL writer and the flusher.
    pub fn open(dir: &Path, opts: &OpenOptions) -> Result<Store> {
        if !dir.join(SUPERBLOCK).exists() {
            return Err(StorageError::NotAStore(dir.to_path_buf()));
        }
        let lock_path = dir.join(LOCK);
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a descriptor owned by `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                StorageError::Locked(dir.to_path_buf())
            } else {
                StorageError::io(&lock_path, e)
            });
        }
        let open_file = |name: &str| {
            let p = dir.join(name);
            File::options()
                .read(true)
                .write(!opts.read_only)
                .open(&p)
                .map_err(io_err(&p))
                .map(|f| (f, p))
        };
        let (sb_file, sb_path) = open_file(SUPERBLOCK)?;
        let mut sb = Superblock::read(&sb_file, &sb_path)?;
        let (wal_file, wal_path) = open_file(WAL)?;
        wal::check_header(&wal_file, &wal_path, sb.volume_id, sb.wal_capacity)?;
        let (data_file, data_path) = open_file(DATA)?;
        let io = IoEngine::new(opts.io_mode).map_err(io_err(dir))?;
        let wal = Arc::new(wal_file);
        let layout = WalLayout {
            capacity: sb.wal_capacity,
        };
        let mut dirty = DirtyMap::default();
        let mut index = std::collections::VecDeque::new();
        let mut epoch_history = sb.epoch_history.clone();
        // Stores written before the tail LSN was recorded start at the checkpoint.
        let first_lsn = if sb.wal_tail_lsn == Lsn::ZERO {
            sb.checkpoint_lsn.next()
        } else {
            sb.wal_tail_lsn
        };
        let replay = wal::replay(
            ReplayInput {
                io: &io,
                file: &wal,
                path: wal_path.clone(),
                layout,
                volume_size: sb.volume_size,
                start: sb.wal_tail,
                first_lsn,
                clean: sb.is_clean(),
                generation: wal::Generation {
                    current: sb.wal_generation,
                    start: sb.generation_start,
                },
            },
            |pos, rec| {
                index.push_back((rec.lsn, pos));
                if rec.kind != RecordKind::Wrap
                    && crate::superblock::epoch_at(&epoch_history, rec.lsn) != Some(rec.epoch)
                {
                    // A replayed entry older than the checkpoint is already in the history.
                    epoch_history.retain(|(_, start)| *start < rec.lsn);
                    epoch_history.push((rec.epoch, rec.lsn));
                }
                dirty.apply(&rec);
            },
        )?;
        if let Some(at) = replay.torn_at {
            tracing::warn!(
                "{}: cut a torn record at file offset {at}; the log ends at LSN {}",
                wal_path.display(),
                replay.next_lsn.prev()
            );
        }
        if replay.entries > 0 {
            tracing::info!(
                "{}: replayed {} WAL entries (LSN {}..{})",
                dir.display(),
                replay.entries,
                first_lsn,
                replay.next_lsn.prev()
            );
        }
        if !opts.read_only {
            // Replayed entries came from the file, but maybe only from the page cache (after a
            // kill -9 the kernel still had them): sync them before calling them durable, or a
            // FLUSH could be answered for entries a power loss would still take.
            crate::io::sync_data(&wal).map_err(io_err(&wal_path))?;
            // From now on the log may hold entries the data file lacks.
            sb.flags &= !FLAG_CLEAN;
            // Invariant (*a cut log never grows back*): every open starts a new WAL
            // generation at the first LSN it will write. Records left in the ring past the
            // point where replay stopped (after a torn page, say) carry an older generation;
            // once new entries fill the gap up to them, replay still refuses them instead of
            // reviving writes the log had dropped.
            sb.wal_generation = sb.wal_generation.wrapping_add(1);
            sb.generation_start = replay.next_lsn;
            sb.persist(&sb_file, &sb_path)?;
        }
        let last = replay.next_lsn.prev().max(sb.checkpoint_lsn);
        let core = Core {
            epoch: sb.epoch.max(replay.last_epoch),
            last_epoch: if replay.entries > 0 {
                replay.last_epoch
            } else {
                sb.checkpoint_epoch
            },
            committed: sb.committed_lsn.max(replay.commit_hint),
            index,
            tail_lsn: first_lsn,
            retention_pin: opts.keep_retained_wal.then_some(first_lsn),
            pin_from_open: opts.keep_retained_wal,
            epoch_history,
            generation: sb.wal_generation,
            rebuild: sb.is_rebuilding().then(|| core::Rebuild {
                // A rebuild interrupted by a crash must start over: nothing of it is trusted.
                base: sb.checkpoint_lsn,
                touched: Default::default(),
            }),
            tap: None,
            next_lsn: replay.next_lsn,
            head: replay.head,
            tail: sb.wal_tail,
            checkpoint_lsn: sb.checkpoint_lsn,
            active: dirty,
            flushing: None,
            queue: Vec::new(),
            queued_bytes: 0,
            writer_waiting: false,
            written: last,
            durable: last,
            sync_target: last,
            waiters: Vec::new(),
            failed: None,
            checkpoint_gen: 0,
            gate: None,
            closing: opts.read_only,
            flush_requested: false,
            writer_stop: false,
            flusher_stop: false,
        };
        let shared = Arc::new(Shared {
            io,
            layout,
            volume_size: sb.volume_size,
            wal,
            wal_path,
            data: Arc::new(data_file),
            data_path,
            sb_file,
            sb_path,
            superblock: Mutex::new(sb),
            core: Mutex::new(core),
            writer_cv: Condvar::new(),
            flusher_cv: Condvar::new(),
            gate_cv: Condvar::new(),
            space: Notify::new(),
            durable: DurableMark::new(last),
            checkpoint_lock: Mutex::new(()),
            direct: Mutex::new(None),
            observer: std::sync::RwLock::new(Arc::new(NoStoreObserver)),
        });
        let mut threads = Vec::new();
        if !opts.read_only {
            let s = shared.clone();
            threads.push(
                thread::Builder::new()
                    .name("blockrep-wal".into())
                    .spawn(move || wal_writer::run(s))
                    .map_err(io_err(dir))?,
            );
            let s = shared.clone();
            let interval = opts.flush_interval;
            threads.push(
                thread::Builder::new()
                    .name("blockrep-flusher".into())
                    .spawn(move || flusher::run(s, interval))
                    .map_err(io_err(dir))?,
            );
        }
        Ok(Store {
            shared,
            dir: dir.to_path_buf(),
            threads: Mutex::new(threads),
            read_only: opts.read_only,
            _lock: lock,
            replay,
        })
    }

    /// Makes everything durable, checkpoints, marks the store clean and stops its threads.
    /// Called on graceful shutdown; afterwards every call fails with `Closed`.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let target = {
            let mut core = self.shared.lock_core();
            if core.closing {
                return Ok(());
            }
            core.closing = true;
            core.next_lsn.prev()
        };
        // A gated checkpoint in progress stops waiting: this one goes through.
        self.shared.gate_cv.notify_all();
        let mut result = self
            .shared
            .wait_durable_blocking(target)
            .and_then(|_| self.shared.checkpoint())
            .map_err(StorageError::Failed);
        if result.is_ok() {
            // Clean means every entry is durable and applied to the data file; the log may
            // still hold entries below the checkpoint that a lagging replica pins, and those
            // are history, not work for the next open.
            let applied = {
                let core = self.shared.lock_core();
                core.checkpoint_lsn >= core.next_lsn.prev()
                    && core.active.is_empty()
                    && core.flushing.is_none()
            };
            if applied {
                let mut sb = self
                    .shared
                    .superblock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                sb.flags |= FLAG_CLEAN;
                result = sb.persist(&self.shared.sb_file, &self.shared.sb_path);
            }
        }
        self.stop_threads();
        result
    }

    fn stop_threads(&self) {
        {
            let mut core = self.shared.lock_core();
            core.writer_stop = true;
            core.flusher_stop = true;
        }
        self.shared.writer_cv.notify_all();
        self.shared.flusher_cv.notify_all();
        self.shared.gate_cv.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Without `close` this is like a crash of the process: what was written stays in the
        // files, nothing more is promised.
        self.stop_threads();
    }
}
