//! The etcd-led mode's checker, beside `check`'s (which still checks every acknowledged FLUSH
//! against the stores): what leases and epochs promise, judged on the simulator's one true
//! clock, never on a node's own.
//!
//! - *One acknowledger per lease*: once a node has begun serving as leader, no node whose
//!   leadership began earlier acknowledges anything (a write, a FLUSH, a read) again until it
//!   is itself made leader anew.
//! - *Lease safety*: no read served by a node returns other than a write to the same block
//!   that another node acknowledged after this node's leadership began.
//! - *No epoch is ever handed out twice*: each epoch is served by one leadership only.

use std::collections::{BTreeMap, HashMap};

use blockrep_storage::Epoch;

use crate::check::Violation;
use crate::net::NodeId;

/// An acknowledged write: when, by whom, what.
#[derive(Debug, Clone, Copy)]
struct AckedWrite {
    at: u64,
    node: NodeId,
    value: u64,
}

#[derive(Debug, Default)]
pub struct LeaseSafety {
    /// When each node last began serving as leader (None: never). Kept through crashes: a
    /// node's acknowledgements are gated on leading, so only a newer start matters.
    lead_start: Vec<Option<u64>>,
    /// The last acknowledged write to each block.
    writes: HashMap<u64, AckedWrite>,
    /// Which node served each epoch, and from when.
    epochs: BTreeMap<Epoch, (NodeId, u64)>,
    pub acknowledgements: u64,
    pub reads: u64,
}

impl LeaseSafety {
    pub fn new(nodes: usize) -> LeaseSafety {
        LeaseSafety {
            lead_start: vec![None; nodes],
            ..LeaseSafety::default()
        }
    }

    /// Node `n` begins serving as leader at `epoch`, at `now`.
    pub fn began_leading(&mut self, n: NodeId, epoch: Epoch, now: u64) -> Option<Violation> {
        self.lead_start[n] = Some(now);
        if let Some((m, at)) = self.epochs.insert(epoch, (n, now)) {
            return Some(Violation::new(
                "an epoch was handed out twice",
                format!("n{n} serves at epoch {epoch} at {now}; n{m} served at it from {at}"),
            ));
        }
        None
    }

    /// Node `n` acknowledged something at `now`.
    pub fn acknowledged(&mut self, n: NodeId, now: u64) -> Option<Violation> {
        self.acknowledgements += 1;
        let Some(mine) = self.lead_start[n] else {
            return Some(Violation::new(
                "a node acknowledged without leading",
                format!("n{n} at {now}"),
            ));
        };
        let newer = (0..self.lead_start.len())
            .find(|&m| m != n && self.lead_start[m].is_some_and(|t| t > mine));
        newer.map(|m| {
            Violation::new(
                "two nodes acknowledged in overlapping leases",
                format!(
                    "n{n} (leading since {mine}) acknowledged at {now}, after n{m} began leading at {}",
                    self.lead_start[m].unwrap_or_default()
                ),
            )
        })
    }

    pub fn wrote(&mut self, n: NodeId, block: u64, value: u64, now: u64) -> Option<Violation> {
        let v = self.acknowledged(n, now);
        self.writes.insert(
            block,
            AckedWrite {
                at: now,
                node: n,
                value,
            },
        );
        v
    }

    /// Node `n` served a read of `block` returning `value`.
    pub fn read(&mut self, n: NodeId, block: u64, value: u64, now: u64) -> Option<Violation> {
        self.reads += 1;
        if let Some(w) = self.writes.get(&block) {
            let since = self.lead_start[n].unwrap_or(0);
            if w.node != n && w.at > since && w.value != value {
                return Some(Violation::new(
                    "a read missed a newer acknowledged write (lease safety)",
                    format!(
                        "n{n} read {value} from block {block} at {now}; n{} acknowledged {} there at {}",
                        w.node, w.value, w.at
                    ),
                ));
            }
        }
        self.acknowledged(n, now)
    }
}
