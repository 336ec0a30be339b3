//! The simulated network: connections between a primary's session and a replica, each a FIFO
//! byte stream like TCP (delays vary but never reorder within a connection), which a fault
//! can reset. Messages of a connection that was reset are lost. Old sessions' messages can
//! still arrive late at a node that has moved on: that is the reordering the protocol must
//! survive.

use std::collections::HashMap;

/// A node, by index.
pub type NodeId = usize;

/// One transport connection: the primary's session id (the replica sees it as its ConnId).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub primary: NodeId,
    pub replica: NodeId,
    pub session: u64,
}

impl ConnKey {
    /// The session field packs the primary's life and the core's session number, so a
    /// restarted primary's sessions never collide with its earlier life's.
    pub fn new(primary: NodeId, replica: NodeId, life: u64, session: u64) -> ConnKey {
        ConnKey {
            primary,
            replica,
            session: (life << 40) | session,
        }
    }

    /// The life of the primary that opened the connection.
    pub fn life(&self) -> u64 {
        self.session >> 40
    }

    /// The session number as the primary's core knows it.
    pub fn session_number(&self) -> u64 {
        self.session & ((1 << 40) - 1)
    }
}

#[derive(Debug, Default)]
pub struct Network {
    /// Open connections and when their last message is due (FIFO per connection).
    open: HashMap<ConnKey, u64>,
    /// Pairs that cannot talk (both directions).
    cut: std::collections::HashSet<(NodeId, NodeId)>,
}

impl Network {
    pub fn connected(&self, a: NodeId, b: NodeId) -> bool {
        !self.cut.contains(&(a.min(b), a.max(b)))
    }

    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a.min(b), a.max(b)));
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn open(&mut self, k: ConnKey, now: u64) {
        self.open.insert(k, now);
    }

    pub fn is_open(&self, k: &ConnKey) -> bool {
        self.open.contains_key(k)
    }

    pub fn close(&mut self, k: &ConnKey) -> bool {
        self.open.remove(k).is_some()
    }

    /// Connections touching `node`.
    pub fn of_node(&self, node: NodeId) -> Vec<ConnKey> {
        let mut v: Vec<ConnKey> = self
            .open
            .keys()
            .filter(|k| k.primary == node || k.replica == node)
            .copied()
            .collect();
        v.sort();
        v
    }

    /// When a message sent now on `k` with `delay` arrives (never before an earlier one).
    pub fn schedule(&mut self, k: &ConnKey, now: u64, delay: u64) -> Option<u64> {
        let last = self.open.get_mut(k)?;
        let at = (now + delay).max(*last);
        *last = at;
        Some(at)
    }
}
