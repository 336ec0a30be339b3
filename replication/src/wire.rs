//! The replication wire format: one frame format for data and control.
//!
//! ```text
//! header (24 bytes, little-endian):
//!   0 magic u32 "BRRP"   4 version u8   5 kind u8   6 reserved u16
//!   8 body_len u32      12 crc32c u32 (header bytes 0..12 and 16..24, then the body)
//!  16 epoch u64          (the sender's epoch; every frame carries it)
//! body: kind-specific, below
//! ```
//! A WAL entry inside `Entries` also carries the CRC32C of its payload, checked on decode and
//! kept as the entry's checksum in the receiver's WAL. Anything that does not decode is an
//! error the receiver answers by closing the connection with a logged reason; nothing here
//! panics on input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use blockrep_storage::{Epoch, Lsn, RecordKind, VolumeId, WalRecord};

pub const MAGIC: u32 = u32::from_le_bytes(*b"BRRP");
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
/// One frame never exceeds this (a 32 MiB write plus its framing fits easily).
pub const MAX_BODY: usize = 40 << 20;

/// Bytes of an entry's header inside an `Entries` frame (its payload follows).
pub const ENTRY_HEADER_LEN: usize = 48;

/// Why a receiver refused a frame or a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The frame's epoch is not the receiver's current epoch.
    StaleEpoch,
    /// Another primary already claimed this epoch.
    EpochOwned,
    /// The store belongs to another volume (or has another size).
    WrongVolume,
    /// An entry did not follow the last one received.
    Gap,
    /// The receiver is not a replica (for example a promoted primary).
    NotReplica,
    /// The frame made no sense in this state.
    Protocol,
    /// The receiver's store failed.
    StorageFailed,
}

impl RejectReason {
    fn code(self) -> u16 {
        match self {
            RejectReason::StaleEpoch => 1,
            RejectReason::EpochOwned => 2,
            RejectReason::WrongVolume => 3,
            RejectReason::Gap => 4,
            RejectReason::NotReplica => 5,
            RejectReason::Protocol => 6,
            RejectReason::StorageFailed => 7,
        }
    }
    fn from_code(c: u16) -> Option<RejectReason> {
        Some(match c {
            1 => RejectReason::StaleEpoch,
            2 => RejectReason::EpochOwned,
            3 => RejectReason::WrongVolume,
            4 => RejectReason::Gap,
            5 => RejectReason::NotReplica,
            6 => RejectReason::Protocol,
            7 => RejectReason::StorageFailed,
            _ => return None,
        })
    }
}

