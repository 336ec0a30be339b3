//! `FuseMount`: nbdfuse exposing an NBD export as a file, optionally with ext4 loop-mounted
//! on it, torn down by Drop without ever hanging on a dead device.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{die_with_test, run_ok, timed};
use super::wait::{poll_until, wait_until};
use super::{mounted, text};

/// How Drop unmounts what is still mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// `umount` with a timeout, then `umount -l` if that failed.
    PlainThenLazy,
    /// `umount -l` at once: for a device whose server is known to be gone, where a plain
    /// unmount would only wait out its timeout.
    Lazy,
}

/// nbdfuse exposing an NBD export as `DIR/NAME-fuse/nbd`, with ext4 loop-mounted on
/// `DIR/NAME-mnt` on request. Drop unmounts both and kills nbdfuse, with timeouts throughout.
pub struct FuseMount {
    pub fm: PathBuf,
    pub mnt: PathBuf,
    nbdfuse: Option<Child>,
    log: PathBuf,
    loop_mounted: bool,
    teardown: Teardown,
}

impl FuseMount {
    /// Starts nbdfuse on `uri` and waits until its mount is up.
    pub fn start(uri: &str, dir: &Path, name: &str) -> FuseMount {
        let fm = dir.join(format!("{name}-fuse"));
        let mnt = dir.join(format!("{name}-mnt"));
        std::fs::create_dir_all(&fm).expect("fuse mountpoint");
        std::fs::create_dir_all(&mnt).expect("ext4 mountpoint");
        let pidfile = dir.join(format!("{name}-nbdfuse.pid"));
        let log = dir.join(format!("{name}-nbdfuse.log"));
        let logf = File::create(&log).expect("nbdfuse log");
        let mut cmd = Command::new("nbdfuse");
        cmd.arg("-P")
            .arg(&pidfile)
            .arg(&fm)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("nbdfuse log"))
            .stderr(logf)
            .process_group(0);
        die_with_test(&mut cmd);
        let child = cmd.spawn().expect("spawn nbdfuse");
        let mut m = FuseMount {
            fm,
            mnt,
            nbdfuse: Some(child),
            log,
            loop_mounted: false,
            teardown: Teardown::PlainThenLazy,
        };
        let (log, fm) = (m.log.clone(), m.fm.clone());
        let nbdfuse = &mut m.nbdfuse;
        wait_until(
            Duration::from_secs(30),
            format_args!("nbdfuse not ready in 30s:\n{}", LogOf(&log)),
            || {
                if let Some(st) = nbdfuse
                    .as_mut()
                    .and_then(|c| c.try_wait().expect("try_wait"))
                {
                    panic!("nbdfuse exited with {st}:\n{}", LogOf(&log));
                }
                let ready = std::fs::read_to_string(&pidfile).is_ok_and(|s| !s.trim().is_empty());
                ready && mounted(&fm)
            },
        );
        m
    }

    /// How Drop unmounts (default `Teardown::PlainThenLazy`).
    pub fn with_teardown(mut self, teardown: Teardown) -> Self {
        self.teardown = teardown;
        self
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The export as a file.
    pub fn dev(&self) -> PathBuf {
        self.fm.join("nbd")
    }

    pub fn mount_loop(&mut self) {
        run_ok(
            timed(60, "mount")
                .args(["-o", "loop"])
                .arg(self.dev())
                .arg(&self.mnt),
        );
        self.loop_mounted = true;
    }

    pub fn unmount_loop(&mut self) {
        run_ok(timed(60, "umount").arg(&self.mnt));
        self.loop_mounted = false;
    }

    /// Unmounts the FUSE mount; nbdfuse then disconnects and exits.
    pub fn unmount_fuse(&mut self) {
        assert!(!self.loop_mounted);
        run_ok(timed(30, "umount").arg(&self.fm));
        if let Some(mut c) = self.nbdfuse.take() {
            let exited = poll_until(Duration::from_secs(30), || c.try_wait().expect("try_wait"));
            if exited.is_none() {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "nbdfuse did not exit after its unmount:\n{}",
                    self.log_text()
                );
            }
        }
    }

    fn unmount(&self, p: &Path) {
        match self.teardown {
            Teardown::PlainThenLazy => {
                unmount_best_effort(p);
            }
            Teardown::Lazy => {
                if mounted(p) {
                    lazy_unmount(p);
                }
            }
        }
    }

    /// `mount -o loop` sets autoclear; this detaches anything still backed by our FUSE file.
    /// (losetup -l reads sysfs, it does not touch the backing file.)
    fn detach_loops(&self) {
        let Ok(out) = Command::new("timeout")
            .args([
                "-k",
                "5",
                "20",
                "losetup",
                "-l",
                "-n",
                "-O",
                "NAME,BACK-FILE",
            ])
            .output()
        else {
            return;
        };
        let dev = self.dev();
        let dev = dev.to_string_lossy();
        for line in text(&out.stdout).lines() {
            let mut f = line.split_whitespace();
            if let (Some(name), Some(back)) = (f.next(), f.next()) {
                if back == dev {
                    let _ = Command::new("timeout")
                        .args(["-k", "5", "20", "losetup", "-d", name])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }

    /// Best-effort teardown that cannot hang: the ext4 mount, loop devices on our FUSE file,
    /// the FUSE mount, then nbdfuse (killed if it does not exit within 5 s).
    pub fn teardown(&mut self) {
        self.unmount(&self.mnt);
        self.loop_mounted = false;
        self.detach_loops();
        self.unmount(&self.fm);
        if let Some(mut c) = self.nbdfuse.take() {
            let exited = poll_until(Duration::from_secs(5), || {
                (!matches!(c.try_wait(), Ok(None))).then_some(())
            });
            if exited.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `umount P` with a timeout, then `umount -l P` if that failed. True if P is unmounted.
pub fn unmount_best_effort(p: &Path) -> bool {
    if !mounted(p) {
        return true;
    }
    let ok = Command::new("timeout")
        .args(["-k", "5", "20", "umount"])
        .arg(p)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        lazy_unmount(p);
    }
    !mounted(p)
}

fn lazy_unmount(p: &Path) {
    let _ = Command::new("timeout")
        .args(["-k", "5", "20", "umount", "-l"])
        .arg(p)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A log file's text, read only when a failed wait renders it.
struct LogOf<'a>(&'a Path);

impl std::fmt::Display for LogOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&std::fs::read_to_string(self.0).unwrap_or_default())
    }
}
