//! Tests of the primary's side: the durable watch, epochs, retention pins, WAL reads for
//! catch-up, the base image.

use super::*;

#[test]
fn the_durable_watch_sees_every_sync_without_polling() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    let mut watch = store.watch_durable();
    let start = *watch.borrow_and_update();
    assert_eq!(start, store.durable());
    for i in 0..5u64 {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
    }
    let flushed = rt.block_on(store.flush()).unwrap();
    assert!(
        watch.has_changed().unwrap(),
        "a WAL sync publishes the new durable LSN"
    );
    assert_eq!(*watch.borrow_and_update(), flushed);
    store.shared.checkpoint().unwrap();
    assert!(
        !watch.has_changed().unwrap(),
        "a checkpoint of what was already durable publishes nothing new"
    );
}

#[test]
fn epoch_never_goes_down() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), MIB, 64 * MIB);
    let store = open(&path);
    assert_eq!(store.begin_epoch(None).unwrap(), Epoch(1));
    assert_eq!(store.begin_epoch(Some(Epoch(5))).unwrap(), Epoch(5));
    assert!(matches!(
        store.begin_epoch(Some(Epoch(5))),
        Err(StorageError::EpochRegression { .. })
    ));
    drop(store);
    assert_eq!(Store::read_superblock(&path).unwrap().epoch, Epoch(5));
}

#[test]
fn retention_pin_keeps_wal_for_catch_up_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    for i in 0..100u64 {
        rt.block_on(store.write((i % 50) * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
    }
    store.set_retention_pin(Some(Lsn(10)));
    store.shared.checkpoint().unwrap();
    assert_eq!(store.oldest_retained(), Lsn(10));
    let got = rt.block_on(store.read_wal(Lsn(10), u64::MAX)).unwrap();
    assert_eq!(got.len(), 91);
    for (k, rec) in got.iter().enumerate() {
        let i = 9 + k as u64; // entry LSN i+1 wrote pattern(i)
        assert_eq!(rec.lsn, Lsn(i + 1));
        assert_eq!(rec.payload, pattern(i as u8, 4096));
    }
    // A bounded read returns a prefix, at least one entry.
    let some = rt.block_on(store.read_wal(Lsn(10), 1)).unwrap();
    assert_eq!(some.len(), 1);
    // A crash while pinned: replay starts at the pin and the volume is still right.
    drop(store);
    let store = open(&path);
    assert_eq!(store.oldest_retained(), Lsn(10));
    for b in 0..50u64 {
        let got = rt.block_on(store.read_contiguous(b * 4096, 4096)).unwrap();
        assert_eq!(got, pattern((b + 50) as u8, 4096), "block {b}");
    }
    store.set_retention_pin(None);
    store.shared.checkpoint().unwrap();
    assert!(matches!(
        rt.block_on(store.read_wal(Lsn(10), u64::MAX)),
        Err(StorageError::WalRecycled { .. })
    ));
}

/// Opens `path` without a timed checkpoint, keeping the WAL the last run kept or not.
fn reopen(path: &Path, keep_retained_wal: bool) -> Store {
    Store::open(
        path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            keep_retained_wal,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// A store whose last run kept its WAL from entry `pin` on (for a replica), closed after
/// `writes` one-block writes over the first `blocks` blocks.
fn store_that_kept_wal(
    writes: u64,
    blocks: u64,
    block: usize,
    pin: u64,
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = reopen(&path, false);
    store.set_retention_pin(Some(Lsn(pin)));
    for i in 0..writes {
        let at = (i % blocks) * block as u64;
        rt.block_on(store.write(at, &pattern(i as u8, block), false))
            .unwrap();
    }
    store.shared.checkpoint().unwrap();
    store.close().unwrap();
    (tmp, path)
}

#[test]
fn a_store_opened_to_keep_its_retained_wal_recycles_none_of_it_until_told() {
    let (_tmp, path) = store_that_kept_wal(100, 50, 4096, 10);
    let rt = rt();
    let store = reopen(&path, true);
    rt.block_on(store.write(0, &pattern(200, 4096), false))
        .unwrap();
    store.shared.checkpoint().unwrap();
    assert_eq!(
        store.oldest_retained(),
        Lsn(10),
        "kept across the checkpoint"
    );
    assert_eq!(
        rt.block_on(store.read_wal(Lsn(10), u64::MAX))
            .unwrap()
            .len(),
        92
    );
    store.set_retention_pin(None);
    store.shared.checkpoint().unwrap();
    assert!(
        store.oldest_retained() > Lsn(101),
        "{}",
        store.oldest_retained()
    );
    store.close().unwrap();

    // Opened the plain way, its first checkpoint lets the kept WAL go.
    let (_tmp, path) = store_that_kept_wal(20, 20, 4096, 5);
    let store = reopen(&path, false);
    assert_eq!(store.oldest_retained(), Lsn(5));
    rt.block_on(store.write(0, &pattern(9, 4096), false))
        .unwrap();
    store.shared.checkpoint().unwrap();
    assert!(store.oldest_retained() > Lsn(5));
}

#[test]
fn a_pin_kept_from_the_last_run_gives_way_to_a_write_that_finds_the_wal_full() {
    // 60 MiB of the 64 MiB WAL kept; nobody confirms the pin after the open (a primary's
    // replication has not started yet) and a write needs more room than is left.
    let (_tmp, path) = store_that_kept_wal(240, 200, 256 << 10, 1);
    let rt = rt();
    let store = reopen(&path, true);
    assert_eq!(store.oldest_retained(), Lsn(1));
    let more = async {
        for i in 0..64u64 {
            store
                .write(i * (256 << 10), &pattern(i as u8, 256 << 10), false)
                .await?;
        }
        store.flush().await
    };
    let done = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), more).await });
    assert!(done.is_ok(), "writes waited for a pin nobody confirmed");
    done.unwrap().unwrap();
    assert!(store.oldest_retained() > Lsn(1));
    // A pin set by a caller holds as before.
    store.set_retention_pin(Some(store.oldest_retained()));
    let kept = store.oldest_retained();
    store.shared.checkpoint().unwrap();
    assert_eq!(store.oldest_retained(), kept);
}

