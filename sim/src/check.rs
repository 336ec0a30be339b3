//! The checker: invariants checked against ground truth (the stores' real durable state), not
//! against what the protocol believes.
//!
//! - A flush acknowledged under a commit mode is durable on the copies the mode requires
//!   (I1), with the primary's history.
//! - The committed prefix only grows, and never changes history.
//! - A promoted node holds the whole committed prefix (I4); so does every primary after a
//!   restart.
//! - At the end, every node's volume is exactly what its own log lineage says it should be,
//!   and every in-sync replica holds the primary's volume.

use std::collections::BTreeMap;
use std::fmt;

use blockrep_replication::core::CommitMode;
use blockrep_storage::{epoch_at, Epoch, Lsn};

use crate::net::NodeId;
use crate::node::SimNode;
use crate::store::{Entry, SimStore};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub what: String,
    pub detail: String,
}

impl Violation {
    pub fn new(what: &str, detail: String) -> Violation {
        Violation {
            what: what.to_string(),
            detail,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.detail)
    }
}

pub struct Checker {
    mode: CommitMode,
    pub violations: Vec<Violation>,
    /// Every entry ever written, by (LSN, epoch): unique across failovers.
    pub entries: BTreeMap<(Lsn, Epoch), Entry>,
    /// The committed prefix: its length and the history it follows.
    pub book_len: Lsn,
    pub book_history: Vec<(Epoch, Lsn)>,
    next_value: u64,
}

/// Whether two histories give the same epoch to every LSN through `upto`.
pub fn agree(a: &[(Epoch, Lsn)], b: &[(Epoch, Lsn)], upto: Lsn) -> bool {
    // Both are step functions: equal at every step of either means equal everywhere.
    let points = a
        .iter()
        .chain(b.iter())
        .map(|(_, l)| *l)
        .chain(std::iter::once(upto))
        .filter(|l| *l <= upto && *l > Lsn::ZERO);
    points.into_iter().all(|l| epoch_at(a, l) == epoch_at(b, l))
}

impl Checker {
    pub fn new(mode: CommitMode) -> Checker {
        Checker {
            mode,
            violations: Vec::new(),
            entries: BTreeMap::new(),
            book_len: Lsn::ZERO,
            book_history: Vec::new(),
            next_value: 1,
        }
    }

    pub fn new_value(&mut self) -> u64 {
        let v = self.next_value;
        self.next_value += 1;
        v
    }

    pub fn wrote(&mut self, e: Entry) {
        self.entries.insert((e.lsn, e.epoch), e);
    }

    /// Whether node `n` durably holds entries through `target` with history `h`.
    fn holds(nodes: &[SimNode], n: NodeId, target: Lsn, h: &[(Epoch, Lsn)]) -> bool {
        let s = &nodes[n].store;
        !s.rebuilding && s.durable >= target && agree(&s.history, h, target)
    }

    /// Primary `p` acknowledged a flush through `target`.
    pub fn flush_acked(
        &mut self,
        p: NodeId,
        target: Lsn,
        nodes: &[SimNode],
        replicas: Vec<NodeId>,
    ) -> Option<Violation> {
        let h = nodes[p].store.history.clone();
        if !Self::holds(nodes, p, target, &h) {
            return Some(Violation::new(
                "an acknowledged flush is not durable on the primary",
                format!("{} through {target}", nodes[p].name),
            ));
        }
        let holding: Vec<&str> = replicas
            .iter()
            .filter(|&&r| Self::holds(nodes, r, target, &h))
            .map(|&r| nodes[r].name.as_str())
            .collect();
        let ok = match self.mode {
            CommitMode::BestEffort => true,
            CommitMode::SyncAll => holding.len() == replicas.len(),
            CommitMode::SyncQuorum => {
                // A majority of all copies, the primary being one of them.
                let copies = replicas.len() + 1;
                holding.len() + 1 > copies / 2
            }
        };
        if !ok {
            return Some(Violation::new(
                "an acknowledged flush is not durable where the commit mode promises (I1)",
                format!(
                    "{} acknowledged {target} under {}; durable with its history on the primary and [{}] of {} replicas",
                    nodes[p].name,
                    self.mode,
                    holding.join(", "),
                    replicas.len()
                ),
            ));
        }
        // Only copies the mode protects count for what survives a failover; best-effort
        // promises nothing beyond the primary, so its flushes do not extend the book.
        if self.mode == CommitMode::BestEffort {
            return None;
        }
        if !agree(&self.book_history, &h, self.book_len.min(target)) {
            return Some(Violation::new(
                "the committed prefix changed history",
                format!(
                    "{} committed {target} on a history that differs from the committed one",
                    nodes[p].name
                ),
            ));
        }
        if target > self.book_len {
            self.book_len = target;
            self.book_history = h.into_iter().filter(|(_, l)| *l <= target).collect();
        }
        None
    }

