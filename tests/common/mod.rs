//! Shared harness for the end-to-end tests: real `blockrep` processes on loopback, real
//! third-party clients. A missing client tool is a failure, never a skip: `scripts/test`
//! installs them.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

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

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Creates a store of `size` bytes under `parent` and returns its path.
pub fn create_store(parent: &Path, name: &str, size: u64) -> PathBuf {
    let dir = parent.join(name);
    run_ok(
        blockrep()
            .arg("create")
            .arg(&dir)
            .arg("--size")
            .arg(size.to_string())
            .arg("--wal-size")
            .arg("64MiB"),
    );
    dir
}

/// A `blockrep serve` process.
pub struct Served {
    pub child: Child,
    pub store: PathBuf,
    pub port: u16,
    pub stderr_log: PathBuf,
}

impl Served {
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the process gets no chance to flush or close anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `blockrep serve STORE --nbd 127.0.0.1:PORT [extra...]` and waits until it
/// accepts connections.
pub fn serve(store: &Path, extra: &[&str]) -> Served {
    let port = free_port();
    let stderr_log = store.with_extension(format!("serve-{port}.log"));
    let log = std::fs::File::create(&stderr_log).expect("log file");
    let mut child = blockrep()
        .arg("serve")
        .arg(store)
        .arg("--nbd")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn blockrep serve");
    // The first stdout line says the server is listening.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        for _ in lines {}
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    let served = Served {
        child,
        store: store.to_path_buf(),
        port,
        stderr_log,
    };
    match first {
        Ok(line) if line.contains("serving") => {}
        other => panic!(
            "blockrep serve did not start ({other:?}); its log:\n{}",
            served.log()
        ),
    }
    wait_for_port(port);
    served
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no `rand` crate.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The path of `/usr/bin/python3`, which has the libnbd binding (the pyenv python does not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

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
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Removes ANSI colour sequences (the nodes run with NO_COLOR, this is a second guard).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process killed (SIGKILL, by its pid) if the test ends without reaping it.
pub struct KillOnDrop {
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
    /// Where its stderr goes, if to a file: quoted when it misbehaves.
    pub stderr: Option<PathBuf>,
}

impl KillOnDrop {
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
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
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return (st, false);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return (self.child.wait().expect("wait"), true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
