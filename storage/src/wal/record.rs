//! One WAL record: a 64-byte header followed by its payload.
//!
//! ```text
//!  0 magic u32 "WALR"        4 crc32c u32 (payload, then header bytes 8..64)
//!  8 lsn u64                16 epoch u64
//! 24 kind u8, flags u8, generation u16   28 payload_len u32
//! 32 offset u64 (bytes)     40 length u64 (bytes affected)
//! 48 durable_hint u64       56 commit_hint u64
//! ```
//! All integers are little-endian; offset and length are block-aligned. The CRC starts from the
//! payload's CRC so a record shipped to a replica can carry the payload checksum computed once.
//! `durable_hint` is the highest LSN the writer knew to be fsynced when it wrote the record;
//! recovery uses it to tell a torn tail (safe to cut) from corruption of acknowledged data.
//! `commit_hint` is the highest LSN the writer knew to be committed under the volume's commit
//! mode; it is how a replica's knowledge of the committed prefix survives a crash for free.
//! `generation` is the log's incarnation: a rebuild or a truncation starts a new one, so
//! records an older incarnation left in the ring can never pass for new ones.

use bytes::Bytes;

use crate::types::{Epoch, Lsn};

pub(crate) const HEADER_LEN: usize = 64;
const MAGIC: u32 = u32::from_le_bytes(*b"WALR");

/// What a record does to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Payload bytes replace `length` bytes at `offset`.
    Write,
    /// The range is discarded; it reads as zeroes and may be deallocated.
    Trim,
    /// The range reads as zeroes; `punch` says whether it may be deallocated (NBD's NO_HOLE
    /// clears it).
    WriteZeroes { punch: bool },
    /// Not an entry: marks the end of a lap of the circular log; recovery continues at the
    /// start of the region. It carries the LSN the next real record will have.
    Wrap,
    /// An entry that changes no block: the first entry a sync-quorum primary writes at a new
    /// epoch, so that committing it (on a majority) commits every older entry before it
    /// with a log that ends at the current epoch (see `Store::append_epoch_start`).
    EpochStart,
    /// Blocks `[offset, offset + length)` were written in place, straight to the data file,
    /// and synced there before this record was written (see `store::placement`). The payload
    /// is [`PLACED_PAYLOAD_LEN`] bytes: the CRC32C of the blocks' contents, then zeroes. Never
    /// shipped as such: a replica gets the write with its data.
    Placed,
}

/// Bytes of a [`RecordKind::Placed`] record's payload: its contents' CRC32C, padded so the next
/// record starts on the records' alignment.
pub const PLACED_PAYLOAD_LEN: usize = 64;

impl RecordKind {
    /// The (kind, flags) bytes of the on-disk header; the replication wire uses the same.
    pub fn encode(self) -> (u8, u8) {
        match self {
            RecordKind::Write => (1, 0),
            RecordKind::Trim => (2, 0),
            RecordKind::WriteZeroes { punch } => (3, u8::from(punch)),
            RecordKind::Wrap => (0xfe, 0),
            RecordKind::EpochStart => (4, 0),
            RecordKind::Placed => (5, 0),
        }
    }

    /// The kind a (kind, flags) pair names, if any.
    pub fn decode(kind: u8, flags: u8) -> Option<RecordKind> {
        match kind {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Trim),
            3 => Some(RecordKind::WriteZeroes {
                punch: flags & 1 != 0,
            }),
            0xfe => Some(RecordKind::Wrap),
            4 => Some(RecordKind::EpochStart),
            5 => Some(RecordKind::Placed),
            _ => None,
        }
    }
}

/// A WAL entry as the engine and (later) the replication stream see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub lsn: Lsn,
    pub epoch: Epoch,
    pub kind: RecordKind,
    /// Byte offset in the volume, block-aligned.
    pub offset: u64,
    /// Bytes affected, block-aligned; equals `payload.len()` for writes.
    pub length: u64,
    /// The new contents for writes; empty otherwise.
    pub payload: Bytes,
    /// CRC32C of `payload`.
    pub payload_crc: u32,
}

impl WalRecord {
    pub fn new(
        lsn: Lsn,
        epoch: Epoch,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: Bytes,
    ) -> WalRecord {
        let payload_crc = crc32c::crc32c(&payload);
        WalRecord {
            lsn,
            epoch,
            kind,
            offset,
            length,
            payload,
            payload_crc,
        }
    }

    /// The record of a write of `length` bytes at `offset` placed in the data file, whose
    /// contents have CRC32C `data_crc`.
    pub fn placed(lsn: Lsn, epoch: Epoch, offset: u64, length: u64, data_crc: u32) -> WalRecord {
        let mut payload = [0u8; PLACED_PAYLOAD_LEN];
        payload[..4].copy_from_slice(&data_crc.to_le_bytes());
        WalRecord::new(
            lsn,
            epoch,
            RecordKind::Placed,
            offset,
            length,
            Bytes::copy_from_slice(&payload),
        )
    }

