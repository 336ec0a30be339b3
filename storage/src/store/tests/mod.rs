//! The store's tests, split like the store by who calls it; the helpers they share are here.

use std::sync::Arc;

use super::files::{DATA, SUPERBLOCK, WAL};
use super::*;
use crate::superblock::Role;
use crate::wal::{self, record::RecordKind};
use crate::WalRecord;

mod data_path;
mod invariants;
mod lifecycle;
mod primary;
mod replica;

const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

fn create(dir: &Path, size: u64, wal: u64) -> PathBuf {
    let path = dir.join("vol");
    Store::create(
        &path,
        &CreateOptions {
            size,
            wal_capacity: wal,
            volume_id: None,
        },
    )
    .unwrap();
    path
}

fn open(path: &Path) -> Store {
    Store::open(path, &OpenOptions::default()).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// Reads `[offset, offset+len)` of a store's data file directly (what a primary streams as its
/// base image).
fn data_file(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path.join(DATA)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// A store whose flusher never runs on its own (checkpoints happen only when a test asks).
fn open_without_flusher(path: &Path) -> Store {
    Store::open(
        path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        },
    )
    .unwrap()
}
