//! Newtypes for the quantities the engine keeps apart: log sequence numbers, epochs and
//! byte positions. Mixing an LSN with a byte position was a real bug in the system we learn
//! from (the brief, section 8.2), so each gets its own type.

use std::fmt;

/// Every block-granular structure in the engine uses this size. The NBD frontend accepts any
/// byte range and the engine turns partial blocks into read-modify-write.
pub const BLOCK_SIZE: u64 = 4096;

/// A log sequence number. LSNs are dense: every WAL entry takes the next one, starting at 1.
/// `Lsn(0)` means "nothing" (an empty log, or a store that has never been written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }

    /// The LSN before this one; `Lsn(0)` stays `Lsn(0)`.
    pub fn prev(self) -> Lsn {
        Lsn(self.0.saturating_sub(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The authority generation a primary writes under. It is persisted before a node serves at
/// it and never goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A logical position in the circular WAL. Logical positions only grow; the physical offset
/// in the WAL file is derived from them, which removes the full-versus-empty ambiguity of a
/// ring buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WalPos(pub u64);

impl fmt::Display for WalPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A 128-bit volume identity. A store belongs to exactly one volume.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    pub fn random() -> VolumeId {
        VolumeId(*uuid::Uuid::new_v4().as_bytes())
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes(self.0))
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}
