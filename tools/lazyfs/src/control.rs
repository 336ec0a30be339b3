//! The control file: `MOUNTPOINT/.lazyfs-control`, served by the filesystem itself (hidden
//! from directory listings). Write one command to it, then read the response from the same
//! open file:
//!
//! ```text
//! crash [torn] [seed=N] [when-dirty]
//!                         simulated power loss; the response says what was dropped and kept;
//!                         `when-dirty` first waits (up to 10 s) until some file has unsynced
//!                         pages, then crashes at once: the loss then always meets writes
//!                         in flight
//! stats                   what a crash would lose now
//! sync                    make everything durable (as a clean unmount does)
//! sync-delay MS           from now on every fsync first waits MS milliseconds (a slow disk:
//!                         crashes then often land while a sync is on its way)
//! ```
//!
//! The write returns only when the command is done, so the crash happens at one instant
//! between two filesystem operations. A failed command fails the write with EINVAL and the
//! response starts with `error:`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

pub use crate::state::CONTROL_NAME;

/// Sends `command` to the lazyfs mounted at `mountpoint`; returns its response line.
pub fn send(mountpoint: &Path, command: &str) -> std::io::Result<String> {
    let mut f = File::options()
        .read(true)
        .write(true)
        .open(mountpoint.join(CONTROL_NAME))?;
    let written = f.write(command.as_bytes());
    let mut resp = String::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_string(&mut resp)?;
    let resp = resp.trim_end().to_string();
    match written {
        Ok(_) => Ok(resp),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            if resp.is_empty() { e.to_string() } else { resp },
        )),
    }
}
