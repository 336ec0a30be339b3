//! `--failsafe` in the simulator: the etcd-led mode with every node on it. A leader past its
//! lease deadline serves on while the replicas its mode needs answer at its epoch, and a new
//! leader holds `renew + ttl/8` after its promotion; the lease-safety checker judges both on
//! the true clock.

mod common;

use blockrep_replication::core::CommitMode::{SyncAll, SyncQuorum};
use blockrep_sim::Cluster;

use common::*;

/// The control plane's TTL and renew interval in the simulator (`ControlConfig::default`).
const TTL: u64 = 600;
const RENEW: u64 = 200;

#[test]
fn with_etcd_down_a_failsafe_leader_serves_on_until_a_replica_stops_answering() {
    let mut c = Cluster::scripted_controlled_with(SyncAll, true);
    let p = leader(&c);
    let e = c.leads_at(p).unwrap();
    write(&mut c, p, 0, 20);
    acked(&mut c, p);
    c.etcd_down();
    let down = c.now;
    let last = keep_writing(&mut c, p, 3 * TTL).expect("it acknowledged");
    assert!(
        last > down + TTL,
        "it stopped at {} with etcd down at {down}",
        last
    );
    assert!(c.acknowledges(p), "still serving on its replicas' word");
    // A replica dies: within a renew interval (and a tick) it acknowledges nothing more.
    let r = (p + 1) % 3;
    c.crash(r);
    let crashed = c.now;
    let last = keep_writing(&mut c, p, 3 * RENEW).unwrap_or(crashed);
    assert!(
        last <= crashed + RENEW + 20,
        "acknowledged at {last}, a replica dead since {crashed}\n{}",
        tail(&c)
    );
    assert!(!c.acknowledges(p));
    assert!((0..3).all(|n| c.leads_at(n).is_none_or(|x| x == e)));
    c.etcd_up();
    c.restart(r);
    assert!(c.run_until_true(20 * TTL, |c| c
        .serving_leader()
        .is_some_and(|q| c.acknowledges(q))));
    let q = leader(&c);
    write(&mut c, q, 0, 10);
    acked(&mut c, q);
    converge_controlled(&mut c);
}

#[test]
fn a_failsafe_leader_cut_from_etcd_alone_is_replaced_without_two_acknowledging() {
    for mode in [SyncAll, SyncQuorum] {
        let mut c = Cluster::scripted_controlled_with(mode, true);
        let p = leader(&c);
        write(&mut c, p, 0, 20);
        acked(&mut c, p);
        c.cut_from_etcd(p);
        // It serves on past its deadline until the new leader's promotion fences its
        // replicas; the checker flags any acknowledgement of it after the new one began.
        keep_writing(&mut c, p, 3 * TTL);
        assert!(
            c.run_until_true(20 * TTL, |c| c.serving_leader().is_some_and(|q| q != p)),
            "{mode:?}: nobody took over:{}\n{}",
            c.describe_controlled(),
            tail(&c)
        );
        let q = leader(&c);
        keep_writing(&mut c, q, TTL);
        assert!(!c.acknowledges(p), "{mode:?}");
        clean(&c);
        c.reconnect_to_etcd(p);
        converge_controlled(&mut c);
    }
}

/// The random sweep with every node on `--failsafe` (longer: `blockrep-sim --control
/// --failsafe --seeds N`).
#[test]
fn random_sweep_with_failsafe_finds_no_violation() {
    let mut failures = Vec::new();
    for seed in 0..150 {
        let mut cfg = blockrep_sim::Config::new(seed, blockrep_sim::mode_for(seed));
        cfg.control = Some(blockrep_sim::ControlConfig {
            failsafe: true,
            ..blockrep_sim::ControlConfig::default()
        });
        cfg.faults.failover = 0.0;
        if let Err(f) = blockrep_sim::run(cfg, false) {
            failures.push(format!("seed {seed} ({}): {}", f.mode, f.violation));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
