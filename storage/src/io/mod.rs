//! File I/O for the data file and the WAL, off the async threads.
//!
//! Two backends sit behind one small interface: an io_uring ring driven by a dedicated thread,
//! and a pool of threads doing plain `pread`/`pwrite`. `IoMode::Auto` picks io_uring and falls
//! back to the pool when the kernel refuses a ring (seccomp, old kernels, containers), saying so
//! once in the log. Callers get a completion they can either `.await` or `wait()` on from a
//! plain thread. The WAL writer and the flusher write their data with plain syscalls on their
//! own threads instead (`pwritev_all`, `sync_data`): see `store::wal_writer` for why.

mod plain;
mod uring;

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring when the kernel allows it, otherwise plain.
    #[default]
    Auto,
    Uring,
    Plain,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<IoMode, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(IoMode::Uring),
            "plain" => Ok(IoMode::Plain),
            other => Err(format!("unknown I/O engine {other:?} (auto, uring, plain)")),
        }
    }
}

/// `fallocate` modes the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocate {
    /// Deallocate the range; it reads as zeroes.
    PunchHole,
    /// Zero the range but keep it allocated (NBD's NO_HOLE).
    ZeroRange,
    /// Allocate the range's blocks, leaving contents and size as they are (space taken
    /// before a write is logged, so lack of it fails that write alone).
    Reserve,
}

impl Allocate {
    fn flags(self) -> i32 {
        match self {
            Allocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Allocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            Allocate::Reserve => libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// `fallocate(2)` on the calling thread: the one place the engine makes that syscall, for the
/// plain backend and for callers that must not wait for the I/O thread.
pub(crate) fn fallocate(file: &File, mode: Allocate, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a file descriptor kept open by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode.flags(),
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One operation. Buffers are owned by the operation so they stay alive while the kernel uses
/// them.
pub(crate) enum IoOp {
    Read {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
    Write {
        file: Arc<File>,
        offset: u64,
        bufs: Vec<Bytes>,
    },
    Allocate {
        file: Arc<File>,
        mode: Allocate,
        offset: u64,
        len: u64,
    },
}

pub(crate) type IoResult = io::Result<Bytes>;

pub(crate) struct IoRequest {
    op: IoOp,
    done: oneshot::Sender<IoResult>,
}

enum Backend {
    Uring(uring::UringBackend),
    Plain(plain::PlainBackend),
}

/// A handle on the I/O threads. Cheap to clone; the threads stop when the last handle drops.
#[derive(Clone)]
pub struct IoEngine {
    backend: Arc<Backend>,
}

impl IoEngine {
    pub fn new(mode: IoMode) -> io::Result<IoEngine> {
        let backend = match mode {
            IoMode::Plain => Backend::Plain(plain::PlainBackend::start()?),
            IoMode::Uring => Backend::Uring(uring::UringBackend::start()?),
            IoMode::Auto => match uring::UringBackend::start() {
                Ok(b) => Backend::Uring(b),
                Err(e) => {
                    tracing::warn!(
                        "io_uring is unavailable ({e}); using plain pread/pwrite threads instead"
                    );
                    Backend::Plain(plain::PlainBackend::start()?)
                }
            },
        };
        Ok(IoEngine {
            backend: Arc::new(backend),
        })
    }

    /// The backend actually in use: "io_uring" or "plain".
    pub fn name(&self) -> &'static str {
        match *self.backend {
            Backend::Uring(_) => "io_uring",
            Backend::Plain(_) => "plain",
        }
    }

    fn submit(&self, op: IoOp) -> Completion {
        let (done, rx) = oneshot::channel();
        let req = IoRequest { op, done };
        match &*self.backend {
            Backend::Uring(b) => b.submit(req),
            Backend::Plain(b) => b.submit(req),
        }
        Completion { rx }
    }

    /// Reads exactly `len` bytes at `offset` (a range past the end of the file reads as
    /// zeroes, which is what a sparse data file promises).
    pub(crate) fn read(&self, file: &Arc<File>, offset: u64, len: usize) -> Completion {
        self.submit(IoOp::Read {
            file: file.clone(),
            offset,
            len,
        })
    }

    /// Writes all of `bufs`, back to back, starting at `offset`.
    pub(crate) fn write(&self, file: &Arc<File>, offset: u64, bufs: Vec<Bytes>) -> Completion {
        self.submit(IoOp::Write {
            file: file.clone(),
            offset,
            bufs,
        })
    }

    pub(crate) fn allocate(
        &self,
        file: &Arc<File>,
        mode: Allocate,
        offset: u64,
        len: u64,
    ) -> Completion {
        self.submit(IoOp::Allocate {
            file: file.clone(),
            mode,
            offset,
            len,
        })
    }
}

/// Reads `len` bytes at `offset` only if the page cache already holds all of them, without
/// blocking (`preadv2` with `RWF_NOWAIT`). Cached reads are the common case and cost a few
/// microseconds inline; handing them to an I/O thread would cost two context switches.
/// Returns `None` when the read would have to wait for the disk (or the kernel cannot say).
pub(crate) fn read_if_cached(file: &File, offset: u64, len: usize) -> Option<Bytes> {
    use std::os::unix::io::AsRawFd;
    let mut buf = Vec::<u8>::with_capacity(len);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: the iovec points at `len` bytes of capacity owned by `buf`, which outlives the
    // call; `file` keeps the descriptor open.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 || n as usize != len {
        return None;
    }
    // SAFETY: the kernel initialised exactly `len` bytes.
    unsafe { buf.set_len(len) };
    Some(Bytes::from(buf))
}

/// The result of one operation, awaitable from async code or waited on from a thread.
pub(crate) struct Completion {
    rx: oneshot::Receiver<IoResult>,
}

impl Completion {
    /// Blocks the calling (non-async) thread until the operation finishes.
    pub(crate) fn wait(self) -> IoResult {
        self.rx
            .blocking_recv()
            .unwrap_or_else(|_| Err(io_stopped()))
    }
}

impl Future for Completion {
    type Output = IoResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(io_stopped())))
    }
}

