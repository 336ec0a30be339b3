//! The write storm (tests/clients/write_storm.py): spawning it, watching its log, and its
//! verifier, which checks an image against the storm logs' durability contract.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{run, timed, KillOnDrop};
use super::wait::wait_until;
use super::{describe, text, SYSTEM_PYTHON};

pub const STORM_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/write_storm.py");
pub const PACED_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/paced_storm.py");
/// Blocks of 4 KiB the storm writes to (8 MiB); the rest of the volume must stay zero.
pub const REGION_BLOCKS: u64 = 2048;

/// How to start a write storm: `Storm::new(uri, log)`, options, then `spawn`.
pub struct Storm {
    uri: String,
    log: PathBuf,
    seq_base: u64,
    flush_every: u32,
    dir: Option<PathBuf>,
    rate: Option<u32>,
    large: Option<(u32, u32)>,
}

impl Storm {
    /// A storm on `uri` logging its acknowledged writes and FLUSHes to `log` (its stderr
    /// goes next to it); sequence base and seed 0, a FLUSH every 16 writes.
    pub fn new(uri: &str, log: &Path) -> Storm {
        Storm {
            uri: uri.to_string(),
            log: log.to_path_buf(),
            seq_base: 0,
            flush_every: 16,
            dir: None,
            rate: None,
            large: None,
        }
    }

    /// Sequence numbers start here; the seed is the same number.
    pub fn seq_base(mut self, seq_base: u64) -> Self {
        self.seq_base = seq_base;
        self
    }

    /// A FLUSH every `n` writes (0: never).
    pub fn flush_every(mut self, n: u32) -> Self {
        self.flush_every = n;
        self
    }

    /// Every `every`-th write is one request over `blocks` contiguous blocks (large enough,
    /// at 80 blocks, for the store to place it in its data file rather than log it).
    pub fn large_every(mut self, every: u32, blocks: u32) -> Self {
        self.large = Some((every, blocks));
        self
    }

    /// The storm's working directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Paced to `rate` writes per second (tests/clients/paced_storm.py), in a process group
    /// of its own that dies as a whole.
    pub fn paced(mut self, rate: u32) -> Self {
        self.rate = Some(rate);
        self
    }

    pub fn spawn(self) -> KillOnDrop {
        let mut cmd = Command::new(SYSTEM_PYTHON);
        if let Some(rate) = self.rate {
            cmd.arg(PACED_PY).arg("--rate").arg(rate.to_string());
        } else {
            cmd.arg(STORM_PY);
        }
        cmd.arg("storm")
            .arg(&self.uri)
            .arg(&self.log)
            .arg("--blocks")
            .arg(REGION_BLOCKS.to_string())
            .arg("--seq-base")
            .arg(self.seq_base.to_string())
            .arg("--seed")
            .arg(self.seq_base.to_string())
            .arg("--flush-every")
            .arg(self.flush_every.to_string());
        if let Some((every, blocks)) = self.large {
            cmd.arg("--large-every")
                .arg(every.to_string())
                .arg("--large-blocks")
                .arg(blocks.to_string());
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        let stderr = self.log.with_extension("stderr");
        if self.rate.is_some() {
            KillOnDrop::spawn_group(&mut cmd, "the write storm", stderr)
        } else {
            KillOnDrop::spawn(&mut cmd, "the write storm", stderr)
        }
    }
}

/// (W, F) lines of a storm log: acknowledged writes and FLUSHes.
pub fn log_counts(log: &Path) -> (usize, usize) {
    let Ok(t) = std::fs::read_to_string(log) else {
        return (0, 0);
    };
    (
        t.lines().filter(|l| l.starts_with("W ")).count(),
        t.lines().filter(|l| l.starts_with("F ")).count(),
    )
}

/// Waits until the storm has logged `min_w` acknowledged writes and `min_f` acknowledged
/// FLUSHes and has run for at least `min_time`; it must still be running then. Fails if that
/// takes longer than `within`.
pub fn let_storm_run(
    storm: &mut KillOnDrop,
    log: &Path,
    (min_w, min_f): (usize, usize),
    min_time: Duration,
    within: Duration,
) {
    let started = Instant::now();
    wait_until(within, "the write storm made too little progress", || {
        assert!(
            storm.running(),
            "the write storm stopped early; its stderr:\n{}",
            storm.stderr_text()
        );
        let (w, f) = log_counts(log);
        if w >= min_w && f >= min_f && started.elapsed() >= min_time {
            Ok(())
        } else {
            Err(format!("{w} writes, {f} flushes acknowledged"))
        }
    });
}

/// `write_storm.py verify IMAGE LOGS... [extra]`: its JSON summary, or the failure output.
pub fn verify(
    image: &Path,
    logs: &[PathBuf],
    extra: &[&str],
    secs: u64,
) -> Result<serde_json::Value, String> {
    let out = run(timed(secs, SYSTEM_PYTHON)
        .arg(STORM_PY)
        .arg("verify")
        .arg(image)
        .args(logs)
        .arg("--blocks")
        .arg(REGION_BLOCKS.to_string())
        .args(extra));
    if out.status.code() == Some(0) {
        let s = text(&out.stdout);
        Ok(serde_json::from_str(&s).unwrap_or_else(|e| panic!("verify printed {s:?}: {e}")))
    } else {
        Err(describe(&out))
    }
}

/// `write_storm.py compare URI IMAGE`: whether the server serves exactly the image; the
/// failure output if not.
pub fn compare_over_nbd(uri: &str, image: &Path, secs: u64) -> Result<(), String> {
    let out = run(timed(secs, SYSTEM_PYTHON)
        .arg(STORM_PY)
        .arg("compare")
        .arg(uri)
        .arg(image));
    if out.status.success() {
        Ok(())
    } else {
        Err(describe(&out))
    }
}
