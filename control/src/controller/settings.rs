//! The volume's settings, recorded in etcd by the node that creates it, against this node's
//! flags. A node whose commit mode, lease TTL or failsafe differ from its volume's takes no
//! part: the safety of a failover rests on every node applying the same rules (a failsafe
//! leader cut from etcd keeps acknowledging, and only a new leader that knows it waits for it
//! to stop; a sync-all volume's replicas must not be promoted by best-effort's rule).

use std::fmt;

use super::{Action, Controller, NodeConfig};
use crate::record::{VolumeConfig, VolumeView};

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

impl Controller {
    /// Whether this node must sit out because its settings are not its volume's; says so once
    /// with [`Action::Misconfigured`].
    pub(super) fn sits_out(&mut self, view: &VolumeView, out: &mut Vec<Action>) -> bool {
        let Some(recorded) = &view.config else {
            return false;
        };
        let differences = differences(recorded, &self.cfg);
        if differences.is_empty() {
            return false;
        }
        if !self.misconfigured {
            self.misconfigured = true;
            out.push(Action::Misconfigured { differences });
        }
        true
    }
}
