//! What every command shares: sizes as people write and read them, the async runtime, and
//! the default NBD address. A leaf: it uses no other module of the binary.

use anyhow::{Context, Result};

/// Where NBD is served unless told otherwise.
pub(crate) const DEFAULT_NBD: &str = "127.0.0.1:10809";

/// A size as given on the command line or in a config file: 256MiB, 10GiB (binary units).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size like 256MiB or 10GiB ({e})"))
}

/// A size for people: 64 MiB, 1.5 GiB.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// The multi-threaded runtime a primary and the offline commands run on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockrep-rt")
        .build()
        .context("cannot start the async runtime")
}
