//! Feeding the metrics and the status report from the frontend, the store and replication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_frontend::{Observer, Op};
use blockrep_metrics::{
    Metrics, OpHandles, RebuildCost, RebuildReport, ReplicaReport, StatusReport, WalHoldReport,
};
use blockrep_replication::core::primary::{BarrierFailure, PeerState, RebuildRestart};
use blockrep_replication::core::CommitMode;
use blockrep_replication::driver::primary::PrimaryHandle;
use blockrep_replication::driver::replica::ReplicaStatus;
use blockrep_storage::{Lsn, Store, StoreObserver};
use prometheus::{Histogram, IntCounter, IntGauge};

/// One volume's metric handles, resolved once: the request path only touches atomics.
pub struct VolumeMetrics {
    pub metrics: Arc<Metrics>,
    pub volume: String,
    ops: Vec<(Op, OpHandles)>,
    connections: IntGauge,
    wal_write: Histogram,
    wal_bytes: IntCounter,
    placed_bytes: IntCounter,
    wal_sync: Histogram,
    checkpoint: Histogram,
}

impl VolumeMetrics {
    pub fn new(metrics: Arc<Metrics>, volume: &str) -> Arc<VolumeMetrics> {
        let v = [volume];
        Arc::new(VolumeMetrics {
            ops: Op::ALL
                .iter()
                .map(|op| (*op, metrics.op_handles(volume, op.name())))
                .collect(),
            connections: metrics.connections(volume),
            wal_write: metrics.wal_write_latency.with_label_values(&v),
            wal_bytes: metrics.wal_write_bytes.with_label_values(&v),
            placed_bytes: metrics.placed_bytes.with_label_values(&v),
            wal_sync: metrics.wal_sync_latency.with_label_values(&v),
            checkpoint: metrics.checkpoint_latency.with_label_values(&v),
            volume: volume.to_string(),
            metrics,
        })
    }

    /// A FLUSH or FUA finished (or failed, with a reason) under `mode`.
    pub fn barrier(&self, mode: &str, latency: Duration, failure: Option<&str>) {
        let l = [self.volume.as_str(), mode];
        self.metrics
            .barrier_latency
            .with_label_values(&l)
            .observe(latency.as_secs_f64());
        if let Some(reason) = failure {
            self.metrics
                .barrier_failures
                .with_label_values(&[self.volume.as_str(), mode, reason])
                .inc();
        }
    }
}

impl Observer for VolumeMetrics {
    fn request(&self, _export: &str, op: Op, bytes: u64, latency: Duration, ok: bool) {
        if let Some((_, h)) = self.ops.iter().find(|(o, _)| *o == op) {
            h.requests.inc();
            if !ok {
                h.errors.inc();
            }
            if bytes > 0 {
                h.bytes.inc_by(bytes);
            }
            h.latency.observe(latency.as_secs_f64());
        }
    }

    fn connection(&self, _export: &str, delta: i64) {
        self.connections.add(delta);
    }
}

impl StoreObserver for VolumeMetrics {
    fn wal_write(&self, bytes: u64, latency: Duration) {
        self.wal_write.observe(latency.as_secs_f64());
        self.wal_bytes.inc_by(bytes);
    }
    fn wal_sync(&self, latency: Duration) {
        self.wal_sync.observe(latency.as_secs_f64());
    }
    fn checkpoint(&self, latency: Duration) {
        self.checkpoint.observe(latency.as_secs_f64());
    }
    fn placed(&self, bytes: u64) {
        self.placed_bytes.inc_by(bytes);
    }
}

/// What a node is, for its status report.
pub enum NodeKind {
    Primary {
        mode: CommitMode,
        replication: Option<PrimaryHandle>,
    },
    Replica {
        status: tokio::sync::watch::Receiver<ReplicaStatus>,
    },
}

/// Builds status reports and keeps the point-in-time gauges current.
pub struct StatusSource {
    pub store: Arc<Store>,
    pub metrics: Arc<VolumeMetrics>,
    pub kind: NodeKind,
    /// Recovery counters last exported (the core's are cumulative).
    exported: Mutex<HashMap<&'static str, u64>>,
}