/// A store's role as reported to a promotion candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportedRole {
    Primary,
    Replica,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Primary → replica, first frame of a session.
    Hello {
        volume_id: VolumeId,
        volume_size: u64,
        primary_store: VolumeId,
        head: Lsn,
        committed: Lsn,
    },
    /// Replica → primary: the session is accepted; its log ends at `durable` (fsynced), whose
    /// entry was written at `durable_epoch`. Same LSN and epoch means the same history.
    HelloOk {
        replica_store: VolumeId,
        durable: Lsn,
        durable_epoch: Epoch,
        committed: Lsn,
        /// A rebuild began and did not finish: the store's contents are incomplete.
        rebuilding: bool,
    },
    /// Primary → replica: entries in LSN order, and the primary's committed LSN.
    Entries {
        committed: Lsn,
        records: Vec<WalRecord>,
    },
    /// Primary → replica: report once everything through `lsn` is durable.
    Barrier { lsn: Lsn, committed: Lsn },
    /// Replica → primary: everything through `durable` is fsynced here.
    BarrierAck { durable: Lsn },
    /// Either way: refused, with the refuser's epoch and a reason for the log.
    Reject {
        reason: RejectReason,
        message: String,
    },
    /// Promotion candidate → member: what do you hold? With `fence`, the member first adopts
    /// the frame's epoch on behalf of that candidate store (persisted), so that the primary it
    /// follows can commit nothing more while the candidate decides.
    Probe { fence: Option<VolumeId> },
    /// Primary → replica: reset to the primary's base at `base` (its history through it),
    /// then take the base image (`BaseChunk`) and the WAL after it (`Entries`).
    RebuildStart {
        base: Lsn,
        history: Vec<(Epoch, Lsn)>,
    },
    /// Primary → replica: base image contents at `offset` (block-aligned); no data = a hole.
    BaseChunk {
        offset: u64,
        length: u64,
        data: Option<Bytes>,
    },
    /// Primary → replica: the base image is complete; finish once durable through `target`.
    RebuildFinish { target: Lsn },
    /// Replica → primary: the rebuild is finished and durable through `durable`.
    RebuildDone { durable: Lsn },
    /// Primary → replica: our logs share entries through `keep` and differ after it (the
    /// replica holds an old primary's uncommitted tail): discard everything after `keep`.
    Truncate { keep: Lsn },
    /// Replica → primary: the answer to `Truncate`. Its log now ends at `durable` (of
    /// `durable_epoch`); a non-empty `refusal` says why it could not cut (it needs a rebuild).
    Truncated {
        durable: Lsn,
        durable_epoch: Epoch,
        refusal: String,
    },
    /// Member → candidate.
    ProbeReply {
        volume_id: VolumeId,
        store_id: VolumeId,
        role: ReportedRole,
        head: Lsn,
        /// Epoch of the entry at `head`: logs are compared by (head epoch, head).
        head_epoch: Epoch,
        committed: Lsn,
        needs_rebuild: bool,
    },
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Body::Hello { .. } => 1,
            Body::HelloOk { .. } => 2,
            Body::Entries { .. } => ENTRIES,
            Body::Barrier { .. } => 4,
            Body::BarrierAck { .. } => 5,
            Body::Reject { .. } => 6,
            Body::Probe { .. } => 7,
            Body::ProbeReply { .. } => 8,
            Body::RebuildStart { .. } => 9,
            Body::BaseChunk { .. } => 10,
            Body::RebuildFinish { .. } => 11,
            Body::RebuildDone { .. } => 12,
            Body::Truncate { .. } => 13,
            Body::Truncated { .. } => 14,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "hello",
            Body::HelloOk { .. } => "hello-ok",
            Body::Entries { .. } => "entries",
            Body::Barrier { .. } => "barrier",
            Body::BarrierAck { .. } => "barrier-ack",
            Body::Reject { .. } => "reject",
            Body::Probe { .. } => "probe",
            Body::ProbeReply { .. } => "probe-reply",
            Body::RebuildStart { .. } => "rebuild-start",
            Body::BaseChunk { .. } => "base-chunk",
            Body::RebuildFinish { .. } => "rebuild-finish",
            Body::RebuildDone { .. } => "rebuild-done",
            Body::Truncate { .. } => "truncate",
            Body::Truncated { .. } => "truncated",
        }
    }
}

/// A frame: the sender's epoch and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub epoch: Epoch,
    pub body: Body,
}

impl Frame {
    /// Roughly the memory the frame holds while it waits in a queue: its data plus a little.
    pub fn queued_size(&self) -> u64 {
        match &self.body {
            Body::Entries { records, .. } => records
                .iter()
                .map(|r| r.payload.len() as u64 + ENTRY_HEADER_LEN as u64)
                .sum(),
            Body::BaseChunk { data: Some(d), .. } => d.len() as u64 + 64,
            _ => 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("entry {0} payload checksum mismatch")]
    BadEntryChecksum(u64),
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        kind: &'static str,
        why: &'static str,
    },
}

/// Appends the encoding of `frame` to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let mut parts = Vec::new();
    encode_parts(frame, &mut parts);
    for part in parts {
        dst.extend_from_slice(&part);
    }
}

