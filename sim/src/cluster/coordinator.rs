//! The coordinator: manual failover and promotion, as an operator running `blockrep serve`
//! on a replica's store would do it. Which candidate to try is the environment's choice;
//! whether it may take over is the protocol's (`promotion::check`), never decided here.

use std::cmp::Reverse;

use blockrep_replication::core::promotion;
use blockrep_replication::core::replica::{self, ConnId};
use blockrep_replication::wire::{Body, Frame};
use blockrep_storage::{Epoch, VolumeId};
use rand::RngExt;

use super::Cluster;
use crate::net::NodeId;
use crate::node::Role;

impl Cluster {
    /// Manual failover: the current primary is taken down (killed, or left running as a
    /// zombie behind a partition), and the best replica is promoted if the rule allows it.
    pub fn failover(&mut self) {
        let old = self.primary;
        if self.rng.random_bool(0.5) {
            if self.nodes[old].alive {
                self.crash(old);
            }
        } else {
            // A zombie: still running and accepting writes, cut off from everyone.
            for i in 0..self.nodes.len() {
                if i != old {
                    self.net.partition(old, i);
                }
            }
            self.blip(old);
            self.log(format!(
                "fault: {} is cut off (zombie)",
                self.nodes[old].name
            ));
        }
        if self.elect(old).is_some() {
            self.stats.failovers += 1;
        } else {
            self.log("failover: no eligible candidate".into());
        }
    }

    /// The coordinator tries the live nodes other than `old`, most complete log first (by
    /// head epoch, then head; ties to the lowest name), and promotes the first the rule
    /// accepts.
    pub fn elect(&mut self, old: NodeId) -> Option<NodeId> {
        let mut candidates: Vec<NodeId> = (0..self.nodes.len())
            .filter(|&i| i != old && self.nodes[i].alive)
            .collect();
        candidates.sort_by_key(|&i| {
            Reverse((
                self.nodes[i].store.head_epoch(),
                self.nodes[i].store.head(),
                Reverse(i),
            ))
        });
        candidates.into_iter().find(|&c| self.promote(c))
    }

    /// `blockrep serve` on a replica's store: probe the reachable members, apply the rule.
    pub fn promote(&mut self, c: NodeId) -> bool {
        self.promote_at(c, None, false, &[])
    }

    /// As [`Cluster::promote`], at exactly epoch `at` if given (the one an etcd campaign
    /// took): refused when a member has already seen that epoch or a later one. `force`: the
    /// rule's refusals are overridden (an operator's `failover --force`). `vouchers`: the
    /// in-sync set a member of which must vouch for a candidate etcd elected from outside it
    /// (`promotion::vouched`).
    pub(super) fn promote_at(
        &mut self,
        c: NodeId,
        at: Option<Epoch>,
        force: bool,
        vouchers: &[String],
    ) -> bool {
        let me = self.facts(c);
        let name = self.nodes[c].name.clone();
        // First a look that disturbs nobody, as `serve` does.
        let members: Vec<promotion::Facts> =
            self.members(c).into_iter().map(|i| self.facts(i)).collect();
        let verdict = promotion::check(&me, &members, self.nodes.len() - 1, self.cfg.mode)
            .and_then(|()| promotion::vouched(&me, &members, vouchers));
        if !self.rule_allows(&name, verdict, force, "") {
            return false;
        }
        let above_all = promotion::next_epoch(&me, &members);
        if at.is_some_and(|e| above_all > e) {
            self.stats.refused_promotions += 1;
            self.log(format!(
                "promotion of {name} refused: a member has seen epoch {} already",
                above_all.0 - 1
            ));
            return false;
        }
        // Then fence the members at the new epoch and decide on what they hold after it.
        let epoch = at.unwrap_or_else(|| above_all.max(self.max_epoch.next()));
        let owner = self.nodes[c].store.store_id;
        let mut fenced = Vec::new();
        for i in self.members(c) {
            if let Some(f) = self.fence(i, epoch, owner) {
                fenced.push(f);
            }
        }
        let verdict = promotion::check(&me, &fenced, self.nodes.len() - 1, self.cfg.mode)
            .and_then(|()| promotion::vouched(&me, &fenced, vouchers));
        if !self.rule_allows(&name, verdict, force, " after fencing") {
            self.max_epoch = self.max_epoch.max(epoch);
            return false;
        }
        let v = self.checker.promoted(c, &self.nodes);
        self.fail_on(v);
        self.blip(c);
        self.nodes[c].role = None;
        self.start_primary(c, epoch);
        true
    }

