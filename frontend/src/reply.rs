//! Transmission-phase replies: simple replies, structured chunks (data, holes, errors, block
//! status), each built as a list of buffers that go out back to back, payloads not copied.

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::*;
use crate::volume::ReadChunk;

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
    /// A success: it acknowledges the request, so it leaves only while the volume
    /// [`may_acknowledge`](crate::BlockVolume::may_acknowledge). Errors acknowledge nothing.
    pub acknowledges: bool,
}

impl Reply {
    /// Marks a success reply (see [`Reply::acknowledges`]).
    pub fn acknowledging(mut self) -> Reply {
        self.acknowledges = true;
        self
    }

    pub fn simple(cookie: u64, error: u32) -> Reply {
        let mut h = BytesMut::with_capacity(16);
        h.put_u32(SIMPLE_REPLY_MAGIC);
        h.put_u32(error);
        h.put_u64(cookie);
        Reply {
            parts: vec![h.freeze()],
            acknowledges: false,
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
            return Reply {
                parts,
                acknowledges: false,
            };
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
            return Reply {
                parts,
                acknowledges: false,
            };
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
        Reply {
            parts,
            acknowledges: false,
        }
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
        Reply {
            parts,
            acknowledges: false,
        }
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
        Reply {
            parts,
            acknowledges: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

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
