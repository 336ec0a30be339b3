//! The connection's bounds: intake, handshake timeout, outbound queue.

use std::sync::Arc;
use std::time::Duration;

use blockrep_storage::{Epoch, Lsn, RecordKind, WalRecord};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{read_frames, Input, Outbound, ReadError, MAX_OUTBOUND_BYTES};
use crate::core::replica::ConnId;
use crate::wire::{self, Body, Frame};

/// A handshake timeout no test reaches.
const LONG: Duration = Duration::from_secs(3600);

fn entries(lsn: u64) -> Frame {
    let payload = Bytes::from(vec![lsn as u8; 4096]);
    Frame {
        epoch: Epoch(1),
        body: Body::Entries {
            committed: Lsn(0),
            records: vec![WalRecord::new(
                Lsn(lsn),
                Epoch(1),
                RecordKind::Write,
                0,
                4096,
                payload,
            )],
        },
    }
}

/// The LSN of the one entry a frame from `entries` carries.
fn lsn_of(input: Input) -> Option<u64> {
    match input {
        Input::Received { frame, .. } => match frame.body {
            Body::Entries { records, .. } => Some(records[0].lsn.0),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn a_replica_reads_no_further_ahead_than_its_intake_holds() {
    let share = entries(1).queued_size() as usize;
    let intake = Arc::new(tokio::sync::Semaphore::new(3 * share));
    let (mut primary, replica) = tokio::io::duplex(8 << 10);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        read_frames(replica, ConnId(1), intake, LONG, &tx)
            .await
            .unwrap();
    });
    let sender = tokio::spawn(async move {
        for lsn in 1..=10 {
            let mut buf = BytesMut::new();
            wire::encode(&entries(lsn), &mut buf);
            primary.write_all(&buf).await.unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    while let Ok(input) = rx.try_recv() {
        held.push(input);
    }
    assert_eq!(held.len(), 3, "frames read while none was applied");
    assert!(
        !sender.is_finished(),
        "the primary's writes must be held back"
    );
    // Applying (dropping) the frames lets the rest in, in order.
    let mut lsns = Vec::new();
    lsns.extend(held.drain(..).filter_map(lsn_of));
    while lsns.len() < 10 {
        let input = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("frames stopped coming")
            .expect("reader ended");
        lsns.extend(lsn_of(input));
    }
    assert_eq!(lsns, (1..=10).collect::<Vec<_>>());
    sender.await.unwrap();
    drop(rx);
    reader.abort();
}

#[tokio::test]
async fn a_connection_that_sends_no_first_frame_is_closed_after_the_handshake_timeout() {
    let (_silent, replica) = tokio::io::duplex(8 << 10);
    let (tx, _rx) = mpsc::unbounded_channel();
    let intake = Arc::new(tokio::sync::Semaphore::new(1 << 20));
    let timeout = Duration::from_millis(100);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        read_frames(replica, ConnId(1), intake, timeout, &tx),
    )
    .await
    .expect("the reader outlived its handshake timeout");
    assert!(matches!(result, Err(ReadError::HandshakeTimeout(_))));
}

#[test]
fn the_outbound_queue_refuses_frames_past_its_bound() {
    let (tx, rx) = mpsc::unbounded_channel();
    let out = Outbound {
        tx,
        queued: Arc::default(),
        end: Default::default(),
        peer: "test".into(),
    };
    let size = entries(1).queued_size();
    let fits = MAX_OUTBOUND_BYTES / size;
    for lsn in 0..fits {
        out.send(entries(lsn)).expect("a frame under the bound");
    }
    assert!(out.send(entries(fits)).is_err(), "queued past the bound");
    drop(rx);
}
