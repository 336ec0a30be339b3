//! Constants and big-endian readers every oracle shares.

use std::time::Duration;

/// Size of a transmission request header.
pub const HEADER_LEN: usize = 28;
/// Size of each RAM volume the harness exports.
pub const VOLUME_SIZE: u64 = 1 << 20;
/// The export names the harness serves (the empty name selects the first).
pub const EXPORT: &str = "blockrep";
pub const OTHER_EXPORT: &str = "second";
/// A connection must be closed by the server this long after the client half-closed.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const MAX_OPTION_LEN: usize = 64 << 10;
pub(crate) const BLOCK: u64 = 4096;

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