#[test]
fn read_wal_returns_entries_not_yet_written_to_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    for i in 0..5u64 {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
    }
    // Straight after the writes most entries sit in the writer's queue.
    let got = rt.block_on(store.read_wal(Lsn(1), u64::MAX)).unwrap();
    let lsns: Vec<u64> = got.iter().map(|r| r.lsn.0).collect();
    assert_eq!(lsns, vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_wal_read_has_no_hole() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(open(&path));
    // Everything stays in the WAL (10,000 blocks fit in 64 MiB), as for a replica catching up.
    store.set_retention_pin(Some(Lsn(1)));
    let writer = {
        let store = store.clone();
        rt.spawn(async move {
            for i in 0..10_000u64 {
                store
                    .write((i % 4096) * 4096, &pattern(i as u8, 4096), false)
                    .await
                    .unwrap();
            }
        })
    };
    // Reads that start at the newest entry land in the queue, in the batch the writer has in
    // flight, or in the file, depending on timing; every one must start at `from` with no gap.
    let mut reads = 0;
    while !writer.is_finished() {
        let from = store.info().next_lsn.prev();
        if from == Lsn::ZERO {
            continue;
        }
        let got = rt.block_on(store.read_wal(from, u64::MAX)).unwrap();
        let lsns: Vec<u64> = got.iter().map(|r| r.lsn.0).collect();
        assert_eq!(lsns.first(), Some(&from.0), "read from {from}: {lsns:?}");
        assert!(
            lsns.windows(2).all(|w| w[1] == w[0] + 1),
            "read from {from} has a hole: {lsns:?}"
        );
        reads += 1;
    }
    rt.block_on(writer).unwrap();
    assert!(reads > 100, "only {reads} reads overlapped the writer");
}

#[test]
fn an_epoch_start_entry_changes_no_block_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    store.set_retention_pin(Some(Lsn(1)));
    rt.block_on(store.write(0, &pattern(7, 4096), false))
        .unwrap();
    let epoch = store.begin_epoch(None).unwrap();
    let lsn = rt.block_on(store.append_epoch_start()).unwrap();
    assert_eq!(lsn, Lsn(2));
    assert!(
        store.info().durable_lsn >= lsn,
        "it is durable when it returns"
    );
    let recs = rt.block_on(store.read_wal(Lsn(2), u64::MAX)).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].kind, recs[0].epoch, recs[0].length),
        (RecordKind::EpochStart, epoch, 0)
    );
    drop(store);
    // Replay keeps it in the log (and in the epoch history) and the volume is unchanged.
    let store = open(&path);
    assert_eq!(store.head(), Lsn(2));
    assert_eq!(store.head_epoch(), epoch);
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 8192)).unwrap(),
        [pattern(7, 4096), vec![0; 4096]].concat()
    );
}

#[test]
fn a_base_extent_is_the_run_at_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open_without_flusher(&path);
    store.begin_epoch(None).unwrap();
    rt.block_on(store.write(0, &[1; 8192], false)).unwrap();
    rt.block_on(store.write(MIB, &[2; 4096], false)).unwrap();
    store.shared.checkpoint().unwrap();
    assert_eq!(store.base_extent(0, 16 * MIB), Some((8192, true)));
    assert_eq!(store.base_extent(8192, 16 * MIB), Some((MIB - 8192, false)));
    assert_eq!(store.base_extent(MIB, 16 * MIB), Some((4096, true)));
    // Bounded by `len` and by the volume's end.
    assert_eq!(store.base_extent(MIB + 4096, 4096), Some((4096, false)));
    assert_eq!(store.base_extent(16 * MIB, MIB), None);
}

