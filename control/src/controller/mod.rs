//! The control-plane state machine of one node: it registers the node, campaigns for the
//! leader key when it is the best candidate, keeps the lease deadline, records the in-sync
//! set, hands over on a switchover, and steps down when it may no longer lead.
//!
//! Events in, actions out; nothing here waits or reads a clock. The driver feeds every view
//! of the volume's keys, every transaction's result, every answered keep-alive and a regular
//! tick, and checks [`Controller::may_acknowledge`] before every acknowledgement it sends.

use std::collections::BTreeMap;

use blockrep_storage::{Epoch, Lsn};

use crate::keys::Keys;
use crate::lease::{LeaseClock, Timing};
use crate::rank;
use crate::record::{encode, Identity, MemberRecord, MemberRole, MemberState, VolumeView};
use crate::txn::{Compare, Txn, TxnId};
use crate::LeaderTag;
use crate::Millis;

/// How this node takes part.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    /// Among candidates at the same position, the higher priority leads.
    pub priority: u32,
    /// Never campaign (the node still registers and replicates).
    pub nofailover: bool,
    pub timing: Timing,
    /// The commit mode's name, recorded in the volume's config by the node that creates it.
    pub commit: String,
    /// Keep acknowledging past the lease deadline while every replica this primary needs keeps
    /// acknowledging at its epoch ([`Event::ReplicasConfirmed`]). The binary refuses it under
    /// best-effort, where no replica's acknowledgement stands in for etcd's word.
    pub failsafe: bool,
}

/// What the node's store and replication say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalState {
    pub volume_id: String,
    pub size: u64,
    pub state: MemberState,
    pub epoch: Epoch,
    pub head: Lsn,
    pub head_epoch: Epoch,
    pub committed: Lsn,
    pub replication: String,
    pub nbd: Vec<String>,
    pub admin: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// A fresh read of the volume's keys (after every watch notification, and after every
    /// transaction).
    View {
        now: Millis,
        view: VolumeView,
    },
    /// A transaction finished; `revision` is etcd's revision after it (0 if it failed to reach
    /// etcd).
    TxnDone {
        now: Millis,
        id: TxnId,
        succeeded: bool,
        revision: i64,
    },
    /// etcd answered a keep-alive (or the grant) sent at `sent_at` with this TTL (0: the
    /// lease is gone).
    KeepAlive {
        sent_at: Millis,
        granted_ttl: Millis,
    },
    /// This node's store or replication changed position or state.
    Local {
        now: Millis,
        local: LocalState,
    },
    /// As primary: the replicas its replication counts in sync at its epoch now.
    Replication {
        now: Millis,
        in_sync: Vec<String>,
    },
    /// As primary: every replica it needs acknowledged, at its epoch, a barrier sent at `at`.
    ReplicasConfirmed {
        at: Millis,
    },
    Tick {
        now: Millis,
    },
    /// The node is stopping: hand the leader key back now rather than at the lease's expiry.
    Shutdown {
        now: Millis,
    },
    /// The node could not serve at the epoch it won (its promotion was refused, a port was
    /// taken) and has given the leadership up; it campaigns again only after a pause that
    /// grows with each such failure in a row.
    LeadFailed {
        now: Millis,
    },
}

