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
mod placement;
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

/// Writes 64 entries of 8191 blocks in all, 32 MiB of payload and headers (62 of a block,
/// one of 16 MiB and one of the rest, from `data`): the head of a fresh store with the
/// smallest WAL, or of any store that copies these entries, then stands exactly half-way
/// round, where one entry of 32 MiB would need the 32 MiB left of the lap and its own
/// 32 MiB and 64 bytes.
async fn write_to_half_way(store: &Store, data: &[u8]) {
    for i in 0..62u64 {
        store
            .write(i * 4096, &pattern(1, 4096), false)
            .await
            .unwrap();
    }
    store.write(MIB, &data[..16 << 20], false).await.unwrap();
    let rest = (8191 - 62 - 4096) * 4096;
    store.write(17 * MIB, &data[..rest], false).await.unwrap();
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

/// A store that logs every write with its data, however large (tests of the ring itself).
fn open_logging_every_write(path: &Path) -> Store {
    Store::open(
        path,
        &OpenOptions {
            place_large_writes: false,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// A store that logs every write with its data and whose flusher never runs on its own.
fn open_logging_without_flusher(path: &Path) -> Store {
    Store::open(
        path,
        &OpenOptions {
            flush_interval: Duration::from_secs(3600),
            place_large_writes: false,
            ..OpenOptions::default()
        },
    )
    .unwrap()
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
