//! blockrep-replication: keeping replicas of a volume in step with its primary.
//!
//! It owns the replication protocol: the wire format ([`wire`]), the sans-IO protocol core
//! ([`core`]: the primary's per-replica senders, barriers and commit modes, the replica's
//! acceptance rules, epochs and fencing, the promotion rule), and the tokio driver that runs
//! the core over TCP and carries out a promotion's probes and fencing ([`driver`]). It uses
//! the storage engine (to append, read retained WAL, persist epochs, and learn what is
//! durable from `Store::watch_durable`) and must never know about NBD: the binary wires the
//! frontend to it.
//!
//! The core never imports tokio and never reads a clock, so a deterministic simulator can
//! drive the very same code.

pub mod core;
pub mod driver;
pub mod mutants;
pub mod wire;
