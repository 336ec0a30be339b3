//! What an entry or base chunk must be before a store may take it.
//!
//! A frame that passes its checksums is only well formed; it can still describe something no
//! honest primary sends: a write whose payload is shorter than its length, a range off the
//! block grid or past the end of the volume. The store trusts what it is given (it slices
//! payloads by length), so such an entry is refused whole before any store action exists for
//! it, in two places that each know what they check:
//! - the decoder ([`check_payload`], once per entry as it is decoded): a write's payload is
//!   exactly its length, nothing else carries one, an epoch start covers nothing. A bad entry
//!   fails the frame with [`WireError::BadEntry`](super::WireError::BadEntry).
//! - the replica core ([`check_placement`], [`check_range`]), which knows the volume and the
//!   session: block aligned, inside the volume, no epoch above the session's. A bad entry or
//!   base chunk ends the session with `Reject(BadEntry)`.
//!
//! (The simulator hands the core frames it never encodes, with payloads abbreviated to a token
//! per block, so the payload length is the decoder's to check.)

use blockrep_storage::{
    Epoch, Lsn, RebuildCursor, RecordKind, WalRecord, BLOCK_SIZE, MAX_ENTRY_PAYLOAD,
};

/// Why an entry (or a base chunk) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("offset {offset} or length {length} is not a multiple of the {BLOCK_SIZE}-byte block")]
    Misaligned { offset: u64, length: u64 },
    #[error("range {offset}+{length} runs past the end of the {size}-byte volume")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("a write of {length} bytes carries {payload} payload bytes")]
    PayloadLength { length: u64, payload: u64 },
    #[error("a write entry of {0} bytes is larger than the {MAX_ENTRY_PAYLOAD} bytes any store's WAL must take")]
    TooLarge(u64),
    #[error("a {kind} entry carries {payload} payload bytes (it must carry none)")]
    UnexpectedPayload { kind: &'static str, payload: u64 },
    #[error("an epoch-start entry covers {offset}+{length} (it must cover nothing)")]
    EpochStartRange { offset: u64, length: u64 },
    #[error("entry of epoch {entry} arrived at epoch {session}, from the future")]
    FutureEpoch { entry: Epoch, session: Epoch },
    #[error("a wrap marker is not an entry")]
    WrapMarker,
    #[error("a placed-write record is a store's own (its data stays in that store's data file): it is never shipped")]
    PlacedRecord,
    #[error("entry at LSN {0}, the last there is: no entry could follow it")]
    LastLsn(u64),
}

/// Why a rebuild cursor a replica reported cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor offset {through} is off the block grid or past the {size}-byte volume")]
    Offset { through: u64, size: u64 },
    #[error("cursor proof {proof} is below its base {base}")]
    ProofBelowBase { proof: Lsn, base: Lsn },
    #[error("cursor history {0:?} is not ordered or runs past its base")]
    History(Vec<(Epoch, Lsn)>),
}

/// A cursor a replica reported describes a base some primary could have sent: its offset on
/// the block grid inside the volume, a proof at or after its base, and a history ordered
/// by epoch and LSN that ends at or before its base. (Whether *we* can vouch for it is the
/// primary core's resume rule; this only keeps nonsense out of it.)
pub fn check_cursor(cursor: &RebuildCursor, size: u64) -> Result<(), CursorError> {
    let through = cursor.through;
    if !through.is_multiple_of(BLOCK_SIZE) || through > size {
        return Err(CursorError::Offset { through, size });
    }
    if cursor.proof < cursor.base {
        return Err(CursorError::ProofBelowBase {
            proof: cursor.proof,
            base: cursor.base,
        });
    }
    let h = &cursor.history;
    let ordered = h.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
    if !ordered || h.last().is_some_and(|(_, start)| *start > cursor.base) {
        return Err(CursorError::History(h.clone()));
    }
    Ok(())
}

/// `offset..offset+length` is on the block grid and inside a volume of `size` bytes.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<(), EntryError> {
    if !offset.is_multiple_of(BLOCK_SIZE) || !length.is_multiple_of(BLOCK_SIZE) {
        return Err(EntryError::Misaligned { offset, length });
    }
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(EntryError::OutOfRange {
            offset,
            length,
            size,
        }),
    }
}

