//! The client data path: writes (with read-modify-write of partial blocks), reads, trims,
//! zeroes, flushes and FUA, and block status. Every write becomes one WAL entry appended
//! under the core lock; reads see the dirty maps first, then the data file.

use std::pin::pin;

use bytes::{Bytes, BytesMut};

use super::core::{Backlog, Core};
use super::files::{data_file_extent, io_err, reserve_data_range};
use super::{flusher, wal_writer, Allocation, ReadSegment, Store, MAX_REQUEST};
use crate::dirty::BlockState;
use crate::error::{Result, StorageError};
use crate::types::{Lsn, BLOCK_SIZE};
use crate::wal::record::RecordKind;

/// Blocks whose data-file space a first write takes at once (256 KiB).
const RESERVE_GRANULE: u64 = 64;

/// The smallest entry [`Store::write_shared`] keeps a slice of rather than copying. Below it
/// the caller's buffer is likely a read-ahead window holding other requests too, which the
/// dirty map would pin; at 1 MiB writes the copy cost as much CPU as the socket's.
pub(crate) const KEEP_MIN: usize = 256 << 10;

/// A write's bytes as the caller handed them.
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Shared(Bytes),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        self.bytes().len()
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Shared(b) => b,
        }
    }

    fn slice(&self, range: std::ops::Range<usize>) -> Payload<'_> {
        match self {
            Payload::Borrowed(b) => Payload::Borrowed(&b[range]),
            Payload::Shared(b) => Payload::Shared(b.slice(range)),
        }
    }

    /// The entry's payload: a slice of a large shared buffer, otherwise a copy (a small
    /// caller's buffer may be part of a larger allocation that the dirty map would pin).
    fn into_entry(self) -> Bytes {
        match self {
            Payload::Shared(b) if b.len() >= KEEP_MIN => b,
            other => crate::arena::copy(&[other.bytes()]),
        }
    }
}

