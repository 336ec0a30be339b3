//! The write-ahead log: a fixed-size file used as a ring of checksummed records.
//!
//! The file starts with a 4096-byte header naming the volume and the ring's capacity; the ring
//! follows. Records are addressed by logical positions ([`WalPos`]) that only grow; a record
//! never straddles the end of the ring (a [`RecordKind::Wrap`] marker fills the rest of a lap).

pub mod record;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Result, StorageError};
use crate::io::IoEngine;
use crate::types::{Epoch, Lsn, VolumeId, WalPos, BLOCK_SIZE};
use record::{RecordHeader, RecordKind, WalRecord, HEADER_LEN};

pub(crate) const WAL_HEADER_LEN: u64 = 4096;
const WAL_MAGIC: &[u8; 8] = b"BLKREPWL";
const WAL_VERSION: u32 = 1;
/// Records start on this alignment, which is also the step of the defensive scan.
pub(crate) const RECORD_ALIGN: u64 = HEADER_LEN as u64;
/// The smallest ring a store may have.
pub const MIN_WAL_CAPACITY: u64 = 64 << 20;
/// The most payload one write entry carries: a quarter of the smallest ring, whatever the
/// writing store's own ring is.
///
/// Why a quarter: an entry that must wrap needs its own size plus what is left of the lap,
/// so in a ring four times its size it always fits once the ring has drained. Why of the
/// smallest ring: a replica appends the primary's entries as they are (it cannot split one
/// without renumbering the log), so an entry sized by a larger WAL could never fit a
/// replica with a smaller one, and its log would stop there for good.
pub const MAX_ENTRY_PAYLOAD: u64 = MIN_WAL_CAPACITY / 4;

/// Maps logical WAL positions to file offsets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalLayout {
    pub capacity: u64,
}

impl WalLayout {
    pub fn file_offset(&self, pos: WalPos) -> u64 {
        WAL_HEADER_LEN + pos.0 % self.capacity
    }

    /// Bytes left before the ring wraps.
    pub fn room(&self, pos: WalPos) -> u64 {
        self.capacity - pos.0 % self.capacity
    }
}

pub(crate) fn write_header(file: &File, path: &Path, id: VolumeId, capacity: u64) -> Result<()> {
    let mut h = [0u8; WAL_HEADER_LEN as usize];
    h[0..8].copy_from_slice(WAL_MAGIC);
    h[8..12].copy_from_slice(&WAL_VERSION.to_le_bytes());
    h[16..32].copy_from_slice(&id.0);
    h[32..40].copy_from_slice(&capacity.to_le_bytes());
    let crc = crc32c::crc32c(&h[..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&h, 0)
        .map_err(|e| StorageError::io(path, e))
}

pub(crate) fn check_header(file: &File, path: &Path, id: VolumeId, capacity: u64) -> Result<()> {
    let bad = |reason: String| StorageError::BadWalHeader {
        path: path.to_path_buf(),
        reason,
    };
    let mut h = [0u8; 44];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| StorageError::io(path, e))?;
    if &h[0..8] != WAL_MAGIC {
        return Err(bad("bad magic".into()));
    }
    if crc32c::crc32c(&h[..40]) != u32::from_le_bytes(h[40..44].try_into().expect("4")) {
        return Err(bad("checksum mismatch".into()));
    }
    if h[16..32] != id.0 {
        return Err(bad("it belongs to another volume".into()));
    }
    let cap = u64::from_le_bytes(h[32..40].try_into().expect("8"));
    if cap != capacity {
        return Err(bad(format!(
            "ring capacity {cap} differs from the superblock's {capacity}"
        )));
    }
    Ok(())
}

/// What replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// The LSN the next entry will get.
    pub next_lsn: Lsn,
    /// Where the next record goes.
    pub head: WalPos,
    /// Epoch of the last replayed entry (`Epoch(0)` if none).
    pub last_epoch: Epoch,
    pub entries: u64,
    /// File offset of a torn tail that was cut, if the log did not end cleanly.
    pub torn_at: Option<u64>,
    /// The highest commit hint found in the replayed records.
    pub commit_hint: Lsn,
}

/// Reads the ring through a window so replay costs one read per megabyte, not per record.
struct RingReader<'a> {
    io: &'a IoEngine,
    file: &'a Arc<File>,
    path: &'a Path,
    layout: WalLayout,
    window_at: u64,
    window: Bytes,
    generation: Generation,
}

/// Which records belong to the current incarnation of the log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Generation {
    pub current: u16,
    /// Records from this LSN on must carry `current`; older ones predate it.
    pub start: Lsn,
}

impl Generation {
    fn accepts(self, lsn: Lsn, generation: u16) -> bool {
        lsn < self.start || generation == self.current
    }
}

