//! Opening and recovery: creating a store, opening it (lock, replay of the WAL from the
//! checkpoint, the threads), and closing it cleanly.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use tokio::sync::Notify;

use super::core::{
    Core, DirtyMaps, Epochs, Lifecycle, LogPositions, Rebuild, Replication, Waiters,
};
use super::files::{
    create_dir_all_durable, io_err, sync_dir, zero_fill, DATA, LOCK, SUPERBLOCK, WAL,
};
use super::reserved::ReservedBlocks;
use super::shared::{DurableMark, NoStoreObserver, Shared};
use super::writer_queue::WriterQueue;
use super::{flusher, placer, wal_writer, CreateOptions, OpenOptions, Store};
use crate::dirty::DirtyMap;
use crate::error::{Result, StorageError};
use crate::io::IoEngine;
use crate::superblock::{Superblock, FLAG_CLEAN};
use crate::types::{Epoch, Lsn, VolumeId, WalPos, BLOCK_SIZE};
use crate::wal::record::RecordKind;
use crate::wal::{self, ReplayInput, ReplayOutcome, WalLayout, MIN_WAL_CAPACITY};

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
        let lock = lock_store(dir)?;
        let mut files = open_files(dir, opts.read_only)?;
        let io = IoEngine::new(opts.io_mode).map_err(io_err(dir))?;
        let (replay, log) = replay_wal(&io, &files, dir)?;
        if !opts.read_only {
            begin_generation(&mut files, &replay)?;
        }
        let core = recovered_core(&files.sb, &replay, log, opts);
        let shared = share(io, files, core);
        let threads = if opts.read_only {
            Vec::new()
        } else {
            start_threads(&shared, dir, opts.flush_interval)?
        };
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
            if core.life.closing {
                return Ok(());
            }
            core.life.closing = true;
            core.log.last()
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
                core.log.checkpoint_lsn >= core.log.last()
                    && core.maps.active.is_empty()
                    && core.maps.flushing.is_none()
            };
            if applied {
                let mut sb = self
                    .shared
                    .superblock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                sb.flags |= FLAG_CLEAN;
                // The data file holds the volume as of the checkpoint and nothing newer: placed
                // writes raised `data_through` ahead of the log (`placement`), and a rebuild
                // base read from here must not claim to reflect entries that never existed.
                sb.data_through = sb.data_through.min(sb.checkpoint_lsn);
                result = sb.persist(&self.shared.sb_file, &self.shared.sb_path);
            }
        }
        self.stop_threads();
        result
    }

    fn stop_threads(&self) {
        {
            let mut core = self.shared.lock_core();
            core.life.stop();
        }
        self.shared.writer_cv.notify_all();
        self.shared.placer_cv.notify_all();
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

/// The store's files, open, and its superblock as read.
struct OpenFiles {
    sb_file: File,
    sb_path: PathBuf,
    sb: Superblock,
    wal: Arc<File>,
    wal_path: PathBuf,
    data: File,
    data_path: PathBuf,
}

/// What replay rebuilt of the log in memory.
struct ReplayedLog {
    /// The LSN replay started at (the tail's).
    first_lsn: Lsn,
    index: VecDeque<(Lsn, WalPos)>,
    dirty: DirtyMap,
    epoch_history: Vec<(Epoch, Lsn)>,
}

/// Takes the store's lock (an flock held as long as the returned file is open).
fn lock_store(dir: &Path) -> Result<File> {
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
    Ok(lock)
}

/// Opens the superblock, the WAL (whose header must match it) and the data file.
fn open_files(dir: &Path, read_only: bool) -> Result<OpenFiles> {
    let open_file = |name: &str| {
        let p = dir.join(name);
        File::options()
            .read(true)
            .write(!read_only)
            .open(&p)
            .map_err(io_err(&p))
            .map(|f| (f, p))
    };
    let (sb_file, sb_path) = open_file(SUPERBLOCK)?;
    let sb = Superblock::read(&sb_file, &sb_path)?;
    let (wal, wal_path) = open_file(WAL)?;
    wal::check_header(&wal, &wal_path, sb.volume_id, sb.wal_capacity)?;
    let (data, data_path) = open_file(DATA)?;
    Ok(OpenFiles {
        sb_file,
        sb_path,
        sb,
        wal: Arc::new(wal),
        wal_path,
        data,
        data_path,
    })
}

/// Replays the WAL from its tail: the index of its entries, the dirty map they make, and
/// the epochs they began.
fn replay_wal(
    io: &IoEngine,
    files: &OpenFiles,
    dir: &Path,
) -> Result<(ReplayOutcome, ReplayedLog)> {
    let sb = &files.sb;
    let mut dirty = DirtyMap::default();
    let mut index = VecDeque::new();
    let mut epoch_history = sb.epoch_history.clone();
    // Stores written before the tail LSN was recorded start at the checkpoint.
    let first_lsn = if sb.wal_tail_lsn == Lsn::ZERO {
        sb.checkpoint_lsn.next()
    } else {
        sb.wal_tail_lsn
    };
    let replay = wal::replay(
        ReplayInput {
            io,
            file: &files.wal,
            path: files.wal_path.clone(),
            layout: WalLayout {
                capacity: sb.wal_capacity,
            },
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
            files.wal_path.display(),
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
    let log = ReplayedLog {
        first_lsn,
        index,
        dirty,
        epoch_history,
    };
    Ok((replay, log))
}

/// Makes what replay found durable and starts a new generation of the log where it ended.
fn begin_generation(files: &mut OpenFiles, replay: &ReplayOutcome) -> Result<()> {
    // Replayed entries came from the file, but maybe only from the page cache (after a
    // kill -9 the kernel still had them): sync them before calling them durable, or a
    // FLUSH could be answered for entries a power loss would still take.
    crate::io::sync_data(&files.wal).map_err(io_err(&files.wal_path))?;
    let sb = &mut files.sb;
    // From now on the log may hold entries the data file lacks.
    sb.flags &= !FLAG_CLEAN;
    // Invariant (*a cut log never grows back*): every open starts a new WAL
    // generation at the first LSN it will write. Records left in the ring past the
    // point where replay stopped (after a torn page, say) carry an older generation;
    // once new entries fill the gap up to them, replay still refuses them instead of
    // reviving writes the log had dropped.
    sb.wal_generation = sb.wal_generation.wrapping_add(1);
    sb.generation_start = replay.next_lsn;
    sb.persist(&files.sb_file, &files.sb_path)
}

/// The in-memory state of a store just opened: the replayed log, durable through its end.
fn recovered_core(
    sb: &Superblock,
    replay: &ReplayOutcome,
    log: ReplayedLog,
    opts: &OpenOptions,
) -> Core {
    let last = replay.next_lsn.prev().max(sb.checkpoint_lsn);
    Core {
        log: LogPositions {
            next_lsn: replay.next_lsn,
            committed: sb.committed_lsn.max(replay.commit_hint),
            index: log.index,
            tail_lsn: log.first_lsn,
            generation: sb.wal_generation,
            head: replay.head,
            tail: sb.wal_tail,
            checkpoint_lsn: sb.checkpoint_lsn,
            written: last,
            durable: last,
        },
        epochs: Epochs {
            epoch: sb.epoch.max(replay.last_epoch),
            last: if replay.entries > 0 {
                replay.last_epoch
            } else {
                sb.checkpoint_epoch
            },
            history: log.epoch_history,
        },
        maps: DirtyMaps {
            active: log.dirty,
            flushing: None,
            checkpoint_gen: 0,
        },
        writer: WriterQueue {
            queue: Vec::new(),
            queued_bytes: 0,
            placing_bytes: 0,
            placed_through: Lsn::ZERO,
            to_copy: Vec::new(),
            copy_tickets: 0,
            copied: 0,
            placer_waiting: false,
            places: opts.place_large_writes,
            waiting: false,
        },
        waiters: Waiters {
            sync_target: last,
            list: Vec::new(),
        },
        repl: Replication {
            tap: None,
            retention_pin: opts.keep_retained_wal.then_some(log.first_lsn),
            pin_from_open: opts.keep_retained_wal,
            pin_yields: false,
            gate: None,
        },
        // A rebuild interrupted by a crash: resumed from its cursor only if the next primary
        // vouches for it (see `Store::begin_rebuild`).
        rebuild: sb
            .is_rebuilding()
            .then(|| Rebuild::new(sb.checkpoint_lsn, sb.wal_generation)),
        life: Lifecycle {
            failed: None,
            closing: opts.read_only,
            flush_requested: false,
            writer_stop: false,
            flusher_stop: false,
        },
    }
}

/// Puts the files and the core behind the store's shared handle.
fn share(io: IoEngine, files: OpenFiles, core: Core) -> Arc<Shared> {
    let durable = core.log.durable;
    let volume_size = files.sb.volume_size;
    Arc::new(Shared {
        io,
        layout: WalLayout {
            capacity: files.sb.wal_capacity,
        },
        volume_size,
        wal: files.wal,
        wal_path: files.wal_path,
        data: Arc::new(files.data),
        data_path: files.data_path,
        sb_file: files.sb_file,
        sb_path: files.sb_path,
        superblock: Mutex::new(files.sb),
        core: Mutex::new(core),
        writer_cv: Condvar::new(),
        placer_cv: Condvar::new(),
        copied_cv: Condvar::new(),
        flusher_cv: Condvar::new(),
        gate_cv: Condvar::new(),
        written_cv: Condvar::new(),
        space: Notify::new(),
        durable: DurableMark::new(durable),
        checkpoint_lock: Mutex::new(()),
        direct: Mutex::new(None),
        reserved: ReservedBlocks::new(volume_size / BLOCK_SIZE),
        observer: std::sync::RwLock::new(Arc::new(NoStoreObserver)),
    })
}

/// Starts the WAL writer, the placer (where large writes are placed) and the flusher.
fn start_threads(
    shared: &Arc<Shared>,
    dir: &Path,
    interval: Duration,
) -> Result<Vec<thread::JoinHandle<()>>> {
    let spawn = |name: &str, run: fn(Arc<Shared>, Duration)| {
        let s = shared.clone();
        thread::Builder::new()
            .name(name.into())
            .spawn(move || run(s, interval))
            .map_err(io_err(dir))
    };
    let mut threads = vec![spawn("blockrep-wal", |s, _| wal_writer::run(s))?];
    if shared.lock_core().writer.places {
        threads.push(spawn("blockrep-placer", |s, _| placer::run(s))?);
    }
    threads.push(spawn("blockrep-flusher", flusher::run)?);
    Ok(threads)
}
