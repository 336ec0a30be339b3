//! The etcd-led mode: who leads is decided by the real control-plane core
//! (`blockrep_control::Controller`), one per node, over an etcd in memory on the simulated
//! clock, instead of by the coordinator.
//!
//! The simulator is only the environment: it carries each node's etcd requests and answers
//! over a link of its own (delay, loss, cuts), renews each node's lease every renew interval
//! of the node's own clock (which may run fast or slow), feeds the core what the node's store
//! and replication say, and carries out what the core asks: `Lead{epoch}` promotes the node
//! at exactly that epoch through the coordinator's path (the real promotion rule and
//! fencing), `StepDown` demotes it. Every acknowledgement a primary sends (a write's, a
//! FLUSH's, a read's) first passes the gate, at the instant it is sent: the core's
//! `may_acknowledge` on the node's clock, and for a FLUSH the in-sync rule (no member etcd
//! records in sync may be skipped). `lease_safety` checks what leases promise on the one true
//! clock.
//!
//! `etcd` is etcd's side of the links, `gate` the acknowledgement gate, `run` the random
//! history, the client and the liveness phase, `script` what scenario tests place by hand.

mod etcd;
mod gate;
mod run;
mod script;

use std::collections::BTreeSet;

use blockrep_control::mem_etcd::MemEtcd;
use blockrep_control::record::MemberState;
use blockrep_control::{
    Action, Controller, Election, Event, Keys, LocalState, NodeConfig, Timing, Txn, TxnId,
    VolumeView,
};
use blockrep_replication::core::primary::PeerState;
use blockrep_storage::Epoch;
use rand::RngExt;

use super::queue::Ev;
use super::Cluster;
use crate::lease_safety::LeaseSafety;
use crate::net::NodeId;
use crate::store::BLOCK;

/// Fault rates of the etcd-led mode, per client step (beside `Faults`, whose coordinator
/// failover is not used in this mode).
#[derive(Debug, Clone)]
pub struct ControlFaults {
    /// A node's link to etcd is cut (the primary's, half of the time).
    pub etcd_cut: f64,
    /// Every link to etcd is restored.
    pub etcd_heal: f64,
    pub etcd_down: f64,
    pub etcd_up: f64,
    /// A node is paused (SIGSTOP) for up to twice the TTL.
    pub pause: f64,
    /// etcd is backed up now (the snapshot a later restore goes back to).
    pub snapshot: f64,
    /// etcd goes down and comes back restored from the last snapshot.
    pub restore: f64,
}

impl ControlFaults {
    pub fn none() -> ControlFaults {
        ControlFaults {
            etcd_cut: 0.0,
            etcd_heal: 1.0,
            etcd_down: 0.0,
            etcd_up: 1.0,
            pause: 0.0,
            snapshot: 0.0,
            restore: 0.0,
        }
    }

    pub fn all() -> ControlFaults {
        ControlFaults {
            etcd_cut: 0.004,
            etcd_heal: 0.01,
            etcd_down: 0.001,
            etcd_up: 0.01,
            pause: 0.002,
            snapshot: 0.005,
            restore: 0.001,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Short, so that failovers play out in a history of a few seconds: the margin stays the
    /// core's ttl/8.
    pub timing: Timing,
    /// The most an etcd request or answer takes on a node's link (milliseconds).
    pub max_etcd_delay: u64,
    /// The chance a request or answer is lost on the way.
    pub etcd_loss: f64,
    /// Each node's clock runs at a random rate within this many parts per million of the true
    /// one (100 000: up to 10% slow or fast).
    pub max_drift_ppm: u64,
    /// How often (on the node's clock) the driver ticks its core and reports store and
    /// replication.
    pub tick: u64,
    pub faults: ControlFaults,
    /// Every node runs `--failsafe`: a leader past its lease deadline serves on while every
    /// replica its mode needs answers at its epoch (the core's `ReplicasConfirmed`, fed from
    /// the primary core's `confirmed_at` on every tick), and a new leader holds
    /// `renew + ttl/8` on its own clock after its promotion before it acknowledges.
    pub failsafe: bool,
    /// In the liveness phase, an operator forces a failover when no leader has served for
    /// three TTLs (off: a history where the control plane cannot elect a leader that serves
    /// on its own fails).
    pub operator_forces_failover: bool,
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            timing: Timing {
                ttl: 600,
                renew: 200,
                retry: 200,
                margin: 600 / 8,
            },
            max_etcd_delay: 10,
            etcd_loss: 0.01,
            max_drift_ppm: 100_000,
            tick: 10,
            faults: ControlFaults::all(),
            failsafe: false,
            operator_forces_failover: true,
        }
    }
}

