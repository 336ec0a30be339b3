//! The WAL writer's O_DIRECT path: records reach the device without passing through the page
//! cache.
//!
//! A group commit through the page cache pays twice: the copy into fresh page-cache pages, and
//! then fdatasync's walk of them to start their writeback. With O_DIRECT the write itself is the
//! device write, and the fdatasync after it only flushes the device cache: on this project's
//! disk a write+FLUSH cycle went from ~120 µs to ~90 µs (docs/BENCHMARKS.md, "WAL writes with
//! O_DIRECT").
//!
//! Direct writes must start and end on the file's direct-I/O alignment, while records are only
//! 64-byte aligned. So each write starts at the aligned block holding its first record (the
//! bytes before it in that block, which earlier writes put there, are written again unchanged)
//! and ends with zeroes up to the next aligned boundary, which land in free ring space: unless
//! less than [`WAL_SLACK`] was free after the record when it was appended (`Queued::keep_after`,
//! a ring full to its tail), and the bytes after it are read back from the file and kept
//! instead (the tail's first record may be there, or the wrap marker replay starts at). Rewriting
//! the partial block is what the page cache did too (it writes back whole 4 KiB pages); a
//! direct write rewrites no more than one alignment unit, often a 512-byte sector.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use super::aligned::{open_direct, AlignedBuf};

/// With less free ring space than this after a record, a direct write keeps the bytes after
/// it instead of padding with zeroes. Also the largest direct-I/O alignment this writer takes.
pub(crate) const WAL_SLACK: u64 = super::aligned::DIRECT_ALIGN as u64;
/// The aligned buffer: larger writes go out in pieces of this size.
const CHUNK: usize = 4 << 20;

/// The WAL opened a second time with O_DIRECT, and what it needs to write unaligned records.
pub(crate) struct DirectWal {
    file: File,
    align: usize,
    buf: AlignedBuf,
    /// One aligned block, for the bytes a write keeps after its end.
    block: AlignedBuf,
    /// The last write's final partial block: its file offset and the bytes written into it.
    /// The next write, which starts right there, begins with them.
    tail: Option<(u64, Vec<u8>)>,
    /// A write went through once: later errors are real errors, not "unsupported here".
    pub(super) wrote: bool,
}

impl DirectWal {
    /// Opens `path` for direct writes, or `None` where the filesystem cannot take them.
    pub(super) fn open(path: &Path) -> Option<DirectWal> {
        let align = match dio_alignment(path) {
            Some(0) => return None,
            Some(a) => a,
            // The kernel does not say: try the largest alignment we take; the first write's
            // EINVAL sends the writer back to the page cache if that was wrong.
            None => WAL_SLACK as usize,
        };
        if align > WAL_SLACK as usize || !align.is_power_of_two() {
            return None;
        }
        Some(DirectWal {
            file: open_direct(path)?,
            align,
            buf: AlignedBuf::new(CHUNK)?,
            block: AlignedBuf::new(WAL_SLACK as usize)?,
            tail: None,
            wrote: false,
        })
    }

    pub(super) fn alignment(&self) -> usize {
        self.align
    }

    /// Writes `bufs` back to back at file offset `at`, as the page cache would have, with the
    /// bytes after them up to the next aligned boundary zeroed, or with `keep_after` as they
    /// were.
    pub(super) fn write(&mut self, at: u64, bufs: &[Bytes], keep_after: bool) -> io::Result<()> {
        let align = self.align as u64;
        let mut block_at = at - at % align;
        let mut fill = (at - block_at) as usize;
        if fill > 0 {
            self.load_prefix(block_at, fill)?;
        }
        let result = self.copy_out(&mut block_at, &mut fill, bufs, keep_after);
        if result.is_err() {
            // What the file holds is unknown now: read it again before the next write.
            self.tail = None;
        }
        result
    }

    fn copy_out(
        &mut self,
        block_at: &mut u64,
        fill: &mut usize,
        bufs: &[Bytes],
        keep_after: bool,
    ) -> io::Result<()> {
        for b in bufs {
            let mut src: &[u8] = b;
            while !src.is_empty() {
                let n = src.len().min(CHUNK - *fill);
                self.buf[*fill..*fill + n].copy_from_slice(&src[..n]);
                *fill += n;
                src = &src[n..];
                if *fill == CHUNK {
                    self.put(*block_at, CHUNK)?;
                    *block_at += CHUNK as u64;
                    *fill = 0;
                }
            }
        }
        let whole = *fill - *fill % self.align;
        let partial = *fill - whole;
        self.tail = None;
        if partial > 0 {
            let len = whole + self.align;
            let after = *fill..len;
            if keep_after {
                let a = self.align;
                let last = *block_at + whole as u64;
                self.file.read_exact_at(&mut self.block[..a], last)?;
                self.buf[after].copy_from_slice(&self.block[partial..a]);
            } else {
                self.buf[after].fill(0);
            }
            self.put(*block_at, len)?;
            self.tail = Some((
                *block_at + whole as u64,
                self.buf[whole..whole + partial].to_vec(),
            ));
        } else if whole > 0 {
            self.put(*block_at, whole)?;
        }
        Ok(())
    }

