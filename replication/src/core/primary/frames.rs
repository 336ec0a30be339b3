//! What the primary does with each kind of frame a replica sends on its current session.
//!
//! The epoch is checked first, once, for every kind: only a `Reject` from a higher epoch
//! fences us; any other frame at an epoch other than ours ends the session. Then each kind
//! that is expected in the replica's state goes to its own handler; one that is not ends the
//! session.

use blockrep_storage::{Epoch, Lsn, RebuildCursor};

use super::{Body, Millis, PeerState, PrimaryCore, RebuildRestart};
use crate::mutants::{active, Mutant};
use crate::wire::validate::check_cursor;
use crate::wire::{Frame, RejectReason};

impl PrimaryCore {
    pub(super) fn received(&mut self, i: usize, frame: Frame, now: Millis) {
        if let Body::Reject { reason, message } = &frame.body {
            self.rejected(i, frame.epoch, *reason, message, now);
            return;
        }
        if frame.epoch != self.cfg.epoch {
            // Replicas answer at the epoch we gave them; anything else is a protocol error.
            self.drop_session(i, now, "reply at a different epoch");
            return;
        }
        let state = self.peers[i].state();
        match frame.body {
            Body::HelloOk {
                replica_store,
                durable,
                durable_epoch,
                rebuilding,
                cursor,
                ..
            } if state == PeerState::Handshake => {
                self.peers[i].greeted(replica_store);
                if rebuilding {
                    self.interrupted_rebuild(i, cursor, now);
                } else {
                    self.handshake(i, durable, durable_epoch, now);
                }
            }
            Body::RebuildDone { durable } if state == PeerState::Rebuilding => {
                self.rebuild_done(i, durable, now)
            }
            Body::Truncated {
                durable,
                durable_epoch,
                refusal,
            } if state == PeerState::Handshake && self.peers[i].truncating().is_some() => {
                self.truncated(i, durable, durable_epoch, &refusal, now)
            }
            Body::BarrierAck { durable } => self.barrier_ack(i, durable),
            other => {
                let why = format!("unexpected {} frame", other.name());
                self.drop_session(i, now, &why);
            }
        }
    }

    /// A higher epoch's refusal fences us; any other refusal parks the replica as Refused.
    fn rejected(
        &mut self,
        i: usize,
        epoch: Epoch,
        reason: RejectReason,
        message: &str,
        now: Millis,
    ) {
        if epoch > self.cfg.epoch {
            let why = format!(
                "replica {} is at epoch {epoch}: {message}",
                self.peers[i].id()
            );
            self.fence(epoch, why);
            return;
        }
        let why = format!("refused: {reason:?}: {message}");
        if reason == RejectReason::NoSpace {
            // A full filesystem passes once space is freed: the replica is away as a lagging
            // one would be (its WAL hold kept within the budgets, redialled), not parked as
            // refused.
            self.peers[i].out_of_space_now(self.cfg.reconnect_max);
            self.drop_session(i, now, &why);
            return;
        }
        self.peers[i].refused(self.cfg.reconnect_max);
        self.set_state(i, PeerState::Refused, now, &why);
        self.drop_session(i, now, &why);
    }

    /// The replica's last rebuild did not finish: resume it from its cursor if we can vouch
    /// for the base (see [`PrimaryCore::vouch_for`]), or start over and say why.
    fn interrupted_rebuild(&mut self, i: usize, cursor: Option<RebuildCursor>, now: Millis) {
        match self.vouch_for(cursor) {
            Ok(cursor) => {
                tracing::info!(
                    replica = %self.peers[i].id(),
                    "its rebuild from base {} stopped at byte {} (proof {}): resuming it",
                    cursor.base,
                    cursor.through,
                    cursor.proof
                );
                self.peers[i].resume_from(cursor);
                self.needs_rebuild(i, now, "its last rebuild did not finish; resuming it");
            }
            Err(reason) => {
                let why = format!(
                    "its last rebuild did not finish; starting over ({})",
                    reason.name()
                );
                self.needs_rebuild(i, now, &why);
                self.restarted(i, reason);
            }
        }
    }

