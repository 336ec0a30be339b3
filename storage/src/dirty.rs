//! The dirty map: what the WAL holds that the data file does not have yet.
//!
//! Keys are block numbers; each entry covers a run of blocks written by one WAL entry. Entries
//! never overlap: a newer write splits or removes the older entries it covers, so a lookup
//! returns only the newest state of every block. Ranges matter because one TRIM or
//! WRITE_ZEROES can cover the whole volume (mkfs does exactly that), which must cost one entry,
//! not millions. Data runs hold `Bytes`, so splitting a run slices its buffer instead of
//! copying it.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::types::{Lsn, BLOCK_SIZE};
use crate::wal::record::{RecordKind, WalRecord};

/// The state of a run of blocks that lives in the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// New contents, `BLOCK_SIZE` bytes per block.
    Data(Bytes),
    /// Reads as zeroes. `punch` means the data file may deallocate it (TRIM, or WRITE_ZEROES
    /// without NO_HOLE).
    Zero { punch: bool },
    /// The data file holds these blocks' newest contents already: a large write placed there
    /// directly (see `store::placement`). It hides what older maps say about the blocks, and a
    /// checkpoint has nothing to write for it.
    Placed,
}

impl BlockState {
    /// The part of this state that covers blocks `[from, from + count)` relative to its start.
    fn slice(&self, from: u64, count: u64) -> BlockState {
        match self {
            BlockState::Data(b) => {
                let start = (from * BLOCK_SIZE) as usize;
                BlockState::Data(b.slice(start..start + (count * BLOCK_SIZE) as usize))
            }
            BlockState::Zero { punch } => BlockState::Zero { punch: *punch },
            BlockState::Placed => BlockState::Placed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extent {
    /// One past the last block.
    pub end: u64,
    /// The WAL entry this state came from.
    pub lsn: Lsn,
    pub state: BlockState,
}

/// A run of blocks `[start, end)` and where its contents are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub start: u64,
    pub end: u64,
    /// `None`: the data file holds it. Never `Some(Placed)` out of [`resolve`].
    pub state: Option<BlockState>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct DirtyMap {
    extents: BTreeMap<u64, Extent>,
    /// Payload bytes held (for memory accounting and the status report).
    data_bytes: u64,
}

impl DirtyMap {
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Extent)> {
        self.extents.iter().map(|(s, e)| (*s, e))
    }

    /// Records what WAL entry `rec` does to the blocks, and returns the blocks it changed
    /// (`None` for an entry that changes none: an epoch start, a wrap marker).
    pub fn apply(&mut self, rec: &WalRecord) -> Option<(u64, u64)> {
        let state = match rec.kind {
            RecordKind::Write => BlockState::Data(rec.payload.clone()),
            RecordKind::Trim => BlockState::Zero { punch: true },
            RecordKind::WriteZeroes { punch } => BlockState::Zero { punch },
            RecordKind::Placed => BlockState::Placed,
            RecordKind::Wrap | RecordKind::EpochStart => return None,
        };
        let first = rec.offset / BLOCK_SIZE;
        let end = first + rec.length / BLOCK_SIZE;
        self.insert(first, end, rec.lsn, state);
        Some((first, end))
    }

    /// Lays `newer` (entries made after every one of ours) over this map.
    pub fn overlay(&mut self, newer: DirtyMap) {
        for (start, e) in newer.extents {
            self.insert(start, e.end, e.lsn, e.state);
        }
    }

    /// Records that blocks `[start, end)` now have `state` (written by `lsn`).
    pub fn insert(&mut self, start: u64, end: u64, lsn: Lsn, state: BlockState) {
        debug_assert!(start < end);
        if let BlockState::Data(b) = &state {
            debug_assert_eq!(b.len() as u64, (end - start) * BLOCK_SIZE);
        }
        self.remove_range(start, end);
        self.add(start, Extent { end, lsn, state });
    }

    fn add(&mut self, start: u64, extent: Extent) {
        if let BlockState::Data(b) = &extent.state {
            self.data_bytes += b.len() as u64;
        }
        self.extents.insert(start, extent);
    }

    fn take(&mut self, start: u64) -> Option<Extent> {
        let e = self.extents.remove(&start)?;
        if let BlockState::Data(b) = &e.state {
            self.data_bytes -= b.len() as u64;
        }
        Some(e)
    }

    /// Puts back the part of `e` (which started at `s`) that lies past `end`, if any: what a
    /// removal of a range ending at `end` must leave of an entry reaching beyond it.
    fn keep_tail(&mut self, s: u64, e: &Extent, end: u64) {
        if e.end > end {
            self.add(
                end,
                Extent {
                    end: e.end,
                    lsn: e.lsn,
                    state: e.state.slice(end - s, e.end - end),
                },
            );
        }
    }

    /// Entry `lsn`'s blocks inside `[start, end)` that still hold its data are in the data file
    /// now: they hold no memory from here on. Returns whether any did.
    pub fn mark_placed(&mut self, start: u64, end: u64, lsn: Lsn) -> bool {
        let owned: Vec<(u64, u64)> = self
            .overlapping(start, end)
            .into_iter()
            .filter(|p| matches!(p.state, Some(BlockState::Data(_))))
            .filter(|p| self.lsn_at(p.start) == Some(lsn))
            .map(|p| (p.start, p.end))
            .collect();
        for &(s, e) in &owned {
            self.insert(s, e, lsn, BlockState::Placed);
        }
        !owned.is_empty()
    }

    /// The LSN of the entry that wrote `block`, if the map holds it.
    fn lsn_at(&self, block: u64) -> Option<Lsn> {
        let (_, e) = self.extents.range(..=block).next_back()?;
        (e.end > block).then_some(e.lsn)
    }

    /// Removes blocks `[start, end)` from the map, trimming the entries that straddle it.
    fn remove_range(&mut self, start: u64, end: u64) {
        // An entry that starts before `start` and reaches into the range.
        if let Some((&s, e)) = self.extents.range(..start).next_back() {
            if e.end > start {
                let e = self.take(s).expect("present");
                self.add(
                    s,
                    Extent {
                        end: start,
                        lsn: e.lsn,
                        state: e.state.slice(0, start - s),
                    },
                );
                self.keep_tail(s, &e, end);
            }
        }
        // Entries that start inside the range.
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let e = self.take(s).expect("present");
            self.keep_tail(s, &e, end);
        }
    }

    /// The entries overlapping `[start, end)`, clipped to it, in order. Gaps are not reported.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        if let Some((&s, e)) = self.extents.range(..start).next_back() {
            if e.end > start {
                let to = e.end.min(end);
                out.push(Piece {
                    start,
                    end: to,
                    state: Some(e.state.slice(start - s, to - start)),
                });
            }
        }
        for (&s, e) in self.extents.range(start..end) {
            let to = e.end.min(end);
            out.push(Piece {
                start: s,
                end: to,
                state: Some(if to == e.end {
                    e.state.clone()
                } else {
                    e.state.slice(0, to - s)
                }),
            });
        }
        out
    }
}

