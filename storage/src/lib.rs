//! blockrep-storage: the local engine of every node.
//!
//! It owns a volume store (a directory holding a superblock, a write-ahead log and a sparse
//! data file) and everything that keeps it consistent: checksummed WAL records with dense LSNs,
//! group commit, the dirty map that serves reads of data still only in the WAL, the flusher
//! that checkpoints into the data file and recycles the WAL, crash recovery on open, and the
//! I/O backends (io_uring, or plain threads as a fallback).
//!
//! It must never know about NBD, replicas or the network: the frontend talks to it through
//! the binary's volume adapter, and replication (later) drives it through its public API.

mod arena;
mod dirty;
pub mod error;
pub mod io;
mod store;
mod superblock;
pub mod types;
pub mod wal;

pub use error::{Result, StorageError};
pub use io::IoMode;
pub use store::{
    create_dir_all_durable, Allocation, CreateOptions, OpenOptions, ReadSegment, ResumeRefusal,
    Store, StoreInfo, StoreObserver, WalHold, MAX_REQUEST,
};
pub use superblock::{epoch_at, Role, Superblock};
pub use types::{Epoch, Lsn, RebuildCursor, VolumeId, WalPos, BLOCK_SIZE};
pub use wal::record::{RecordKind, WalRecord};
pub use wal::{ReplayOutcome, MAX_ENTRY_PAYLOAD};
