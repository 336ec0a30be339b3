//! Tests of the client's data path: reads and writes of any alignment, trims and zeroes,
//! back pressure from a full WAL.

use super::*;

#[test]
fn unaligned_writes_read_modify_write() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    let base = pattern(9, 16384);
    rt.block_on(store.write(0, &base, false)).unwrap();
    store.shared.checkpoint().unwrap(); // the edges now come from the data file
    let patch = pattern(77, 5000);
    rt.block_on(store.write(1000, &patch, false)).unwrap();
    let mut expect = base.clone();
    expect[1000..6000].copy_from_slice(&patch);
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 16384)).unwrap(),
        expect
    );
    // A tiny write inside one block that is still in the WAL.
    rt.block_on(store.write(4097, &[0xee; 3], false)).unwrap();
    expect[4097..4100].copy_from_slice(&[0xee; 3]);
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 16384)).unwrap(),
        expect
    );
    // Unaligned read.
    assert_eq!(
        rt.block_on(store.read_contiguous(4095, 7)).unwrap(),
        &expect[4095..4102]
    );
}

#[test]
fn concurrent_overlapping_sub_block_writes_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let rt = rt();
    let store = Arc::new(open(&path));
    // 512 writers, each owning 8 distinct bytes spread over 4 blocks; checkpoints run in
    // between so some edges come from the data file and some from the WAL.
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..512u64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let off = i * 32 + (i % 3);
                s.write(off, &[(i % 250) as u8 + 1; 8], false)
                    .await
                    .unwrap();
            }));
            if i % 100 == 0 {
                let s = store.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::task::spawn_blocking(move || s.shared.checkpoint().unwrap())
                        .await
                        .unwrap();
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let got = rt.block_on(store.read_contiguous(0, 4 * 4096)).unwrap();
    for i in 0..512u64 {
        let off = (i * 32 + (i % 3)) as usize;
        assert_eq!(&got[off..off + 8], &[(i % 250) as u8 + 1; 8], "writer {i}");
    }
}

#[test]
fn full_wal_back_pressures_writers_instead_of_failing() {
    let tmp = tempfile::tempdir().unwrap();
    // 64 MiB of WAL, 200 MiB of writes: the ring must be recycled several times.
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = Arc::new(open(&path));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50u64 {
                    let off = ((w * 50 + i) % 64) * MIB;
                    s.write(off, &vec![(w * 50 + i) as u8; MIB as usize], false)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert!(store.info().wal_used <= 64 * MIB);
    rt.block_on(store.flush()).unwrap();
    drop(store);
    let store = open(&path);
    // Each MiB slot holds the last value written to it by some writer; all bytes agree.
    for slot in 0..64u64 {
        let got = rt.block_on(store.read_contiguous(slot * MIB, MIB)).unwrap();
        assert!(got.iter().all(|&b| b == got[0]), "slot {slot} is torn");
    }
}

#[test]
fn trim_and_zeroes_read_as_zero_and_report_holes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    rt.block_on(store.write(0, &pattern(5, MIB as usize), false))
        .unwrap();
    rt.block_on(store.trim(4096, 8192, false)).unwrap();
    rt.block_on(store.write_zeroes(100, 50, true, false))
        .unwrap();
    let got = rt.block_on(store.read_contiguous(0, 3 * 4096)).unwrap();
    assert!(got[100..150].iter().all(|&b| b == 0));
    assert_eq!(got[99], pattern(5, 100)[99]);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    let status = store.block_status(0, 4 * MIB).unwrap();
    assert_eq!(
        status[0],
        Allocation {
            length: 4096,
            hole: false,
            zero: false
        }
    );
    assert_eq!(
        status[1],
        Allocation {
            length: 8192,
            hole: true,
            zero: true
        }
    );
    assert!(status.last().unwrap().hole, "never-written tail is a hole");
    let total: u64 = status.iter().map(|a| a.length).sum();
    assert_eq!(total, 4 * MIB);
    // After a checkpoint the data file has the hole punched.
    store.shared.checkpoint().unwrap();
    let status = store.block_status(4096, 8192).unwrap();
    assert_eq!(
        status,
        vec![Allocation {
            length: 8192,
            hole: true,
            zero: true
        }]
    );
    // A whole-volume trim is a single dirty entry, not a million.
    rt.block_on(store.trim(0, 4 * MIB, false)).unwrap();
    assert_eq!(store.shared.lock_core().maps.active.iter().count(), 1);
}