impl Store {
    /// A client request lies inside the volume and is no larger than [`MAX_REQUEST`].
    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if len > MAX_REQUEST {
            return Err(StorageError::OutOfRange {
                offset,
                length: len,
                size: self.shared.volume_size,
            });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`. Every write acknowledged before the call is visible.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let pieces = self
            .shared
            .lock_core()
            .maps
            .resolve(offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        // Submit every data-file read first so they run concurrently.
        enum Part {
            Ready(ReadSegment),
            Reading(crate::io::Completion),
        }
        let mut parts = Vec::with_capacity(pieces.len());
        for p in pieces {
            let from = (p.start * BLOCK_SIZE).max(offset);
            let to = (p.end * BLOCK_SIZE).min(end);
            let n = to - from;
            parts.push(match p.state {
                None | Some(BlockState::Placed) => {
                    match crate::io::read_if_cached(&self.shared.data, from, n as usize) {
                        Some(bytes) => Part::Ready(ReadSegment::Data(bytes)),
                        None => {
                            Part::Reading(self.shared.io.read(&self.shared.data, from, n as usize))
                        }
                    }
                }
                Some(BlockState::Zero { .. }) => Part::Ready(ReadSegment::Zeroes(n)),
                Some(BlockState::Data(bytes)) => {
                    let skip = (from - p.start * BLOCK_SIZE) as usize;
                    Part::Ready(ReadSegment::Data(bytes.slice(skip..skip + n as usize)))
                }
            });
        }
        let mut out: Vec<ReadSegment> = Vec::with_capacity(parts.len());
        for part in parts {
            let seg = match part {
                Part::Ready(s) => s,
                Part::Reading(c) => {
                    ReadSegment::Data(c.await.map_err(io_err(&self.shared.data_path))?)
                }
            };
            match (out.last_mut(), seg) {
                (Some(ReadSegment::Zeroes(a)), ReadSegment::Zeroes(b)) => *a += b,
                (_, seg) => out.push(seg),
            }
        }
        Ok(out)
    }

    /// Reads into one contiguous buffer (zeroes filled in).
    pub async fn read_contiguous(&self, offset: u64, len: u64) -> Result<Bytes> {
        let segments = self.read(offset, len).await?;
        if let [ReadSegment::Data(b)] = segments.as_slice() {
            return Ok(b.clone());
        }
        let mut buf = BytesMut::with_capacity(len as usize);
        for s in segments {
            match s {
                ReadSegment::Data(b) => buf.extend_from_slice(&b),
                ReadSegment::Zeroes(n) => buf.resize(buf.len() + n as usize, 0),
            }
        }
        Ok(buf.freeze())
    }

    /// Writes `data` at `offset` (any alignment). Returns the last entry's LSN. With `fua`,
    /// returns only once it is durable.
    ///
    /// A write longer than [`MAX_ENTRY_PAYLOAD`](crate::wal::MAX_ENTRY_PAYLOAD) becomes
    /// several entries, each of whole blocks but the edges (the contract promises each block
    /// of an unflushed write old or new after a crash, not the whole write).
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Lsn> {
        self.write_from(offset, Payload::Borrowed(data), fua).await
    }

    /// [`Store::write`] of a buffer the store may keep: a whole-block entry of at least
    /// [`KEEP_MIN`] bytes holds a slice of `data` instead of a copy of it. The caller's
    /// allocation is pinned until the entry's data is in the data file, so this suits buffers
    /// that hold little beyond the write (an NBD WRITE's own buffer).
    pub async fn write_shared(&self, offset: u64, data: Bytes, fua: bool) -> Result<Lsn> {
        self.write_from(offset, Payload::Shared(data), fua).await
    }

    async fn write_from(&self, offset: u64, data: Payload<'_>, fua: bool) -> Result<Lsn> {
        let len = data.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return self.current_lsn(fua).await;
        }
        let most = crate::wal::MAX_ENTRY_PAYLOAD;
        debug_assert!(most <= self.shared.layout.capacity / 4 && most.is_multiple_of(BLOCK_SIZE));
        let mut lsn = Lsn::ZERO;
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let cut = (at - at % BLOCK_SIZE + most - offset).min(len);
            lsn = self
                .write_entry(at, data.slice(done as usize..cut as usize))
                .await?;
            done = cut;
        }
        if fua {
            self.shared.wait_durable(lsn).await?;
        }
        Ok(lsn)
    }

    /// One entry of [`Store::write`]: `data` at `offset`, at most
    /// [`MAX_ENTRY_PAYLOAD`](crate::wal::MAX_ENTRY_PAYLOAD).
    async fn write_entry(&self, offset: u64, data: Payload<'_>) -> Result<Lsn> {
        let len = data.len() as u64;
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        self.reserve(first, end)?;
        let head_skip = (offset - first * BLOCK_SIZE) as usize;
        let mut edges: Vec<u64> = Vec::new();
        if head_skip != 0 || (len < BLOCK_SIZE && first == end - 1) {
            edges.push(first);
        }
        if !(offset + len).is_multiple_of(BLOCK_SIZE) && !edges.contains(&(end - 1)) {
            edges.push(end - 1);
        }
        let lsn = if edges.is_empty() {
            let payload = data.into_entry();
            let crc = crc32c::crc32c(&payload);
            self.append(RecordKind::Write, first, end, payload, crc)
                .await?
        } else {
            // Whole blocks, with the client's bytes in the middle; the edges are filled in
            // under the lock.
            let mut payload = BytesMut::zeroed(((end - first) * BLOCK_SIZE) as usize);
            payload[head_skip..head_skip + data.len()].copy_from_slice(data.bytes());
            self.read_modify_write(offset, len, first, end, payload, &edges)
                .await?
        };
        Ok(lsn)
    }

    /// The partial blocks at the edges of a write keep the bytes the write does not cover.
    /// Those bytes are read and the entry appended under one lock when the WAL holds the
    /// blocks; when only the data file does, the bytes are read outside the lock and the
    /// checkpoint generation proves that nothing changed them in the meantime. Either way the
    /// patched blocks and the new entry are one atomic step, so overlapping concurrent
    /// sub-block writes never lose each other's bytes.
    async fn read_modify_write(
        &self,
        offset: u64,
        len: u64,
        first: u64,
        end: u64,
        mut payload: BytesMut,
        edges: &[u64],
    ) -> Result<Lsn> {
        let bs = BLOCK_SIZE as usize;
        let start_byte = first * BLOCK_SIZE;
        let keep = |block: u64| -> (usize, usize) {
            // The part of `block` (relative to the payload) the client's bytes do not cover:
            // returned as (covered_from, covered_to) within the block.
            let b0 = block * BLOCK_SIZE;
            let from = offset.max(b0) - b0;
            let to = (offset + len).min(b0 + BLOCK_SIZE) - b0;
            (from as usize, to as usize)
        };
        let mut fetched: Vec<(u64, Bytes)> = Vec::new();
        let mut fetched_gen = u64::MAX;
        loop {
            let mut space = pin!(self.shared.space.notified());
            space.as_mut().enable();
            let need_fetch = {
                let mut core = self.shared.lock_core();
                core.check_writable()?;
                let mut missing = false;
                for &b in edges {
                    let old = match core.maps.lookup_block(b) {
                        Some(BlockState::Data(d)) => Some(d),
                        Some(BlockState::Zero { .. }) => Some(Bytes::from_static(&[0; 4096])),
                        None | Some(BlockState::Placed)
                            if fetched_gen == core.maps.checkpoint_gen =>
                        {
                            fetched
                                .iter()
                                .find(|(fb, _)| *fb == b)
                                .map(|(_, d)| d.clone())
                        }
                        None | Some(BlockState::Placed) => None,
                    };
                    let Some(old) = old else {
                        missing = true;
                        break;
                    };
                    let (from, to) = keep(b);
                    let at = ((b * BLOCK_SIZE) - start_byte) as usize;
                    payload[at..at + from].copy_from_slice(&old[..from]);
                    payload[at + to..at + bs].copy_from_slice(&old[to..]);
                }
                if missing {
                    Some(core.maps.checkpoint_gen)
                } else {
                    let frozen = crate::arena::copy(&[&payload]);
                    let crc = crc32c::crc32c(&frozen);
                    match core.try_append(
                        &self.shared.layout,
                        RecordKind::Write,
                        start_byte,
                        (end - first) * BLOCK_SIZE,
                        frozen,
                        crc,
                    ) {
                        Ok(lsn) => {
                            self.after_append(&mut core);
                            return Ok(lsn);
                        }
                        Err(Backlog::Wal) => self.shared.request_flush(&mut core),
                        Err(Backlog::Placement) => {}
                    }
                    None
                }
            };
            match need_fetch {
                Some(gen) => {
                    fetched.clear();
                    for &b in edges {
                        let data = self
                            .shared
                            .io
                            .read(&self.shared.data, b * BLOCK_SIZE, bs)
                            .await
                            .map_err(io_err(&self.shared.data_path))?;
                        fetched.push((b, data));
                    }
                    fetched_gen = gen;
                }
                None => space.await,
            }
        }
    }

    /// Takes the data file's space for blocks `[first, end)` before their entry is logged
    /// (see [`reserve_data_range`]): lack of space is the request's [`StorageError::NoSpace`],
    /// never a failed checkpoint that stops the store.
    /// Blocks already reserved since the store opened cost nothing (see `reserved`).
    pub(super) fn reserve(&self, first: u64, end: u64) -> Result<()> {
        let shared = &self.shared;
        if shared.reserved.covers(first, end) {
            return Ok(());
        }
        // Whole granules: one extent allocation for RESERVE_GRANULE blocks instead of one per
        // block, under the inode lock the checkpoint's writes also take. Where the granule does
        // not fit, the blocks asked for alone, so a full filesystem fails no write that fits.
        let g_first = first - first % RESERVE_GRANULE;
        let g_end = end
            .div_ceil(RESERVE_GRANULE)
            .saturating_mul(RESERVE_GRANULE)
            .min(shared.reserved.blocks());
        let granule = (g_first * BLOCK_SIZE, (g_end - g_first) * BLOCK_SIZE);
        if reserve_data_range(&shared.data, &shared.data_path, granule.0, granule.1).is_ok() {
            shared.reserved.mark(g_first, g_end);
            return Ok(());
        }
        let (at, len) = (first * BLOCK_SIZE, (end - first) * BLOCK_SIZE);
        reserve_data_range(&shared.data, &shared.data_path, at, len)?;
        shared.reserved.mark(first, end);
        Ok(())
    }

    /// Appends one entry for blocks `[first, end)`, waiting for WAL space if the ring is full
    /// (writers are slowed down, never failed, by a full WAL).
    pub(super) async fn append(
        &self,
        kind: RecordKind,
        first: u64,
        end: u64,
        payload: Bytes,
        crc: u32,
    ) -> Result<Lsn> {
        loop {
            let mut space = pin!(self.shared.space.notified());
            space.as_mut().enable();
            {
                let mut core = self.shared.lock_core();
                core.check_writable()?;
                match core.try_append(
                    &self.shared.layout,
                    kind,
                    first * BLOCK_SIZE,
                    (end - first) * BLOCK_SIZE,
                    payload.clone(),
                    crc,
                ) {
                    Ok(lsn) => {
                        self.after_append(&mut core);
                        return Ok(lsn);
                    }
                    Err(Backlog::Wal) => self.shared.wait_for_room(&mut core),
                    // The WAL writer wakes `space` as it places.
                    Err(Backlog::Placement) => {}
                }
            }
            space.await;
        }
    }

    pub(super) fn after_append(&self, core: &mut Core) {
        self.shared.wake_placer(core);
        if core.writer.queued_bytes >= wal_writer::BATCH_BYTES {
            self.shared.wake_writer(core);
        }
        if core.log.wal_used() >= flusher::eager_threshold(self.shared.layout.capacity) {
            self.shared.request_flush(core);
        }
    }

    async fn current_lsn(&self, durable: bool) -> Result<Lsn> {
        let lsn = self.shared.lock_core().log.last();
        if durable {
            self.shared.wait_durable(lsn).await?;
        }
        Ok(lsn)
    }

    /// Makes `[offset, offset+len)` read as zeroes. `punch` allows deallocating it. Partial
    /// blocks at the edges are zeroed by read-modify-write.
    pub async fn write_zeroes(&self, offset: u64, len: u64, punch: bool, fua: bool) -> Result<Lsn> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let inner_first = offset.div_ceil(BLOCK_SIZE);
        let inner_end = end / BLOCK_SIZE;
        let mut lsn = self.shared.lock_core().log.last();
        if inner_first >= inner_end {
            // No whole block inside: it is a small write of zeroes.
            if len > 0 {
                lsn = self.write(offset, &vec![0u8; len as usize], false).await?;
            }
        } else {
            if !punch {
                // Zeroes that must stay allocated take space when they reach the data file.
                self.reserve(inner_first, inner_end)?;
            }
            let head = inner_first * BLOCK_SIZE - offset;
            if head > 0 {
                self.write(offset, &vec![0u8; head as usize], false).await?;
            }
            lsn = self
                .append(
                    RecordKind::WriteZeroes { punch },
                    inner_first,
                    inner_end,
                    Bytes::new(),
                    crc32c::crc32c(&[]),
                )
                .await?;
            let tail = end - inner_end * BLOCK_SIZE;
            if tail > 0 {
                lsn = self
                    .write(inner_end * BLOCK_SIZE, &vec![0u8; tail as usize], false)
                    .await?;
            }
        }
        if fua {
            self.shared.wait_durable(lsn).await?;
        }
        Ok(lsn)
    }

    /// Discards the whole blocks inside `[offset, offset+len)`; partial blocks are left as
    /// they are (NBD lets a server round a TRIM inward).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<Lsn> {
        self.check_range(offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        if first >= end {
            return self.current_lsn(fua).await;
        }
        let lsn = self
            .append(
                RecordKind::Trim,
                first,
                end,
                Bytes::new(),
                crc32c::crc32c(&[]),
            )
            .await?;
        if fua {
            self.shared.wait_durable(lsn).await?;
        }
        Ok(lsn)
    }

    /// Makes every entry appended before the call durable. Returns the LSN it covers.
    pub async fn flush(&self) -> Result<Lsn> {
        self.current_lsn(true).await
    }

    /// Waits until `lsn` is durable in the WAL.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        self.shared.wait_durable(lsn).await
    }

    /// Allocation of `[offset, offset+len)`, clipped to the volume: never-written and trimmed
    /// ranges are holes that read as zeroes. Adjacent ranges with equal state are merged.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Allocation>> {
        if offset >= self.shared.volume_size {
            return Err(StorageError::OutOfRange {
                offset,
                length: len,
                size: self.shared.volume_size,
            });
        }
        let end = offset.saturating_add(len).min(self.shared.volume_size);
        let pieces = self
            .shared
            .lock_core()
            .maps
            .resolve(offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        let mut out: Vec<Allocation> = Vec::new();
        let mut push = |length: u64, hole: bool, zero: bool| {
            if length == 0 {
                return;
            }
            match out.last_mut() {
                Some(a) if a.hole == hole && a.zero == zero => a.length += length,
                _ => out.push(Allocation { length, hole, zero }),
            }
        };
        for p in pieces {
            let from = (p.start * BLOCK_SIZE).max(offset);
            let to = (p.end * BLOCK_SIZE).min(end);
            match p.state {
                Some(BlockState::Data(_)) => push(to - from, false, false),
                Some(BlockState::Zero { punch }) => push(to - from, punch, true),
                None | Some(BlockState::Placed) => {
                    let mut at = from;
                    while at < to {
                        let (is_data, until) = data_file_extent(&self.shared.data, at, to);
                        push(until - at, !is_data, !is_data);
                        at = until;
                    }
                }
            }
        }
        Ok(out)
    }
}
