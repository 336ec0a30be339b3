//! Seed 6821 (`--control --seeds 20000`), placed by hand: etcd restored from an older
//! snapshot while the only store that knew the newest epoch is down. Under best-effort a lone
//! survivor leads and fences nobody, so nothing left knows its epoch, and the next campaign
//! takes the same count again. Epochs carry their leader's tag (`blockrep_control::leader_tag`),
//! so the two leaderships still hold different epochs, and once every store is back one of
//! the two lineages is kept whole and the other rebuilt from it, never merged
//! (docs/PROTOCOL.md, "No epoch is served by two leaderships").

mod common;

use blockrep_control::LeaderTag;
use blockrep_replication::core::CommitMode::BestEffort;
use blockrep_sim::Cluster;
use blockrep_storage::Epoch;

use common::*;

/// p leads and writes; etcd is snapshotted; p and r die and q leads alone at the next count
/// and writes 5 blocks, FLUSHed; q dies and etcd comes back from the snapshot. Returns (q, r, q's
/// epoch).
fn forget_q_s_epoch(c: &mut Cluster) -> (usize, usize, Epoch) {
    let p = c.serving_leader().expect("a leader");
    write(c, p, 0, 10);
    c.snapshot_etcd();
    // q is the one with the lower tag, so that r, at the same count, goes above q's epoch
    // though q's leadership came later: the order in which the stores' epochs rank the two
    // lineages is not the order they happened in.
    let mut others: Vec<usize> = (0..3).filter(|&n| n != p).collect();
    others.sort_by_key(|&n| LeaderTag::of(&format!("n{n}")));
    let (q, r) = (others[0], others[1]);
    c.crash(p);
    c.crash(r);
    assert!(
        c.run_until_true(6_000, |c| c.serving_leader() == Some(q)),
        "q never took over:{}",
        c.describe_controlled()
    );
    let eq = c.leads_at(q).expect("q leads");
    write(c, q, 10, 5);
    acked(c, q);
    c.crash(q);
    c.restore_etcd();
    (q, r, eq)
}

fn take_over_alone(c: &mut Cluster, r: usize) -> Epoch {
    c.restart(r);
    assert!(
        c.run_until_true(6_000, |c| c.serving_leader() == Some(r)),
        "r never took over:{}",
        c.describe_controlled()
    );
    c.leads_at(r).expect("r leads")
}

#[test]
fn no_epoch_is_served_by_two_leaderships_after_a_restore() {
    let mut c = Cluster::scripted_controlled(BestEffort);
    let (q, r, eq) = forget_q_s_epoch(&mut c);
    // Nothing alive knows eq: r takes the count etcd hands out again, under its own tag.
    let er = take_over_alone(&mut c, r);
    assert_ne!(er, eq, "two leaderships at one epoch");
    assert_eq!(
        er.0 >> LeaderTag::BITS,
        eq.0 >> LeaderTag::BITS,
        "the same count"
    );
    assert_eq!(LeaderTag::of_epoch(er), LeaderTag::of(&format!("n{r}")));
    assert!(er > eq);
    write(&mut c, r, 20, 2);
    // r dies too, and both come back at once: q holds eq's entries, which r's log does not,
    // and knows more of them committed than r's log holds. r's log ends at the higher epoch:
    // it is kept and q's tail is rebuilt from it. The promotion rule must not hold r back
    // for q's commits: with q refused for missing r's epoch, nobody could ever serve.
    c.crash(r);
    c.restart(q);
    c.restart(r);
    clean(&c);
    converge_controlled_all(&mut c);
}

#[test]
fn raising_the_epoch_counter_after_a_restore_puts_the_next_leader_above_the_forgotten_one() {
    let mut c = Cluster::scripted_controlled(BestEffort);
    let (q, r, eq) = forget_q_s_epoch(&mut c);
    // The runbook's step: the operator raises the counter to what was handed out since.
    c.operator_sets_epoch_counter(eq.0);
    let er = take_over_alone(&mut c, r);
    assert!(er > eq);
    c.restart(q);
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

/// Seed 27512 (`--control --seeds 20000 --start 20000`), replayed: a leader cut from etcd
/// was inside its deadline when etcd came back from an older snapshot, and the node that
/// campaigned next had been down across the restore. The snapshot held that node's own
/// leader key from an earlier term, which it handed back at once, and nothing else it saw
/// was behind, so it led while the cut leader still acknowledged. A node that starts now
/// campaigns only a TTL after it started unless it sees another node's leader key
/// (`a_node_that_starts_after_an_etcd_restore_waits_a_ttl_before_it_campaigns` in
/// `blockrep-control`).
#[test]
fn a_node_started_after_a_restore_does_not_lead_beside_a_cut_leader() {
    let seed = 27512;
    let mut cfg = blockrep_sim::Config::new(seed, blockrep_sim::mode_for(seed));
    cfg.control = Some(blockrep_sim::ControlConfig::default());
    if let Err(f) = blockrep_sim::run(cfg, false) {
        panic!(
            "seed {seed} ({}): {}\n    replay: cargo run --release -p blockrep-sim -- --control --seed {seed}",
            f.mode, f.violation
        );
    }
}