    /// Whether store `s` misses part of the committed prefix, or holds it with another
    /// history.
    fn lacks_committed_prefix(&self, s: &SimStore) -> bool {
        s.head() < self.book_len || !agree(&s.history, &self.book_history, self.book_len)
    }

    /// Node `c` is being promoted: it must hold the committed prefix.
    pub fn promoted(&mut self, c: NodeId, nodes: &[SimNode]) -> Option<Violation> {
        let s = &nodes[c].store;
        if self.lacks_committed_prefix(s) {
            return Some(Violation::new(
                "a promoted node lacks the committed prefix (I4)",
                format!(
                    "{} (head {}) promoted; committed through {}",
                    nodes[c].name,
                    s.head(),
                    self.book_len
                ),
            ));
        }
        None
    }

    /// After a restart, the current primary (if up) still holds the committed prefix.
    pub fn after_restart(&mut self, p: NodeId, nodes: &[SimNode]) -> Option<Violation> {
        if !nodes[p].alive {
            return None;
        }
        let s = &nodes[p].store;
        if self.lacks_committed_prefix(s) {
            return Some(Violation::new(
                "the primary lost committed entries",
                format!(
                    "{} head {} committed {}",
                    nodes[p].name,
                    s.head(),
                    self.book_len
                ),
            ));
        }
        None
    }

    /// After convergence: every node's volume is what its lineage says, and replicas hold
    /// the primary's.
    pub fn final_state(&self, p: NodeId, nodes: &[SimNode]) -> Result<(), Violation> {
        let norm = |m: BTreeMap<u64, u64>| -> BTreeMap<u64, u64> {
            m.into_iter().filter(|(_, v)| *v != 0).collect()
        };
        let ps = norm(nodes[p].store.state());
        let expect = norm(expected_state(
            &self.entries,
            &nodes[p].store.history,
            nodes[p].store.head(),
        ));
        if ps != expect {
            return Err(Violation::new(
                "the primary's volume is not what its log says",
                diff(&ps, &expect),
            ));
        }
        if self.mode != CommitMode::BestEffort && self.lacks_committed_prefix(&nodes[p].store) {
            return Err(Violation::new(
                "the final primary lacks the committed prefix",
                format!("head {} committed {}", nodes[p].store.head(), self.book_len),
            ));
        }
        for (i, n) in nodes.iter().enumerate() {
            if i == p {
                continue;
            }
            let s = norm(n.store.state());
            if s != ps {
                return Err(Violation::new(
                    "a converged replica's volume differs from the primary's",
                    format!("{}: {}", n.name, diff(&s, &ps)),
                ));
            }
        }
        Ok(())
    }
}

/// The final state of the volume according to a node's log lineage.
pub fn expected_state(
    entries: &BTreeMap<(Lsn, Epoch), Entry>,
    history: &[(Epoch, Lsn)],
    head: Lsn,
) -> BTreeMap<u64, u64> {
    let mut s = BTreeMap::new();
    for l in 1..=head.0 {
        let lsn = Lsn(l);
        let Some(e) = epoch_at(history, lsn) else {
            continue;
        };
        if let Some(entry) = entries.get(&(lsn, e)).filter(|e| e.writes()) {
            s.insert(entry.block, entry.value);
        }
    }
    s
}

fn diff(a: &BTreeMap<u64, u64>, b: &BTreeMap<u64, u64>) -> String {
    let mut out = Vec::new();
    for k in a.keys().chain(b.keys()) {
        if a.get(k) != b.get(k) && out.len() < 5 {
            out.push(format!("block {k}: {:?} vs {:?}", a.get(k), b.get(k)));
        }
    }
    out.dedup();
    out.join("; ")
}