const WINDOW: u64 = 1 << 20;

impl<'a> RingReader<'a> {
    /// Bytes at `[offset, offset+len)` of the file, which lie inside the ring.
    fn get(&mut self, offset: u64, len: u64) -> Result<Bytes> {
        let in_window =
            offset >= self.window_at && offset + len <= self.window_at + self.window.len() as u64;
        if !in_window {
            let ring_end = WAL_HEADER_LEN + self.layout.capacity;
            let want = len.max(WINDOW).min(ring_end - offset);
            self.window = self
                .io
                .read(self.file, offset, want as usize)
                .wait()
                .map_err(|e| StorageError::io(self.path, e))?;
            self.window_at = offset;
        }
        let at = (offset - self.window_at) as usize;
        Ok(self.window.slice(at..at + len as usize))
    }

    /// The record at `pos` if it is intact (magic, checksum, fits in the ring) and of the
    /// right generation for its LSN, with its commit hint; no LSN order checks.
    fn record_at(&mut self, pos: WalPos) -> Result<Option<(WalRecord, Lsn)>> {
        let room = self.layout.room(pos);
        let offset = self.layout.file_offset(pos);
        let header = self.get(offset, HEADER_LEN as u64)?;
        let Some(h) = RecordHeader::parse(&header) else {
            return Ok(None);
        };
        if h.encoded_len() > room {
            return Ok(None);
        }
        if !self.generation.accepts(h.lsn, h.generation) {
            return Ok(None);
        }
        let payload = self.get(offset + HEADER_LEN as u64, u64::from(h.payload_len))?;
        Ok(h.verify(payload).map(|r| (r, h.commit_hint)))
    }

    /// Just the header at `pos` (for the cheap first test of the defensive scan).
    fn header_at(&mut self, pos: WalPos) -> Result<Option<RecordHeader>> {
        let header = self.get(self.layout.file_offset(pos), HEADER_LEN as u64)?;
        Ok(RecordHeader::parse(&header))
    }
}

/// Reads the records at `entries` (LSN, position, bytes it spans), coalescing neighbours into
/// large reads. Used to serve retained WAL to a lagging replica.
pub(crate) async fn read_entries(
    io: &IoEngine,
    file: &Arc<File>,
    path: &Path,
    layout: WalLayout,
    entries: &[(Lsn, WalPos, u64)],
) -> Result<Vec<WalRecord>> {
    const MAX_READ: u64 = 8 << 20;
    // (file offset, length, entries covered)
    let mut reads: Vec<(u64, u64, std::ops::Range<usize>)> = Vec::new();
    for (i, &(_, pos, len)) in entries.iter().enumerate() {
        let at = layout.file_offset(pos);
        match reads.last_mut() {
            Some((off, n, range)) if *off + *n == at && *n + len <= MAX_READ => {
                *n += len;
                range.end = i + 1;
            }
            _ => reads.push((at, len, i..i + 1)),
        }
    }
    let pending: Vec<_> = reads
        .iter()
        .map(|(off, n, _)| io.read(file, *off, *n as usize))
        .collect();
    let mut out = Vec::with_capacity(entries.len());
    for ((off, _, range), done) in reads.into_iter().zip(pending) {
        let buf = done.await.map_err(|e| StorageError::io(path, e))?;
        for &(lsn, pos, len) in &entries[range] {
            let rel = (layout.file_offset(pos) - off) as usize;
            let bytes = buf.slice(rel..rel + len as usize);
            let rec = RecordHeader::parse(&bytes).and_then(|h| {
                let end = HEADER_LEN + h.payload_len as usize;
                (end <= bytes.len())
                    .then(|| h.verify(bytes.slice(HEADER_LEN..end)))
                    .flatten()
            });
            match rec {
                Some(rec) if rec.lsn == lsn => out.push(rec),
                _ => {
                    return Err(StorageError::CorruptWal {
                        path: path.to_path_buf(),
                        offset: layout.file_offset(pos),
                        lsn,
                        reason: "a retained entry is unreadable".into(),
                    })
                }
            }
        }
    }
    Ok(out)
}

/// Checks that a record is one the volume could have produced.
fn plausible(rec: &WalRecord, volume_size: u64) -> bool {
    if matches!(rec.kind, RecordKind::Wrap | RecordKind::EpochStart) {
        return rec.payload.is_empty() && rec.length == 0;
    }
    let aligned = rec.offset.is_multiple_of(BLOCK_SIZE)
        && rec.length.is_multiple_of(BLOCK_SIZE)
        && rec.length > 0;
    let in_range = rec
        .offset
        .checked_add(rec.length)
        .is_some_and(|end| end <= volume_size);
    let payload_ok = match rec.kind {
        RecordKind::Write => rec.payload.len() as u64 == rec.length,
        RecordKind::Placed => rec.payload.len() == record::PLACED_PAYLOAD_LEN,
        _ => rec.payload.is_empty(),
    };
    aligned && in_range && payload_ok
}

