//! blockrep-metrics: what a node tells its operators.
//!
//! It owns the Prometheus metric families (all prefixed `blockrep_`, labelled by volume, and
//! by replica where that applies), the node's status report, and the admin HTTP endpoint that
//! serves them (`/metrics`, `/healthz`, `/readyz`, `/v1/status`, and the replica address
//! update). It knows nothing of NBD, WALs or the protocol: the binary feeds it, through the
//! handles on [`Metrics`] on the request path (atomic updates, no global lock) and through a
//! refresh callback for the point-in-time gauges at scrape time.

mod http;
mod status;

pub use http::{serve, Admin, AdminError};
pub use status::{
    ControlReport, RebuildCost, RebuildReport, ReplicaReport, StatusReport, WalHoldReport,
};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Latency buckets from 10 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Every metric family a node exports.
pub struct Metrics {
    registry: Registry,
    pub nbd_requests: IntCounterVec,
    pub nbd_errors: IntCounterVec,
    pub nbd_bytes: IntCounterVec,
    pub nbd_latency: HistogramVec,
    pub nbd_connections: IntGaugeVec,
    pub wal_write_latency: HistogramVec,
    pub wal_write_bytes: IntCounterVec,
    pub placed_bytes: IntCounterVec,
    pub wal_sync_latency: HistogramVec,
    pub checkpoint_latency: HistogramVec,
    pub wal_bytes_used: IntGaugeVec,
    pub wal_capacity: IntGaugeVec,
    pub lsn: IntGaugeVec,
    pub barrier_latency: HistogramVec,
    pub barrier_failures: IntCounterVec,
    pub replica_durable_lsn: IntGaugeVec,
    pub replica_lag_lsn: IntGaugeVec,
    pub replica_lag_bytes: IntGaugeVec,
    pub replica_lag_seconds: GaugeVec,
    pub replica_state: IntGaugeVec,
    pub recovery_sessions: IntCounterVec,
    pub rebuild_progress: GaugeVec,
    pub rebuild_bytes: IntGaugeVec,
    pub rebuild_resumed: IntCounterVec,
    pub rebuild_restarted: IntCounterVec,
    pub rebuild_sent_bytes: IntCounterVec,
    pub epoch: IntGaugeVec,
    pub role: IntGaugeVec,
    pub fenced: IntGaugeVec,
    /// Replication peers refused by mutual TLS before any frame was read, by reason.
    pub peer_rejects: IntCounterVec,
    /// 1 while this node holds the volume's leader key in etcd (`blockrep node`).
    pub leader: IntGaugeVec,
    /// Seconds until this leader's local lease deadline (0 when not leading).
    pub lease_remaining: GaugeVec,
    /// Times this node became the volume's leader.
    pub failovers: IntCounterVec,
    /// Times this node stopped acknowledging as leader, by reason.
    pub fence_events: IntCounterVec,
    /// 1 while a leader keeps serving with etcd unreachable (`--failsafe`).
    pub failsafe: IntGaugeVec,
    /// Time of one etcd request of the control plane, by operation (read, txn, grant,
    /// keep_alive, ...), failures included.
    pub etcd_request: HistogramVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("blockrep")
}

