//! The superblock: the store's identity and its durable checkpoint.
//!
//! It lives in its own file as two 4096-byte slots. An update writes the slot the previous
//! update did not use, with a higher sequence number, and fdatasyncs it. Opening reads both
//! slots and takes the valid one with the higher sequence number. A crash in the middle of an
//! update can therefore only tear the slot being written; the other slot still holds the
//! previous state, so the superblock is never unreadable after a crash.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, StorageError};
use crate::types::{Epoch, Lsn, RebuildCursor, VolumeId, WalPos, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"BLKREPSB";
const FORMAT_VERSION: u32 = 1;
pub(crate) const SLOT_SIZE: usize = 4096;
const CRC_AT: usize = SLOT_SIZE - 4;
const HISTORY_AT: usize = 256;
/// Epoch changes remembered in the superblock.
pub const EPOCH_HISTORY: usize = 128;

/// Set while a writer has the store open; cleared by a clean close that left the WAL empty.
/// A clean store needs no defensive scan past the end of its log at the next open.
pub(crate) const FLAG_CLEAN: u32 = 1;
/// A rebuild began and has not finished: the store's contents are incomplete, it must not be
/// served or promoted, and its next primary session starts the rebuild again.
pub(crate) const FLAG_REBUILDING: u32 = 2;

/// What a store is doing for its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves the volume (or has never been anything else).
    #[default]
    Primary,
    /// Receives the WAL of a primary.
    Replica,
}

