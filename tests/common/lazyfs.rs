//! `LazyMount`: a store's directory on `blockrep-lazyfs` (tools/lazyfs), a FUSE filesystem
//! that keeps unsynced data in memory until it is fsynced and drops it on `crash` (a power
//! loss); and the builds of the binaries it needs (`lazyfs_bin`, `cargo_build`).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::fuse::unmount_best_effort;
use super::process::{die_with_test_by, run, run_ok, timed};
use super::wait::poll_until;
use super::{describe, mounted};

/// Runs `cargo build ARGS` (serialized between tests), failing loudly on error.
pub fn cargo_build(args: &[&str], what: &str) {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = run(timed(1500, cargo)
        .args(["build", "--quiet"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    assert!(
        out.status.success(),
        "building {what} failed: {}",
        describe(&out)
    );
    eprintln!("built {what} in {:.1?}", started.elapsed());
}

/// The target directory and profile this test binary was built in (from the path of the
/// `blockrep` binary cargo handed us: TARGET/PROFILE/blockrep).
pub fn own_target() -> (PathBuf, String) {
    let exe = Path::new(env!("CARGO_BIN_EXE_blockrep"));
    let profile_dir = exe.parent().expect("binary directory");
    let profile = profile_dir
        .file_name()
        .expect("profile directory")
        .to_string_lossy()
        .into_owned();
    (
        profile_dir
            .parent()
            .expect("target directory")
            .to_path_buf(),
        profile,
    )
}

/// `blockrep-lazyfs`, built from this checkout into this test binary's target directory.
pub fn lazyfs_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let (target, profile) = own_target();
        let target_s = target.to_string_lossy().into_owned();
        let mut args = vec![
            "-p",
            "blockrep-lazyfs",
            "--bin",
            "blockrep-lazyfs",
            "--target-dir",
            &target_s,
        ];
        match profile.as_str() {
            "debug" => {}
            "release" => args.push("--release"),
            other => panic!("unexpected profile directory {other:?}"),
        }
        cargo_build(&args, "blockrep-lazyfs");
        let bin = target.join(&profile).join("blockrep-lazyfs");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// A running `blockrep-lazyfs BACKING MNT`.
pub struct LazyMount {
    pub backing: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl LazyMount {
    pub fn start(dir: &Path, name: &str) -> LazyMount {
        let backing = dir.join(format!("{name}-backing"));
        let mnt = dir.join(format!("{name}-mnt"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let log = dir.join(format!("{name}-lazyfs.log"));
        let mut cmd = Command::new(lazyfs_bin());
        cmd.arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap());
        die_with_test_by(&mut cmd, libc::SIGTERM);
        let mut child = cmd.spawn().expect("spawn blockrep-lazyfs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(|l| l.ok()));
            for _ in lines {}
        });
        let mut m = LazyMount {
            backing,
            mnt,
            child: Some(child),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(l)) if l.contains("mounted") => {}
            other => panic!(
                "blockrep-lazyfs did not mount ({other:?}); its log:\n{}",
                m.log_text()
            ),
        }
        assert!(mounted(&m.mnt), "{} is not in mountinfo", m.mnt.display());
        m.mnt = m.mnt.canonicalize().unwrap();
        m
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `blockrep-lazyfs crash MNT [--torn --seed N]`; returns its report line.
    pub fn crash(&self, torn: Option<u64>) -> String {
        crash_all(&[self], torn, false).pop().unwrap()
    }

    /// The same with `--when-dirty`: the crash waits until some file has unsynced pages (at
    /// most 10 s), so it meets writes in flight instead of a quiet moment.
    pub fn crash_when_dirty(&self, torn: Option<u64>) -> String {
        crash_all(&[self], torn, true).pop().unwrap()
    }

    /// From now on every fsync waits `ms` first (a slow disk: crashes then often land while
    /// a sync is on its way, its writes already made).
    pub fn set_sync_delay(&self, ms: u64) {
        let out = run_ok(
            timed(30, lazyfs_bin())
                .arg("control")
                .arg(&self.mnt)
                .arg("sync-delay")
                .arg(ms.to_string()),
        );
        assert!(out.contains("sync-delay"), "{out}");
    }

    /// Unmounts (which makes everything durable) and waits for the daemon to exit 0.
    pub fn unmount(&mut self) {
        run_ok(timed(30, "umount").arg(&self.mnt));
        let mut c = self.child.take().expect("running");
        match poll_until(Duration::from_secs(30), || c.try_wait().expect("try_wait")) {
            Some(st) => assert!(
                st.success(),
                "blockrep-lazyfs exited with {st}:\n{}",
                self.log_text()
            ),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "blockrep-lazyfs did not exit after the unmount:\n{}",
                    self.log_text()
                );
            }
        }
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        unmount_best_effort(&self.mnt);
        if let Some(mut c) = self.child.take() {
            let _ = poll_until(Duration::from_secs(10), || {
                (!matches!(c.try_wait(), Ok(None))).then_some(())
            });
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // A killed daemon leaves a dead mount ("transport endpoint is not connected").
        unmount_best_effort(&self.mnt);
    }
}

/// Crashes several mounts one right after the other (the whole rack loses power); returns
/// each report line. Torn seeds are `seed`, `seed+1`, ... per mount.
pub fn crash_all(mounts: &[&LazyMount], torn: Option<u64>, when_dirty: bool) -> Vec<String> {
    let mut cmd = timed(60, lazyfs_bin());
    cmd.arg("crash");
    for m in mounts {
        cmd.arg(&m.mnt);
    }
    if when_dirty {
        cmd.arg("--when-dirty");
    }
    if let Some(seed) = torn {
        cmd.args(["--torn", "--seed", &seed.to_string()]);
    }
    let out = run_ok(&mut cmd);
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), mounts.len(), "crash printed {out:?}");
    for l in &lines {
        assert!(l.contains("crashed generation="), "crash printed {l:?}");
        eprintln!("{l}");
    }
    lines
}