    /// Whether the promotion rule's verdict lets `name` take over (`force` overrides a
    /// refusal, which is then logged as a forced promotion).
    fn rule_allows(
        &mut self,
        name: &str,
        verdict: Result<(), String>,
        force: bool,
        when: &str,
    ) -> bool {
        match verdict {
            Ok(()) => true,
            Err(why) if force => {
                self.log(format!("forced promotion of {name}{when}: {why}"));
                true
            }
            Err(why) => {
                self.stats.refused_promotions += 1;
                self.log(format!("promotion of {name} refused{when}: {why}"));
                false
            }
        }
    }

    pub(super) fn facts(&self, i: NodeId) -> promotion::Facts {
        let s = &self.nodes[i].store;
        promotion::Facts {
            name: self.nodes[i].name.clone(),
            head: s.head(),
            head_epoch: s.head_epoch(),
            committed: s.committed,
            epoch: s.epoch,
            needs_rebuild: s.rebuilding,
            owns_epoch: s.epoch > Epoch(0) && s.epoch_owner == s.store_id,
        }
    }

    /// The nodes a promotion of `c` can probe: replicas it can reach (a primary, live or
    /// zombie, does not answer probes).
    pub(super) fn members(&self, c: NodeId) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&i| {
                i != c
                    && self.nodes[i].alive
                    && self.net.connected(c, i)
                    && self.nodes[i].is_replica()
            })
            .collect()
    }

    /// Delivers a fencing probe to replica `i` through its core; its answer, if it accepted.
    /// (Not [`Cluster::step`]: the probe's reply and close go back to the coordinator, which
    /// has no connection in the simulated network; every other action is performed.)
    fn fence(&mut self, i: NodeId, epoch: Epoch, owner: VolumeId) -> Option<promotion::Facts> {
        let conn = ConnId(u64::MAX - i as u64);
        let Some(Role::Replica(core)) = &mut self.nodes[i].role else {
            return None;
        };
        let actions = core.step(replica::Event::Received {
            conn,
            frame: Frame {
                epoch,
                body: Body::Probe { fence: Some(owner) },
            },
        });
        let mut reply = None;
        let mut rest = Vec::new();
        for a in actions {
            match a {
                replica::Action::Send { conn: to, frame } if to == conn => {
                    if let Some(facts) = self.probe_reply(i, frame) {
                        reply = Some(facts);
                    }
                }
                replica::Action::Close { conn: to, .. } if to == conn => {}
                other => rest.push(other),
            }
        }
        self.replica_actions(i, rest);
        if reply.is_some() {
            self.log(format!("{} fenced at epoch {epoch}", self.nodes[i].name));
        }
        reply
    }

    /// Node `i`'s facts as its answer to a fencing probe gives them.
    fn probe_reply(&self, i: NodeId, frame: Frame) -> Option<promotion::Facts> {
        let Body::ProbeReply {
            head,
            head_epoch,
            committed,
            needs_rebuild,
            ..
        } = frame.body
        else {
            return None;
        };
        Some(promotion::Facts {
            name: self.nodes[i].name.clone(),
            head,
            head_epoch,
            committed,
            epoch: frame.epoch,
            needs_rebuild,
            owns_epoch: false,
        })
    }
}
