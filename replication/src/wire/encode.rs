//! Encoding frames: the header, each body's metadata, and the payloads referenced beside it.

use bytes::{BufMut, Bytes, BytesMut};

use super::message::{Body, Frame, ReportedRole, HEADER_LEN, MAGIC, VERSION};
use blockrep_storage::{Epoch, Lsn, VolumeId, WalRecord};

/// A log message on the wire holds at most this many bytes (of UTF-8).
pub(super) const MAX_TEXT: usize = 1024;

/// Payloads to send after the metadata that ends at `.0`, in wire order.
type Payloads<'a> = Vec<(usize, &'a Bytes)>;

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
    let mut payloads = Payloads::new();
    dst.put_u32_le(MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(frame.body.kind());
    dst.put_u16_le(0);
    dst.put_u32_le(0); // body length, patched below
    dst.put_u32_le(0); // crc, patched below
    dst.put_u64_le(frame.epoch.0);
    let body_start = dst.len();
    put_body(&frame.body, &mut dst, &mut payloads);
    seal(&mut dst, body_start, &payloads);
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

/// Patches the body length and the checksum into the header at the front of `dst`.
fn seal(dst: &mut BytesMut, body_start: usize, payloads: &Payloads<'_>) {
    let payload_len: usize = payloads.iter().map(|(_, p)| p.len()).sum();
    let body_len = (dst.len() - body_start + payload_len) as u32;
    dst[8..12].copy_from_slice(&body_len.to_le_bytes());
    // The frame's checksum runs over the metadata and the payloads in wire order.
    let mut crc = frame_crc(&dst[..HEADER_LEN], &[]);
    let mut at = body_start;
    for &(end, payload) in payloads {
        crc = crc32c::crc32c_append(crc, &dst[at..end]);
        crc = crc32c::crc32c_append(crc, payload);
        at = end;
    }
    crc = crc32c::crc32c_append(crc, &dst[at..]);
    dst[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// The metadata of `body` into `dst`; its payloads, by reference, into `payloads`.
fn put_body<'a>(body: &'a Body, dst: &mut BytesMut, payloads: &mut Payloads<'a>) {
    match body {
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
            cursor,
        } => {
            dst.put_slice(&replica_store.0);
            dst.put_u64_le(durable.0);
            dst.put_u64_le(durable_epoch.0);
            dst.put_u64_le(committed.0);
            dst.put_u8(u8::from(*rebuilding));
            dst.put_u8(u8::from(cursor.is_some()));
            if let Some(c) = cursor {
                dst.put_u64_le(c.through);
                dst.put_u64_le(c.proof.0);
                dst.put_u64_le(c.proof_epoch.0);
                put_rebuild_start(dst, c.base, &c.history);
            }
        }
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
        Body::RebuildStart {
            base,
            history,
            resume,
        } => {
            put_rebuild_start(dst, *base, history);
            dst.put_u8(u8::from(resume.is_some()));
            dst.put_u64_le(resume.unwrap_or(0));
        }
        Body::BaseChunk {
            offset,
            length,
            reflects,
            data,
        } => put_base_chunk(dst, (*offset, *length, *reflects), data.as_ref(), payloads),
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
            put_text(dst, refusal);
        }
        Body::Entries { committed, records } => put_entries(dst, *committed, records, payloads),
        Body::Barrier { lsn, committed } => {
            dst.put_u64_le(lsn.0);
            dst.put_u64_le(committed.0);
        }
        Body::BarrierAck { durable } => dst.put_u64_le(durable.0),
        Body::Reject { reason, message } => {
            dst.put_u16_le(reason.code());
            put_text(dst, message);
        }
        Body::Probe { fence } => put_probe(dst, *fence),
    }
}

fn put_rebuild_start(dst: &mut BytesMut, base: Lsn, history: &[(Epoch, Lsn)]) {
    dst.put_u64_le(base.0);
    dst.put_u16_le(history.len() as u16);
    for (e, l) in history {
        dst.put_u64_le(e.0);
        dst.put_u64_le(l.0);
    }
}

/// Base data is referenced after its metadata; a hole has none.
fn put_base_chunk<'a>(
    dst: &mut BytesMut,
    (offset, length, reflects): (u64, u64, Lsn),
    data: Option<&'a Bytes>,
    payloads: &mut Payloads<'a>,
) {
    dst.put_u64_le(offset);
    dst.put_u64_le(length);
    dst.put_u64_le(reflects.0);
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

/// Each entry's header (`ENTRY_HEADER_LEN` bytes), its payload referenced after it.
fn put_entries<'a>(
    dst: &mut BytesMut,
    committed: Lsn,
    records: &'a [WalRecord],
    payloads: &mut Payloads<'a>,
) {
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

fn put_probe(dst: &mut BytesMut, fence: Option<VolumeId>) {
    match fence {
        None => dst.put_u8(0),
        Some(owner) => {
            dst.put_u8(1);
            dst.put_slice(&owner.0);
        }
    }
}

/// A log message: at most [`MAX_TEXT`] bytes (cut on a character boundary), length first.
fn put_text(dst: &mut BytesMut, text: &str) {
    let mut n = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    dst.put_u16_le(n as u16);
    dst.put_slice(&text.as_bytes()[..n]);
}

/// CRC32C over the header (without its own checksum field) and then `body`.
pub(super) fn frame_crc(header: &[u8], body: &[u8]) -> u32 {
    let c = crc32c::crc32c(&header[0..12]);
    let c = crc32c::crc32c_append(c, &header[16..HEADER_LEN]);
    crc32c::crc32c_append(c, body)
}
