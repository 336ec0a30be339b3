//! The etcd-led mode's random history: a client that tries any node (a node that does not
//! lead refuses), the control plane's faults beside the usual ones, and the liveness phase.

use blockrep_replication::core::promotion;
use rand::RngExt;

use crate::check::Violation;
use crate::cluster::Cluster;
use crate::net::NodeId;

impl Cluster {
    /// `steps` client steps with faults, then the liveness phase.
    pub fn run_controlled(&mut self, steps: usize) -> Result<(), Violation> {
        self.run_until(30);
        for _ in 0..steps {
            self.client_step_anywhere();
            self.random_faults();
            self.random_control_faults();
            let t = self.now + 1 + self.rng.random_range(0..10);
            self.run_until(t);
            if let Some(v) = self.checker.violations.first() {
                return Err(v.clone());
            }
        }
        self.converge_controlled(20_000)
    }

    /// One client step on a random node: a write, a FLUSH or a read of a random block, as a
    /// client trying each node's address in turn would send it.
    pub fn client_step_anywhere(&mut self) {
        let n = self.rng.random_range(0..self.nodes.len());
        let block = self.rng.random_range(0..self.cfg.blocks);
        match self.rng.random_range(0..10) {
            0 => {
                self.flush_on(n);
            }
            1 | 2 => {
                self.read_on(n, block);
            }
            _ => {
                self.write_on(n, block);
            }
        }
    }

    fn random_control_faults(&mut self) {
        let Some(f) = self.control.as_ref().map(|cp| cp.cfg.faults.clone()) else {
            return;
        };
        let nodes = self.nodes.len();
        if self.rng.random_bool(f.etcd_cut) {
            let n = if self.rng.random_bool(0.5) {
                self.primary
            } else {
                self.rng.random_range(0..nodes)
            };
            self.cut_from_etcd(n);
        }
        if self.rng.random_bool(f.etcd_heal) {
            self.reconnect_all_to_etcd();
        }
        if self.rng.random_bool(f.etcd_down) {
            self.etcd_down();
        }
        if self.rng.random_bool(f.etcd_up) {
            self.etcd_up();
        }
        if self.rng.random_bool(f.pause) {
            let ttl = self.control.as_ref().map_or(0, |cp| cp.cfg.timing.ttl);
            let n = self.rng.random_range(0..nodes);
            let ms = self.rng.random_range(1..=2 * ttl.max(1));
            self.pause(n, ms);
        }
        if self.rng.random_bool(f.snapshot) {
            self.snapshot_etcd();
        }
        if self.rng.random_bool(f.restore) {
            self.restore_etcd();
        }
    }

    /// SIGSTOP on `n` for `ms`: nothing of its happens until then, and it resumes with the
    /// state it had.
    pub fn pause(&mut self, n: NodeId, ms: u64) {
        let until = self.now + ms;
        if let Some(cp) = self.control.as_mut() {
            if cp.nodes[n].ctl.is_some() {
                cp.nodes[n].paused_until = Some(until);
            }
        }
        self.stats.pauses += 1;
        let name = self.nodes[n].name.clone();
        self.log(format!("fault: {name} paused until {until}"));
    }

    /// Faults stop: the network heals, every node reaches etcd, etcd is up, paused nodes go
    /// on, crashed ones restart. Then, within `budget_ms`: exactly one leader, serving, and
    /// every other node its in-sync replica holding its volume.
    pub fn converge_controlled(&mut self, budget_ms: u64) -> Result<(), Violation> {
        self.net.heal();
        self.free_space();
        self.reconnect_all_to_etcd();
        self.etcd_up();
        let now = self.now;
        if let Some(cp) = self.control.as_mut() {
            for c in &mut cp.nodes {
                c.paused_until = c.paused_until.map(|t| t.min(now));
            }
        }
        for n in 0..self.nodes.len() {
            self.restart(n);
        }
        let deadline = self.now + budget_ms;
        let patience = 3 * self.control.as_ref().map_or(0, |cp| cp.cfg.timing.ttl);
        let operator = self
            .control
            .as_ref()
            .is_some_and(|cp| cp.cfg.operator_forces_failover);
        let mut waiting_since = self.now;
        while self.now < deadline {
            if self.serving_leader().is_some() {
                waiting_since = self.now;
            } else if operator && self.now >= waiting_since + patience {
                self.operator_forces_a_failover();
                waiting_since = self.now;
            }
            if let Some(p) = self.serving_leader() {
                let b = self.rng.random_range(0..self.cfg.blocks);
                self.write_on(p, b);
                self.flush_on(p);
            }
            let t = self.now + 50;
            self.run_until(t);
            if let Some(v) = self.checker.violations.first() {
                return Err(v.clone());
            }
            if let Some(p) = self.serving_leader() {
                if self.primary == p && self.converged() {
                    self.stats.lease_checked = self
                        .control
                        .as_ref()
                        .map_or(0, |cp| cp.safety.acknowledgements);
                    return self.checker.final_state(p, &self.nodes);
                }
            }
        }
        Err(Violation::new(
            "no single leader with every member in sync after faults stopped",
            self.describe_controlled(),
        ))
    }

