//! A global allocator that remembers, per thread, the largest single allocation made while a
//! measurement runs: the decoder oracle's evidence that no length field read from the input
//! drives an allocation larger than the frame limits allow.
//!
//! Each driver (the cargo-fuzz target, the stable test) installs it with
//! `#[global_allocator] static A: CountingAlloc = CountingAlloc;`. Without it installed,
//! [`largest_allocation`] reports 0 and the allocation oracle checks nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct CountingAlloc;

thread_local! {
    /// `None` when no measurement runs on this thread.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while the thread exits; nothing to measure then.
    let _ = LARGEST.try_with(|l| {
        if let Some(max) = l.get() {
            l.set(Some(max.max(size)));
        }
    });
}

// SAFETY: every call is passed straight to the system allocator; the bookkeeping touches a
// const-initialised thread-local cell only, which allocates nothing.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread (0 if none, or if [`CountingAlloc`] is not the global allocator).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let outer = LARGEST.with(|l| l.replace(Some(0)));
    let r = f();
    let max = LARGEST.with(|l| l.replace(outer)).unwrap_or(0);
    // A measurement inside another one counts toward both.
    if let Some(o) = outer {
        LARGEST.with(|l| l.set(Some(o.max(max))));
    }
    (r, max)
}
