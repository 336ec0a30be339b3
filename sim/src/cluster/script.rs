//! Scripted control of a cluster, for the scenario catalogue: the same cores, network and
//! checker as the random sweep, with the faults placed by hand.

use blockrep_replication::core::primary::{
    PeerState, PeerStatus, PrimaryCounters, RebuildProgress,
};
use blockrep_replication::core::CommitMode;
use blockrep_storage::{Epoch, Lsn, RebuildCursor};

use super::{Cluster, Config, Faults, FlushOutcome};
use crate::check::Violation;
use crate::net::NodeId;

impl Cluster {
    /// Three nodes under `mode`, n0 primary, no random faults; runs until every replica is in
    /// sync.
    pub fn scripted(mode: CommitMode) -> Cluster {
        Cluster::scripted_nodes(mode, 3)
    }

    /// As [`Cluster::scripted`], with `nodes` nodes (n0 primary, the rest its replicas).
    pub fn scripted_nodes(mode: CommitMode, nodes: usize) -> Cluster {
        let mut cfg = Config::new(0, mode);
        cfg.nodes = nodes;
        cfg.faults = Faults::none();
        let mut c = Cluster::new(cfg);
        assert!(
            c.all_in_sync(2_000),
            "the cluster never came up:{}",
            c.describe()
        );
        c
    }

    /// Lets `ms` of simulated time pass.
    pub fn settle(&mut self, ms: u64) {
        let until = self.now + ms;
        self.run_until(until);
    }

    /// Flushes on `n` and waits up to `budget_ms` for the answer.
    pub fn flush_and_wait(&mut self, n: NodeId, budget_ms: u64) -> Option<FlushOutcome> {
        let id = self.flush_on(n)?;
        self.run_until_true(budget_ms, |c| c.outcomes.contains_key(&id));
        self.outcomes.get(&id).cloned()
    }

    /// How primary `p` sees replica node `r`.
    pub fn peer_state(&self, p: NodeId, r: NodeId) -> Option<PeerState> {
        self.peer(p, r).map(|peer| peer.state)
    }

    /// What primary `p` last heard replica node `r` report durable.
    pub fn peer_durable(&self, p: NodeId, r: NodeId) -> Option<Lsn> {
        self.peer(p, r).map(|peer| peer.durable)
    }

    fn peer(&self, p: NodeId, r: NodeId) -> Option<PeerStatus> {
        let pn = self.nodes[p].primary()?;
        let name = &self.nodes[r].name;
        pn.core.peers().into_iter().find(|peer| &peer.id.0 == name)
    }

    /// Runs until primary `p` sees `r` in `state` (true) or `budget_ms` passes (false).
    pub fn wait_for(&mut self, p: NodeId, r: NodeId, state: PeerState, budget_ms: u64) -> bool {
        self.run_until_true(budget_ms, |c| c.peer_state(p, r) == Some(state))
    }

    /// Runs until `done` holds (true) or `budget_ms` passes (false).
    pub fn run_until_true(&mut self, budget_ms: u64, done: impl Fn(&Cluster) -> bool) -> bool {
        let deadline = self.now + budget_ms;
        loop {
            if done(self) {
                return true;
            }
            if self.now >= deadline {
                return false;
            }
            let t = self.now + 1;
            self.run_until(t);
        }
    }

    /// Runs until the current primary sees every replica in sync.
    pub fn all_in_sync(&mut self, budget_ms: u64) -> bool {
        let p = self.primary;
        self.run_until_true(budget_ms, |c| {
            (0..c.nodes.len())
                .filter(|&r| r != p)
                .all(|r| c.peer_state(p, r) == Some(PeerState::InSync))
        })
    }

    /// The primary's counters (sessions, catch-ups, rebuilds...).
    pub fn counters(&self, p: NodeId) -> Option<PrimaryCounters> {
        self.nodes[p].primary().map(|pn| pn.core.counters().clone())
    }

    /// Leaves `n` running but unreachable from every other node (a zombie, if primary).
    pub fn cut_off(&mut self, n: NodeId) {
        for i in 0..self.nodes.len() {
            if i != n {
                self.partition(n, i);
            }
        }
    }

    /// The value node `n` would read from `block` (its image plus its WAL).
    pub fn value(&self, n: NodeId, block: u64) -> Option<u64> {
        self.nodes[n].store.state().get(&block).copied()
    }

    pub fn head(&self, n: NodeId) -> Lsn {
        self.nodes[n].store.head()
    }

    /// What node `n`'s store has fsynced.
    pub fn durable(&self, n: NodeId) -> Lsn {
        self.nodes[n].store.durable
    }

    pub fn epoch(&self, n: NodeId) -> Epoch {
        self.nodes[n].store.epoch
    }

    pub fn is_primary(&self, n: NodeId) -> bool {
        self.nodes[n].primary().is_some() && self.nodes[n].alive
    }

    pub fn is_fenced(&self, n: NodeId) -> bool {
        self.nodes[n].is_fenced_primary()
    }

    pub fn is_rebuilding(&self, n: NodeId) -> bool {
        self.nodes[n].store.rebuilding
    }

    /// The durable cursor of the rebuild node `n` is in, if it wrote one.
    pub fn rebuild_cursor(&self, n: NodeId) -> Option<RebuildCursor> {
        let s = &self.nodes[n].store;
        s.cursor.clone().filter(|_| s.rebuilding)
    }

    /// How primary `p` sees the rebuild of replica node `r`, if one runs.
    pub fn peer_rebuild(&self, p: NodeId, r: NodeId) -> Option<RebuildProgress> {
        self.peer(p, r).and_then(|peer| peer.rebuild)
    }

    /// Everything the checker has flagged so far.
    pub fn violations(&self) -> &[Violation] {
        &self.checker.violations
    }

    /// Brings a crashed node back as a replica, whatever it was before.
    pub fn restart_as_replica(&mut self, n: NodeId) {
        if !self.nodes[n].alive {
            self.start_replica(n);
        }
    }

    /// `n`'s store syncs and checkpoints everything it holds, whatever its checkpoint gate
    /// says: a clean close, or a checkpoint that stopped waiting because the WAL filled up.
    /// The WAL keeps only what the store's pin asks for.
    pub fn checkpoint_past_the_gate(&mut self, n: NodeId) {
        let s = &mut self.nodes[n].store;
        s.sync();
        s.checkpoint();
        let (image, kept) = (s.image_lsn, s.retained_from);
        let name = self.nodes[n].name.clone();
        self.log(format!(
            "{name} checkpoints past its gate: data file through {image}, WAL from {kept}"
        ));
    }

    /// Where `n`'s data file is (its last checkpoint) and where its WAL begins.
    pub fn checkpointed(&self, n: NodeId) -> (Lsn, Lsn) {
        let s = &self.nodes[n].store;
        (s.image_lsn, s.retained_from)
    }

    /// Crash `n` with nothing unsynced surviving (the worst case for the node).
    pub fn crash_losing_unsynced(&mut self, n: NodeId) {
        self.crash_keeping(n, 0);
    }
}