fn hist(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("blockrep")
        .buckets(LATENCY_BUCKETS.to_vec())
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let v = &["volume"];
        let vr = &["volume", "replica"];
        Ok(Metrics {
            nbd_requests: reg!(IntCounterVec::new(
                opts("nbd_requests_total", "NBD requests served, by operation."),
                &["volume", "op"]
            )?),
            nbd_errors: reg!(IntCounterVec::new(
                opts(
                    "nbd_errors_total",
                    "NBD requests answered with an error, by operation."
                ),
                &["volume", "op"]
            )?),
            nbd_bytes: reg!(IntCounterVec::new(
                opts("nbd_bytes_total", "Payload bytes read or written over NBD."),
                &["volume", "op"]
            )?),
            nbd_latency: reg!(HistogramVec::new(
                hist(
                    "nbd_request_duration_seconds",
                    "Time from request to reply, by operation."
                ),
                &["volume", "op"]
            )?),
            nbd_connections: reg!(IntGaugeVec::new(
                opts("nbd_connections", "NBD clients connected."),
                v
            )?),
            wal_write_latency: reg!(HistogramVec::new(
                hist(
                    "wal_append_duration_seconds",
                    "Time to write one batch of WAL records."
                ),
                v
            )?),
            wal_write_bytes: reg!(IntCounterVec::new(
                opts("wal_written_bytes_total", "Bytes written to the WAL."),
                v
            )?),
            placed_bytes: reg!(IntCounterVec::new(
                opts(
                    "placed_written_bytes_total",
                    "Bytes of large writes written once, straight to the data file (only their record goes to the WAL)."
                ),
                v
            )?),
            wal_sync_latency: reg!(HistogramVec::new(
                hist(
                    "wal_fsync_duration_seconds",
                    "Time of one WAL fdatasync (a group commit)."
                ),
                v
            )?),
            checkpoint_latency: reg!(HistogramVec::new(
                hist(
                    "checkpoint_duration_seconds",
                    "Time of one checkpoint into the data file."
                ),
                v
            )?),
            wal_bytes_used: reg!(IntGaugeVec::new(
                opts(
                    "wal_used_bytes",
                    "WAL bytes holding entries not yet released."
                ),
                v
            )?),
            wal_capacity: reg!(IntGaugeVec::new(
                opts("wal_capacity_bytes", "Size of the WAL ring."),
                v
            )?),
            lsn: reg!(IntGaugeVec::new(
                opts(
                    "lsn",
                    "Log sequence numbers: head, durable, committed, checkpoint."
                ),
                &["volume", "kind"]
            )?),
            barrier_latency: reg!(HistogramVec::new(
                hist(
                    "barrier_duration_seconds",
                    "Time for a FLUSH or FUA to meet the commit mode."
                ),
                &["volume", "mode"]
            )?),
            barrier_failures: reg!(IntCounterVec::new(
                opts(
                    "barrier_failures_total",
                    "FLUSHes that could not meet the commit mode."
                ),
                &["volume", "mode", "reason"]
            )?),
            replica_durable_lsn: reg!(IntGaugeVec::new(
                opts(
                    "replica_durable_lsn",
                    "Highest LSN a replica reported durable."
                ),
                vr
            )?),
            replica_lag_lsn: reg!(IntGaugeVec::new(
                opts(
                    "replica_lag_lsn",
                    "Entries the primary has that a replica has not made durable."
                ),
                vr
            )?),
            replica_lag_bytes: reg!(IntGaugeVec::new(
                opts(
                    "replica_lag_bytes",
                    "WAL bytes a replica has not made durable."
                ),
                vr
            )?),
            replica_lag_seconds: reg!(GaugeVec::new(
                opts(
                    "replica_lag_seconds",
                    "Age of the oldest entry a replica has not made durable (0 when caught up)."
                ),
                vr
            )?),
            replica_state: reg!(IntGaugeVec::new(
                opts(
                    "replica_state",
                    "1 for the state a replica is in, 0 for the others."
                ),
                &["volume", "replica", "state"]
            )?),
            recovery_sessions: reg!(IntCounterVec::new(
                opts("recovery_sessions_total", "Replica recoveries, by outcome."),
                &["volume", "outcome"]
            )?),
            rebuild_progress: reg!(GaugeVec::new(
                opts(
                    "rebuild_progress_ratio",
                    "Fraction of the base image sent to a rebuilding replica."
                ),
                vr
            )?),
            rebuild_bytes: reg!(IntGaugeVec::new(
                opts(
                    "rebuild_bytes",
                    "Base image bytes sent to a rebuilding replica."
                ),
                vr
            )?),
            rebuild_resumed: reg!(IntCounterVec::new(
                opts(
                    "rebuild_resumed_total",
                    "Interrupted rebuilds resumed from the replica's cursor."
                ),
                v
            )?),
            rebuild_restarted: reg!(IntCounterVec::new(
                opts(
                    "rebuild_restarted_total",
                    "Interrupted rebuilds started over, by the reason no resume was possible."
                ),
                &["volume", "reason"]
            )?),
            rebuild_sent_bytes: reg!(IntCounterVec::new(
                opts(
                    "rebuild_sent_bytes_total",
                    "Base image data bytes sent to rebuilding replicas."
                ),
                v
            )?),
            epoch: reg!(IntGaugeVec::new(
                opts("epoch", "The epoch this node serves at."),
                v
            )?),
            role: reg!(IntGaugeVec::new(
                opts("role", "1 for this node's role (primary or replica)."),
                &["volume", "role"]
            )?),
            fenced: reg!(IntGaugeVec::new(
                opts("fenced", "1 once a newer primary has fenced this one."),
                v
            )?),
            peer_rejects: reg!(IntCounterVec::new(
                opts(
                    "peer_rejects_total",
                    "Replication peers refused by mutual TLS (before any frame), by reason."
                ),
                &["volume", "reason"]
            )?),
            leader: reg!(IntGaugeVec::new(
                opts(
                    "leader",
                    "1 while this node holds the volume's leader key in etcd."
                ),
                v
            )?),
            lease_remaining: reg!(GaugeVec::new(
                opts(
                    "lease_remaining_seconds",
                    "Seconds until the leader's local lease deadline (0 when not leading)."
                ),
                v
            )?),
            failovers: reg!(IntCounterVec::new(
                opts(
                    "failovers_total",
                    "Times this node became the volume's leader."
                ),
                v
            )?),
            fence_events: reg!(IntCounterVec::new(
                opts(
                    "fence_events_total",
                    "Times this node stopped acknowledging as leader, by reason."
                ),
                &["volume", "reason"]
            )?),
            failsafe: reg!(IntGaugeVec::new(
                opts(
                    "failsafe_active",
                    "1 while a leader keeps serving with etcd unreachable (--failsafe)."
                ),
                v
            )?),
            etcd_request: reg!(HistogramVec::new(
                hist(
                    "etcd_request_seconds",
                    "Time of one etcd request, by operation (failed ones included)."
                ),
                &["volume", "op"]
            )?),
            registry,
        })
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// Handles for one volume's NBD operations, resolved once so the request path only touches
/// atomics.
pub struct OpHandles {
    pub requests: IntCounter,
    pub errors: IntCounter,
    pub bytes: IntCounter,
    pub latency: Histogram,
}

impl Metrics {
    pub fn op_handles(&self, volume: &str, op: &str) -> OpHandles {
        let l = [volume, op];
        OpHandles {
            requests: self.nbd_requests.with_label_values(&l),
            errors: self.nbd_errors.with_label_values(&l),
            bytes: self.nbd_bytes.with_label_values(&l),
            latency: self.nbd_latency.with_label_values(&l),
        }
    }

    pub fn connections(&self, volume: &str) -> IntGauge {
        self.nbd_connections.with_label_values(&[volume])
    }

    pub fn lag_seconds(&self, volume: &str, replica: &str) -> Gauge {
        self.replica_lag_seconds
            .with_label_values(&[volume, replica])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_prefixed_and_renders() {
        let m = Metrics::new().unwrap();
        let h = m.op_handles("vol", "write");
        h.requests.inc_by(3);
        h.bytes.inc_by(3 * 4096);
        h.latency.observe(0.0002);
        let text = m.render();
        assert!(
            text.contains("blockrep_nbd_requests_total{op=\"write\",volume=\"vol\"} 3"),
            "{text}"
        );
        assert!(text.contains("blockrep_nbd_bytes_total{op=\"write\",volume=\"vol\"} 12288"));
        assert!(text.contains("blockrep_nbd_request_duration_seconds_bucket{op=\"write\",volume=\"vol\",le=\"0.00025\"} 1"));
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("blockrep_"), "{line}");
        }
    }
}