    /// What an operator does when no leader serves: `blockrep ctl failover --to NODE --force`
    /// to the node the promotion rule would accept, should etcd's candidate rule and the
    /// promotion rule disagree again (docs/PROTOCOL.md, "The candidate rule and the promotion
    /// rule agree"; no sweep history needs it since a member outside the in-sync set whose log
    /// ends at a later epoch may be elected).
    fn operator_forces_a_failover(&mut self) {
        let mut candidates: Vec<NodeId> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect();
        candidates.sort_by_key(|&i| {
            std::cmp::Reverse((self.nodes[i].store.head_epoch(), self.nodes[i].store.head()))
        });
        let mode = self.cfg.mode;
        let configured = self.nodes.len() - 1;
        let candidates_first = candidates.first().copied();
        let accepted = candidates.into_iter().find(|&c| {
            let members: Vec<_> = (0..self.nodes.len())
                .filter(|&i| i != c && self.nodes[i].alive)
                .map(|i| self.facts(i))
                .collect();
            promotion::check(&self.facts(c), &members, configured, mode).is_ok()
        });
        // Under best-effort the rule can refuse everyone (a longer log of an older epoch
        // here, a shorter one of the newest epoch there): the operator forces the most
        // complete copy, as best-effort promises nothing across a failover anyway. Under the
        // other modes a forced promotion could lose an acknowledged FLUSH: never.
        let forced = || {
            (mode == blockrep_replication::core::CommitMode::BestEffort)
                .then_some(candidates_first)
                .flatten()
        };
        let Some(to) = accepted.or_else(forced) else {
            return;
        };
        let name = self.nodes[to].name.clone();
        self.stats.forced_failovers += 1;
        self.log(format!(
            "operator: blockrep ctl failover --to {name} --force"
        ));
        self.request_failover(&name, true);
    }

    /// The one node etcd's cores make leader and that serves, if exactly one does and every
    /// other node is a replica.
    pub fn serving_leader(&self) -> Option<NodeId> {
        let cp = self.control.as_ref()?;
        let leaders: Vec<NodeId> = (0..self.nodes.len())
            .filter(|&n| cp.node(n).ctl.as_ref().is_some_and(|c| c.is_leader()))
            .collect();
        let [p] = leaders[..] else {
            return None;
        };
        let others_replicas = (0..self.nodes.len())
            .filter(|&n| n != p)
            .all(|n| !self.nodes[n].alive || self.nodes[n].is_replica());
        (cp.node(p).serving && others_replicas).then_some(p)
    }

    pub fn describe_controlled(&self) -> String {
        let mut out = self.describe();
        if let Some(cp) = &self.control {
            out.push_str(&format!(
                "\n  etcd up={} revision {}",
                cp.etcd_up,
                cp.etcd.revision()
            ));
            for (i, c) in cp.nodes.iter().enumerate() {
                let now = self.local_now(i);
                let ctl = c.ctl.as_ref();
                out.push_str(&format!(
                    "\n  n{i}: leader={} epoch {:?} serving={} may_ack={} link={} lease={:?} rate {}ppm",
                    ctl.is_some_and(|c| c.is_leader()),
                    ctl.and_then(|c| c.epoch()),
                    c.serving,
                    ctl.is_some_and(|c| c.may_acknowledge(now)),
                    c.link_up,
                    c.lease,
                    c.rate_ppm
                ));
            }
        }
        out
    }
}
