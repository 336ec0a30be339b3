//! Transmission-phase framing: the request decoder and the reply encoders.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::proto::*;
use crate::volume::ReadChunk;

pub(crate) const REQUEST_HEADER_LEN: usize = 28;

/// One request as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    /// The WRITE payload (empty for every other command).
    pub payload: Bytes,
}

#[cfg(test)]
impl Request {
    /// A request for tests: a WRITE carries `length` bytes of 1s, other commands nothing.
    pub(crate) fn sample(cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Request {
        let payload = if cmd == CMD_WRITE {
            Bytes::from(vec![1u8; length as usize])
        } else {
            Bytes::new()
        };
        Request {
            flags,
            cmd,
            cookie,
            offset,
            length,
            payload,
        }
    }
}

/// A stream the server cannot parse; the connection is closed (there is no way to resync).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request magic {0:#010x} is wrong")]
    BadMagic(u32),
    #[error("WRITE payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u32),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parses 28-byte requests and, for WRITE, waits for the payload and hands it out without
/// copying. It never allocates more than the header promises, and refuses to promise more
/// than [`MAX_PAYLOAD`].
#[derive(Debug, Default)]
pub struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = Request;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, DecodeError> {
        if src.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let mut h = &src[..REQUEST_HEADER_LEN];
        let magic = h.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let flags = h.get_u16();
        let cmd = h.get_u16();
        let cookie = h.get_u64();
        let offset = h.get_u64();
        let length = h.get_u32();
        let payload_len = if cmd == CMD_WRITE { length } else { 0 };
        if payload_len > MAX_PAYLOAD {
            return Err(DecodeError::PayloadTooLarge(payload_len));
        }
        let total = REQUEST_HEADER_LEN + payload_len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(REQUEST_HEADER_LEN);
        let payload = src.split_to(payload_len as usize).freeze();
        Ok(Some(Request {
            flags,
            cmd,
            cookie,
            offset,
            length,
            payload,
        }))
    }
}

/// Encodes a request (for tests and tools that speak the protocol as a client).
pub fn encode_request(req: &Request, dst: &mut BytesMut) {
    dst.put_u32(REQUEST_MAGIC);
    dst.put_u16(req.flags);
    dst.put_u16(req.cmd);
    dst.put_u64(req.cookie);
    dst.put_u64(req.offset);
    dst.put_u32(req.length);
    dst.put_slice(&req.payload);
}

static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

fn zeroes(mut n: u64, parts: &mut Vec<Bytes>) {
    while n > 0 {
        let k = n.min(ZEROES.len() as u64) as usize;
        parts.push(Bytes::from_static(&ZEROES[..k]));
        n -= k as u64;
    }
}

/// A reply ready for the wire: buffers written back to back, never interleaved with another
/// reply's.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub parts: Vec<Bytes>,
}

impl Reply {
    pub fn simple(cookie: u64, error: u32) -> Reply {
        let mut h = BytesMut::with_capacity(16);
        h.put_u32(SIMPLE_REPLY_MAGIC);
        h.put_u32(error);
        h.put_u64(cookie);
        Reply {
            parts: vec![h.freeze()],
        }
    }

    /// A successful READ without structured replies: the header, then the data.
    pub fn simple_read(cookie: u64, chunks: Vec<ReadChunk>) -> Reply {
        let mut r = Reply::simple(cookie, 0);
        for c in chunks {
            match c {
                ReadChunk::Data(b) => r.parts.push(b),
                ReadChunk::Zeroes(n) => zeroes(n, &mut r.parts),
            }
        }
        r
    }

    fn chunk_header(
        parts: &mut Vec<Bytes>,
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
        extra: &[u8],
    ) {
        let mut h = BytesMut::with_capacity(20 + extra.len());
        h.put_u32(STRUCTURED_REPLY_MAGIC);
        h.put_u16(flags);
        h.put_u16(kind);
        h.put_u64(cookie);
        h.put_u32(len);
        h.put_slice(extra);
        parts.push(h.freeze());
    }

    /// A successful structured READ. Adjacent data chunks share one OFFSET_DATA chunk; zero
    /// ranges become OFFSET_HOLE, unless `df` (don't fragment) asks for a single data chunk.
    pub fn structured_read(cookie: u64, offset: u64, chunks: Vec<ReadChunk>, df: bool) -> Reply {
        let mut parts = Vec::new();
        let total: u64 = chunks.iter().map(|c| c.len()).sum();
        if total == 0 {
            Self::chunk_header(&mut parts, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0, &[]);
            return Reply { parts };
        }
        if df {
            let len = 8 + total as u32;
            Self::chunk_header(
                &mut parts,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                len,
                &offset.to_be_bytes(),
            );
            for c in chunks {
                match c {
                    ReadChunk::Data(b) => parts.push(b),
                    ReadChunk::Zeroes(n) => zeroes(n, &mut parts),
                }
            }
            return Reply { parts };
        }
        // Group into runs of data and runs of zeroes.
        let mut at = offset;
        let mut i = 0;
        while i < chunks.len() {
            let is_data = matches!(chunks[i], ReadChunk::Data(_));
            let mut j = i;
            let mut run_len = 0u64;
            while j < chunks.len() && matches!(chunks[j], ReadChunk::Data(_)) == is_data {
                run_len += chunks[j].len();
                j += 1;
            }
            let last = j == chunks.len();
            let flags = if last { REPLY_FLAG_DONE } else { 0 };
            if is_data {
                Self::chunk_header(
                    &mut parts,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + run_len as u32,
                    &at.to_be_bytes(),
                );
                for c in &chunks[i..j] {
                    if let ReadChunk::Data(b) = c {
                        parts.push(b.clone());
                    }
                }
            } else {
                let mut extra = [0u8; 12];
                extra[..8].copy_from_slice(&at.to_be_bytes());
                extra[8..].copy_from_slice(&(run_len as u32).to_be_bytes());
                Self::chunk_header(
                    &mut parts,
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    cookie,
                    12,
                    &extra,
                );
            }
            at += run_len;
            i = j;
        }
        Reply { parts }
    }

