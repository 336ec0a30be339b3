//! Under sync-all and best-effort a member outside the in-sync set whose log ends at a later
//! epoch than every member in it (it took entries from a primary that died before the others
//! had them, then dropped out) made the promotion refuse each member of the set, which was
//! all etcd would elect: nobody ever served. Seed 720 (`--control --no-operator --mode
//! sync-all`): n0 led at epoch 1 and shipped two entries to n1 alone before it crashed; n0
//! and n2, in the set with logs ending at epoch 0, were elected in turn for a hundred terms
//! and refused each one. Now n1 is elected, a member of the set vouches for it
//! (`promotion::vouched`), and it serves. The other seeds are the rest of the histories that
//! ended so in sweeps of 10 000 seeds per mode: 6 under sync-all, 10 under best-effort.

use blockrep_replication::core::CommitMode;
use blockrep_sim::{run, Config, ControlConfig};

fn converges_on_its_own(seed: u64, mode: CommitMode) {
    let mut cfg = Config::new(seed, mode);
    cfg.control = Some(ControlConfig {
        operator_forces_failover: false,
        ..ControlConfig::default()
    });
    cfg.faults.failover = 0.0;
    if let Err(f) = run(cfg, false) {
        panic!(
            "seed {seed} ({}): {}\n    replay: cargo run --release -p blockrep-sim -- --control --no-operator --mode {} --seed {seed}",
            f.mode, f.violation, f.mode
        );
    }
}

#[test]
fn a_member_outside_the_set_whose_log_ends_at_a_later_epoch_may_lead() {
    for seed in [720, 2027, 4552, 4996, 6611, 7472] {
        converges_on_its_own(seed, CommitMode::SyncAll);
    }
}

#[test]
fn under_best_effort_too_a_member_outside_the_set_whose_log_ends_later_may_lead() {
    for seed in [720, 1876, 3785, 4996, 5579, 6401, 6611, 6623, 6635, 7472] {
        converges_on_its_own(seed, CommitMode::BestEffort);
    }
}
