//! The frame decoder's oracle: arbitrary bytes into `wire::decode` (one frame) and into the
//! driver's `FrameCodec` (a stream, fed in pieces), checked against a small independent
//! model of the 24-byte header.

use blockrep_replication::driver::{CodecError, FrameCodec, RESERVE_AHEAD};
use blockrep_replication::wire::{
    self, validate, Body, Frame, WireError, HEADER_LEN, MAGIC, MAX_BODY, VERSION,
};
use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::alloc::largest_allocation;

/// The name of each frame kind, by kind byte (index 0 is no kind).
pub const KIND_NAMES: [&str; 15] = [
    "",
    "hello",
    "hello-ok",
    "entries",
    "barrier",
    "barrier-ack",
    "reject",
    "probe",
    "probe-reply",
    "rebuild-start",
    "base-chunk",
    "rebuild-finish",
    "rebuild-done",
    "truncate",
    "truncated",
];

/// What one frame may make `decode` allocate at most, for an input of `len` bytes: a few
/// times the input (records are bigger in memory than on the wire, a lossily decoded text
/// at most triples) plus a constant. A length field read from the input must never push an
/// allocation past this, however large it declares.
pub fn decode_alloc_bound(len: usize) -> usize {
    4 * len + (32 << 10)
}

/// What the stream codec may reserve at most: `RESERVE_AHEAD` past what it was given
/// (however large a frame its header declares), or a few times what it was given.
/// `BytesMut` may round a reservation up to twice its capacity.
pub fn codec_alloc_bound(len: usize) -> usize {
    (2 * (HEADER_LEN + RESERVE_AHEAD + len)).max(decode_alloc_bound(len))
}

/// How often each outcome was reached (the stable driver checks its generator reaches all).
#[derive(Debug, Default, Clone)]
pub struct FrameStats {
    pub cases: u64,
    pub decoded: u64,
    pub by_kind: [u64; 15],
    pub entries: u64,
    pub short: u64,
    pub bad_header: u64,
    pub wrong_length: u64,
    pub bad_checksum: u64,
    pub unknown_kind: u64,
    pub malformed_body: u64,
    pub bad_entry: u64,
    pub stream_frames: u64,
    pub largest_decode_alloc: usize,
    pub largest_codec_alloc: usize,
}

/// How the fuzz target reads its input: byte 0 says whether to seal the rest (patch magic,
/// version, body length and checksum, so mutations reach the bodies instead of dying at
/// the checksum) and in what pieces to feed the stream; the rest is the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub seal: bool,
    /// Bytes per piece fed to the codec (0: all at once).
    pub piece: usize,
}

impl Mode {
    pub fn byte(self) -> u8 {
        let code = PIECES.iter().position(|&p| p == self.piece).unwrap_or(0) as u8;
        u8::from(self.seal) | (code << 1)
    }
}

const PIECES: [usize; 8] = [0, 1, 3, 7, 24, 100, 4096, 65536];

pub fn split_frame_input(data: &[u8]) -> (Mode, &[u8]) {
    match data.split_first() {
        None => (
            Mode {
                seal: false,
                piece: 0,
            },
            data,
        ),
        Some((&m, rest)) => (
            Mode {
                seal: m & 1 == 1,
                piece: PIECES[usize::from((m >> 1) & 7)],
            },
            rest,
        ),
    }
}

/// Makes `buf`'s header consistent with its bytes: magic, version, body length, checksum
/// (kind, reserved bits and epoch stay as they are). Shorter than a header: left alone.
pub fn seal(buf: &mut [u8]) {
    if buf.len() < HEADER_LEN {
        return;
    }
    let body = u32::try_from(buf.len() - HEADER_LEN).unwrap_or(u32::MAX);
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4] = VERSION;
    buf[8..12].copy_from_slice(&body.to_le_bytes());
    let crc = crc32c::crc32c(&buf[0..12]);
    let crc = crc32c::crc32c_append(crc, &buf[16..]);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// The whole oracle, on the fuzz target's input layout.
pub fn check_frame_input(data: &[u8], stats: &mut FrameStats) {
    let (mode, rest) = split_frame_input(data);
    let mut bytes = rest.to_vec();
    if mode.seal {
        seal(&mut bytes);
    }
    stats.cases += 1;
    check_frame(&bytes, stats);
    check_stream(&bytes, mode.piece, stats);
}

/// What the header alone says about `buf` as one whole frame: `Some(error)` if decoding
/// must fail with exactly that error before any body is read.
fn header_verdict(buf: &[u8]) -> Option<WireError> {
    if buf.len() < HEADER_LEN {
        return Some(WireError::Malformed {
            kind: "frame",
            why: "shorter than a header",
        });
    }
    let word = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    if word(0) != MAGIC {
        return Some(WireError::BadMagic(word(0)));
    }
    if buf[4] != VERSION {
        return Some(WireError::BadVersion(buf[4]));
    }
    let body = word(8) as usize;
    if body > MAX_BODY {
        return Some(WireError::TooLarge(body));
    }
    if buf.len() != HEADER_LEN + body {
        return Some(WireError::Malformed {
            kind: "frame",
            why: "length does not match the header",
        });
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[0..12]), &buf[16..]);
    if crc != word(12) {
        return Some(WireError::BadChecksum);
    }
    if !(1..=14).contains(&buf[5]) {
        return Some(WireError::UnknownKind(buf[5]));
    }
    None
}

