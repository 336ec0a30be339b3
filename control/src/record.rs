//! The JSON values stored under a volume's keys, and [`VolumeView`]: one range read of the
//! volume's directory, decoded once into typed records.

use std::collections::BTreeMap;

use blockrep_storage::{Epoch, Lsn};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::Keys;
use crate::txn::View;

/// A key under the volume's directory holds something that is not its record.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error("etcd key {key} does not hold a valid record")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("etcd key {key} does not hold a decimal epoch counter")]
    Counter { key: String },
}

/// Which volume this is: the first node's store, made the volume by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The store's volume id (a UUID); only stores of this volume may lead it.
    pub volume_id: String,
    pub size: u64,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// The commit mode's name (`sync-all`, `sync-quorum`, `best-effort`).
    pub commit: String,
    pub ttl_ms: u64,
    /// Absent from the records of volumes created before it was recorded: off.
    #[serde(default)]
    pub failsafe: bool,
}

/// The leader key's value: who leads, and the epoch it took with the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub name: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Opening its store, or not yet heard from its primary.
    Starting,
    /// Being rebuilt: never a candidate (its data file is a partial base).
    Rebuilding,
    /// Holds a whole image of the volume.
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberRole {
    Primary,
    Replica,
}

/// What each node reports about itself, on its own lease (so a dead node's record vanishes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    pub volume_id: String,
    pub role: MemberRole,
    pub state: MemberState,
    /// The highest epoch its store has seen.
    pub epoch: u64,
    /// Its durable log end, and the epoch of the entry there (its lineage).
    pub head: u64,
    pub head_epoch: u64,
    pub committed: u64,
    pub priority: u32,
    pub nofailover: bool,
    /// Where primaries dial its replication port (host:port).
    pub replication: String,
    /// Where it serves NBD while it leads.
    pub nbd: Vec<String>,
    /// Its admin endpoint (host:port), if any.
    pub admin: Option<String>,
}

impl MemberRecord {
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch)
    }

    /// Its position for ranking: the epoch of its last entry, then that entry's LSN.
    pub fn position(&self) -> (Epoch, Lsn) {
        (Epoch(self.head_epoch), Lsn(self.head))
    }
}

/// Who may take over: the members the leader at `epoch` counts in sync. The leader records a
/// removal here before it acknowledges anything that skips the removed member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InSync {
    pub epoch: u64,
    pub leader: String,
    pub members: Vec<String>,
}

impl InSync {
    pub fn contains(&self, name: &str) -> bool {
        self.members.iter().any(|m| m == name)
    }
}

/// One epoch's start: who took it, from which log position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub epoch: u64,
    pub leader: String,
    pub start_lsn: u64,
}

/// An operator's request (`blockrep ctl switchover|failover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    pub to: String,
    /// The leader it was asked of (a switchover); none for a failover.
    pub from: Option<String>,
    pub failover: bool,
    /// Promote the target even if it is not in sync (it may lack acknowledged writes).
    pub force: bool,
}

/// A value read back with the revision it was written at (for compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// A volume's whole directory at one revision, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeView {
    pub revision: i64,
    pub identity: Option<Identity>,
    pub config: Option<VolumeConfig>,
    pub epoch_counter: Option<Versioned<u64>>,
    pub leader: Option<Versioned<LeaderRecord>>,
    pub members: BTreeMap<String, MemberRecord>,
    pub insync: Option<Versioned<InSync>>,
    pub switchover: Option<Versioned<SwitchoverRequest>>,
    pub history: Vec<HistoryEntry>,
}

fn json<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(value).map_err(|source| RecordError::Json {
        key: key.to_string(),
        source,
    })
}

/// The JSON bytes of a record (records are plain data: serialising cannot fail).
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

