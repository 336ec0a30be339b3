//! The controller against the in-memory etcd: a few nodes, one clock, every action carried
//! out at once.

use super::*;
use crate::mem_etcd::MemEtcd;
use crate::record::SwitchoverRequest;

struct Node {
    ctl: Controller,
    lease: i64,
    local: LocalState,
    /// Keep-alives are answered only while this is true (false: cut from etcd).
    reaches_etcd: bool,
    /// Whether the leader's replication counts this node in sync.
    replicating: bool,
    actions: Vec<Action>,
}

struct Cluster {
    etcd: MemEtcd,
    keys: Keys,
    nodes: Vec<Node>,
    now: Millis,
}

/// The epoch `name` takes when it campaigns above `above`.
fn elected(name: &str, above: Epoch) -> Epoch {
    LeaderTag::of(name)
        .first_epoch_above(above)
        .expect("an epoch to take")
}

fn local(volume: &str, head: u64) -> LocalState {
    LocalState {
        volume_id: volume.into(),
        size: 1 << 30,
        state: MemberState::Ready,
        epoch: Epoch(0),
        head: Lsn(head),
        head_epoch: Epoch(0),
        committed: Lsn(head),
        replication: "127.0.0.1:1".into(),
        nbd: vec![],
        admin: None,
    }
}

impl Cluster {
    fn new(names: &[&str]) -> Cluster {
        Cluster::with_commit(names, "sync-all")
    }

    /// A volume under `commit` that the first node leads and the others have joined.
    fn led(names: &[&str], commit: &str) -> Cluster {
        let mut c = Cluster::with_commit(names, commit);
        c.advance(100, 3);
        c.adopt_volume();
        c.advance(100, 3);
        c
    }

    fn with_commit(names: &[&str], commit: &str) -> Cluster {
        let keys = Keys::new("/blockrep", "vol").unwrap();
        let mut etcd = MemEtcd::new();
        let timing = Timing::from_ttl(3_000).unwrap();
        let nodes = names
            .iter()
            .map(|n| {
                let lease = etcd.grant(0, timing.ttl);
                let mut ctl = Controller::new(
                    keys.clone(),
                    NodeConfig {
                        name: n.to_string(),
                        priority: 0,
                        nofailover: false,
                        timing,
                        commit: commit.into(),
                        failsafe: false,
                    },
                );
                ctl.handle(Event::KeepAlive {
                    sent_at: 0,
                    granted_ttl: timing.ttl,
                });
                Node {
                    ctl,
                    lease,
                    local: local(&format!("vol-of-{n}"), 0),
                    reaches_etcd: true,
                    replicating: true,
                    actions: Vec::new(),
                }
            })
            .collect();
        Cluster {
            etcd,
            keys,
            nodes,
            now: 0,
        }
    }