/// Appends the encoding of `frame` to `parts` as byte strings that, concatenated, are the
/// frame. Entry payloads and base data are referenced, not copied: a sender hands the parts
/// to one vectored write instead of copying every payload once per replica.
///
/// (Folding each entry's own CRC32C into the frame's with `crc32c_combine` would spare
/// reading the payload too, but that combine costs more than hardware CRC32C over 4 KiB.)
pub fn encode_parts(frame: &Frame, parts: &mut Vec<Bytes>) {
    let mut dst = BytesMut::with_capacity(64);
    // Where each payload goes: after the metadata that ends at `.0`.
    let mut payloads: Vec<(usize, &Bytes)> = Vec::new();
    dst.put_u32_le(MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(frame.body.kind());
    dst.put_u16_le(0);
    dst.put_u32_le(0); // body length, patched below
    dst.put_u32_le(0); // crc, patched below
    dst.put_u64_le(frame.epoch.0);
    let body_start = dst.len();
    match &frame.body {
        Body::Hello {
            volume_id,
            volume_size,
            primary_store,
            head,
            committed,
        } => {
            dst.put_slice(&volume_id.0);
            dst.put_u64_le(*volume_size);
            dst.put_slice(&primary_store.0);
            dst.put_u64_le(head.0);
            dst.put_u64_le(committed.0);
        }
        Body::HelloOk {
            replica_store,
            durable,
            durable_epoch,
            committed,
            rebuilding,
        } => {
            dst.put_slice(&replica_store.0);
            dst.put_u64_le(durable.0);
            dst.put_u64_le(durable_epoch.0);
            dst.put_u64_le(committed.0);
            dst.put_u8(u8::from(*rebuilding));
        }
        Body::RebuildStart { base, history } => {
            dst.put_u64_le(base.0);
            dst.put_u16_le(history.len() as u16);
            for (e, l) in history {
                dst.put_u64_le(e.0);
                dst.put_u64_le(l.0);
            }
        }
        Body::BaseChunk {
            offset,
            length,
            data,
        } => {
            dst.put_u64_le(*offset);
            dst.put_u64_le(*length);
            match data {
                Some(d) => {
                    dst.put_u8(1);
                    if !d.is_empty() {
                        payloads.push((dst.len(), d));
                    }
                }
                None => dst.put_u8(0),
            }
        }
        Body::RebuildFinish { target } => dst.put_u64_le(target.0),
        Body::RebuildDone { durable } => dst.put_u64_le(durable.0),
        Body::Truncate { keep } => dst.put_u64_le(keep.0),
        Body::Truncated {
            durable,
            durable_epoch,
            refusal,
        } => {
            dst.put_u64_le(durable.0);
            dst.put_u64_le(durable_epoch.0);
            put_text(&mut dst, refusal);
        }
        Body::Entries { committed, records } => {
            dst.put_u64_le(committed.0);
            dst.put_u32_le(records.len() as u32);
            for r in records {
                let (k, f) = r.kind.encode();
                dst.put_u64_le(r.lsn.0);
                dst.put_u64_le(r.epoch.0);
                dst.put_u8(k);
                dst.put_u8(f);
                dst.put_u16_le(0);
                dst.put_u32_le(r.payload.len() as u32);
                dst.put_u64_le(r.offset);
                dst.put_u64_le(r.length);
                dst.put_u32_le(r.payload_crc);
                dst.put_u32_le(0);
                if !r.payload.is_empty() {
                    payloads.push((dst.len(), &r.payload));
                }
            }
        }
        Body::Barrier { lsn, committed } => {
            dst.put_u64_le(lsn.0);
            dst.put_u64_le(committed.0);
        }
        Body::BarrierAck { durable } => dst.put_u64_le(durable.0),
        Body::Reject { reason, message } => {
            dst.put_u16_le(reason.code());
            put_text(&mut dst, message);
        }
        Body::Probe { fence } => match fence {
            None => dst.put_u8(0),
            Some(owner) => {
                dst.put_u8(1);
                dst.put_slice(&owner.0);
            }
        },
        Body::ProbeReply {
            volume_id,
            store_id,
            role,
            head,
            head_epoch,
            committed,
            needs_rebuild,
        } => {
            dst.put_slice(&volume_id.0);
            dst.put_slice(&store_id.0);
            dst.put_u8(match role {
                ReportedRole::Primary => 0,
                ReportedRole::Replica => 1,
            });
            dst.put_u8(u8::from(*needs_rebuild));
            dst.put_u64_le(head.0);
            dst.put_u64_le(head_epoch.0);
            dst.put_u64_le(committed.0);
        }
    }
    let payload_len: usize = payloads.iter().map(|(_, p)| p.len()).sum();
    let body_len = (dst.len() - body_start + payload_len) as u32;
    dst[8..12].copy_from_slice(&body_len.to_le_bytes());
    // The frame's checksum runs over the metadata and the payloads in wire order.
    let mut crc = frame_crc(&dst[..HEADER_LEN], &[]);
    let mut at = body_start;
    for &(end, payload) in &payloads {
        crc = crc32c::crc32c_append(crc, &dst[at..end]);
        crc = crc32c::crc32c_append(crc, payload);
        at = end;
    }
    crc = crc32c::crc32c_append(crc, &dst[at..]);
    dst[12..16].copy_from_slice(&crc.to_le_bytes());
    let meta = dst.freeze();
    let mut at = 0;
    for (end, payload) in payloads {
        parts.push(meta.slice(at..end));
        parts.push(payload.clone());
        at = end;
    }
    if at < meta.len() {
        parts.push(meta.slice(at..));
    }
}

/// A log message: at most 1024 bytes (cut on a character boundary), length first.
fn put_text(dst: &mut BytesMut, text: &str) {
    let mut n = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    dst.put_u16_le(n as u16);
    dst.put_slice(&text.as_bytes()[..n]);
}

const MAX_TEXT: usize = 1024;

fn frame_crc(header: &[u8], body: &[u8]) -> u32 {
    let c = crc32c::crc32c(&header[0..12]);
    let c = crc32c::crc32c_append(c, &header[16..HEADER_LEN]);
    crc32c::crc32c_append(c, body)
}

/// How many bytes the frame starting at `buf` needs in total, once its header is complete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let magic = u32::from_le_bytes(buf[0..4].try_into().expect("4"));
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(WireError::BadVersion(buf[4]));
    }
    let body = u32::from_le_bytes(buf[8..12].try_into().expect("4")) as usize;
    if body > MAX_BODY {
        return Err(WireError::TooLarge(body));
    }
    Ok(Some(HEADER_LEN + body))
}

