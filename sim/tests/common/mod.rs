//! Helpers the scripted test files share: node names, waits that assert, and checks of what
//! a node holds.

#![allow(dead_code)]

use blockrep_replication::core::primary::PeerState;
use blockrep_sim::{Cluster, FlushOutcome};

pub const N0: usize = 0;
pub const N1: usize = 1;
pub const N2: usize = 2;

/// Enough for a barrier to time out (400 ms in the simulator) and a reconnect.
pub const WAIT: u64 = 2_000;

/// The last lines of the trace, for a failure message.
pub fn tail(c: &Cluster) -> String {
    c.trace[c.trace.len().saturating_sub(60)..].join("\n")
}

/// The checker has flagged nothing.
pub fn clean(c: &Cluster) {
    assert!(
        c.violations().is_empty(),
        "{:?}\n{}",
        c.violations(),
        tail(c)
    );
}

/// The liveness phase: the cluster converges and the checker stays clean.
pub fn converge(c: &mut Cluster) {
    if let Err(v) = c.converge(20_000) {
        panic!("{v}\n{}", tail(c));
    }
    clean(c);
}

/// Writes `count` blocks from `first` on node `n`, 10 per simulated millisecond (replicas
/// keep up; a burst of hundreds in one instant would exceed the retention budget before any
/// replica could answer); returns (block, value) pairs.
pub fn write(c: &mut Cluster, n: usize, first: u64, count: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for b in first..first + count {
        let (_, v) = c
            .write_on(n, b % 64)
            .unwrap_or_else(|| panic!("n{n} does not take writes"));
        out.push((b % 64, v));
        if b % 10 == 9 {
            c.settle(1);
        }
    }
    out
}

/// A FLUSH on `n` is acknowledged.
pub fn acked(c: &mut Cluster, n: usize) {
    assert_eq!(
        c.flush_and_wait(n, WAIT),
        Some(FlushOutcome::Acked),
        "{}",
        c.describe()
    );
}

/// A FLUSH on `n` fails: why.
pub fn failed(c: &mut Cluster, n: usize) -> String {
    match c.flush_and_wait(n, WAIT) {
        Some(FlushOutcome::Failed(why)) => why,
        other => panic!("flush on n{n}: {other:?}\n{}", c.describe()),
    }
}

/// Primary `p` comes to see replica `r` in `state` within `budget_ms`.
pub fn reach(c: &mut Cluster, p: usize, r: usize, state: PeerState, budget_ms: u64) {
    assert!(
        c.wait_for(p, r, state, budget_ms),
        "n{p} never saw n{r} {}:{}",
        state.name(),
        c.describe()
    );
}

pub fn holds(c: &Cluster, n: usize, values: &[(u64, u64)]) -> bool {
    values.iter().all(|&(b, v)| c.value(n, b) == Some(v))
}

pub fn holds_none(c: &Cluster, n: usize, values: &[(u64, u64)]) -> bool {
    values.iter().all(|&(b, v)| c.value(n, b) != Some(v))
}

/// No node holds any of `values`.
pub fn nobody_holds(c: &Cluster, values: &[(u64, u64)]) {
    for n in [N0, N1, N2] {
        assert!(holds_none(c, n, values), "n{n} holds {values:?}");
    }
}

/// The value each block ends with: `values` (from `write`) may cover a block more than once.
pub fn latest(values: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut last = std::collections::BTreeMap::new();
    for &(b, v) in values {
        last.insert(b, v);
    }
    last.into_iter().collect()
}

/// Node `n` comes to hold `values` (the latest of each block) within `WAIT`: entries a
/// primary has shipped may still be in flight when it counts the replica in sync.
pub fn lands(c: &mut Cluster, n: usize, values: &[(u64, u64)]) {
    let want = latest(values);
    assert!(
        c.run_until_true(WAIT, |c| holds(c, n, &want)),
        "n{n} never came to hold {want:?}:{}",
        c.describe()
    );
}

/// The liveness phase under etcd: one leader, every member in sync, checker clean.
pub fn converge_controlled(c: &mut Cluster) {
    if let Err(v) = c.converge_controlled(20_000) {
        panic!("{v}\n{}", tail(c));
    }
    clean(c);
}

/// The node that leads and serves, etcd-led.
pub fn leader(c: &Cluster) -> usize {
    c.serving_leader()
        .unwrap_or_else(|| panic!("no serving leader:{}", c.describe_controlled()))
}

/// Writes (a FLUSH every 50) and reads on `p` for `ms`, one a millisecond; the last instant
/// `p` acknowledged a write.
pub fn keep_writing(c: &mut Cluster, p: usize, ms: u64) -> Option<u64> {
    let mut last = None;
    for i in 0..ms {
        if c.write_on(p, i % 64).is_some() {
            last = Some(c.now);
        }
        if i % 50 == 0 {
            c.flush_on(p);
        }
        let _ = c.read_on(p, (i + 7) % 64);
        c.settle(1);
    }
    last
}
