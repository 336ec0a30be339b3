//! The gate every acknowledgement passes in the etcd-led mode, at the instant it is sent:
//! the core's lease on the node's own clock, and for a FLUSH the in-sync rule.

use super::Cluster;
use crate::cluster::FlushOutcome;
use crate::net::NodeId;

impl Cluster {
    /// Whether node `n` may send an acknowledgement now: it serves as etcd's leader and its
    /// core says its lease holds, on its own clock. Always, outside the etcd-led mode.
    pub(in crate::cluster) fn may_acknowledge(&self, n: NodeId) -> bool {
        let Some(cp) = &self.control else {
            return true;
        };
        let c = cp.node(n);
        let now = self.local_now(n);
        self.nodes[n].alive
            && !self.is_paused(n)
            && c.serving
            && c.hold_until.is_none()
            && c.ctl.as_ref().is_some_and(|ctl| ctl.may_acknowledge(now))
    }

    /// Whether primary `n` may acknowledge a FLUSH that skips whom it skips: no member etcd
    /// records in sync at its epoch is missing from what its replication counts.
    fn in_sync_rule_holds(&self, n: NodeId) -> bool {
        let Some(ctl) = self.control.as_ref().and_then(|cp| cp.node(n).ctl.as_ref()) else {
            return true;
        };
        let counted = self.counted_in_sync(n);
        let me = &self.nodes[n].name;
        ctl.recorded_in_sync()
            .iter()
            .all(|m| m == me || counted.contains(m))
    }

    /// The replication core finished flush `id` on `p`: whether to acknowledge it now. Fails
    /// it past the lease, parks it while the in-sync rule holds it back.
    pub(in crate::cluster) fn flush_gate(&mut self, p: NodeId, id: u64) -> bool {
        if self.control.is_none() {
            return true;
        }
        if !self.may_acknowledge(p) {
            self.withhold_flush(p, id);
            return false;
        }
        if !self.in_sync_rule_holds(p) {
            if let Some(cp) = self.cp() {
                cp.nodes[p].parked.push(id);
            }
            return false;
        }
        let now = self.now;
        let v = self.cp().and_then(|cp| cp.safety.acknowledged(p, now));
        self.fail_on(v);
        true
    }

    fn withhold_flush(&mut self, p: NodeId, id: u64) {
        if let Some(pn) = self.nodes[p].primary_mut() {
            pn.barriers.remove(&id);
        }
        self.outcomes
            .insert(id, FlushOutcome::Failed("lease".to_string()));
        self.stats.flushes_failed += 1;
        let name = self.nodes[p].name.clone();
        self.log(format!("flush withheld by {name}: no lease"));
    }

    /// Acknowledges parked flushes the in-sync rule now lets through.
    pub(super) fn release_parked(&mut self, p: NodeId) {
        let parked = match self.cp() {
            Some(cp) if !cp.nodes[p].parked.is_empty() => std::mem::take(&mut cp.nodes[p].parked),
            _ => return,
        };
        for id in parked {
            if self.flush_gate(p, id) {
                self.acknowledge_barrier(p, id);
            }
        }
    }

    /// The client's write to `block` was acknowledged by `n`.
    pub(in crate::cluster) fn write_acknowledged(&mut self, n: NodeId, block: u64, value: u64) {
        let now = self.now;
        let v = self
            .cp()
            .and_then(|cp| cp.safety.wrote(n, block, value, now));
        self.fail_on(v);
    }

    /// A client read of `block` on node `n`, if it serves as a primary and may acknowledge.
    pub fn read_on(&mut self, n: NodeId, block: u64) -> Option<u64> {
        let serving = self.nodes[n]
            .primary()
            .is_some_and(|pn| pn.core.fenced().is_none());
        if !self.nodes[n].alive || !serving || !self.may_acknowledge(n) {
            return None;
        }
        let value = self.value(n, block).unwrap_or(0);
        let now = self.now;
        let v = self
            .cp()
            .and_then(|cp| cp.safety.read(n, block, value, now));
        self.fail_on(v);
        Some(value)
    }
}
