//! Durability: live entries shipped to replicas in sync, barriers asked and answered, the
//! commit computed from the copies in sync, the WAL pinned for replicas that still need it,
//! and the fence that ends it all when a newer primary exists.

use blockrep_storage::{Epoch, Lsn, WalRecord};

use super::peer::Peer;
use super::PrimaryCore;
use super::{Action, BarrierFailure, Body, CommitMode, Millis, PeerState, PendingBarrier};
use crate::core::commit::{self, Vote};
use crate::mutants::{active, Mutant};

impl PrimaryCore {
    pub(super) fn appended(&mut self, records: Vec<WalRecord>) {
        let Some(last) = records.last().map(|r| r.lsn) else {
            return;
        };
        debug_assert_eq!(records[0].lsn, self.head.next(), "entries arrive in order");
        self.head = last;
        for r in &records {
            if self.history.last().is_none_or(|(e, _)| *e != r.epoch) {
                self.history.push((r.epoch, r.lsn));
            }
        }
        if self.fenced.is_some() {
            return;
        }
        let live: Vec<usize> = (0..self.peers.len())
            .filter(|&i| {
                let p = &self.peers[i];
                p.state() == PeerState::InSync
                    || (p.state() == PeerState::Rebuilding && p.rebuild_live())
            })
            .collect();
        for i in live {
            self.send(
                i,
                Body::Entries {
                    committed: self.committed,
                    records: records.clone(),
                },
            );
        }
    }

    pub(super) fn locally_durable(&mut self, lsn: Lsn) {
        if lsn > self.local_durable {
            self.local_durable = lsn;
            self.evaluate();
        }
    }

    pub(super) fn barrier(&mut self, id: u64, target: Lsn, now: Millis) {
        if self.fenced.is_some() {
            self.out.push(Action::BarrierFailed {
                id,
                reason: BarrierFailure::Fenced,
            });
            return;
        }
        self.barriers.push_back(PendingBarrier {
            id,
            target,
            deadline: now + self.cfg.barrier_timeout,
        });
        for i in 0..self.peers.len() {
            if self.peers[i].state() == PeerState::InSync {
                self.ask(i, target, now);
            }
        }
        self.evaluate();
    }

    /// Asks an in-sync replica to report durability through `target` (once per target).
    pub(super) fn ask(&mut self, i: usize, target: Lsn, now: Millis) {
        let p = &mut self.peers[i];
        if p.durable() >= target || p.asked() >= target {
            return;
        }
        p.asked_for(target, now);
        let committed = self.committed;
        self.send(
            i,
            Body::Barrier {
                lsn: target,
                committed,
            },
        );
    }

    /// Asks an in-sync replica with nothing outstanding for the head, even one it already
    /// holds: its answer refreshes [`PrimaryCore::confirmed_at`] on a volume with nothing
    /// to ship.
    pub(super) fn confirm(&mut self, i: usize, now: Millis) {
        let target = self.head;
        let p = &mut self.peers[i];
        p.asked_for(target, now);
        let committed = self.committed;
        self.send(
            i,
            Body::Barrier {
                lsn: target,
                committed,
            },
        );
    }

    /// A replica that just became in sync is asked for the barriers still pending.
    pub(super) fn resend_barriers(&mut self, i: usize, now: Millis) {
        if let Some(max) = self.barriers.iter().map(|b| b.target).max() {
            self.ask(i, max.min(self.head), now);
        }
    }

    /// Recomputes the committed LSN and completes the barriers it covers.
    pub(super) fn evaluate(&mut self) {
        let votes: Vec<Vote> = self
            .peers
            .iter()
            .map(|p| Vote {
                in_sync: p.state() == PeerState::InSync,
                durable: p.durable(),
            })
            .collect();
        let now = commit::committed_now(self.cfg.mode, self.local_durable, &votes);
        self.raise_committed(now.unwrap_or(Lsn::ZERO));
        let Some(answered) = now else { return };
        let mut i = 0;
        while i < self.barriers.len() {
            match self.barriers.get(i) {
                Some(b) if b.target <= answered => {
                    let id = b.id;
                    self.barriers.remove(i);
                    self.counters.barriers_done += 1;
                    self.out.push(Action::BarrierDone { id });
                }
                _ => i += 1,
            }
        }
    }

    /// Records that the mode is met through `lsn`, if that is news.
    ///
    /// Invariant (*committed only grows*): the committed LSN is a high-water mark, persisted
    /// and reported to replicas; what the copies in sync make durable now may fall below it
    /// (one drops out), and that never takes it back.
    fn raise_committed(&mut self, lsn: Lsn) {
        if lsn > self.committed {
            let before = self.committed;
            self.committed = lsn;
            assert!(self.committed > before, "committed only grows");
            self.out.push(Action::Committed { lsn });
        }
    }

