//! The volume's settings, recorded in etcd by the node that creates it, against this node's
//! flags. A node whose commit mode, lease TTL or failsafe differ from its volume's takes no
//! part: the safety of a failover rests on every node applying the same rules (a failsafe
//! leader cut from etcd keeps acknowledging, and only a new leader that knows it waits for it
//! to stop; a sync-all volume's replicas must not be promoted by best-effort's rule). A node
//! whose name gives another's leader tag sits out too (`crate::leader_tag`).

use std::fmt;

use super::{Action, Controller, NodeConfig};
use crate::record::{VolumeConfig, VolumeView};
use crate::LeaderTag;

/// One setting on which a node's flags and its volume's recorded settings disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingDifference {
    /// The flag that sets it (`--commit`, `--etcd-ttl`, `--failsafe`).
    pub flag: &'static str,
    pub volume: String,
    pub node: String,
}

impl fmt::Display for SettingDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the volume's {} is {}, this node's is {}",
            self.flag, self.volume, self.node
        )
    }
}

/// `differences` as one line, `; ` between them.
pub fn describe(differences: &[SettingDifference]) -> String {
    let listed: Vec<String> = differences.iter().map(|d| d.to_string()).collect();
    listed.join("; ")
}

/// The settings a node creating a volume records for it.
pub(super) fn volume_config(cfg: &NodeConfig) -> VolumeConfig {
    VolumeConfig {
        commit: cfg.commit.clone(),
        ttl_ms: cfg.timing.ttl,
        failsafe: cfg.failsafe,
    }
}

/// Where `cfg` differs from the volume's `recorded` settings.
pub fn differences(recorded: &VolumeConfig, cfg: &NodeConfig) -> Vec<SettingDifference> {
    let ours = volume_config(cfg);
    let on_off = |b: bool| if b { "on" } else { "off" }.to_string();
    let seconds = |ms: u64| format!("{} s", ms as f64 / 1000.0);
    let mut out = Vec::new();
    if recorded.commit != ours.commit {
        out.push(SettingDifference {
            flag: "--commit",
            volume: recorded.commit.clone(),
            node: ours.commit,
        });
    }
    if recorded.ttl_ms != ours.ttl_ms {
        out.push(SettingDifference {
            flag: "--etcd-ttl",
            volume: seconds(recorded.ttl_ms),
            node: seconds(ours.ttl_ms),
        });
    }
    if recorded.failsafe != ours.failsafe {
        out.push(SettingDifference {
            flag: "--failsafe",
            volume: on_off(recorded.failsafe),
            node: on_off(ours.failsafe),
        });
    }
    out
}

/// Another member or earlier leader of the volume whose name gives `name`'s leader tag.
pub fn name_clash(view: &VolumeView, name: &str) -> Option<String> {
    let tag = LeaderTag::of(name);
    let members = view.members.keys().map(String::as_str);
    let leaders = view.history.iter().map(|h| h.leader.as_str());
    members
        .chain(leaders)
        .find(|other| *other != name && LeaderTag::of(other) == tag)
        .map(str::to_string)
}

impl Controller {
    /// Whether this node must sit out because its settings are not its volume's, or its name
    /// clashes with another's leader tag; says so once with [`Action::Misconfigured`] or
    /// [`Action::NameClash`].
    pub(super) fn sits_out(&mut self, view: &VolumeView, out: &mut Vec<Action>) -> bool {
        let differences = view
            .config
            .as_ref()
            .map_or_else(Vec::new, |recorded| differences(recorded, &self.cfg));
        // Checked before the node first registers: once it is a member, the tag is its own
        // and a newcomer with the same one is the node that sits out. (Two clashing nodes
        // registering at the same moment both pass; docs/OPERATIONS.md, "Node names".)
        let registered = view.members.contains_key(&self.cfg.name);
        let clash = (!registered)
            .then(|| name_clash(view, &self.cfg.name))
            .flatten();
        if differences.is_empty() && clash.is_none() {
            return false;
        }
        if !self.misconfigured {
            self.misconfigured = true;
            out.push(match clash {
                Some(other) => Action::NameClash {
                    other,
                    tag: LeaderTag::of(&self.cfg.name),
                },
                None => Action::Misconfigured { differences },
            });
        }
        true
    }
}
