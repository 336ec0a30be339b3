//! Shared harness for the end-to-end tests: real `blockrep` processes on loopback, real
//! third-party clients. A missing client tool is a failure, never a skip: `scripts/test`
//! installs them.
//!
//! One room per concern: `process` (commands, `KillOnDrop`, `die_with_test`), `wait` (the
//! one `wait_until`), `node` (a `blockrep` process with its ports and log), `fuse`
//! (`FuseMount`), `files` (files to copy onto ext4, their checksums, `e2fsck`), `lazyfs` (`LazyMount`, a filesystem that can lose power), `power` (the steps of a power-loss test), `storm` (the write storm and its verifier), `client` (a libnbd `Client`),
//! `admin` (HTTP, /metrics and /v1/status of a node's admin endpoint), `etcd` (a real etcd
//! server or cluster on loopback), `relay` (a TCP relay a test can cut), `led` (an etcd-led
//! volume of `blockrep node` processes and the writer that follows its primary), `postgres`
//! (PostgreSQL on ext4 on a volume, its insert client and the checks after a failover),
//! `tmpfs` (a size-limited tmpfs to fill, and a ballast file to free room with).
#![allow(dead_code)]

pub mod admin;
pub mod certtool;
pub mod client;
pub mod etcd;
pub mod files;
pub mod fuse;
pub mod lazyfs;
pub mod led;
pub mod node;
pub mod postgres;
pub mod power;
pub mod process;
pub mod relay;
pub mod storm;
pub mod tmpfs;
pub mod wait;

#[allow(unused_imports)]
pub use client::{Client, Data};
#[allow(unused_imports)]
pub use etcd::{EtcdCluster, EtcdServer};
#[allow(unused_imports)]
pub use fuse::FuseMount;
#[allow(unused_imports)]
pub use node::{serve, Node, Ready, Served};
#[allow(unused_imports)]
pub use process::{
    blockrep, blockrep_timed, die_with_test, die_with_test_by, require, run, run_ok, signal_pid,
    timed, KillOnDrop,
};
#[allow(unused_imports)]
pub use relay::Relay;
#[allow(unused_imports)]
pub use wait::{poll_until, wait_until};

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

/// The path of `/usr/bin/python3`, which has the libnbd binding (the pyenv python does not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Fails loudly unless the system Python has the libnbd binding (and `timeout` is there).
pub fn require_python_nbd() {
    require(SYSTEM_PYTHON);
    require("timeout");
    let out = run(timed(30, SYSTEM_PYTHON).args(["-c", "import nbd"]));
    assert!(
        out.status.success(),
        "{SYSTEM_PYTHON} lacks the libnbd binding (python3-libnbd): {}",
        text(&out.stderr)
    );
}

/// A port nobody listens on right now, and never handed out before in this test process:
/// a test that picks several ports before anything binds them (a volume's nodes) must not
/// get the same one twice (the kernel may return a just-released port again, and then one
/// node's replication dials another's NBD port).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn wait_for_port(port: u16) {
    wait_until(
        Duration::from_secs(30),
        format_args!("nothing listens on port {port}"),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
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

/// `blockrep create PARENT/NAME --size SIZE --wal-size 64MiB` (SIZE as the CLI takes it).
pub fn create_store_sized(parent: &Path, name: &str, size: &str) -> PathBuf {
    let dir = parent.join(name);
    run_ok(blockrep_timed(60).arg("create").arg(&dir).args([
        "--size",
        size,
        "--wal-size",
        "64MiB",
    ]));
    dir
}

/// A path in this checkout.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A file's text; panics naming it if it cannot be read.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The NBD greeting ("NBDMAGIC") on `port`, read from a fresh connection.
pub fn nbd_greeting(port: u16) -> Result<String, String> {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("read timeout: {e}"))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&magic).into_owned())
}

/// `blockrep inspect STORE --json`.
pub fn inspect_json(store: &Path) -> serde_json::Value {
    let out = run_ok(blockrep_timed(60).arg("inspect").arg(store).arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect --json printed {out:?}: {e}"))
}

/// The volume id `blockrep inspect` prints for `store`, as the wire carries it.
pub fn volume_id(store: &Path) -> blockrep_storage::VolumeId {
    let id = inspect_json(store)["volume_id"]
        .as_str()
        .expect("inspect prints the volume id")
        .replace('-', "");
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&id[2 * i..2 * i + 2], 16).expect("a hex volume id");
    }
    blockrep_storage::VolumeId(bytes)
}

/// Whether `path` is a mount point (in this process's mountinfo).
pub fn mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*want))
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

/// Where `got` first differs from `want`: the first unequal byte, or the shorter length when
/// one is a prefix of the other; `None` when they are equal.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    Some(
        got.iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len())),
    )
}

/// Panics unless `got`, read back from offset `off`, is the `want` written there; the
/// message says where they first differ and whether the range reads as all zero (the write
/// never arrived) or as other data.
pub fn assert_range_holds(got: &[u8], off: u64, want: &[u8], what: &str) {
    if let Some(first) = first_difference(got, want) {
        let zero = got.iter().all(|&b| b == 0);
        panic!(
            "{what}: the {} bytes written at {off} are not there (first difference at byte {}; \
             the range is {})",
            want.len(),
            off + first as u64,
            if zero { "all zero" } else { "other data" }
        );
    }
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

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