/// `buf` as one frame: the decoder agrees with the header model, fails only with a typed
/// error of the right kind, allocates within [`decode_alloc_bound`], and every frame it
/// returns survives a round trip.
pub fn check_frame(buf: &[u8], stats: &mut FrameStats) {
    let input = Bytes::copy_from_slice(buf);
    let (result, largest) = largest_allocation(|| wire::decode(input));
    assert!(
        largest <= decode_alloc_bound(buf.len()),
        "decoding {} bytes allocated {largest} bytes at once",
        buf.len()
    );
    stats.largest_decode_alloc = stats.largest_decode_alloc.max(largest);
    let verdict = header_verdict(buf);
    match (result, verdict) {
        (Err(e), Some(expected)) => {
            assert_eq!(e, expected, "header verdict");
            count_header_error(&e, stats);
        }
        (Ok(frame), Some(expected)) => panic!("decoded {frame:?}, the header says {expected}"),
        (Err(e), None) => {
            assert!(!e.to_string().is_empty());
            match e {
                WireError::Malformed { kind, .. } => {
                    assert_eq!(kind, KIND_NAMES[usize::from(buf[5])], "{e}");
                    stats.malformed_body += 1;
                }
                WireError::BadEntry { .. } | WireError::BadEntryChecksum(_) => {
                    assert_eq!(buf[5], 3, "an entry error from a {} frame", buf[5]);
                    stats.bad_entry += 1;
                }
                other => panic!("a body error that is not a body error: {other}"),
            }
        }
        (Ok(frame), None) => {
            assert_eq!(frame.body.name(), KIND_NAMES[usize::from(buf[5])]);
            let epoch = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
            assert_eq!(frame.epoch.0, epoch);
            check_round_trip(&frame);
            stats.decoded += 1;
            stats.by_kind[usize::from(buf[5])] += 1;
            if let Body::Entries { records, .. } = &frame.body {
                stats.entries += records.len() as u64;
            }
        }
    }
}

fn count_header_error(e: &WireError, stats: &mut FrameStats) {
    match e {
        WireError::Malformed { why, .. } if why.starts_with("shorter") => stats.short += 1,
        WireError::Malformed { .. } => stats.wrong_length += 1,
        WireError::BadChecksum => stats.bad_checksum += 1,
        WireError::UnknownKind(_) => stats.unknown_kind += 1,
        _ => stats.bad_header += 1,
    }
}

/// A decoded frame re-encodes to bytes that decode to the same frame, in one piece or as
/// vectored parts; every entry in it passed the payload check.
pub fn check_round_trip(frame: &Frame) {
    if let Body::Entries { records, .. } = &frame.body {
        for r in records {
            assert_eq!(validate::check_payload(r), Ok(()), "decoded entry {r:?}");
        }
    }
    let mut buf = BytesMut::new();
    wire::encode(frame, &mut buf);
    let mut parts = Vec::new();
    wire::encode_parts(frame, &mut parts);
    assert_eq!(
        parts.concat(),
        buf.as_ref(),
        "encode_parts differs from encode"
    );
    assert_eq!(wire::frame_len(&buf), Ok(Some(buf.len())));
    let again = wire::decode(buf.freeze()).unwrap_or_else(|e| panic!("{frame:?} re-encoded: {e}"));
    assert_eq!(&again, frame, "round trip");
}

/// What reading `buf` as a stream must yield, frame by frame, from `frame_len` and `decode`
/// alone: the frames, then the error that ends the stream (if any).
fn expected_stream(buf: &[u8]) -> (Vec<Frame>, Option<WireError>) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let n = match wire::frame_len(rest) {
            Ok(Some(n)) if n <= rest.len() => n,
            Ok(_) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        };
        match wire::decode(Bytes::copy_from_slice(&rest[..n])) {
            Ok(f) => frames.push(f),
            Err(e) => return (frames, Some(e)),
        }
        at += n;
    }
}

/// `buf` through the driver's `FrameCodec`, `piece` bytes at a time: the same frames and the
/// same error as [`expected_stream`], within [`codec_alloc_bound`].
pub fn check_stream(buf: &[u8], piece: usize, stats: &mut FrameStats) {
    let piece = if piece == 0 { buf.len().max(1) } else { piece };
    let ((frames, error), largest) = largest_allocation(|| feed_codec(buf, piece));
    assert!(
        largest <= codec_alloc_bound(buf.len()),
        "the codec allocated {largest} bytes at once for {} bytes",
        buf.len()
    );
    stats.largest_codec_alloc = stats.largest_codec_alloc.max(largest);
    let (want_frames, want_error) = expected_stream(buf);
    assert_eq!(frames, want_frames, "frames read from the stream");
    assert_eq!(error, want_error, "the error that ends the stream");
    stats.stream_frames += frames.len() as u64;
}

fn feed_codec(buf: &[u8], piece: usize) -> (Vec<Frame>, Option<WireError>) {
    let mut codec = FrameCodec;
    let mut src = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in buf.chunks(piece) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(CodecError::Wire(e)) => return (frames, Some(e)),
                Err(CodecError::Io(e)) => panic!("the codec made an I/O error up: {e}"),
            }
        }
    }
    (frames, None)
}
