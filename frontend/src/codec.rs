//! Transmission-phase request framing: the decoder the server reads requests with, and the
//! encoder clients and tests write them with. Replies are encoded in `reply`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::proto::*;

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
}
