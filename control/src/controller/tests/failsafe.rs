//! `--failsafe` (a leader serving on its replicas' word while etcd is out of reach) and the
//! loss window a promotion reports.

use super::*;

/// A leader `a` of three nodes, cut from etcd, with failsafe on or off.
fn cut_leader(failsafe: bool) -> (Cluster, usize) {
    let mut c = Cluster::new(&["a", "b", "c"]);
    for n in &mut c.nodes {
        n.ctl.cfg.failsafe = failsafe;
    }
    c.advance(100, 3);
    c.adopt_volume();
    c.advance(100, 3);
    let a = c.idx("a");
    assert!(c.nodes[a].ctl.is_leader());
    c.nodes[a].reaches_etcd = false;
    (c, a)
}

#[test]
fn a_failsafe_leader_acknowledges_on_its_replicas_word_until_renew_after_the_last() {
    let (mut c, a) = cut_leader(true);
    let lease = c.nodes[a].ctl.lease_deadline().unwrap();
    let renew = c.nodes[a].ctl.timing().renew;
    // Its replicas keep answering barriers at its epoch: it serves on past the lease.
    while c.now < lease + 2 * renew {
        c.now += 100;
        let at = c.now;
        c.deliver(a, Event::ReplicasConfirmed { at });
        c.round();
        assert!(c.nodes[a].ctl.may_acknowledge(c.now), "at {}", c.now);
        let deadline = (at + renew).max(lease);
        assert_eq!(c.nodes[a].ctl.acknowledge_deadline(), Some(deadline));
    }
    assert!(c.nodes[a].ctl.failsafe_active(c.now));
    assert!(!c.nodes[a].ctl.lease.holds(c.now));
    // A needed replica stops answering: it stops by the last confirmation plus renew.
    let last = c.now;
    c.now = last + renew - 1;
    c.round();
    assert!(c.nodes[a].ctl.may_acknowledge(c.now));
    c.now = last + renew;
    assert!(!c.nodes[a].ctl.may_acknowledge(c.now));
    c.round();
    assert!(!c.nodes[a].ctl.is_leader());
    assert!(c.nodes[a].actions.contains(&Action::StepDown {
        reason: FenceReason::LeaseExpired
    }));
}

#[test]
fn without_failsafe_the_replicas_word_extends_nothing() {
    let (mut c, a) = cut_leader(false);
    let lease = c.nodes[a].ctl.lease_deadline().unwrap();
    while c.now < lease {
        c.now += 100;
        let at = c.now;
        c.deliver(a, Event::ReplicasConfirmed { at });
        assert_eq!(c.nodes[a].ctl.acknowledge_deadline(), Some(lease));
        c.round();
    }
    assert!(!c.nodes[a].ctl.may_acknowledge(c.now));
    assert!(!c.nodes[a].ctl.is_leader());
}

#[test]
fn a_promotion_reports_the_old_leaders_last_head_minus_its_own() {
    let mut c = Cluster::new(&["a", "b", "c"]);
    c.advance(100, 3);
    c.adopt_volume();
    for (name, head) in [("a", 100), ("b", 90), ("c", 80)] {
        let i = c.idx(name);
        c.nodes[i].local.head = Lsn(head);
        c.nodes[i].local.committed = Lsn(head);
    }
    c.advance(1_000, 3);
    let a = c.idx("a");
    assert!(c.nodes[a].ctl.is_leader());
    assert_eq!(
        c.nodes[a].ctl.loss_window(),
        None,
        "the first leader lost nothing"
    );
    // a dies: its lease (and with it its leader key and member record) expires.
    c.nodes[a].reaches_etcd = false;
    c.advance(100, 60);
    let b = c.idx("b");
    assert_eq!(c.leaders(), ["b"]);
    assert_eq!(
        c.nodes[b].ctl.loss_window(),
        Some(&LossWindow {
            old_leader: "a".into(),
            old_head: Lsn(100),
            new_head: Lsn(90),
            lsns: 10,
        })
    );
}
