//! Changing who the replicas are while the primary runs: a member that joins starts as a
//! replica that was never contacted, one that leaves is let go with its session, and the
//! commit rule is evaluated again over those that stay.

use blockrep_storage::Lsn;

use super::peer::Peer;
use super::{Action, Millis, PrimaryCore, ReplicaId};

impl PrimaryCore {
    /// The volume's replicas are `replicas` from now on; the WAL from `kept_from`
    /// (`Store::oldest_retained`) is held for each one that joins until it is heard from,
    /// as for the replicas a primary starts with.
    ///
    /// Invariant (*a member leaves only with what its caller decided*): a replica that
    /// leaves stops counting at once, so barriers it was holding back may complete on the
    /// others. The caller must only drop a replica whose absence the commit promise allows
    /// (in etcd-led mode: once etcd's in-sync set no longer names it).
    pub(super) fn set_replicas(&mut self, asked: Vec<ReplicaId>, kept_from: Lsn, now: Millis) {
        let mut replicas: Vec<ReplicaId> = Vec::with_capacity(asked.len());
        for id in asked {
            if !replicas.contains(&id) {
                replicas.push(id);
            }
        }
        let mut i = 0;
        while i < self.peers.len() {
            if replicas.contains(self.peers[i].id()) {
                i += 1;
                continue;
            }
            let mut gone = self.peers.remove(i);
            if let Some(session) = gone.end_session(now, self.cfg.reconnect_max) {
                self.out.push(Action::Close {
                    replica: gone.id().clone(),
                    session,
                    reason: "no longer a member of the volume".into(),
                });
            }
        }
        for id in &replicas {
            if !self.peers.iter().any(|p| p.id() == id) {
                let joined = Peer::new(id.clone(), kept_from, self.cfg.reconnect_min, now);
                self.peers.push(joined);
            }
        }
        assert_eq!(
            self.peers.len(),
            replicas.len(),
            "one peer per member, none twice"
        );
        self.cfg.replicas = replicas;
        self.update_pin();
        self.evaluate();
    }
}
