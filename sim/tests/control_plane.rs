//! The control plane in the simulator: etcd (in memory, on the simulated clock) and the real
//! control-plane core on every node decide who leads; each fault of the issue placed by hand,
//! checked by the FLUSH checker and the lease-safety checker, then the liveness phase.

mod common;

use blockrep_replication::core::CommitMode::{self, SyncAll, SyncQuorum};
use blockrep_sim::{Cluster, FlushOutcome};

use common::*;

fn tail(c: &Cluster) -> String {
    c.trace[c.trace.len().saturating_sub(80)..].join("\n")
}

/// The liveness phase under etcd: one leader, every member in sync, checker clean.
fn converge_controlled(c: &mut Cluster) {
    if let Err(v) = c.converge_controlled(20_000) {
        panic!("{v}\n{}", tail(c));
    }
    clean(c);
}

fn leader(c: &Cluster) -> usize {
    c.serving_leader()
        .unwrap_or_else(|| panic!("no serving leader:{}", c.describe_controlled()))
}

#[test]
fn an_etcd_led_cluster_elects_one_leader_and_acknowledges_through_it() {
    for mode in [SyncAll, SyncQuorum, CommitMode::BestEffort] {
        let mut c = Cluster::scripted_controlled(mode);
        let p = leader(&c);
        write(&mut c, p, 0, 20);
        acked(&mut c, p);
        for other in (0..3).filter(|&n| n != p) {
            assert!(c.write_on(other, 1).is_none(), "a non-leader refuses writes");
            assert_eq!(c.read_on(other, 1), None, "and reads");
        }
        assert!(c.read_on(p, 1).is_some());
        converge_controlled(&mut c);
    }
}

#[test]
fn debug_trace() {
    let mut c = Cluster::scripted_controlled(SyncAll);
    let p = leader(&c);
    write(&mut c, p, 0, 5);
    acked(&mut c, p);
    println!("{}\n{}", c.trace.join("\n"), c.describe_controlled());
    println!("{:?}", c.lease_checks());
}
