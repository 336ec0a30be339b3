//! The control plane in the simulator: etcd (in memory, on the simulated clock) and the real
//! control-plane core on every node decide who leads; each fault of the issue placed by hand,
//! checked by the FLUSH checker and the lease-safety checker, then the liveness phase.

mod common;

use blockrep_control::LeaderTag;
use blockrep_replication::core::primary::PeerState;
use blockrep_replication::core::CommitMode::{self, SyncAll, SyncQuorum};
use blockrep_sim::{Cluster, FlushOutcome};

use common::*;

#[test]
fn an_etcd_led_cluster_elects_one_leader_and_acknowledges_through_it() {
    for mode in [SyncAll, SyncQuorum, CommitMode::BestEffort] {
        let mut c = Cluster::scripted_controlled(mode);
        let p = leader(&c);
        write(&mut c, p, 0, 20);
        acked(&mut c, p);
        for other in (0..3).filter(|&n| n != p) {
            assert!(
                c.write_on(other, 1).is_none(),
                "a non-leader refuses writes"
            );
            assert_eq!(c.read_on(other, 1), None, "and reads");
        }
        assert!(c.read_on(p, 1).is_some());
        converge_controlled(&mut c);
    }
}

/// The control plane's TTL in the simulator (milliseconds; `ControlConfig::default`).
const TTL: u64 = 600;

fn ttl(c: &Cluster) -> u64 {
    let t = c.control_timing().map_or(TTL, |t| t.ttl);
    assert_eq!(t, TTL);
    t
}

/// Runs until a node other than `old` serves as leader; which.
fn takeover(c: &mut Cluster, old: usize) -> usize {
    let budget = 10 * ttl(c);
    assert!(
        c.run_until_true(budget, |c| c.serving_leader().is_some_and(|p| p != old)),
        "nobody took over from n{old}:{}\n{}",
        c.describe_controlled(),
        tail(c)
    );
    leader(c)
}

#[test]
fn primary_cut_from_etcd_but_not_from_replicas() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted_controlled(mode);
        let p = leader(&c);
        let e = c.leads_at(p).unwrap();
        write(&mut c, p, 0, 20);
        acked(&mut c, p);
        c.cut_from_etcd(p);
        // It still reaches its replicas and keeps taking writes, until its deadline.
        let last_ack = keep_writing(&mut c, p, TTL).expect("acknowledged within its lease");
        assert!(
            !c.acknowledges(p),
            "past its deadline it acknowledges nothing"
        );
        let q = takeover(&mut c, p);
        assert!(c.leads_at(q).unwrap() > e);
        assert!(last_ack < c.now);
        assert!(c.write_on(p, 3).is_none() && c.read_on(p, 3).is_none());
        write(&mut c, q, 0, 10);
        acked(&mut c, q);
        converge_controlled(&mut c);
    }
}

#[test]
fn etcd_down() {
    let mut c = Cluster::scripted_controlled(SyncAll);
    let p = leader(&c);
    let e = c.leads_at(p).unwrap();
    write(&mut c, p, 0, 10);
    acked(&mut c, p);
    c.etcd_down();
    // Without failsafe the leader stops at its deadline; nobody is promoted while etcd is down.
    keep_writing(&mut c, p, TTL);
    assert!(!c.acknowledges(p));
    let quiet = c.run_until_true(3 * ttl(&c), |c| {
        (0..3).any(|n| c.leads_at(n).is_some_and(|x| x > e))
    });
    assert!(!quiet, "a node was promoted while etcd was down");
    assert!((0..3).all(|n| !c.acknowledges(n)));
    c.etcd_up();
    assert!(c.run_until_true(10 * ttl(&c), |c| c.serving_leader().is_some()));
    let q = leader(&c);
    write(&mut c, q, 0, 10);
    acked(&mut c, q);
    converge_controlled(&mut c);
}

