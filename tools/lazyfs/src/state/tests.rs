//! The model's rules, tested on a temporary backing directory (no FUSE).

use std::ffi::OsStr;
use std::path::Path;

use super::*;

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn setup() -> (tempfile::TempDir, State) {
    let dir = tempfile::tempdir().unwrap();
    let s = State::new(dir.path()).unwrap();
    (dir, s)
}

fn write_file(s: &mut State, parent: u64, n: &str, data: &[u8]) -> (u64, u64) {
    let a = s.create_file(parent, name(n), 0o644, 0, 0).unwrap();
    let fh = s.open(a.ino).unwrap();
    s.write(fh, 0, data).unwrap();
    (a.ino, fh)
}

fn read_all(s: &mut State, parent: u64, n: &str) -> Option<Vec<u8>> {
    let a = s.lookup(parent, name(n)).ok()?;
    let fh = s.open(a.ino).unwrap();
    let d = s.read(fh, 0, 1 << 20).unwrap();
    s.release(fh);
    Some(d)
}

#[test]
fn unsynced_file_vanishes_synced_file_without_dir_sync_vanishes_too() {
    let (dir, mut s) = setup();
    let (ino, _) = write_file(&mut s, ROOT, "a", b"hello");
    s.fsync_file(ino).unwrap();
    write_file(&mut s, ROOT, "b", b"world");
    assert_eq!(read_all(&mut s, ROOT, "a").unwrap(), b"hello");
    assert!(
        !dir.path().join("a").exists(),
        "no name before the directory is synced"
    );
    s.crash(None).unwrap();
    assert!(read_all(&mut s, ROOT, "a").is_none());
    assert!(read_all(&mut s, ROOT, "b").is_none());
}

#[test]
fn dir_sync_makes_names_durable_and_file_sync_the_data() {
    let (dir, mut s) = setup();
    let (a, _) = write_file(&mut s, ROOT, "a", b"hello");
    write_file(&mut s, ROOT, "b", b"world");
    s.fsync_file(a).unwrap();
    s.fsync_dir(ROOT).unwrap();
    assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"hello");
    assert_eq!(
        std::fs::read(dir.path().join("b")).unwrap(),
        b"",
        "b's data was never synced"
    );
    let r = s.crash(None).unwrap();
    assert_eq!(r.dropped_pages, 1);
    assert_eq!(read_all(&mut s, ROOT, "a").unwrap(), b"hello");
    assert_eq!(read_all(&mut s, ROOT, "b").unwrap(), b"");
}

#[test]
fn rename_is_durable_only_after_the_directory_sync() {
    let (dir, mut s) = setup();
    let (a, _) = write_file(&mut s, ROOT, "old", b"x");
    s.fsync_file(a).unwrap();
    s.fsync_dir(ROOT).unwrap();
    s.rename(ROOT, name("old"), ROOT, name("new"), 0).unwrap();
    assert!(read_all(&mut s, ROOT, "new").is_some());
    s.crash(None).unwrap();
    assert!(read_all(&mut s, ROOT, "new").is_none());
    assert_eq!(read_all(&mut s, ROOT, "old").unwrap(), b"x");
    s.rename(ROOT, name("old"), ROOT, name("new"), 0).unwrap();
    s.fsync_dir(ROOT).unwrap();
    assert!(dir.path().join("new").exists() && !dir.path().join("old").exists());
    s.crash(None).unwrap();
    assert_eq!(read_all(&mut s, ROOT, "new").unwrap(), b"x");
}

#[test]
fn unlinked_open_file_keeps_its_data_until_the_crash() {
    let (_dir, mut s) = setup();
    let (a, fh) = write_file(&mut s, ROOT, "f", b"data");
    s.fsync_file(a).unwrap();
    s.fsync_dir(ROOT).unwrap();
    s.unlink(ROOT, name("f")).unwrap();
    s.fsync_dir(ROOT).unwrap();
    // The handle still works: the staging link keeps the inode.
    assert_eq!(s.read(fh, 0, 100).unwrap(), b"data");
    s.write(fh, 4, b"more").unwrap();
    s.fsync_file(a).unwrap();
    s.crash(None).unwrap();
    assert!(read_all(&mut s, ROOT, "f").is_none());
    assert_eq!(
        s.read(fh, 0, 10),
        Err(libc::EIO),
        "handles do not survive a crash"
    );
}

