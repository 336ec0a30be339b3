//! A volume store: the directory that holds one volume, and the engine that serves it.
//!
//! ```text
//! DIR/superblock  identity and checkpoint (two slots, see `superblock`)
//! DIR/wal         the write-ahead log ring
//! DIR/data        the volume image as of the checkpoint (sparse)
//! DIR/lock        flock'ed while a process has the store open
//! ```
//!
//! This file holds the public types and `Store`'s accessors; the rest of `Store` is split by
//! who calls it: `lifecycle` (create, open and recovery, close), `data_path` (the client's
//! reads and writes), `primary` (what replication ships from) and `replica` (what it applies
//! on a follower). Below them: `shared` and `core` (the state), `wal_writer` and `flusher`
//! (the threads), `placement` (large writes written once, to the data file), `direct`, `wal_direct` and `aligned` (O_DIRECT), `files` and `reserved`
//! (file helpers).

mod aligned;
mod core;
mod data_path;
mod direct;
mod files;
mod flusher;
mod lifecycle;
mod placement;
mod placer;
mod primary;
mod rebuild_cursor;
mod replica;
mod reserved;
mod shared;
mod wal_direct;
mod wal_writer;
mod writer_queue;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;

use self::shared::Shared;
use crate::error::{Result, StorageError};
use crate::io::IoMode;
use crate::superblock::Superblock;
use crate::types::{Epoch, Lsn, VolumeId};
use crate::wal::ReplayOutcome;

pub use self::core::WalHold;
pub use self::files::create_dir_all_durable;
pub use self::rebuild_cursor::ResumeRefusal;
pub use self::shared::StoreObserver;

/// Largest single request the engine takes (matches the NBD frontend's maximum payload).
pub const MAX_REQUEST: u64 = 32 << 20;

/// Geometry chosen when a store is created.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub wal_capacity: u64,
    /// Join an existing volume (a replica created for it); `None` makes a new volume.
    pub volume_id: Option<VolumeId>,
}

impl CreateOptions {
    pub const DEFAULT_WAL_CAPACITY: u64 = 256 << 20;
}

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub io_mode: IoMode,
    /// How often the flusher checkpoints when the WAL is not filling up.
    pub flush_interval: Duration,
    /// Open only to read (export, inspection): no threads, no superblock writes.
    pub read_only: bool,
    /// Keep the WAL that the last run kept past its checkpoint (for lagging replicas) until
    /// [`Store::set_retention_pin`] says otherwise. A primary with replicas opens this way: it
    /// does not know yet what they need, and its flusher must not recycle any of it first.
    pub keep_retained_wal: bool,
    /// Large writes go straight to the data file, with only a record of them in the WAL
    /// (see `placement`); off, every write is logged with its data.
    pub place_large_writes: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            io_mode: IoMode::Auto,
            flush_interval: Duration::from_secs(1),
            read_only: false,
            keep_retained_wal: false,
            place_large_writes: true,
        }
    }
}

/// One contiguous part of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSegment {
    Data(Bytes),
    /// This many bytes read as zeroes (a hole, a trim, written zeroes).
    Zeroes(u64),
}

