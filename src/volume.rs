//! The adapter that lets the NBD frontend serve a store, locally or replicated.

use std::sync::{Arc, RwLock};

use blockrep_frontend::{BlockVolume, Extent, ReadChunk, VolumeError, VolumeResult};
use blockrep_replication::core::primary::BarrierFailure;
use blockrep_replication::driver::primary::{PrimaryHandle, ReplicationError};
use blockrep_storage::{Epoch, Lsn, ReadSegment, StorageError, Store};
use bytes::Bytes;

use crate::control::gate::AckGate;
use crate::observe::VolumeMetrics;

/// A store served over NBD. With a replication handle, FLUSH and FUA are barriers across
/// the replicas under the volume's commit mode; without one they are the local fsync.
/// With an acknowledgement gate (a node etcd elected), every reply waits for it: nothing
/// is acknowledged past the lease deadline (see `AckGate`).
pub struct StoreVolume {
    store: Arc<Store>,
    primary: ReplicationSlot,
    gate: Option<Arc<AckGate>>,
    metrics: Arc<VolumeMetrics>,
    /// The commit mode's name, for the barrier metrics.
    mode: &'static str,
}

impl StoreVolume {
    pub fn new(
        store: Arc<Store>,
        primary: Option<PrimaryHandle>,
        metrics: Arc<VolumeMetrics>,
        mode: &'static str,
    ) -> StoreVolume {
        StoreVolume {
            store,
            primary: Arc::new(RwLock::new(primary)),
            gate: None,
            metrics,
            mode,
        }
    }

    /// The replication this volume's barriers go through. A node of an etcd-led volume
    /// replaces it when the volume's members change (one driver per replica set).
    pub fn replication_slot(&self) -> ReplicationSlot {
        self.primary.clone()
    }

    fn primary(&self) -> Option<PrimaryHandle> {
        self.primary
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Acknowledges only while `gate` holds.
    pub fn with_gate(mut self, gate: Arc<AckGate>) -> StoreVolume {
        self.gate = Some(gate);
        self
    }

    /// Checked before a request touches the store (a node past its lease changes nothing)
    /// and again before its reply leaves (the lease may have run out while it waited).
    async fn admit(&self) -> VolumeResult<()> {
        match &self.gate {
            Some(gate) => gate.admit().await,
            None => Ok(()),
        }
    }

    /// Writes are refused once a newer primary has fenced this one.
    fn check_not_fenced(&self) -> VolumeResult<()> {
        self.fenced_by().map_err(CommitError::into_volume_error)
    }

    fn fenced_by(&self) -> Result<(), CommitError> {
        match self.primary().and_then(|p| p.fenced()) {
            Some(epoch) => Err(CommitError::Fenced(epoch)),
            None => Ok(()),
        }
    }

    /// Makes everything through `target` durable as the commit mode demands (see
    /// `commit_inner`), and records how long that took and why it failed.
    async fn commit(&self, target: Lsn) -> VolumeResult<()> {
        let started = std::time::Instant::now();
        let result = self.commit_inner(target).await;
        let failure = result.as_ref().err().map(CommitError::label);
        self.metrics.barrier(self.mode, started.elapsed(), failure);
        result.map_err(CommitError::into_volume_error)
    }

    /// The local WAL fsync always (it gates everything), and the replicas' acknowledgements
    /// if replicated. The replication driver learns the local fsync from the store itself
    /// (`Store::watch_durable`), so nothing here relays it.
    async fn commit_inner(&self, target: Lsn) -> Result<(), CommitError> {
        let Some(primary) = self.primary() else {
            return self
                .store
                .wait_durable(target)
                .await
                .map_err(CommitError::Local);
        };
        self.fenced_by()?;
        let (local, replicated) =
            tokio::join!(self.store.wait_durable(target), primary.barrier(target));
        local.map_err(CommitError::Local)?;
        replicated.map_err(|source| CommitError::Replication { target, source })
    }
}

/// Where a volume's current replication handle is kept (`None`: a single node).
pub type ReplicationSlot = Arc<RwLock<Option<PrimaryHandle>>>;

/// Why a FLUSH or FUA failed, by kind: the barrier metrics take their label from it.
#[derive(Debug)]
enum CommitError {
    /// A newer primary fenced this one.
    Fenced(Epoch),
    /// The local WAL could not be made durable.
    Local(StorageError),
    /// The replicas did not meet the commit mode through `target`.
    Replication {
        target: Lsn,
        source: ReplicationError,
    },
}

impl CommitError {
    /// The `reason` label of `barrier_failures`.
    fn label(&self) -> &'static str {
        match self {
            CommitError::Fenced(_) => "fenced",
            CommitError::Replication {
                source: ReplicationError::Barrier(f),
                ..
            } => f.name(),
            CommitError::Local(_)
            | CommitError::Replication {
                source: ReplicationError::Stopped,
                ..
            } => "local",
        }
    }

