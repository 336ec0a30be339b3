//! The loss window a promotion reports: what the previous leader may have acknowledged that
//! this node, taking over, does not hold.

use blockrep_storage::Lsn;

use super::Controller;
use crate::record::VolumeView;

/// What a promotion may have lost: the previous leader's last reported head against this
/// node's own when it took over. Under best-effort these are acknowledged writes (FLUSHes
/// included) that no replica had; under sync-all and sync-quorum only writes no FLUSH
/// covered. An estimate from below: the old leader reported its head at most every half
/// renew interval, so it may have gone further before it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossWindow {
    pub old_leader: String,
    pub old_head: Lsn,
    pub new_head: Lsn,
    /// `old_head - new_head`, never below 0.
    pub lsns: u64,
}

impl Controller {
    /// Keeps the member record of the other node the view names as leader: it leaves etcd
    /// with that node's lease, typically when the node dies, before anyone takes over.
    pub(super) fn remember_leader(&mut self, view: &VolumeView) {
        let Some(name) = view.leader_name() else {
            return;
        };
        if name == self.cfg.name {
            return;
        }
        if let Some(record) = view.members.get(name) {
            self.last_leader_record = Some(record.clone());
        }
    }

    /// This node has just won a term: what the previous leader's last record says it held
    /// beyond this node's head (nothing to say if no other node led before).
    pub(super) fn measure_loss_window(&mut self) {
        self.loss_window = self.last_leader_record.take().map(|old| {
            let new_head = self.local.as_ref().map_or(Lsn::ZERO, |l| l.head);
            LossWindow {
                lsns: old.head.saturating_sub(new_head.0),
                old_leader: old.name,
                old_head: Lsn(old.head),
                new_head,
            }
        });
    }
}
