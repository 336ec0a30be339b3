//! Tests of the replica's side: replicated entries, rebuilds, and cuts of the log.

use super::*;

#[test]
fn replicated_entries_keep_the_primary_lsn_and_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let primary_path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let replica_path = tmp.path().join("replica");
    let primary = open(&primary_path);
    Store::create(
        &replica_path,
        &CreateOptions {
            size: 16 * MIB,
            wal_capacity: 64 * MIB,
            volume_id: Some(primary.volume_id()),
        },
    )
    .unwrap();
    let replica = open(&replica_path);
    assert!(replica.is_blank());
    let epoch = primary.begin_epoch(None).unwrap();
    replica.adopt_epoch(epoch, primary.store_id()).unwrap();
    let mut tap = primary.subscribe();
    for i in 0..20u64 {
        rt.block_on(primary.write(i * 1000, &pattern(i as u8, 3000), false))
            .unwrap();
    }
    rt.block_on(primary.trim(MIB, MIB, false)).unwrap();
    let mut shipped = Vec::new();
    while let Ok(rec) = tap.try_recv() {
        shipped.push(rec);
    }
    assert_eq!(shipped.len(), 21);
    // A gap is refused; the right entry is accepted.
    let err = rt
        .block_on(replica.append_replicated(shipped[1].clone()))
        .unwrap_err();
    assert!(matches!(
        err,
        StorageError::LsnGap {
            expected: Lsn(1),
            got: Lsn(2)
        }
    ));
    for rec in &shipped {
        rt.block_on(replica.append_replicated(rec.clone())).unwrap();
    }
    rt.block_on(replica.flush()).unwrap();
    assert_eq!(replica.head(), primary.head());
    drop(replica);
    let replica = open(&replica_path);
    assert_eq!(replica.head(), Lsn(21));
    let sb = replica.superblock();
    assert_eq!(sb.role, Role::Replica);
    assert_eq!(sb.epoch, epoch);
    assert_eq!(sb.epoch_owner, primary.store_id());
    let a = rt.block_on(primary.read_contiguous(0, 2 * MIB)).unwrap();
    let b = rt.block_on(replica.read_contiguous(0, 2 * MIB)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn rebuild_applies_base_and_wal_with_wal_winning() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let p_path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let primary = open(&p_path);
    let epoch = primary.begin_epoch(None).unwrap();
    for b in 0..64u64 {
        rt.block_on(primary.write(b * 4096, &pattern(b as u8, 4096), false))
            .unwrap();
    }
    primary.shared.checkpoint().unwrap();
    let (base, history) = primary.rebuild_base();
    assert_eq!(base, Lsn(64));
    // Writes after the base: they reach the replica as WAL.
    for b in [3u64, 10, 40] {
        rt.block_on(primary.write(b * 4096, &pattern(200 + b as u8, 4096), false))
            .unwrap();
    }
    rt.block_on(primary.trim(20 * 4096, 2 * 4096, false))
        .unwrap();
    // The primary checkpoints again while the base is "being copied": the image is newer
    // than the base for some blocks, which WAL-wins makes harmless.
    primary.shared.checkpoint().unwrap();

    // The replica has old, unrelated contents (a diverged log).
    let r_path = tmp.path().join("replica");
    Store::create(
        &r_path,
        &CreateOptions {
            size: 4 * MIB,
            wal_capacity: 64 * MIB,
            volume_id: Some(primary.volume_id()),
        },
    )
    .unwrap();
    let replica = open(&r_path);
    replica.adopt_epoch(epoch, primary.store_id()).unwrap();
    for b in 0..70u64 {
        rt.block_on(replica.append_replicated(WalRecord::new(
            Lsn(b + 1),
            epoch,
            RecordKind::Write,
            b * 4096,
            4096,
            Bytes::from(vec![0xee; 4096]),
        )))
        .unwrap();
    }
    replica.begin_rebuild(base, history, None).unwrap();
    assert!(replica.is_rebuilding());
    let entries = rt
        .block_on(primary.read_wal(base.next(), u64::MAX))
        .unwrap();
    assert_eq!(entries.len(), 4);
    // First half of the base, then the WAL, then the rest of the base: base chunks arriving
    // after a WAL entry for the same block must not overwrite it.
    let chunk = 16 * 4096;
    for c in 0..2u64 {
        let data = data_file(&p_path, c * chunk, chunk);
        rt.block_on(replica.apply_base(c * chunk, chunk, Some(Bytes::from(data)), Lsn::ZERO))
            .unwrap();
    }
    for e in entries {
        rt.block_on(replica.append_replicated(e)).unwrap();
    }
    for c in 2..(4 * MIB / chunk) {
        let data = data_file(&p_path, c * chunk, chunk);
        let all_zero = data.iter().all(|&x| x == 0);
        let data = (!all_zero).then(|| Bytes::from(data));
        rt.block_on(replica.apply_base(c * chunk, chunk, data, Lsn::ZERO))
            .unwrap();
    }
    replica.finish_rebuild().unwrap();
    assert!(!replica.is_rebuilding());
    let a = rt.block_on(primary.read_contiguous(0, 4 * MIB)).unwrap();
    let b = rt.block_on(replica.read_contiguous(0, 4 * MIB)).unwrap();
    assert!(a == b, "rebuilt replica differs from the primary");
    assert_eq!(replica.head(), primary.head());
    assert_eq!(replica.epoch_at(Lsn(64)), Some(epoch));
    // It survives a crash right after, and the old log's records never come back.
    drop(replica);
    let replica = open(&r_path);
    assert!(!replica.is_rebuilding());
    assert_eq!(replica.head(), primary.head());
    let b = rt.block_on(replica.read_contiguous(0, 4 * MIB)).unwrap();
    assert!(a == b, "rebuilt replica differs after reopening");
}

