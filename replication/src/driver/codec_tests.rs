use blockrep_storage::{Epoch, Lsn, RecordKind, WalRecord};
use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::{FrameCodec, RESERVE_AHEAD};
use crate::wire::{self, Body, Frame, HEADER_LEN};

/// An encoded `Entries` frame of one write of `len` bytes.
fn big_frame(len: u64) -> BytesMut {
    let record = WalRecord::new(
        Lsn(1),
        Epoch(1),
        RecordKind::Write,
        0,
        len,
        Bytes::from(vec![0x5a; len as usize]),
    );
    let frame = Frame {
        epoch: Epoch(1),
        body: Body::Entries {
            committed: Lsn(0),
            records: vec![record],
        },
    };
    let mut buf = BytesMut::new();
    wire::encode(&frame, &mut buf);
    buf
}

/// Found in issue 15's review: a header declaring a large frame made the decoder reserve the
/// whole frame at once, before any of its body arrived.
#[test]
fn a_frame_header_alone_does_not_reserve_the_declared_size() {
    let bytes = big_frame(8 << 20);
    let mut src = BytesMut::new();
    src.extend_from_slice(&bytes[..HEADER_LEN]);
    assert!(matches!(FrameCodec.decode(&mut src), Ok(None)));
    assert!(
        src.capacity() <= HEADER_LEN + 2 * RESERVE_AHEAD,
        "a lone header reserved {} bytes",
        src.capacity()
    );
}

#[test]
fn the_decoders_buffer_grows_with_what_arrives_and_the_frame_still_decodes() {
    let bytes = big_frame(8 << 20);
    let mut src = BytesMut::new();
    let mut decoded = None;
    for piece in bytes.chunks(64 << 10) {
        src.extend_from_slice(piece);
        let arrived = src.len();
        match FrameCodec.decode(&mut src) {
            Ok(None) => assert!(
                src.capacity() <= 4 * arrived + 2 * RESERVE_AHEAD,
                "{} bytes reserved with {arrived} arrived",
                src.capacity()
            ),
            Ok(Some(frame)) => decoded = Some(frame),
            Err(e) => panic!("{e}"),
        }
    }
    match decoded.map(|f| f.body) {
        Some(Body::Entries { records, .. }) => assert_eq!(records[0].length, 8 << 20),
        other => panic!("{other:?}"),
    }
}
