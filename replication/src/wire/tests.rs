//! Round trips of every body, and what corruption does.

use blockrep_storage::{Epoch, Lsn, RecordKind, VolumeId, WalRecord};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::encode::frame_crc;
use super::*;

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
            // Only what the decoder accepts: a payload only on writes, exactly their
            // length; an epoch start covering nothing.
            let (offset, length, payload) = match kind {
                RecordKind::Write => (offset, payload.len() as u64, payload),
                RecordKind::EpochStart => (0, 0, Vec::new()),
                _ => (offset, payload.len() as u64, Vec::new()),
            };
            WalRecord::new(
                Lsn(lsn),
                Epoch(epoch),
                kind,
                offset,
                length,
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
                cursor: None,
            }),
        (
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..4)
        )
            .prop_map(|(b, h)| Body::RebuildStart {
                base: Lsn(b),
                history: h.into_iter().map(|(e, l)| (Epoch(e), Lsn(l))).collect(),
                resume: None,
            }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>()
        )
            .prop_map(|(o, d, hole)| Body::BaseChunk {
                offset: o,
                length: d.len() as u64,
                reflects: Lsn::ZERO,
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

fn encoded_entry(kind: RecordKind, length: u64, payload: usize) -> Bytes {
    let record = WalRecord::new(
        Lsn(1),
        Epoch(1),
        kind,
        0,
        length,
        Bytes::from(vec![0xAB; payload]),
    );
    let frame = Frame {
        epoch: Epoch(1),
        body: Body::Entries {
            committed: Lsn(0),
            records: vec![record],
        },
    };
    let mut buf = BytesMut::new();
    encode(&frame, &mut buf);
    buf.freeze()
}

#[test]
fn a_replica_refuses_an_entry_whose_payload_is_shorter_than_its_length() {
    // The checksums are right; the entry still lies about its size.
    match decode(encoded_entry(RecordKind::Write, 8192, 100)) {
        Err(WireError::BadEntry {
            lsn: 1,
            error:
                EntryError::PayloadLength {
                    length: 8192,
                    payload: 100,
                },
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(decode(encoded_entry(RecordKind::Write, 8192, 8192)).is_ok());
}

#[test]
fn an_entry_that_carries_a_payload_its_kind_has_none_of_is_refused() {
    assert!(matches!(
        decode(encoded_entry(RecordKind::Trim, 4096, 4096)),
        Err(WireError::BadEntry {
            error: EntryError::UnexpectedPayload { .. },
            ..
        })
    ));
    assert!(matches!(
        decode(encoded_entry(RecordKind::EpochStart, 4096, 0)),
        Err(WireError::BadEntry {
            error: EntryError::EpochStartRange { .. },
            ..
        })
    ));
}

/// Found by the frame_decoder fuzz target: a `Reject` whose message is longer than a
/// sender writes (or not UTF-8) decoded, then re-encoded cut to 1024 bytes (or repaired),
/// which decodes to another frame. Such text is refused now.
#[test]
fn wire_text_a_sender_cannot_write_is_refused() {
    let frame = |text: &[u8]| {
        let mut body = BytesMut::new();
        body.extend_from_slice(&6u16.to_le_bytes());
        body.extend_from_slice(&(text.len() as u16).to_le_bytes());
        body.extend_from_slice(text);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&MAGIC.to_le_bytes());
        buf.extend_from_slice(&[VERSION, 6, 0, 0]);
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&9u64.to_le_bytes());
        buf.extend_from_slice(&body);
        let crc = frame_crc(&buf[..HEADER_LEN], &buf[HEADER_LEN..]);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
        decode(buf.freeze())
    };
    let malformed = |why| {
        Err(WireError::Malformed {
            kind: "reject",
            why,
        })
    };
    assert_eq!(
        frame(&[b'x'; 1025]),
        malformed("text longer than 1024 bytes")
    );
    assert_eq!(frame(&[0xff, 0xfe]), malformed("text is not UTF-8"));
    let ok = frame(&[b'x'; 1024]).expect("1024 bytes of UTF-8 decode");
    let mut again = BytesMut::new();
    encode(&ok, &mut again);
    assert_eq!(decode(again.freeze()), Ok(ok));
}
