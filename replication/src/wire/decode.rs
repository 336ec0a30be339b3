//! Decoding frames: the header checks, then each body, never panicking on input.

use bytes::{Buf, Bytes};

use super::encode::{frame_crc, MAX_TEXT};
use super::message::{
    Body, Frame, RejectReason, ReportedRole, WireError, ENTRIES, ENTRY_HEADER_LEN, HEADER_LEN,
    MAGIC, MAX_BODY, VERSION,
};
use super::validate::check_payload;
use blockrep_storage::{Epoch, Lsn, RebuildCursor, RecordKind, VolumeId, WalRecord};

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
    fn malformed(&self, why: &'static str) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            why,
        }
    }
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            Err(self.malformed("body too short"))
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
    fn epoch(&mut self) -> Result<Epoch, WireError> {
        self.u64().map(Epoch)
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
    /// A log message as the encoder writes one: at most [`MAX_TEXT`] bytes of UTF-8.
    /// Anything else is refused rather than repaired, so a decoded frame re-encodes to one
    /// that decodes to it again.
    fn text(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > MAX_TEXT {
            return Err(self.malformed("text longer than 1024 bytes"));
        }
        let bytes = self.bytes(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("text is not UTF-8"))
    }
    /// A flag byte: 0 or 1, anything else refused as `why`.
    fn flag(&mut self, why: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed(why)),
        }
    }
    fn done(&self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            Err(self.malformed("trailing bytes"))
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
    let name = kind_name(kind).ok_or(WireError::UnknownKind(kind))?;
    let mut r = Reader {
        buf: frame.slice(HEADER_LEN..),
        kind: name,
    };
    let body = decode_body(kind, &mut r)?;
    r.done()?;
    Ok(Frame { epoch, body })
}

/// The name of the body of kind `kind` ([`Body::name`]), if there is such a kind.
fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        1 => "hello",
        2 => "hello-ok",
        ENTRIES => "entries",
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
        _ => return None,
    })
}

/// The body of a frame of `kind` (one [`kind_name`] knows).
fn decode_body(kind: u8, r: &mut Reader) -> Result<Body, WireError> {
    Ok(match kind {
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
            durable_epoch: r.epoch()?,
            committed: r.lsn()?,
            rebuilding: r.u8()? != 0,
            cursor: match r.flag("bad cursor flag")? {
                false => None,
                true => Some(decode_cursor(r)?),
            },
        },
        9 => {
            let (base, history) = decode_base(r)?;
            let resume = match r.flag("bad resume flag")? {
                false => {
                    r.u64()?;
                    None
                }
                true => Some(r.u64()?),
            };
            Body::RebuildStart {
                base,
                history,
                resume,
            }
        }
        10 => decode_base_chunk(r)?,
        ENTRIES => decode_entries(r)?,
        11 => Body::RebuildFinish { target: r.lsn()? },
        12 => Body::RebuildDone { durable: r.lsn()? },
        13 => Body::Truncate { keep: r.lsn()? },
        14 => Body::Truncated {
            durable: r.lsn()?,
            durable_epoch: r.epoch()?,
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
                reason: RejectReason::from_code(code).ok_or(r.malformed("unknown reason"))?,
                message: r.text()?,
            }
        }
        7 => Body::Probe {
            fence: match r.flag("bad fence flag")? {
                false => None,
                true => Some(r.id()?),
            },
        },
        8 => Body::ProbeReply {
            volume_id: r.id()?,
            store_id: r.id()?,
            role: match r.u8()? {
                0 => ReportedRole::Primary,
                1 => ReportedRole::Replica,
                _ => return Err(r.malformed("unknown role")),
            },
            needs_rebuild: r.u8()? != 0,
            head: r.lsn()?,
            head_epoch: r.epoch()?,
            committed: r.lsn()?,
        },
        other => return Err(WireError::UnknownKind(other)),
    })
}

/// A base LSN and the epoch history through it.
fn decode_base(r: &mut Reader) -> Result<(Lsn, Vec<(Epoch, Lsn)>), WireError> {
    let base = r.lsn()?;
    let n = r.u16()? as usize;
    let mut history = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        history.push((r.epoch()?, r.lsn()?));
    }
    Ok((base, history))
}

fn decode_cursor(r: &mut Reader) -> Result<RebuildCursor, WireError> {
    let through = r.u64()?;
    let proof = r.lsn()?;
    let proof_epoch = r.epoch()?;
    let (base, history) = decode_base(r)?;
    Ok(RebuildCursor {
        base,
        history,
        through,
        proof,
        proof_epoch,
    })
}

fn decode_base_chunk(r: &mut Reader) -> Result<Body, WireError> {
    let offset = r.u64()?;
    let length = r.u64()?;
    let reflects = r.lsn()?;
    let data = match r.flag("bad data flag")? {
        false => None,
        true => {
            let n = usize::try_from(length).map_err(|_| r.malformed("length"))?;
            Some(r.bytes(n)?)
        }
    };
    Ok(Body::BaseChunk {
        offset,
        length,
        reflects,
        data,
    })
}

fn decode_entries(r: &mut Reader) -> Result<Body, WireError> {
    let committed = r.lsn()?;
    let count = r.u32()? as usize;
    // Every entry takes at least its header, so a lying count cannot make us
    // allocate more than the frame could hold.
    if count > r.buf.remaining() / ENTRY_HEADER_LEN {
        return Err(r.malformed("entry count exceeds the body"));
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        records.push(decode_entry(r)?);
    }
    Ok(Body::Entries { committed, records })
}

/// One entry of an `Entries` body, its payload checked against its own checksum and its
/// kind and length ([`check_payload`]).
fn decode_entry(r: &mut Reader) -> Result<WalRecord, WireError> {
    let lsn = r.lsn()?;
    let epoch = r.epoch()?;
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
        .ok_or(r.malformed("unknown entry kind"))?;
    if crc32c::crc32c(&payload) != payload_crc {
        return Err(WireError::BadEntryChecksum(lsn.0));
    }
    let record = WalRecord {
        lsn,
        epoch,
        kind,
        offset,
        length,
        payload,
        payload_crc,
    };
    check_payload(&record).map_err(|error| WireError::BadEntry { lsn: lsn.0, error })?;
    Ok(record)
}
