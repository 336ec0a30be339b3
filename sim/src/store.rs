//! A node's store, modelled in memory with the durability rules of the real one.
//!
//! Entries are appended in LSN order; `durable` is the fsynced prefix. A crash keeps the
//! durable prefix and a random prefix of what was appended after it (what reached the disk
//! before the power went: a torn tail is cut at the first broken record, so what survives is
//! always a prefix). Epochs and rebuild marks are persisted synchronously, as the real store
//! fsyncs its superblock before it acts on them.

use std::collections::{BTreeMap, HashSet};

use blockrep_storage::{epoch_at, Epoch, Lsn, RebuildCursor, RecordKind, VolumeId, WalRecord};
use bytes::Bytes;

pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub lsn: Lsn,
    pub epoch: Epoch,
    pub block: u64,
    /// Every write's value is its LSN in the first primary that wrote it, so a block's
    /// content says exactly which write it holds.
    pub value: u64,
}

/// The `block` of an epoch-start entry, which changes no block.
pub const EPOCH_START: u64 = u64::MAX;

impl Entry {
    /// Whether the entry writes a block (an epoch-start entry does not).
    pub fn writes(&self) -> bool {
        self.block != EPOCH_START
    }

    pub fn record(&self) -> WalRecord {
        if !self.writes() {
            return WalRecord::new(
                self.lsn,
                self.epoch,
                RecordKind::EpochStart,
                0,
                0,
                Bytes::new(),
            );
        }
        WalRecord::new(
            self.lsn,
            self.epoch,
            RecordKind::Write,
            self.block * BLOCK,
            BLOCK,
            Bytes::copy_from_slice(&self.value.to_le_bytes()),
        )
    }