#[test]
fn etcd_restored_from_an_older_snapshot() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted_controlled(mode);
        let p = leader(&c);
        write(&mut c, p, 0, 10);
        acked(&mut c, p);
        c.snapshot_etcd();
        // A failover etcd will forget: p dies, q leads at a later epoch and acknowledges.
        c.crash(p);
        let q = takeover(&mut c, p);
        let eq = c.leads_at(q).unwrap();
        // Back as q's replica (sync-all acknowledges only with every replica).
        c.restart(p);
        reach(&mut c, q, p, PeerState::InSync, WAIT);
        write(&mut c, q, 10, 10);
        acked(&mut c, q);
        // q is cut from etcd, so it learns of nothing: it must not keep acknowledging beside
        // a leader elected by the restored etcd (which forgot q) before q's deadline.
        c.cut_from_etcd(q);
        c.restore_etcd();
        keep_writing(&mut c, q, TTL);
        let r = takeover(&mut c, q);
        assert!(
            c.leads_at(r).unwrap() > eq,
            "the restored etcd's counter is behind: the new epoch still goes above q's"
        );
        write(&mut c, r, 20, 10);
        acked(&mut c, r);
        c.reconnect_all_to_etcd();
        converge_controlled(&mut c);
    }
}

#[test]
fn primary_paused_past_the_ttl_then_resumed() {
    let mut c = Cluster::scripted_controlled(SyncAll);
    let p = leader(&c);
    write(&mut c, p, 0, 10);
    acked(&mut c, p);
    // A FLUSH in flight when the process stops: its answer is never sent.
    write(&mut c, p, 10, 5);
    let flush = c.flush_on(p).unwrap();
    c.pause(p, 3 * ttl(&c));
    let q = takeover(&mut c, p);
    write(&mut c, q, 0, 10);
    acked(&mut c, q);
    // p resumes with the state it had: leader, as far as it knows.
    assert!(c.run_until_true(3 * ttl(&c), |c| !c.is_paused_now(p)));
    assert!(
        !c.acknowledges(p),
        "a resumed leader past its deadline acknowledges nothing"
    );
    assert!(c.write_on(p, 1).is_none());
    assert_eq!(c.read_on(p, 1), None);
    assert_ne!(
        c.outcomes.get(&flush),
        Some(&FlushOutcome::Acked),
        "{}",
        tail(&c)
    );
    converge_controlled(&mut c);
}

#[test]
fn asymmetric_partition() {
    // The leader reaches etcd but not its replicas: it keeps the lease, so nobody else
    // leads; its FLUSHes under sync-all wait for the replicas.
    let mut c = Cluster::scripted_controlled(SyncAll);
    let p = leader(&c);
    let e = c.leads_at(p).unwrap();
    c.cut_off(p);
    keep_writing(&mut c, p, 3 * TTL);
    assert_eq!(c.serving_leader(), Some(p));
    assert_eq!(c.leads_at(p), Some(e));
    c.heal();
    write(&mut c, p, 0, 10);
    acked(&mut c, p);
    // A replica reaches its leader but not etcd: it never leads, even once the leader dies.
    let cut = (p + 1) % 3;
    c.cut_from_etcd(cut);
    keep_writing(&mut c, p, 2 * TTL);
    acked(&mut c, p);
    c.crash(p);
    let q = takeover(&mut c, p);
    assert_ne!(q, cut, "a node cut from etcd was promoted");
    c.restart(p);
    reach(&mut c, q, p, PeerState::InSync, WAIT);
    write(&mut c, q, 0, 10);
    acked(&mut c, q);
    converge_controlled(&mut c);
}

#[test]
fn clock_drift_within_the_bound() {
    for (leader_rate, others_rate) in [(900_000, 1_100_000), (1_100_000, 900_000)] {
        let mut c = Cluster::scripted_controlled(SyncQuorum);
        let p = leader(&c);
        for n in 0..3 {
            c.set_clock_rate(n, if n == p { leader_rate } else { others_rate });
        }
        c.settle(2 * ttl(&c));
        write(&mut c, p, 0, 10);
        acked(&mut c, p);
        c.cut_from_etcd(p);
        keep_writing(&mut c, p, 2 * TTL);
        let q = takeover(&mut c, p);
        write(&mut c, q, 0, 10);
        acked(&mut c, q);
        converge_controlled(&mut c);
    }
}