    fn idx(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.ctl.name() == name)
            .unwrap()
    }

    /// Delivers `event` to node `i` and carries out what it asks, until nothing is left.
    fn deliver(&mut self, i: usize, event: Event) {
        let mut queue = std::collections::VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let actions = self.nodes[i].ctl.handle(ev);
            for action in actions {
                if let Action::Txn { id, txn } = &action {
                    let now = self.now;
                    let (succeeded, revision) = if self.nodes[i].reaches_etcd {
                        self.etcd
                            .txn(now, txn, Some(self.nodes[i].lease))
                            .unwrap_or((false, 0))
                    } else {
                        (false, 0)
                    };
                    queue.push_back(Event::TxnDone {
                        now,
                        id: *id,
                        succeeded,
                        revision,
                    });
                    if self.nodes[i].reaches_etcd {
                        queue.push_back(self.view_event());
                    }
                }
                self.nodes[i].actions.push(action);
            }
        }
    }

    fn view_event(&mut self) -> Event {
        let view = self.etcd.range(self.now, self.keys.dir());
        Event::View {
            now: self.now,
            view: VolumeView::parse(&self.keys, &view).unwrap(),
        }
    }

    /// One round: every node that reaches etcd renews, reports its state and sees the view.
    fn round(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].reaches_etcd {
                let lease = self.nodes[i].lease;
                if let Some(ttl) = self.etcd.keep_alive(self.now, lease) {
                    let now = self.now;
                    self.deliver(
                        i,
                        Event::KeepAlive {
                            sent_at: now,
                            granted_ttl: ttl,
                        },
                    );
                }
                let local = self.nodes[i].local.clone();
                let now = self.now;
                self.deliver(i, Event::Local { now, local });
                let view = self.view_event();
                self.deliver(i, view);
            }
            if self.nodes[i].ctl.is_leader() {
                // Replication counts every other node in sync (replication is not under test).
                let in_sync = self
                    .nodes
                    .iter()
                    .filter(|n| n.ctl.name() != self.nodes[i].ctl.name() && n.replicating)
                    .map(|n| n.ctl.name().to_string())
                    .collect();
                let now = self.now;
                self.deliver(i, Event::Replication { now, in_sync });
            }
            let now = self.now;
            self.deliver(i, Event::Tick { now });
        }
    }

    fn advance(&mut self, ms: Millis, rounds: usize) {
        for _ in 0..rounds {
            self.now += ms;
            self.round();
        }
    }

    fn leaders(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|n| n.ctl.is_leader())
            .map(|n| n.ctl.name())
            .collect()
    }

    fn leads(&self, name: &str) -> Option<Epoch> {
        self.nodes[self.idx(name)].ctl.epoch()
    }

    /// Node `i` restarts: a new controller with `cfg` (its settings by default), a new lease,
    /// and etcd within reach.
    fn restart(&mut self, i: usize, cfg: NodeConfig) {
        let ttl = cfg.timing.ttl;
        self.nodes[i].ctl = Controller::new(self.keys.clone(), cfg);
        self.nodes[i].lease = self.etcd.grant(self.now, ttl);
        self.nodes[i].reaches_etcd = true;
    }

    /// Once a node leads, the others are made its replicas: their stores join the volume.
    fn adopt_volume(&mut self) {
        let id = self
            .nodes
            .iter()
            .find(|n| n.ctl.is_leader())
            .map(|n| n.local.volume_id.clone());
        let epoch = self
            .nodes
            .iter()
            .find_map(|n| n.ctl.epoch())
            .unwrap_or_default();
        for n in &mut self.nodes {
            if let Some(id) = &id {
                n.local.volume_id = id.clone();
            }
            n.local.epoch = epoch;
            n.local.head_epoch = epoch;
        }
    }
}

#[test]
fn the_first_node_makes_its_store_the_volume_and_leads_at_its_first_epoch() {
    let mut c = Cluster::new(&["a", "b"]);
    c.advance(100, 3);
    assert_eq!(c.leaders(), ["a"]);
    let first = elected("a", Epoch(0));
    assert_eq!(c.leads("a"), Some(first));
    let view = VolumeView::parse(&c.keys, &c.etcd.range(c.now, c.keys.dir())).unwrap();
    let identity = view.identity.unwrap();
    assert_eq!(
        (identity.volume_id.as_str(), identity.created_by.as_str()),
        ("vol-of-a", "a")
    );
    assert_eq!(view.epoch_counter.map(|e| Epoch(e.value)), Some(first));
    assert_eq!(view.history.len(), 1);
    let b = &c.nodes[c.idx("b")];
    assert!(b.actions.contains(&Action::Follow {
        leader: "a".into(),
        epoch: first
    }));
    assert!(!b.ctl.may_acknowledge(c.now));
    assert!(c.nodes[0].ctl.may_acknowledge(c.now));
}

