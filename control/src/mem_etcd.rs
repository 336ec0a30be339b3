//! An etcd in memory, for the core's tests and the simulator: linearizable keys with
//! revisions, leases that expire on the caller's clock, and transactions with etcd's
//! compare semantics. Deterministic, no I/O.

use std::collections::BTreeMap;

use crate::txn::{Compare, Kv, Op, Txn, View};
use crate::Millis;

/// A leased put named a lease that does not exist (or has expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseNotFound(pub i64);

#[derive(Debug, Clone, Default)]
pub struct MemEtcd {
    revision: i64,
    kvs: BTreeMap<String, Kv>,
    /// Lease id → (TTL, expiry).
    leases: BTreeMap<i64, (Millis, Millis)>,
    next_lease: i64,
}

impl MemEtcd {
    pub fn new() -> MemEtcd {
        MemEtcd {
            next_lease: 1,
            ..MemEtcd::default()
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn grant(&mut self, now: Millis, ttl: Millis) -> i64 {
        self.expire(now);
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(id, (ttl, now.saturating_add(ttl)));
        id
    }

    /// Renews `lease` as of `now` (when etcd *received* the keep-alive); its TTL, or `None` if
    /// the lease is gone.
    pub fn keep_alive(&mut self, now: Millis, lease: i64) -> Option<Millis> {
        self.expire(now);
        let (ttl, expiry) = self.leases.get_mut(&lease)?;
        *expiry = now.saturating_add(*ttl);
        Some(*ttl)
    }

    pub fn revoke(&mut self, now: Millis, lease: i64) {
        self.expire(now);
        if self.leases.remove(&lease).is_some() {
            self.drop_keys_of(&[lease]);
        }
    }

    /// Expires every lease whose time is up at `now`, deleting its keys.
    pub fn expire(&mut self, now: Millis) {
        let gone: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, expiry))| *expiry <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.leases.remove(id);
        }
        self.drop_keys_of(&gone);
    }

    fn drop_keys_of(&mut self, leases: &[i64]) {
        let doomed: Vec<String> = self
            .kvs
            .values()
            .filter(|kv| leases.contains(&kv.lease))
            .map(|kv| kv.key.clone())
            .collect();
        if !doomed.is_empty() {
            self.revision += 1;
            for k in doomed {
                self.kvs.remove(&k);
            }
        }
    }

    pub fn range(&mut self, now: Millis, prefix: &str) -> View {
        self.expire(now);
        View {
            revision: self.revision,
            kvs: self
                .kvs
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Kv> {
        self.kvs.get(key)
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::Absent(k) => !self.kvs.contains_key(k),
            Compare::ModRevision(k, rev) => {
                self.kvs.get(k).is_some_and(|kv| kv.mod_revision == *rev)
            }
            Compare::Value(k, v) => self.kvs.get(k).is_some_and(|kv| &kv.value == v),
        }
    }

    /// Applies `txn` atomically if every compare holds; leased puts bind to `lease`. Returns
    /// whether it applied, and the revision after it.
    pub fn txn(
        &mut self,
        now: Millis,
        txn: &Txn,
        lease: Option<i64>,
    ) -> Result<(bool, i64), LeaseNotFound> {
        self.expire(now);
        let leased = txn
            .success
            .iter()
            .any(|op| matches!(op, Op::Put { leased: true, .. }));
        if leased {
            let id = lease.unwrap_or(0);
            if !self.leases.contains_key(&id) {
                return Err(LeaseNotFound(id));
            }
        }
        if !txn.compares.iter().all(|c| self.holds(c)) {
            return Ok((false, self.revision));
        }
        if txn.success.is_empty() {
            return Ok((true, self.revision));
        }
        self.revision += 1;
        let rev = self.revision;
        for op in &txn.success {
            match op {
                Op::Put { key, value, leased } => {
                    let create = self.kvs.get(key).map_or(rev, |kv| kv.create_revision);
                    self.kvs.insert(
                        key.clone(),
                        Kv {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: create,
                            mod_revision: rev,
                            lease: if *leased { lease.unwrap_or(0) } else { 0 },
                        },
                    );
                }
                Op::Delete { key } => {
                    self.kvs.remove(key);
                }
            }
        }
        Ok((true, rev))
    }

    /// etcd came back after being down: like a new etcd leader, it gives every lease its full
    /// TTL again from `now`, so no lease expires for the time nobody could renew it.
    pub fn refresh_leases(&mut self, now: Millis) {
        for (ttl, expiry) in self.leases.values_mut() {
            *expiry = now.saturating_add(*ttl);
        }
    }

    /// A snapshot to restore later (an etcd restored from a backup). Restoring keeps the
    /// revision moving forward, as `etcdutl snapshot restore --bump-revision` does, and
    /// restored leases get their full TTL again from `now`.
    pub fn snapshot(&self) -> MemEtcd {
        self.clone()
    }

    pub fn restore(&mut self, now: Millis, snapshot: &MemEtcd) {
        let revision = self.revision.max(snapshot.revision) + 1_000;
        let next_lease = self.next_lease.max(snapshot.next_lease);
        *self = snapshot.clone();
        self.revision = revision;
        self.next_lease = next_lease;
        for (ttl, expiry) in self.leases.values_mut() {
            *expiry = now.saturating_add(*ttl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_compare_lets_exactly_one_of_two_campaigns_through() {
        let mut etcd = MemEtcd::new();
        let a = etcd.grant(0, 3_000);
        let b = etcd.grant(0, 3_000);
        let campaign = Txn::default()
            .when(Compare::Absent("/l".into()))
            .put_leased("/l".into(), b"x".to_vec());
        assert_eq!(etcd.txn(1, &campaign, Some(a)), Ok((true, 1)));
        assert_eq!(etcd.txn(1, &campaign, Some(b)), Ok((false, 1)));
        assert_eq!(etcd.txn(1, &campaign, Some(99)), Err(LeaseNotFound(99)));
    }

    #[test]
    fn leased_keys_vanish_when_their_lease_is_not_renewed() {
        let mut etcd = MemEtcd::new();
        let lease = etcd.grant(0, 3_000);
        let put = Txn::default().put_leased("/v/k".into(), b"1".to_vec());
        etcd.txn(0, &put, Some(lease)).unwrap();
        assert_eq!(etcd.keep_alive(2_000, lease), Some(3_000));
        assert_eq!(etcd.range(4_999, "/v/").kvs.len(), 1);
        assert!(etcd.range(5_000, "/v/").kvs.is_empty());
        assert_eq!(etcd.keep_alive(5_000, lease), None);
    }
}
