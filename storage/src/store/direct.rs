//! Writing rebuild base data to the data file with O_DIRECT, around the page cache (see
//! `Shared::write_direct` in the flusher for when it is used).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::{open_direct, AlignedBuf};
use super::files::zero_data_range;
use super::reserved::ReservedBlocks;
use crate::dirty::{BlockState, DirtyMap};
use crate::io::{IoEngine, MAX_IOVECS};
use crate::types::BLOCK_SIZE;

/// The data file opened with O_DIRECT and a reusable aligned buffer. The buffer stays warm,
/// so a copy into it is cheap, unlike the fresh page-cache pages a buffered write fills.
pub(crate) struct DirectWriter {
    file: std::fs::File,
    buf: AlignedBuf,
    /// A write went through once: later errors are real errors, not "unsupported".
    pub(super) wrote: bool,
}

const DIRECT_BUF: usize = 4 << 20;
/// Shorter runs are written through the page cache.
const DIRECT_MIN: usize = 256 << 10;

impl DirectWriter {
    pub(super) fn open(path: &Path) -> Option<DirectWriter> {
        Some(DirectWriter {
            file: open_direct(path)?,
            buf: AlignedBuf::new(DIRECT_BUF)?,
            wrote: false,
        })
    }

    /// Runs of at least `DIRECT_MIN` bytes go through the aligned buffer with O_DIRECT;
    /// shorter ones (the WAL's scattered blocks) through the page cache, whose writeback
    /// sorts and merges them where one synchronous direct write per block would not.
    pub(super) fn write(
        &mut self,
        io: &IoEngine,
        data: &Arc<File>,
        data_path: &Path,
        reserved: &ReservedBlocks,
        frozen: &DirtyMap,
    ) -> std::io::Result<()> {
        let mut run: Vec<Bytes> = Vec::new();
        let mut run_at = 0u64;
        let mut run_len = 0u64;
        for (start, extent) in frozen.iter() {
            let offset = start * BLOCK_SIZE;
            match &extent.state {
                BlockState::Data(bytes) => {
                    if !run.is_empty() && (run_at + run_len != offset || run.len() == MAX_IOVECS) {
                        self.write_run(data, run_at, &std::mem::take(&mut run))?;
                        run_len = 0;
                    }
                    if run.is_empty() {
                        run_at = offset;
                    }
                    run.push(bytes.clone());
                    run_len += bytes.len() as u64;
                }
                // Placed blocks are in the data file already.
                BlockState::Placed => {}
                BlockState::Zero { punch } => {
                    if !run.is_empty() {
                        self.write_run(data, run_at, &std::mem::take(&mut run))?;
                        run_len = 0;
                    }
                    let len = (extent.end - start) * BLOCK_SIZE;
                    zero_data_range(io, data, data_path, reserved, *punch, offset, len)
                        .map_err(std::io::Error::other)?;
                }
            }
        }
        if !run.is_empty() {
            self.write_run(data, run_at, &run)?;
        }
        Ok(())
    }

    fn write_run(&mut self, data: &File, at: u64, bufs: &[Bytes]) -> std::io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total < DIRECT_MIN {
            return crate::io::pwritev_all(data, at, bufs);
        }
        let mut fill = 0usize;
        let mut flushed = 0u64;
        for b in bufs {
            let mut src: &[u8] = b;
            while !src.is_empty() {
                let n = src.len().min(DIRECT_BUF - fill);
                self.buf[fill..fill + n].copy_from_slice(&src[..n]);
                fill += n;
                src = &src[n..];
                if fill == DIRECT_BUF {
                    self.flush(at + flushed, fill)?;
                    flushed += fill as u64;
                    fill = 0;
                }
            }
        }
        if fill > 0 {
            self.flush(at + flushed, fill)?;
        }
        Ok(())
    }

    fn flush(&mut self, at: u64, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        // Data extents are whole blocks, so `len` and `at` are multiples of 4096.
        self.file.write_all_at(&self.buf[..len], at)?;
        self.wrote = true;
        Ok(())
    }
}