impl Event {
    /// The event's time (a keep-alive's answer carries only its send time, which says nothing
    /// about now).
    fn now(&self) -> Option<Millis> {
        match self {
            Event::View { now, .. }
            | Event::TxnDone { now, .. }
            | Event::Local { now, .. }
            | Event::Replication { now, .. }
            | Event::Tick { now }
            | Event::Shutdown { now }
            | Event::LeadFailed { now } => Some(*now),
            Event::KeepAlive { .. } | Event::ReplicasConfirmed { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run this transaction and answer with [`Event::TxnDone`].
    Txn { id: TxnId, txn: Txn },
    /// Lead as etcd elected this node (see [`Election`]).
    Lead(Election),
    /// As leader: the volume's other members changed; replicate to these now.
    Replicas { replicas: Vec<(String, String)> },
    /// Someone else leads: be its replica.
    Follow { leader: String, epoch: Epoch },
    /// Stop acknowledging, now, and stop being primary.
    StepDown { reason: FenceReason },
    /// The in-sync set etcd now records at this node's epoch. A primary may acknowledge a
    /// write that skips a replica only once that replica is absent from it.
    InSyncRecorded { members: Vec<String> },
    /// This node's settings are not its volume's (see `settings`): it takes no part, and
    /// the binary stops with these differences named. Given once.
    Misconfigured { differences: Vec<SettingDifference> },
    /// This node's name gives the same [`LeaderTag`] as `other`'s, a member or an earlier
    /// leader of the volume: its epochs could equal theirs, so it takes no part, and the
    /// binary stops asking for another name. Given once.
    NameClash { other: String, tag: LeaderTag },
}

/// What a node elected in etcd needs to lead its term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Election {
    /// The epoch it took in etcd.
    pub epoch: Epoch,
    /// The members to replicate to (name, replication address).
    pub replicas: Vec<(String, String)>,
    /// Promote even if this store may lack acknowledged writes (an operator's
    /// `failover --force`).
    pub force: bool,
    /// How many copies the previous term counted at least (its in-sync set, or the live
    /// members and this node if more): a sync-quorum promotion must hear from a majority of
    /// them, not of the members still alive.
    pub copies: usize,
    /// The in-sync set when this node was elected from outside it under sync-all or
    /// best-effort; the promotion must hear one of them vouch for it
    /// (`promotion::vouched`). Empty otherwise.
    pub vouchers: Vec<String>,
}

/// Why a leader stopped acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceReason {
    /// The local deadline passed with no keep-alive answered.
    LeaseExpired,
    /// The leader key no longer names this node at its epoch.
    LeaderKeyLost,
    /// A member has seen an epoch above this leader's.
    HigherEpoch,
    /// An operator asked for another leader.
    Switchover,
    Shutdown,
}

impl FenceReason {
    /// The `reason` label of `blockrep_fence_events_total`.
    pub fn label(self) -> &'static str {
        match self {
            FenceReason::LeaseExpired => "lease_expired",
            FenceReason::LeaderKeyLost => "leader_key_lost",
            FenceReason::HigherEpoch => "higher_epoch",
            FenceReason::Switchover => "switchover",
            FenceReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone)]
enum Purpose {
    Initialise,
    /// `members`: the in-sync set the campaign writes at its epoch; `vouchers`: as in
    /// [`Action::Lead`].
    Campaign {
        epoch: Epoch,
        force: bool,
        members: Vec<String>,
        vouchers: Vec<String>,
    },
    Register,
    InSync {
        members: Vec<String>,
    },
    Resign,
}

impl Purpose {
    fn kind(&self) -> Kind {
        match self {
            Purpose::Initialise => Kind::Initialise,
            Purpose::Campaign { .. } => Kind::Campaign,
            Purpose::Register => Kind::Register,
            Purpose::InSync { .. } => Kind::InSync,
            Purpose::Resign => Kind::Resign,
        }
    }
}

/// One transaction of each kind is in flight at a time, and a failed one is retried only
/// after a pause (an etcd that refuses at once must not become a busy loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Initialise,
    Campaign,
    Register,
    InSync,
    Resign,
}

#[derive(Debug, Clone)]
struct Leadership {
    epoch: Epoch,
    /// etcd's revision once the leader key was ours: an older view predates it.
    since_revision: i64,
    replicas: Vec<(String, String)>,
    recorded: Vec<String>,
    /// The replicas replication counts in sync now (what the in-sync set should become).
    counted: Option<Vec<String>>,
    failsafe_until: Option<Millis>,
}

/// A stepped-down leader waiting for the switchover target to hold its whole log before it
/// gives the key up.
#[derive(Debug, Clone)]
struct Handover {
    to: String,
    head: Lsn,
    until: Millis,
}

/// One node's control-plane core.
///
/// Invariant (*one acknowledger per lease*): a node acknowledges only while it leads, and it
/// leads only from its own successful campaign in this incarnation until its local lease
/// deadline, which falls before etcd can expire its lease and give the key to another.
pub struct Controller {
    keys: Keys,
    cfg: NodeConfig,
    lease: LeaseClock,
    view: Option<VolumeView>,
    local: Option<LocalState>,
    leading: Option<Leadership>,
    handover: Option<Handover>,
    pending: BTreeMap<TxnId, Purpose>,
    /// After a failed transaction of a kind, none of that kind before this time.
    retry_at: BTreeMap<Kind, Millis>,
    now: Millis,
    next_txn: u64,
    published: Option<(MemberRecord, Millis)>,
    following: Option<(String, Epoch)>,
    stopping: bool,
    /// The highest epoch etcd's counter or leader key ever showed this node.
    etcd_epoch_seen: Epoch,
    /// No campaign before this time: etcd went back in time (restored from an older
    /// snapshot), so a leader it forgot may still be inside its lease deadline.
    campaign_hold_until: Option<Millis>,
    /// etcd's last view was behind (see `campaign_hold_until`).
    etcd_behind: bool,
    /// The time of the first event this node handled, and whether `notice_start` has
    /// decided on the hold it may owe.
    started_at: Option<Millis>,
    start_noticed: bool,
    /// Terms won in a row that the node could not serve (reset once another node leads).
    lead_failures: u32,
    /// The member record of the other node that led last, as last seen (it goes from etcd
    /// with its lease, typically when that node dies: remembered for [`LossWindow`]).
    last_leader_record: Option<MemberRecord>,
    loss_window: Option<LossWindow>,
    /// [`Action::Misconfigured`] or [`Action::NameClash`] was given.
    misconfigured: bool,
}