#[test]
fn two_candidates_never_get_the_same_epoch() {
    let mut c = Cluster::led(&["a", "b"], "sync-all");
    // Both see no leader at the same view and both campaign from it: one compare-and-swap wins.
    let a = c.idx("a");
    let b = c.idx("b");
    let first = c.leads("a").expect("a leads");
    let stale = c.view_event();
    c.nodes[a].ctl.leading = None;
    c.etcd
        .txn(c.now, &Txn::default().delete(c.keys.leader()), None)
        .unwrap();
    let fresh = c.view_event();
    // Force both to see the key gone and each consider itself the best candidate.
    for i in [a, b] {
        c.deliver(i, fresh.clone());
    }
    drop(stale);
    let epochs: Vec<Epoch> = c.nodes.iter().filter_map(|n| n.ctl.epoch()).collect();
    assert_eq!(epochs.len(), 1, "exactly one node took the key: {epochs:?}");
    let winner = c.leaders()[0].to_string();
    assert_eq!(epochs[0], elected(&winner, first));
}

#[test]
fn no_acknowledgement_after_the_lease_deadline() {
    let mut c = Cluster::new(&["a", "b"]);
    c.advance(100, 3);
    let a = c.idx("a");
    let deadline = c.nodes[a].ctl.lease_deadline().unwrap();
    c.nodes[a].reaches_etcd = false;
    c.now = deadline - 1;
    c.round();
    assert!(c.nodes[a].ctl.may_acknowledge(c.now));
    c.now = deadline;
    assert!(
        !c.nodes[a].ctl.may_acknowledge(c.now),
        "checked, not only stepped down on a tick"
    );
    c.round();
    assert!(c.nodes[a].actions.contains(&Action::StepDown {
        reason: FenceReason::LeaseExpired
    }));
    assert!(!c.nodes[a].ctl.is_leader());
    // etcd expires a's lease only later: the key goes after the old leader stopped.
    assert!(c.etcd.get(&c.keys.leader()).is_some());
}

#[test]
fn a_primary_cut_from_etcd_is_replaced_only_after_it_stopped_acknowledging() {
    let mut c = Cluster::led(&["a", "b", "c"], "sync-all");
    let a = c.idx("a");
    let first = c.leads("a").expect("a leads");
    c.nodes[a].reaches_etcd = false;
    let mut a_stopped_at = None;
    let mut b_or_c_led_at = None;
    for _ in 0..80 {
        c.advance(100, 1);
        if a_stopped_at.is_none() && !c.nodes[a].ctl.may_acknowledge(c.now) {
            a_stopped_at = Some(c.now);
        }
        if b_or_c_led_at.is_none() && c.leaders().iter().any(|l| *l != "a") {
            b_or_c_led_at = Some(c.now);
        }
    }
    let (stopped, replaced) = (a_stopped_at.unwrap(), b_or_c_led_at.unwrap());
    assert!(
        stopped < replaced,
        "a stopped at {stopped}, replaced at {replaced}"
    );
    assert_eq!(c.leaders().len(), 1);
    let successor = c.leaders()[0].to_string();
    assert_eq!(
        c.nodes.iter().filter_map(|n| n.ctl.epoch()).next(),
        Some(elected(&successor, first))
    );
}

#[test]
fn a_new_epoch_goes_above_every_epoch_a_member_reports() {
    let mut c = Cluster::new(&["a", "b"]);
    c.advance(100, 3);
    c.adopt_volume();
    let backup = c.etcd.snapshot();
    // Later, b led at a later epoch (its store says so); then etcd is restored from the
    // backup.
    let b = c.idx("b");
    let later = elected("b", c.leads("a").expect("a leads"));
    c.nodes[b].local.epoch = later;
    c.nodes[b].local.head_epoch = later;
    c.nodes[b].local.head = Lsn(50);
    c.etcd.restore(c.now, &backup);
    for n in &mut c.nodes {
        n.actions.clear();
    }
    // (Past the TTL a campaign waits once etcd is seen behind a store's epoch.)
    c.advance(100, 40);
    // a, still leading at its first epoch, sees b's store at the later one and steps down;
    // every leadership taken after the restore is above it.
    let a = c.idx("a");
    assert!(c.nodes[a].actions.contains(&Action::StepDown {
        reason: FenceReason::HigherEpoch
    }));
    let leads: Vec<Epoch> = c
        .nodes
        .iter()
        .flat_map(|n| &n.actions)
        .filter_map(|a| match a {
            Action::Lead(Election { epoch, .. }) => Some(*epoch),
            _ => None,
        })
        .collect();
    assert!(
        !leads.is_empty() && leads.iter().all(|e| *e > later),
        "{leads:?}"
    );
    let epochs: Vec<Epoch> = c.nodes.iter().filter_map(|n| n.ctl.epoch()).collect();
    assert_eq!(epochs.len(), 1);
    assert!(epochs[0] > later, "{epochs:?}");
}

