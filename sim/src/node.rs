//! A simulated node: its store and the core it runs, if any. The cluster drives the cores;
//! the checker reads the stores. Both use these types, which is why they live apart from
//! either.

use std::collections::HashMap;

use blockrep_replication::core::primary::PrimaryCore;
use blockrep_replication::core::replica::ReplicaCore;
use blockrep_replication::core::ReplicaId;
use blockrep_storage::Lsn;

use crate::net::NodeId;
use crate::store::SimStore;

/// A node serving as a primary: its core and what the simulator keeps beside it.
pub(crate) struct PrimaryNode {
    pub(crate) core: PrimaryCore,
    pub(crate) peers: Vec<(ReplicaId, NodeId)>,
    /// Barrier id -> target.
    pub(crate) barriers: HashMap<u64, Lsn>,
    pub(crate) last_committed: Lsn,
}

/// The core a running node runs.
pub(crate) enum Role {
    Primary(Box<PrimaryNode>),
    Replica(Box<ReplicaCore>),
}

/// One machine of the simulated cluster (not a protocol concept: the cores know only peers).
pub struct SimNode {
    pub name: String,
    pub store: SimStore,
    pub(crate) role: Option<Role>,
    pub alive: bool,
    /// Bumped by every (re)start, so events of an earlier life are recognised and dropped.
    pub life: u64,
    /// Its filesystem is full (a fault): as a replica it stores no entry or base data.
    pub full: bool,
}

impl SimNode {
    pub(crate) fn primary(&self) -> Option<&PrimaryNode> {
        match &self.role {
            Some(Role::Primary(pn)) => Some(pn),
            _ => None,
        }
    }

    pub(crate) fn primary_mut(&mut self) -> Option<&mut PrimaryNode> {
        match &mut self.role {
            Some(Role::Primary(pn)) => Some(pn),
            _ => None,
        }
    }

    pub(crate) fn is_replica(&self) -> bool {
        matches!(self.role, Some(Role::Replica(_)))
    }

    /// Serves as a primary whose core has been fenced (a zombie that learned of it).
    pub(crate) fn is_fenced_primary(&self) -> bool {
        self.primary().is_some_and(|pn| pn.core.fenced().is_some())
    }
}
