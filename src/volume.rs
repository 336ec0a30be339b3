//! The adapter that lets the NBD frontend serve a local store.

use std::sync::Arc;

use blockrep_frontend::{BlockVolume, Extent, ReadChunk, VolumeError, VolumeResult};
use blockrep_storage::{ReadSegment, StorageError, Store};
use bytes::Bytes;

pub struct LocalVolume {
    store: Arc<Store>,
}

impl LocalVolume {
    pub fn new(store: Arc<Store>) -> LocalVolume {
        LocalVolume { store }
    }
}

fn volume_error(e: StorageError) -> VolumeError {
    match e {
        StorageError::OutOfRange { .. } => VolumeError::OutOfRange,
        StorageError::Closed => VolumeError::ShuttingDown,
        other => VolumeError::Io(other.to_string()),
    }
}

impl BlockVolume for LocalVolume {
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
        self.store
            .write(offset, &data, fua)
            .await
            .map(|_| ())
            .map_err(volume_error)
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
        self.store
            .write_zeroes(offset, len, may_trim, fua)
            .await
            .map(|_| ())
            .map_err(volume_error)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> VolumeResult<()> {
        self.store
            .trim(offset, len, fua)
            .await
            .map(|_| ())
            .map_err(volume_error)
    }

    async fn flush(&self) -> VolumeResult<()> {
        self.store.flush().await.map(|_| ()).map_err(volume_error)
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
