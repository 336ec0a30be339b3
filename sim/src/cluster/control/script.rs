//! What the control plane's scenario tests place and look at by hand.

use blockrep_control::Timing;
use blockrep_replication::core::CommitMode;
use blockrep_storage::Epoch;

use super::{ControlConfig, ControlFaults};
use crate::cluster::{Cluster, Config, Faults};
use crate::net::NodeId;

impl Cluster {
    /// Three nodes under `mode` in the etcd-led mode, no random faults, every clock true;
    /// runs until one leads and serves with every other node in sync.
    pub fn scripted_controlled(mode: CommitMode) -> Cluster {
        Cluster::scripted_controlled_with(mode, false)
    }

    /// [`Cluster::scripted_controlled`] with every node on `--failsafe` (or not).
    pub fn scripted_controlled_with(mode: CommitMode, failsafe: bool) -> Cluster {
        let mut control = ControlConfig {
            faults: ControlFaults::none(),
            max_drift_ppm: 0,
            etcd_loss: 0.0,
            failsafe,
            ..ControlConfig::default()
        };
        control.timing = Timing {
            margin: control.timing.ttl / 8,
            ..control.timing
        };
        let mut cfg = Config::new(0, mode);
        cfg.faults = Faults::none();
        cfg.control = Some(control);
        let mut c = Cluster::new(cfg);
        assert!(
            c.run_until_true(5_000, |c| c.serving_leader().is_some_and(|p| c.primary
                == p
                && c.acknowledges(p)
                && c.converged()
                && c.recorded_in_sync(p).len() == c.nodes.len())),
            "the etcd-led cluster never came up:{}",
            c.describe_controlled()
        );
        c
    }

    /// The epoch etcd made `n` leader at, if its core leads.
    pub fn leads_at(&self, n: NodeId) -> Option<Epoch> {
        self.control
            .as_ref()
            .and_then(|cp| cp.node(n).ctl.as_ref())
            .and_then(|c| c.epoch())
    }

    /// The in-sync set etcd records at leader `n`'s epoch, as its core knows it.
    pub fn recorded_in_sync(&self, n: NodeId) -> Vec<String> {
        self.control
            .as_ref()
            .and_then(|cp| cp.node(n).ctl.as_ref())
            .map_or_else(Vec::new, |c| c.recorded_in_sync().to_vec())
    }

    /// Whether `n` may acknowledge anything now (its gate, on its own clock).
    pub fn acknowledges(&self, n: NodeId) -> bool {
        self.may_acknowledge(n) && self.is_primary(n)
    }

    /// Node `n`'s clock runs at `ppm` parts per million of the true one from now on.
    pub fn set_clock_rate(&mut self, n: NodeId, ppm: u64) {
        let now = self.now;
        if let Some(cp) = self.control.as_mut() {
            let c = &mut cp.nodes[n];
            // The clock keeps its reading: only its rate changes.
            let reading = c.offset + now * c.rate_ppm / 1_000_000;
            c.rate_ppm = ppm;
            c.offset = reading.saturating_sub(now * ppm / 1_000_000);
        }
    }

    /// The lease safety checker's counts: (acknowledgements, reads) it checked.
    pub fn lease_checks(&self) -> (u64, u64) {
        self.control
            .as_ref()
            .map_or((0, 0), |cp| (cp.safety.acknowledgements, cp.safety.reads))
    }

    /// The control plane's timing.
    pub fn control_timing(&self) -> Option<Timing> {
        self.control.as_ref().map(|cp| cp.cfg.timing)
    }
}

impl Cluster {
    /// Who etcd's leader key names now, at which epoch.
    pub fn etcd_leader_now(&self) -> Option<(String, u64)> {
        let cp = self.control.as_ref()?;
        let kv = cp.etcd.get(&cp.keys.leader())?;
        let record: blockrep_control::record::LeaderRecord =
            serde_json::from_slice(&kv.value).ok()?;
        Some((record.name, record.epoch))
    }

    /// Whether `n` is paused (SIGSTOPped) now.
    pub fn is_paused_now(&self, n: NodeId) -> bool {
        self.is_paused(n)
    }
}