/// The entry's payload fits its kind: a write's is exactly its length and at most
/// [`MAX_ENTRY_PAYLOAD`] (a larger one could never fit a replica with the smallest WAL: its
/// log would stop there), nothing else carries one, an epoch start covers nothing, and a
/// wrap marker (the ring's, never the stream's) is not an entry at all, nor is a placed-write
/// record (a store ships the write itself, with its data).
pub fn check_payload(record: &WalRecord) -> Result<(), EntryError> {
    let payload = record.payload.len() as u64;
    let (offset, length) = (record.offset, record.length);
    let kind = match record.kind {
        RecordKind::Write if payload != length => {
            return Err(EntryError::PayloadLength { length, payload })
        }
        RecordKind::Write if length > MAX_ENTRY_PAYLOAD => {
            return Err(EntryError::TooLarge(length))
        }
        RecordKind::Write => return Ok(()),
        RecordKind::Wrap => return Err(EntryError::WrapMarker),
        RecordKind::Placed => return Err(EntryError::PlacedRecord),
        RecordKind::EpochStart if offset != 0 || length != 0 => {
            return Err(EntryError::EpochStartRange { offset, length })
        }
        RecordKind::EpochStart => "epoch-start",
        RecordKind::Trim => "trim",
        RecordKind::WriteZeroes { .. } => "write-zeroes",
    };
    if payload != 0 {
        return Err(EntryError::UnexpectedPayload { kind, payload });
    }
    Ok(())
}