/// A set of block ranges (the blocks written by WAL entries since a rebuild began).
#[derive(Debug, Default, Clone)]
pub(crate) struct RangeSet {
    /// start -> end, non-overlapping, non-adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// The parts of `[start, end)` not in the set.
    pub fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for (&s, &e) in self.ranges.range(first..end) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }
}

/// Where every block of `[start, end)` is: the newest map first, then the older one, then the
/// data file. Returns contiguous pieces that tile the range exactly.
pub(crate) fn resolve(layers: &[&DirtyMap], start: u64, end: u64) -> Vec<Piece> {
    let Some((top, rest)) = layers.split_first() else {
        return vec![Piece {
            start,
            end,
            state: None,
        }];
    };
    let mut out = Vec::new();
    let mut at = start;
    for piece in top.overlapping(start, end) {
        if piece.start > at {
            out.extend(resolve(rest, at, piece.start));
        }
        at = piece.end;
        out.push(match piece.state {
            // Placed blocks are the data file's, whatever an older map says of them.
            Some(BlockState::Placed) => Piece {
                state: None,
                ..piece
            },
            _ => piece,
        });
    }
    if at < end {
        out.extend(resolve(rest, at, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(blocks: u64, fill: u8) -> BlockState {
        BlockState::Data(Bytes::from(vec![fill; (blocks * BLOCK_SIZE) as usize]))
    }

    /// Reference model: one state per block.
    fn model_apply(model: &mut [Option<u8>], start: u64, end: u64, v: Option<u8>) {
        for b in start..end {
            model[b as usize] = v;
        }
    }

    fn block_value(pieces: &[Piece], b: u64) -> Option<Option<u8>> {
        let p = pieces.iter().find(|p| p.start <= b && b < p.end)?;
        match &p.state {
            None | Some(BlockState::Placed) => Some(None),
            Some(BlockState::Zero { .. }) => Some(Some(0)),
            Some(BlockState::Data(bytes)) => {
                let off = ((b - p.start) * BLOCK_SIZE) as usize;
                Some(Some(bytes[off]))
            }
        }
    }

    proptest! {
        #[test]
        fn dirty_map_matches_a_per_block_model(
            ops in proptest::collection::vec((0u64..64, 1u64..16, 0u8..4), 1..40)
        ) {
            let mut map = DirtyMap::default();
            let mut model = vec![None; 80];
            for (i, (start, len, kind)) in ops.iter().enumerate() {
                let end = start + len;
                let fill = (i as u8).wrapping_mul(7).wrapping_add(1) | 1;
                if *kind == 0 {
                    map.insert(*start, end, Lsn(i as u64 + 1), BlockState::Zero { punch: true });
                    model_apply(&mut model, *start, end, Some(0));
                } else if *kind == 1 {
                    map.insert(*start, end, Lsn(i as u64 + 1), BlockState::Placed);
                    model_apply(&mut model, *start, end, None);
                } else {
                    map.insert(*start, end, Lsn(i as u64 + 1), data(*len, fill));
                    model_apply(&mut model, *start, end, Some(fill));
                }
            }
            let pieces = resolve(&[&map], 0, 80);
            // Pieces tile the range exactly.
            let mut at = 0;
            for p in &pieces {
                prop_assert_eq!(p.start, at);
                prop_assert!(p.end > p.start);
                at = p.end;
            }
            prop_assert_eq!(at, 80);
            for b in 0..80u64 {
                let got = block_value(&pieces, b).unwrap();
                prop_assert_eq!(got, model[b as usize], "block {}", b);
            }
            let expected_bytes: u64 = map.iter().map(|(_, e)| match &e.state {
                BlockState::Data(b) => b.len() as u64, _ => 0 }).sum();
            prop_assert_eq!(map.data_bytes(), expected_bytes);
            // Entries never overlap.
            let mut last_end = 0;
            for (s, e) in map.iter() {
                prop_assert!(s >= last_end);
                last_end = e.end;
            }
        }
    }

    proptest! {
        #[test]
        fn range_set_uncovered_matches_a_bitmap(
            inserts in proptest::collection::vec((0u64..100, 1u64..20), 0..20),
            q in (0u64..100, 1u64..40),
        ) {
            let mut set = RangeSet::default();
            let mut bits = [false; 200];
            for (s, n) in inserts {
                set.insert(s, s + n);
                for b in s..s + n { bits[b as usize] = true; }
            }
            let (qs, qn) = q;
            let mut expect = vec![false; 200];
            for b in qs..qs + qn { expect[b as usize] = !bits[b as usize]; }
            let mut got = vec![false; 200];
            for (s, e) in set.uncovered(qs, qs + qn) {
                prop_assert!(s < e);
                for b in s..e { got[b as usize] = true; }
            }
            prop_assert_eq!(got, expect);
        }
    }

    #[test]
    fn dirty_map_newer_layer_wins_over_older() {
        let mut old = DirtyMap::default();
        old.insert(0, 10, Lsn(1), data(10, 1));
        let mut new = DirtyMap::default();
        new.insert(3, 5, Lsn(2), data(2, 2));
        let pieces = resolve(&[&new, &old], 0, 12);
        assert_eq!(block_value(&pieces, 2), Some(Some(1)));
        assert_eq!(block_value(&pieces, 3), Some(Some(2)));
        assert_eq!(block_value(&pieces, 5), Some(Some(1)));
        assert_eq!(block_value(&pieces, 11), Some(None));
    }

    #[test]
    fn a_placed_run_hides_what_older_maps_say_of_its_blocks() {
        let mut old = DirtyMap::default();
        old.insert(0, 10, Lsn(1), data(10, 1));
        let mut new = DirtyMap::default();
        new.insert(2, 6, Lsn(2), data(4, 2));
        new.insert(4, 5, Lsn(3), data(1, 3));
        // Entry 2's blocks that entry 3 did not overwrite go to the data file.
        assert!(new.mark_placed(2, 6, Lsn(2)));
        assert_eq!(new.data_bytes(), BLOCK_SIZE);
        let pieces = resolve(&[&new, &old], 0, 10);
        assert_eq!(block_value(&pieces, 1), Some(Some(1)));
        assert_eq!(block_value(&pieces, 2), Some(None));
        assert_eq!(block_value(&pieces, 4), Some(Some(3)));
        assert_eq!(block_value(&pieces, 5), Some(None));
        assert_eq!(block_value(&pieces, 6), Some(Some(1)));
        assert!(pieces.iter().all(|p| p.state != Some(BlockState::Placed)));
        // An entry that owns nothing any more marks nothing.
        assert!(!new.mark_placed(0, 10, Lsn(1)));
    }
}