/// What one node asks of etcd.
#[derive(Debug)]
pub(crate) enum Request {
    Txn {
        id: TxnId,
        txn: Txn,
    },
    KeepAlive {
        sent: u64,
        lease: i64,
    },
    Grant {
        sent: u64,
    },
    /// The node gives its leadership up, all of it (`blockrep node` after a refused
    /// promotion): no answer.
    Revoke {
        lease: i64,
    },
    Read,
}

/// What etcd answers.
#[derive(Debug)]
pub(crate) enum Answer {
    TxnDone {
        id: TxnId,
        succeeded: bool,
        revision: i64,
        view: Option<Box<VolumeView>>,
    },
    KeepAlive {
        sent: u64,
        lease: i64,
        ttl: u64,
    },
    Granted {
        sent: u64,
        lease: i64,
        ttl: u64,
    },
    View(Box<VolumeView>),
}

/// The etcd-led mode's events. `inc` is the node's incarnation (its process's life): events
/// of an earlier one are dropped.
#[derive(Debug)]
pub(crate) enum ControlEv {
    Tick {
        node: NodeId,
        inc: u64,
    },
    Renew {
        node: NodeId,
        inc: u64,
    },
    AtEtcd {
        node: NodeId,
        inc: u64,
        req: Request,
    },
    Answer {
        node: NodeId,
        inc: u64,
        answer: Answer,
    },
    /// The driver gives a transaction up after the retry timeout.
    TxnTimeout {
        node: NodeId,
        inc: u64,
        id: TxnId,
    },
    EtcdTick,
}

/// One node's control-plane process.
pub(crate) struct ControlNode {
    ctl: Option<Controller>,
    inc: u64,
    lease: Option<i64>,
    /// The node's clock: `offset + now * rate_ppm / 1e6`.
    rate_ppm: u64,
    offset: u64,
    link_up: bool,
    paused_until: Option<u64>,
    outstanding: BTreeSet<TxnId>,
    /// Flushes whose acknowledgement waits for etcd to record a skipped member's removal.
    parked: Vec<u64>,
    /// The epoch etcd made this node leader at (serving or about to).
    leading: Option<Epoch>,
    serving: bool,
    /// The highest epoch a member answered a promotion's probe with.
    epoch_seen: Epoch,
    /// The leadership comes from an operator's forced failover: the rule's refusals are
    /// overridden, as `serve --force` does.
    forced: bool,
    /// The in-sync set a member of which must vouch for the promotion (`Action::Lead`'s
    /// `vouchers`).
    vouchers: Vec<String>,
    /// Failsafe: promoted, acknowledging nothing before this time of its own clock (the
    /// node's `AckGate::hold`); its leadership begins, for the checker, once it has passed.
    hold_until: Option<u64>,
}

pub(crate) struct ControlPlane {
    cfg: ControlConfig,
    keys: Keys,
    etcd: MemEtcd,
    etcd_up: bool,
    snapshot: Option<MemEtcd>,
    nodes: Vec<ControlNode>,
    pub(crate) safety: LeaseSafety,
    commit: String,
}

impl ControlNode {
    /// A new process on this node (or none, after a crash): everything the old one had in
    /// flight or believed is dropped here, in one place, and its late events are recognised
    /// as stale by the new incarnation number.
    fn new_incarnation(&mut self, ctl: Option<Controller>) {
        self.ctl = ctl;
        self.inc += 1;
        self.lease = None;
        self.outstanding.clear();
        self.parked.clear();
        self.leading = None;
        self.serving = false;
        self.paused_until = None;
        self.hold_until = None;
    }
}

impl ControlPlane {
    fn node(&self, n: NodeId) -> &ControlNode {
        &self.nodes[n]
    }
}

