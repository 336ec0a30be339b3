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

    /// Once this node knows both etcd's view and its store: if the volume has had a leader
    /// and etcd names none, no campaign until a TTL after the node started.
    ///
    /// Invariant (*a node that just started campaigns only after a TTL, unless it saw a
    /// leader*): a node that was down while etcd was restored sees nothing behind, since what
    /// it saw of etcd went with its process, and the epochs that etcd forgot may be only on
    /// nodes cut from etcd. One of them may still lead inside its deadline, which etcd no
    /// longer bounds; only a TTL on this node's clock since the restore bounds it (seed
    /// 27512: `a_node_that_starts_after_an_etcd_restore_waits_a_ttl_before_it_campaigns`).
    /// No hold is owed when the first view shows another node's leader key: either it was
    /// restored, and its lease runs a whole TTL from the restore, or it was taken after the
    /// restore by a node that kept this rule. Nor on a volume nobody has led yet: a restore
    /// after this first view is one this node sees going back.
    pub(super) fn notice_start(&mut self) {
        if self.start_noticed {
            return;
        }
        let (Some(view), Some(local), Some(started)) = (&self.view, &self.local, self.started_at)
        else {
            return;
        };
        self.start_noticed = true;
        let led_before = view.highest_epoch() > Epoch(0) || local.epoch > Epoch(0);
        // This node's own key from before it started is no witness: it hands that key back
        // at once, ending the restored lease early.
        let witness = view
            .leader
            .as_ref()
            .is_some_and(|l| l.value.name != self.cfg.name);
        if led_before && !witness {
            self.hold_campaigns_until(started.saturating_add(self.cfg.timing.ttl));
        }
    }

    /// No campaign before `until`, nor before any hold already in force.
    pub(super) fn hold_campaigns_until(&mut self, until: Millis) {
        self.campaign_hold_until = Some(self.campaign_hold_until.map_or(until, |t| t.max(until)));
    }

    /// Whether a campaign is held back now (see `notice_etcd_going_back`, `notice_start`
    /// and `lead_failed`).
    pub(super) fn campaign_held(&self, now: Millis) -> bool {
        self.campaign_hold_until.is_some_and(|t| now < t)
    }
}
