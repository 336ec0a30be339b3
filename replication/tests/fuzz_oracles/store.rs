//! The replica harness's store: an in-memory model with the rules of the real one
//! (`blockrep_storage::Store`'s replica side), which turns what the real store would refuse
//! or crash on into a failed oracle, since the core must never ask for it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use blockrep_replication::wire::validate::{check_payload, check_range};
use blockrep_storage::{epoch_at, Epoch, Lsn, RecordKind, VolumeId, WalRecord, BLOCK_SIZE};
use bytes::Bytes;

/// Everything the store holds. Compared whole, so "changes no stored byte" includes the
/// image, the log and the rebuild's bookkeeping.
#[derive(Clone, PartialEq, Eq)]
pub struct MemStore {
    pub size: u64,
    pub volume_id: VolumeId,
    pub blank: bool,
    pub epoch: Epoch,
    pub owner: VolumeId,
    pub committed: Lsn,
    pub durable: Lsn,
    pub rebuilding: bool,
    /// The volume as of `base`, block by block (a missing block reads as zeroes).
    pub image: BTreeMap<u64, Bytes>,
    pub base: Lsn,
    /// Epoch changes in the log: (epoch, first LSN written at it).
    pub history: Vec<(Epoch, Lsn)>,
    /// The entries after `base`, in LSN order.
    pub log: Vec<WalRecord>,
    /// Blocks the log wrote since the rebuild began: base data never overwrites them.
    pub touched: BTreeSet<u64>,
}

impl MemStore {
    pub fn new(size: u64, volume_id: VolumeId, epoch: Epoch, owner: VolumeId) -> MemStore {
        MemStore {
            size,
            volume_id,
            blank: volume_id == VolumeId([0; 16]),
            epoch,
            owner,
            committed: Lsn::ZERO,
            durable: Lsn::ZERO,
            rebuilding: false,
            image: BTreeMap::new(),
            base: Lsn::ZERO,
            history: Vec::new(),
            log: Vec::new(),
            touched: BTreeSet::new(),
        }
    }

    pub fn head(&self) -> Lsn {
        self.log.last().map_or(self.base, |r| r.lsn)
    }

    pub fn head_epoch(&self) -> Epoch {
        match self.log.last() {
            Some(r) => r.epoch,
            None => epoch_at(&self.history, self.base).unwrap_or(Epoch(0)),
        }
    }

    pub fn adopt_volume(&mut self, volume_id: VolumeId) {
        assert!(self.blank, "only a blank store can join another volume");
        self.volume_id = volume_id;
    }

    pub fn adopt_epoch(&mut self, epoch: Epoch, owner: VolumeId) {
        assert!(
            epoch >= self.epoch,
            "the store's epoch would go back from {} to {epoch}",
            self.epoch
        );
        self.epoch = epoch;
        self.owner = owner;
    }

    /// The real store slices a write's payload by its length and refuses a gap: an entry
    /// that breaks either reaching it is the core's bug.
    pub fn append(&mut self, r: WalRecord) {
        assert_eq!(r.lsn, self.head().next(), "append out of LSN order");
        assert_eq!(check_payload(&r), Ok(()), "the store was handed {r:?}");
        if r.kind != RecordKind::EpochStart {
            let placed = check_range(r.offset, r.length, self.size);
            assert_eq!(placed, Ok(()), "the store was handed {r:?}");
        }
        assert!(r.epoch <= self.epoch, "an entry from a later epoch: {r:?}");
        // The last LSN there is would leave no LSN after it (`Lsn::next` saturates).
        assert!(
            r.lsn.checked_next().is_some(),
            "the store was handed LSN {}",
            r.lsn
        );
        if self.history.last().is_none_or(|(e, _)| *e != r.epoch) {
            self.history.push((r.epoch, r.lsn));
        }
        if self.rebuilding {
            self.touched.extend(blocks(r.offset, r.length));
        }
        self.blank = false;
        self.log.push(r);
    }

    pub fn set_committed(&mut self, lsn: Lsn) {
        self.committed = self.committed.max(lsn);
    }

    /// An fsync: everything appended is durable.
    pub fn sync(&mut self) -> Lsn {
        self.durable = self.head();
        self.durable
    }

    pub fn begin_rebuild(&mut self, base: Lsn, history: Vec<(Epoch, Lsn)>) {
        self.rebuilding = true;
        self.image.clear();
        self.base = base;
        self.log.clear();
        self.durable = base;
        self.history = history;
        self.touched.clear();
        self.blank = false;
    }

    pub fn apply_base(&mut self, offset: u64, length: u64, data: Option<Bytes>) {
        assert!(self.rebuilding, "base data outside a rebuild");
        assert_eq!(check_range(offset, length, self.size), Ok(()));
        if let Some(d) = &data {
            assert_eq!(d.len() as u64, length, "base data not as long as its chunk");
        }
        for (i, b) in blocks(offset, length).enumerate() {
            if self.touched.contains(&b) {
                continue;
            }
            let at = i * BLOCK_SIZE as usize;
            match &data {
                Some(d) => self.image.insert(b, d.slice(at..at + BLOCK_SIZE as usize)),
                None => self.image.remove(&b),
            };
        }
    }

    pub fn finish_rebuild(&mut self) -> Lsn {
        self.rebuilding = false;
        self.touched.clear();
        self.sync()
    }

    /// `Store::truncate_after`'s rules: nothing to cut, or refused while rebuilding, below
    /// the committed LSN, or below what the image already holds.
    pub fn truncate_after(&mut self, keep: Lsn) -> Result<(), String> {
        if keep >= self.head() {
            return Ok(());
        }
        if self.rebuilding {
            return Err("a rebuild is in progress".into());
        }
        if keep < self.committed {
            return Err(format!("entries through {} are committed", self.committed));
        }
        if keep < self.base {
            return Err(format!("the image holds entries through {}", self.base));
        }
        self.log.retain(|r| r.lsn <= keep);
        self.history.retain(|(_, start)| *start <= keep);
        self.durable = self.durable.min(keep);
        Ok(())
    }
}

/// Payloads shown by length and checksum: a failure's report stays readable.
impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log: Vec<_> = self
            .log
            .iter()
            .map(|r| {
                let (lsn, epoch, kind) = (r.lsn.0, r.epoch.0, r.kind);
                let (at, len, crc) = (r.offset, r.length, r.payload_crc);
                format!("{lsn}@{epoch} {kind:?} {at}+{len} crc {crc:#x}")
            })
            .collect();
        let image: Vec<_> = self.image.keys().collect();
        f.debug_struct("MemStore")
            .field("volume_id", &self.volume_id)
            .field("blank", &self.blank)
            .field("epoch", &self.epoch)
            .field("owner", &self.owner)
            .field("committed", &self.committed)
            .field("durable", &self.durable)
            .field("rebuilding", &self.rebuilding)
            .field("base", &self.base)
            .field("image_blocks", &image)
            .field("history", &self.history)
            .field("log", &log)
            .field("touched", &self.touched)
            .finish()
    }
}

/// The block numbers `offset..offset+length` covers (both block aligned).
fn blocks(offset: u64, length: u64) -> impl Iterator<Item = u64> {
    let first = offset / BLOCK_SIZE;
    first..first + length / BLOCK_SIZE
}
