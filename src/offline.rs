//! Commands that work on a store without serving it: inspect and export.

use std::path::Path;

use anyhow::{bail, Context, Result};
use blockrep_storage::{IoMode, OpenOptions, StorageError, Store};

use crate::support::{human, runtime};

#[derive(serde::Serialize)]
struct Inspection {
    dir: String,
    volume_id: String,
    size: u64,
    block_size: u32,
    epoch: u64,
    checkpoint_lsn: u64,
    /// The newest entry the data file may hold (raised before a checkpoint writes a block).
    data_through: u64,
    clean: bool,
    in_use: bool,
    wal_capacity: u64,
    /// Known only when the store is not in use (it needs a WAL replay).
    wal_used: Option<u64>,
    head_lsn: Option<u64>,
    wal_entries: Option<u64>,
}

pub fn inspect(dir: &Path, json: bool) -> Result<()> {
    let sb = Store::read_superblock(dir)?;
    let opened = Store::open(
        dir,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    );
    let (in_use, live) = match opened {
        Ok(store) => (false, Some(store)),
        Err(StorageError::Locked(_)) => (true, None),
        Err(e) => return Err(e.into()),
    };
    let r = Inspection {
        dir: dir.display().to_string(),
        volume_id: sb.volume_id.to_string(),
        size: sb.volume_size,
        block_size: sb.block_size,
        epoch: sb.epoch.0,
        checkpoint_lsn: sb.checkpoint_lsn.0,
        data_through: sb.data_through.0,
        clean: sb.is_clean(),
        in_use,
        wal_capacity: sb.wal_capacity,
        wal_used: live.as_ref().map(|s| s.info().wal_used),
        head_lsn: live.as_ref().map(|s| s.info().next_lsn.prev().0),
        wal_entries: live.as_ref().map(|s| s.replay_outcome().entries),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("store          {}", r.dir);
    println!("volume         {}", r.volume_id);
    println!("size           {} ({} bytes)", human(r.size), r.size);
    println!("block size     {}", r.block_size);
    println!("epoch          {}", r.epoch);
    println!("checkpoint LSN {}", r.checkpoint_lsn);
    println!("data through   {}", r.data_through);
    match (r.head_lsn, r.wal_used, r.wal_entries) {
        (Some(head), Some(used), Some(entries)) => {
            println!("head LSN       {head}");
            println!(
                "WAL            {} of {} used ({entries} entries, {} past the checkpoint)",
                human(used),
                human(r.wal_capacity),
                head.saturating_sub(r.checkpoint_lsn)
            );
        }
        _ => println!(
            "WAL            {} (in use by a running server; head LSN unknown)",
            human(r.wal_capacity)
        ),
    }
    println!(
        "state          {}",
        match (r.in_use, r.clean) {
            (true, _) => "open by another process",
            (false, true) => "closed cleanly",
            (false, false) => "not closed cleanly (WAL replayed on open)",
        }
    );
    Ok(())
}

pub fn export(dir: &Path, file: &Path, io_mode: IoMode) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let store = Store::open(
        dir,
        &OpenOptions {
            io_mode,
            read_only: true,
            ..OpenOptions::default()
        },
    )?;
    let size = store.size();
    let mut out = std::fs::File::create(file).with_context(|| format!("{}", file.display()))?;
    let rt = runtime()?;
    const CHUNK: u64 = 4 << 20;
    let mut at = 0;
    while at < size {
        let n = CHUNK.min(size - at);
        let data = rt.block_on(store.read_contiguous(at, n))?;
        if data.iter().all(|&b| b == 0) {
            // Keep the image sparse.
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&data)
                .with_context(|| format!("{}", file.display()))?;
        }
        at += n;
    }
    out.set_len(size)?;
    out.sync_all()?;
    if at != size {
        bail!("short export");
    }
    println!(
        "exported {} ({}) to {}",
        dir.display(),
        human(size),
        file.display()
    );
    Ok(())
}
