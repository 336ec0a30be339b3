//! Where a volume's state lives in etcd: one directory per volume under a prefix, the layout
//! Patroni uses for a cluster (identity, config, the leader key on its holder's lease, one key
//! per member on its own lease, history).

use blockrep_storage::Epoch;
use thiserror::Error;

/// The default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/blockrep";

/// The prefix or the volume name cannot make keys that stay inside one directory.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the etcd prefix {0:?} must start with '/' and not end with one")]
    Prefix(String),
    #[error(
        "the volume or node name {0:?} must be 1 to 64 characters of letters, digits, '-', '_' or '.'"
    )]
    Name(String),
}

/// The keys of one volume. Every key is under [`Keys::dir`], so one range read sees the
/// whole volume at one revision and one watch sees every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    dir: String,
}

/// Names become path segments: nothing that could climb out of the directory, or make two
/// names share a key.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Name(name.to_string()))
    }
}

impl Keys {
    pub fn new(prefix: &str, volume: &str) -> Result<Keys, KeyError> {
        if !prefix.starts_with('/') || (prefix.len() > 1 && prefix.ends_with('/')) {
            return Err(KeyError::Prefix(prefix.to_string()));
        }
        check_name(volume)?;
        let prefix = prefix.trim_end_matches('/');
        Ok(Keys {
            dir: format!("{prefix}/{volume}/"),
        })
    }

    /// The volume's directory, with its trailing '/': range-read and watch this prefix.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The volume's identity (`record::Identity`): created once, by compare-and-swap.
    pub fn identity(&self) -> String {
        format!("{}identity", self.dir)
    }

    pub fn config(&self) -> String {
        format!("{}config", self.dir)
    }

    /// The epoch counter: a decimal number, incremented in the transaction that takes the
    /// leader key.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.dir)
    }

    /// The leader key (`record::LeaderRecord`), on its holder's lease.
    pub fn leader(&self) -> String {
        format!("{}leader", self.dir)
    }

    pub fn members_dir(&self) -> String {
        format!("{}members/", self.dir)
    }

    /// A member's record (`record::MemberRecord`), on that member's lease.
    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.dir)
    }

    /// The in-sync set (`record::InSync`): who may take over.
    pub fn insync(&self) -> String {
        format!("{}insync", self.dir)
    }

    pub fn history_dir(&self) -> String {
        format!("{}history/", self.dir)
    }

    /// One epoch's history entry; zero-padded so the keys sort by epoch.
    pub fn history(&self, epoch: Epoch) -> String {
        format!("{}history/{:020}", self.dir, epoch.0)
    }

    /// A pending switchover or failover request (`record::SwitchoverRequest`).
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_volume_is_inside_its_directory() {
        let k = Keys::new("/blockrep", "vol1").unwrap();
        assert_eq!(k.dir(), "/blockrep/vol1/");
        for key in [
            k.identity(),
            k.config(),
            k.epoch(),
            k.leader(),
            k.member("n1"),
            k.insync(),
            k.history(Epoch(7)),
            k.switchover(),
        ] {
            assert!(key.starts_with(k.dir()), "{key}");
        }
        assert_eq!(
            k.history(Epoch(7)),
            "/blockrep/vol1/history/00000000000000000007"
        );
        assert_eq!(Keys::new("/", "v").unwrap().dir(), "/v/");
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(
                Keys::new("/blockrep", bad),
                Err(KeyError::Name(bad.to_string()))
            );
        }
        assert!(matches!(
            Keys::new("blockrep", "v"),
            Err(KeyError::Prefix(_))
        ));
        assert!(matches!(
            Keys::new("/blockrep/", "v"),
            Err(KeyError::Prefix(_))
        ));
    }
}
