use std::sync::Arc;

use super::files::{DATA, SUPERBLOCK, WAL};
use super::*;
use crate::superblock::Role;
use crate::wal::{self, record::RecordKind};
use crate::WalRecord;

const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

fn create(dir: &Path, size: u64, wal: u64) -> PathBuf {
    let path = dir.join("vol");
    Store::create(
        &path,
        &CreateOptions {
            size,
            wal_capacity: wal,
            volume_id: None,
        },
    )
    .unwrap();
    path
}

fn open(path: &Path) -> Store {
    Store::open(path, &OpenOptions::default()).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[test]
fn write_read_roundtrip_across_checkpoint_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    store.begin_epoch(None).unwrap();
    let a = pattern(1, 3 * 4096);
    rt.block_on(store.write(8192, &a, false)).unwrap();
    assert_eq!(
        rt.block_on(store.read_contiguous(8192, a.len() as u64))
            .unwrap(),
        a
    );
    store.shared.checkpoint().unwrap();
    assert_eq!(
        rt.block_on(store.read_contiguous(8192, a.len() as u64))
            .unwrap(),
        a
    );
    let b = pattern(2, 4096);
    rt.block_on(store.write(12288, &b, true)).unwrap();
    store.close().unwrap();
    drop(store);
    let store = open(&path);
    let got = rt
        .block_on(store.read_contiguous(8192, a.len() as u64))
        .unwrap();
    assert_eq!(&got[..4096], &a[..4096]);
    assert_eq!(&got[4096..8192], &b[..]);
    assert_eq!(&got[8192..], &a[8192..]);
}

#[test]
fn acknowledged_flush_survives_crash_without_close() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    for i in 0..50u64 {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
    }
    let flushed = rt.block_on(store.flush()).unwrap();
    assert_eq!(flushed, Lsn(50));
    drop(store); // no close: like kill -9 after the flush reply
    let store = open(&path);
    assert_eq!(store.replay_outcome().next_lsn, Lsn(51));
    for i in 0..50u64 {
        let got = rt.block_on(store.read_contiguous(i * 4096, 4096)).unwrap();
        assert_eq!(got, pattern(i as u8, 4096), "block {i}");
    }
}

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

#[test]
fn store_lock_refuses_a_second_opener() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), MIB, 64 * MIB);
    let _first = open(&path);
    let err = Store::open(&path, &OpenOptions::default()).err().unwrap();
    assert!(matches!(err, StorageError::Locked(_)), "{err}");
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

/// Writes `n` one-block entries and flushes, without a checkpoint, then "crashes".
fn store_with_log(n: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = Store::open(
        &path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    for i in 0..n {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
        // A flush per write, so each record's durable hint covers the one before it.
        rt.block_on(store.flush()).unwrap();
    }
    drop(store);
    (tmp, path)
}

fn record_offset(k: u64) -> u64 {
    // Entry k (1-based) of one-block writes starts here in the WAL file.
    wal::WAL_HEADER_LEN + (k - 1) * (64 + 4096)
}

fn corrupt(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = File::options().write(true).open(path.join(WAL)).unwrap();
    f.write_all_at(&[0xa5; 16], offset).unwrap();
}

#[test]
fn wal_torn_tail_is_truncated() {
    let (_tmp, path) = store_with_log(10);
    // Tear the payload of the last entry.
    corrupt(&path, record_offset(10) + 64 + 100);
    let store = open(&path);
    let out = store.replay_outcome();
    assert_eq!(out.next_lsn, Lsn(10), "entry 10 is cut");
    assert_eq!(out.torn_at, Some(record_offset(10)));
    let rt = rt();
    assert_eq!(
        rt.block_on(store.read_contiguous(8 * 4096, 4096)).unwrap(),
        pattern(8, 4096)
    );
    // New writes continue from the cut, and survive another crash.
    rt.block_on(store.write(0, &[7; 4096], true)).unwrap();
    drop(store);
    let store = open(&path);
    assert_eq!(store.replay_outcome().next_lsn, Lsn(11));
    assert_eq!(
        rt.block_on(store.read_contiguous(0, 4096)).unwrap(),
        vec![7u8; 4096]
    );
}

#[test]
fn wal_mid_log_corruption_refuses_to_open_naming_file_and_offset() {
    let (_tmp, path) = store_with_log(10);
    corrupt(&path, record_offset(4) + 64 + 10);
    let err = Store::open(&path, &OpenOptions::default()).err().unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, StorageError::CorruptWal { lsn: Lsn(4), .. }),
        "{msg}"
    );
    assert!(msg.contains(&path.join(WAL).display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("offset {}", record_offset(4))),
        "{msg}"
    );
}

