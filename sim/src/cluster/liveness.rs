//! The liveness phase: once faults stop, the cluster must converge, every replica in sync
//! and holding the primary's volume.

use blockrep_replication::core::primary::PeerState;
use rand::RngExt;

use super::Cluster;
use crate::check::Violation;

impl Cluster {
    /// Stops faults, heals the network, brings every node back, and runs until the cluster
    /// converges: every replica in sync and holding the primary's volume, after a flush.
    pub fn converge(&mut self, budget_ms: u64) -> Result<(), Violation> {
        self.net.heal();
        self.free_space();
        self.replace_a_lost_primary();
        self.bring_everyone_back();
        let deadline = self.now + budget_ms;
        while self.now < deadline {
            self.write_some();
            self.flush();
            let t = self.now + 50;
            self.run_until(t);
            if let Some(v) = self.checker.violations.first() {
                return Err(v.clone());
            }
            if self.converged() {
                return self.checker.final_state(self.primary, &self.nodes);
            }
        }
        Err(Violation::new(
            "no convergence after faults stopped",
            self.describe(),
        ))
    }

    /// A fenced or dead primary is replaced by the coordinator; when nobody else can take
    /// over, the old primary comes back.
    fn replace_a_lost_primary(&mut self) {
        let p = self.primary;
        if !self.nodes[p].is_fenced_primary() && self.nodes[p].alive {
            return;
        }
        self.log("liveness: replacing the primary".into());
        if self.elect(p).is_some() {
            return;
        }
        if !self.nodes[p].alive {
            self.restart(p);
        } else {
            let epoch = self.nodes[p].store.epoch.next();
            self.nodes[p].role = None;
            self.start_primary(p, epoch);
        }
    }

    /// Restarts every crashed node; a stale primary (zombie) stops serving and rejoins as a
    /// replica.
    fn bring_everyone_back(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                self.restart(i);
            } else if i != self.primary && !self.nodes[i].is_replica() {
                self.nodes[i].role = None;
                self.blip(i);
                self.start_replica(i);
            }
        }
    }

    fn write_some(&mut self) {
        let b = self.rng.random_range(0..self.cfg.blocks);
        self.write(b);
    }

    pub(super) fn converged(&self) -> bool {
        let Some(pn) = self.nodes[self.primary].primary() else {
            return false;
        };
        if pn.core.fenced().is_some() {
            return false;
        }
        let head = self.nodes[self.primary].store.head();
        pn.core
            .peers()
            .iter()
            .all(|peer| peer.state == PeerState::InSync && peer.durable == head)
            && pn.core.committed() == head
    }
}
