//! `Client`: one libnbd connection (tests/clients/repl_ops.py) driven a command at a time,
//! and `Data`, the files of known bytes it writes from and checks against.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use serde_json::Value;

use super::process::die_with_test;
use super::wait::poll_until;
use super::{random_bytes, SYSTEM_PYTHON};

pub const OPS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/repl_ops.py");

/// A file of deterministic random bytes the clients write from and the checks compare with.
pub struct Data {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// `DIR/NAME.bin` holding `len` bytes from `seed`.
pub fn data(dir: &Path, name: &str, seed: u64, len: usize) -> Data {
    let path = dir.join(format!("{name}.bin"));
    let bytes = random_bytes(seed, len);
    std::fs::write(&path, &bytes).expect("write the data file");
    Data { path, bytes }
}

pub fn assert_ok(v: &Value, what: &str) {
    assert_eq!(v["ok"], true, "{what}: expected success, got {v}");
}

pub fn assert_eio(v: &Value, what: &str) {
    assert_eq!(v["ok"], false, "{what}: expected EIO, got success: {v}");
    assert_eq!(v["errno"], "EIO", "{what}: expected EIO: {v}");
}

/// One libnbd connection, a command on stdin and a JSON answer on stdout at a time.
pub struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
    stderr: PathBuf,
    pub what: String,
    answer_within: Duration,
}

impl Client {
    /// Connects to `uri`; every answer must come within 60 s.
    pub fn connect(uri: &str, dir: &Path, name: &str) -> Client {
        Client::connect_within(uri, dir, name, 60)
    }

    /// Connects to `uri`; every answer must come within `secs`.
    pub fn connect_within(uri: &str, dir: &Path, name: &str, secs: u64) -> Client {
        let stderr = dir.join(format!("client-{name}.stderr"));
        let mut cmd = Command::new(SYSTEM_PYTHON);
        cmd.arg(OPS_PY)
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("client stderr"));
        die_with_test(&mut cmd);
        let mut child = cmd.spawn().expect("spawn repl_ops.py");
        let stdout = child.stdout.take().expect("client stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = Client {
            stdin: child.stdin.take(),
            child,
            rx,
            stderr,
            what: format!("client {name} of {uri}"),
            answer_within: Duration::from_secs(secs),
        };
        let hello = c.answer("connect");
        assert_eq!(hello["ok"], true, "{}: {hello}", c.what);
        c
    }

    fn answer(&mut self, cmd: &str) -> Value {
        match self.rx.recv_timeout(self.answer_within) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: {cmd}: bad answer {line:?}: {e}", self.what)),
            Err(e) => {
                let _ = self.child.kill();
                panic!(
                    "{}: no answer to {cmd:?} ({e}); stderr:\n{}",
                    self.what,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                )
            }
        }
    }

    /// Sends one command and returns its answer.
    pub fn op(&mut self, cmd: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("client stdin");
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {cmd:?}: {e}", self.what));
        let v = self.answer(cmd);
        eprintln!("{}: {cmd} -> {v}", self.what);
        v
    }

    pub fn write(&mut self, off: u64, d: &Data) -> Value {
        self.op(&format!("write {off} {}", d.path.display()))
    }

    pub fn write_fua(&mut self, off: u64, d: &Data) -> Value {
        self.op(&format!("write {off} {} fua", d.path.display()))
    }

    pub fn flush(&mut self) -> Value {
        self.op("flush")
    }

    pub fn check(&mut self, off: u64, d: &Data) -> Value {
        self.op(&format!("check {off} {}", d.path.display()))
    }

    /// A WRITE that must succeed.
    pub fn write_ok(&mut self, off: u64, d: &Data) {
        let v = self.write(off, d);
        assert_eq!(v["ok"], true, "{}: write at {off}: {v}", self.what);
    }

    pub fn check_equal(&mut self, off: u64, d: &Data, what: &str) {
        let v = self.check(off, d);
        assert_ok(&v, what);
        assert_eq!(v["equal"], true, "{what}: reading back {off}: {v}");
    }

    pub fn check_zero(&mut self, off: u64, d: &Data, what: &str) {
        let v = self.check(off, d);
        assert_ok(&v, what);
        assert_eq!(
            v["zero"], true,
            "{what}: reading {off} should give zeroes: {v}"
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "quit");
        }
        let _ = poll_until(Duration::from_secs(10), || {
            (!matches!(self.child.try_wait(), Ok(None))).then_some(())
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