impl Cluster {
    /// Sets the etcd-led mode up: every node a replica of nobody, etcd empty, each node's core
    /// started; the first to initialise the volume leads.
    pub(super) fn start_controlled(&mut self) {
        let Some(cfg) = self.cfg.control.clone() else {
            return;
        };
        let Ok(keys) = Keys::new("/blockrep", "vol") else {
            return;
        };
        let nodes = (0..self.nodes.len())
            .map(|_| {
                let drift = cfg.max_drift_ppm;
                let rate_ppm = 1_000_000 - drift + self.rng.random_range(0..=2 * drift);
                ControlNode {
                    ctl: None,
                    inc: 0,
                    lease: None,
                    rate_ppm,
                    offset: self.rng.random_range(0..1_000_000),
                    link_up: true,
                    paused_until: None,
                    outstanding: BTreeSet::new(),
                    parked: Vec::new(),
                    leading: None,
                    serving: false,
                    epoch_seen: Epoch(0),
                    forced: false,
                    vouchers: Vec::new(),
                    hold_until: None,
                }
            })
            .collect();
        self.control = Some(ControlPlane {
            safety: LeaseSafety::new(self.nodes.len()),
            commit: self.cfg.mode.to_string(),
            cfg,
            keys,
            etcd: MemEtcd::new(),
            etcd_up: true,
            snapshot: None,
            nodes,
        });
        for n in 0..self.nodes.len() {
            self.start_replica(n);
            self.control_restarted(n);
        }
        self.schedule(1, Ev::Tick);
        self.schedule(1, Ev::Control(Box::new(ControlEv::EtcdTick)));
    }

    fn cp(&mut self) -> Option<&mut ControlPlane> {
        self.control.as_mut()
    }

    /// Node `n`'s clock now.
    fn local_now(&self, n: NodeId) -> u64 {
        self.control.as_ref().map_or(self.now, |cp| {
            let c = cp.node(n);
            c.offset + self.now * c.rate_ppm / 1_000_000
        })
    }

    /// How long `local_ms` of node `n`'s clock takes on the true one (at least 1).
    fn true_delay(&self, n: NodeId, local_ms: u64) -> u64 {
        self.control.as_ref().map_or(local_ms, |cp| {
            let rate = cp.node(n).rate_ppm;
            (local_ms * 1_000_000).div_ceil(rate).max(1)
        })
    }

    fn control_schedule(&mut self, delay: u64, ev: ControlEv) {
        self.schedule(delay, Ev::Control(Box::new(ev)));
    }

    /// A node's process (re)starts: a new core, no lease yet, a tick and a renewal at once.
    pub(super) fn control_restarted(&mut self, n: NodeId) {
        let name = self.nodes[n].name.clone();
        let Some(cp) = self.cp() else {
            return;
        };
        let cfg = NodeConfig {
            name,
            priority: 0,
            nofailover: false,
            timing: cp.cfg.timing,
            commit: cp.commit.clone(),
            failsafe: cp.cfg.failsafe,
        };
        let c = &mut cp.nodes[n];
        c.new_incarnation(Some(Controller::new(cp.keys.clone(), cfg)));
        let inc = c.inc;
        self.control_schedule(1, ControlEv::Renew { node: n, inc });
        self.control_schedule(1, ControlEv::Tick { node: n, inc });
    }

    /// Node `n` lost power: its process and everything it had in flight are gone.
    pub(super) fn control_crashed(&mut self, n: NodeId) {
        if let Some(cp) = self.cp() {
            cp.nodes[n].new_incarnation(None);
        }
    }

    pub(super) fn is_paused(&self, n: NodeId) -> bool {
        self.control
            .as_ref()
            .is_some_and(|cp| cp.node(n).paused_until.is_some_and(|t| t > self.now))
    }

    /// When a paused node's event may happen: after it resumes.
    pub(super) fn held_until(&self, ev: &Ev) -> Option<u64> {
        let cp = self.control.as_ref()?;
        let node = match ev {
            Ev::Deliver {
                conn, to_replica, ..
            } => Some(if *to_replica {
                conn.replica
            } else {
                conn.primary
            }),
            Ev::ConnectDone { conn, .. } => Some(conn.primary),
            Ev::Closed { conn, tell_replica } => Some(if *tell_replica {
                conn.replica
            } else {
                conn.primary
            }),
            Ev::Done { node, .. } => Some(*node),
            Ev::Control(ev) => match &**ev {
                ControlEv::Tick { node, .. }
                | ControlEv::Renew { node, .. }
                | ControlEv::Answer { node, .. }
                | ControlEv::TxnTimeout { node, .. } => Some(*node),
                _ => None,
            },
            _ => None,
        }?;
        cp.node(node).paused_until.filter(|t| *t > self.now)
    }

