//! The control plane's deliberate bug must be caught by a bounded random search in the
//! etcd-led mode: proof that the lease-safety checker can fail, and that the fault mix
//! (a leader cut from etcd, paused, etcd down or restored) reaches the deadline's code.

use std::sync::Mutex;

use blockrep_control::mutants::{set, Mutant};
use blockrep_sim::{mode_for, run, Config, ControlConfig};

/// Mutants are switched on for the whole process: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Seeds a mutant gets before the search is declared blind to it.
const BUDGET: u64 = 500;

fn controlled(seed: u64) -> Config {
    let mut cfg = Config::new(seed, mode_for(seed));
    cfg.control = Some(ControlConfig::default());
    cfg.faults.failover = 0.0;
    cfg
}

#[test]
fn mutant_acknowledge_after_lease_deadline_is_caught() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(Some(Mutant::AcknowledgeAfterLeaseDeadline));
    let found = (0..BUDGET).find_map(|seed| run(controlled(seed), false).err());
    set(None);
    let f = found.unwrap_or_else(|| {
        panic!(
            "mutant {} survived {BUDGET} histories",
            Mutant::AcknowledgeAfterLeaseDeadline.name()
        )
    });
    assert!(
        f.violation.what.contains("overlapping leases")
            || f.violation.what.contains("lease safety"),
        "caught, but not by the lease checker: {}",
        f.violation
    );
}

#[test]
fn without_the_mutant_the_same_seeds_pass() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(None);
    for seed in 0..50 {
        if let Err(f) = run(controlled(seed), false) {
            panic!("seed {seed} ({}): {}", f.mode, f.violation);
        }
    }
}

/// The same bug, placed by hand: a leader cut from etcd and from its replicas keeps serving
/// reads after its successor acknowledged a newer write to the block.
#[test]
fn mutant_acknowledge_after_lease_deadline_serves_a_stale_read() {
    use blockrep_replication::core::CommitMode;
    use blockrep_sim::Cluster;

    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(Some(Mutant::AcknowledgeAfterLeaseDeadline));
    let mut c = Cluster::scripted_controlled(CommitMode::SyncQuorum);
    let p = c.serving_leader().expect("a leader");
    c.write_on(p, 5);
    c.cut_off(p);
    c.cut_from_etcd(p);
    let took_over = c.run_until_true(10_000, |c| {
        (0..3).any(|q| q != p && c.leads_at(q).is_some() && c.is_primary(q))
    });
    let q = (0..3).find(|&q| q != p && c.is_primary(q));
    let violations = match (took_over, q) {
        (true, Some(q)) => {
            let written = c.write_on(q, 5).map(|(_, v)| v);
            let stale = c.read_on(p, 5);
            set(None);
            assert!(written.is_some() && stale.is_some() && stale != written);
            c.violations().to_vec()
        }
        _ => {
            set(None);
            panic!("nobody took over:{}", c.describe_controlled());
        }
    };
    assert!(
        violations.iter().any(|v| v.what.contains("lease safety")),
        "{violations:?}"
    );
}

/// The failsafe hold's reason, proved: without it a new leader acknowledges while the old
/// one, cut from etcd, still serves on its replicas' last confirmation.
#[test]
fn mutant_failsafe_without_hold_is_caught() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set(Some(Mutant::FailsafeWithoutHold));
    let found = (0..BUDGET).find_map(|seed| {
        let mut cfg = controlled(seed);
        if let Some(control) = cfg.control.as_mut() {
            control.failsafe = true;
        }
        run(cfg, false).err()
    });
    set(None);
    let f = found.unwrap_or_else(|| {
        panic!(
            "mutant {} survived {BUDGET} histories",
            Mutant::FailsafeWithoutHold.name()
        )
    });
    assert!(
        f.violation.what.contains("overlapping leases")
            || f.violation.what.contains("lease safety"),
        "caught, but not by the lease checker: {}",
        f.violation
    );
}