#[test]
fn out_of_range_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    assert!(matches!(
        rt.block_on(store.write(MIB - 10, &[1; 20], false)),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        rt.block_on(store.read(u64::MAX - 1, 10)),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(rt.block_on(store.read(MIB - 10, 10)).is_ok());
}

/// Invariant (*the padding never reaches a live record*): a direct WAL write ends with zeroes
/// up to the next aligned boundary, unless the record was appended with less than
/// `WAL_SLACK` free after it; then it keeps the bytes after it. Here the head laps the ring
/// until it stands right behind a pinned tail that is not on an aligned boundary, with synced
/// (direct) writes last; every retained entry must still read.
#[test]
fn the_padding_never_reaches_a_live_record() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    let capacity = store.info().wal_capacity;
    rt.block_on(async {
        // Move the tail into the ring's middle, off any 512-byte boundary.
        for i in 0..3u64 {
            store
                .write_zeroes(i * 4096, 4096, false, false)
                .await
                .unwrap();
        }
        for i in 0..100u64 {
            store
                .write(i * 4096, &pattern(i as u8, 4096), false)
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
    });
    store.shared.checkpoint().unwrap();
    let pin = store.head().next();
    store.set_retention_pin(Some(pin));
    rt.block_on(async {
        // Room for the record even if it has to wrap: the pinned ring never frees any.
        let room = |record: u64| store.info().wal_used + 2 * record <= capacity;
        let mut i = 0u64;
        while room(MIB + 64) {
            store
                .write((i % 63) * MIB, &pattern(i as u8, MIB as usize), false)
                .await
                .unwrap();
            i += 1;
        }
        while room(4096 + 64) {
            store
                .write((i % 16000) * 4096, &pattern(i as u8, 4096), true)
                .await
                .unwrap();
            i += 1;
        }
        // The last bytes as the store allows them, up to the entry it refuses.
        loop {
            let layout = store.shared.layout;
            let mut core = store.shared.lock_core();
            let zeroes = RecordKind::WriteZeroes { punch: false };
            let off = (i % 16000) * 4096;
            if core
                .try_append(&layout, zeroes, off, 4096, Bytes::new(), 0)
                .is_err()
            {
                break;
            }
            i += 1;
        }
        store.flush().await.unwrap();
    });
    assert!(
        capacity - store.info().wal_used < 64,
        "the ring is full to its tail"
    );
    let entries = rt.block_on(store.read_wal(pin, u64::MAX)).unwrap();
    assert_eq!(entries.len() as u64, store.head().0 - pin.0 + 1);
    assert_eq!(entries[0].lsn, pin);
    store.set_retention_pin(None);
    store.close().unwrap();
    drop(store);
    let store = open(&path);
    assert_eq!(store.replay_outcome().torn_at, None);
}

/// The smallest WAL takes writes of the largest size one after another, whatever place in
/// the ring the head has reached; here first exactly half-way round, where one entry of
/// 32 MiB would need the 32 MiB left of the lap and its own 32 MiB and 64 bytes.
#[test]
fn writes_of_the_largest_size_go_through_a_wal_of_the_smallest_size() {
    let tmp = tempfile::tempdir().unwrap();
    let capacity = crate::wal::MIN_WAL_CAPACITY;
    let path = create(tmp.path(), 128 * MIB, capacity);
    let rt = rt();
    let store = open_logging_every_write(&path);
    let data = pattern(7, MAX_REQUEST as usize);
    rt.block_on(async {
        write_to_half_way(&store, &data).await;
        let head = store.shared.lock_core().log.head.0;
        assert_eq!(head % capacity, capacity / 2, "the head is half-way round");
        for i in 0..5u64 {
            let write = store.write((i % 4) * MAX_REQUEST, &data, false);
            tokio::time::timeout(std::time::Duration::from_secs(60), write)
                .await
                .unwrap_or_else(|_| panic!("write {i} of {MAX_REQUEST} bytes never fitted"))
                .unwrap();
        }
        store.flush().await.unwrap();
    });
}

/// A first write takes the data file's space for the whole 256 KiB granule around it (one
/// `fallocate`), so the blocks next to it write with no reservation of their own; the
/// granule is clipped at the volume's end.
#[test]
fn a_first_write_reserves_its_granule() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    let reserved = &store.shared.reserved;
    assert!(!reserved.covers(64, 128));
    rt.block_on(store.write(70 * 4096, &pattern(3, 4096), false))
        .unwrap();
    assert!(reserved.covers(64, 128), "the granule of block 70");
    assert!(!reserved.covers(128, 129), "nothing past it");
    let last = reserved.blocks() - 1;
    rt.block_on(store.write(last * 4096, &pattern(4, 4096), false))
        .unwrap();
    assert!(reserved.covers(last - last % 64, last + 1));
}

/// `write_shared` keeps a large whole-block write's buffer as its entry (no second copy) and
/// copies a small one (which may be a slice of a larger read-ahead buffer the map would
/// pin); both read back and survive a reopen.
#[test]
fn a_large_shared_write_keeps_the_callers_buffer() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 4 * MIB, 64 * MIB);
    let rt = rt();
    let store = open_logging_without_flusher(&path);
    let first_segment = |offset: u64, len: u64| match rt.block_on(store.read(offset, len)).unwrap()
    {
        segments if segments.len() == 1 => match &segments[0] {
            ReadSegment::Data(b) => b.clone(),
            ReadSegment::Zeroes(_) => panic!("zeroes where a write was"),
        },
        segments => panic!("{} segments", segments.len()),
    };
    let large = Bytes::from(pattern(5, super::super::data_path::KEEP_MIN));
    rt.block_on(store.write_shared(0, large.clone(), false))
        .unwrap();
    let held = first_segment(0, large.len() as u64);
    assert_eq!(
        held.as_ptr(),
        large.as_ptr(),
        "the entry is the caller's buffer"
    );
    assert_eq!(held, large);

    let small = Bytes::from(pattern(6, 64 << 10));
    let at = 2 * MIB;
    rt.block_on(store.write_shared(at, small.clone(), false))
        .unwrap();
    let copied = first_segment(at, small.len() as u64);
    assert_ne!(copied.as_ptr(), small.as_ptr(), "a small write is copied");
    assert_eq!(copied, small);

    rt.block_on(store.flush()).unwrap();
    drop(store);
    let store = open(&path);
    let read = |offset: u64, len: usize| {
        rt.block_on(store.read_contiguous(offset, len as u64))
            .unwrap()
    };
    assert_eq!(read(0, large.len()), large);
    assert_eq!(read(at, small.len()), small);
}