#[test]
fn a_leader_key_from_an_earlier_run_is_handed_back_not_led_on() {
    let mut c = Cluster::new(&["a", "b"]);
    c.advance(100, 3);
    let a = c.idx("a");
    let again = elected("a", c.leads("a").expect("a leads"));
    // a restarts: a new incarnation with a new lease finds its old key.
    c.restart(a, c.nodes[a].ctl.cfg.clone());
    let restarted = c.now;
    c.advance(100, 1);
    assert!(!c.nodes[a].ctl.is_leader() || c.leads("a") == Some(again));
    // Its own key is no witness that no leader etcd forgot is still acknowledging (a restore
    // may have brought it back): it leads a TTL after it started.
    c.advance(100, 29);
    assert!(
        c.leaders().is_empty(),
        "led {} ms after it started",
        c.now - restarted
    );
    c.advance(100, 3);
    assert_eq!(c.leaders(), ["a"]);
    assert_eq!(
        c.leads("a"),
        Some(again),
        "a new epoch, never the old key's"
    );
}

#[test]
fn a_switchover_hands_the_key_to_its_target_once_it_holds_the_leader_s_log() {
    let mut c = Cluster::new(&["a", "b", "c"]);
    c.advance(100, 3);
    c.adopt_volume();
    for n in &mut c.nodes {
        n.local.head = Lsn(40);
    }
    c.advance(100, 3);
    let request = SwitchoverRequest {
        to: "c".into(),
        from: Some("a".into()),
        failover: false,
        force: false,
    };
    let put = Txn::default().put(c.keys.switchover(), encode(&request));
    c.etcd.txn(c.now, &put, None).unwrap();
    c.advance(100, 5);
    assert_eq!(c.leaders(), ["c"]);
    assert!(c.nodes[c.idx("a")].actions.contains(&Action::StepDown {
        reason: FenceReason::Switchover
    }));
    assert!(
        c.etcd.get(&c.keys.switchover()).is_none(),
        "the request is consumed"
    );
}

#[test]
fn a_replica_leaves_the_in_sync_set_in_etcd_before_the_leader_may_skip_it() {
    let mut c = Cluster::led(&["a", "b", "c"], "sync-all");
    let a = c.idx("a");
    let now = c.now;
    c.deliver(
        a,
        Event::Replication {
            now,
            in_sync: vec!["b".into(), "c".into()],
        },
    );
    assert_eq!(c.nodes[a].ctl.recorded_in_sync(), ["a", "b", "c"]);
    c.nodes[a].actions.clear();
    // c stops counting: the removal is a transaction first, then an InSyncRecorded.
    c.deliver(
        a,
        Event::Replication {
            now,
            in_sync: vec!["b".into()],
        },
    );
    let acts = &c.nodes[a].actions;
    let txn_at = acts
        .iter()
        .position(|x| matches!(x, Action::Txn { .. }))
        .unwrap();
    let recorded_at = acts
        .iter()
        .position(|x| matches!(x, Action::InSyncRecorded { members } if members == &["a", "b"]))
        .unwrap();
    assert!(txn_at < recorded_at);
    // c is no longer a candidate: a's death leaves b.
    c.nodes[a].reaches_etcd = false;
    c.advance(500, 20);
    assert_eq!(c.leaders(), ["b"]);
}

