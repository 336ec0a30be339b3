//! Each deliberate protocol bug must be caught by a bounded random search: proof that the
//! checker can fail, and that the fault mix reaches the code each bug lives in.

mod common;
mod resume;

use std::sync::Mutex;

use blockrep_replication::core::CommitMode;
use blockrep_replication::mutants::{set, Mutant};
use blockrep_sim::{mode_for, run, Cluster, Config};

/// Mutants are switched on for the whole process: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Seeds a mutant gets before the search is declared blind to it.
const BUDGET: u64 = 3_000;

fn caught(m: Mutant) -> u64 {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(Some(m));
    let found = (0..BUDGET).find(|&seed| run(Config::new(seed, mode_for(seed)), false).is_err());
    set(None);
    match found {
        Some(seed) => seed,
        None => panic!("mutant {} survived {BUDGET} histories", m.name()),
    }
}

#[test]
fn mutant_count_out_of_sync_replica_is_caught() {
    caught(Mutant::CountOutOfSyncReplica);
}

#[test]
fn mutant_accept_lsn_gap_is_caught() {
    caught(Mutant::AcceptLsnGap);
}

#[test]
fn mutant_skip_replica_epoch_check_is_caught() {
    caught(Mutant::SkipReplicaEpochCheck);
}

#[test]
fn mutant_report_received_as_durable_is_caught() {
    caught(Mutant::ReportReceivedAsDurable);
}

#[test]
fn mutant_ignore_diverged_log_is_caught() {
    caught(Mutant::IgnoreDivergedLog);
}

#[test]
fn mutant_promote_without_prefix_is_caught() {
    caught(Mutant::PromoteWithoutPrefix);
}

#[test]
fn mutant_recycle_needed_wal_is_caught() {
    caught(Mutant::RecycleNeededWal);
}

#[test]
fn mutant_ack_cut_without_cutting_is_caught() {
    caught(Mutant::AckCutWithoutCutting);
}

#[test]
fn mutant_skip_cut_is_caught() {
    caught(Mutant::SkipCut);
}

/// Switches every mutant off again, even when a scenario's own assertion panics.
struct Off;

impl Drop for Off {
    fn drop(&mut self) {
        set(None);
    }
}

/// The random search rarely lets a base's lineage change under a replica that kept a
/// cursor, so the scenario is placed by hand: resumed without the check, the replica keeps
/// base blocks from entries the new primary never had, and the checker's convergence (every
/// volume compared block for block) fails.
#[test]
fn mutant_trust_cursor_without_lineage_is_caught() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(Some(Mutant::TrustCursorWithoutLineage));
    let _off = Off;
    let mut c = Cluster::scripted(CommitMode::BestEffort);
    resume::lineage_changes_while_n1_is_away(&mut c);
    let caught = c.converge(20_000).is_err() || !c.violations().is_empty();
    assert!(
        caught,
        "the checker missed a resume from another lineage's base"
    );
}

#[test]
fn without_a_mutant_the_same_seeds_pass() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(None);
    for seed in 0..300 {
        if let Err(f) = run(Config::new(seed, mode_for(seed)), false) {
            panic!("seed {seed} ({}): {}", f.mode, f.violation);
        }
    }
}
