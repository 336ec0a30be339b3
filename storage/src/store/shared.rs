//! What the store's threads and callers share: the files, the core behind its mutex, the
//! condition variables that wake the WAL writer and the flusher, the published durable LSN,
//! and the waiting for durability and for WAL space.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use super::core::{Core, YieldedPin};
use super::direct::DirectWriter;
use super::reserved::ReservedBlocks;
use crate::error::{Result, StorageError};
use crate::io::IoEngine;
use crate::superblock::Superblock;
use crate::types::Lsn;
use crate::wal::WalLayout;

/// Told about the store's own I/O (for metrics). Called once per WAL batch, sync or
/// checkpoint, never per request.
pub trait StoreObserver: Send + Sync + 'static {
    fn wal_write(&self, bytes: u64, latency: Duration);
    fn wal_sync(&self, latency: Duration);
    fn checkpoint(&self, latency: Duration);
    /// `bytes` of large writes went to the data file directly (see `placement`).
    fn placed(&self, bytes: u64) {
        let _ = bytes;
    }
}

pub(super) struct NoStoreObserver;

impl StoreObserver for NoStoreObserver {
    fn wal_write(&self, _: u64, _: Duration) {}
    fn wal_sync(&self, _: Duration) {}
    fn checkpoint(&self, _: Duration) {}
}

pub(crate) struct Shared {
    pub(super) io: IoEngine,
    pub(super) layout: WalLayout,
    pub(super) volume_size: u64,
    pub(super) wal: Arc<File>,
    pub(super) wal_path: PathBuf,
    pub(super) data: Arc<File>,
    pub(super) data_path: PathBuf,
    pub(super) sb_file: File,
    pub(super) sb_path: PathBuf,
    /// Lock order: `superblock` before `core`, never the reverse.
    pub(super) superblock: Mutex<Superblock>,
    pub(super) core: Mutex<Core>,
    /// Wakes the WAL writer.
    pub(super) writer_cv: Condvar,
    /// Wakes the placer (see `placer`).
    pub(super) placer_cv: Condvar,
    /// Signalled when the placer has written placed data (or the store failed).
    pub(super) copied_cv: Condvar,
    /// Wakes the flusher.
    pub(super) flusher_cv: Condvar,
    /// Wakes a gated checkpoint when the gate moves (or the store stops).
    pub(super) gate_cv: Condvar,
    /// Signalled when the WAL writer has written a round (or failed).
    pub(super) written_cv: Condvar,
    /// Signalled when the flusher frees WAL space (or the store fails).
    pub(super) space: Notify,
    /// `core.log.durable`, published for lock-free reads and for watchers.
    pub(super) durable: DurableMark,
    pub(super) checkpoint_lock: Mutex<()>,
    /// The data file opened with O_DIRECT, for rebuild base data (see
    /// `direct::DirectWriter`); opened on first use, `None` inside once it proved unusable.
    pub(super) direct: Mutex<Option<Option<DirectWriter>>>,
    /// The data file's blocks whose space is known to be taken.
    pub(super) reserved: ReservedBlocks,
    pub(super) observer: std::sync::RwLock<Arc<dyn StoreObserver>>,
}

/// The store's durable LSN, readable without the core lock and watchable. Written only
/// under the core lock, right after `core.log.durable` changes, so the two never disagree for
/// longer than that lock is held.
pub(super) struct DurableMark {
    lsn: AtomicU64,
    watch: tokio::sync::watch::Sender<Lsn>,
}

impl DurableMark {
    pub(super) fn new(lsn: Lsn) -> Self {
        DurableMark {
            lsn: AtomicU64::new(lsn.0),
            watch: tokio::sync::watch::Sender::new(lsn),
        }
    }

    pub(super) fn get(&self) -> Lsn {
        Lsn(self.lsn.load(Ordering::Acquire))
    }

    pub(super) fn publish(&self, lsn: Lsn) {
        self.lsn.store(lsn.0, Ordering::Release);
        self.watch.send_if_modified(|current| {
            let changed = *current != lsn;
            *current = lsn;
            changed
        });
    }

    pub(super) fn watch(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.watch.subscribe()
    }
}

impl Shared {
    pub(super) fn observer(&self) -> Arc<dyn StoreObserver> {
        self.observer
            .read()
            .map(|o| o.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub(super) fn lock_core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock would be a bug in in-memory bookkeeping; the state
        // is still the best we have, so keep serving rather than poisoning every caller.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers interest in `target` becoming durable and wakes the writer.
    pub(super) fn durable_waiter(
        &self,
        target: Lsn,
    ) -> Result<Option<oneshot::Receiver<Result<(), String>>>> {
        let mut core = self.lock_core();
        if let Some(msg) = &core.life.failed {
            return Err(StorageError::Failed(msg.clone()));
        }
        if core.log.durable >= target {
            return Ok(None);
        }
        if core.life.writer_stop {
            // The writer may have exited already: nobody would ever answer.
            return Err(StorageError::Closed);
        }
        let (done, rx) = oneshot::channel();
        core.waiters.add(target, done);
        self.wake_writer(&mut core);
        Ok(Some(rx))
    }

    pub(super) fn wait_durable_blocking(&self, target: Lsn) -> Result<(), String> {
        match self.durable_waiter(target).map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(rx) => rx
                .blocking_recv()
                .unwrap_or_else(|_| Err("the WAL writer stopped".into())),
        }
    }

    pub(super) async fn wait_durable(&self, target: Lsn) -> Result<()> {
        match self.durable_waiter(target)? {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(msg)) => Err(StorageError::Failed(msg)),
                Err(_) => Err(StorageError::Closed),
            },
        }
    }

    pub(super) fn wake_placer(&self, core: &mut Core) {
        if core.writer.placer_waiting && !core.writer.to_copy.is_empty() {
            core.writer.placer_waiting = false;
            self.placer_cv.notify_one();
        }
    }

    pub(super) fn wake_writer(&self, core: &mut Core) {
        if core.writer.waiting {
            core.writer.waiting = false;
            self.writer_cv.notify_one();
        }
    }

    /// An append found the WAL full: a pin nobody has confirmed since the open, or a
    /// replica's hold past its committed LSN, gives way (see `Core::pin_from_open`,
    /// `Core::pin_yields`), and the flusher is asked to make room.
    pub(super) fn wait_for_room(&self, core: &mut Core) {
        match core.repl.drop_open_pin() {
            Some(YieldedPin::FromOpen) => tracing::warn!(
                "the WAL is full before replication started: releasing what it kept for replicas"
            ),
            Some(YieldedPin::Replica) => {
                tracing::debug!("the WAL is full: releasing what it kept past the committed LSN")
            }
            None => {}
        }
        self.request_flush(core);
    }

    pub(super) fn request_flush(&self, core: &mut Core) {
        if !core.life.flush_requested {
            core.life.flush_requested = true;
            self.flusher_cv.notify_one();
        }
    }
}
