//! The small interface the NBD server needs from whatever stores the bytes.

use std::future::Future;

use bytes::Bytes;

/// One part of a read, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data(Bytes),
    /// This many bytes read as zeroes.
    Zeroes(u64),
}

impl ReadChunk {
    pub fn len(&self) -> u64 {
        match self {
            ReadChunk::Data(b) => b.len() as u64,
            ReadChunk::Zeroes(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Allocation of a byte range (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub hole: bool,
    pub zero: bool,
}

/// Why a volume refused a request. The server turns these into NBD error numbers; a volume
/// never has to know them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("request outside the volume")]
    OutOfRange,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the volume is read-only")]
    ReadOnly,
    #[error("zeroing would not be fast")]
    NotFast,
    #[error("the volume is shutting down")]
    ShuttingDown,
    /// This node's lease to lead the volume ran out: another node may be serving it, so
    /// nothing here may be acknowledged (NBD_ESHUTDOWN, so the client retries elsewhere).
    #[error("this node no longer holds the lease to serve the volume")]
    LeaseLost,
    /// The storage under the volume is full; nothing of the request was written.
    #[error("no space left: {0}")]
    NoSpace(String),
}

pub type VolumeResult<T> = Result<T, VolumeError>;

/// A block device the server exports. Every method may be called concurrently from many
/// connections. The server has already checked that ranges lie inside `size()`.
///
/// Contract (what makes CAN_MULTI_CONN honest): a write is visible to every later read on
/// every connection once it returns; `flush` makes every write that returned before it was
/// called durable, whichever connection sent it; `fua` makes that one write durable before
/// it returns.
pub trait BlockVolume: Send + Sync + 'static {
    fn size(&self) -> u64;

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = VolumeResult<Vec<ReadChunk>>> + Send;

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = VolumeResult<()>> + Send;

    /// Makes the range read as zeroes; `may_trim` allows deallocating it; `fast` asks to fail
    /// with [`VolumeError::NotFast`] rather than do slow work.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast: bool,
        fua: bool,
    ) -> impl Future<Output = VolumeResult<()>> + Send;

    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = VolumeResult<()>> + Send;

    fn flush(&self) -> impl Future<Output = VolumeResult<()>> + Send;

    /// A prefetch hint; the default does nothing.
    fn cache(&self, _offset: u64, _len: u64) -> impl Future<Output = VolumeResult<()>> + Send {
        async { Ok(()) }
    }

    /// Whether a success reply may still leave now. The server asks just before it hands
    /// replies to the socket and drops the connection instead of sending one when this says
    /// no: a reply the volume answered in time but that waited (a paused process, a client
    /// slow to read) must not reach the client after the volume stopped acknowledging, for
    /// example after its lease ran out. The default always may.
    fn may_acknowledge(&self) -> bool {
        true
    }

    /// Allocation of the range starting at `offset`; may cover less than `len` (never
    /// nothing), or run past it.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = VolumeResult<Vec<Extent>>> + Send;
}