/// A replica's hold on the WAL after its committed LSN (`Store::keep_wal_after`) survives
/// a checkpoint past the gate and a clean close, so the store, promoted, can catch an old
/// primary up from there; and it gives way to a write that finds the WAL full.
#[test]
fn a_replica_keeps_its_wal_after_the_committed_lsn_through_a_clean_close_while_it_has_room() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = reopen(&path, false);
    for i in 0..100u64 {
        rt.block_on(store.write((i % 50) * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
    }
    store.keep_wal_after(Lsn(40));
    store.shared.checkpoint().unwrap();
    assert_eq!(store.oldest_retained(), Lsn(41));
    store.close().unwrap();
    drop(store);
    let store = reopen(&path, true);
    assert_eq!(store.oldest_retained(), Lsn(41), "kept across the close");
    let got = rt.block_on(store.read_wal(Lsn(41), u64::MAX)).unwrap();
    assert_eq!(got.len(), 60);
    // Held again, then 64 MiB more than the WAL has room for: the writes go through.
    store.keep_wal_after(Lsn(40));
    let more = async {
        for i in 0..300u64 {
            let at = (i % 200) * (256 << 10);
            store.write(at, &pattern(i as u8, 256 << 10), false).await?;
        }
        store.flush().await
    };
    let done = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), more).await });
    assert!(done.is_ok(), "writes waited for the replica's hold");
    done.unwrap().unwrap();
    assert!(store.oldest_retained() > Lsn(41));
}

/// A clean close with the WAL held and only a data-less entry (an epoch's start) past the
/// last checkpoint still records it, and the store is clean: seen as a replica that stayed
/// "not closed cleanly" after a sync-quorum promotion's epoch start (tests/power_loss.rs).
#[test]
fn a_held_wal_with_only_an_epoch_start_past_the_checkpoint_closes_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = reopen(&path, false);
    for i in 0..10u64 {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
    }
    store.shared.checkpoint().unwrap();
    store.keep_wal_after(Lsn(5));
    store.begin_epoch(None).unwrap();
    rt.block_on(store.append_epoch_start()).unwrap();
    store.close().unwrap();
    let sb = store.superblock();
    assert!(sb.is_clean(), "a clean close left the store unclean");
    assert_eq!(sb.checkpoint_lsn, store.head());
}

/// A gated checkpoint whose gate does not reach what it froze writes nothing and gives the
/// map back: the entries stay readable and dirty under the writes made since, the data file
/// and `data_through` stay behind the gate (so a failover that discards those entries can
/// still cut this log in place), and the next checkpoint once the gate moves writes the
/// newest contents. With the WAL half full it goes ahead: writers never stall on the gate.
#[test]
fn a_checkpoint_whose_gate_does_not_pass_writes_nothing_and_loses_nothing() {
    use crate::store::flusher::{Checkpoint, Lazy};
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = reopen(&path, false);
    let mut model = vec![0u8; 16 * 4096];
    let write = |store: &Store, model: &mut [u8], block: u64, seed: u8| {
        let data = pattern(seed, 4096);
        rt.block_on(store.write(block * 4096, &data, false))
            .unwrap();
        model[block as usize * 4096..(block as usize + 1) * 4096].copy_from_slice(&data);
    };
    for b in 0..8 {
        write(&store, &mut model, b, b as u8);
    }
    let gate = store.head();
    store.set_checkpoint_gate(Some(gate));
    for b in 4..12 {
        write(&store, &mut model, b, 100 + b as u8);
    }
    let through = store.superblock().data_through;
    let dirty = store.info().dirty_bytes;
    assert_eq!(
        store.shared.checkpoint_with(Lazy::DuringRebuild),
        Ok(Checkpoint::GaveBack)
    );
    assert_eq!(store.superblock().data_through, through);
    assert_eq!(store.info().checkpoint_lsn, Lsn::ZERO);
    assert_eq!(data_file(&path, 0, 12 * 4096), vec![0; 12 * 4096]);
    assert_eq!(
        store.info().dirty_bytes,
        dirty,
        "every entry is dirty again"
    );
    let read = |store: &Store| rt.block_on(store.read_contiguous(0, 16 * 4096)).unwrap();
    assert!(read(&store) == model, "reads see the newest contents");
    // Writes after the thaw land over the entries it gave back.
    for b in 10..14 {
        write(&store, &mut model, b, 200 + b as u8);
    }
    assert!(read(&store) == model);
    store.set_checkpoint_gate(Some(store.head()));
    assert_eq!(
        store.shared.checkpoint_with(Lazy::DuringRebuild),
        Ok(Checkpoint::Ran)
    );
    assert!(
        data_file(&path, 0, 16 * 4096) == model,
        "the newest contents"
    );
    assert_eq!(store.info().checkpoint_lsn, store.head());
    // The gate stuck below, and more than half of the 64 MiB WAL in use: it goes ahead.
    let gate = store.head();
    store.set_checkpoint_gate(Some(gate));
    for i in 0..36u64 {
        let at = 16 * MIB + (i % 32) * MIB;
        rt.block_on(store.write(at, &pattern(i as u8, MIB as usize), false))
            .unwrap();
    }
    // The writers asked the flusher for room: it goes past the gate on its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.info().checkpoint_lsn <= gate {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint past the gate with the WAL half full: {:?}",
            store.info()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(store.superblock().data_through > gate);
}
