//! Which blocks of the data file are known to have their space taken, so a client's write
//! over them skips the `fallocate` that would take it (see `files::reserve_data_range`).
//!
//! One bit per block, in pages made on first touch: a volume costs memory only for the
//! regions written since it was opened (1 bit per 4 KiB, DRBD's bitmap ratio), and nothing
//! for regions never written. The map starts empty on every open, so after a restart each
//! block pays for one `fallocate` again; being empty is always safe.
//!
//! Invariant (`a_set_bit_means_the_block_is_allocated`): a bit is set only after the
//! `fallocate` that allocates its block succeeded (or proved the filesystem cannot
//! preallocate, where there is nothing to save), and it is cleared *before* any hole is
//! punched over its block. A write that reads a set bit therefore finds its block allocated,
//! except for a punch racing it, which writes taking their space before the punch's entry
//! was checkpointed lose anyway (the punch comes first in the log).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Blocks per page: 32,768 blocks (128 MiB of volume) in a 4 KiB page of bits.
const PAGE_BLOCKS: u64 = 1 << 15;
const WORDS_PER_PAGE: usize = (PAGE_BLOCKS / 64) as usize;

pub(super) struct ReservedBlocks {
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
    blocks: u64,
}

impl ReservedBlocks {
    /// An empty map for a volume of `blocks` blocks.
    pub fn new(blocks: u64) -> ReservedBlocks {
        let pages = blocks.div_ceil(PAGE_BLOCKS) as usize;
        ReservedBlocks {
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
            blocks,
        }
    }

    /// Blocks in the volume.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// True when every block of `[first, end)` is known to be allocated.
    pub fn covers(&self, first: u64, end: u64) -> bool {
        self.words(first, end).all(|(page, word, mask)| {
            self.pages[page]
                .get()
                .is_some_and(|p| p[word].load(Ordering::Acquire) & mask == mask)
        })
    }

    /// Records that `[first, end)` is allocated (its `fallocate` succeeded).
    pub fn mark(&self, first: u64, end: u64) {
        for (page, word, mask) in self.words(first, end) {
            let p = self.pages[page].get_or_init(new_page);
            p[word].fetch_or(mask, Ordering::Release);
        }
    }

    /// Forgets `[first, end)`: called before a hole is punched there.
    pub fn forget(&self, first: u64, end: u64) {
        for (page, word, mask) in self.words(first, end) {
            if let Some(p) = self.pages[page].get() {
                p[word].fetch_and(!mask, Ordering::Release);
            }
        }
    }

    /// The (page, word, mask) triples covering `[first, end)`, clipped to the volume.
    fn words(&self, first: u64, end: u64) -> impl Iterator<Item = (usize, usize, u64)> {
        let end = end.min(self.blocks);
        let mut at = first.min(end);
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let bit = at % 64;
            let n = (64 - bit).min(end - at);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let page = (at / PAGE_BLOCKS) as usize;
            let word = ((at % PAGE_BLOCKS) / 64) as usize;
            at += n;
            Some((page, word, mask))
        })
    }
}

fn new_page() -> Box<[AtomicU64]> {
    (0..WORDS_PER_PAGE).map(|_| AtomicU64::new(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_bit_means_the_block_is_allocated() {
        // The map's half of the invariant: only `mark` sets bits, `forget` clears exactly
        // its range, and nothing outside a marked range ever reads as covered.
        let r = ReservedBlocks::new(3 * PAGE_BLOCKS + 10);
        assert!(!r.covers(0, 1));
        r.mark(60, 200);
        assert!(r.covers(60, 200));
        assert!(r.covers(64, 128));
        assert!(!r.covers(59, 61));
        assert!(!r.covers(199, 201));
        r.forget(100, 101);
        assert!(!r.covers(60, 200));
        assert!(r.covers(60, 100) && r.covers(101, 200));
    }

    #[test]
    fn ranges_across_pages_and_the_volume_end_are_clipped() {
        let blocks = 2 * PAGE_BLOCKS + 5;
        let r = ReservedBlocks::new(blocks);
        r.mark(PAGE_BLOCKS - 3, PAGE_BLOCKS + 3);
        assert!(r.covers(PAGE_BLOCKS - 3, PAGE_BLOCKS + 3));
        assert!(!r.covers(PAGE_BLOCKS - 4, PAGE_BLOCKS + 3));
        r.mark(blocks - 2, blocks + 100);
        assert!(r.covers(blocks - 2, blocks));
        r.forget(0, u64::MAX);
        assert!(!r.covers(blocks - 1, blocks));
        assert!(!r.covers(PAGE_BLOCKS, PAGE_BLOCKS + 1));
    }

    #[test]
    fn an_empty_range_is_covered() {
        let r = ReservedBlocks::new(10);
        assert!(r.covers(5, 5));
    }
}