/// The entry lands where a store of `size` bytes can take it (block aligned, inside the
/// volume), was written at no epoch above the session's, and leaves an LSN after it (a
/// store at `Lsn::MAX` could never take another entry: `Lsn::next` saturates).
pub fn check_placement(record: &WalRecord, size: u64, session: Epoch) -> Result<(), EntryError> {
    if record.lsn.checked_next().is_none() {
        return Err(EntryError::LastLsn(record.lsn.0));
    }
    if record.epoch > session {
        return Err(EntryError::FutureEpoch {
            entry: record.epoch,
            session,
        });
    }
    check_range(record.offset, record.length, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_cursor_that_no_primary_could_have_sent_is_refused() {
        let good = RebuildCursor {
            base: Lsn(10),
            history: vec![(Epoch(1), Lsn(1)), (Epoch(3), Lsn(8))],
            through: 8 * MIB,
            proof: Lsn(12),
            proof_epoch: Epoch(3),
        };
        assert_eq!(check_cursor(&good, 16 * MIB), Ok(()));
        let off_grid = RebuildCursor {
            through: 4097,
            ..good.clone()
        };
        assert!(matches!(
            check_cursor(&off_grid, 16 * MIB),
            Err(CursorError::Offset { .. })
        ));
        let past_end = RebuildCursor {
            through: 32 * MIB,
            ..good.clone()
        };
        assert!(check_cursor(&past_end, 16 * MIB).is_err());
        let low_proof = RebuildCursor {
            proof: Lsn(9),
            ..good.clone()
        };
        assert!(matches!(
            check_cursor(&low_proof, 16 * MIB),
            Err(CursorError::ProofBelowBase { .. })
        ));
        for history in [
            vec![(Epoch(3), Lsn(1)), (Epoch(1), Lsn(8))],
            vec![(Epoch(1), Lsn(11))],
        ] {
            let bad = RebuildCursor {
                history,
                ..good.clone()
            };
            assert!(matches!(
                check_cursor(&bad, 16 * MIB),
                Err(CursorError::History(_))
            ));
        }
    }

    const MIB: u64 = 1 << 20;

    /// Both halves, as a replica fed by the decoder applies them.
    fn check_entry(r: &WalRecord, size: u64, session: Epoch) -> Result<(), EntryError> {
        check_payload(r)?;
        check_placement(r, size, session)
    }

    fn write(offset: u64, length: u64, payload: usize) -> WalRecord {
        WalRecord::new(
            Lsn(1),
            Epoch(1),
            RecordKind::Write,
            offset,
            length,
            Bytes::from(vec![1u8; payload]),
        )
    }

    #[test]
    fn an_entry_whose_payload_is_shorter_than_its_length_is_invalid() {
        let e = check_entry(&write(0, 8192, 100), MIB, Epoch(1));
        assert_eq!(
            e,
            Err(EntryError::PayloadLength {
                length: 8192,
                payload: 100
            })
        );
        assert_eq!(check_entry(&write(0, 8192, 8192), MIB, Epoch(1)), Ok(()));
    }

    #[test]
    fn a_write_entry_larger_than_the_smallest_wal_takes_is_invalid() {
        let max = MAX_ENTRY_PAYLOAD;
        let at_most = write(0, max, max as usize);
        assert_eq!(check_entry(&at_most, 64 * MIB, Epoch(1)), Ok(()));
        let over = write(0, max + 4096, (max + 4096) as usize);
        assert_eq!(
            check_entry(&over, 64 * MIB, Epoch(1)),
            Err(EntryError::TooLarge(max + 4096))
        );
    }

    #[test]
    fn an_entry_off_the_block_grid_or_past_the_volume_is_invalid() {
        assert!(matches!(
            check_entry(&write(512, 4096, 4096), MIB, Epoch(1)),
            Err(EntryError::Misaligned { .. })
        ));
        assert!(matches!(
            check_entry(&write(MIB, 4096, 4096), MIB, Epoch(1)),
            Err(EntryError::OutOfRange { .. })
        ));
        // The end overflows u64: still out of range, not a wrapped small end.
        assert!(matches!(
            check_range(u64::MAX - 4095, 8192, MIB),
            Err(EntryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn only_writes_carry_payload_and_epoch_starts_cover_nothing() {
        let mut trim = write(0, 4096, 4096);
        trim.kind = RecordKind::Trim;
        assert!(matches!(
            check_entry(&trim, MIB, Epoch(1)),
            Err(EntryError::UnexpectedPayload { .. })
        ));
        trim.payload = Bytes::new();
        assert_eq!(check_entry(&trim, MIB, Epoch(1)), Ok(()));
        let mut start = write(0, 0, 0);
        start.kind = RecordKind::EpochStart;
        assert_eq!(check_entry(&start, MIB, Epoch(1)), Ok(()));
        start.length = 4096;
        assert!(matches!(
            check_entry(&start, MIB, Epoch(1)),
            Err(EntryError::EpochStartRange { .. })
        ));
    }

    #[test]
    fn a_placed_write_record_from_a_peer_is_invalid() {
        // A store's own record of a write it put in its data file: a peer that ships one
        // asks the replica to trust blocks it never received.
        let placed = WalRecord::placed(Lsn(1), Epoch(1), 0, 4096, 0);
        assert_eq!(
            check_entry(&placed, MIB, Epoch(1)),
            Err(EntryError::PlacedRecord)
        );
    }

    #[test]
    fn an_entry_from_a_later_epoch_than_its_session_is_invalid() {
        let mut w = write(0, 4096, 4096);
        w.epoch = Epoch(2);
        assert!(matches!(
            check_entry(&w, MIB, Epoch(1)),
            Err(EntryError::FutureEpoch { .. })
        ));
    }

    #[test]
    fn an_entry_at_the_last_lsn_is_invalid() {
        // Found by the replica_core fuzz target: a rebuild base at Lsn::MAX - 1, then an
        // entry at Lsn::MAX, reached the store.
        let mut w = write(0, 4096, 4096);
        w.lsn = Lsn(u64::MAX);
        assert_eq!(
            check_entry(&w, MIB, Epoch(1)),
            Err(EntryError::LastLsn(u64::MAX))
        );
        w.lsn = Lsn(u64::MAX - 1);
        assert_eq!(check_entry(&w, MIB, Epoch(1)), Ok(()));
    }

    #[test]
    fn a_base_chunk_must_lie_on_the_block_grid_inside_the_volume() {
        assert_eq!(check_range(0, 4096, MIB), Ok(()));
        assert!(matches!(
            check_range(100, 4096, MIB),
            Err(EntryError::Misaligned { .. })
        ));
        assert!(matches!(
            check_range(0, 2 * MIB, MIB),
            Err(EntryError::OutOfRange { .. })
        ));
    }
}