    /// A structured error chunk (the only way to fail a structured READ).
    pub fn structured_error(cookie: u64, error: u32, msg: &str) -> Reply {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut extra = BytesMut::with_capacity(6 + msg.len());
        extra.put_u32(error);
        extra.put_u16(msg.len() as u16);
        extra.put_slice(msg);
        let mut parts = Vec::new();
        Self::chunk_header(
            &mut parts,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            extra.len() as u32,
            &extra,
        );
        Reply { parts }
    }

    /// A BLOCK_STATUS reply for one context: (length, flags) descriptors.
    pub fn block_status(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Reply {
        let mut extra = BytesMut::with_capacity(4 + 8 * extents.len());
        extra.put_u32(context);
        for (len, flags) in extents {
            extra.put_u32(*len);
            extra.put_u32(*flags);
        }
        let mut parts = Vec::new();
        Self::chunk_header(
            &mut parts,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            extra.len() as u32,
            &extra,
        );
        Reply { parts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            0u16..10,
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2000),
            any::<u32>(),
        )
            .prop_map(|(flags, cmd, cookie, offset, payload, len)| {
                if cmd == CMD_WRITE {
                    let length = payload.len() as u32;
                    Request {
                        payload: Bytes::from(payload),
                        ..Request::sample(cmd, flags, cookie, offset, length)
                    }
                } else {
                    Request::sample(cmd, flags, cookie, offset, len)
                }
            })
    }

    proptest! {
        /// Any sequence of requests, cut into arbitrary pieces, decodes to itself.
        #[test]
        fn codec_roundtrips_under_any_split(
            reqs in proptest::collection::vec(any_request(), 1..8),
            cuts in proptest::collection::vec(1usize..300, 1..30),
        ) {
            let mut wire = BytesMut::new();
            for r in &reqs { encode_request(r, &mut wire); }
            let wire = wire.freeze();
            let mut dec = RequestDecoder;
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            while at < wire.len() {
                let n = (*cut.next().unwrap()).min(wire.len() - at);
                buf.extend_from_slice(&wire[at..at + n]);
                at += n;
                while let Some(r) = dec.decode(&mut buf).unwrap() { out.push(r); }
            }
            prop_assert_eq!(out, reqs);
            prop_assert!(buf.is_empty());
        }

        /// Garbage never panics; it either waits for more bytes or is refused.
        #[test]
        fn codec_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = RequestDecoder;
            for _ in 0..10 {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn codec_refuses_absurd_write_without_allocating() {
        let mut buf = BytesMut::new();
        encode_request(&Request::sample(CMD_WRITE, 0, 1, 0, 0), &mut buf);
        // Patch the length to 4 GiB - 1.
        buf[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
        let cap_before = buf.capacity();
        let err = RequestDecoder.decode(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::PayloadTooLarge(_)));
        assert_eq!(buf.capacity(), cap_before);
    }

    #[test]
    fn structured_read_tiles_the_request() {
        let chunks = vec![
            ReadChunk::Data(Bytes::from_static(b"abcd")),
            ReadChunk::Data(Bytes::from_static(b"ef")),
            ReadChunk::Zeroes(10),
            ReadChunk::Data(Bytes::from_static(b"g")),
        ];
        let r = Reply::structured_read(7, 100, chunks, false);
        let wire: Vec<u8> = r.parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut p = &wire[..];
        let mut seen = Vec::new();
        loop {
            assert_eq!(p.get_u32(), STRUCTURED_REPLY_MAGIC);
            let flags = p.get_u16();
            let kind = p.get_u16();
            assert_eq!(p.get_u64(), 7);
            let len = p.get_u32() as usize;
            let body = &p[..len];
            p = &p[len..];
            let off = u64::from_be_bytes(body[..8].try_into().unwrap());
            let n = if kind == REPLY_TYPE_OFFSET_DATA {
                len as u64 - 8
            } else {
                u32::from_be_bytes(body[8..12].try_into().unwrap()) as u64
            };
            seen.push((kind, off, n));
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert!(p.is_empty());
        assert_eq!(
            seen,
            vec![
                (REPLY_TYPE_OFFSET_DATA, 100, 6),
                (REPLY_TYPE_OFFSET_HOLE, 106, 10),
                (REPLY_TYPE_OFFSET_DATA, 116, 1)
            ]
        );
    }
}