#[test]
fn under_sync_quorum_the_most_complete_copy_may_lead_outside_the_in_sync_set() {
    for (commit, next) in [("sync-quorum", "c"), ("sync-all", "b")] {
        let mut c = Cluster::led(&["a", "b", "c"], commit);
        let a = c.idx("a");
        let now = c.now;
        c.deliver(
            a,
            Event::Replication {
                now,
                in_sync: vec!["b".into()],
            },
        );
        assert_eq!(c.nodes[a].ctl.recorded_in_sync(), ["a", "b"]);
        // c dropped out of the set but holds more than b: under sync-quorum the promotion
        // would refuse b (c is more complete), so c is the one etcd must elect.
        let (b, cc) = (c.idx("b"), c.idx("c"));
        c.nodes[b].local.head = Lsn(40);
        c.nodes[cc].local.head = Lsn(41);
        c.nodes[a].reaches_etcd = false;
        c.advance(500, 20);
        assert_eq!(c.leaders(), [next], "{commit}");
    }
}

#[test]
fn a_member_outside_the_set_whose_log_ends_at_a_later_epoch_may_lead() {
    let mut c = Cluster::led(&["a", "b", "c"], "sync-all");
    let a = c.idx("a");
    let now = c.now;
    c.deliver(
        a,
        Event::Replication {
            now,
            in_sync: vec!["b".into()],
        },
    );
    // c took entries of a's epoch that b never had, then dropped out of the set: the
    // promotion refuses b while c answers, so c leads, and its promotion is told the set.
    let (b, cc) = (c.idx("b"), c.idx("c"));
    c.nodes[b].local.head_epoch = Epoch(0);
    c.nodes[b].local.head = Lsn(40);
    c.nodes[cc].local.head_epoch = Epoch(1);
    c.nodes[cc].local.head = Lsn(30);
    c.nodes[cc].actions.clear();
    c.nodes[a].reaches_etcd = false;
    c.advance(500, 20);
    assert_eq!(c.leaders(), ["c"]);
    let vouchers = c.nodes[cc].actions.iter().find_map(|a| match a {
        Action::Lead(Election { vouchers, .. }) => Some(vouchers.clone()),
        _ => None,
    });
    assert_eq!(vouchers, Some(vec!["a".to_string(), "b".to_string()]));
}

#[test]
fn a_nofailover_node_never_campaigns() {
    let mut c = Cluster::new(&["a", "b"]);
    c.advance(100, 3);
    c.adopt_volume();
    let b = c.idx("b");
    c.nodes[b].ctl.cfg.nofailover = true;
    c.advance(100, 3);
    let a = c.idx("a");
    c.nodes[a].reaches_etcd = false;
    c.advance(500, 20);
    assert!(c.leaders().is_empty());
}

#[test]
fn a_stopping_leader_hands_its_key_back_at_once() {
    let mut c = Cluster::led(&["a", "b"], "sync-all");
    let a = c.idx("a");
    let now = c.now;
    c.deliver(a, Event::Shutdown { now });
    assert!(c.etcd.get(&c.keys.leader()).is_none());
    c.advance(100, 2);
    assert_eq!(c.leaders(), ["b"]);
}

#[test]
fn a_new_leader_may_skip_no_member_its_campaign_recorded_in_sync() {
    let mut c = Cluster::led(&["a", "b", "c"], "sync-all");
    let a = c.idx("a");
    let now = c.now;
    c.deliver(
        a,
        Event::Replication {
            now,
            in_sync: vec!["b".into(), "c".into()],
        },
    );
    c.nodes[a].reaches_etcd = false;
    let b = c.idx("b");
    for _ in 0..40 {
        c.now += 100;
        for i in [b, c.idx("c")] {
            let lease = c.nodes[i].lease;
            if let Some(ttl) = c.etcd.keep_alive(c.now, lease) {
                let sent_at = c.now;
                c.deliver(
                    i,
                    Event::KeepAlive {
                        sent_at,
                        granted_ttl: ttl,
                    },
                );
            }
            let (now, local) = (c.now, c.nodes[i].local.clone());
            c.deliver(i, Event::Local { now, local });
            let view = c.view_event();
            c.deliver(i, view);
        }
        if c.nodes[b].ctl.is_leader() {
            break;
        }
    }
    assert!(c.nodes[b].ctl.is_leader(), "b took over");
    // Before replication has counted anything at b's epoch, etcd records the set b's
    // campaign wrote (a and c included): nothing may skip them until a removal is recorded.
    let mut recorded = c.nodes[b].ctl.recorded_in_sync().to_vec();
    recorded.sort();
    assert_eq!(recorded, ["a", "b", "c"]);
}

