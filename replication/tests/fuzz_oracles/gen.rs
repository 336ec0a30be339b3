//! Inputs for the deterministic harness and the seed corpora: a seeded RNG, any frame built
//! from `arbitrary` bytes, and the frame decoder's near-valid cases (encoded frames, then
//! flipped, cut, resized or re-kinded, mostly resealed so the bodies get parsed).

use arbitrary::{Result, Unstructured};
use blockrep_replication::wire::{self, Body, Frame, RejectReason, ReportedRole, HEADER_LEN};
use blockrep_storage::{Epoch, Lsn, RebuildCursor, RecordKind, VolumeId, WalRecord, BLOCK_SIZE};
use bytes::{Bytes, BytesMut};

use super::frames::{seal, Mode};

/// SplitMix64: tiny and deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Any reason there is.
pub fn reason(u: &mut Unstructured) -> Result<RejectReason> {
    u.choose(&[
        RejectReason::StaleEpoch,
        RejectReason::EpochOwned,
        RejectReason::WrongVolume,
        RejectReason::Gap,
        RejectReason::NotReplica,
        RejectReason::Protocol,
        RejectReason::StorageFailed,
        RejectReason::BadEntry,
        RejectReason::UnfollowableEpoch,
        RejectReason::NoSpace,
    ])
    .copied()
}

fn id(u: &mut Unstructured) -> Result<VolumeId> {
    Ok(VolumeId(u.arbitrary()?))
}

fn lsn(u: &mut Unstructured) -> Result<Lsn> {
    Ok(Lsn(u.arbitrary()?))
}

fn epoch(u: &mut Unstructured) -> Result<Epoch> {
    Ok(Epoch(u.arbitrary()?))
}

/// A log message, now and then longer than a sender ever writes (1024 bytes).
fn text(u: &mut Unstructured) -> Result<String> {
    let n = match u.ratio(1, 10)? {
        true => u.int_in_range(1000..=1100)?,
        false => u.int_in_range(0..=64)?,
    };
    Ok(String::from_utf8_lossy(u.bytes(n.min(u.len()))?).into_owned())
}

/// An entry the decoder accepts: a payload only on writes, exactly as long as them.
fn record(u: &mut Unstructured) -> Result<WalRecord> {
    let kind = *u.choose(&[
        RecordKind::Write,
        RecordKind::Trim,
        RecordKind::WriteZeroes { punch: true },
        RecordKind::WriteZeroes { punch: false },
        RecordKind::EpochStart,
    ])?;
    let (offset, length) = match kind {
        RecordKind::EpochStart => (0, 0),
        _ => (
            u64::from(u.arbitrary::<u16>()?) * BLOCK_SIZE,
            u64::from(u.int_in_range(0u16..=600)?),
        ),
    };
    let payload = match kind {
        RecordKind::Write => Bytes::from(vec![u.arbitrary::<u8>()?; length as usize]),
        _ => Bytes::new(),
    };
    Ok(WalRecord::new(
        lsn(u)?,
        epoch(u)?,
        kind,
        offset,
        length,
        payload,
    ))
}

fn base_chunk(u: &mut Unstructured) -> Result<Body> {
    let length = u.int_in_range(0..=600)?;
    Ok(Body::BaseChunk {
        offset: u.arbitrary()?,
        length,
        reflects: lsn(u)?,
        data: match u.arbitrary::<bool>()? {
            true => Some(Bytes::from(vec![u.arbitrary::<u8>()?; length as usize])),
            false => None,
        },
    })
}