#[test]
fn a_crash_during_rebuild_leaves_the_store_marked_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let store = open(&path);
    store
        .begin_rebuild(Lsn(100), vec![(Epoch(2), Lsn(1))], None)
        .unwrap();
    drop(store);
    let store = open(&path);
    assert!(store.is_rebuilding());
    assert_eq!(store.head(), Lsn(100));
}

#[test]
fn a_log_is_cut_only_where_the_data_file_is_not_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open_without_flusher(&path);
    store.begin_epoch(None).unwrap();
    rt.block_on(store.write(0, &[1; 4096], false)).unwrap(); // 1
    store.shared.checkpoint().unwrap();
    rt.block_on(store.write(0, &[2; 4096], false)).unwrap(); // 2
    rt.block_on(store.write(4096, &[3; 4096], false)).unwrap(); // 3
    store.set_committed(Lsn(2));
    // Below the checkpoint: the data file already holds entry 1.
    let err = store.truncate_after(Lsn::ZERO).unwrap_err();
    assert!(
        matches!(err, StorageError::CannotTruncate { keep: Lsn(0), .. }),
        "{err}"
    );
    // Below the commit point.
    let err = store.truncate_after(Lsn(1)).unwrap_err();
    assert!(err.to_string().contains("committed"), "{err}");
    // Nothing changed by the refusals.
    assert_eq!(store.head(), Lsn(3));
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 8192)).unwrap(),
        [[2u8; 4096], [3u8; 4096]].concat()
    );
    // A checkpoint that started writing entry 3 (recorded in the superblock first) and
    // crashed: the data file may hold it, so a cut before it is refused after reopening.
    store.shared.record_data_through(Lsn(3)).unwrap();
    drop(store);
    let store = open_without_flusher(&path);
    let err = store.truncate_after(Lsn(2)).unwrap_err();
    assert!(
        err.to_string().contains("may hold entries through 3"),
        "{err}"
    );
}