#[test]
fn no_campaign_for_a_ttl_once_etcd_went_back_in_time() {
    let mut c = Cluster::led(&["a", "b"], "sync-all");
    let backup = c.etcd.snapshot();
    // a leads at its first epoch; cut from etcd, it is replaced by b at the next.
    let (a, b) = (c.idx("a"), c.idx("b"));
    let replaced_at = elected("b", c.leads("a").expect("a leads"));
    c.nodes[a].reaches_etcd = false;
    assert!((0..80).any(|_| {
        c.advance(100, 1);
        c.leads("b").is_some()
    }));
    assert_eq!(c.leads("b"), Some(replaced_at));
    c.adopt_volume();
    c.advance(100, 2);
    // etcd comes back from the backup, whose counter says a's epoch, and whose leader key is gone
    // (a resigned in that past): b is cut off and may still be inside its deadline, and
    // etcd no longer knows it.
    c.nodes[b].reaches_etcd = false;
    c.nodes[a].reaches_etcd = true;
    c.etcd.restore(c.now, &backup);
    c.etcd
        .txn(c.now, &Txn::default().delete(c.keys.leader()), None)
        .unwrap();
    let restored_at = c.now;
    let ttl = c.nodes[a].ctl.timing().ttl;
    let mut a_led_at = None;
    for _ in 0..60 {
        c.advance(100, 1);
        if a_led_at.is_none() && c.leads("a").is_some() {
            a_led_at = Some(c.now);
        }
    }
    let led = a_led_at.expect("a leads once the hold is over");
    assert!(
        led >= restored_at + ttl,
        "a campaigned {} ms after etcd went back, inside b's possible lease",
        led - restored_at
    );
    assert!(c.leads("a").unwrap() > replaced_at);
}

impl Cluster {
    /// Node `i` could not serve the term it won: it gives it up as the binary does (the
    /// controller hears `LeadFailed`, the lease is revoked, a new one granted).
    fn fail_lead(&mut self, i: usize) {
        let now = self.now;
        self.deliver(i, Event::LeadFailed { now });
        self.etcd.revoke(now, self.nodes[i].lease);
        self.deliver(
            i,
            Event::KeepAlive {
                sent_at: now,
                granted_ttl: 0,
            },
        );
        let ttl = self.nodes[i].ctl.timing().ttl;
        self.nodes[i].lease = self.etcd.grant(now, ttl);
        self.deliver(
            i,
            Event::KeepAlive {
                sent_at: now,
                granted_ttl: ttl,
            },
        );
        self.nodes[i].actions.clear();
    }

    fn led_at(&self, i: usize) -> Option<Epoch> {
        self.nodes[i].actions.iter().find_map(|a| match a {
            Action::Lead(Election { epoch, .. }) => Some(*epoch),
            _ => None,
        })
    }
}

#[test]
fn a_node_that_cannot_serve_its_term_campaigns_again_only_after_a_growing_pause() {
    let mut c = Cluster::new(&["a"]);
    c.advance(100, 3);
    let mut last = elected("a", Epoch(0));
    assert_eq!(c.leads("a"), Some(last));
    // TTL 3 s: pauses of 375 ms, then 750 ms, then 1.5 s, then 3 s (and no more).
    for (round, pause) in [375, 750, 1_500, 3_000, 3_000].into_iter().enumerate() {
        c.fail_lead(0);
        assert!(!c.nodes[0].ctl.is_leader(), "round {round}");
        let failed_at = c.now;
        let mut waited = None;
        for _ in 0..400 {
            c.advance(25, 1);
            if c.led_at(0).is_some() {
                waited = Some(c.now - failed_at);
                break;
            }
        }
        let waited = waited.unwrap_or_else(|| panic!("round {round}: never campaigned again"));
        assert!(
            (pause..pause + 250).contains(&waited),
            "round {round}: campaigned again after {waited} ms, not {pause}"
        );
        last = elected("a", last);
        assert_eq!(c.led_at(0), Some(last), "one epoch per attempt");
    }
}