impl ReadSegment {
    pub fn len(&self) -> u64 {
        match self {
            ReadSegment::Data(b) => b.len() as u64,
            ReadSegment::Zeroes(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Allocation state of a byte range, as NBD's `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub length: u64,
    /// Not allocated (never written, or trimmed).
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

/// A point-in-time summary for `blockrep inspect` and the metrics.
#[derive(Debug, Clone)]
pub struct StoreInfo {
    pub volume_id: VolumeId,
    pub volume_size: u64,
    pub epoch: Epoch,
    pub next_lsn: Lsn,
    pub durable_lsn: Lsn,
    pub checkpoint_lsn: Lsn,
    pub wal_capacity: u64,
    pub wal_used: u64,
    pub dirty_bytes: u64,
    pub io_engine: &'static str,
    /// The oldest entry the WAL still holds.
    pub oldest_retained: Lsn,
    /// What keeps checkpointed entries in the WAL, and from which LSN.
    pub hold: Option<(Lsn, WalHold)>,
}

/// An open volume store. All methods take `&self`; share it behind an `Arc`.
pub struct Store {
    shared: Arc<Shared>,
    dir: PathBuf,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    read_only: bool,
    /// Held for the life of the store; the flock is released when it closes.
    _lock: File,
    replay: ReplayOutcome,
}

impl Store {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.shared.volume_size
    }

    pub fn volume_id(&self) -> VolumeId {
        self.superblock().volume_id
    }

    /// What WAL replay found when the store was opened.
    pub fn replay_outcome(&self) -> &ReplayOutcome {
        &self.replay
    }

    /// Reports WAL writes, syncs and checkpoints to `observer` from now on.
    pub fn set_observer(&self, observer: Arc<dyn StoreObserver>) {
        if let Ok(mut o) = self.shared.observer.write() {
            *o = observer;
        }
    }

    pub fn io_engine(&self) -> &'static str {
        self.shared.io.name()
    }

    /// A copy of the superblock as last persisted.
    pub fn superblock(&self) -> Superblock {
        self.shared
            .superblock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This store's own identity (distinct for every copy of a volume).
    pub fn store_id(&self) -> VolumeId {
        self.superblock().store_id
    }

    /// The newest entry's LSN (`Lsn(0)` for an empty store).
    pub fn head(&self) -> Lsn {
        self.shared.lock_core().log.last()
    }

    /// The highest LSN durable in this store's WAL.
    pub fn durable(&self) -> Lsn {
        self.shared.durable.get()
    }

    /// The highest LSN this store knows to be committed.
    pub fn committed(&self) -> Lsn {
        self.shared.lock_core().log.committed
    }

    /// Records that the volume's commit mode is met through `lsn`. The knowledge reaches disk
    /// with the next WAL record header or checkpoint.
    pub fn set_committed(&self, lsn: Lsn) {
        let mut core = self.shared.lock_core();
        if lsn > core.log.committed {
            core.log.committed = lsn;
        }
    }

    /// The epoch of the newest entry (the store's epoch if it has none since its checkpoint).
    pub fn head_epoch(&self) -> Epoch {
        self.shared.lock_core().epochs.last
    }

    /// The epoch entry `lsn` was written at, if the store still knows (see
    /// [`Superblock::epoch_history`]). `Lsn(0)` is epoch 0 by definition.
    pub fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        let core = self.shared.lock_core();
        if lsn > core.log.last() {
            return None;
        }
        crate::superblock::epoch_at(&core.epochs.history, lsn)
    }

    /// Where each epoch begins in this store's log.
    pub fn epoch_history(&self) -> Vec<(Epoch, Lsn)> {
        self.shared.lock_core().epochs.history.clone()
    }

    /// True while the store has never held an entry: it can join any volume of its size.
    pub fn is_blank(&self) -> bool {
        let sb = self.superblock();
        let core = self.shared.lock_core();
        core.log.next_lsn == Lsn(1) && sb.checkpoint_lsn == Lsn::ZERO && sb.epoch == Epoch(0)
    }

    pub fn info(&self) -> StoreInfo {
        // Lock order: superblock before core (as in `begin_epoch`); never both at once here.
        let volume_id = self.volume_id();
        let core = self.shared.lock_core();
        StoreInfo {
            volume_id,
            volume_size: self.shared.volume_size,
            epoch: core.epochs.epoch,
            next_lsn: core.log.next_lsn,
            durable_lsn: core.log.durable,
            checkpoint_lsn: core.log.checkpoint_lsn,
            wal_capacity: self.shared.layout.capacity,
            wal_used: core.log.wal_used(),
            dirty_bytes: core.maps.data_bytes(),
            io_engine: self.shared.io.name(),
            oldest_retained: core.log.tail_lsn,
            hold: core.repl.hold(),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.shared.volume_size => Ok(()),
            _ => Err(StorageError::OutOfRange {
                offset,
                length: len,
                size: self.shared.volume_size,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