#[test]
fn a_cut_log_keeps_the_older_value_of_a_block_and_never_revives_the_cut_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open_without_flusher(&path);
    store.begin_epoch(None).unwrap();
    rt.block_on(store.write(0, &[1; 4096], false)).unwrap(); // 1
    store.shared.checkpoint().unwrap();
    rt.block_on(store.write(4096, &[2; 4096], false)).unwrap(); // 2: kept
    rt.block_on(store.write(4096, &[3; 4096], false)).unwrap(); // 3: cut, overwrites 2
    rt.block_on(store.write(8192, &[4; 4096], false)).unwrap(); // 4: cut
    rt.block_on(store.trim(0, 4096, false)).unwrap(); // 5: cut
    rt.block_on(store.flush()).unwrap();
    store.truncate_after(Lsn(2)).unwrap();
    assert_eq!(store.head(), Lsn(2));
    assert_eq!(store.durable(), Lsn(2));
    let expect = [[1u8; 4096], [2u8; 4096], [0u8; 4096]].concat();
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 12288)).unwrap(),
        expect
    );
    // The log goes on from 3 with new entries, which a crash keeps and the old ones never
    // come back in their place.
    rt.block_on(store.write(12288, &[5; 4096], true)).unwrap(); // the new 3
    drop(store);
    let store = open_without_flusher(&path);
    assert_eq!(store.head(), Lsn(3));
    let expect = [[1u8; 4096], [2u8; 4096], [0u8; 4096], [5u8; 4096]].concat();
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 16384)).unwrap(),
        expect
    );
    // Cutting everything after the checkpoint, then a clean close and reopen.
    store.truncate_after(Lsn(1)).unwrap();
    store.close().unwrap();
    drop(store);
    let store = open_without_flusher(&path);
    assert_eq!(store.head(), Lsn(1));
    let expect = [[1u8; 4096], [0u8; 4096], [0u8; 4096], [0u8; 4096]].concat();
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 16384)).unwrap(),
        expect
    );
}

#[test]
fn a_rebuild_writes_long_base_runs_directly_and_short_wal_runs_through_the_cache() {
    // 8 MiB of base in 1 MiB chunks (runs long enough for O_DIRECT), with WAL writes landing
    // in the middle of it before and after their base chunk arrives, and a trim: the result
    // must be the base with the WAL on top, before and after a reopen.
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let path = create(tmp.path(), 8 * MIB, 64 * MIB);
    let replica = open_without_flusher(&path);
    let history = vec![(Epoch(1), Lsn(1))];
    replica.adopt_epoch(Epoch(1), VolumeId([5; 16])).unwrap();
    replica.begin_rebuild(Lsn(100), history, None).unwrap();
    let base = pattern(7, (8 * MIB) as usize);
    let wal = |lsn: u64, block: u64, seed: u8| {
        WalRecord::new(
            Lsn(lsn),
            Epoch(1),
            RecordKind::Write,
            block * 4096,
            4096,
            Bytes::from(pattern(seed, 4096)),
        )
    };
    let mut expect = base.clone();
    // Block 5 is written by the WAL before its base chunk arrives; block 700 after.
    rt.block_on(replica.append_replicated(wal(101, 5, 90)))
        .unwrap();
    expect[5 * 4096..6 * 4096].copy_from_slice(&pattern(90, 4096));
    for c in 0..8u64 {
        let data = Bytes::copy_from_slice(&base[(c * MIB) as usize..((c + 1) * MIB) as usize]);
        rt.block_on(replica.apply_base(c * MIB, MIB, Some(data), Lsn::ZERO))
            .unwrap();
        if c == 3 {
            // A checkpoint in the middle, with the base so far and the WAL block.
            replica.shared.checkpoint().unwrap();
        }
    }
    rt.block_on(replica.append_replicated(wal(102, 700, 91)))
        .unwrap();
    expect[700 * 4096..701 * 4096].copy_from_slice(&pattern(91, 4096));
    rt.block_on(replica.append_replicated(WalRecord::new(
        Lsn(103),
        Epoch(1),
        RecordKind::Trim,
        1000 * 4096,
        8 * 4096,
        Bytes::new(),
    )))
    .unwrap();
    expect[1000 * 4096..1008 * 4096].fill(0);
    replica.finish_rebuild().unwrap();
    assert!(rt.block_on(replica.read_contiguous(0, 8 * MIB)).unwrap() == expect);
    assert!(
        data_file(&path, 0, 8 * MIB) == expect,
        "the data file on disk"
    );
    drop(replica);
    let replica = open_without_flusher(&path);
    assert!(rt.block_on(replica.read_contiguous(0, 8 * MIB)).unwrap() == expect);
}

