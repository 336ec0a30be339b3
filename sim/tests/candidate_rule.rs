//! The controller's candidate rule and the promotion rule agree: etcd never hands the leader
//! key to a node whose promotion refuses it for good. These seeds (`--control`, sync-quorum
//! and best-effort) each ended with etcd's leader holding the key without ever serving, while
//! the member the promotion asked for could not campaign: seed 16, the leader (head 45)
//! refused because a member back from a cut held 46, and held the key for ever; seed 766,
//! the most complete copy had dropped out of the in-sync set, so nobody electable could pass
//! the promotion. They must now converge with no operator.

use blockrep_sim::{mode_for, run, Config, ControlConfig};

fn converges_on_its_own(seed: u64) {
    let mut cfg = Config::new(seed, mode_for(seed));
    cfg.control = Some(ControlConfig {
        operator_forces_failover: false,
        ..ControlConfig::default()
    });
    cfg.faults.failover = 0.0;
    if let Err(f) = run(cfg, false) {
        panic!(
            "seed {seed} ({}): {}\n    replay: cargo run --release -p blockrep-sim -- --control --no-operator --seed {seed}",
            f.mode, f.violation
        );
    }
}

#[test]
fn a_leader_whose_promotion_is_refused_gives_the_key_up() {
    // Sync-quorum and best-effort histories where the refused leader held the key.
    for seed in [16, 34, 68, 125] {
        converges_on_its_own(seed);
    }
}

#[test]
fn under_sync_quorum_the_most_complete_copy_may_lead_outside_the_in_sync_set() {
    for seed in [88, 157, 766, 781, 1306] {
        converges_on_its_own(seed);
    }
}

/// Seed 37499: the primary of the newest epoch crashed before any entry of that epoch was
/// durable on it, while a replica it was rebuilding held one; the promotion refused the old
/// primary for missing "a later primary's writes" (its own, never acknowledged) and the
/// rebuilding copy for being incomplete, so only a forced failover, serving the incomplete
/// copy, ended it (`a_member_at_the_epoch_the_candidate_served_at_does_not_hold_it_back`).
#[test]
fn a_primary_is_not_held_back_by_the_unacknowledged_tail_of_its_own_epoch() {
    converges_on_its_own(37499);
}
