//! The replication wire format: one frame format for data and control.
//!
//! ```text
//! header (24 bytes, little-endian):
//!   0 magic u32 "BRRP"   4 version u8   5 kind u8   6 reserved u16
//!   8 body_len u32      12 crc32c u32 (header bytes 0..12 and 16..24, then the body)
//!  16 epoch u64          (the sender's epoch; every frame carries it)
//! body: kind-specific, below
//! ```
//! A WAL entry inside `Entries` also carries the CRC32C of its payload, checked on decode and
//! kept as the entry's checksum in the receiver's WAL. Anything that does not decode is an
//! error the receiver answers by closing the connection with a logged reason; nothing here
//! panics on input.
//!
//! The messages are in `message`; `encode` and `decode` turn them into bytes and back;
//! `validate` says what an entry must be before a store may take it.

pub use self::decode::{decode, frame_len};
pub use self::encode::{encode, encode_parts};
pub use self::message::{
    Body, Frame, RejectReason, ReportedRole, WireError, ENTRY_HEADER_LEN, HEADER_LEN, MAGIC,
    MAX_BODY, VERSION,
};
pub use self::validate::EntryError;

mod decode;
mod encode;
mod message;
#[cfg(test)]
mod tests;
pub mod validate;