/// Invariant (*no partial base is trusted without proof of its lineage*), the store's half:
/// a cursor names only base the data file holds durably, and only with a proof its log held
/// (a chunk that may reflect entries the WAL line has not brought stays outside it); a fresh
/// rebuild drops it, and a resume must name it exactly.
#[test]
fn no_partial_base_is_trusted_without_proof_of_its_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let store = open(&path);
    let epoch = Epoch(2);
    store.adopt_epoch(epoch, VolumeId([9; 16])).unwrap();
    let history = vec![(epoch, Lsn(1))];
    store.begin_rebuild(Lsn(10), history.clone(), None).unwrap();
    assert_eq!(store.rebuild_cursor(), None);
    for c in 0..2u64 {
        let data = Some(Bytes::from(vec![0x5a; MIB as usize]));
        rt.block_on(store.apply_base(c * MIB, MIB, data, Lsn(11)))
            .unwrap();
    }
    // The base may reflect entry 11, which the log does not hold yet: nothing is vouched for.
    assert_eq!(store.save_rebuild_cursor().unwrap(), None);
    rt.block_on(store.append_replicated(WalRecord::new(
        Lsn(11),
        epoch,
        RecordKind::Write,
        3 * MIB,
        4096,
        Bytes::from(vec![0xee; 4096]),
    )))
    .unwrap();
    let data = Some(Bytes::from(vec![0x5a; MIB as usize]));
    rt.block_on(store.apply_base(2 * MIB, MIB, data, Lsn(12)))
        .unwrap();
    let cursor = store.save_rebuild_cursor().unwrap().expect("a cursor");
    assert_eq!((cursor.base, cursor.through), (Lsn(10), 2 * MIB));
    assert_eq!((cursor.proof, cursor.proof_epoch), (Lsn(11), epoch));
    assert_eq!(cursor.history, history);
    // A crash: the cursor and the base below it survive; the store is still rebuilding.
    drop(store);
    let store = open(&path);
    assert!(store.is_rebuilding());
    assert_eq!(store.rebuild_cursor(), Some(cursor.clone()));
    assert!(store
        .begin_rebuild(Lsn(10), history.clone(), Some(MIB))
        .is_err());
    assert!(store
        .begin_rebuild(Lsn(9), history.clone(), Some(2 * MIB))
        .is_err());
    store
        .begin_rebuild(Lsn(10), history.clone(), Some(2 * MIB))
        .unwrap();
    assert_eq!(store.rebuild_cursor(), Some(cursor));
    let kept = rt.block_on(store.read_contiguous(0, 2 * MIB)).unwrap();
    assert!(kept.iter().all(|&b| b == 0x5a), "the durable base is kept");
    // A fresh rebuild trusts nothing of it.
    store.begin_rebuild(Lsn(10), history, None).unwrap();
    assert_eq!(store.rebuild_cursor(), None);
}

/// The same invariant once the cursor is written: a later checkpoint writes this store's own
/// entries into the data file, below the cursor too, so the cursor's proof rises with it. A
/// primary restarted without those entries (it had shipped them, then lost them to a crash)
/// then cannot vouch for the base, and the rebuild starts over instead of keeping blocks of
/// entries that exist nowhere else. A store rebuilt in place starts the rebuild with
/// `data_through` at the base, so its old log's figure neither blocks the cursor nor hides a
/// checkpoint past it.
#[test]
fn a_checkpoint_past_a_cursor_raises_its_proof() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let store = open(&path);
    let epoch = Epoch(2);
    store.adopt_epoch(epoch, VolumeId([9; 16])).unwrap();
    let history = vec![(epoch, Lsn(1))];
    // Rebuilt in place: its old log's checkpoints had gone far past the new one's head.
    store.shared.record_data_through(Lsn(500)).unwrap();
    store.begin_rebuild(Lsn(10), history.clone(), None).unwrap();
    let write = |lsn: u64, offset: u64, fill: u8| {
        rt.block_on(store.append_replicated(WalRecord::new(
            Lsn(lsn),
            epoch,
            RecordKind::Write,
            offset,
            4096,
            Bytes::from(vec![fill; 4096]),
        )))
        .unwrap();
    };
    write(11, 3 * MIB, 0xee);
    let data = Some(Bytes::from(vec![0x5a; MIB as usize]));
    rt.block_on(store.apply_base(0, MIB, data, Lsn(11)))
        .unwrap();
    let cursor = store.save_rebuild_cursor().unwrap().expect("a cursor");
    assert_eq!((cursor.through, cursor.proof), (MIB, Lsn(11)));
    // Entry 12 lands below the cursor; the checkpoint writes it there.
    write(12, 8192, 0x77);
    store.shared.checkpoint().unwrap();
    assert_eq!(data_file(&path, 8192, 4096), vec![0x77; 4096]);
    let raised = store.rebuild_cursor().expect("still a cursor");
    assert_eq!(
        (raised.through, raised.proof, raised.proof_epoch),
        (MIB, Lsn(12), epoch),
        "the proof covers the entry the data file now holds below the cursor"
    );
    drop(store);
    let store = open(&path);
    assert_eq!(store.rebuild_cursor(), Some(raised), "and it is durable");
}

