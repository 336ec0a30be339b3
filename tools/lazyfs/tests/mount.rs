//! blockrep-lazyfs through the kernel: a real FUSE mount of the built binary, driven with
//! ordinary system calls. (The model itself is unit-tested in src/; the store on top of it in
//! the workspace's tests/power_loss.rs.)
//!
//! Needs /dev/fuse and root, like the rest of blockrep's end-to-end tests. Every mount is
//! unmounted by a Drop guard (umount, then umount -l, then the daemon killed).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blockrep-lazyfs");

fn mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*want))
}

struct Mount {
    backing: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Mount {
    fn new() -> Mount {
        assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
        let tmp = tempfile::tempdir().unwrap();
        let backing = tmp.path().join("backing");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SIGTERM (a clean unmount) if the test thread ends without the guard running.
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn blockrep-lazyfs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(|l| l.ok()));
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(30));
        let mnt = mnt.canonicalize().unwrap();
        let m = Mount {
            backing: backing.canonicalize().unwrap(),
            mnt,
            child: Some(child),
            _tmp: tmp,
        };
        assert!(
            matches!(&line, Ok(Some(l)) if l.contains("mounted")),
            "blockrep-lazyfs did not mount: {line:?}"
        );
        assert!(mounted(&m.mnt));
        m
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn b(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["-k", "5", "30", BIN])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "blockrep-lazyfs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn crash(&self, torn: Option<u64>) -> String {
        let mnt = self.mnt.to_str().unwrap();
        match torn {
            None => self.cli(&["crash", mnt]),
            Some(s) => self.cli(&["crash", mnt, "--torn", "--seed", &s.to_string()]),
        }
    }

    /// `umount MNT`; the daemon must exit 0.
    fn unmount(&mut self) {
        let st = Command::new("timeout")
            .args(["-k", "5", "30", "umount"])
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "umount failed");
        self.wait_exit();
    }

    fn wait_exit(&mut self) {
        let mut c = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "blockrep-lazyfs exited with {st}");
                return;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("blockrep-lazyfs did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for lazy in [false, true] {
            if mounted(&self.mnt) {
                let mut c = Command::new("timeout");
                c.args(["-k", "5", "20", "umount"]);
                if lazy {
                    c.arg("-l");
                }
                let _ = c.arg(&self.mnt).stderr(Stdio::null()).status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fsync_path(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

/// Names under `dir`, sorted (recursively, with file contents), for comparing the view with
/// BACKING_DIR.
fn tree(dir: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        let mut ents: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        ents.sort_by_key(|e| e.file_name());
        for e in ents {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".lazyfs-staging" {
                continue;
            }
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.push((rel, None));
                walk(root, &p, out);
            } else if ft.is_symlink() {
                out.push((
                    rel,
                    Some(
                        fs::read_link(&p)
                            .unwrap()
                            .into_os_string()
                            .into_encoded_bytes(),
                    ),
                ));
            } else {
                out.push((rel, Some(fs::read(&p).unwrap())));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

#[test]
fn data_and_names_are_lazy_until_synced() {
    let m = Mount::new();
    // Durable: data synced, name synced.
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/kept"), b"kept").unwrap();
    fsync_path(&m.p("d/kept"));
    fsync_path(&m.p("d"));
    fsync_path(&m.mnt);
    // Unsynced data on a durable name.
    fs::write(m.p("d/kept"), b"overwritten, never synced").unwrap();
    // Synced data, name never synced.
    fs::write(m.p("d/nameless"), b"x").unwrap();
    fsync_path(&m.p("d/nameless"));
    // A name synced, its data not.
    fs::write(m.p("empty-after"), b"data never synced").unwrap();
    fsync_path(&m.mnt);
    // Renames and unlinks of durable names, directory never synced again.
    fs::write(m.p("old"), b"o").unwrap();
    fsync_path(&m.p("old"));
    fs::write(m.p("gone"), b"g").unwrap();
    fsync_path(&m.p("gone"));
    fsync_path(&m.mnt);
    fs::rename(m.p("old"), m.p("new")).unwrap();
    fs::remove_file(m.p("gone")).unwrap();
    assert!(m.p("new").exists() && !m.p("gone").exists());
    assert_eq!(
        fs::read(m.p("d/kept")).unwrap(),
        b"overwritten, never synced"
    );

    let stats = m.cli(&["stats", m.mnt.to_str().unwrap()]);
    assert!(stats.contains("dirty_files=2"), "{stats}");
    let report = m.crash(None);
    assert!(report.contains("crashed generation=1"), "{report}");

    assert_eq!(fs::read(m.p("d/kept")).unwrap(), b"kept");
    assert!(!m.p("d/nameless").exists(), "a name never synced is lost");
    assert_eq!(
        fs::read(m.p("empty-after")).unwrap(),
        b"",
        "data never synced is lost"
    );
    assert!(
        m.p("old").exists() && !m.p("new").exists(),
        "the rename was not durable"
    );
    assert_eq!(
        fs::read(m.p("gone")).unwrap(),
        b"g",
        "the unlink was not durable"
    );
    // After a crash the view is exactly BACKING_DIR.
    assert_eq!(tree(&m.mnt), tree(&m.backing));
    assert!(!tree(&m.mnt).iter().any(|(n, _)| n.contains("lazyfs")));
}

#[test]
fn handles_opened_before_a_crash_fail_with_eio() {
    let m = Mount::new();
    let mut f = File::create(m.p("f")).unwrap();
    f.write_all(b"abc").unwrap();
    f.sync_all().unwrap();
    fsync_path(&m.mnt);
    m.crash(None);
    let e = f.write_all(b"after").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = f.sync_all().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // A new open sees the durable state and works.
    let mut g = File::options()
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    let mut s = String::new();
    g.read_to_string(&mut s).unwrap();
    assert_eq!(s, "abc");
    g.write_all_at(b"X", 0).unwrap();
    assert_eq!(fs::read(m.b("f")).unwrap(), b"abc", "not synced yet");
    g.sync_data().unwrap();
    assert_eq!(fs::read(m.b("f")).unwrap(), b"Xbc");
}

#[test]
fn fallocate_seek_direct_io_and_flock_work() {
    let m = Mount::new();
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("data"))
        .unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
    f.write_all_at(&[9u8; 4096], 8 << 20).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: plain syscalls on an open descriptor.
    unsafe {
        assert_eq!(libc::lseek(fd, 0, libc::SEEK_DATA), 1 << 20);
        assert_eq!(libc::lseek(fd, 1 << 20, libc::SEEK_HOLE), (1 << 20) + 8192);
        let rc = libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (1 << 20) + 4096,
            4096,
        );
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(libc::lseek(fd, (1 << 20) + 4096, libc::SEEK_DATA), 8 << 20);
        let rc = libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, (8 << 20) + 100, 100);
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096..].iter().all(|&b| b == 0));
    let mut b2 = vec![0u8; 4096];
    f.read_exact_at(&mut b2, 8 << 20).unwrap();
    assert!(b2[..100].iter().all(|&b| b == 9) && b2[100..200].iter().all(|&b| b == 0));
    f.sync_data().unwrap();
    fsync_path(&m.mnt);
    let backing = fs::read(m.b("data")).unwrap();
    assert_eq!(backing.len(), 64 << 20);
    assert_eq!(
        &backing[(1 << 20) + 4096..(1 << 20) + 8192],
        &[0u8; 4096][..]
    );

    // O_DIRECT is served as plain I/O.
    let d = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("data"))
        .unwrap();
    d.write_all_at(&[3u8; 4096], 0).unwrap();
    let mut b3 = vec![0u8; 4096];
    f.read_exact_at(&mut b3, 0).unwrap();
    assert!(b3.iter().all(|&b| b == 3));

    // flock: exclusive, non-blocking, between two open files (the store's lock file).
    let l1 = File::create(m.p("lock")).unwrap();
    let l2 = File::open(m.p("lock")).unwrap();
    // SAFETY: flock on open descriptors.
    unsafe {
        assert_eq!(
            libc::flock(l1.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
        assert_eq!(
            libc::flock(l2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
    }
    drop(l1);
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            libc::flock(l2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
    }
}

/// The same unsynced state and the same seed keep the same pages.
#[test]
fn torn_crashes_are_repeatable_with_a_seed() {
    let run = |seed: u64| -> Vec<u8> {
        let m = Mount::new();
        let f = File::create(m.p("f")).unwrap();
        f.write_all_at(&vec![1u8; 256 * 4096], 0).unwrap();
        f.sync_all().unwrap();
        fsync_path(&m.mnt);
        for p in 0..256u64 {
            f.write_all_at(&[2u8; 4096], p * 4096).unwrap();
        }
        let report = m.crash(Some(seed));
        assert!(report.contains(&format!("seed={seed}")), "{report}");
        let data = fs::read(m.p("f")).unwrap();
        assert_eq!(data, fs::read(m.b("f")).unwrap());
        data.chunks(4096)
            .map(|c| {
                assert!(c.iter().all(|&b| b == c[0]), "a page is torn inside");
                c[0]
            })
            .collect()
    };
    let a = run(11);
    assert!(
        a.contains(&1) && a.contains(&2),
        "torn keeps some pages, drops others"
    );
    assert_eq!(a, run(11));
    assert_ne!(a, run(12));
}

#[test]
fn unmount_makes_everything_durable() {
    let mut m = Mount::new();
    fs::create_dir_all(m.p("a/b")).unwrap();
    fs::write(m.p("a/b/f"), b"never synced").unwrap();
    std::os::unix::fs::symlink("a/b/f", m.p("link")).unwrap();
    fs::write(m.p("x"), b"1").unwrap();
    fs::rename(m.p("x"), m.p("y")).unwrap();
    let view = tree(&m.mnt);
    m.unmount();
    assert_eq!(tree(&m.backing), view);
    assert!(!m.b(".lazyfs-staging").exists());
}

#[test]
fn sigterm_unmounts_and_keeps_everything() {
    let mut m = Mount::new();
    fs::write(m.p("f"), b"data").unwrap();
    let pid = m.child.as_ref().unwrap().id();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    m.wait_exit();
    assert!(!mounted(&m.mnt));
    assert_eq!(fs::read(m.b("f")).unwrap(), b"data");
}

#[test]
fn bad_commands_are_refused() {
    let m = Mount::new();
    let out = Command::new(BIN)
        .args(["control", m.mnt.to_str().unwrap(), "explode"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown command"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN).args(["crash"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