#[test]
fn wal_unsynced_batch_torn_in_the_middle_is_a_torn_tail() {
    // Entries 1..=5 flushed; 6..=8 written in one batch without a flush, then entry 6 torn
    // while 7 and 8 reached the disk: nothing proves 6 durable, so it is a tail, not
    // corruption.
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = Store::open(
        &path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    for i in 0..8u64 {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
        if i < 5 {
            rt.block_on(store.flush()).unwrap();
        }
    }
    // Let the writer put 6..8 in the file without syncing.
    std::thread::sleep(Duration::from_millis(200));
    drop(store);
    corrupt(&path, record_offset(6) + 64 + 5);
    let store = open(&path);
    assert_eq!(store.replay_outcome().next_lsn, Lsn(6));
}

/// Found by the power-loss tests: replay cut the log at a torn entry, new entries then
/// filled the ring up to the old entries still lying beyond it, and the next replay took
/// those (same epoch, intact checksums) as the continuation of the log.
#[test]
fn a_cut_log_never_grows_back() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = Store::open(
        &path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    // 1..=5 flushed; 6..=8 unsynced, then 6 torn by the crash while 7 and 8 reached the disk.
    for i in 0..8u64 {
        rt.block_on(store.write(i * 4096, &pattern(i as u8, 4096), false))
            .unwrap();
        if i < 5 {
            rt.block_on(store.flush()).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(store);
    corrupt(&path, record_offset(6) + 64 + 5);
    let store = open(&path);
    assert_eq!(store.replay_outcome().next_lsn, Lsn(6));
    // Two new one-block entries take the places of the old 6 and 7, so the old 8 follows
    // them in the ring with the LSN that would come next.
    rt.block_on(store.write(40 * 4096, &[0x66; 4096], false))
        .unwrap();
    rt.block_on(store.write(41 * 4096, &[0x77; 4096], false))
        .unwrap();
    rt.block_on(store.flush()).unwrap();
    drop(store);
    let store = open(&path);
    assert_eq!(
        store.replay_outcome().next_lsn,
        Lsn(8),
        "the old entry 8 came back"
    );
    assert_eq!(
        rt.block_on(store.read_contiguous(7 * 4096, 4096)).unwrap(),
        vec![0u8; 4096],
        "block 7 holds a write the log had dropped"
    );
    assert_eq!(
        rt.block_on(store.read_contiguous(41 * 4096, 4096)).unwrap(),
        vec![0x77u8; 4096]
    );
}

#[test]
fn replay_ignores_records_of_a_previous_lap() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 64 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    // ~3 laps of the ring with checkpoints in between.
    for i in 0..200u64 {
        rt.block_on(store.write((i % 60) * MIB, &vec![i as u8; MIB as usize], false))
            .unwrap();
    }
    rt.block_on(store.flush()).unwrap();
    drop(store);
    let store = open(&path);
    for i in 140..200u64 {
        let got = rt
            .block_on(store.read_contiguous((i % 60) * MIB, 4096))
            .unwrap();
        assert_eq!(got[0], i as u8, "slot {}", i % 60);
    }
}

#[test]
fn read_only_open_replays_without_writing() {
    let (_tmp, path) = store_with_log(3);
    let before = std::fs::read(path.join(SUPERBLOCK)).unwrap();
    let store = Store::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let rt = rt();
    assert_eq!(
        rt.block_on(store.read_contiguous(4096, 4096)).unwrap(),
        pattern(1, 4096)
    );
    assert!(rt.block_on(store.write(0, &[1], false)).is_err());
    drop(store);
    assert_eq!(std::fs::read(path.join(SUPERBLOCK)).unwrap(), before);
}

#[test]
fn create_refuses_existing_dir_and_bad_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), MIB, 64 * MIB);
    assert!(matches!(
        Store::create(
            &path,
            &CreateOptions {
                size: MIB,
                wal_capacity: 64 * MIB,
                volume_id: None,
            }
        ),
        Err(StorageError::AlreadyExists(_))
    ));
    let other = tmp.path().join("b");
    assert!(matches!(
        Store::create(
            &other,
            &CreateOptions {
                size: 1000,
                wal_capacity: 64 * MIB,
                volume_id: None,
            }
        ),
        Err(StorageError::BadGeometry(_))
    ));
    assert!(!other.exists());
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
fn committed_lsn_survives_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    for i in 0..5u64 {
        rt.block_on(store.write(i * 4096, &[1; 4096], false))
            .unwrap();
    }
    store.set_committed(Lsn(4));
    rt.block_on(store.write(0, &[2; 4096], false)).unwrap();
    rt.block_on(store.flush()).unwrap();
    drop(store);
    // Known from the record headers alone (no checkpoint ran).
    let store = open(&path);
    assert_eq!(store.committed(), Lsn(4));
    store.set_committed(Lsn(6));
    store.shared.checkpoint().unwrap();
    drop(store);
    assert_eq!(Store::read_superblock(&path).unwrap().committed_lsn, Lsn(6));
}

/// Reads `[offset, offset+len)` of a store's data file directly (what a primary streams as its
/// base image).
fn data_file(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path.join(DATA)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
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
    replica.begin_rebuild(base, history).unwrap();
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
        rt.block_on(replica.apply_base(c * chunk, chunk, Some(Bytes::from(data))))
            .unwrap();
    }
    for e in entries {
        rt.block_on(replica.append_replicated(e)).unwrap();
    }
    for c in 2..(4 * MIB / chunk) {
        let data = data_file(&p_path, c * chunk, chunk);
        let all_zero = data.iter().all(|&x| x == 0);
        let data = (!all_zero).then(|| Bytes::from(data));
        rt.block_on(replica.apply_base(c * chunk, chunk, data))
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
        .begin_rebuild(Lsn(100), vec![(Epoch(2), Lsn(1))])
        .unwrap();
    drop(store);
    let store = open(&path);
    assert!(store.is_rebuilding());
    assert_eq!(store.head(), Lsn(100));
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

/// A store whose flusher never runs on its own (checkpoints happen only when a test asks).
fn open_without_flusher(path: &Path) -> Store {
    Store::open(
        path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        },
    )
    .unwrap()
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
    replica.begin_rebuild(Lsn(100), history).unwrap();
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
        rt.block_on(replica.apply_base(c * MIB, MIB, Some(data)))
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
