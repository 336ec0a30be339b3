//! The shipper's framing and the vectored writer.

use std::pin::Pin;
use std::task::{Context, Poll};

use blockrep_storage::{Epoch, Lsn, RecordKind, WalRecord};
use bytes::{Bytes, BytesMut};

use crate::wire::{self, Body, Frame};

/// A socket that takes at most `max` bytes per call and may stop in the middle of a part.
struct Trickle {
    got: Vec<u8>,
    max: usize,
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.max);
        self.got.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(self.max - n);
            self.got.extend_from_slice(&b[..take]);
            n += take;
            if n == self.max {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[test]
fn no_shipped_frame_outgrows_what_a_replica_accepts() {
    // The largest entry a store writes, alone and back to back.
    let max = blockrep_storage::MAX_ENTRY_PAYLOAD as usize;
    let sizes = [4096, max, 4096, 4096, max, max, 512, 1 << 20, 4096];
    let records: Vec<WalRecord> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let payload = Bytes::from(vec![0u8; n]);
            WalRecord::new(
                Lsn(i as u64 + 1),
                Epoch(1),
                RecordKind::Write,
                0,
                n as u64,
                payload,
            )
        })
        .collect();
    let batches = super::frame_batches(records, super::SHIP_FRAME_BYTES);
    // Entries without payload (trims, zeroes) count their headers: a backlog of them
    // is cut too.
    let trims: Vec<WalRecord> = (1..=50_000u64)
        .map(|l| WalRecord::new(Lsn(l), Epoch(1), RecordKind::Trim, 0, 4096, Bytes::new()))
        .collect();
    let trim_batches = super::frame_batches(trims, super::SHIP_FRAME_BYTES);
    assert!(trim_batches.len() > 2);
    for b in &trim_batches {
        assert!((b.len() * wire::ENTRY_HEADER_LEN) as u64 <= super::SHIP_FRAME_BYTES);
    }
    let lsns: Vec<u64> = batches.iter().flatten().map(|r| r.lsn.0).collect();
    assert_eq!(
        lsns,
        (1..=sizes.len() as u64).collect::<Vec<_>>(),
        "every entry, in order"
    );
    for b in &batches {
        let payload: u64 = b.iter().map(|r| r.payload.len() as u64).sum();
        let framed = payload + (b.len() * wire::ENTRY_HEADER_LEN) as u64;
        assert!(
            b.len() == 1 || framed <= super::SHIP_FRAME_BYTES,
            "{framed} bytes"
        );
        let frame = Frame {
            epoch: Epoch(1),
            body: Body::Entries {
                committed: Lsn(0),
                records: b.clone(),
            },
        };
        let mut buf = BytesMut::new();
        wire::encode(&frame, &mut buf);
        assert!(buf.len() - wire::HEADER_LEN <= wire::MAX_BODY);
        assert!(wire::decode(buf.freeze()).is_ok());
    }
}

#[tokio::test]
async fn shipped_frames_arrive_whole_and_in_order_across_short_writes() {
    let records: Vec<WalRecord> = (1..=5u64)
        .map(|i| {
            let payload = Bytes::from(vec![i as u8; 4096 + i as usize]);
            let len = payload.len() as u64;
            WalRecord::new(Lsn(i), Epoch(1), RecordKind::Write, i << 20, len, payload)
        })
        .collect();
    let frames = [
        Frame {
            epoch: Epoch(1),
            body: Body::Entries {
                committed: Lsn(0),
                records,
            },
        },
        Frame {
            epoch: Epoch(1),
            body: Body::Barrier {
                lsn: Lsn(5),
                committed: Lsn(0),
            },
        },
    ];
    let mut expected = BytesMut::new();
    let mut parts = Vec::new();
    for f in &frames {
        wire::encode(f, &mut expected);
        wire::encode_parts(f, &mut parts);
    }
    // Empty parts anywhere are skipped, never taken for a closed socket.
    parts.insert(0, Bytes::new());
    parts.insert(3, Bytes::new());
    parts.push(Bytes::new());
    for max in [1, 7, 48, 4096, 1 << 20] {
        let mut sock = Trickle {
            got: Vec::new(),
            max,
        };
        let mut todo = parts.clone();
        crate::driver::write_parts(&mut sock, &mut todo)
            .await
            .unwrap();
        assert!(todo.is_empty(), "parts left after writing them");
        assert_eq!(sock.got, &expected[..], "{max} bytes per write");
    }
}

/// Invariant (*the store is the one source of the primary's own durability*): the driver
/// learns the local fsync from `Store::watch_durable`, so a barrier is answered once the
/// WAL is durable without anyone relaying it (nothing calls the driver but `barrier`).
#[test]
fn a_barrier_learns_the_local_fsync_from_the_store_alone() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use blockrep_storage::{CreateOptions, IoMode, OpenOptions, Store};
    use tokio_util::sync::CancellationToken;

    use crate::core::primary::PrimaryConfig;
    use crate::core::{CommitMode, ReplicaId};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let create = CreateOptions {
        size: 16 << 20,
        wal_capacity: 64 << 20,
        volume_id: None,
    };
    Store::create(&dir, &create).unwrap();
    let open = OpenOptions {
        io_mode: IoMode::Plain,
        flush_interval: Duration::from_secs(1),
        read_only: false,
        keep_retained_wal: false,
        place_large_writes: true,
    };
    let store = Arc::new(Store::open(&dir, &open).unwrap());
    let epoch = store.begin_epoch(None).unwrap();
    let sb = store.superblock();
    let cfg = PrimaryConfig::new(
        sb.volume_id,
        sb.volume_size,
        sb.store_id,
        epoch,
        CommitMode::BestEffort,
        vec![ReplicaId("r1".into())],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    rt.block_on(async {
        let handle = super::start(store.clone(), cfg, HashMap::new(), shutdown.clone());
        for i in 0..3u64 {
            let lsn = store
                .write(i * 4096, &[i as u8; 4096], false)
                .await
                .unwrap();
            let both = async { tokio::join!(store.wait_durable(lsn), handle.barrier(lsn)) };
            let (local, replicated) = tokio::time::timeout(Duration::from_secs(10), both)
                .await
                .expect("the barrier waits for a durability nobody relays");
            local.unwrap();
            assert_eq!(replicated, Ok(()), "barrier through {lsn}");
            assert!(handle.status().committed >= lsn);
        }
        shutdown.cancel();
    });
    drop(rt);
    store.close().unwrap();
}