    /// The oldest entry `p` still needs from the WAL, if it is recoverable at all.
    pub(super) fn peer_pin(p: &Peer) -> Option<Lsn> {
        if p.state() == PeerState::Refused {
            return None;
        }
        // A rebuild that may still be resumed replays the WAL from after its base.
        if let Some(base) = p.kept_base() {
            return Some(base.next());
        }
        if p.state() == PeerState::NeedsRebuild {
            return None;
        }
        if !p.has_progress() {
            return p.held_from();
        }
        // Released to a rebuild: only a running rebuild (its WAL after the base) holds the
        // WAL; between sessions its old LSN means nothing.
        if p.released() && p.state() != PeerState::Rebuilding {
            return None;
        }
        Some(match p.state() {
            PeerState::CatchingUp | PeerState::Rebuilding => {
                p.catch_up_next().min(p.durable().next())
            }
            _ => p.durable().next(),
        })
    }

    /// The WAL is kept from the oldest entry a recoverable replica has not made durable.
    pub(super) fn update_pin(&mut self) {
        let pin = self
            .peers
            .iter()
            .filter(|p| !active(Mutant::RecycleNeededWal) || p.state() == PeerState::InSync)
            .filter_map(Self::peer_pin)
            .min();
        if pin != self.pin {
            self.pin = pin;
            self.out.push(Action::PinWal { from: pin });
        }
    }

    /// One dead replica must never stop writes: past the byte or time budget, the replica
    /// holding the oldest pin gives it up and will need a rebuild. One per tick: the next
    /// tick measures the WAL the new pin holds.
    ///
    /// Except a replica in sync under sync-all: every FLUSH waits for it anyway, so while its
    /// session lives (it answers barriers within the barrier timeout) the WAL it holds makes
    /// writers wait for it, as a full WAL always does, instead of throwing its copy away for
    /// a full rebuild because it is slower than the primary. One that stops answering loses
    /// its session, and then the budget applies as to any replica away.
    pub(super) fn enforce_retention(&mut self, now: Millis, pinned_bytes: u64) {
        let Some(pin) = self.pin else { return };
        let Some(i) = self
            .peers
            .iter()
            .position(|p| Self::peer_pin(p) == Some(pin))
        else {
            return;
        };
        let p = &self.peers[i];
        let paces_writers = self.cfg.mode == CommitMode::SyncAll && p.state() == PeerState::InSync;
        let over_bytes = pinned_bytes > self.cfg.retention_bytes && !paces_writers;
        let over_time = p
            .away_since()
            .is_some_and(|t| now >= t + self.cfg.retention_time);
        if !(over_bytes || over_time) {
            return;
        }
        // An in-sync replica's pin is only its last report, which may be a progress interval
        // old: a burst since then is no sign that it lags. Before the byte budget throws its
        // copy away it must have been asked about the WAL it seems to hold and have left that
        // ask unanswered for a progress interval (anti-pattern A2: a rebuild for a healthy
        // replica).
        let unasked = p.state() == PeerState::InSync
            && p.session().is_some()
            && p.oldest_unanswered()
                .is_none_or(|t| now < t + self.cfg.progress_interval);
        if over_bytes && !over_time && unasked {
            let head = self.head;
            self.ask(i, head, now);
            return;
        }
        if p.kept_base().is_some_and(|b| b.next() == pin) {
            // Past a budget a rebuild only stops being resumable: a running one goes on, an
            // interrupted one starts over when it comes back (`wal-recycled`).
            let why = if over_bytes { "bytes" } else { "time" };
            tracing::info!(
                replica = %p.id(),
                "the WAL held to resume its rebuild exceeds the retention {why} budget; released"
            );
            self.peers[i].forget_base();
            self.update_pin();
            return;
        }
        if !p.has_progress() {
            // The hold a new primary keeps for replicas it has not heard from (`held_from`):
            // past a budget it goes for all of them at once, and nobody is sent to a rebuild
            // for it. Each still catches up when it comes back if its entries are still
            // there. (One of them may never have needed any: it may be fully in sync.)
            for p in &mut self.peers {
                p.let_hold_go();
            }
            self.update_pin();
            return;
        }
        let why = if over_bytes {
            format!(
                "the WAL kept for it exceeds {} bytes",
                self.cfg.retention_bytes
            )
        } else {
            format!("away longer than {} ms", self.cfg.retention_time)
        };
        self.needs_rebuild(i, now, &why);
    }

    pub(super) fn fence(&mut self, epoch: Epoch, reason: String) {
        if self.fenced.is_some() {
            return;
        }
        self.fenced = Some(epoch);
        self.out.push(Action::Fenced {
            epoch,
            reason: reason.clone(),
        });
        for b in std::mem::take(&mut self.barriers) {
            self.counters.barriers_failed += 1;
            self.out.push(Action::BarrierFailed {
                id: b.id,
                reason: BarrierFailure::Fenced,
            });
        }
        for p in &mut self.peers {
            if let Some(session) = p.abandon_session() {
                self.out.push(Action::Close {
                    replica: p.id().clone(),
                    session,
                    reason: "fenced by a higher epoch".into(),
                });
            }
        }
    }
}