#[test]
fn two_candidates_with_equal_positions() {
    let mut c = Cluster::scripted_controlled(SyncAll);
    let p = leader(&c);
    let e = c.leads_at(p).unwrap();
    write(&mut c, p, 0, 10);
    acked(&mut c, p);
    let others: Vec<usize> = (0..3).filter(|&n| n != p).collect();
    assert_eq!(c.head(others[0]), c.head(others[1]));
    c.crash(p);
    let q = takeover(&mut c, p);
    // Both were eligible at the same position: one took the key (the rank falls to the
    // name), at one new epoch; the other follows it.
    assert_eq!(q, others[0]);
    let tag = LeaderTag::of(&format!("n{q}"));
    assert_eq!(c.leads_at(q), tag.first_epoch_above(e));
    assert_eq!(c.leads_at(others[1]), None);
    c.restart(p);
    reach(&mut c, q, p, PeerState::InSync, WAIT);
    write(&mut c, q, 0, 10);
    acked(&mut c, q);
    converge_controlled(&mut c);
}

#[test]
fn a_node_restarting_mid_promotion() {
    let mut c = Cluster::scripted_controlled(SyncAll);
    let p = leader(&c);
    write(&mut c, p, 0, 10);
    acked(&mut c, p);
    c.crash(p);
    // The campaign transaction has taken the key in etcd, and its answer has not yet reached
    // the candidate: it crashes there, and comes straight back.
    let caught = c.run_until_true(10 * ttl(&c), |c| {
        c.etcd_leader_now().is_some_and(|(name, _)| {
            let q = (0..3).find(|&n| c.nodes[n].name == name);
            q.is_some_and(|q| q != p && c.leads_at(q).is_none())
        })
    });
    assert!(
        caught,
        "never saw a campaign in flight:{}",
        c.describe_controlled()
    );
    let (name, epoch) = c.etcd_leader_now().unwrap();
    let q = (0..3).find(|&n| c.nodes[n].name == name).unwrap();
    c.crash(q);
    c.restart(q);
    c.restart(p);
    // The key from q's earlier life is never led on: it goes, and a leader serves above it.
    assert!(c.run_until_true(10 * ttl(&c), |c| c.serving_leader().is_some()));
    let r = leader(&c);
    assert!(c.leads_at(r).unwrap().0 > epoch);
    write(&mut c, r, 0, 10);
    acked(&mut c, r);
    converge_controlled(&mut c);
}

/// The bound is real: a leader whose clock runs 30% slow (beyond the ttl/8 margin) keeps
/// acknowledging after etcd gave its key away, and the checker says so.
#[test]
fn clock_drift_beyond_the_bound_is_caught() {
    let mut c = Cluster::scripted_controlled(SyncQuorum);
    let p = leader(&c);
    c.set_clock_rate(p, 700_000);
    c.settle(2 * TTL);
    write(&mut c, p, 0, 10);
    acked(&mut c, p);
    c.cut_from_etcd(p);
    keep_writing(&mut c, p, 2 * TTL);
    assert!(
        c.violations()
            .iter()
            .any(|v| v.what.contains("overlapping leases")),
        "{:?}\n{}",
        c.violations(),
        tail(&c)
    );
}

/// The random sweep in the etcd-led mode (longer: `blockrep-sim --control --seeds N`).
#[test]
fn random_sweep_in_the_etcd_led_mode_finds_no_violation() {
    let mut failures = Vec::new();
    for seed in 0..300 {
        let mut cfg = blockrep_sim::Config::new(seed, blockrep_sim::mode_for(seed));
        cfg.control = Some(blockrep_sim::ControlConfig::default());
        cfg.faults.failover = 0.0;
        if let Err(f) = blockrep_sim::run(cfg, false) {
            failures.push(format!(
                "seed {seed} ({}): {}\n    replay: cargo run --release -p blockrep-sim -- --control --seed {seed} --mode {}",
                f.mode, f.violation, f.mode
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
