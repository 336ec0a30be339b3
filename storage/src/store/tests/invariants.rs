//! Tests of the invariants `core` keeps, one named after each. Every test walks a store
//! through the steps that move the log's marks (appends that lap the ring, WAL syncs,
//! checkpoints with and without a retention pin, a cut, a rebuild, a reopen) and checks its
//! relation after each step; in debug builds it also shows that the assertion where the
//! invariant is kept catches a state that breaks it.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::*;
use crate::store::core::{Core, KeptLog};
use crate::types::WalPos;
use crate::wal::WalLayout;

/// Drives a store through every step that moves the log's marks, calling `check` on its
/// core after each one (named for the failure message).
fn walk(check: impl Fn(&str, &Core)) {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    // Every write logged: the walk goes round the ring, and placed writes hardly use it.
    let store = open_logging_without_flusher(&path);
    let at = |step: &str| check(step, &store.shared.lock_core());
    at("open");
    store.begin_epoch(None).unwrap();
    // 80 MiB through a 64 MiB ring: it wraps, and appends wait for the flusher.
    for i in 0..80u64 {
        let data = vec![i as u8; MIB as usize];
        rt.block_on(store.write((i % 16) * MIB, &data, false))
            .unwrap();
        at("append");
        if i % 9 == 0 {
            rt.block_on(store.flush()).unwrap();
            at("flush");
        }
        if i % 20 == 19 {
            store.shared.checkpoint().unwrap();
            at("checkpoint");
        }
    }
    // A pin at the head: the checkpoint keeps the WAL after it and syncs it first.
    store.set_retention_pin(Some(store.head()));
    rt.block_on(store.write(0, &[7; 4096], false)).unwrap();
    store.shared.checkpoint().unwrap();
    at("checkpoint with a pin");
    store.set_retention_pin(None);
    store.shared.checkpoint().unwrap();
    at("checkpoint after the pin");
    // Reopened, so that no checkpoint the steps above asked for runs during the cut.
    store.close().unwrap();
    drop(store);
    let store = open_without_flusher(&path);
    let at = |step: &str| check(step, &store.shared.lock_core());
    at("reopen");
    // A cut of an uncommitted tail.
    for b in 0..3u64 {
        rt.block_on(store.write(b * 4096, &[9; 4096], false))
            .unwrap();
    }
    rt.block_on(store.flush()).unwrap();
    let keep = store.head().prev().prev();
    store.truncate_after(keep).unwrap();
    at("cut");
    rt.block_on(store.write(0, &[10; 4096], true)).unwrap();
    at("append after the cut");
    // A rebuild from a base ahead of this log.
    let base = Lsn(store.head().0 + 50);
    store
        .begin_rebuild(base, store.epoch_history(), None)
        .unwrap();
    at("begin rebuild");
    rt.block_on(store.apply_base(
        0,
        MIB,
        Some(Bytes::from(vec![3u8; MIB as usize])),
        Lsn::ZERO,
    ))
    .unwrap();
    let epoch = store.head_epoch().max(Epoch(1));
    let record = WalRecord::new(
        base.next(),
        epoch,
        RecordKind::Write,
        0,
        4096,
        Bytes::from(vec![4u8; 4096]),
    );
    rt.block_on(store.append_replicated(record)).unwrap();
    at("replicated append");
    store.finish_rebuild().unwrap();
    at("finish rebuild");
    store.close().unwrap();
    drop(store);
    let store = open_without_flusher(&path);
    let at = |step: &str| check(step, &store.shared.lock_core());
    at("reopen after the rebuild");
    // Large writes placed in the data file, a flush and a checkpoint over them.
    for i in 0..4u64 {
        rt.block_on(store.write(i * MIB, &vec![i as u8; MIB as usize], false))
            .unwrap();
        at("placed append");
    }
    rt.block_on(store.flush()).unwrap();
    at("flush of placed writes");
    store.shared.checkpoint().unwrap();
    at("checkpoint after placed writes");
}

