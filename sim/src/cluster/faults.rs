//! Faults: the random mix the sweep injects between client steps, and the primitives it is
//! made of (connection resets, partitions, crashes, restarts), which scripts place by hand.

use rand::RngExt;

use super::queue::Ev;
use super::Cluster;
use crate::net::{ConnKey, NodeId};

impl Cluster {
    /// One round of random faults, each with its configured probability, in a fixed order.
    pub fn random_faults(&mut self) {
        let f = self.cfg.faults.clone();
        if self.rng.random_bool(f.reset) {
            let conns = self.net.of_node(self.rng.random_range(0..self.nodes.len()));
            if let Some(&k) = conns.first() {
                self.stats.resets += 1;
                self.log(format!("fault: reset connection {k:?}"));
                self.reset(k);
            }
        }
        if self.rng.random_bool(f.partition) {
            let a = self.rng.random_range(0..self.nodes.len());
            let b = self.rng.random_range(0..self.nodes.len());
            if a != b {
                self.stats.partitions += 1;
                self.log(format!("fault: partition {a} | {b}"));
                self.partition(a, b);
            }
        }
        if self.rng.random_bool(f.heal) {
            self.net.heal();
        }
        if self.rng.random_bool(f.crash) {
            let n = self.rng.random_range(0..self.nodes.len());
            if self.nodes[n].alive {
                self.crash(n);
            }
        }
        if self.rng.random_bool(f.restart) {
            let dead: Vec<NodeId> = (0..self.nodes.len())
                .filter(|&i| !self.nodes[i].alive)
                .collect();
            if !dead.is_empty() {
                let n = dead[self.rng.random_range(0..dead.len())];
                self.restart(n);
            }
        }
        // Drawn only when enabled, so the default mixes keep their histories.
        if f.fill > 0.0 && self.rng.random_bool(f.fill) {
            let n = self.rng.random_range(0..self.nodes.len());
            if !self.nodes[n].full {
                self.nodes[n].full = true;
                self.log(format!(
                    "fault: {}'s filesystem is full",
                    self.nodes[n].name
                ));
            }
        }
        if f.free > 0.0 && self.rng.random_bool(f.free) {
            self.free_space();
        }
        // Under etcd, etcd decides failovers, never the coordinator.
        if self.rng.random_bool(f.failover) && self.control.is_none() {
            self.failover();
        }
    }

    /// Every full filesystem has room again.
    pub(super) fn free_space(&mut self) {
        for n in 0..self.nodes.len() {
            if std::mem::take(&mut self.nodes[n].full) {
                let name = self.nodes[n].name.clone();
                self.log(format!("fault ends: {name}'s filesystem has room"));
            }
        }
    }

    /// Resets connection `k`: each side learns of it after its own delay.
    pub(super) fn reset(&mut self, k: ConnKey) {
        if self.net.close(&k) {
            for tell_replica in [true, false] {
                let d = self.delay();
                let ev = Ev::Closed {
                    conn: k,
                    tell_replica,
                };
                self.schedule(d, ev);
            }
        }
    }

    /// Resets (without partitioning) every connection of `n`: a brief network blip.
    pub fn blip(&mut self, n: NodeId) {
        for k in self.net.of_node(n) {
            self.reset(k);
        }
    }

    /// Cuts the link between `a` and `b`, resetting its connections.
    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.net.partition(a, b);
        for k in self.net.of_node(a) {
            if k.primary == b || k.replica == b {
                self.reset(k);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.net.heal();
    }

    /// Power loss on `n`, keeping a random number of its unsynced entries.
    pub fn crash(&mut self, n: NodeId) {
        let unsynced = self.unsynced(n);
        let keep = if unsynced == 0 {
            0
        } else {
            self.rng.random_range(0..=unsynced)
        };
        self.crash_keeping(n, keep);
    }

    fn unsynced(&self, n: NodeId) -> u64 {
        let s = &self.nodes[n].store;
        s.head().0 - s.durable.0
    }

    /// Power loss on `n`: of its unsynced entries, the first `keep` survive.
    pub fn crash_keeping(&mut self, n: NodeId, keep: u64) {
        self.stats.crashes += 1;
        let unsynced = self.unsynced(n);
        let keep = keep.min(unsynced);
        let node = &mut self.nodes[n];
        node.alive = false;
        node.role = None;
        node.store.crash(keep);
        self.control_crashed(n);
        let name = self.nodes[n].name.clone();
        let head = self.nodes[n].store.head();
        self.log(format!(
            "fault: {name} crashes (keeps {keep} of {unsynced} unsynced; head {head})"
        ));
        self.blip(n);
    }

    /// A crashed node comes back: the last primary as primary again at a new epoch (as a
    /// restarted `serve` does), anything else as a replica (an old primary rejoins).
    pub fn restart(&mut self, n: NodeId) {
        if self.nodes[n].alive {
            return;
        }
        if self.control.is_some() {
            // Under etcd a restarted node is a replica until etcd makes it lead.
            self.start_replica(n);
            self.control_restarted(n);
            return;
        }
        if n == self.primary {
            let epoch = self.nodes[n].store.epoch.next();
            self.start_primary(n, epoch);
        } else {
            self.start_replica(n);
        }
        let v = self.checker.after_restart(self.primary, &self.nodes);
        self.fail_on(v);
    }
}
