//! The leader's in-sync set in etcd: recorded before it is acted on.

use super::{Action, Controller, Kind, Leadership, Purpose};
use crate::record::{encode, InSync, LeaderRecord, VolumeView};
use crate::txn::{Compare, Txn};

impl Controller {
    /// Brings etcd's in-sync set in line with what replication counts: this leader, plus the
    /// replicas it counts. Recorded first, acted on after (see [`Action::InSyncRecorded`]).
    pub(super) fn record_in_sync(
        &mut self,
        view: &VolumeView,
        lead: &Leadership,
        out: &mut Vec<Action>,
    ) {
        let Some(counted) = &lead.counted else {
            return;
        };
        if self.busy(Kind::InSync) {
            return;
        }
        let mut members: Vec<String> = std::iter::once(self.cfg.name.clone())
            .chain(counted.iter().filter(|n| **n != self.cfg.name).cloned())
            .collect();
        members.sort();
        members.dedup();
        let current = view.insync.as_ref();
        let recorded_here = current.filter(|s| s.value.epoch == lead.epoch.0);
        if let Some(set) = recorded_here {
            let mut have = set.value.members.clone();
            have.sort();
            if have == members {
                if lead.recorded != members {
                    if let Some(l) = &mut self.leading {
                        l.recorded = members.clone();
                    }
                    out.push(Action::InSyncRecorded { members });
                }
                return;
            }
        }
        let set = InSync {
            epoch: lead.epoch.0,
            leader: self.cfg.name.clone(),
            members: members.clone(),
        };
        let guard = match current {
            Some(s) => Compare::ModRevision(self.keys.insync(), s.mod_revision),
            None => Compare::Absent(self.keys.insync()),
        };
        let txn = Txn::default()
            .when(Compare::Value(
                self.keys.leader(),
                encode(&LeaderRecord {
                    name: self.cfg.name.clone(),
                    epoch: lead.epoch.0,
                }),
            ))
            .when(guard)
            .put(self.keys.insync(), encode(&set));
        self.txn(Purpose::InSync { members }, txn, out);
    }
}
