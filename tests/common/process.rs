//! Starting and reaping child processes: the `blockrep` binary, one-shot commands under
//! `timeout`, and `KillOnDrop`, the guard that makes sure no child outlives its test.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::wait::poll_until;

/// The `blockrep` binary built for this test run.
pub fn blockrep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
}

/// Runs a command to completion, capturing output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails loudly if a client tool is not installed.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run ./scripts/test (it installs every tool the tests use)"
    );
}

/// `timeout -k 5 SECS PROG`: the command is killed if it takes longer.
pub fn timed(secs: u64, prog: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("timeout");
    c.arg("-k").arg("5").arg(secs.to_string()).arg(prog);
    c
}

pub fn blockrep_timed(secs: u64) -> Command {
    timed(secs, env!("CARGO_BIN_EXE_blockrep"))
}

/// The child gets SIGKILL when the thread that spawned it (the test's thread) ends, even if
/// the test binary itself is killed and no destructor runs.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    die_with_test_by(cmd, libc::SIGKILL)
}

/// As `die_with_test`, with `sig` instead of SIGKILL (SIGTERM lets a FUSE daemon unmount).
pub fn die_with_test_by(cmd: &mut Command, sig: i32) -> &mut Command {
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// kill(2) on a pid this test started (or a child of one).
pub fn signal_pid(pid: i32, sig: i32) {
    // SAFETY: plain kill(2); the callers only name processes of their own.
    unsafe { libc::kill(pid, sig) };
}

/// A child process killed (SIGKILL) if the test ends without reaping it. Spawned with
/// `spawn_group` it leads a process group of its own, and the whole group is killed as soon
/// as the leader is seen to exit (before it is reaped), so nothing it started outlives it.
pub struct KillOnDrop {
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
    /// Where its stderr goes, if to a file: quoted when it misbehaves.
    pub stderr: Option<PathBuf>,
    group: bool,
    /// Set once reaped: from then on the pid (and the group id) are not ours any more.
    status: Option<ExitStatus>,
}

impl KillOnDrop {
    /// Guards a child already spawned.
    pub fn new(child: Child, what: &str, stderr: Option<PathBuf>) -> KillOnDrop {
        KillOnDrop {
            child,
            what: what.to_string(),
            stderr,
            group: false,
            status: None,
        }
    }

    /// Spawns `cmd` with stderr to `stderr` (stdout next to it), dying with the test.
    pub fn spawn(cmd: &mut Command, what: &str, stderr: PathBuf) -> KillOnDrop {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"));
        die_with_test(cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        KillOnDrop::new(child, what, Some(stderr))
    }

    /// As `spawn`, but the child leads a process group of its own, killed as a whole, and its
    /// stdout is kept in a `.stdout` file next to `stderr`.
    pub fn spawn_group(cmd: &mut Command, what: &str, stderr: PathBuf) -> KillOnDrop {
        cmd.stdin(Stdio::null())
            .stdout(File::create(stderr.with_extension("stdout")).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .process_group(0);
        die_with_test(cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let mut k = KillOnDrop::new(child, what, Some(stderr));
        k.group = true;
        k
    }

    /// SIGKILL to the group; only while the leader is unreaped (a zombie still holds the id).
    fn kill_group(&self) {
        if self.group && self.status.is_none() {
            signal_pid(-(self.child.id() as i32), libc::SIGKILL);
        }
    }

    /// Whether the leader has exited, without reaping it (waitid with WNOWAIT).
    fn exited(&self) -> bool {
        // SAFETY: waitid(2) on our own child with WNOHANG | WNOWAIT only looks; `info` is a
        // zeroed out-parameter of the right type.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() != 0
        }
    }

    /// The exit status if it has exited (then its group is killed and it is reaped).
    pub fn try_reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() && self.exited() {
            self.kill_group();
            self.status = Some(self.child.wait().expect("wait"));
        }
        self.status
    }

    pub fn running(&mut self) -> bool {
        self.try_reap().is_none()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn signal(&mut self, sig: i32) {
        if self.running() {
            signal_pid(self.child.id() as i32, sig);
        }
    }

    /// Waits for the exit status; kills the process and fails if it takes longer than `secs`.
    pub fn wait(&mut self, secs: u64) -> ExitStatus {
        let (status, killed) = self.finish(secs);
        assert!(
            !killed,
            "{} did not exit within {secs}s; its stderr:\n{}",
            self.what,
            self.stderr_text()
        );
        status
    }

    /// Waits up to `secs` for the process to exit by itself, then SIGKILLs it. Returns the
    /// exit status and whether it had to be killed.
    pub fn finish(&mut self, secs: u64) -> (ExitStatus, bool) {
        let exited = poll_until(Duration::from_secs(secs), || self.try_reap());
        match exited {
            Some(st) => (st, false),
            None => {
                self.kill9();
                (self.status.expect("reaped"), true)
            }
        }
    }

    /// SIGKILL (to its whole process group if it leads one), then reaps it.
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            if self.group {
                self.kill_group();
            } else {
                let _ = self.child.kill();
            }
            self.status = Some(self.child.wait().expect("wait"));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.status.is_none() {
            if self.group {
                self.kill_group();
            } else if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}