/// The store's create: build in a temporary directory, sync its files and the directory,
/// rename it into place, sync the parent.
#[test]
fn store_create_pattern_survives_only_with_both_directory_syncs() {
    for sync_parent in [false, true] {
        let (dir, mut s) = setup();
        let tmp = s
            .mkdir(ROOT, name(".vol.creating"), 0o755, 0, 0)
            .unwrap()
            .ino;
        for f in ["superblock", "wal", "data", "lock"] {
            let (ino, fh) = write_file(&mut s, tmp, f, f.as_bytes());
            s.fsync_file(ino).unwrap();
            s.release(fh);
        }
        s.fsync_dir(tmp).unwrap();
        s.rename(ROOT, name(".vol.creating"), ROOT, name("vol"), 0)
            .unwrap();
        if sync_parent {
            s.fsync_dir(ROOT).unwrap();
        }
        s.crash(Some(7)).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path().join(STAGING_NAME))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "a crash empties the staging directory");
        let vol = s.lookup(ROOT, name("vol"));
        if sync_parent {
            let vol = vol.unwrap().ino;
            for f in ["superblock", "wal", "data", "lock"] {
                assert_eq!(read_all(&mut s, vol, f).unwrap(), f.as_bytes());
            }
            assert!(dir.path().join("vol/wal").exists());
        } else {
            assert_eq!(vol.unwrap_err(), libc::ENOENT);
            assert!(
                s.lookup(ROOT, name(".vol.creating")).is_err(),
                "never durable either"
            );
        }
    }
}

#[test]
fn directory_moved_out_of_a_removed_directory_survives_its_new_parents_sync() {
    let (_dir, mut s) = setup();
    let a = s.mkdir(ROOT, name("a"), 0o755, 0, 0).unwrap().ino;
    let sub = s.mkdir(a, name("sub"), 0o755, 0, 0).unwrap().ino;
    let (f, _) = write_file(&mut s, sub, "f", b"keep");
    s.fsync_file(f).unwrap();
    s.fsync_dir(sub).unwrap();
    s.fsync_dir(a).unwrap();
    s.fsync_dir(ROOT).unwrap();
    let b = s.mkdir(ROOT, name("b"), 0o755, 0, 0).unwrap().ino;
    s.rename(a, name("sub"), b, name("sub"), 0).unwrap();
    s.rmdir(ROOT, name("a")).unwrap();
    s.fsync_dir(ROOT).unwrap(); // a goes; b arrives (empty in BACKING_DIR so far)
    s.fsync_dir(b).unwrap(); // sub arrives, from wherever its backing was parked
    s.crash(None).unwrap();
    assert!(s.lookup(ROOT, name("a")).is_err());
    let b = s.lookup(ROOT, name("b")).unwrap().ino;
    let sub = s.lookup(b, name("sub")).unwrap().ino;
    assert_eq!(read_all(&mut s, sub, "f").unwrap(), b"keep");
}

#[test]
fn torn_crash_keeps_some_pages_and_is_repeatable() {
    let run = |seed| {
        let (dir, mut s) = setup();
        let (a, _) = write_file(&mut s, ROOT, "f", &[1u8; 64 * 4096]);
        s.fsync_file(a).unwrap();
        s.fsync_dir(ROOT).unwrap();
        let fh = s.open(a).unwrap();
        s.write(fh, 0, &[2u8; 64 * 4096]).unwrap();
        let r = s.crash(Some(seed)).unwrap();
        assert_eq!(r.kept_pages + r.dropped_pages, 64);
        assert!(r.kept_pages > 0 && r.dropped_pages > 0, "{r:?}");
        let data = std::fs::read(dir.path().join("f")).unwrap();
        let pages: Vec<u8> = data
            .chunks(4096)
            .map(|c| {
                assert!(c.iter().all(|&b| b == c[0]), "a page is all old or all new");
                c[0]
            })
            .collect();
        pages
    };
    assert_eq!(run(5), run(5), "the same seed keeps the same pages");
    assert_ne!(run(5), run(6));
}

#[test]
fn shutdown_makes_everything_durable() {
    let (dir, mut s) = setup();
    let d = s.mkdir(ROOT, name("d"), 0o755, 0, 0).unwrap().ino;
    write_file(&mut s, d, "f", b"content");
    s.symlink(ROOT, name("l"), Path::new("d/f"), 0, 0).unwrap();
    s.shutdown().unwrap();
    assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"content");
    assert_eq!(
        std::fs::read_link(dir.path().join("l")).unwrap(),
        Path::new("d/f")
    );
    assert!(!dir.path().join(STAGING_NAME).exists());
}
