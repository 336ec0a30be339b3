//! blockrep-control: the decisions of automatic failover, as a sans-IO core.
//!
//! It owns who may lead a volume and when: the layout of the volume's keys in etcd
//! ([`keys`]), the records stored under them ([`record`]), the transactions that change them
//! ([`txn`]), the lease deadline a leader must stop acknowledging by ([`lease`]), the ranking
//! of failover candidates ([`rank`]), the tag an elected epoch carries ([`leader_tag`]) and the state machine that ties them together
//! ([`controller`]).
//!
//! It must never touch I/O: no tokio, no etcd client, no clock, no socket. Time arrives as
//! milliseconds inside events; etcd requests leave as [`txn::Txn`] actions for a driver (the
//! binary's `src/control`, or the simulator's in-memory etcd) to carry out. Safety never rests
//! on etcd alone: a node etcd makes leader still fences the replicas at its epoch before it
//! serves (replication's promotion), and a FLUSH is still answered only by the replicas' own
//! acknowledgements. What etcd adds is a deadline after which a leader acknowledges nothing.

pub mod controller;
pub mod keys;
pub mod leader_tag;
pub mod lease;
pub mod mem_etcd;
pub mod mutants;
pub mod rank;
pub mod record;
pub mod txn;

/// Milliseconds on the driver's monotonic clock (or the simulator's).
pub type Millis = u64;

pub use controller::{
    Action, Controller, Election, Event, FenceReason, LocalState, LossWindow, NodeConfig,
};
pub use keys::Keys;
pub use leader_tag::LeaderTag;
pub use lease::Timing;
pub use record::VolumeView;
pub use txn::{Compare, Kv, Op, Txn, TxnId, View};
