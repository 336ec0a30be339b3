//! Payload buffers for the dirty map, carved out of per-thread 2 MiB arenas.
//!
//! Every acknowledged write keeps its payload in memory until the flusher has put it in the
//! data file. Allocating each 4 KiB payload separately costs a malloc, a free on the flusher's
//! thread, and fresh zeroed pages from the kernel; slicing them out of a shared arena turns
//! that into one allocation per 512 writes. An arena is released when the last payload cut
//! from it is dropped, which happens at the checkpoint that covers them.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

const ARENA: usize = 2 << 20;

thread_local! {
    static CURRENT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Copies `parts`, back to back, into one new immutable buffer.
pub(crate) fn copy(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len >= ARENA / 4 {
        // Large payloads get their own allocation; they would waste most of an arena.
        let mut b = BytesMut::with_capacity(len);
        for p in parts {
            b.extend_from_slice(p);
        }
        return b.freeze();
    }
    CURRENT.with(|cell| {
        let mut arena = cell.borrow_mut();
        if arena.capacity() - arena.len() < len {
            *arena = BytesMut::with_capacity(ARENA);
        }
        for p in parts {
            arena.extend_from_slice(p);
        }
        arena.split().freeze()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn arena_copies_are_independent() {
        let a = super::copy(&[b"abc", b"def"]);
        let b = super::copy(&[b"xyz"]);
        assert_eq!(&a[..], b"abcdef");
        assert_eq!(&b[..], b"xyz");
        let big = vec![7u8; 1 << 20];
        assert_eq!(&super::copy(&[&big])[..], &big[..]);
    }
}
