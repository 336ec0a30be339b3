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
    /// The last LSN there is: nothing can follow it.
    pub const MAX: Lsn = Lsn(u64::MAX);

    /// The LSN after this one, or `None` at [`Lsn::MAX`].
    pub fn checked_next(self) -> Option<Lsn> {
        self.0.checked_add(1).map(Lsn)
    }

    /// The LSN after this one. It never wraps: at [`Lsn::MAX`] it stays there (saturates), so
    /// an LSN only ever goes up. Replication refuses entries and bases at `Lsn::MAX` before
    /// they reach a store, so an honest log never gets there; code that takes the position
    /// from a peer uses [`Lsn::checked_next`].
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
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
    /// The last epoch there is. No epoch follows it, so no primary could ever take over from
    /// one serving at it: replicas refuse it (a `Hello` or a fencing `Probe` at it) before
    /// anything is persisted, and a store never reaches it through replication.
    pub const MAX: Epoch = Epoch(u64::MAX);

    /// The epoch after this one, or `None` at [`Epoch::MAX`].
    pub fn checked_next(self) -> Option<Epoch> {
        self.0.checked_add(1).map(Epoch)
    }

    /// The epoch after this one. It never wraps (a wrapped epoch would go down, and epochs
    /// never go down): at [`Epoch::MAX`] it saturates, and since the maximum is refused by
    /// every replica, a promotion that asks for it is refused rather than served.
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }

    /// Whether some epoch can still follow this one (a primary at it could be replaced).
    pub fn can_be_followed(self) -> bool {
        self.checked_next().is_some()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_lsns_never_wrap() {
        assert_eq!(Epoch::MAX.checked_next(), None);
        assert_eq!(Epoch::MAX.next(), Epoch::MAX);
        assert_eq!(Epoch(7).checked_next(), Some(Epoch(8)));
        assert!(!Epoch::MAX.can_be_followed());
        assert!(Epoch(u64::MAX - 1).can_be_followed());
        assert_eq!(Lsn::MAX.checked_next(), None);
        assert_eq!(Lsn::MAX.next(), Lsn::MAX);
        assert_eq!(Lsn(1).next(), Lsn(2));
    }
}

/// How far an interrupted rebuild got, durably: the base it was taken from and the part of
/// it that is in the data file and fdatasynced. A primary resumes from it only when it can
/// vouch for that base (see `PrimaryCore`'s resume rule in the replication crate).
///
/// Invariant (*no partial base is trusted without proof of its lineage*): the data below
/// `through` reflects no entry after `proof`, and the store's own log held the primary's
/// entries through `proof` (an entry of `proof_epoch`) when the cursor was written; a later
/// checkpoint that may write entries past `proof` raises it first. A primary whose log has
/// the same entry at `proof` has every entry that data may reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildCursor {
    /// The primary's checkpoint the base was taken at.
    pub base: Lsn,
    /// The epoch history through `base`, as the primary sent it.
    pub history: Vec<(Epoch, Lsn)>,
    /// Bytes of the base, from offset 0, received and durable in the data file.
    pub through: u64,
    pub proof: Lsn,
    pub proof_epoch: Epoch,
}