impl StatusSource {
    pub fn new(store: Arc<Store>, metrics: Arc<VolumeMetrics>, kind: NodeKind) -> StatusSource {
        // Counters exist at zero from the start: a rate over a series that appears already at
        // 1 shows no increase, so the first burst of failures would go unseen.
        if let NodeKind::Primary { mode, .. } = &kind {
            let m = &metrics.metrics;
            let v = metrics.volume.as_str();
            let reasons = BarrierFailure::ALL.map(BarrierFailure::name);
            for reason in reasons.into_iter().chain(["local"]) {
                m.barrier_failures
                    .with_label_values(&[v, mode.name(), reason]);
            }
            for outcome in ["catch_up", "truncated", "rebuild_started", "rebuild_done"] {
                m.recovery_sessions.with_label_values(&[v, outcome]);
            }
            m.rebuild_resumed.with_label_values(&[v]);
            m.rebuild_sent_bytes.with_label_values(&[v]);
            for reason in RebuildRestart::ALL {
                m.rebuild_restarted.with_label_values(&[v, reason.name()]);
            }
        }
        StatusSource {
            store,
            metrics,
            kind,
            exported: Mutex::new(HashMap::new()),
        }
    }

    pub fn report(&self) -> StatusReport {
        let info = self.store.info();
        let sb = self.store.superblock();
        let mut r = StatusReport {
            volume: self.metrics.volume.clone(),
            store: self.store.dir().display().to_string(),
            // What this process runs as; the superblock only changes once a primary has
            // contacted a replica.
            role: match self.kind {
                NodeKind::Primary { .. } => "primary".into(),
                NodeKind::Replica { .. } => "replica".into(),
            },
            epoch: info.epoch.0,
            head_lsn: info.next_lsn.prev().0,
            durable_lsn: info.durable_lsn.0,
            committed_lsn: self.store.committed().0,
            checkpoint_lsn: info.checkpoint_lsn.0,
            wal_used_bytes: info.wal_used,
            wal_capacity_bytes: info.wal_capacity,
            wal_oldest_lsn: info.oldest_retained.0,
            wal_hold: info.hold.map(|(from, why)| WalHoldReport {
                from_lsn: from.0,
                reason: why.name().to_string(),
            }),
            rebuilding: sb.is_rebuilding(),
            ..StatusReport::default()
        };
        if let NodeKind::Primary { mode, replication } = &self.kind {
            r.commit_mode = Some(mode.name().to_string());
            if let Some(p) = replication {
                let s = p.status();
                r.fenced_by = s.fenced.map(|e| e.0);
                r.committed_lsn = s.committed.0;
                for (i, peer) in s.peers.iter().enumerate() {
                    let lag_lsn = s.head.0.saturating_sub(peer.durable.0);
                    let mut lag_bytes = if lag_lsn == 0 {
                        0
                    } else {
                        self.store.wal_bytes_since(Lsn(peer.durable.0 + 1))
                    };
                    // A rebuilding replica's durable LSN is its base: what it still lacks
                    // is the rest of the base image as well as the WAL after it.
                    if let Some(rb) = &peer.rebuild {
                        lag_bytes += rb.bytes_total.saturating_sub(rb.bytes_done);
                    }
                    let rebuild = peer.rebuild.as_ref().map(|rb| {
                        let elapsed = s.now.saturating_sub(rb.started) as f64 / 1000.0;
                        let rate = rb.bytes_done as f64 / elapsed.max(0.001);
                        let eta = (rb.bytes_done > 0 && rb.bytes_total > rb.bytes_done)
                            .then(|| (rb.bytes_total - rb.bytes_done) as f64 / rate);
                        RebuildReport {
                            bytes_done: rb.bytes_done,
                            bytes_total: rb.bytes_total,
                            eta_seconds: eta,
                            sent_bytes: rb.sent_bytes,
                            resumed_from: rb.resumed_from,
                        }
                    });
                    let last_rebuild = peer.last_rebuild.as_ref().map(|c| RebuildCost {
                        sent_bytes: c.sent_bytes,
                        seconds_to_in_sync: c.took as f64 / 1000.0,
                        resumes: c.resumes,
                        restarts: c.restarts,
                    });
                    r.replicas.push(ReplicaReport {
                        name: peer.id.0.clone(),
                        address: s.addresses.get(&peer.id).cloned().unwrap_or_default(),
                        state: peer.state.name().to_string(),
                        reason: peer.why.clone(),
                        durable_lsn: peer.durable.0,
                        lag_lsn,
                        lag_bytes,
                        lag_seconds: s.lag_seconds.get(i).copied().unwrap_or(0.0),
                        rebuild,
                        last_rebuild,
                    });
                }
                self.export_recoveries(&s.counters);
            }
        }
        if let NodeKind::Replica { status } = &self.kind {
            let s = status.borrow().clone();
            r.committed_lsn = r.committed_lsn.max(s.committed.0);
            r.rebuild_cursor_bytes = sb
                .rebuild_cursor
                .as_ref()
                .filter(|_| r.rebuilding)
                .map(|c| c.through);
        }
        self.refresh_gauges(&r);
        r
    }

