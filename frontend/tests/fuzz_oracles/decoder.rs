//! The request decoder against an independent model of the 28-byte request framing.

use blockrep_frontend::proto::*;
use blockrep_frontend::{encode_request, DecodeError, Request, RequestDecoder};
use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::common::{be16, be32, be64, HEADER_LEN};

/// Counts of what the decoder did, so a harness can show its inputs reach the interesting
/// paths.
#[derive(Debug, Default, Clone, Copy)]
pub struct DecoderStats {
    pub cases: u64,
    pub requests: u64,
    pub writes: u64,
    pub nonempty_writes: u64,
    pub bad_magic: u64,
    pub too_large: u64,
    pub truncated_at_eof: u64,
}

/// Turns a raw fuzz input into (split sizes, stream). Byte 0 says how many split sizes follow
/// (mod 8), one byte each; a split size of 0 means "everything that is left". No split sizes:
/// the whole stream arrives at once.
pub fn split_decoder_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = (n as usize % 8).min(rest.len());
    let splits = rest[..n].iter().map(|&b| b as usize).collect();
    (splits, &rest[n..])
}

/// What a correct decoder must do with the bytes buffered from the start of the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Incomplete,
    Complete(usize),
    BadMagic(u32),
    TooLarge(u32),
}

/// The model: an independent reading of the NBD request framing (28-byte header; WRITE is
/// followed by `length` payload bytes, at most `MAX_PAYLOAD`).
fn expect(avail: &[u8]) -> Expect {
    if avail.len() < HEADER_LEN {
        return Expect::Incomplete;
    }
    let magic = be32(&avail[0..4]);
    if magic != REQUEST_MAGIC {
        return Expect::BadMagic(magic);
    }
    let cmd = be16(&avail[6..8]);
    let length = be32(&avail[24..28]);
    let payload = if cmd == CMD_WRITE { length } else { 0 };
    if payload > MAX_PAYLOAD {
        return Expect::TooLarge(payload);
    }
    let need = HEADER_LEN + payload as usize;
    if avail.len() < need {
        Expect::Incomplete
    } else {
        Expect::Complete(need)
    }
}

fn show(r: &Result<Option<Request>, DecodeError>) -> String {
    match r {
        Ok(None) => "Ok(None)".into(),
        Ok(Some(q)) => format!(
            "Ok(Some(cmd {} flags {:#x} cookie {:#x} offset {:#x} length {} payload {} bytes))",
            q.cmd,
            q.flags,
            q.cookie,
            q.offset,
            q.length,
            q.payload.len()
        ),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Checks one decoded request against the exact frame bytes it came from.
fn check_request(req: &Request, frame: &[u8]) {
    assert_eq!(req.flags, be16(&frame[4..6]), "flags changed");
    assert_eq!(req.cmd, be16(&frame[6..8]), "command changed");
    assert_eq!(req.cookie, be64(&frame[8..16]), "cookie changed");
    assert_eq!(req.offset, be64(&frame[16..24]), "offset changed");
    assert_eq!(req.length, be32(&frame[24..28]), "length changed");
    if req.cmd == CMD_WRITE {
        assert_eq!(
            req.payload.len(),
            req.length as usize,
            "WRITE payload length differs from the header's length"
        );
        assert!(
            req.payload[..] == frame[HEADER_LEN..],
            "WRITE payload bytes differ from the frame's"
        );
    } else {
        assert!(
            req.payload.is_empty(),
            "command {} came with a {}-byte payload",
            req.cmd,
            req.payload.len()
        );
    }
    let mut again = BytesMut::new();
    encode_request(req, &mut again);
    assert!(
        again[..] == frame[..],
        "encode_request(decoded) differs from the bytes it was decoded from"
    );
}

/// Feeds `stream` to a fresh `RequestDecoder` in pieces of `splits` (cycled; 0 = the rest)
/// and checks every step against the model, then ends the stream as `FramedRead` does at EOF
/// (`decode_eof`). Panics on any deviation.
pub fn check_decoder(stream: &[u8], splits: &[usize], stats: &mut DecoderStats) {
    stats.cases += 1;
    let mut dec = RequestDecoder;
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    // Stream offset of the first byte not yet returned as part of a request.
    let mut frame = 0usize;
    let mut sizes = splits.iter().copied().cycle();
    loop {
        let left = stream.len() - fed;
        let n = match sizes.next() {
            None | Some(0) => left,
            Some(n) => n.min(left),
        };
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let want = expect(&stream[frame..fed]);
            let before = buf.len();
            let got = dec.decode(&mut buf);
            match (&got, want) {
                (Ok(Some(req)), Expect::Complete(len)) => {
                    check_request(req, &stream[frame..frame + len]);
                    frame += len;
                    assert_eq!(
                        fed - buf.len(),
                        frame,
                        "decoder consumed the wrong number of bytes"
                    );
                    stats.requests += 1;
                    if req.cmd == CMD_WRITE {
                        stats.writes += 1;
                        if !req.payload.is_empty() {
                            stats.nonempty_writes += 1;
                        }
                    }
                }
                (Ok(None), Expect::Incomplete) => {
                    assert_eq!(
                        buf.len(),
                        before,
                        "decoder consumed bytes without returning a request"
                    );
                    assert!(
                        buf[..] == stream[frame..fed],
                        "decoder changed buffered bytes"
                    );
                    break;
                }
                (Err(DecodeError::BadMagic(m)), Expect::BadMagic(w)) if *m == w => {
                    stats.bad_magic += 1;
                    return;
                }
                (Err(DecodeError::PayloadTooLarge(l)), Expect::TooLarge(w)) if *l == w => {
                    stats.too_large += 1;
                    return;
                }
                _ => panic!(
                    "decoder returned {} where the model expects {want:?}; frame at stream \
                     offset {frame}, {fed} of {} bytes fed; next bytes {:02x?}",
                    show(&got),
                    stream.len(),
                    &stream[frame..fed.min(frame + 40)]
                ),
            }
        }
        if fed == stream.len() {
            break;
        }
    }
    // End of stream: a partial frame is an error, an empty buffer a clean end.
    match dec.decode_eof(&mut buf) {
        Ok(None) => assert!(
            buf.is_empty(),
            "decode_eof left bytes and reported a clean end"
        ),
        Ok(Some(r)) => panic!(
            "decode_eof returned a request decode() had not: {}",
            show(&Ok(Some(r)))
        ),
        Err(_) => {
            assert!(!buf.is_empty(), "decode_eof failed on an empty buffer");
            stats.truncated_at_eof += 1;
        }
    }
}
