//! Elections: following whoever leads, or taking the leader key when this node is the one
//! to lead (the best candidate, or an operator's switchover target), and what a won term
//! carries (the copies the previous term counted) or costs when it cannot be served (a
//! growing pause before the next campaign).

use blockrep_storage::{Epoch, Lsn};

use super::{Action, Controller, Kind, LocalState, Purpose};
use crate::rank;
use crate::record::{encode, HistoryEntry, InSync, LeaderRecord, VolumeView};
use crate::txn::{Compare, Txn};
use crate::LeaderTag;
use crate::Millis;

impl Controller {
    pub(super) fn follow_or_campaign(
        &mut self,
        now: Millis,
        view: &VolumeView,
        local: &LocalState,
        out: &mut Vec<Action>,
    ) {
        if let Some(leader) = &view.leader {
            let LeaderRecord { name, epoch } = &leader.value;
            if name == &self.cfg.name {
                // Our campaign's own key, seen before its result: wait for the result.
                if self.pending.values().any(|p| p.kind() == Kind::Campaign) {
                    return;
                }
                // Not from a campaign of this incarnation (an earlier run's key, or an etcd
                // restored from an older snapshot): never led on, handed back.
                return self.resign(out);
            }
            let current = (name.clone(), Epoch(*epoch));
            if self.following.as_ref() != Some(&current) {
                self.following = Some(current);
                self.lead_failures = 0;
                out.push(Action::Follow {
                    leader: name.clone(),
                    epoch: Epoch(*epoch),
                });
            }
            return;
        }
        if let Some(h) = self.handover.clone() {
            let caught_up = view
                .members
                .get(&h.to)
                .is_some_and(|m| Lsn(m.head) >= h.head);
            if caught_up || now >= h.until {
                self.resign(out);
            }
            return;
        }
        self.campaign(now, view, local, out);
    }

    /// Who may be elected, by the commit mode this node replicates with.
    pub(super) fn rule(&self) -> rank::Rule {
        rank::Rule::for_commit(&self.cfg.commit)
    }

    /// Whether this node should take the leader key now: it is the best live candidate, or the
    /// one an operator's request names.
    pub(super) fn should_campaign(&self, view: &VolumeView) -> Option<bool> {
        let me = view.members.get(&self.cfg.name)?;
        if let Some(request) = &view.switchover {
            let r = &request.value;
            if let Some(target) = view.members.get(&r.to) {
                let eligible = rank::eligibility(view, target, self.rule()).is_ok();
                if eligible || r.force {
                    return (r.to == self.cfg.name).then_some(r.force && !eligible);
                }
            }
        }
        let best = rank::candidates(view, self.rule())
            .first()
            .map(|m| m.name.clone())?;
        (best == me.name).then_some(false)
    }

    pub(super) fn campaign(
        &mut self,
        now: Millis,
        view: &VolumeView,
        local: &LocalState,
        out: &mut Vec<Action>,
    ) {
        if self.stopping
            || !self.lease.holds(now)
            || self.busy(Kind::Campaign)
            || self.campaign_held(now)
        {
            return;
        }
        let Some(force) = self.should_campaign(view) else {
            return;
        };
        let above = view.highest_epoch().max(local.epoch);
        let Some(epoch) = LeaderTag::of(&self.cfg.name).first_epoch_above(above) else {
            return;
        };
        let leader = LeaderRecord {
            name: self.cfg.name.clone(),
            epoch: epoch.0,
        };
        let vouchers = rank::outside_the_set(view, &self.cfg.name, self.rule());
        let mut members = view
            .insync
            .as_ref()
            .map_or_else(Vec::new, |s| s.value.members.clone());
        if !members.contains(&self.cfg.name) {
            members.push(self.cfg.name.clone());
        }
        let set = InSync {
            epoch: epoch.0,
            leader: self.cfg.name.clone(),
            members: members.clone(),
        };
        let history = HistoryEntry {
            epoch: epoch.0,
            leader: self.cfg.name.clone(),
            start_lsn: local.head.next().0,
        };
        let counter = match &view.epoch_counter {
            Some(c) => Compare::ModRevision(self.keys.epoch(), c.mod_revision),
            None => Compare::Absent(self.keys.epoch()),
        };
        let insync = match &view.insync {
            Some(s) => Compare::ModRevision(self.keys.insync(), s.mod_revision),
            None => Compare::Absent(self.keys.insync()),
        };
        let mut txn = Txn::default()
            .when(Compare::Absent(self.keys.leader()))
            .when(counter)
            .when(insync)
            .put_leased(self.keys.leader(), encode(&leader))
            .put(self.keys.epoch(), epoch.0.to_string().into_bytes())
            .put(self.keys.insync(), encode(&set))
            .put(self.keys.history(epoch), encode(&history));
        if let Some(request) = &view.switchover {
            txn = txn
                .when(Compare::ModRevision(
                    self.keys.switchover(),
                    request.mod_revision,
                ))
                .delete(self.keys.switchover());
        }
        self.txn(
            Purpose::Campaign {
                epoch,
                force,
                members,
                vouchers,
            },
            txn,
            out,
        );
    }

    /// How many copies the term before ours counted at least: its in-sync set (etcd's view
    /// from before our campaign's transaction), or `live` if that is more.
    ///
    /// Invariant (*a sync-quorum promotion hears from a majority of the previous term's
    /// copies*): members whose lease expired drop out of the view, not out of what the
    /// previous leader counted; a lone survivor of two failures out of three must not pass a
    /// majority of one (`a_lone_survivor_counts_the_previous_terms_copies`).
    pub(super) fn previous_copies(&self, live: usize) -> usize {
        let recorded = self
            .view
            .as_ref()
            .and_then(|v| v.insync.as_ref())
            .map_or(0, |s| s.value.members.len());
        live.max(recorded)
    }

    /// The term this node won could not be served, and the node gave it up. It campaigns
    /// again only after a pause of an eighth of the TTL, doubling with each failure in a row
    /// up to a whole TTL: a node that cannot serve must not take a fresh epoch from etcd every
    /// few hundred milliseconds, and another may lead meanwhile.
    pub(super) fn lead_failed(&mut self, now: Millis) {
        self.leading = None;
        self.lead_failures = self.lead_failures.saturating_add(1);
        let ttl = self.cfg.timing.ttl;
        let doublings = (self.lead_failures - 1).min(3);
        let pause = ((ttl / 8).max(1) << doublings).min(ttl);
        self.hold_campaigns_until(now.saturating_add(pause));
    }
}
