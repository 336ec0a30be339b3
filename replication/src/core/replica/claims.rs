//! Who the replica follows: a primary's hello and a candidate's fence, and the epoch claims
//! both make.

use blockrep_storage::{Epoch, Lsn, VolumeId};

use super::{Action, ConnId, ReplicaCore};
use crate::mutants::{active, Mutant};
use crate::wire::RejectReason;

impl ReplicaCore {
    /// A primary opens a session.
    ///
    /// Invariant (*a refused hello leaves the store as it was*): every check that can refuse
    /// the hello (epoch, size, volume, the epoch's owner) runs before anything is adopted, so
    /// a blank store refused a hello stays blank and joinable by the volume's real primary.
    pub(super) fn hello(
        &mut self,
        conn: ConnId,
        epoch: Epoch,
        volume_id: VolumeId,
        volume_size: u64,
        primary: VolumeId,
        committed: Lsn,
    ) {
        if volume_size != self.s.volume_size {
            let msg = format!(
                "volume size {volume_size} differs from this store's {}",
                self.s.volume_size
            );
            self.reject(conn, RejectReason::WrongVolume, msg);
            return;
        }
        if volume_id != self.s.volume_id && !self.s.blank {
            let msg = format!(
                "this store belongs to volume {}, not {volume_id}",
                self.s.volume_id
            );
            self.reject(conn, RejectReason::WrongVolume, msg);
            return;
        }
        if !self.may_claim(conn, epoch, primary) {
            return;
        }
        if volume_id != self.s.volume_id {
            self.out.push(Action::AdoptVolume { volume_id });
            self.s.volume_id = volume_id;
        }
        self.adopt_epoch(epoch, primary);
        if let Some(old) = self.active.replace(conn) {
            if old != conn {
                self.out.push(Action::Close {
                    conn: old,
                    reason: "superseded by a new session".into(),
                });
            }
        }
        self.s.blank = false;
        self.learn_committed(committed);
        // Entries appended but not yet fsynced (from an earlier session) are made durable
        // first, so the LSN we report is one we can stand by.
        self.greeting = Some(conn);
        self.out.push(Action::Sync {
            conn,
            lsn: self.s.head,
        });
    }

    /// A promotion candidate claims `epoch` for store `owner`.
    ///
    /// Invariant (*a fenced member stops following the old primary*): once the claim is
    /// persisted, the session of the primary we followed is closed and its frames, at a lower
    /// epoch, are refused. What we report after the fence can no longer grow, so the
    /// candidate's promotion check decides on facts that stay true; under sync-quorum a
    /// majority of fenced copies leaves the old primary no majority to commit with.
    pub(super) fn fence(&mut self, conn: ConnId, epoch: Epoch, owner: VolumeId) -> bool {
        if !self.claim_epoch(conn, epoch, owner) {
            return false;
        }
        if let Some(old) = self.active.take() {
            if old != conn {
                self.greeting = None;
                self.out.push(Action::Close {
                    conn: old,
                    reason: format!("fenced by a promotion at epoch {epoch}"),
                });
            }
        }
        true
    }

    /// Store `owner` claims `epoch` (a primary's hello, a candidate's fence): refused if the
    /// epoch is stale or another store owns it; otherwise adopted, persisted before we
    /// answer so the claim survives a crash. Returns whether the claim stands.
    fn claim_epoch(&mut self, conn: ConnId, epoch: Epoch, owner: VolumeId) -> bool {
        if !self.may_claim(conn, epoch, owner) {
            return false;
        }
        self.adopt_epoch(epoch, owner);
        true
    }

    /// Whether `owner` may claim `epoch`; refuses `conn` otherwise. Changes nothing else.
    ///
    /// Invariant (*an epoch that cannot be followed is refused*): the last epoch there is
    /// would leave no epoch for any later primary, so the replica could never be promoted
    /// or follow anyone again; it is refused before anything is persisted.
    fn may_claim(&mut self, conn: ConnId, epoch: Epoch, owner: VolumeId) -> bool {
        if !self.followable(conn, epoch) {
            return false;
        }
        if epoch < self.s.epoch && !active(Mutant::SkipReplicaEpochCheck) {
            let msg = format!(
                "epoch {epoch} is stale; this replica is at {}",
                self.s.epoch
            );
            self.reject(conn, RejectReason::StaleEpoch, msg);
            return false;
        }
        let unclaimed = self.s.epoch_owner == VolumeId([0; 16]);
        if epoch == self.s.epoch && !unclaimed && self.s.epoch_owner != owner {
            let msg = format!(
                "epoch {epoch} already belongs to primary store {}",
                self.s.epoch_owner
            );
            self.reject(conn, RejectReason::EpochOwned, msg);
            return false;
        }
        true
    }

    /// Takes a claim [`Self::may_claim`] allowed.
    fn adopt_epoch(&mut self, epoch: Epoch, owner: VolumeId) {
        if epoch > self.s.epoch || self.s.epoch_owner != owner {
            self.out.push(Action::AdoptEpoch { epoch, owner });
            self.s.epoch = epoch;
            self.s.epoch_owner = owner;
            self.s.was_primary = false;
        }
    }

    /// Whether some epoch can follow `epoch`; refuses `conn` otherwise.
    fn followable(&mut self, conn: ConnId, epoch: Epoch) -> bool {
        if epoch.can_be_followed() {
            return true;
        }
        let msg = format!("epoch {epoch} is the last there is: no primary could follow it");
        self.reject(conn, RejectReason::UnfollowableEpoch, msg);
        false
    }
}
