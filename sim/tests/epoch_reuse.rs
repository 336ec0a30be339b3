//! Seed 6821 (`--control --seeds 20000`), placed by hand: etcd restored from an older
//! snapshot while the only store that knew the newest epoch is down. Under best-effort a lone
//! survivor leads and fences nobody, so nothing left knows its epoch; without the runbook's
//! step the next leader takes that epoch again (the open case in docs/PROTOCOL.md, "No epoch
//! is served by two leaderships"). With it, the epoch stays unique.

mod common;

use blockrep_replication::core::CommitMode::BestEffort;
use blockrep_sim::Cluster;

use common::*;

#[test]
fn raising_the_epoch_counter_after_a_restore_keeps_epochs_unique() {
    let mut c = Cluster::scripted_controlled(BestEffort);
    let p = c.serving_leader().expect("a leader");
    write(&mut c, p, 0, 10);
    c.snapshot_etcd();
    let others: Vec<usize> = (0..3).filter(|&n| n != p).collect();
    let (q, r) = (others[0], others[1]);
    // p and r die: q takes over alone at the next epoch, which only q's store records.
    c.crash(p);
    c.crash(r);
    assert!(
        c.run_until_true(6_000, |c| c.serving_leader() == Some(q)),
        "q never took over:{}",
        c.describe_controlled()
    );
    let eq = c.leads_at(q).expect("q leads");
    write(&mut c, q, 10, 5);
    // q dies too, and etcd comes back from the snapshot taken before q's epoch: its counter
    // is below eq. The operator raises it (here by exactly what was handed out since).
    c.crash(q);
    c.restore_etcd();
    c.operator_sets_epoch_counter(eq.0);
    c.restart(r);
    assert!(
        c.run_until_true(6_000, |c| c.serving_leader() == Some(r)),
        "r never took over:{}",
        c.describe_controlled()
    );
    assert!(c.leads_at(r).expect("r leads") > eq);
    clean(&c);
    converge_controlled_all(&mut c);
}

/// Every node back, one leader, every member in sync, the checker clean.
fn converge_controlled_all(c: &mut Cluster) {
    if let Err(v) = c.converge_controlled(20_000) {
        panic!("{v}:{}", c.describe_controlled());
    }
    clean(c);
}