/// A cursor that fails instead of panicking when the body is too short.
struct Reader {
    buf: Bytes,
    kind: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            Err(WireError::Malformed {
                kind: self.kind,
                why: "body too short",
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn lsn(&mut self) -> Result<Lsn, WireError> {
        self.u64().map(Lsn)
    }
    fn id(&mut self) -> Result<VolumeId, WireError> {
        self.need(16)?;
        let mut id = [0u8; 16];
        self.buf.copy_to_slice(&mut id);
        Ok(VolumeId(id))
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn text(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let bytes = self.bytes(n)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
    fn done(&self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            Err(WireError::Malformed {
                kind: self.kind,
                why: "trailing bytes",
            })
        } else {
            Ok(())
        }
    }
}

/// Decodes one complete frame (exactly `frame_len` bytes). Entry payloads are slices of
/// `frame`, not copies.
pub fn decode(frame: Bytes) -> Result<Frame, WireError> {
    let total = match frame_len(&frame)? {
        Some(n) => n,
        None => {
            return Err(WireError::Malformed {
                kind: "frame",
                why: "shorter than a header",
            })
        }
    };
    if frame.len() != total {
        return Err(WireError::Malformed {
            kind: "frame",
            why: "length does not match the header",
        });
    }
    let stored = u32::from_le_bytes(frame[12..16].try_into().expect("4"));
    if frame_crc(&frame[..HEADER_LEN], &frame[HEADER_LEN..]) != stored {
        return Err(WireError::BadChecksum);
    }
    let kind = frame[5];
    let epoch = Epoch(u64::from_le_bytes(frame[16..24].try_into().expect("8")));
    let name = match kind {
        1 => "hello",
        2 => "hello-ok",
        3 => "entries",
        4 => "barrier",
        5 => "barrier-ack",
        6 => "reject",
        7 => "probe",
        8 => "probe-reply",
        9 => "rebuild-start",
        10 => "base-chunk",
        11 => "rebuild-finish",
        12 => "rebuild-done",
        13 => "truncate",
        14 => "truncated",
        other => return Err(WireError::UnknownKind(other)),
    };
    let mut r = Reader {
        buf: frame.slice(HEADER_LEN..),
        kind: name,
    };
    let body = match kind {
        1 => Body::Hello {
            volume_id: r.id()?,
            volume_size: r.u64()?,
            primary_store: r.id()?,
            head: r.lsn()?,
            committed: r.lsn()?,
        },
        2 => Body::HelloOk {
            replica_store: r.id()?,
            durable: r.lsn()?,
            durable_epoch: Epoch(r.u64()?),
            committed: r.lsn()?,
            rebuilding: r.u8()? != 0,
        },
        9 => {
            let base = r.lsn()?;
            let n = r.u16()? as usize;
            let mut history = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                history.push((Epoch(r.u64()?), r.lsn()?));
            }
            Body::RebuildStart { base, history }
        }
        10 => {
            let offset = r.u64()?;
            let length = r.u64()?;
            let data = match r.u8()? {
                0 => None,
                1 => {
                    let n = usize::try_from(length).map_err(|_| WireError::Malformed {
                        kind: name,
                        why: "length",
                    })?;
                    Some(r.bytes(n)?)
                }
                _ => {
                    return Err(WireError::Malformed {
                        kind: name,
                        why: "bad data flag",
                    })
                }
            };
            Body::BaseChunk {
                offset,
                length,
                data,
            }
        }
        ENTRIES => {
            let committed = r.lsn()?;
            let count = r.u32()? as usize;
            // Every entry takes at least its header, so a lying count cannot make us
            // allocate more than the frame could hold.
            if count > r.buf.remaining() / ENTRY_HEADER_LEN {
                return Err(WireError::Malformed {
                    kind: name,
                    why: "entry count exceeds the body",
                });
            }
            let mut records = Vec::with_capacity(count);
            for _ in 0..count {
                let lsn = r.lsn()?;
                let epoch = Epoch(r.u64()?);
                let k = r.u8()?;
                let f = r.u8()?;
                r.u16()?;
                let payload_len = r.u32()? as usize;
                let offset = r.u64()?;
                let length = r.u64()?;
                let payload_crc = r.u32()?;
                r.u32()?;
                let payload = r.bytes(payload_len)?;
                // Wrap markers belong to the ring, never to the stream.
                let kind = RecordKind::decode(k, f)
                    .filter(|k| *k != RecordKind::Wrap)
                    .ok_or(WireError::Malformed {
                        kind: name,
                        why: "unknown entry kind",
                    })?;
                if crc32c::crc32c(&payload) != payload_crc {
                    return Err(WireError::BadEntryChecksum(lsn.0));
                }
                records.push(WalRecord {
                    lsn,
                    epoch,
                    kind,
                    offset,
                    length,
                    payload,
                    payload_crc,
                });
            }
            Body::Entries { committed, records }
        }
        11 => Body::RebuildFinish { target: r.lsn()? },
        12 => Body::RebuildDone { durable: r.lsn()? },
        13 => Body::Truncate { keep: r.lsn()? },
        14 => Body::Truncated {
            durable: r.lsn()?,
            durable_epoch: Epoch(r.u64()?),
            refusal: r.text()?,
        },
        4 => Body::Barrier {
            lsn: r.lsn()?,
            committed: r.lsn()?,
        },
        5 => Body::BarrierAck { durable: r.lsn()? },
        6 => {
            let code = r.u16()?;
            Body::Reject {
                reason: RejectReason::from_code(code).ok_or(WireError::Malformed {
                    kind: name,
                    why: "unknown reason",
                })?,
                message: r.text()?,
            }
        }
        7 => Body::Probe {
            fence: match r.u8()? {
                0 => None,
                1 => Some(r.id()?),
                _ => {
                    return Err(WireError::Malformed {
                        kind: name,
                        why: "bad fence flag",
                    })
                }
            },
        },
        8 => Body::ProbeReply {
            volume_id: r.id()?,
            store_id: r.id()?,
            role: match r.u8()? {
                0 => ReportedRole::Primary,
                1 => ReportedRole::Replica,
                _ => {
                    return Err(WireError::Malformed {
                        kind: name,
                        why: "unknown role",
                    })
                }
            },
            needs_rebuild: r.u8()? != 0,
            head: r.lsn()?,
            head_epoch: Epoch(r.u64()?),
            committed: r.lsn()?,
        },
        _ => unreachable!("kind checked above"),
    };
    r.done()?;
    Ok(Frame { epoch, body })
}

/// The kind byte of an `Entries` frame.
const ENTRIES: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = VolumeId> {
        any::<[u8; 16]>().prop_map(VolumeId)
    }

    fn record() -> impl Strategy<Value = WalRecord> {
        (
            1u64..1000,
            0u64..9,
            prop_oneof![
                Just(RecordKind::Write),
                Just(RecordKind::Trim),
                any::<bool>().prop_map(|punch| RecordKind::WriteZeroes { punch }),
                Just(RecordKind::EpochStart)
            ],
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(lsn, epoch, kind, offset, payload)| {
                WalRecord::new(
                    Lsn(lsn),
                    Epoch(epoch),
                    kind,
                    offset,
                    payload.len() as u64,
                    Bytes::from(payload),
                )
            })
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (id(), any::<u64>(), id(), any::<u64>(), any::<u64>()).prop_map(|(v, s, p, h, c)| {
                Body::Hello {
                    volume_id: v,
                    volume_size: s,
                    primary_store: p,
                    head: Lsn(h),
                    committed: Lsn(c),
                }
            }),
            (
                id(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(r, d, e, c, b)| Body::HelloOk {
                    replica_store: r,
                    durable: Lsn(d),
                    durable_epoch: Epoch(e),
                    committed: Lsn(c),
                    rebuilding: b,
                }),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..4)
            )
                .prop_map(|(b, h)| Body::RebuildStart {
                    base: Lsn(b),
                    history: h.into_iter().map(|(e, l)| (Epoch(e), Lsn(l))).collect(),
                }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<bool>()
            )
                .prop_map(|(o, d, hole)| Body::BaseChunk {
                    offset: o,
                    length: d.len() as u64,
                    data: (!hole).then(|| Bytes::from(d)),
                }),
            any::<u64>().prop_map(|t| Body::RebuildFinish { target: Lsn(t) }),
            any::<u64>().prop_map(|d| Body::RebuildDone { durable: Lsn(d) }),
            any::<u64>().prop_map(|k| Body::Truncate { keep: Lsn(k) }),
            (any::<u64>(), any::<u64>(), "[a-z ]{0,40}").prop_map(|(d, e, m)| Body::Truncated {
                durable: Lsn(d),
                durable_epoch: Epoch(e),
                refusal: m,
            }),
            (any::<u64>(), proptest::collection::vec(record(), 0..5)).prop_map(|(c, records)| {
                Body::Entries {
                    committed: Lsn(c),
                    records,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(l, c)| Body::Barrier {
                lsn: Lsn(l),
                committed: Lsn(c)
            }),
            any::<u64>().prop_map(|d| Body::BarrierAck { durable: Lsn(d) }),
            ("[a-z ]{0,40}").prop_map(|m| Body::Reject {
                reason: RejectReason::StaleEpoch,
                message: m
            }),
            proptest::option::of(id()).prop_map(|fence| Body::Probe { fence }),
            (
                id(),
                id(),
                any::<bool>(),
                (any::<u64>(), any::<u64>()),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(v, s, r, (h, he), c, n)| Body::ProbeReply {
                    volume_id: v,
                    store_id: s,
                    role: if r {
                        ReportedRole::Replica
                    } else {
                        ReportedRole::Primary
                    },
                    head: Lsn(h),
                    head_epoch: Epoch(he),
                    committed: Lsn(c),
                    needs_rebuild: n,
                }),
        ]
    }

    proptest! {
        #[test]
        fn wire_frames_roundtrip(epoch in any::<u64>(), body in body()) {
            let frame = Frame { epoch: Epoch(epoch), body };
            let mut buf = BytesMut::new();
            encode(&frame, &mut buf);
            prop_assert_eq!(frame_len(&buf).unwrap(), Some(buf.len()));
            prop_assert_eq!(decode(buf.freeze()).unwrap(), frame);
        }

        #[test]
        fn wire_any_corruption_is_refused_not_panicked(
            body in body(), at in any::<usize>(), flip in 1u8..=255,
        ) {
            let mut buf = BytesMut::new();
            encode(&Frame { epoch: Epoch(3), body }, &mut buf);
            let i = at % buf.len();
            buf[i] ^= flip;
            let len = frame_len(&buf);
            if let Ok(Some(n)) = len {
                if n == buf.len() {
                    prop_assert!(decode(buf.freeze()).is_err());
                }
            }
        }

        #[test]
        fn wire_frame_checksum_covers_every_byte_in_order(body in body()) {
            // The sender checksums the parts, payloads referenced in place, in wire order.
            let mut buf = BytesMut::new();
            encode(&Frame { epoch: Epoch(5), body }, &mut buf);
            let stored = u32::from_le_bytes(buf[12..16].try_into().unwrap());
            prop_assert_eq!(frame_crc(&buf[..HEADER_LEN], &buf[HEADER_LEN..]), stored);
        }

        #[test]
        fn wire_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = frame_len(&bytes);
            let _ = decode(Bytes::from(bytes));
        }
    }

