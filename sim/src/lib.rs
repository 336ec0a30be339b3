//! blockrep-sim: the deterministic simulator of the replication protocol.
//!
//! It drives the real primary and replica state machines from `blockrep-replication` (not a
//! model of them) with simulated time (milliseconds; data before timers within one), a
//! simulated network (delays, resets, partitions, late messages from old sessions),
//! simulated stores (unsynced entries may vanish or be cut at a crash; fsyncs take time),
//! crashes and restarts, and a coordinator that fails over by the promotion rule. Everything
//! comes from one seed: the same seed gives the same history. A checker compares what the
//! protocol acknowledged with what the stores really hold.
//!
//! It must never own protocol logic: anything it decides (which candidate to try, when to
//! inject a fault) is the environment's part, never the protocol's.

pub mod check;
pub mod cluster;
pub mod lease_safety;
pub mod net;
pub mod node;
pub mod store;

use blockrep_replication::core::CommitMode;

pub use check::Violation;
pub use cluster::{Cluster, Config, ControlConfig, ControlFaults, Faults, FlushOutcome, Stats};

/// What a failing seed reports.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub mode: CommitMode,
    pub violation: Violation,
    pub trace: Vec<String>,
}

/// Runs one random history: `cfg.steps` client steps with faults, then the liveness phase.
pub fn run(cfg: Config, verbose: bool) -> Result<Stats, Failure> {
    let seed = cfg.seed;
    let mode = cfg.mode;
    let steps = cfg.steps;
    let mut c = Cluster::new(cfg);
    c.verbose = verbose;
    let fail = |c: &Cluster, v: Violation| Failure {
        seed,
        mode,
        violation: v,
        trace: c.trace.clone(),
    };
    if c.cfg.control.is_some() {
        return match c.run_controlled(steps) {
            Ok(()) => Ok(c.stats.clone()),
            Err(v) => Err(fail(&c, v)),
        };
    }
    c.run_until(30);
    for _ in 0..steps {
        c.client_step(0.1);
        c.random_faults();
        let t = c.now + 1 + c.rng_step();
        c.run_until(t);
        if let Some(v) = c.checker.violations.first().cloned() {
            return Err(fail(&c, v));
        }
    }
    match c.converge(20_000) {
        Ok(()) => Ok(c.stats.clone()),
        Err(v) => Err(fail(&c, v)),
    }
}

/// The commit mode a seed runs under, when the sweep covers all three.
pub fn mode_for(seed: u64) -> CommitMode {
    match seed % 3 {
        0 => CommitMode::SyncAll,
        1 => CommitMode::SyncQuorum,
        _ => CommitMode::BestEffort,
    }
}