    fn export_recoveries(&self, c: &blockrep_replication::core::primary::PrimaryCounters) {
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        let m = &self.metrics.metrics;
        let v = self.metrics.volume.as_str();
        let mut bump = |key: &'static str, now: u64, counter: prometheus::IntCounter| {
            let before = exported.insert(key, now).unwrap_or(0);
            if now > before {
                counter.inc_by(now - before);
            }
        };
        bump(
            "rebuild_resumed",
            c.rebuilds_resumed,
            m.rebuild_resumed.with_label_values(&[v]),
        );
        bump(
            "rebuild_sent_bytes",
            c.rebuild_sent_bytes,
            m.rebuild_sent_bytes.with_label_values(&[v]),
        );
        for reason in RebuildRestart::ALL {
            bump(
                reason.name(),
                c.rebuild_restarts[reason.index()],
                m.rebuild_restarted.with_label_values(&[v, reason.name()]),
            );
        }
        for (outcome, now) in [
            ("catch_up", c.catch_ups),
            ("truncated", c.truncations),
            ("rebuild_started", c.rebuilds_started),
            ("rebuild_done", c.rebuilds_done),
        ] {
            let before = exported.insert(outcome, now).unwrap_or(0);
            if now > before {
                self.metrics
                    .metrics
                    .recovery_sessions
                    .with_label_values(&[self.metrics.volume.as_str(), outcome])
                    .inc_by(now - before);
            }
        }
    }

    fn refresh_gauges(&self, r: &StatusReport) {
        let m = &self.metrics.metrics;
        let v = self.metrics.volume.as_str();
        m.wal_bytes_used
            .with_label_values(&[v])
            .set(r.wal_used_bytes as i64);
        m.wal_capacity
            .with_label_values(&[v])
            .set(r.wal_capacity_bytes as i64);
        for (kind, lsn) in [
            ("head", r.head_lsn),
            ("durable", r.durable_lsn),
            ("committed", r.committed_lsn),
            ("checkpoint", r.checkpoint_lsn),
        ] {
            m.lsn.with_label_values(&[v, kind]).set(lsn as i64);
        }
        m.epoch.with_label_values(&[v]).set(r.epoch as i64);
        for role in ["primary", "replica"] {
            m.role
                .with_label_values(&[v, role])
                .set(i64::from(r.role == role));
        }
        m.fenced
            .with_label_values(&[v])
            .set(i64::from(r.fenced_by.is_some()));
        for rep in &r.replicas {
            let l = [v, rep.name.as_str()];
            m.replica_durable_lsn
                .with_label_values(&l)
                .set(rep.durable_lsn as i64);
            m.replica_lag_lsn
                .with_label_values(&l)
                .set(rep.lag_lsn as i64);
            m.replica_lag_bytes
                .with_label_values(&l)
                .set(rep.lag_bytes as i64);
            m.replica_lag_seconds
                .with_label_values(&l)
                .set(rep.lag_seconds);
            for state in PeerState::ALL {
                m.replica_state
                    .with_label_values(&[v, rep.name.as_str(), state.name()])
                    .set(i64::from(rep.state == state.name()));
            }
            let (done, total) = rep
                .rebuild
                .as_ref()
                .map_or((0, 0), |b| (b.bytes_done, b.bytes_total));
            m.rebuild_bytes.with_label_values(&l).set(done as i64);
            m.rebuild_progress.with_label_values(&l).set(if total > 0 {
                done as f64 / total as f64
            } else if rep.state == PeerState::InSync.name() {
                1.0
            } else {
                0.0
            });
        }
    }
}