#[test]
fn the_pause_after_failed_terms_starts_afresh_once_another_node_led() {
    let mut c = Cluster::led(&["a", "b"], "sync-all");
    assert_eq!(c.leaders(), ["a"]);
    for _ in 0..3 {
        c.fail_lead(0);
        c.advance(25, 200);
    }
    // a is cut off; b takes over, and a follows it once it is back.
    c.nodes[0].reaches_etcd = false;
    c.advance(100, 60);
    assert_eq!(c.leaders(), ["b"]);
    c.nodes[0].reaches_etcd = true;
    c.advance(100, 10);
    assert_eq!(c.nodes[0].ctl.leader(), Some("b"));
    assert_eq!(c.nodes[0].ctl.lead_failures, 0);
}
mod failsafe;
mod settings;

#[test]
fn a_lone_survivor_counts_the_previous_terms_copies() {
    let mut c = Cluster::led(&["a", "b", "c"], "sync-all");
    c.advance(100, 2);
    assert_eq!(c.leaders(), ["a"]);
    let view = VolumeView::parse(&c.keys, &c.etcd.range(c.now, c.keys.dir())).unwrap();
    assert_eq!(view.insync.map(|s| s.value.members.len()), Some(3));
    // a and c go: their member keys expire with their leases, and b alone is left.
    let b = c.idx("b");
    c.nodes[b].actions.clear();
    for n in ["a", "c"] {
        let i = c.idx(n);
        c.nodes[i].reaches_etcd = false;
    }
    c.advance(100, 60);
    assert_eq!(c.leaders(), ["b"]);
    let lead = c.nodes[b].actions.iter().find_map(|a| match a {
        Action::Lead(Election {
            replicas, copies, ..
        }) => Some((replicas.len(), *copies)),
        _ => None,
    });
    assert_eq!(
        lead,
        Some((0, 3)),
        "b must count the previous term's three copies"
    );
}

#[test]
fn a_node_that_starts_after_an_etcd_restore_waits_a_ttl_before_it_campaigns() {
    // Seed 27512's shape: c is down while b leads; etcd is restored to before b's term, while
    // b, cut from etcd, still acknowledges inside its deadline; c restarts and sees nothing
    // behind (b's epoch is only on b).
    let mut c = Cluster::led(&["a", "b", "c"], "best-effort");
    let (a, b, cn) = (c.idx("a"), c.idx("b"), c.idx("c"));
    c.nodes[cn].reaches_etcd = false;
    c.advance(500, 8);
    let now = c.now;
    c.deliver(a, Event::Shutdown { now });
    c.nodes[a].reaches_etcd = false;
    let before_b = c.etcd.snapshot();
    c.advance(100, 3);
    assert!(c.leads("b").is_some(), "b leads once a handed the key back");
    c.nodes[b].reaches_etcd = false;
    c.etcd.restore(c.now, &before_b);
    let timing = *c.nodes[cn].ctl.timing();
    // Ranked above b, whose record the restore brought back.
    let cfg = NodeConfig {
        priority: 10,
        ..c.nodes[cn].ctl.cfg.clone()
    };
    c.restart(cn, cfg);
    let restarted = c.now;
    let mut c_led_at = None;
    for _ in 0..100 {
        c.advance(100, 1);
        if c.nodes[cn].ctl.is_leader() {
            assert!(
                !c.nodes[b].ctl.may_acknowledge(c.now),
                "c leads at {} while b still acknowledges",
                c.now
            );
            c_led_at.get_or_insert(c.now);
        }
    }
    let led = c_led_at.expect("c leads once the TTL since its start has passed");
    assert!(
        led >= restarted + timing.ttl,
        "c led {} ms after it started",
        led - restarted
    );
}