impl Role {
    fn encode(self) -> u8 {
        match self {
            Role::Primary => 0,
            Role::Replica => 1,
        }
    }
    fn decode(b: u8) -> Result<Role, String> {
        match b {
            0 => Ok(Role::Primary),
            1 => Ok(Role::Replica),
            other => Err(format!("unknown role {other}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_id: VolumeId,
    /// This copy's own identity (every store of a volume has a different one).
    pub store_id: VolumeId,
    pub volume_size: u64,
    pub block_size: u32,
    pub epoch: Epoch,
    /// Every WAL entry up to and including this LSN is in the data file, which has been
    /// fdatasynced; the WAL before `wal_tail` may be reused.
    pub checkpoint_lsn: Lsn,
    /// Epoch of the entry `checkpoint_lsn` (so the epoch of a store's last entry is known
    /// even when its WAL is empty).
    pub checkpoint_epoch: Epoch,
    /// Logical WAL position of the entry `checkpoint_lsn + 1` (where recovery starts).
    pub wal_tail: WalPos,
    /// LSN of the entry at `wal_tail`. It is `checkpoint_lsn + 1` unless WAL is retained for a
    /// lagging replica, in which case replay re-applies entries the data file already has
    /// (harmless: they are replayed in order and the newest wins).
    pub wal_tail_lsn: Lsn,
    pub wal_capacity: u64,
    pub flags: u32,
    /// The highest LSN this store knows to be committed under the volume's commit mode.
    pub committed_lsn: Lsn,
    pub role: Role,
    /// The store that claimed `epoch` (a replica refuses another store at the same epoch).
    pub epoch_owner: VolumeId,
    /// Where each epoch begins in this store's log, oldest first: `(epoch, first LSN)`. It
    /// gives the epoch of any LSN, which is how two logs are compared (same LSN and same epoch
    /// means the same history). Bounded to the newest [`EPOCH_HISTORY`] changes.
    pub epoch_history: Vec<(Epoch, Lsn)>,
    /// The log's incarnation, and the first LSN written in it: records at or after that LSN
    /// must carry this generation (see `wal::record`).
    pub wal_generation: u16,
    pub generation_start: Lsn,
    /// The data file may hold entries up to this LSN: a checkpoint records its target here
    /// (fsynced) before it writes a block. The log can be cut in place only at or after it
    /// (see `Store::truncate_after`); a cut below it would leave blocks of discarded entries
    /// in the data file.
    pub data_through: Lsn,
    /// How far the rebuild in progress got, durably (only while rebuilding). Its history is
    /// the epoch history through its base.
    pub rebuild_cursor: Option<RebuildCursor>,
    /// Bumped by every update; picks the newer of the two slots.
    pub(crate) seq: u64,
}

impl Superblock {
    pub(crate) fn new(volume_id: VolumeId, volume_size: u64, wal_capacity: u64) -> Superblock {
        Superblock {
            volume_id,
            store_id: VolumeId::random(),
            volume_size,
            block_size: BLOCK_SIZE as u32,
            epoch: Epoch(0),
            checkpoint_lsn: Lsn::ZERO,
            checkpoint_epoch: Epoch(0),
            wal_tail: WalPos(0),
            wal_tail_lsn: Lsn(1),
            wal_capacity,
            flags: FLAG_CLEAN,
            committed_lsn: Lsn::ZERO,
            role: Role::Primary,
            epoch_owner: VolumeId([0; 16]),
            epoch_history: Vec::new(),
            wal_generation: 0,
            generation_start: Lsn::ZERO,
            data_through: Lsn::ZERO,
            rebuild_cursor: None,
            seq: 0,
        }
    }

    pub fn is_clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    pub fn is_rebuilding(&self) -> bool {
        self.flags & FLAG_REBUILDING != 0
    }

    fn encode(&self) -> [u8; SLOT_SIZE] {
        let mut b = [0u8; SLOT_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..40].copy_from_slice(&self.volume_id.0);
        b[40..48].copy_from_slice(&self.volume_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[56..64].copy_from_slice(&self.checkpoint_lsn.0.to_le_bytes());
        b[64..72].copy_from_slice(&self.wal_tail.0.to_le_bytes());
        b[72..80].copy_from_slice(&self.wal_capacity.to_le_bytes());
        b[80..84].copy_from_slice(&self.flags.to_le_bytes());
        b[84..100].copy_from_slice(&self.store_id.0);
        b[100..108].copy_from_slice(&self.committed_lsn.0.to_le_bytes());
        b[108..116].copy_from_slice(&self.wal_tail_lsn.0.to_le_bytes());
        b[116] = self.role.encode();
        b[120..136].copy_from_slice(&self.epoch_owner.0);
        b[136..144].copy_from_slice(&self.checkpoint_epoch.0.to_le_bytes());
        let history = &self.epoch_history[self.epoch_history.len().saturating_sub(EPOCH_HISTORY)..];
        b[144..146].copy_from_slice(&(history.len() as u16).to_le_bytes());
        b[146..148].copy_from_slice(&self.wal_generation.to_le_bytes());
        b[148..156].copy_from_slice(&self.generation_start.0.to_le_bytes());
        b[156..164].copy_from_slice(&self.data_through.0.to_le_bytes());
        // A store written before cursors existed has zeroes here: no cursor.
        if let Some(c) = &self.rebuild_cursor {
            b[164] = 1;
            b[168..176].copy_from_slice(&c.base.0.to_le_bytes());
            b[176..184].copy_from_slice(&c.through.to_le_bytes());
            b[184..192].copy_from_slice(&c.proof.0.to_le_bytes());
            b[192..200].copy_from_slice(&c.proof_epoch.0.to_le_bytes());
        }
        for (i, (e, lsn)) in history.iter().enumerate() {
            let at = HISTORY_AT + i * 16;
            b[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&lsn.0.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> std::result::Result<Superblock, String> {
        if b.len() < SLOT_SIZE {
            return Err(format!("slot is {} bytes, expected {SLOT_SIZE}", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        let stored = u32::from_le_bytes(b[CRC_AT..SLOT_SIZE].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[..CRC_AT]) != stored {
            return Err("checksum mismatch".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} (this build reads {FORMAT_VERSION})"
            ));
        }
        let sb = Superblock {
            block_size: u32_at(12),
            seq: u64_at(16),
            volume_id: VolumeId(b[24..40].try_into().expect("16 bytes")),
            volume_size: u64_at(40),
            epoch: Epoch(u64_at(48)),
            checkpoint_lsn: Lsn(u64_at(56)),
            wal_tail: WalPos(u64_at(64)),
            wal_capacity: u64_at(72),
            flags: u32_at(80),
            store_id: VolumeId(b[84..100].try_into().expect("16 bytes")),
            committed_lsn: Lsn(u64_at(100)),
            wal_tail_lsn: Lsn(u64_at(108)),
            role: Role::decode(b[116])?,
            epoch_owner: VolumeId(b[120..136].try_into().expect("16 bytes")),
            checkpoint_epoch: Epoch(u64_at(136)),
            wal_generation: u16::from_le_bytes([b[146], b[147]]),
            generation_start: Lsn(u64_at(148)),
            data_through: Lsn(u64_at(156)),
            rebuild_cursor: None,
            epoch_history: {
                let n = u16::from_le_bytes([b[144], b[145]]) as usize;
                if n > EPOCH_HISTORY {
                    return Err(format!("epoch history of {n} entries"));
                }
                (0..n)
                    .map(|i| {
                        let at = HISTORY_AT + i * 16;
                        (Epoch(u64_at(at)), Lsn(u64_at(at + 8)))
                    })
                    .collect()
            },
        };
        let mut sb = sb;
        if b[164] == 1 {
            let base = Lsn(u64_at(168));
            sb.rebuild_cursor = Some(RebuildCursor {
                base,
                history: history_through(&sb.epoch_history, base),
                through: u64_at(176),
                proof: Lsn(u64_at(184)),
                proof_epoch: Epoch(u64_at(192)),
            });
        }
        if u64::from(sb.block_size) != BLOCK_SIZE {
            return Err(format!("block size {} is not {BLOCK_SIZE}", sb.block_size));
        }
        Ok(sb)
    }

    /// Reads both slots and returns the newest valid one.
    pub(crate) fn read(file: &File, path: &Path) -> Result<Superblock> {
        let mut buf = vec![0u8; 2 * SLOT_SIZE];
        let n = read_up_to(file, &mut buf, 0).map_err(|e| StorageError::io(path, e))?;
        let slots = [&buf[..SLOT_SIZE.min(n)], &buf[SLOT_SIZE.min(n)..n]];
        let decoded: Vec<_> = slots.iter().map(|s| Superblock::decode(s)).collect();
        let best = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .max_by_key(|sb| sb.seq)
            .cloned();
        best.ok_or_else(|| StorageError::BadSuperblock {
            path: path.to_path_buf(),
            reason: format!(
                "both slots invalid (slot 0: {}; slot 1: {})",
                decoded[0].as_ref().err().map_or("ok", |s| s.as_str()),
                decoded[1].as_ref().err().map_or("ok", |s| s.as_str())
            ),
        })
    }

    /// Writes this superblock into the slot the previous update did not use, then fdatasyncs.
    /// `self.seq` is advanced first, so the write is newer than anything on disk.
    pub(crate) fn persist(&mut self, file: &File, path: &Path) -> Result<()> {
        self.seq += 1;
        let slot = self.seq % 2;
        file.write_all_at(&self.encode(), slot * SLOT_SIZE as u64)
            .and_then(|_| crate::io::sync_data(file))
            .map_err(|e| StorageError::io(path, e))
    }

    /// Writes both slots (used once, at creation).
    pub(crate) fn persist_both(&mut self, file: &File, path: &Path) -> Result<()> {
        self.persist(file, path)?;
        self.persist(file, path)
    }
}

/// The epoch of entry `lsn` according to `history` (see [`Superblock::epoch_history`]);
/// `None` if it is older than the history remembers.
/// The part of `history` that covers the log through `lsn` (epochs begun after it dropped).
pub(crate) fn history_through(history: &[(Epoch, Lsn)], lsn: Lsn) -> Vec<(Epoch, Lsn)> {
    history
        .iter()
        .copied()
        .filter(|(_, start)| *start <= lsn)
        .collect()
}

pub fn epoch_at(history: &[(Epoch, Lsn)], lsn: Lsn) -> Option<Epoch> {
    if lsn == Lsn::ZERO {
        return Some(Epoch(0));
    }
    let i = history.partition_point(|(_, start)| *start <= lsn);
    (i > 0).then(|| history[i - 1].0)
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        let mut sb = Superblock::new(VolumeId([7; 16]), 1 << 30, 64 << 20);
        sb.epoch = Epoch(3);
        sb.checkpoint_lsn = Lsn(42);
        sb.epoch_history = vec![(Epoch(1), Lsn(1)), (Epoch(3), Lsn(40))];
        sb.wal_tail = WalPos(8192);
        sb.data_through = Lsn(44);
        sb
    }

    #[test]
    fn superblock_roundtrips_a_rebuild_cursor() {
        let mut sb = sample();
        sb.rebuild_cursor = Some(RebuildCursor {
            base: Lsn(41),
            history: vec![(Epoch(1), Lsn(1)), (Epoch(3), Lsn(40))],
            through: 64 << 20,
            proof: Lsn(44),
            proof_epoch: Epoch(3),
        });
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn superblock_roundtrips() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn superblock_torn_update_keeps_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sb");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut sb = sample();
        sb.persist_both(&file, &path).unwrap();
        let before = Superblock::read(&file, &path).unwrap();
        sb.checkpoint_lsn = Lsn(99);
        sb.persist(&file, &path).unwrap();
        // Tear the slot just written: the reader must fall back to the other one.
        let slot = sb.seq % 2;
        file.write_all_at(&[0xff; 100], slot * SLOT_SIZE as u64 + 50)
            .unwrap();
        let after = Superblock::read(&file, &path).unwrap();
        assert_eq!(after, before);
        assert_eq!(after.checkpoint_lsn, Lsn(42));
    }

    #[test]
    fn superblock_both_slots_corrupt_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sb");
        std::fs::write(&path, vec![0u8; 2 * SLOT_SIZE]).unwrap();
        let file = File::open(&path).unwrap();
        let err = Superblock::read(&file, &path).unwrap_err().to_string();
        assert!(err.contains("both slots invalid"), "{err}");
    }
}
