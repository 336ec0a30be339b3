//! Memory and files for O_DIRECT, shared by the data file's base writer (`direct`) and the
//! WAL writer's direct path (`wal_direct`).

use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::path::Path;

/// The memory alignment both direct writers give their buffers (every device's logical block
/// and every filesystem's direct-I/O memory alignment fit in it).
pub(super) const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes that starts on a `DIRECT_ALIGN` boundary. It derefs to
/// those bytes; it is allocated once and reused, so copies into it are cheap.
pub(super) struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> Option<AlignedBuf> {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        (start < DIRECT_ALIGN).then_some(AlignedBuf { bytes, start, len })
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// `path` opened a second time with O_DIRECT, or `None` where the filesystem refuses it.
pub(super) fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| tracing::debug!("no direct I/O on {}: {e}", path.display()))
        .ok()
}

/// Whether `e` from a direct write says only that this filesystem opens O_DIRECT but refuses
/// the writes (EINVAL before any went through): the writer then uses the page cache for good,
/// and writing the same bytes there again is harmless. After a first success it is a real error.
pub(super) fn refused_here(e: &std::io::Error, wrote_before: bool) -> bool {
    e.raw_os_error() == Some(libc::EINVAL) && !wrote_before
}
