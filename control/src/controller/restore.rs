//! An etcd restored from an older snapshot: noticing it went back in time, and holding
//! campaigns back until a leader it forgot has certainly passed its deadline.

use blockrep_storage::Epoch;

use super::Controller;
use crate::record::VolumeView;
use crate::Millis;

impl Controller {
    /// An etcd restored from an older snapshot forgets epochs: its counter and leader key fall
    /// below one this node saw there before, or below one its store or a member's holds
    /// (stores take epochs only from etcd's counter). A leader etcd forgot may still be
    /// inside its lease deadline, which etcd no longer bounds: nobody may campaign until a
    /// whole TTL has passed on this node's clock (the deadline is at most a TTL minus the
    /// margin after etcd last heard that leader, which was before the restore).
    pub(super) fn notice_etcd_going_back(&mut self, now: Millis, view: &VolumeView) {
        let recorded = Epoch(
            view.epoch_counter
                .as_ref()
                .map_or(0, |c| c.value)
                .max(view.leader.as_ref().map_or(0, |l| l.value.epoch)),
        );
        let stores = view
            .members
            .values()
            .map(|m| m.epoch())
            .chain(self.local.as_ref().map(|l| l.epoch))
            .max()
            .unwrap_or(Epoch(0));
        let behind = recorded < self.etcd_epoch_seen.max(stores);
        // One hold per time etcd goes back: it stays behind until a campaign takes an epoch
        // above every one seen, which the hold must not keep from happening.
        if behind && !self.etcd_behind {
            self.campaign_hold_until = Some(now.saturating_add(self.cfg.timing.ttl));
        }
        self.etcd_behind = behind;
        self.etcd_epoch_seen = self.etcd_epoch_seen.max(recorded);
    }

    /// Whether a campaign is held back now (see `notice_etcd_going_back`).
    pub(super) fn campaign_held(&self, now: Millis) -> bool {
        self.campaign_hold_until.is_some_and(|t| now < t)
    }
}