impl Controller {
    pub fn new(keys: Keys, cfg: NodeConfig) -> Controller {
        Controller {
            keys,
            cfg,
            lease: LeaseClock::default(),
            view: None,
            local: None,
            leading: None,
            handover: None,
            pending: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            now: 0,
            next_txn: 1,
            published: None,
            following: None,
            stopping: false,
            etcd_epoch_seen: Epoch(0),
            campaign_hold_until: None,
            etcd_behind: false,
            started_at: None,
            start_noticed: false,
            lead_failures: 0,
            last_leader_record: None,
            loss_window: None,
            misconfigured: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn timing(&self) -> &Timing {
        &self.cfg.timing
    }

    /// Whether this node may send an acknowledgement (a write's, a FLUSH's, a read's reply)
    /// at `now`. Checked before every one.
    pub fn may_acknowledge(&self, now: Millis) -> bool {
        let Some(lead) = &self.leading else {
            return false;
        };
        let deadline_ignored =
            crate::mutants::active(crate::mutants::Mutant::AcknowledgeAfterLeaseDeadline);
        self.lease.holds(now)
            || deadline_ignored
            || (self.cfg.failsafe && lead.failsafe_until.is_some_and(|t| now < t))
    }

    /// Whether it is leading on the failsafe rule alone (its lease deadline has passed).
    pub fn failsafe_active(&self, now: Millis) -> bool {
        self.leading.is_some() && !self.lease.holds(now) && self.may_acknowledge(now)
    }

    pub fn lease_deadline(&self) -> Option<Millis> {
        self.lease.deadline()
    }

    /// While leading, the instant [`Controller::may_acknowledge`] stops holding unless
    /// something new is heard: the lease deadline, or with failsafe the later of it and the
    /// replicas' confirmation (`failsafe_until`). What the node's gate acknowledges by.
    pub fn acknowledge_deadline(&self) -> Option<Millis> {
        let lead = self.leading.as_ref()?;
        let failsafe = lead.failsafe_until.filter(|_| self.cfg.failsafe);
        match (self.lease.deadline(), failsafe) {
            (Some(lease), Some(confirmed)) => Some(lease.max(confirmed)),
            (lease, confirmed) => lease.or(confirmed),
        }
    }

    /// What this node's last promotion may have lost (see [`LossWindow`]).
    pub fn loss_window(&self) -> Option<&LossWindow> {
        self.loss_window.as_ref()
    }

    pub fn lease_remaining(&self, now: Millis) -> Millis {
        self.lease.remaining(now)
    }

    pub fn is_leader(&self) -> bool {
        self.leading.is_some()
    }

    /// The epoch this node leads at.
    pub fn epoch(&self) -> Option<Epoch> {
        self.leading.as_ref().map(|l| l.epoch)
    }

    /// Who leads, as the last view said.
    pub fn leader(&self) -> Option<&str> {
        self.view.as_ref().and_then(|v| v.leader_name())
    }

    pub fn view(&self) -> Option<&VolumeView> {
        self.view.as_ref()
    }

    /// The in-sync set etcd records at this leader's epoch (empty when not leading).
    pub fn recorded_in_sync(&self) -> &[String] {
        self.leading.as_ref().map_or(&[], |l| l.recorded.as_slice())
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(now) = event.now() {
            self.now = self.now.max(now);
            self.started_at.get_or_insert(now);
        }
        let now = match event {
            Event::View { now, view } => {
                self.notice_etcd_going_back(now, &view);
                self.remember_leader(&view);
                self.view = Some(view);
                now
            }
            Event::TxnDone {
                now,
                id,
                succeeded,
                revision,
            } => {
                self.txn_done(id, succeeded, revision, &mut out);
                now
            }
            Event::KeepAlive {
                sent_at,
                granted_ttl,
            } => {
                self.lease.answered(&self.cfg.timing, sent_at, granted_ttl);
                if granted_ttl == 0 {
                    self.step_down(FenceReason::LeaseExpired, &mut out);
                }
                return out;
            }
            Event::Local { now, local } => {
                self.local = Some(local);
                now
            }
            Event::Replication { now, in_sync } => {
                if let Some(lead) = &mut self.leading {
                    lead.counted = Some(in_sync);
                }
                now
            }
            Event::ReplicasConfirmed { at } => {
                if let Some(lead) = &mut self.leading {
                    let until = at.saturating_add(self.cfg.timing.renew);
                    lead.failsafe_until = Some(lead.failsafe_until.map_or(until, |t| t.max(until)));
                }
                return out;
            }
            Event::Tick { now } => now,
            Event::LeadFailed { now } => {
                self.lead_failed(now);
                return out;
            }
            Event::Shutdown { .. } => {
                self.stopping = true;
                if self.leading.is_some() {
                    self.step_down(FenceReason::Shutdown, &mut out);
                    self.resign(&mut out);
                }
                // Gone from the candidates at once: nobody waits for a stopping node's lease.
                let txn = Txn::default().delete(self.keys.member(&self.cfg.name));
                self.txn(Purpose::Register, txn, &mut out);
                return out;
            }
        };
        self.notice_start();
        self.evaluate(now, &mut out);
        out
    }

    fn txn(&mut self, purpose: Purpose, txn: Txn, out: &mut Vec<Action>) {
        let id = TxnId(self.next_txn);
        self.next_txn += 1;
        self.pending.insert(id, purpose);
        out.push(Action::Txn { id, txn });
    }

    /// Whether a transaction of this kind may not be sent now: one is in flight, or the last
    /// one failed too recently.
    fn busy(&self, kind: Kind) -> bool {
        self.pending.values().any(|p| p.kind() == kind)
            || self.retry_at.get(&kind).is_some_and(|t| self.now < *t)
    }

    fn txn_done(&mut self, id: TxnId, succeeded: bool, revision: i64, out: &mut Vec<Action>) {
        let Some(purpose) = self.pending.remove(&id) else {
            return;
        };
        if !succeeded {
            let pause = (self.cfg.timing.retry / 10).max(1);
            self.retry_at
                .insert(purpose.kind(), self.now.saturating_add(pause));
        }
        match purpose {
            Purpose::Campaign {
                epoch,
                force,
                members,
                vouchers,
            } if succeeded => {
                let replicas = self.other_members();
                let copies = self.previous_copies(replicas.len() + 1);
                self.following = None;
                self.measure_loss_window();
                self.leading = Some(Leadership {
                    epoch,
                    since_revision: revision,
                    replicas: replicas.clone(),
                    // What etcd records from the campaign on: a replica in it was never
                    // removed, so nothing may skip it yet.
                    recorded: members,
                    counted: None,
                    failsafe_until: None,
                });
                out.push(Action::Lead(Election {
                    epoch,
                    replicas,
                    force,
                    copies,
                    vouchers,
                }));
                // The record now says primary.
                self.published = None;
            }
            Purpose::InSync { members } if succeeded => {
                if let Some(lead) = &mut self.leading {
                    lead.recorded = members.clone();
                    out.push(Action::InSyncRecorded { members });
                }
            }
            Purpose::Register if !succeeded => self.published = None,
            Purpose::Resign if succeeded => self.handover = None,
            _ => {}
        }
    }

    /// The volume's members other than this node, as (name, replication address).
    fn other_members(&self) -> Vec<(String, String)> {
        self.view.as_ref().map_or_else(Vec::new, |v| {
            v.members
                .values()
                .filter(|m| m.name != self.cfg.name)
                .map(|m| (m.name.clone(), m.replication.clone()))
                .collect()
        })
    }

    fn step_down(&mut self, reason: FenceReason, out: &mut Vec<Action>) {
        if self.leading.take().is_some() {
            out.push(Action::StepDown { reason });
        }
    }

    /// Gives the leader key back, if it still holds the value this node wrote.
    fn resign(&mut self, out: &mut Vec<Action>) {
        let Some(leader) = self.view.as_ref().and_then(|v| v.leader.clone()) else {
            return;
        };
        if leader.value.name != self.cfg.name || self.busy(Kind::Resign) {
            return;
        }
        let txn = Txn::default()
            .when(Compare::ModRevision(
                self.keys.leader(),
                leader.mod_revision,
            ))
            .delete(self.keys.leader());
        self.txn(Purpose::Resign, txn, out);
    }

    fn evaluate(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.leading.is_some() && !self.may_acknowledge(now) {
            self.step_down(FenceReason::LeaseExpired, out);
        }
        let (Some(view), Some(local)) = (self.view.clone(), self.local.clone()) else {
            return;
        };
        if view.identity.is_none() {
            self.initialise(&local, out);
            return;
        }
        if self.sits_out(&view, out) {
            return;
        }
        self.publish(now, &view, &local, out);
        if self.leading.is_some() {
            self.lead(now, &view, out);
        } else {
            self.follow_or_campaign(now, &view, &local, out);
        }
    }

    /// Makes this node's store the volume, if no node's is yet: one compare-and-swap on the
    /// identity key, so two first nodes cannot both do it.
    fn initialise(&mut self, local: &LocalState, out: &mut Vec<Action>) {
        if self.stopping || self.busy(Kind::Initialise) {
            return;
        }
        let identity = Identity {
            volume_id: local.volume_id.clone(),
            size: local.size,
            created_by: self.cfg.name.clone(),
        };
        let config = settings::volume_config(&self.cfg);
        let txn = Txn::default()
            .when(Compare::Absent(self.keys.identity()))
            .put(self.keys.identity(), encode(&identity))
            .put(self.keys.config(), encode(&config));
        self.txn(Purpose::Initialise, txn, out);
    }

    fn record(&self, local: &LocalState) -> MemberRecord {
        MemberRecord {
            name: self.cfg.name.clone(),
            volume_id: local.volume_id.clone(),
            role: if self.leading.is_some() {
                MemberRole::Primary
            } else {
                MemberRole::Replica
            },
            state: local.state,
            epoch: local.epoch.0,
            head: local.head.0,
            head_epoch: local.head_epoch.0,
            committed: local.committed.0,
            priority: self.cfg.priority,
            nofailover: self.cfg.nofailover,
            replication: local.replication.clone(),
            nbd: local.nbd.clone(),
            admin: local.admin.clone(),
        }
    }

    /// Keeps this node's member record current: at once when anything but its position
    /// changed, its position at most every half renew interval (a write load would otherwise
    /// become an etcd write load).
    fn publish(
        &mut self,
        now: Millis,
        view: &VolumeView,
        local: &LocalState,
        out: &mut Vec<Action>,
    ) {
        if self.stopping || self.busy(Kind::Register) {
            return;
        }
        let record = self.record(local);
        let visible = view.members.get(&self.cfg.name);
        let due = match (&self.published, visible) {
            (None, _) | (_, None) => true,
            // etcd holds something else than what we wrote (restored from a backup, or
            // written by someone else): written again at once.
            (Some((last, _)), Some(seen)) if seen != last => true,
            (Some((last, at)), Some(_)) => {
                let moved = (last.head, last.committed) != (record.head, record.committed);
                let same_but_position = MemberRecord {
                    head: record.head,
                    committed: record.committed,
                    ..last.clone()
                } == record;
                !same_but_position
                    || (moved && now.saturating_sub(*at) >= self.cfg.timing.renew / 2)
            }
        };
        if !due {
            return;
        }
        let txn = Txn::default().put_leased(self.keys.member(&self.cfg.name), encode(&record));
        self.published = Some((record, now));
        self.txn(Purpose::Register, txn, out);
    }

    fn lead(&mut self, now: Millis, view: &VolumeView, out: &mut Vec<Action>) {
        let Some(lead) = self.leading.clone() else {
            return;
        };
        if view.revision >= lead.since_revision {
            let ours = view
                .leader
                .as_ref()
                .is_some_and(|l| l.value.name == self.cfg.name && l.value.epoch == lead.epoch.0);
            if !ours {
                return self.step_down(FenceReason::LeaderKeyLost, out);
            }
        }
        if view.members.values().any(|m| m.epoch > lead.epoch.0) {
            return self.step_down(FenceReason::HigherEpoch, out);
        }
        if let Some(request) = &view.switchover {
            let to = &request.value.to;
            let target = view.members.get(to);
            let eligible = target.is_some_and(|m| rank::eligibility(view, m, self.rule()).is_ok());
            if to != &self.cfg.name && (eligible || (request.value.force && target.is_some())) {
                let head = self.local.as_ref().map_or(Lsn::ZERO, |l| l.head);
                self.handover = Some(Handover {
                    to: to.clone(),
                    head,
                    until: now.saturating_add(self.cfg.timing.ttl),
                });
                return self.step_down(FenceReason::Switchover, out);
            }
        }
        let replicas = self.other_members();
        if replicas != lead.replicas {
            if let Some(l) = &mut self.leading {
                l.replicas = replicas.clone();
            }
            out.push(Action::Replicas { replicas });
        }
        self.record_in_sync(view, &lead, out);
    }
}

mod campaign;
mod insync;
mod loss;
mod restore;
mod settings;

pub use settings::{describe, differences, SettingDifference};

pub use loss::LossWindow;
#[cfg(test)]
mod tests;
