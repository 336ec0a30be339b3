//! Epochs that name their leader, so that two leaderships never share one even when etcd
//! forgets it handed an epoch out.
//!
//! etcd's counter alone makes epochs unique only while etcd remembers: restored from an older
//! snapshot, with every store that holds the newer epoch down too, nothing left knows it and
//! the next campaign would take it again (seed 6821 of `--control --seeds 20000`). Two
//! leaders at one epoch write different entries under the same (epoch, LSN), which no log
//! comparison can tell apart. So an elected epoch carries its leader's [`LeaderTag`] in its
//! low [`LeaderTag::BITS`] bits: two nodes that take the same counter from a forgetful etcd
//! still take different epochs, and a node never takes one of its own twice (its store holds
//! the last one, and a campaign goes above it).
//!
//! Epochs still only grow, and any later count beats any tag, so ordering keeps meaning
//! "later leadership" wherever etcd kept its memory; where it did not, a leader elected after
//! the restore may sit below the forgotten epoch, a store that holds the forgotten one
//! refuses it as stale, and the next campaign goes above both.

use blockrep_storage::Epoch;

/// The low bits of the epochs one node is elected at, derived from its name.
///
/// Invariant (*members' leader tags differ*): a node whose tag equals another member's or an
/// earlier leader's takes no part ([`crate::Action::NameClash`]), so distinct leaders' epochs
/// differ even at one count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaderTag(pub u16);

impl LeaderTag {
    pub const BITS: u32 = 16;
    const MASK: u64 = (1 << Self::BITS) - 1;

    /// The tag of the node named `name`: its CRC-32C folded to 16 bits, the same on every
    /// node and in every run.
    pub fn of(name: &str) -> LeaderTag {
        let crc = crc32c::crc32c(name.as_bytes());
        LeaderTag(((crc >> 16) ^ (crc & 0xffff)) as u16)
    }

    /// The tag an epoch carries (meaningful for epochs etcd's control plane handed out).
    pub fn of_epoch(epoch: Epoch) -> LeaderTag {
        LeaderTag((epoch.0 & Self::MASK) as u16)
    }

    /// The lowest epoch above `above` that carries this tag, if one exists that can still be
    /// followed (see [`Epoch::can_be_followed`]).
    pub fn first_epoch_above(self, above: Epoch) -> Option<Epoch> {
        let same_count = (above.0 & !Self::MASK) | u64::from(self.0);
        let epoch = if same_count > above.0 {
            same_count
        } else {
            same_count.checked_add(1 << Self::BITS)?
        };
        Some(Epoch(epoch)).filter(|e| e.can_be_followed())
    }
}

impl std::fmt::Display for LeaderTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_epoch_above_carries_the_tag_and_is_above() {
        let t = LeaderTag(7);
        assert_eq!(t.first_epoch_above(Epoch(0)), Some(Epoch(7)));
        assert_eq!(t.first_epoch_above(Epoch(6)), Some(Epoch(7)));
        assert_eq!(t.first_epoch_above(Epoch(7)), Some(Epoch(65536 + 7)));
        assert_eq!(
            t.first_epoch_above(Epoch(65536 + 9)),
            Some(Epoch(2 * 65536 + 7))
        );
        for above in [0u64, 1, 7, 8, 65535, 65536, 1 << 40, u64::MAX >> 1] {
            let e = t.first_epoch_above(Epoch(above)).expect("an epoch");
            assert!(e > Epoch(above));
            assert_eq!(LeaderTag::of_epoch(e), t);
            // The lowest such: the one a count lower is not above.
            assert!(e.0 < (1 << LeaderTag::BITS) || e.0 - (1 << LeaderTag::BITS) <= above);
        }
    }

    #[test]
    fn no_epoch_is_handed_out_that_cannot_be_followed() {
        assert_eq!(
            LeaderTag(0xffff).first_epoch_above(Epoch(u64::MAX - 1)),
            None
        );
        assert_eq!(LeaderTag(3).first_epoch_above(Epoch(u64::MAX - 2)), None);
        assert_eq!(
            LeaderTag(0xfffe).first_epoch_above(Epoch(u64::MAX - 2)),
            Some(Epoch(u64::MAX - 1))
        );
    }

    #[test]
    fn two_nodes_at_one_count_take_different_epochs() {
        let (a, b) = (LeaderTag::of("node-a"), LeaderTag::of("node-b"));
        assert_ne!(a, b);
        let restored = Epoch(3 << LeaderTag::BITS);
        assert_ne!(a.first_epoch_above(restored), b.first_epoch_above(restored));
        assert_eq!(LeaderTag::of("node-a"), a, "a tag is the same in every run");
    }
}
