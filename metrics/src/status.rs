//! The status report a node serves at `/v1/status` (and `blockrep status` prints).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub volume: String,
    pub store: String,
    /// "primary" or "replica".
    pub role: String,
    pub epoch: u64,
    pub head_lsn: u64,
    pub durable_lsn: u64,
    pub committed_lsn: u64,
    pub checkpoint_lsn: u64,
    pub wal_used_bytes: u64,
    pub wal_capacity_bytes: u64,
    /// The oldest entry the WAL still holds.
    #[serde(default)]
    pub wal_oldest_lsn: u64,
    /// What keeps entries already in the data file in the WAL, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_hold: Option<WalHoldReport>,
    pub commit_mode: Option<String>,
    /// The epoch that fenced this primary, if any.
    pub fenced_by: Option<u64>,
    pub rebuilding: bool,
    /// A rebuilding replica: bytes of the base durable in its cursor (what a resume keeps).
    #[serde(default)]
    pub rebuild_cursor_bytes: Option<u64>,
    pub replicas: Vec<ReplicaReport>,
    /// A node of an etcd-led volume (`blockrep node`): what the control plane says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlReport>,
}

/// A hold on the WAL: checkpoints keep the entries from `from_lsn` on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WalHoldReport {
    pub from_lsn: u64,
    /// `lagging-replica` (a replica's catch-up will read them), `after-committed` (a
    /// replica's hold after the committed LSN, so that its old primary can rejoin by catch-up
    /// if it is promoted; gives way when the WAL is full), `kept-from-last-run` (until
    /// replication says what its replicas need; gives way when the WAL is full).
    pub reason: String,
}

/// The control plane's part of a node's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ControlReport {
    /// This node's name in etcd.
    pub node: String,
    /// "primary", "replica" or "standby".
    pub role: String,
    /// Who holds the leader key, if anyone (as this node last saw it).
    pub leader: Option<String>,
    /// The epoch this node leads at, or follows.
    pub epoch: u64,
    /// Seconds left until the leader's local lease deadline (leaders only).
    pub lease_remaining_seconds: Option<f64>,
    /// Serving on with etcd unreachable (`--failsafe`).
    pub failsafe: bool,
    /// Since this node's last promotion: the previous leader's last reported head minus this
    /// node's head when it took over, in LSNs (writes it may have lost; see docs/OPERATIONS.md
    /// section 13). Absent when no other node led before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_window_lsns: Option<u64>,
    /// The previous leader that `loss_window_lsns` is measured against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_window_from: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplicaReport {
    pub name: String,
    pub address: String,
    pub state: String,
    /// Why it is in that state.
    pub reason: String,
    pub durable_lsn: u64,
    pub lag_lsn: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub rebuild: Option<RebuildReport>,
    /// What its last completed rebuild cost (since this primary started).
    #[serde(default)]
    pub last_rebuild: Option<RebuildCost>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RebuildReport {
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Seconds to go at the rate so far, once there is a rate.
    pub eta_seconds: Option<f64>,
    /// Base data bytes sent on this attempt.
    #[serde(default)]
    pub sent_bytes: u64,
    /// A resumed rebuild: the offset its base image continued from.
    #[serde(default)]
    pub resumed_from: Option<u64>,
}

/// One completed rebuild, from its first start to in sync, across its interruptions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RebuildCost {
    pub sent_bytes: u64,
    pub seconds_to_in_sync: f64,
    pub resumes: u32,
    pub restarts: u32,
}