    pub(super) fn control_event(&mut self, ev: ControlEv) {
        match ev {
            ControlEv::Tick { node, inc } if self.current(node, inc) => self.control_tick(node),
            ControlEv::Renew { node, inc } if self.current(node, inc) => self.renew(node),
            ControlEv::AtEtcd { node, inc, req } => self.at_etcd(node, inc, req),
            ControlEv::Answer { node, inc, answer } if self.current(node, inc) => {
                self.answered(node, answer)
            }
            ControlEv::TxnTimeout { node, inc, id } if self.current(node, inc) => {
                let gave_up = self
                    .cp()
                    .is_some_and(|cp| cp.nodes[node].outstanding.remove(&id));
                if gave_up {
                    let now = self.local_now(node);
                    self.feed(
                        node,
                        Event::TxnDone {
                            now,
                            id,
                            succeeded: false,
                            revision: 0,
                        },
                    );
                }
            }
            ControlEv::EtcdTick => {
                self.etcd_tick();
                self.control_schedule(5, ControlEv::EtcdTick);
            }
            _ => {}
        }
    }

    fn current(&self, n: NodeId, inc: u64) -> bool {
        self.control
            .as_ref()
            .is_some_and(|cp| cp.node(n).inc == inc && cp.node(n).ctl.is_some())
    }

    /// Hands `event` to node `n`'s core and carries out what it asks.
    fn feed(&mut self, n: NodeId, event: Event) {
        let Some(ctl) = self.cp().and_then(|cp| cp.nodes[n].ctl.as_mut()) else {
            return;
        };
        let actions = ctl.handle(event);
        for a in actions {
            self.control_action(n, a);
        }
    }

    fn control_action(&mut self, n: NodeId, a: Action) {
        match a {
            Action::Txn { id, txn } => {
                let Some(cp) = self.cp() else {
                    return;
                };
                cp.nodes[n].outstanding.insert(id);
                let (inc, retry) = (cp.nodes[n].inc, cp.cfg.timing.retry);
                self.send_to_etcd(n, Request::Txn { id, txn });
                let d = self.true_delay(n, retry);
                self.control_schedule(d, ControlEv::TxnTimeout { node: n, inc, id });
            }
            Action::Lead(Election {
                epoch,
                force,
                vouchers,
                ..
            }) => {
                let name = self.nodes[n].name.clone();
                self.log(format!("etcd: {name} leads at epoch {epoch}"));
                if let Some(cp) = self.cp() {
                    cp.nodes[n].leading = Some(epoch);
                    cp.nodes[n].forced = force;
                    cp.nodes[n].vouchers = vouchers;
                }
                self.try_serve(n);
            }
            Action::StepDown { reason } => {
                let name = self.nodes[n].name.clone();
                self.log(format!("etcd: {name} steps down ({})", reason.label()));
                self.demote(n);
            }
            Action::Follow { leader, epoch } => {
                let name = self.nodes[n].name.clone();
                self.log(format!("etcd: {name} follows {leader} at epoch {epoch}"));
            }
            Action::InSyncRecorded { members } => {
                let name = self.nodes[n].name.clone();
                self.log(format!(
                    "etcd: {name} recorded in sync [{}]",
                    members.join(" ")
                ));
                self.release_parked(n);
            }
            // The simulated primary replicates to every other node already.
            Action::Replicas { .. } => {}
            // Every simulated node has the volume's settings; were one not to, it would sit
            // out and the liveness check would say so.
            Action::Misconfigured { differences } => {
                let name = self.nodes[n].name.clone();
                let listed = blockrep_control::controller::describe(&differences);
                self.log(format!("etcd: {name} sits out: {listed}"));
            }
            // The simulated nodes' names give distinct tags; were two not to, one would sit
            // out and the liveness check would say so.
            Action::NameClash { other, tag } => {
                let name = self.nodes[n].name.clone();
                self.log(format!(
                    "etcd: {name} sits out: leader tag {tag} is {other}'s too"
                ));
            }
        }
    }