/// Any frame of any kind, its fields from `u`.
pub fn arbitrary_frame(u: &mut Unstructured) -> Result<Frame> {
    let body = match u.int_in_range(1..=14)? {
        1 => Body::Hello {
            volume_id: id(u)?,
            volume_size: u.arbitrary()?,
            primary_store: id(u)?,
            head: lsn(u)?,
            committed: lsn(u)?,
        },
        2 => Body::HelloOk {
            replica_store: id(u)?,
            durable: lsn(u)?,
            durable_epoch: epoch(u)?,
            committed: lsn(u)?,
            rebuilding: u.arbitrary()?,
            cursor: match u.arbitrary::<bool>()? {
                false => None,
                true => Some(RebuildCursor {
                    base: lsn(u)?,
                    history: (0..u.int_in_range(0..=4)?)
                        .map(|_| Ok((epoch(u)?, lsn(u)?)))
                        .collect::<Result<_>>()?,
                    through: u.arbitrary()?,
                    proof: lsn(u)?,
                    proof_epoch: epoch(u)?,
                }),
            },
        },
        3 => Body::Entries {
            committed: lsn(u)?,
            records: (0..u.int_in_range(0..=4)?)
                .map(|_| record(u))
                .collect::<Result<_>>()?,
        },
        4 => Body::Barrier {
            lsn: lsn(u)?,
            committed: lsn(u)?,
        },
        5 => Body::BarrierAck { durable: lsn(u)? },
        6 => Body::Reject {
            reason: reason(u)?,
            message: text(u)?,
        },
        7 => Body::Probe {
            fence: match u.arbitrary::<bool>()? {
                true => Some(id(u)?),
                false => None,
            },
        },
        8 => Body::ProbeReply {
            volume_id: id(u)?,
            store_id: id(u)?,
            role: *u.choose(&[ReportedRole::Primary, ReportedRole::Replica])?,
            head: lsn(u)?,
            head_epoch: epoch(u)?,
            committed: lsn(u)?,
            needs_rebuild: u.arbitrary()?,
        },
        9 => Body::RebuildStart {
            base: lsn(u)?,
            history: (0..u.int_in_range(0..=4)?)
                .map(|_| Ok((epoch(u)?, lsn(u)?)))
                .collect::<Result<_>>()?,
            resume: u.arbitrary()?,
        },
        10 => base_chunk(u)?,
        11 => Body::RebuildFinish { target: lsn(u)? },
        12 => Body::RebuildDone { durable: lsn(u)? },
        13 => Body::Truncate { keep: lsn(u)? },
        _ => Body::Truncated {
            durable: lsn(u)?,
            durable_epoch: epoch(u)?,
            refusal: text(u)?,
        },
    };
    Ok(Frame {
        epoch: epoch(u)?,
        body,
    })
}

/// A frame of a random kind, encoded.
pub fn encoded_frame(rng: &mut Rng) -> Vec<u8> {
    let n = 64 + rng.below(1500) as usize;
    let seed = rng.bytes(n);
    let frame = arbitrary_frame(&mut Unstructured::new(&seed)).expect("enough bytes");
    let mut buf = BytesMut::new();
    wire::encode(&frame, &mut buf);
    buf.to_vec()
}

/// One input for the `frame_decoder` target (its layout: the mode byte, then the bytes).
pub fn frame_case(rng: &mut Rng) -> Vec<u8> {
    let mut bytes = encoded_frame(rng);
    let mut seal_it = false;
    let len = bytes.len();
    match rng.below(100) {
        0..=29 => {}
        30..=49 => {
            let at = HEADER_LEN + rng.below((len - HEADER_LEN).max(1) as u64) as usize;
            if at < len {
                bytes[at] ^= 1 + rng.below(255) as u8;
            }
            seal_it = true;
        }
        50..=57 => {
            let at = rng.below(len as u64) as usize;
            bytes[at] ^= 1 + rng.below(255) as u8;
        }
        58..=67 => {
            if rng.pct(50) {
                bytes.truncate(rng.below(len as u64) as usize);
            } else {
                let extra = rng.below(40) as usize;
                bytes.extend(rng.bytes(extra));
            }
            seal_it = rng.pct(70);
        }
        68..=75 => {
            let body = match rng.below(3) {
                0 => u32::MAX - rng.below(16) as u32,
                1 => rng.next_u64() as u32,
                _ => (len - HEADER_LEN) as u32 + rng.below(8) as u32,
            };
            bytes[8..12].copy_from_slice(&body.to_le_bytes());
        }
        76..=81 => {
            bytes[5] = rng.below(20) as u8;
            seal_it = true;
        }
        82..=89 => {
            // A count or length field made huge: the decoder must not believe it.
            let at = HEADER_LEN + rng.below((len - HEADER_LEN).max(1) as u64) as usize;
            let end = (at + 4).min(len);
            for b in &mut bytes[at.min(end)..end] {
                *b = 0xff;
            }
            seal_it = true;
        }
        90..=94 => {
            for _ in 0..1 + rng.below(3) {
                bytes.extend(encoded_frame(rng));
            }
        }
        _ => {
            let n = rng.below(200) as usize;
            bytes = rng.bytes(n);
            seal_it = rng.pct(50);
        }
    }
    if seal_it && rng.pct(50) {
        // Sealed by the case itself half of the time, by the target's mode bit otherwise.
        seal(&mut bytes);
        seal_it = false;
    }
    let piece = [0, 1, 3, 7, 24, 100, 4096, 65536][rng.below(8) as usize];
    let mut input = vec![Mode {
        seal: seal_it,
        piece,
    }
    .byte()];
    input.extend(bytes);
    input
}
