//! The RAM volume the server harness exports: it panics at a range outside itself.

use std::sync::Mutex;

use blockrep_frontend::{BlockVolume, Extent, ReadChunk, VolumeResult};
use bytes::Bytes;

use super::common::{BLOCK, VOLUME_SIZE};

/// A RAM volume that reports zero 4 KiB blocks as holes (so structured reads and
/// BLOCK_STATUS produce mixed chunks) and panics when handed a range outside itself, which
/// the server promises never to do.
pub struct MemVolume {
    data: Mutex<Vec<u8>>,
}

impl MemVolume {
    pub fn new() -> MemVolume {
        MemVolume {
            data: Mutex::new(vec![0; VOLUME_SIZE as usize]),
        }
    }

    fn range(&self, op: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        match offset.checked_add(len) {
            Some(end) if end <= VOLUME_SIZE => offset as usize..end as usize,
            _ => panic!(
                "server passed {op} range offset {offset} length {len} outside the \
                 {VOLUME_SIZE}-byte volume"
            ),
        }
    }

    /// Splits `r` at 4 KiB boundaries into (range, all zero) pieces.
    fn pieces(data: &[u8], r: std::ops::Range<usize>) -> Vec<(std::ops::Range<usize>, bool)> {
        let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        let mut at = r.start;
        while at < r.end {
            let next = ((at as u64 / BLOCK + 1) * BLOCK).min(r.end as u64) as usize;
            let zero = data[at..next].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some((last, z)) if *z == zero => last.end = next,
                _ => out.push((at..next, zero)),
            }
            at = next;
        }
        out
    }
}

impl Default for MemVolume {
    fn default() -> Self {
        MemVolume::new()
    }
}

impl BlockVolume for MemVolume {
    fn size(&self) -> u64 {
        VOLUME_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> VolumeResult<Vec<ReadChunk>> {
        let r = self.range("read", offset, len.into());
        let data = self.data.lock().unwrap();
        Ok(MemVolume::pieces(&data, r)
            .into_iter()
            .map(|(p, zero)| {
                if zero {
                    ReadChunk::Zeroes(p.len() as u64)
                } else {
                    ReadChunk::Data(Bytes::copy_from_slice(&data[p]))
                }
            })
            .collect())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> VolumeResult<()> {
        let r = self.range("write", offset, data.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _fast: bool,
        _fua: bool,
    ) -> VolumeResult<()> {
        let r = self.range("write_zeroes", offset, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> VolumeResult<()> {
        let r = self.range("trim", offset, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }

    async fn flush(&self) -> VolumeResult<()> {
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.range("cache", offset, len);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> VolumeResult<Vec<Extent>> {
        let r = self.range("block_status", offset, len);
        let data = self.data.lock().unwrap();
        Ok(MemVolume::pieces(&data, r)
            .into_iter()
            .map(|(p, zero)| Extent {
                length: p.len() as u64,
                hole: zero,
                zero,
            })
            .collect())
    }
}