    /// A leader not yet serving promotes its store (when etcd makes it lead, or once it is
    /// alive and no longer paused); a refusal gives the term up.
    fn try_serve(&mut self, n: NodeId) {
        let Some(c) = self.control.as_ref().map(|cp| cp.node(n)) else {
            return;
        };
        let (Some(epoch), false) = (c.leading, c.serving) else {
            return;
        };
        if !self.nodes[n].alive || self.is_paused(n) {
            return;
        }
        let vouchers = c.vouchers.clone();
        if self.promote_at(n, Some(epoch), c.forced, &vouchers) {
            self.stats.failovers += 1;
            let now = self.now;
            let local = self.local_now(n);
            if let Some(cp) = self.cp() {
                cp.nodes[n].serving = true;
                if cp.cfg.failsafe {
                    let t = cp.cfg.timing;
                    let skip = blockrep_control::mutants::active(
                        blockrep_control::mutants::Mutant::FailsafeWithoutHold,
                    );
                    let hold = if skip { 0 } else { t.renew + t.ttl / 8 };
                    cp.nodes[n].hold_until = Some(local + hold);
                    return;
                }
                let v = cp.safety.began_leading(n, epoch, now);
                self.fail_on(v);
            }
            return;
        }
        // Whatever the refusal, an epoch a member has seen is reported, so that the next
        // campaign goes above it.
        let seen = self
            .members(n)
            .into_iter()
            .map(|i| self.facts(i).epoch)
            .max()
            .unwrap_or(Epoch(0));
        if let Some(cp) = self.cp() {
            let c = &mut cp.nodes[n];
            c.epoch_seen = c.epoch_seen.max(seen);
        }
        self.lead_failed(n);
    }

    /// The promotion refused the term etcd gave: as `blockrep node` does, the node gives the
    /// leadership up by revoking its lease (the leader key and its record go at once, so a
    /// member the promotion would accept can campaign) and registers again on a new lease.
    /// Holding the key and retrying would keep every other node from ever leading.
    fn lead_failed(&mut self, n: NodeId) {
        let now = self.local_now(n);
        let name = self.nodes[n].name.clone();
        self.log(format!("etcd: {name} could not serve; gives the volume up"));
        self.feed(n, Event::LeadFailed { now });
        self.demote(n);
        let Some(lease) = self.cp().and_then(|cp| cp.nodes[n].lease.take()) else {
            return;
        };
        self.send_to_etcd(n, Request::Revoke { lease });
    }

    /// Stops serving as primary (if it did) and rejoins as a replica.
    fn demote(&mut self, n: NodeId) {
        if let Some(cp) = self.cp() {
            let c = &mut cp.nodes[n];
            c.leading = None;
            c.serving = false;
            c.hold_until = None;
            c.parked.clear();
        }
        if self.nodes[n].primary().is_some() && self.nodes[n].alive {
            self.nodes[n].role = None;
            self.blip(n);
            self.start_replica(n);
        }
    }

    /// Every renew interval: a keep-alive (or a grant, without a lease) and a fresh read.
    fn renew(&mut self, n: NodeId) {
        let sent = self.local_now(n);
        let Some(cp) = self.cp() else {
            return;
        };
        let (inc, lease, renew) = (cp.nodes[n].inc, cp.nodes[n].lease, cp.cfg.timing.renew);
        match lease {
            Some(lease) => self.send_to_etcd(n, Request::KeepAlive { sent, lease }),
            None => self.send_to_etcd(n, Request::Grant { sent }),
        }
        self.send_to_etcd(n, Request::Read);
        let d = self.true_delay(n, renew);
        self.control_schedule(d, ControlEv::Renew { node: n, inc });
    }