pub(crate) struct ReplayInput<'a> {
    pub io: &'a IoEngine,
    pub file: &'a Arc<File>,
    pub path: PathBuf,
    pub layout: WalLayout,
    pub volume_size: u64,
    /// Where the entry `first_lsn` is (the superblock's tail).
    pub start: WalPos,
    pub first_lsn: Lsn,
    /// The store was closed cleanly (every entry durable and applied): nothing after the end
    /// needs checking.
    pub clean: bool,
    pub generation: Generation,
}

/// Replays the log from the checkpoint, handing every entry to `apply` in LSN order.
///
/// The log ends at the first position that does not hold the next entry: a record whose
/// magic, checksum, LSN (exactly the next one) or epoch (never lower than the previous) is
/// wrong. That end is either a torn tail, which is cut, or corruption in the middle of the
/// log, which refuses to open. The difference: a later intact record whose `durable_hint`
/// covers the missing LSN proves that the missing entry had been fsynced, so losing it would
/// lose acknowledged data. Without such proof the entry was never promised durable.
pub(crate) fn replay(
    input: ReplayInput<'_>,
    mut apply: impl FnMut(WalPos, WalRecord),
) -> Result<ReplayOutcome> {
    let mut reader = RingReader {
        io: input.io,
        file: input.file,
        path: &input.path,
        layout: input.layout,
        window_at: 0,
        window: Bytes::new(),
        generation: input.generation,
    };
    let capacity = input.layout.capacity;
    let mut pos = input.start;
    let mut expected = input.first_lsn;
    let mut last_epoch = Epoch(0);
    let mut entries = 0u64;
    let mut commit_hint = Lsn::ZERO;
    let end_reason = loop {
        if pos.0 - input.start.0 >= capacity {
            break None; // a whole lap: the ring cannot hold more
        }
        let (rec, hint) = match reader.record_at(pos)? {
            Some(r) => r,
            None => break Some("no intact record (torn write or end of log)".to_string()),
        };
        if rec.lsn != expected {
            break Some(format!("found LSN {} instead", rec.lsn));
        }
        if rec.epoch < last_epoch {
            break Some(format!(
                "epoch {} is below the previous entry's {last_epoch}",
                rec.epoch
            ));
        }
        if !plausible(&rec, input.volume_size) {
            break Some("record describes an impossible range".to_string());
        }
        if rec.kind == RecordKind::Wrap {
            pos = WalPos(pos.0 + input.layout.room(pos));
            continue;
        }
        let at = pos;
        pos = WalPos(pos.0 + rec.encoded_len());
        expected = expected.next();
        last_epoch = rec.epoch;
        entries += 1;
        commit_hint = commit_hint.max(hint);
        apply(at, rec);
    };

    let mut torn_at = None;
    if let Some(reason) = end_reason {
        if !input.clean {
            if let Some(proof) = find_durable_successor(&mut reader, input.start, pos, expected)? {
                return Err(StorageError::CorruptWal {
                    path: input.path.clone(),
                    offset: input.layout.file_offset(pos),
                    lsn: expected,
                    reason: format!(
                        "{reason}; the intact entry {} at file offset {} was written after \
                         entry {expected} had been fsynced",
                        proof.0, proof.1
                    ),
                });
            }
            // Only report a cut when something was actually there.
            if reader.header_at(pos)?.is_some() {
                torn_at = Some(input.layout.file_offset(pos));
            }
        }
    }
    Ok(ReplayOutcome {
        next_lsn: expected,
        head: pos,
        last_epoch,
        entries,
        torn_at,
        commit_hint,
    })
}

/// Scans the rest of the ring for an intact entry with a higher LSN whose writer already knew
/// `missing` to be durable. Returns its LSN and file offset.
fn find_durable_successor(
    reader: &mut RingReader<'_>,
    start: WalPos,
    end: WalPos,
    missing: Lsn,
) -> Result<Option<(Lsn, u64)>> {
    let limit = start.0 + reader.layout.capacity;
    let mut pos = WalPos(end.0 + RECORD_ALIGN);
    while pos.0 < limit {
        if let Some(h) = reader.header_at(pos)? {
            if h.lsn > missing
                && h.durable_hint >= missing
                && reader.generation.accepts(h.lsn, h.generation)
            {
                if let Some((rec, _)) = reader.record_at(pos)? {
                    return Ok(Some((rec.lsn, reader.layout.file_offset(pos))));
                }
            }
        }
        pos = WalPos(pos.0 + RECORD_ALIGN);
    }
    Ok(None)
}
