//! The steps every power-loss test takes (tests/power_loss*.rs): a test directory that can
//! be kept for a failure's logs, the tools checked, `blockrep` nodes started with their logs
//! next to each other, stores created and exported, the write storm run and verified.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::node::{serve_args, Node, Ready};
use super::process::KillOnDrop;
use super::storm;
use super::*;

/// Volumes of the power-loss tests: small, so a storm covers them quickly.
pub const VOLUME: u64 = 32 * MIB;
pub const BLOCK: u64 = 4096;

/// A temporary directory for one test, removed afterwards unless BLOCKREP_KEEP_TEST_DIRS is
/// set (then its path is printed, for looking at the logs of a failure).
pub struct TestDir {
    path: PathBuf,
    _remove: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn test_dir() -> TestDir {
    let dir = tempfile::Builder::new()
        .prefix("power-loss-")
        .tempdir()
        .unwrap();
    if std::env::var_os("BLOCKREP_KEEP_TEST_DIRS").is_some() {
        let path = dir.keep();
        eprintln!("keeping {}", path.display());
        return TestDir {
            path,
            _remove: None,
        };
    }
    TestDir {
        path: dir.path().to_path_buf(),
        _remove: Some(dir),
    }
}

pub fn require_tools() {
    for t in ["timeout", "umount", SYSTEM_PYTHON] {
        require(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: blockrep-lazyfs needs FUSE"
    );
    let out = run(timed(30, SYSTEM_PYTHON).args(["-c", "import nbd"]));
    assert!(
        out.status.success(),
        "{SYSTEM_PYTHON} lacks the libnbd binding (python3-libnbd): {}",
        describe(&out)
    );
}

pub fn real_blockrep() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_blockrep"))
}

/// A `blockrep serve`, `replica` or `up` process of binary `bin`, logging to
/// `LOGDIR/NAME.log` across restarts, ready once its first stdout line contains `ready`.
pub fn launch(
    bin: &Path,
    name: &str,
    logdir: &Path,
    port: u16,
    args: Vec<OsString>,
    ready: &'static str,
) -> Node {
    Node::builder(name, logdir, port, args)
        .bin(bin)
        .log(logdir.join(format!("{name}.log")))
        .ready(Ready::Line(ready))
        .start()
}

pub fn serve_node(bin: &Path, store: &Path, logdir: &Path, name: &str, extra: &[&str]) -> Node {
    let port = free_port();
    launch(
        bin,
        name,
        logdir,
        port,
        serve_args(store, port, extra),
        "serving",
    )
}

pub fn create_store_with(bin: &Path, dir: &Path, size: u64) {
    run_ok(
        timed(120, bin)
            .arg("create")
            .arg(dir)
            .arg("--size")
            .arg(size.to_string())
            .arg("--wal-size")
            .arg("64MiB"),
    );
}

pub fn export(store: &Path, image: &Path) {
    let _ = std::fs::remove_file(image);
    run_ok(
        timed(180, real_blockrep())
            .arg("export")
            .arg(store)
            .arg(image),
    );
}

/// Waits until the storm logged `min_w` writes and `min_f` FLUSHes and ran `min_time`.
pub fn let_storm_run(
    storm: &mut KillOnDrop,
    log: &Path,
    min_w: usize,
    min_f: usize,
    min_time: Duration,
) {
    storm::let_storm_run(
        storm,
        log,
        (min_w, min_f),
        min_time,
        Duration::from_secs(90),
    );
}

/// The storm must end quietly (status 0) once its server is gone.
pub fn storm_ends(storm: &mut KillOnDrop) {
    let st = storm.wait(60);
    assert!(
        st.success(),
        "the storm client should exit quietly when the server dies: {st}\n{}",
        storm.stderr_text()
    );
    eprintln!("{}", storm.stderr_text().trim());
}

/// `write_storm.py verify`: the JSON summary, or the failure output.
pub fn verify(image: &Path, logs: &[PathBuf]) -> Result<serde_json::Value, String> {
    storm::verify(image, logs, &[], 180)
}

pub fn verify_ok(image: &Path, logs: &[PathBuf], what: &str) -> serde_json::Value {
    let summary = verify(image, logs).unwrap_or_else(|e| {
        panic!("{what}: the image breaks the durability contract after a power loss:\n{e}")
    });
    eprintln!("verify {what}: {summary}");
    summary
}