    fn answered(&mut self, n: NodeId, answer: Answer) {
        let now = self.local_now(n);
        match answer {
            Answer::TxnDone {
                id,
                succeeded,
                revision,
                view,
            } => {
                if !self
                    .cp()
                    .is_some_and(|cp| cp.nodes[n].outstanding.remove(&id))
                {
                    return;
                }
                self.feed(
                    n,
                    Event::TxnDone {
                        now,
                        id,
                        succeeded,
                        revision,
                    },
                );
                if let Some(view) = view {
                    self.feed(n, Event::View { now, view: *view });
                }
            }
            Answer::KeepAlive { sent, lease, ttl } => {
                // An answer about a lease this process no longer holds says nothing of its
                // own.
                let Some(cp) = self.cp().filter(|cp| cp.nodes[n].lease == Some(lease)) else {
                    return;
                };
                if ttl == 0 {
                    cp.nodes[n].lease = None;
                }
                self.feed(
                    n,
                    Event::KeepAlive {
                        sent_at: sent,
                        granted_ttl: ttl,
                    },
                );
            }
            Answer::Granted { sent, lease, ttl } => {
                // Never a second lease under a live one: keys bound to the first would expire
                // while the deadline followed the second. The spare one expires unused.
                let Some(cp) = self.cp().filter(|cp| cp.nodes[n].lease.is_none()) else {
                    return;
                };
                cp.nodes[n].lease = Some(lease);
                self.feed(
                    n,
                    Event::KeepAlive {
                        sent_at: sent,
                        granted_ttl: ttl,
                    },
                );
            }
            Answer::View(view) => self.feed(n, Event::View { now, view: *view }),
        }
    }

    /// What the node's store says about it, as the core wants it.
    fn local_state(&self, n: NodeId) -> LocalState {
        let s = &self.nodes[n].store;
        let seen = self
            .control
            .as_ref()
            .map_or(Epoch(0), |cp| cp.node(n).epoch_seen);
        LocalState {
            volume_id: s.volume_id.0.iter().map(|b| format!("{b:02x}")).collect(),
            size: self.cfg.blocks * BLOCK,
            state: if s.rebuilding {
                MemberState::Rebuilding
            } else {
                MemberState::Ready
            },
            epoch: s.epoch.max(seen),
            head: s.head(),
            head_epoch: s.head_epoch(),
            committed: s.committed,
            replication: self.nodes[n].name.clone(),
            nbd: Vec::new(),
            admin: None,
        }
    }

    /// The replicas primary `n`'s replication counts in sync now.
    fn counted_in_sync(&self, n: NodeId) -> Vec<String> {
        self.nodes[n].primary().map_or_else(Vec::new, |pn| {
            pn.core
                .peers()
                .into_iter()
                .filter(|p| p.state == PeerState::InSync)
                .map(|p| p.id.0)
                .collect()
        })
    }

    /// Failsafe: primary `n`'s `confirmed_at` (the core's true-clock send time) on `n`'s own
    /// clock, which is what its controller counts in (rounded down).
    fn confirmed_at(&self, n: NodeId) -> Option<u64> {
        let cp = self.control.as_ref().filter(|cp| cp.cfg.failsafe)?;
        let at = self.nodes[n].primary()?.core.confirmed_at()?;
        let c = cp.node(n);
        Some(c.offset + at * c.rate_ppm / 1_000_000)
    }

    /// Failsafe: a promoted leader whose hold has passed begins leading (for the checker
    /// too) and may acknowledge from now on.
    fn end_hold(&mut self, n: NodeId) {
        let local = self.local_now(n);
        let now = self.now;
        let Some(cp) = self.cp() else {
            return;
        };
        let c = &mut cp.nodes[n];
        let (Some(epoch), Some(until)) = (c.leading.filter(|_| c.serving), c.hold_until) else {
            return;
        };
        if local < until {
            return;
        }
        c.hold_until = None;
        let v = cp.safety.began_leading(n, epoch, now);
        self.fail_on(v);
    }

    fn control_tick(&mut self, n: NodeId) {
        let now = self.local_now(n);
        let local = self.local_state(n);
        self.feed(n, Event::Local { now, local });
        if self.nodes[n].primary().is_some() {
            let in_sync = self.counted_in_sync(n);
            self.feed(n, Event::Replication { now, in_sync });
            if let Some(at) = self.confirmed_at(n) {
                self.feed(n, Event::ReplicasConfirmed { at });
            }
        }
        self.feed(n, Event::Tick { now });
        self.end_hold(n);
        self.try_serve(n);
        self.release_parked(n);
        let Some(cp) = self.cp() else {
            return;
        };
        let (inc, tick) = (cp.nodes[n].inc, cp.cfg.tick);
        let d = self.true_delay(n, tick);
        self.control_schedule(d, ControlEv::Tick { node: n, inc });
    }
}