    /// The CRC32C of a placed write's contents (`None` for any other kind).
    pub fn placed_crc(&self) -> Option<u32> {
        match self.kind {
            RecordKind::Placed => Some(u32::from_le_bytes(self.payload.get(..4)?.try_into().ok()?)),
            _ => None,
        }
    }

    /// Bytes this record takes in the log.
    pub fn encoded_len(&self) -> u64 {
        (HEADER_LEN + self.payload.len()) as u64
    }

    pub(crate) fn encode_header(
        &self,
        durable_hint: Lsn,
        commit_hint: Lsn,
        generation: u16,
    ) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&self.lsn.0.to_le_bytes());
        h[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        let (kind, flags) = self.kind.encode();
        h[24] = kind;
        h[25] = flags;
        h[26..28].copy_from_slice(&generation.to_le_bytes());
        h[28..32].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h[32..40].copy_from_slice(&self.offset.to_le_bytes());
        h[40..48].copy_from_slice(&self.length.to_le_bytes());
        h[48..56].copy_from_slice(&durable_hint.0.to_le_bytes());
        h[56..64].copy_from_slice(&commit_hint.0.to_le_bytes());
        let crc = crc32c::crc32c_append(self.payload_crc, &h[8..]);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// A decoded header whose payload has not been checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub crc: u32,
    pub lsn: Lsn,
    pub epoch: Epoch,
    pub kind: RecordKind,
    pub payload_len: u32,
    pub offset: u64,
    pub length: u64,
    pub durable_hint: Lsn,
    pub commit_hint: Lsn,
    pub generation: u16,
    raw: [u8; HEADER_LEN],
}

impl RecordHeader {
    /// Parses a header; `None` if the magic or the kind is wrong (not a record).
    pub(crate) fn parse(b: &[u8]) -> Option<RecordHeader> {
        let raw: [u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8"));
        if u32_at(0) != MAGIC {
            return None;
        }
        Some(RecordHeader {
            crc: u32_at(4),
            lsn: Lsn(u64_at(8)),
            epoch: Epoch(u64_at(16)),
            kind: RecordKind::decode(raw[24], raw[25])?,
            payload_len: u32_at(28),
            offset: u64_at(32),
            length: u64_at(40),
            durable_hint: Lsn(u64_at(48)),
            commit_hint: Lsn(u64_at(56)),
            generation: u16::from_le_bytes([raw[26], raw[27]]),
            raw,
        })
    }

    pub(crate) fn encoded_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.payload_len)
    }

    /// Checks the CRC against `payload`; on success returns the full record.
    pub(crate) fn verify(&self, payload: Bytes) -> Option<WalRecord> {
        let payload_crc = crc32c::crc32c(&payload);
        if crc32c::crc32c_append(payload_crc, &self.raw[8..]) != self.crc {
            return None;
        }
        Some(WalRecord {
            lsn: self.lsn,
            epoch: self.epoch,
            kind: self.kind,
            offset: self.offset,
            length: self.length,
            payload,
            payload_crc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = RecordKind> {
        prop_oneof![
            Just(RecordKind::Write),
            Just(RecordKind::Trim),
            any::<bool>().prop_map(|punch| RecordKind::WriteZeroes { punch }),
            Just(RecordKind::Wrap),
            Just(RecordKind::EpochStart),
            Just(RecordKind::Placed),
        ]
    }

    proptest! {
        #[test]
        fn wal_record_roundtrips(
            lsn in 1u64.., epoch in any::<u64>(), kind in kind_strategy(),
            offset in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..600),
            hint in any::<u64>(),
        ) {
            let rec = WalRecord::new(Lsn(lsn), Epoch(epoch), kind, offset, payload.len() as u64,
                Bytes::from(payload));
            let h = rec.encode_header(Lsn(hint), Lsn(hint / 2), 7);
            let parsed = RecordHeader::parse(&h).expect("header parses");
            prop_assert_eq!(parsed.durable_hint, Lsn(hint));
            prop_assert_eq!(parsed.commit_hint, Lsn(hint / 2));
            prop_assert_eq!(parsed.generation, 7);
            prop_assert_eq!(parsed.encoded_len(), rec.encoded_len());
            prop_assert_eq!(parsed.verify(rec.payload.clone()), Some(rec));
        }

        #[test]
        fn wal_record_any_single_bit_flip_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 1..300),
            bit in 0usize..((64 + 300) * 8),
        ) {
            let rec = WalRecord::new(Lsn(9), Epoch(2), RecordKind::Write, 4096,
                payload.len() as u64, Bytes::from(payload));
            let mut bytes = rec.encode_header(Lsn(3), Lsn(2), 1).to_vec();
            bytes.extend_from_slice(&rec.payload);
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let ok = RecordHeader::parse(&bytes).and_then(|h| {
                let end = HEADER_LEN + h.payload_len as usize;
                if end > bytes.len() { return None; }
                h.verify(Bytes::copy_from_slice(&bytes[HEADER_LEN..end]))
            });
            prop_assert!(ok.is_none(), "flip of bit {} went unnoticed", bit);
        }
    }
}
