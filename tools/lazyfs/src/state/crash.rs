//! The simulated power loss and the control file's commands that trigger and observe it.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::base::{State, CONTROL_INO};
use super::inode::{Body, Inode};
use crate::sys;

/// What a crash did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub generation: u64,
    pub torn: bool,
    pub seed: u64,
    /// Dirty files at the crash.
    pub files: usize,
    pub kept_pages: usize,
    pub dropped_pages: usize,
    /// Directory entries whose change had not been made durable.
    pub dropped_names: usize,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "crashed generation={} torn={} seed={} dirty_files={} kept_pages={} dropped_pages={} dropped_names={}",
            self.generation, self.torn, self.seed, self.files, self.kept_pages, self.dropped_pages, self.dropped_names
        )
    }
}

/// splitmix64: small, seedable, good enough to pick pages.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl State {
    /// Counts of what a crash would lose now.
    pub fn stats(&self) -> String {
        let mut files = 0;
        let mut pages = 0;
        let mut memory = 0;
        let mut names = 0;
        for (&ino, i) in &self.inodes {
            match &i.body {
                Body::File(f) if f.ov.is_dirty() => {
                    files += 1;
                    pages += f.ov.dirty_pages();
                    memory += f.ov.memory();
                }
                Body::Dir(d) if d.loaded => names += self.pending_names(ino).len(),
                _ => {}
            }
        }
        format!(
            "generation={} inodes={} handles={} dirty_files={files} dirty_pages={pages} dirty_bytes={memory} pending_names={names}",
            self.generation,
            self.inodes.len(),
            self.handles.len()
        )
    }

    /// Simulated power loss. `torn`: a seed; each dirty page of each file then reaches
    /// BACKING_DIR with probability 1/2 (in no particular order: the result is the same).
    pub fn crash(&mut self, torn: Option<u64>) -> io::Result<CrashReport> {
        let mut report = CrashReport {
            torn: torn.is_some(),
            seed: torn.unwrap_or(0),
            ..Default::default()
        };
        let mut rng = SplitMix(torn.unwrap_or(0));
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let pending = self.pending_names(ino).len();
            report.dropped_names += pending;
            let Some(Inode {
                body: Body::File(f),
                ..
            }) = self.inodes.get(&ino)
            else {
                continue;
            };
            if !f.ov.is_dirty() {
                continue;
            }
            report.files += 1;
            if torn.is_some() {
                let (plan, kept, dropped) = f.ov.torn_plan(|_| rng.next_u64() & 1 == 0);
                Self::run_actions(&f.fd, &plan)?;
                report.kept_pages += kept;
                report.dropped_pages += dropped;
            } else {
                report.dropped_pages += f.ov.dirty_pages();
            }
        }
        // Everything in memory goes; so does whatever only the staging directory held.
        self.inodes.clear();
        self.handles.retain(|_, h| h.ino == CONTROL_INO);
        self.generation += 1;
        report.generation = self.generation;
        self.staging_fd = Self::fresh_staging(&self.backing)?;
        let st = sys::fstat(&self.root_fd)?;
        self.insert_root(&st)?;
        Ok(report)
    }

    /// A command written to the control file. Returns the response line.
    pub(super) fn control(&mut self, data: &[u8]) -> Result<String, String> {
        let text = String::from_utf8_lossy(data);
        let mut words = text.split_whitespace();
        match words.next() {
            Some("crash") => {
                let mut torn = false;
                let mut seed = None;
                for w in words {
                    if w == "when-dirty" {
                        // Handled by the caller (it waits for dirty pages first).
                    } else if w == "torn" {
                        torn = true;
                    } else if let Some(s) = w.strip_prefix("seed=") {
                        seed = Some(s.parse::<u64>().map_err(|_| format!("bad seed {s:?}"))?);
                    } else {
                        return Err(format!("unknown crash option {w:?}"));
                    }
                }
                let seed = seed.unwrap_or_else(|| {
                    let t = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    t.as_nanos() as u64 ^ u64::from(std::process::id())
                });
                self.crash(torn.then_some(seed))
                    .map(|r| r.to_string())
                    .map_err(|e| format!("crash failed: {e}"))
            }
            Some("stats") => Ok(self.stats()),
            Some("sync-delay") => {
                let ms = words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .ok_or("sync-delay needs milliseconds")?;
                self.sync_delay = Duration::from_millis(ms);
                Ok(format!("sync-delay {ms} ms"))
            }
            Some("sync") => self
                .sync_all()
                .map(|_| "synced".to_string())
                .map_err(|e| format!("sync failed: {}", io::Error::from_raw_os_error(e))),
            other => Err(format!(
                "unknown command {other:?} (crash [torn] [seed=N], stats, sync)"
            )),
        }
    }
}