    pub fn from_record(r: &WalRecord) -> Entry {
        if r.kind == RecordKind::EpochStart {
            return Entry {
                lsn: r.lsn,
                epoch: r.epoch,
                block: EPOCH_START,
                value: 0,
            };
        }
        let mut v = [0u8; 8];
        let n = r.payload.len().min(8);
        v[..n].copy_from_slice(&r.payload[..n]);
        Entry {
            lsn: r.lsn,
            epoch: r.epoch,
            block: r.offset / BLOCK,
            value: u64::from_le_bytes(v),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRole {
    Primary,
    Replica,
}

#[derive(Debug, Clone)]
pub struct SimStore {
    pub volume_id: VolumeId,
    pub store_id: VolumeId,
    /// The volume as of `image_lsn` (the data file).
    pub image: BTreeMap<u64, u64>,
    pub image_lsn: Lsn,
    /// Entries after `retained_from - 1`, in order (the WAL).
    pub log: Vec<Entry>,
    pub retained_from: Lsn,
    pub durable: Lsn,
    pub epoch: Epoch,
    pub epoch_owner: VolumeId,
    pub role: StoreRole,
    pub history: Vec<(Epoch, Lsn)>,
    pub committed: Lsn,
    pub rebuilding: bool,
    /// Blocks written by the WAL since a rebuild began ("WAL wins over base").
    pub touched: HashSet<u64>,
    pub pin: Option<Lsn>,
    pub blank: bool,
    /// How far the rebuild in progress got, durably: the image below `through` survives a
    /// crash (it was written and fsynced), the rest of a rebuild's base does not.
    pub cursor: Option<RebuildCursor>,
    /// The rebuild's base and history, for its cursor.
    rebuild_base: (Lsn, Vec<(Epoch, Lsn)>),
    /// Base chunks applied since the last cursor: where each ends, and the newest entry the
    /// base through there may reflect.
    base_chunks: Vec<(u64, Lsn)>,
    /// What the base below the first of `base_chunks` may reflect.
    base_floor: Lsn,
    head: Lsn,
}

impl SimStore {
    pub fn new(volume_id: VolumeId, store_id: VolumeId) -> SimStore {
        SimStore {
            volume_id,
            store_id,
            image: BTreeMap::new(),
            image_lsn: Lsn::ZERO,
            log: Vec::new(),
            retained_from: Lsn(1),
            durable: Lsn::ZERO,
            epoch: Epoch(0),
            epoch_owner: VolumeId([0; 16]),
            role: StoreRole::Primary,
            history: Vec::new(),
            committed: Lsn::ZERO,
            rebuilding: false,
            touched: HashSet::new(),
            pin: None,
            blank: true,
            cursor: None,
            rebuild_base: (Lsn::ZERO, Vec::new()),
            base_chunks: Vec::new(),
            base_floor: Lsn::ZERO,
            head: Lsn::ZERO,
        }
    }

    pub fn head(&self) -> Lsn {
        self.head
    }

    pub fn head_epoch(&self) -> Epoch {
        epoch_at(&self.history, self.head).unwrap_or(Epoch(0))
    }

    /// Appends the next entry (its LSN must follow the head).
    pub fn append(&mut self, e: Entry) {
        assert_eq!(e.lsn, self.head.next(), "store append out of order");
        if self.history.last().is_none_or(|(ep, _)| *ep != e.epoch) {
            self.history.push((e.epoch, e.lsn));
        }
        if self.rebuilding && e.writes() {
            self.touched.insert(e.block);
        }
        self.log.push(e);
        self.head = e.lsn;
        self.blank = false;
    }

    pub fn sync(&mut self) -> Lsn {
        self.durable = self.head;
        self.durable
    }

    /// Power loss: keeps the durable prefix and `keep` more of the unsynced entries.
    pub fn crash(&mut self, keep: u64) {
        let survive = Lsn((self.durable.0 + keep).min(self.head.0));
        self.log.retain(|e| e.lsn <= survive);
        self.head = survive.max(self.image_lsn);
        self.durable = self.head;
        self.history.retain(|(_, start)| *start <= self.head);
        self.pin = None;
        if self.rebuilding {
            // Base blocks past the cursor lived only in memory (and the page cache).
            let kept = self.cursor.as_ref().map_or(0, |c| c.through / BLOCK);
            self.image.retain(|b, _| *b < kept);
            self.base_chunks.clear();
        }
    }

    /// A replica keeps its WAL after the committed LSN through every checkpoint, as
    /// `Store::keep_wal_after` does (here the WAL never fills, so the hold never gives way).
    pub fn keep_wal_after_committed(&mut self) {
        self.pin = Some(self.committed.next());
    }

    /// Moves the durable entries into the image; the WAL keeps what the pin asks for.
    pub fn checkpoint(&mut self) {
        self.checkpoint_through(self.durable);
    }

    /// Moves the durable entries through `target` into the image: a gated checkpoint stops at
    /// the commit point (the real store's wait for it), one whose wait ran out does not.
    pub fn checkpoint_through(&mut self, target: Lsn) {
        if self.rebuilding {
            return;
        }
        let target = target.min(self.durable).max(self.image_lsn);
        for e in self
            .log
            .iter()
            .filter(|e| e.lsn > self.image_lsn && e.lsn <= target && e.writes())
        {
            self.image.insert(e.block, e.value);
        }
        self.image_lsn = self.image_lsn.max(target);
        let keep_from = match self.pin {
            Some(p) if p <= target => p,
            _ => target.next(),
        };
        self.retained_from = self.retained_from.max(keep_from);
        let from = self.retained_from;
        self.log.retain(|e| e.lsn >= from);
    }

    /// Entries `from..` if the WAL still holds them (catch-up).
    pub fn read_wal(&self, from: Lsn, max: usize) -> Option<Vec<WalRecord>> {
        if from < self.retained_from {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|e| e.lsn >= from)
                .take(max.max(1))
                .map(|e| e.record())
                .collect(),
        )
    }

    /// The volume's content: the image plus every entry after it.
    pub fn state(&self) -> BTreeMap<u64, u64> {
        let mut s = self.image.clone();
        for e in self
            .log
            .iter()
            .filter(|e| e.lsn > self.image_lsn && e.writes())
        {
            s.insert(e.block, e.value);
        }
        s
    }

    /// Discards the entries after `keep`, as `Store::truncate_after` does, and refuses on the
    /// same grounds: the image holds an entry after `keep`, `keep` is committed-below, the
    /// WAL lost entries after the image, or a rebuild is running.
    pub fn truncate_after(&mut self, keep: Lsn) -> Result<(), String> {
        if keep >= self.head {
            return Ok(());
        }
        if self.rebuilding {
            return Err("a rebuild is in progress".into());
        }
        if keep < self.image_lsn {
            return Err(format!(
                "the image holds entries through {}",
                self.image_lsn
            ));
        }
        if keep < self.committed {
            return Err(format!("entries through {} are committed", self.committed));
        }
        if self.retained_from > self.image_lsn.next() {
            return Err("the WAL lost entries after the image".into());
        }
        self.log.retain(|e| e.lsn <= keep);
        self.head = keep;
        self.durable = self.durable.min(keep);
        self.history.retain(|(_, start)| *start <= keep);
        Ok(())
    }

    /// Starts a rebuild from `base`; with `resume`, the image below the cursor at that
    /// offset is kept (the store's cursor must name it, as the core checked).
    pub fn begin_rebuild(&mut self, base: Lsn, history: Vec<(Epoch, Lsn)>, resume: Option<u64>) {
        let cursor = self
            .cursor
            .take()
            .filter(|c| self.rebuilding && resume == Some(c.through) && c.base == base);
        match &cursor {
            Some(c) => {
                let kept = c.through / BLOCK;
                self.image.retain(|b, _| *b < kept);
                self.base_floor = c.proof;
            }
            None => {
                self.image.clear();
                self.base_floor = base;
            }
        }
        self.cursor = cursor;
        self.rebuilding = true;
        self.image_lsn = base;
        self.log.clear();
        self.retained_from = base.next();
        self.head = base;
        self.durable = base;
        self.history = history.clone();
        self.rebuild_base = (base, history);
        self.base_chunks.clear();
        self.touched.clear();
        self.blank = false;
    }

    /// Base values for `blocks` (the chunk ends at byte `end` and may reflect entries through
    /// `reflects`).
    pub fn apply_base(&mut self, blocks: &[(u64, u64)], end: u64, reflects: Lsn) {
        for &(b, v) in blocks {
            if !self.touched.contains(&b) {
                self.image.insert(b, v);
            }
        }
        if self.rebuilding {
            let prior = self.base_chunks.last().map_or(self.base_floor, |(_, r)| *r);
            self.base_chunks.push((end, prior.max(reflects)));
        }
    }

    /// `Store::save_rebuild_cursor`: everything appended is made durable, and the cursor
    /// moves to the furthest chunk end whose base reflects nothing past the head.
    pub fn save_cursor(&mut self) -> Option<RebuildCursor> {
        if !self.rebuilding {
            return None;
        }
        let proof = self.sync();
        let through = self
            .base_chunks
            .iter()
            .take_while(|(_, r)| *r <= proof)
            .map(|(end, _)| *end)
            .last()?;
        if self.cursor.as_ref().is_some_and(|c| c.through >= through) {
            return None;
        }
        let (base, history) = self.rebuild_base.clone();
        let cursor = RebuildCursor {
            base,
            history,
            through,
            proof,
            proof_epoch: self.head_epoch(),
        };
        self.base_chunks.retain(|(end, _)| *end > through);
        self.base_floor = self.base_floor.max(proof);
        self.cursor = Some(cursor.clone());
        Some(cursor)
    }

    pub fn finish_rebuild(&mut self) {
        self.durable = self.head;
        self.rebuilding = false;
        self.cursor = None;
        self.base_chunks.clear();
        self.touched.clear();
        self.checkpoint();
    }
}