/// A primary resumes a base only while its data file is at least as new as the base and its
/// WAL holds every entry after it, which it then pins; otherwise it says why.
#[test]
fn a_primary_resumes_a_base_only_with_its_wal_and_a_data_file_as_new() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let store = open(&path);
    store.begin_epoch(None).unwrap();
    for b in 0..8u64 {
        rt.block_on(store.write(b * 4096, &pattern(b as u8, 4096), false))
            .unwrap();
    }
    store.shared.checkpoint().unwrap();
    let (base, history) = store.rebuild_base();
    assert_eq!(base, Lsn(8));
    assert_eq!(store.resume_base(base), Ok(history));
    // Newer than our checkpoint: what we would stream past a cursor could be older than it.
    rt.block_on(store.write(0, &pattern(9, 4096), false))
        .unwrap();
    assert_eq!(
        store.resume_base(Lsn(9)),
        Err(crate::ResumeRefusal::OlderImage)
    );
    // The WAL after an old base recycled: nothing to replay from there.
    store.set_retention_pin(None);
    store.shared.checkpoint().unwrap();
    assert_eq!(
        store.resume_base(Lsn(2)),
        Err(crate::ResumeRefusal::WalRecycled)
    );
}

/// A replica with the smallest WAL takes every entry of a primary with a larger one, its
/// head first exactly half-way round: before entries were sized by the smallest WAL, the
/// primary's 256 MiB ring made one 32 MiB entry of a 32 MiB write, which needs the 32 MiB
/// left of the replica's lap plus its own 32 MiB and 64 bytes, and the replica's log stopped.
#[test]
fn a_replica_with_the_smallest_wal_takes_the_entries_of_a_larger_one() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = rt();
    let size = 160 * MIB;
    let primary_path = create(tmp.path(), size, 4 * crate::wal::MIN_WAL_CAPACITY);
    let replica_path = tmp.path().join("replica");
    let primary = open(&primary_path);
    Store::create(
        &replica_path,
        &CreateOptions {
            size,
            wal_capacity: crate::wal::MIN_WAL_CAPACITY,
            volume_id: Some(primary.volume_id()),
        },
    )
    .unwrap();
    let replica = open(&replica_path);
    let epoch = primary.begin_epoch(None).unwrap();
    replica.adopt_epoch(epoch, primary.store_id()).unwrap();
    let mut tap = primary.subscribe();
    let data = pattern(7, 32 << 20);
    rt.block_on(async {
        // The replica takes these entries as they are: its head is then half-way round.
        write_to_half_way(&primary, &data).await;
        for i in 0..4u64 {
            primary.write(i * (32 << 20), &data, false).await.unwrap();
        }
        let mut halfway = None;
        while let Ok(rec) = tap.try_recv() {
            assert!(
                rec.payload.len() as u64 <= crate::wal::MAX_ENTRY_PAYLOAD,
                "entry {} carries {} bytes",
                rec.lsn,
                rec.payload.len()
            );
            let lsn = rec.lsn;
            tokio::time::timeout(
                std::time::Duration::from_secs(60),
                replica.append_replicated(rec),
            )
            .await
            .unwrap_or_else(|_| panic!("entry {lsn} never fitted the replica's WAL"))
            .unwrap();
            if lsn == Lsn(64) {
                halfway = Some(replica.shared.lock_core().log.head.0);
            }
        }
        let capacity = crate::wal::MIN_WAL_CAPACITY;
        assert_eq!(
            halfway,
            Some(capacity / 2),
            "the replica's head was half-way round"
        );
        replica.flush().await.unwrap();
        assert_eq!(replica.head(), primary.head());
        for at in (0..128 * MIB).step_by(32 << 20) {
            let a = primary.read_contiguous(at, 32 * MIB).await.unwrap();
            let b = replica.read_contiguous(at, 32 * MIB).await.unwrap();
            assert!(a == b, "the replica's copy differs at {at}");
        }
    });
}
