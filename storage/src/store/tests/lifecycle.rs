//! Tests of creating, opening (replay, recovery after a crash) and closing a store.

use super::*;

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
fn store_lock_refuses_a_second_opener() {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), MIB, 64 * MIB);
    let _first = open(&path);
    let err = Store::open(&path, &OpenOptions::default()).err().unwrap();
    assert!(matches!(err, StorageError::Locked(_)), "{err}");
}

/// Writes `n` one-block entries and flushes, without a checkpoint, then "crashes".
fn store_with_log(n: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open_without_flusher(&path);
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
    let store = open_without_flusher(&path);
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
    let store = open_without_flusher(&path);
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

/// Holds the WAL writer inside its round (its records written, not yet counted as written)
/// while `held` is set.
#[derive(Default)]
struct HoldWriter {
    held: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    inside: std::sync::atomic::AtomicBool,
}

impl HoldWriter {
    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.cv.notify_all();
    }
}

impl StoreObserver for HoldWriter {
    fn wal_write(&self, _: u64, _: Duration) {
        let mut held = self.held.lock().unwrap();
        self.inside
            .store(*held, std::sync::atomic::Ordering::SeqCst);
        while *held {
            held = self.cv.wait(held).unwrap();
        }
    }
    fn wal_sync(&self, _: Duration) {}
    fn checkpoint(&self, _: Duration) {}
}

/// Lets the writer go when the test ends, passed or not (the store's drop joins it).
struct Release(Arc<HoldWriter>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Invariant (*a process crash leaves no entry in the data file that the WAL lost*): a
/// checkpoint writes no block of an entry until the WAL writer has written its record, so
/// what a `kill -9` leaves in the data file is always in the WAL's page cache too.
#[test]
fn a_process_crash_leaves_no_entry_in_the_data_file_that_the_wal_lost() {
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 8 * MIB, 64 * MIB);
    let rt = rt();
    let store = Arc::new(open_without_flusher(&path));
    store.begin_epoch(None).unwrap();
    let hold = Arc::new(HoldWriter::default());
    *hold.held.lock().unwrap() = true;
    store.set_observer(hold.clone());
    let _release = Release(hold.clone());
    let data = pattern(4, 4096);
    let lsn = rt.block_on(store.write(MIB, &data, false)).unwrap();
    // A FLUSH sends the writer into its round (a plain write does not wake it).
    let flush = {
        let store = store.clone();
        rt.spawn(async move { store.flush().await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !hold.inside.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "the writer never ran");
        std::thread::yield_now();
    }
    let checkpoint = {
        let store = store.clone();
        std::thread::spawn(move || store.shared.checkpoint())
    };
    // The window a mutant without the wait fails in: its checkpoint is done in milliseconds.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !checkpoint.is_finished(),
        "the checkpoint waits for the record"
    );
    assert!(store.superblock().data_through < lsn);
    assert_eq!(data_file(&path, MIB, 4096), vec![0; 4096]);
    hold.release();
    checkpoint.join().unwrap().unwrap();
    rt.block_on(flush).unwrap().unwrap();
    assert_eq!(data_file(&path, MIB, 4096), data);
    assert_eq!(store.info().checkpoint_lsn, lsn);
}
