//! The adapter that lets the NBD frontend serve a store, locally or replicated.

use std::sync::Arc;

use blockrep_frontend::{BlockVolume, Extent, ReadChunk, VolumeError, VolumeResult};
use blockrep_replication::driver::primary::PrimaryHandle;
use blockrep_storage::{Lsn, ReadSegment, StorageError, Store};
use bytes::Bytes;

use crate::observe::VolumeMetrics;

/// A store served over NBD. With a replication handle, FLUSH and FUA are barriers across
/// the replicas under the volume's commit mode; without one they are the local fsync.
pub struct StoreVolume {
    store: Arc<Store>,
    primary: Option<PrimaryHandle>,
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
            primary,
            metrics,
            mode,
        }
    }

    /// Writes are refused once a newer primary has fenced this one.
    fn check_not_fenced(&self) -> VolumeResult<()> {
        match self.primary.as_ref().and_then(|p| p.fenced()) {
            Some(epoch) => Err(VolumeError::Io(format!(
                "this primary was fenced by epoch {epoch}; it accepts no more writes"
            ))),
            None => Ok(()),
        }
    }

    /// Makes everything through `target` durable as the commit mode demands (see
    /// `commit_inner`), and records how long that took and why it failed.
    async fn commit(&self, target: Lsn) -> VolumeResult<()> {
        let started = std::time::Instant::now();
        let result = self.commit_inner(target).await;
        let failure = result.as_ref().err().map(|e| match e {
            VolumeError::Io(msg) if msg.contains("fenced") => "fenced",
            VolumeError::Io(msg) if msg.contains("quorum_lost") => "quorum_lost",
            VolumeError::Io(msg) if msg.contains("replica_missing") => "replica_missing",
            _ => "local",
        });
        self.metrics.barrier(self.mode, started.elapsed(), failure);
        result
    }

    /// The local WAL fsync always (it gates everything), and the replicas' acknowledgements
    /// if replicated.
    async fn commit_inner(&self, target: Lsn) -> VolumeResult<()> {
        let Some(primary) = &self.primary else {
            return self.store.wait_durable(target).await.map_err(volume_error);
        };
        self.check_not_fenced()?;
        let local = async {
            let r = self.store.wait_durable(target).await;
            if r.is_ok() {
                primary.local_durable(target);
            }
            r
        };
        let (local, replicated) = tokio::join!(local, primary.barrier(target));
        local.map_err(volume_error)?;
        replicated.map_err(|e| VolumeError::Io(format!("flush through {target}: {e}")))
    }
}

fn volume_error(e: StorageError) -> VolumeError {
    match e {
        StorageError::OutOfRange { .. } => VolumeError::OutOfRange,
        StorageError::Closed => VolumeError::ShuttingDown,
        other => VolumeError::Io(other.to_string()),
    }
}

impl BlockVolume for StoreVolume {
    fn size(&self) -> u64 {
        self.store.size()
    }

    async fn read(&self, offset: u64, len: u32) -> VolumeResult<Vec<ReadChunk>> {
        let segments = self
            .store
            .read(offset, u64::from(len))
            .await
            .map_err(volume_error)?;
        Ok(segments
            .into_iter()
            .map(|s| match s {
                ReadSegment::Data(b) => ReadChunk::Data(b),
                ReadSegment::Zeroes(n) => ReadChunk::Zeroes(n),
            })
            .collect())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.check_not_fenced()?;
        let lsn = self
            .store
            .write(offset, &data, false)
            .await
            .map_err(volume_error)?;
        if fua {
            self.commit(lsn).await?;
        }
        Ok(())
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
        self.check_not_fenced()?;
        let lsn = self
            .store
            .write_zeroes(offset, len, may_trim, false)
            .await
            .map_err(volume_error)?;
        if fua {
            self.commit(lsn).await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.check_not_fenced()?;
        let lsn = self
            .store
            .trim(offset, len, false)
            .await
            .map_err(volume_error)?;
        if fua {
            self.commit(lsn).await?;
        }
        Ok(())
    }

    /// Covers every write acknowledged before it, on any connection: the store's head.
    async fn flush(&self) -> VolumeResult<()> {
        self.check_not_fenced()?;
        self.commit(self.store.head()).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
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