/// Runs `break_it` on the core of a store with three entries, all checkpointed, opened
/// read-only (no threads to trip over the broken state), and returns the panic message.
#[cfg(debug_assertions)]
fn caught(break_it: impl FnOnce(&mut Core)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = create(tmp.path(), 16 * MIB, 64 * MIB);
    let rt = rt();
    let store = open(&path);
    store.begin_epoch(None).unwrap();
    for b in 0..3u64 {
        rt.block_on(store.write(b * 4096, &[1; 4096], false))
            .unwrap();
    }
    store.close().unwrap();
    drop(store);
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let store = Store::open(&path, &read_only).unwrap();
    let mut core = store.shared.lock_core();
    assert_eq!((core.log.last(), core.log.checkpoint_lsn), (Lsn(3), Lsn(3)));
    let panic = catch_unwind(AssertUnwindSafe(|| break_it(&mut core)))
        .expect_err("the broken state went unnoticed");
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn durable_never_passes_the_head() {
    walk(|step, core| {
        let log = &core.log;
        assert!(
            log.written <= log.last() && log.durable <= log.last(),
            "{step}: written {}, durable {}, head {}",
            log.written,
            log.durable,
            log.last()
        );
    });
    #[cfg(debug_assertions)]
    {
        // The writer reports an entry the log does not have.
        let msg = caught(|core| core.log.mark_written(Lsn(5)));
        assert!(msg.contains("durable never passes the head"), "{msg}");
    }
}

#[test]
fn the_checkpoint_is_never_ahead_of_durable() {
    walk(|step, core| {
        assert!(
            core.log.checkpoint_lsn <= core.log.durable,
            "{step}: checkpoint {}, durable {}",
            core.log.checkpoint_lsn,
            core.log.durable
        );
    });
    #[cfg(debug_assertions)]
    {
        // A cut below the checkpoint (what `truncate_after` refuses).
        let msg = caught(|core| {
            let kept = KeptLog {
                last: Lsn(1),
                head: core.log.head,
                active: Default::default(),
                history: Vec::new(),
                last_epoch: Epoch(1),
            };
            core.cut(kept, core.log.generation);
        });
        assert!(
            msg.contains("the checkpoint is never ahead of durable"),
            "{msg}"
        );
    }
}

#[test]
fn the_tail_never_passes_the_head() {
    walk(|step, core| {
        let log = &core.log;
        assert!(
            log.tail.0 <= log.head.0 && log.tail_lsn <= log.next_lsn,
            "{step}: tail {:?} ({}), head {:?} ({})",
            log.tail,
            log.tail_lsn,
            log.head,
            log.next_lsn
        );
        let lsns: Vec<Lsn> = log.index.iter().map(|(lsn, _)| *lsn).collect();
        assert!(
            lsns.windows(2).all(|w| w[0].next() == w[1]),
            "{step}: the index has a hole: {lsns:?}"
        );
    });
    #[cfg(debug_assertions)]
    {
        // A checkpoint that releases the WAL beyond its head.
        let msg = caught(|core| {
            let past = WalPos(core.log.head.0 + 4096);
            let last = core.log.last();
            core.log.mark_checkpoint(last, past, last.next());
        });
        assert!(msg.contains("the tail never passes the head"), "{msg}");
    }
}

#[test]
fn the_queues_lsns_are_dense() {
    walk(|step, core| {
        let queue = &core.writer.queue;
        let dense = queue.windows(2).all(|w| match w[0].record.kind {
            RecordKind::Wrap => w[1].record.lsn == w[0].record.lsn,
            _ => w[1].record.lsn == w[0].record.lsn.next(),
        });
        assert!(dense, "{step}: the writer's queue has a hole");
        if let Some(q) = queue.last() {
            assert_eq!(q.record.lsn, core.log.last(), "{step}");
        }
    });
    #[cfg(debug_assertions)]
    {
        // An entry queued two LSNs after the one before it.
        let msg = caught(|core| {
            let layout = WalLayout { capacity: 64 * MIB };
            let append = |core: &mut Core| {
                let _ = core.try_append(&layout, RecordKind::Trim, 0, 4096, Bytes::new(), 0);
            };
            append(core);
            core.log.next_lsn = core.log.next_lsn.next();
            core.log.index.clear();
            append(core);
        });
        assert!(msg.contains("the queue's LSNs are dense"), "{msg}");
    }
}