    fn entries(payloads: &[&[u8]]) -> Frame {
        let records = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                WalRecord::new(
                    Lsn(i as u64 + 1),
                    Epoch(2),
                    RecordKind::Write,
                    i as u64 * 4096,
                    p.len() as u64,
                    Bytes::copy_from_slice(p),
                )
            })
            .collect();
        Frame {
            epoch: Epoch(2),
            body: Body::Entries {
                committed: Lsn(0),
                records,
            },
        }
    }

    #[test]
    fn wire_entry_payloads_are_sent_from_the_entry_not_copied() {
        let frame = entries(&[&[1; 4096], &[2; 512]]);
        let mut parts = Vec::new();
        encode_parts(&frame, &mut parts);
        let Body::Entries { records, .. } = &frame.body else {
            unreachable!()
        };
        for r in records {
            assert!(
                parts.iter().any(|p| p.as_ptr() == r.payload.as_ptr()),
                "entry {} was copied into the frame",
                r.lsn
            );
        }
    }

    #[test]
    fn wire_a_payload_damaged_before_sending_is_refused_as_that_entry() {
        let mut frame = entries(&[&[7; 4096], &[8; 4096]]);
        if let Body::Entries { records, .. } = &mut frame.body {
            records[1].payload_crc ^= 1;
        }
        let mut buf = BytesMut::new();
        encode(&frame, &mut buf);
        assert_eq!(decode(buf.freeze()), Err(WireError::BadEntryChecksum(2)));
    }

    #[test]
    fn wire_a_payload_damaged_on_the_way_is_refused_as_a_bad_frame() {
        let mut buf = BytesMut::new();
        encode(&entries(&[&[7; 4096], &[8; 4096]]), &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        assert_eq!(decode(buf.freeze()), Err(WireError::BadChecksum));
    }
}
