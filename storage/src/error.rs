//! The storage engine's typed errors: what an open, a request or a replicated change can fail with,
//! with the path and offset that let an operator find the fault.

use std::io;
use std::path::PathBuf;

use crate::types::{Epoch, Lsn};

/// Everything the storage engine can fail with. Each variant names the object it is about, so
/// a one-line log message is enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The filesystem under the store is full (`ENOSPC`) or the owner's quota is spent
    /// (`EDQUOT`). Nothing of the request was written; it may succeed once space is freed.
    #[error("{path}: no space left on the store's filesystem: {source}")]
    NoSpace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: no volume store here (create one with `blockrep create`)")]
    NotAStore(PathBuf),
    #[error("{0}: already exists; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    #[error("{0}: the store is in use by another process (its lock file is held)")]
    Locked(PathBuf),
    #[error("{path}: superblock unreadable: {reason}")]
    BadSuperblock { path: PathBuf, reason: String },
    #[error("{path}: WAL header unreadable: {reason}")]
    BadWalHeader { path: PathBuf, reason: String },
    #[error(
        "{path}: corrupt WAL record at file offset {offset} (expected LSN {lsn}): {reason}; \
         later records prove it was durable, so the store refuses to open rather than lose data"
    )]
    CorruptWal {
        path: PathBuf,
        offset: u64,
        lsn: Lsn,
        reason: String,
    },
    #[error("invalid volume geometry: {0}")]
    BadGeometry(String),
    #[error("request out of range: offset {offset} length {length} on a volume of {size} bytes")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("epoch {requested} is not above the store's epoch {current}")]
    EpochRegression { requested: Epoch, current: Epoch },
    #[error("WAL entry {requested} is no longer retained (the oldest is {oldest})")]
    WalRecycled { requested: Lsn, oldest: Lsn },
    #[error("replicated entry {got} does not follow the store's last entry (expected {expected})")]
    LsnGap { expected: Lsn, got: Lsn },
    #[error("cannot cut the log after entry {keep}: {reason}")]
    CannotTruncate { keep: Lsn, reason: String },
    #[error("the store failed earlier and accepts no more writes: {0}")]
    Failed(String),
    #[error("the store is closed")]
    Closed,
}

impl StorageError {
    /// An I/O error on `path`, typed by its errno: lack of space is [`StorageError::NoSpace`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> StorageError {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => StorageError::NoSpace { path, source },
            _ => StorageError::Io { path, source },
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::StorageError;

    #[test]
    fn enospc_and_edquot_are_no_space_and_other_errors_are_io() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = StorageError::io("/x", std::io::Error::from_raw_os_error(errno));
            assert!(matches!(e, StorageError::NoSpace { .. }), "{e}");
        }
        let e = StorageError::io("/x", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, StorageError::Io { .. }), "{e}");
    }
}