    /// An interrupted rebuild starts over for `reason`: counted, and logged.
    pub(super) fn restarted(&mut self, i: usize, reason: RebuildRestart) {
        self.counters.rebuild_restarts[reason.index()] += 1;
        self.peers[i].restart();
        tracing::warn!(
            replica = %self.peers[i].id(),
            reason = reason.name(),
            "the interrupted rebuild starts over"
        );
    }

    /// Whether we can vouch for the partial base a replica's `cursor` describes: it came from
    /// a log that is ours through its base (same history) and through its proof (same epoch
    /// at that LSN, so the same entries). The WAL after the base must still be retained too,
    /// which only the store can tell (`Store::resume_base`).
    ///
    /// Invariant (*no partial base is trusted without proof of its lineage*): the base below
    /// the cursor reflects no entry after the proof, so a log with the same entry there holds
    /// every entry it may reflect, and the WAL line from the base writes again every block
    /// those entries wrote. Without that proof, nothing of it is kept.
    fn vouch_for(&self, cursor: Option<RebuildCursor>) -> Result<RebuildCursor, RebuildRestart> {
        let cursor = cursor.ok_or(RebuildRestart::NoCursor)?;
        check_cursor(&cursor, self.cfg.volume_size).map_err(|_| RebuildRestart::BadCursor)?;
        if active(Mutant::TrustCursorWithoutLineage) {
            return Ok(cursor);
        }
        let ours_through_base: Vec<(Epoch, Lsn)> = self
            .history
            .iter()
            .copied()
            .filter(|(_, start)| *start <= cursor.base)
            .collect();
        let same_proof = cursor.proof <= self.head
            && blockrep_storage::epoch_at(&self.history, cursor.proof) == Some(cursor.proof_epoch);
        if ours_through_base != cursor.history || !same_proof {
            return Err(RebuildRestart::LineageChanged);
        }
        Ok(cursor)
    }

    fn rebuild_done(&mut self, i: usize, durable: Lsn, now: Millis) {
        let target = self.peers[i].rebuild().and_then(|r| r.finishing);
        if target.is_none_or(|t| durable < t) {
            self.drop_session(i, now, "rebuild reported done too early");
            return;
        }
        // The replica counts again only now that we accept its completion.
        self.peers[i].rebuilt(durable, now);
        self.counters.rebuilds_done += 1;
        if let Some(r) = self.peers[i].last_rebuild() {
            tracing::info!(
                replica = %self.peers[i].id(),
                "rebuilt: {} bytes of base sent, in sync {} ms after the rebuild began \
                 ({} resumes, {} restarts)",
                r.sent_bytes,
                r.took,
                r.resumes,
                r.restarts
            );
        }
        self.become_in_sync(i, now, "rebuilt");
        self.update_pin();
        self.evaluate();
    }

    fn truncated(
        &mut self,
        i: usize,
        durable: Lsn,
        durable_epoch: Epoch,
        refusal: &str,
        now: Millis,
    ) {
        let keep = self.peers[i].cut_answered().unwrap_or(Lsn::ZERO);
        if !refusal.is_empty() {
            let why = format!("it could not cut its log after {keep}: {refusal}");
            self.needs_rebuild(i, now, &why);
        } else if durable != keep {
            let why = format!("asked to cut its log after {keep}, it ends at {durable}");
            self.drop_session(i, now, &why);
        } else {
            self.counters.truncations += 1;
            self.peers[i].cut_done();
            self.handshake(i, durable, durable_epoch, now);
        }
    }

    fn barrier_ack(&mut self, i: usize, durable: Lsn) {
        let was_full = self.peers[i].out_of_space();
        self.peers[i].acked(durable, self.cfg.reconnect_min);
        if was_full && !self.peers[i].out_of_space() {
            tracing::info!(
                replica = %self.peers[i].id(),
                "it stores entries again: its filesystem has room"
            );
        }
        self.update_pin();
        self.evaluate();
    }