    fn into_volume_error(self) -> VolumeError {
        match self {
            CommitError::Fenced(epoch) => VolumeError::Io(format!(
                "this primary was fenced by epoch {epoch}; it accepts no more writes"
            )),
            CommitError::Local(e) => volume_error(e),
            CommitError::Replication {
                target,
                source: source @ ReplicationError::Barrier(BarrierFailure::ReplicaNoSpace),
            } => VolumeError::NoSpace(format!("flush through {target}: {source}")),
            CommitError::Replication { target, source } => {
                VolumeError::Io(format!("flush through {target}: {source}"))
            }
        }
    }
}

fn volume_error(e: StorageError) -> VolumeError {
    match e {
        StorageError::OutOfRange { .. } => VolumeError::OutOfRange,
        StorageError::Closed => VolumeError::ShuttingDown,
        e @ StorageError::NoSpace { .. } => VolumeError::NoSpace(e.to_string()),
        other => VolumeError::Io(other.to_string()),
    }
}

impl BlockVolume for StoreVolume {
    fn size(&self) -> u64 {
        self.store.size()
    }

    async fn read(&self, offset: u64, len: u32) -> VolumeResult<Vec<ReadChunk>> {
        self.admit().await?;
        let segments = self
            .store
            .read(offset, u64::from(len))
            .await
            .map_err(volume_error)?;
        self.admit().await?;
        Ok(segments
            .into_iter()
            .map(|s| match s {
                ReadSegment::Data(b) => ReadChunk::Data(b),
                ReadSegment::Zeroes(n) => ReadChunk::Zeroes(n),
            })
            .collect())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.admit().await?;
        self.check_not_fenced()?;
        let lsn = self
            .store
            .write_shared(offset, data, false)
            .await
            .map_err(volume_error)?;
        if fua {
            self.commit(lsn).await?;
        }
        self.admit().await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        _fast: bool,
        fua: bool,
    ) -> VolumeResult<()> {
        // Zeroing is a metadata entry in the WAL, always cheaper than writing zeroes, so a
        // FAST_ZERO request never has to be refused.
        self.admit().await?;
        self.check_not_fenced()?;
        let lsn = self
            .store
            .write_zeroes(offset, len, may_trim, false)
            .await
            .map_err(volume_error)?;
        if fua {
            self.commit(lsn).await?;
        }
        self.admit().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.admit().await?;
        self.check_not_fenced()?;
        let lsn = self
            .store
            .trim(offset, len, false)
            .await
            .map_err(volume_error)?;
        if fua {
            self.commit(lsn).await?;
        }
        self.admit().await
    }

    /// Covers every write acknowledged before it, on any connection: the store's head.
    async fn flush(&self) -> VolumeResult<()> {
        self.admit().await?;
        self.check_not_fenced()?;
        self.commit(self.store.head()).await?;
        self.admit().await
    }

    /// The gate again, as the reply goes to the socket: a reply admitted before the deadline
    /// that waited past it (the process was paused) is not sent.
    fn may_acknowledge(&self) -> bool {
        self.gate.as_ref().is_none_or(|gate| gate.holds())
    }