    /// Notes a write that went through the page cache instead (a batch nobody syncs), so the
    /// next direct write still knows the bytes of the block it starts in.
    pub(super) fn note_buffered(&mut self, at: u64, bufs: &[Bytes]) {
        let align = self.align as u64;
        let end = at + bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        let block_at = end - end % align;
        let mut bytes = Vec::with_capacity(self.align);
        if block_at < at {
            // The block began before this write: only the cached tail knows its first bytes.
            match self.tail.take() {
                Some((t, b)) if t == block_at && t + b.len() as u64 == at => bytes = b,
                _ => return,
            }
        }
        self.tail = None;
        if block_at == end {
            return;
        }
        let mut skip = block_at.saturating_sub(at) as usize;
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            bytes.extend_from_slice(&b[skip..]);
            skip = 0;
        }
        self.tail = Some((block_at, bytes));
    }

    /// Puts the first `len` bytes of the aligned block at `block_at` at the front of the buffer:
    /// from the last write's tail when the new write continues it, else from the file.
    fn load_prefix(&mut self, block_at: u64, len: usize) -> io::Result<()> {
        match &self.tail {
            Some((t, bytes)) if *t == block_at && bytes.len() == len => {
                self.buf[..len].copy_from_slice(bytes);
            }
            _ => {
                let a = self.align;
                self.file.read_exact_at(&mut self.buf[..a], block_at)?;
            }
        }
        Ok(())
    }

    fn put(&mut self, at: u64, len: usize) -> io::Result<()> {
        self.file.write_all_at(&self.buf[..len], at)?;
        self.wrote = true;
        Ok(())
    }
}

/// The file's direct-I/O offset alignment from `statx` (`Some(0)`: no direct I/O here), or
/// `None` when the kernel does not report it.
fn dio_alignment(path: &Path) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statx fills the zeroed struct we own; the path is a valid C string.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    if stx.stx_dio_mem_align as u64 > WAL_SLACK {
        return Some(0);
    }
    Some(stx.stx_dio_offset_align as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `pieces` as consecutive direct writes from `at` and checks the file against a
    /// model: the written bytes where they were put, zeroes up to the aligned end of the last
    /// one, and the rest of the file untouched.
    /// Every third piece goes through the page cache (`file`) instead, as an unsynced batch does.
    fn check_against_model(dw: &mut DirectWal, file: &File, at: u64, pieces: &[Vec<Bytes>]) {
        let len = 8 << 20;
        let mut model = vec![0xAAu8; len];
        file.write_all_at(&model, 0).expect("fill");
        let mut pos = at;
        for (i, bufs) in pieces.iter().enumerate() {
            let direct = i % 3 != 2;
            if direct {
                dw.write(pos, bufs, false).expect("direct write");
            } else {
                crate::io::pwritev_all(file, pos, bufs).expect("buffered write");
                dw.note_buffered(pos, bufs);
            }
            for b in bufs {
                model[pos as usize..pos as usize + b.len()].copy_from_slice(b);
                pos += b.len() as u64;
            }
            let a = dw.alignment() as u64;
            let end = pos.div_ceil(a) * a;
            if direct {
                model[pos as usize..end as usize].fill(0);
            }
            let mut on_disk = vec![0u8; len];
            file.read_exact_at(&mut on_disk, 0).expect("read");
            assert!(
                on_disk == model,
                "file differs from the model after a write ending at {pos}"
            );
        }
    }

    /// A directory with an empty file `wal` in it, open for buffered reads and writes.
    fn scratch_wal() -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        (dir, path, file)
    }

    fn pattern(seed: u8, n: usize) -> Bytes {
        Bytes::from(
            (0..n)
                .map(|i| seed.wrapping_add(i as u8))
                .collect::<Vec<u8>>(),
        )
    }

    #[test]
    fn a_direct_write_told_to_keep_what_follows_it_changes_no_byte_past_its_end() {
        let (dir, path, file) = scratch_wal();
        let before = pattern(200, 1 << 16);
        file.write_all_at(&before, 0).expect("fill");
        let Some(mut dw) = DirectWal::open(&path) else {
            eprintln!("no direct I/O under {}", dir.path().display());
            return;
        };
        let at = 4096 + 64 * 3;
        let bufs = [pattern(1, 64), pattern(2, 4096)];
        dw.write(at, &bufs, true).expect("direct write");
        let mut model = before.to_vec();
        let mut pos = at as usize;
        for b in &bufs {
            model[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        let mut on_disk = vec![0u8; model.len()];
        file.read_exact_at(&mut on_disk, 0).expect("read");
        assert!(on_disk == model, "bytes outside the write changed");
    }

    #[test]
    fn a_direct_write_keeps_the_bytes_before_it_and_pads_only_after_it_even_after_buffered_writes()
    {
        let (dir, path, file) = scratch_wal();
        file.set_len(8 << 20).expect("size");
        let Some(mut dw) = DirectWal::open(&path) else {
            // Only on a filesystem without direct I/O; the writer then uses the page cache.
            eprintln!("no direct I/O under {}", dir.path().display());
            return;
        };
        // Header-sized and payload-sized pieces at 64-byte positions, as records are: a write
        // continuing the last one (from its cached tail), one crossing a chunk, and one at a
        // position the writer never wrote (read from the file).
        let pieces = vec![
            vec![pattern(1, 64), pattern(2, 4096)],
            vec![pattern(3, 64)],
            vec![pattern(4, 64), pattern(5, 8192), pattern(6, 64)],
            vec![pattern(7, 64), pattern(8, CHUNK - 64 * 3)],
            vec![pattern(9, 64), pattern(10, 12288)],
            vec![pattern(11, 64), pattern(12, 4096)],
            vec![pattern(13, 64)],
            vec![pattern(14, 64), pattern(15, 4096)],
            vec![pattern(16, 64)],
        ];
        check_against_model(&mut dw, &file, 4096 + 64 * 5, &pieces);
        dw.tail = None;
        check_against_model(&mut dw, &file, 64 * 3, &pieces[..4]);
    }
}