    /// Decides how the replica rejoins, from facts only: where its log ends (LSN and epoch of
    /// its last entry) and our log. Same LSN and epoch means the same history up to there.
    fn handshake(&mut self, i: usize, durable: Lsn, durable_epoch: Epoch, now: Millis) {
        self.peers[i].heard(durable, self.head);
        // From now on the WAL after `durable` is kept for it, whichever way it goes on.
        self.update_pin();
        let diverged = match self.divergence(durable, durable_epoch) {
            Ok(diverged) => diverged,
            Err(why) => {
                self.needs_rebuild(i, now, &why);
                return;
            }
        };
        if let Some(why) = diverged {
            // Never merged: cut back to the entries both logs share, or rebuilt.
            match common_prefix(&self.history, self.head, durable, durable_epoch) {
                Some(keep) if active(Mutant::SkipCut) => {
                    let epoch = blockrep_storage::epoch_at(&self.history, keep);
                    self.handshake(i, keep, epoch.unwrap_or(durable_epoch), now);
                }
                Some(keep) if !self.peers[i].truncated_this_session() => {
                    self.peers[i].begin_cut(keep);
                    self.update_pin();
                    tracing::info!(replica = %self.peers[i].id(), "{why}: asking it to cut its log after {keep}");
                    self.send(i, Body::Truncate { keep });
                }
                _ => self.needs_rebuild(i, now, &why),
            }
            return;
        }
        if durable == self.head {
            self.become_in_sync(i, now, "zero gap");
            self.evaluate();
            return;
        }
        self.begin_catch_up(i, now);
    }

    /// How a replica's log that ends at `durable` (an entry of `durable_epoch`) differs from
    /// ours: `Ok(None)` when it is a prefix of ours, `Ok(Some(why))` when it diverged, and
    /// `Err(why)` when our history cannot tell.
    fn divergence(&self, durable: Lsn, durable_epoch: Epoch) -> Result<Option<String>, String> {
        if durable > self.head {
            // It holds entries we do not: an old primary's unacknowledged tail.
            return Ok(Some(format!(
                "its log ({durable}) is ahead of ours ({})",
                self.head
            )));
        }
        match blockrep_storage::epoch_at(&self.history, durable) {
            // An empty log is a prefix of every log.
            _ if durable == Lsn::ZERO => Ok(None),
            Some(e) if e == durable_epoch => Ok(None),
            Some(_) if active(Mutant::IgnoreDivergedLog) => Ok(None),
            Some(e) => Ok(Some(format!(
                "its entry {durable} is from epoch {durable_epoch}, ours from {e}: the logs diverged"
            ))),
            None => Err(format!(
                "entry {durable} is older than our epoch history; cannot compare logs"
            )),
        }
    }
}

/// The last entry our log (`history` through `head`) shares with a replica's log that ends
/// at `theirs`, an entry of epoch `their_epoch`; `None` when our history cannot tell.
///
/// Invariant (*logs agree through the shorter run of a shared epoch*): every entry of one
/// epoch was written by that epoch's one primary, and every copy took them in LSN order on
/// top of a prefix of that primary's log. So two logs that both hold entries of epoch `e`
/// agree on everything up to where the shorter of their `e` runs ends: a replica whose last
/// entry is of `e` shares our log through `min(theirs, our last entry of e)`.
fn common_prefix(
    history: &[(Epoch, Lsn)],
    head: Lsn,
    theirs: Lsn,
    their_epoch: Epoch,
) -> Option<Lsn> {
    let i = history.iter().position(|(e, _)| *e == their_epoch)?;
    let start = history[i].1;
    let end = history.get(i + 1).map_or(head, |(_, next)| next.prev());
    (theirs >= start && end >= start).then(|| theirs.min(end))
}