    async fn block_status(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        self.admit().await?;
        let extents = self.store.block_status(offset, len).map_err(volume_error)?;
        Ok(extents
            .into_iter()
            .map(|a| Extent {
                length: a.length,
                hole: a.hole,
                zero: a.zero,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use blockrep_replication::core::primary::BarrierFailure;
    use blockrep_replication::driver::primary::ReplicationError;
    use blockrep_storage::{Epoch, Lsn, StorageError};

    use blockrep_frontend::VolumeError;

    use super::CommitError;

    #[test]
    fn barrier_failures_are_labelled_by_their_kind_never_their_text() {
        let replicated = |source| CommitError::Replication {
            target: Lsn(7),
            source,
        };
        let cases = [
            (CommitError::Fenced(Epoch(3)), "fenced"),
            (CommitError::Local(StorageError::Closed), "local"),
            (replicated(ReplicationError::Stopped), "local"),
            (
                replicated(ReplicationError::Barrier(BarrierFailure::ReplicaMissing)),
                "replica_missing",
            ),
            (
                replicated(ReplicationError::Barrier(BarrierFailure::QuorumLost)),
                "quorum_lost",
            ),
            (
                replicated(ReplicationError::Barrier(BarrierFailure::Fenced)),
                "fenced",
            ),
            (
                replicated(ReplicationError::Barrier(BarrierFailure::ReplicaNoSpace)),
                "replica_no_space",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(e.label(), label, "{e:?}");
        }
    }

    #[test]
    fn a_flush_a_full_replica_could_not_take_is_no_space_and_other_replica_failures_are_io() {
        let replicated = |f| CommitError::Replication {
            target: Lsn(7),
            source: ReplicationError::Barrier(f),
        };
        let full = replicated(BarrierFailure::ReplicaNoSpace).into_volume_error();
        assert!(matches!(full, VolumeError::NoSpace(_)), "{full:?}");
        let missing = replicated(BarrierFailure::ReplicaMissing).into_volume_error();
        assert!(matches!(missing, VolumeError::Io(_)), "{missing:?}");
    }

    /// Every acknowledging request of a volume behind an expired gate fails (io-error), and
    /// succeeds once the gate holds: the gate is on every path, not only on FLUSH.
    #[test]
    fn no_acknowledgement_after_the_lease_deadline() {
        use std::sync::Arc;

        use blockrep_frontend::BlockVolume;
        use blockrep_storage::{CreateOptions, OpenOptions, Store};

        use crate::control::gate::{AckGate, OnLeaseLoss};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let size = 1 << 20;
        Store::create(
            &path,
            &CreateOptions {
                size,
                wal_capacity: CreateOptions::DEFAULT_WAL_CAPACITY,
                volume_id: None,
            },
        )
        .expect("create");
        let store = Arc::new(Store::open(&path, &OpenOptions::default()).expect("open"));
        let metrics = Arc::new(blockrep_metrics::Metrics::new().expect("metrics"));
        let metrics = crate::observe::VolumeMetrics::new(metrics, "gate");
        let gate = Arc::new(AckGate::new(
            std::time::Instant::now(),
            OnLeaseLoss::IoError,
        ));
        let volume = super::StoreVolume::new(store.clone(), None, metrics, "best-effort")
            .with_gate(gate.clone());
        let data = bytes::Bytes::from(vec![7u8; 4096]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // One of every request that answers, to see each one gated.
        let answers = || async {
            [
                volume.write(0, data.clone(), false).await,
                volume.write(4096, data.clone(), true).await,
                volume.write_zeroes(8192, 4096, true, false, true).await,
                volume.trim(12288, 4096, true).await,
                volume.flush().await,
                volume.read(0, 4096).await.map(drop),
            ]
        };
        for answer in rt.block_on(answers()) {
            assert_eq!(answer, Err(VolumeError::LeaseLost));
        }
        assert_eq!(store.head(), Lsn(0), "an expired leader changed its store");
        gate.set_deadline(Some(gate.now() + 60_000));
        for answer in rt.block_on(answers()) {
            assert_eq!(answer, Ok(()));
        }
        drop(volume);
        store.close().expect("close");
    }

    #[test]
    fn a_store_out_of_space_is_the_volume_s_no_space_and_other_io_errors_are_io() {
        let no_space = StorageError::NoSpace {
            path: "/store/data".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert!(matches!(
            super::volume_error(no_space),
            VolumeError::NoSpace(_)
        ));
        let io = StorageError::Io {
            path: "/store/data".into(),
            source: std::io::Error::from_raw_os_error(5),
        };
        assert!(matches!(super::volume_error(io), VolumeError::Io(_)));
    }
}