impl VolumeView {
    /// Decodes every key of the volume's directory. Keys it does not know are ignored (a
    /// newer version may add some); a known key with a bad value is an error, never guessed.
    pub fn parse(keys: &Keys, view: &View) -> Result<VolumeView, RecordError> {
        let mut out = VolumeView {
            revision: view.revision,
            ..VolumeView::default()
        };
        let members = keys.members_dir();
        let history = keys.history_dir();
        for kv in &view.kvs {
            let key = kv.key.as_str();
            let rev = kv.mod_revision;
            if key == keys.identity() {
                out.identity = Some(json(key, &kv.value)?);
            } else if key == keys.config() {
                out.config = Some(json(key, &kv.value)?);
            } else if key == keys.epoch() {
                let n = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| RecordError::Counter {
                        key: key.to_string(),
                    })?;
                out.epoch_counter = Some(Versioned {
                    value: n,
                    mod_revision: rev,
                });
            } else if key == keys.leader() {
                out.leader = Some(Versioned {
                    value: json(key, &kv.value)?,
                    mod_revision: rev,
                });
            } else if key == keys.insync() {
                out.insync = Some(Versioned {
                    value: json(key, &kv.value)?,
                    mod_revision: rev,
                });
            } else if key == keys.switchover() {
                out.switchover = Some(Versioned {
                    value: json(key, &kv.value)?,
                    mod_revision: rev,
                });
            } else if let Some(name) = key.strip_prefix(&members) {
                let record: MemberRecord = json(key, &kv.value)?;
                out.members.insert(name.to_string(), record);
            } else if key.starts_with(&history) {
                out.history.push(json(key, &kv.value)?);
            }
        }
        out.history.sort_by_key(|h| h.epoch);
        Ok(out)
    }

    /// The highest epoch anyone has recorded: the counter, the leader key, any member's own
    /// store, the history. A new epoch goes above all of them, so an etcd restored from an
    /// older snapshot never hands out an epoch a store has already seen.
    pub fn highest_epoch(&self) -> Epoch {
        let counter = self.epoch_counter.as_ref().map_or(0, |c| c.value);
        let leader = self.leader.as_ref().map_or(0, |l| l.value.epoch);
        let members = self.members.values().map(|m| m.epoch).max().unwrap_or(0);
        let history = self.history.last().map_or(0, |h| h.epoch);
        Epoch(counter.max(leader).max(members).max(history))
    }

    pub fn leader_name(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.value.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txn::Kv;

    fn kv(key: String, value: &[u8], rev: i64) -> Kv {
        Kv {
            key,
            value: value.to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: 0,
        }
    }

    #[test]
    fn a_view_decodes_every_record_and_ignores_unknown_keys() {
        let k = Keys::new("/blockrep", "v").unwrap();
        let member = MemberRecord {
            name: "n2".into(),
            volume_id: "id".into(),
            role: MemberRole::Replica,
            state: MemberState::Ready,
            epoch: 4,
            head: 10,
            head_epoch: 4,
            committed: 9,
            priority: 0,
            nofailover: false,
            replication: "127.0.0.1:1".into(),
            nbd: vec![],
            admin: None,
        };
        let view = View {
            revision: 9,
            kvs: vec![
                kv(k.epoch(), b"3", 5),
                kv(k.leader(), br#"{"name":"n1","epoch":3}"#, 6),
                kv(k.member("n2"), &encode(&member), 7),
                kv(
                    k.history(Epoch(3)),
                    br#"{"epoch":3,"leader":"n1","start_lsn":1}"#,
                    6,
                ),
                kv(format!("{}future-key", k.dir()), b"whatever", 8),
            ],
        };
        let v = VolumeView::parse(&k, &view).unwrap();
        assert_eq!(v.revision, 9);
        assert_eq!(
            v.epoch_counter.as_ref().map(|c| (c.value, c.mod_revision)),
            Some((3, 5))
        );
        assert_eq!(v.leader_name(), Some("n1"));
        assert_eq!(v.members.get("n2"), Some(&member));
        assert_eq!(v.history.len(), 1);
        // A member's own store has seen epoch 4, above the counter's 3.
        assert_eq!(v.highest_epoch(), Epoch(4));
    }

    #[test]
    fn a_bad_record_is_an_error_naming_its_key() {
        let k = Keys::new("/blockrep", "v").unwrap();
        let view = View {
            revision: 1,
            kvs: vec![kv(k.epoch(), b"three", 1)],
        };
        assert!(matches!(
            VolumeView::parse(&k, &view),
            Err(RecordError::Counter { key }) if key == k.epoch()
        ));
        let view = View {
            revision: 1,
            kvs: vec![kv(k.leader(), b"{", 1)],
        };
        assert!(matches!(
            VolumeView::parse(&k, &view),
            Err(RecordError::Json { key, .. }) if key == k.leader()
        ));
    }
}