fn io_stopped() -> io::Error {
    io::Error::other("the I/O thread stopped before completing the request")
}

/// Whether this build skips the fsyncs that make data durable. Only the power-loss tests build
/// with the `no-fsync` feature, to prove their harness catches a store that forgets to sync.
pub(crate) const SKIP_FSYNC: bool = cfg!(feature = "no-fsync");

/// Starts writeback of `[offset, offset+len)` without waiting for it (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`): no durability, only an earlier start for a later fdatasync.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor we own; failure only loses the hint.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// fdatasync, unless this is the `no-fsync` test build.
pub(crate) fn sync_data(file: &File) -> io::Result<()> {
    if SKIP_FSYNC {
        return Ok(());
    }
    file.sync_data()
}

/// Linux refuses more iovecs than this in one call (`IOV_MAX`).
pub(crate) const MAX_IOVECS: usize = 1024;

/// Writes `bufs` back to back at `offset` with `pwritev` on the calling thread (for the
/// dedicated I/O threads, which gain nothing from handing their own writes to another thread).
pub(crate) fn pwritev_all(file: &File, offset: u64, bufs: &[Bytes]) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut skip = 0usize; // bytes of `bufs` already written
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    while skip < total {
        let mut iov = Vec::with_capacity(bufs.len().min(MAX_IOVECS));
        let mut s = skip;
        for b in bufs {
            if iov.len() == MAX_IOVECS {
                break;
            }
            if s >= b.len() {
                s -= b.len();
                continue;
            }
            iov.push(libc::iovec {
                iov_base: b[s..].as_ptr() as *mut _,
                iov_len: b.len() - s,
            });
            s = 0;
        }
        // SAFETY: every iovec points into a live `Bytes` of `bufs` for the whole call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                (offset + skip as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        skip += n as usize;
    }
    Ok(())
}

/// Runs one operation synchronously with plain syscalls. The plain backend uses it for
/// everything; the io_uring backend uses it to finish the rare short transfer.
pub(crate) fn run_blocking(op: &IoOp) -> IoResult {
    use std::os::unix::fs::FileExt;
    match op {
        IoOp::Read { file, offset, len } => {
            let mut buf = vec![0u8; *len];
            let mut done = 0;
            while done < *len {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break, // past EOF: the rest stays zero
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Bytes::from(buf))
        }
        IoOp::Write { file, offset, bufs } => {
            let mut pos = *offset;
            for b in bufs {
                file.write_all_at(b, pos)?;
                pos += b.len() as u64;
            }
            Ok(Bytes::new())
        }
        IoOp::Allocate {
            file,
            mode,
            offset,
            len,
        } => fallocate(file, *mode, *offset, *len).map(|()| Bytes::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn roundtrip(mode: IoMode) {
        let io = IoEngine::new(mode).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        file.set_len(1 << 20).unwrap();
        let a = Bytes::from(vec![1u8; 4096]);
        let b = Bytes::from(vec![2u8; 8192]);
        io.write(&file, 4096, vec![a, b]).wait().unwrap();
        file.sync_data().unwrap();
        let got = io.read(&file, 0, 16384).wait().unwrap();
        assert_eq!(&got[..4096], &[0u8; 4096][..]);
        assert_eq!(&got[4096..8192], &[1u8; 4096][..]);
        assert_eq!(&got[8192..16384], &[2u8; 8192][..]);
        io.allocate(&file, Allocate::PunchHole, 4096, 4096)
            .wait()
            .unwrap();
        let mut check = [9u8; 4096];
        file.read_exact_at(&mut check, 4096).unwrap();
        assert_eq!(check, [0u8; 4096]);
        // Reading past the end of the file yields zeroes, not an error.
        let tail = io.read(&file, (1 << 20) - 100, 200).wait().unwrap();
        assert_eq!(tail.len(), 200);
    }

    #[test]
    fn plain_backend_roundtrip() {
        roundtrip(IoMode::Plain);
    }

    #[test]
    fn uring_backend_roundtrip() {
        roundtrip(IoMode::Uring);
    }

    #[test]
    fn uring_many_concurrent_requests_complete() {
        let io = IoEngine::new(IoMode::Uring).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        // More requests than the ring has entries, submitted before any is reaped.
        let pending: Vec<_> = (0..2000u64)
            .map(|i| {
                io.write(
                    &file,
                    i * 512,
                    vec![Bytes::from(vec![(i % 251) as u8; 512])],
                )
            })
            .collect();
        for c in pending {
            c.wait().unwrap();
        }
        for i in (0..2000u64).step_by(97) {
            let got = io.read(&file, i * 512, 512).wait().unwrap();
            assert!(got.iter().all(|&x| x == (i % 251) as u8));
        }
    }
}
