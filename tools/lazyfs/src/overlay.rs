//! The data model of one file: its durable content (the backing file) plus an in-memory
//! overlay of everything written since the last fsync/fdatasync.
//!
//! Pure logic, no I/O of its own: the durable content is read through the [`Durable`] trait,
//! and making the overlay durable (or tearing it in a simulated power loss) is described as a
//! list of [`Action`]s that the caller performs on the backing file. That keeps every rule
//! here testable on plain byte vectors.
//!
//! The logical content of the file is, byte by byte (below `size`; nothing exists above it):
//! 1. the overlay page, if the page is in the overlay (a data page or a zeroed page);
//! 2. otherwise zero at or above `floor` (the lowest size the file had since the last sync:
//!    whatever the backing file holds there was cut off by a truncation);
//! 3. otherwise the backing file (which reads as zeroes past its end).

use std::collections::BTreeMap;

/// Overlay granularity, and the unit a torn crash keeps or drops.
pub const PAGE: u64 = 4096;
const PAGE_USIZE: usize = PAGE as usize;

/// One dirty page.
#[derive(Clone, PartialEq, Eq)]
pub enum Page {
    /// New contents. Bytes at or above the file size are always zero.
    Data(Box<[u8; PAGE_USIZE]>),
    /// Punched or zeroed (fallocate): reads as zeroes, becomes a hole when synced.
    Zero,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Page::Data(_) => f.write_str("Data"),
            Page::Zero => f.write_str("Zero"),
        }
    }
}

/// Read access to the durable content (the backing file).
pub trait Durable {
    /// Fills `buf` from `offset`; returns how many bytes the file had there (less than
    /// `buf.len()` at its end). The caller zeroes the rest.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
    /// Whether the backing file has data at `offset`, and where that state ends (at most
    /// `limit`). A backing file that cannot tell reports data.
    fn extent(&self, _offset: u64, limit: u64) -> (bool, u64) {
        (true, limit)
    }
}

impl Durable for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = (offset as usize).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl Durable for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn extent(&self, offset: u64, limit: u64) -> (bool, u64) {
        use std::os::unix::io::AsRawFd;
        let fd = self.as_raw_fd();
        // SAFETY: lseek on a descriptor owned by `self`.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            return (!hole, limit);
        }
        if data as u64 > offset {
            return (false, (data as u64).min(limit));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return (true, limit);
        }
        (true, (hole as u64).clamp(offset + 1, limit.max(offset + 1)))
    }
}

/// One step that changes the backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// ftruncate to this size.
    SetLen(u64),
    /// pwrite these bytes here.
    Write(u64, Vec<u8>),
    /// Deallocate this range, keeping the size (it reads as zeroes).
    Punch(u64, u64),
}

/// Applies `actions` to an in-memory "file" (for tests and for reasoning about the plans).
pub fn apply_to_vec(file: &mut Vec<u8>, actions: &[Action]) {
    for a in actions {
        match a {
            Action::SetLen(n) => file.resize(*n as usize, 0),
            Action::Write(at, bytes) => {
                let end = *at as usize + bytes.len();
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[*at as usize..end].copy_from_slice(bytes);
            }
            Action::Punch(at, len) => {
                let start = (*at as usize).min(file.len());
                let end = ((*at + *len) as usize).min(file.len());
                file[start..end].fill(0);
            }
        }
    }
}

/// Unsynced changes of one file.
#[derive(Debug, Clone)]
pub struct Overlay {
    pages: BTreeMap<u64, Page>,
    /// The file's size as everyone sees it now.
    size: u64,
    /// The backing file's size (what a crash falls back to).
    durable_size: u64,
    /// At and above this offset, nothing of the backing file is visible (see the module doc).
    floor: u64,
}

impl Overlay {
    /// A clean overlay over a backing file of `durable_size` bytes.
    pub fn new(durable_size: u64) -> Overlay {
        Overlay {
            pages: BTreeMap::new(),
            size: durable_size,
            durable_size,
            floor: durable_size,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn durable_size(&self) -> u64 {
        self.durable_size
    }

    /// Whether anything differs from the backing file.
    pub fn is_dirty(&self) -> bool {
        !self.pages.is_empty() || self.size != self.durable_size || self.floor != self.durable_size
    }

    /// Number of dirty pages (data or zeroed).
    pub fn dirty_pages(&self) -> usize {
        self.pages.len()
    }

    /// Bytes of memory the data pages hold.
    pub fn memory(&self) -> u64 {
        self.pages
            .values()
            .filter(|p| matches!(p, Page::Data(_)))
            .count() as u64
            * PAGE
    }

    /// The logical content of page `p` as it would read now (ignoring `size`).
    fn page_now(
        &self,
        p: u64,
        durable: &(impl Durable + ?Sized),
    ) -> std::io::Result<Box<[u8; PAGE_USIZE]>> {
        let mut buf = Box::new([0u8; PAGE_USIZE]);
        match self.pages.get(&p) {
            Some(Page::Data(d)) => buf.copy_from_slice(&d[..]),
            Some(Page::Zero) => {}
            None => {
                let start = p * PAGE;
                if start < self.floor {
                    let n = (self.floor - start).min(PAGE) as usize;
                    durable.read_at(&mut buf[..n], start)?;
                }
            }
        }
        Ok(buf)
    }

    /// Reads up to `len` bytes at `offset` (short at the end of the file).
    pub fn read(
        &self,
        offset: u64,
        len: usize,
        durable: &(impl Durable + ?Sized),
    ) -> std::io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = (offset + len as u64).min(self.size);
        let mut out = vec![0u8; (end - offset) as usize];
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let page_end = ((p + 1) * PAGE).min(end);
            let dst = &mut out[(at - offset) as usize..(page_end - offset) as usize];
            match self.pages.get(&p) {
                Some(Page::Data(d)) => {
                    let s = (at - p * PAGE) as usize;
                    dst.copy_from_slice(&d[s..s + dst.len()]);
                    at = page_end;
                }
                Some(Page::Zero) => at = page_end,
                None => {
                    // A run of pages the overlay does not hold: one read of the backing file,
                    // up to the next overlay page or the floor.
                    let next = self
                        .pages
                        .range(p + 1..)
                        .next()
                        .map_or(end, |(q, _)| (q * PAGE).min(end));
                    let run_end = next.min(self.floor.max(at));
                    if run_end > at {
                        let dst = &mut out[(at - offset) as usize..(run_end - offset) as usize];
                        durable.read_at(dst, at)?;
                    }
                    // Past the floor the bytes stay zero.
                    at = next;
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`, growing the file if it ends past the current size.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        durable: &(impl Durable + ?Sized),
    ) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let s = (at - p * PAGE) as usize;
            let n = ((p + 1) * PAGE).min(end) - at;
            let src = &data[(at - offset) as usize..(at - offset + n) as usize];
            if s == 0 && n == PAGE {
                let mut page = Box::new([0u8; PAGE_USIZE]);
                page.copy_from_slice(src);
                self.pages.insert(p, Page::Data(page));
            } else {
                let mut page = match self.pages.remove(&p) {
                    Some(Page::Data(d)) => d,
                    Some(Page::Zero) => Box::new([0u8; PAGE_USIZE]),
                    None => {
                        // Reads only below the floor, which is never above the size, so the
                        // bytes past the end of the file stay zero.
                        self.page_now(p, durable)?
                    }
                };
                page[s..s + n as usize].copy_from_slice(src);
                self.pages.insert(p, Page::Data(page));
            }
            at += n;
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// truncate/ftruncate.
    pub fn set_size(&mut self, size: u64) {
        if size < self.size {
            let first_gone = size.div_ceil(PAGE);
            let _ = self.pages.split_off(&first_gone);
            if !size.is_multiple_of(PAGE) {
                if let Some(Page::Data(d)) = self.pages.get_mut(&(size / PAGE)) {
                    d[(size % PAGE) as usize..].fill(0);
                }
            }
            self.floor = self.floor.min(size);
        }
        self.size = size;
    }

    /// Makes `[offset, offset+len)` read as zeroes (a punched hole or a zeroed range), within
    /// the current size. Whole pages become [`Page::Zero`].
    pub fn zero_range(
        &mut self,
        offset: u64,
        len: u64,
        durable: &(impl Durable + ?Sized),
    ) -> std::io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let s = (at - p * PAGE) as usize;
            let n = (((p + 1) * PAGE).min(end) - at) as usize;
            // The whole page, or all of it that is inside the file (bytes past the size are
            // zero anyway): it becomes a zeroed page.
            if s == 0 && (n == PAGE_USIZE || at + n as u64 == self.size) {
                self.pages.insert(p, Page::Zero);
            } else {
                match self.pages.get_mut(&p) {
                    Some(Page::Zero) => {}
                    Some(Page::Data(d)) => d[s..s + n].fill(0),
                    None => {
                        let mut d = self.page_now(p, durable)?;
                        d[s..s + n].fill(0);
                        self.pages.insert(p, Page::Data(d));
                    }
                }
            }
            at += n as u64;
        }
        Ok(())
    }

    /// fallocate without punching: only the size may change (the new part reads as zeroes).
    pub fn allocate(&mut self, offset: u64, len: u64, keep_size: bool) {
        if !keep_size && offset + len > self.size {
            self.size = offset + len;
        }
    }

    /// Whether `offset` is in data or a hole, and where that ends (SEEK_DATA/SEEK_HOLE).
    /// Only meaningful below `size`.
    pub fn extent(&self, offset: u64, durable: &(impl Durable + ?Sized)) -> (bool, u64) {
        let p = offset / PAGE;
        match self.pages.get(&p) {
            Some(Page::Data(_)) => (true, ((p + 1) * PAGE).min(self.size)),
            Some(Page::Zero) => (false, ((p + 1) * PAGE).min(self.size)),
            None => {
                let next = self
                    .pages
                    .range(p + 1..)
                    .next()
                    .map_or(self.size, |(q, _)| (q * PAGE).min(self.size));
                if offset >= self.floor {
                    (false, next)
                } else {
                    let (d, e) = durable.extent(offset, next.min(self.floor));
                    (d, e.clamp(offset + 1, next.min(self.floor).max(offset + 1)))
                }
            }
        }
    }

    /// SEEK_DATA: the first offset at or after `offset` that holds data, or `None` (ENXIO).
    pub fn seek_data(&self, offset: u64, durable: &(impl Durable + ?Sized)) -> Option<u64> {
        let mut at = offset;
        while at < self.size {
            let (data, end) = self.extent(at, durable);
            if data {
                return Some(at);
            }
            at = end.max(at + 1);
        }
        None
    }

    /// SEEK_HOLE: the first hole at or after `offset` (the end of the file counts as one), or
    /// `None` if `offset` is past the end (ENXIO).
    pub fn seek_hole(&self, offset: u64, durable: &(impl Durable + ?Sized)) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let mut at = offset;
        while at < self.size {
            let (data, end) = self.extent(at, durable);
            if !data {
                return Some(at);
            }
            at = end.max(at + 1);
        }
        Some(self.size)
    }

    /// What fsync/fdatasync does to the backing file: afterwards it holds exactly the logical
    /// content. Call [`Overlay::synced`] once the actions are done.
    pub fn sync_plan(&self) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.floor < self.durable_size {
            actions.push(Action::SetLen(self.floor));
        }
        let len_after_cut = self.floor.min(self.durable_size);
        let mut punch: Option<(u64, u64)> = None;
        for (&p, page) in &self.pages {
            let start = p * PAGE;
            let end = ((p + 1) * PAGE).min(self.size);
            if start >= end {
                continue;
            }
            match page {
                Page::Data(d) => {
                    actions.push(Action::Write(start, d[..(end - start) as usize].to_vec()));
                }
                Page::Zero => {
                    // Only what exists in the backing file needs punching; past its end the
                    // final SetLen makes zeroes.
                    let pend = end.min(len_after_cut);
                    if start < pend {
                        match &mut punch {
                            Some((ps, pe)) if *pe == start => *pe = pend,
                            _ => {
                                if let Some((ps, pe)) = punch.take() {
                                    actions.push(Action::Punch(ps, pe - ps));
                                }
                                punch = Some((start, pend));
                            }
                        }
                    }
                }
            }
        }
        if let Some((ps, pe)) = punch {
            actions.push(Action::Punch(ps, pe - ps));
        }
        // Writes may have grown the backing file only up to `size`; set the exact size.
        actions.push(Action::SetLen(self.size));
        actions
    }

    /// The overlay after its [`Overlay::sync_plan`] was carried out.
    pub fn synced(&mut self) {
        self.pages.clear();
        self.durable_size = self.size;
        self.floor = self.size;
    }

    /// A torn power loss: the pages `keep` picks (by page index, in ascending order) reach
    /// the backing file, the rest is lost; a pending truncation is lost too. The backing file
    /// grows if a kept page lies past its end (the gap reads as zeroes). Call
    /// [`Overlay::new`] on the result afterwards: the overlay itself is gone.
    pub fn torn_plan(&self, mut keep: impl FnMut(u64) -> bool) -> (Vec<Action>, usize, usize) {
        let mut actions = Vec::new();
        let (mut kept, mut dropped) = (0, 0);
        for (&p, page) in &self.pages {
            let start = p * PAGE;
            let end = ((p + 1) * PAGE).min(self.size);
            if start >= end {
                continue;
            }
            if !keep(p) {
                dropped += 1;
                continue;
            }
            kept += 1;
            match page {
                Page::Data(d) => {
                    actions.push(Action::Write(start, d[..(end - start) as usize].to_vec()))
                }
                Page::Zero => {
                    if start < self.durable_size {
                        let pend = end.min(self.durable_size);
                        actions.push(Action::Punch(start, pend - start));
                    }
                }
            }
        }
        (actions, kept, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator for the model tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The reference: a plain byte vector with the same operations.
    fn check_equal(ov: &Overlay, backing: &[u8], model: &[u8], what: &str) {
        assert_eq!(ov.size(), model.len() as u64, "{what}: size");
        let got = ov.read(0, model.len() + 100, backing).unwrap();
        assert!(
            got == model,
            "{what}: content differs at {:?}",
            got.iter().zip(model).position(|(a, b)| a != b)
        );
        // Unaligned reads too.
        if model.len() > 10 {
            let got = ov.read(3, model.len() - 7, backing).unwrap();
            assert_eq!(
                &got[..],
                &model[3..model.len() - 4],
                "{what}: unaligned read"
            );
        }
    }

    #[test]
    fn reads_see_the_backing_file_then_the_writes() {
        let backing: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut ov = Overlay::new(backing.len() as u64);
        assert!(!ov.is_dirty());
        check_equal(&ov, &backing, &backing, "clean");
        let mut model = backing.clone();
        ov.write(4000, &[7; 200], &backing[..]).unwrap();
        model[4000..4200].fill(7);
        check_equal(&ov, &backing, &model, "one write across a page boundary");
        assert_eq!(ov.dirty_pages(), 2);
        ov.write(9990, &[9; 30], &backing[..]).unwrap();
        model.resize(10_020, 0);
        model[9990..].fill(9);
        check_equal(&ov, &backing, &model, "a write that grows the file");
        assert!(ov.is_dirty());
    }

    #[test]
    fn truncate_then_grow_reads_zeroes_not_old_backing_data() {
        let backing = vec![0xAB; 20_000];
        let mut ov = Overlay::new(20_000);
        ov.set_size(5000);
        ov.set_size(18_000);
        let mut model = vec![0xAB; 5000];
        model.resize(18_000, 0);
        check_equal(&ov, &backing, &model, "truncated and grown");
        // A write into the straddling page keeps the zeroes past the old cut.
        ov.write(6000, &[1; 10], &backing[..]).unwrap();
        model[6000..6010].fill(1);
        check_equal(&ov, &backing, &model, "write after truncate");
        let mut file = backing.clone();
        apply_to_vec(&mut file, &ov.sync_plan());
        assert_eq!(file, model, "synced backing file");
        ov.synced();
        assert!(!ov.is_dirty());
        check_equal(&ov, &file, &model, "after sync");
    }

    #[test]
    fn truncate_inside_a_dirty_page_zeroes_its_tail() {
        let backing = vec![];
        let mut ov = Overlay::new(0);
        ov.write(0, &[5; 8192], &backing[..]).unwrap();
        ov.set_size(100);
        ov.set_size(8192);
        let mut model = vec![5u8; 100];
        model.resize(8192, 0);
        check_equal(&ov, &backing, &model, "dirty page cut and regrown");
    }

    #[test]
    fn punch_and_zero_ranges() {
        let backing = vec![3u8; 5 * PAGE_USIZE];
        let mut ov = Overlay::new(backing.len() as u64);
        let mut model = backing.clone();
        ov.zero_range(100, 2 * PAGE, &backing[..]).unwrap();
        model[100..100 + 2 * PAGE_USIZE].fill(0);
        check_equal(&ov, &backing, &model, "unaligned zero range");
        ov.zero_range(3 * PAGE, 10 * PAGE, &backing[..]).unwrap();
        model[3 * PAGE_USIZE..].fill(0);
        check_equal(
            &ov,
            &backing,
            &model,
            "zero range past the end keeps the size",
        );
        let mut file = backing.clone();
        let plan = ov.sync_plan();
        assert!(
            plan.iter().any(|a| matches!(a, Action::Punch(..))),
            "{plan:?}"
        );
        apply_to_vec(&mut file, &plan);
        assert_eq!(file, model);
    }

    #[test]
    fn seek_data_and_hole_combine_overlay_and_backing() {
        struct Sparse;
        impl Durable for Sparse {
            fn read_at(&self, buf: &mut [u8], _: u64) -> std::io::Result<usize> {
                buf.fill(0);
                Ok(buf.len())
            }
            fn extent(&self, offset: u64, limit: u64) -> (bool, u64) {
                // Data in [0, 2 pages), hole after.
                if offset < 2 * PAGE {
                    (true, (2 * PAGE).min(limit))
                } else {
                    (false, limit)
                }
            }
        }
        let mut ov = Overlay::new(10 * PAGE);
        ov.write(6 * PAGE, &[1; 10], &Sparse).unwrap();
        ov.zero_range(0, PAGE, &Sparse).unwrap();
        assert_eq!(ov.seek_data(0, &Sparse), Some(PAGE));
        assert_eq!(ov.seek_hole(PAGE, &Sparse), Some(2 * PAGE));
        assert_eq!(ov.seek_data(2 * PAGE, &Sparse), Some(6 * PAGE));
        assert_eq!(ov.seek_hole(6 * PAGE, &Sparse), Some(7 * PAGE));
        assert_eq!(ov.seek_data(7 * PAGE, &Sparse), None);
        assert_eq!(ov.seek_hole(0, &Sparse), Some(0));
        assert_eq!(ov.seek_hole(10 * PAGE, &Sparse), None);
    }

    #[test]
    fn torn_plan_keeps_exactly_the_chosen_pages() {
        let backing = vec![1u8; 4 * PAGE_USIZE];
        let mut ov = Overlay::new(backing.len() as u64);
        for p in 0..6u64 {
            ov.write(p * PAGE, &[10 + p as u8; PAGE_USIZE], &backing[..])
                .unwrap();
        }
        let (plan, kept, dropped) = ov.torn_plan(|p| p % 2 == 1);
        assert_eq!((kept, dropped), (3, 3));
        let mut file = backing.clone();
        apply_to_vec(&mut file, &plan);
        // Pages 1, 3, 5 are new; 0 and 2 old; 4 never existed and reads as zero (the gap up
        // to the kept page 5).
        assert_eq!(file.len(), 6 * PAGE_USIZE);
        for p in 0..6usize {
            let want = match p {
                1 | 3 | 5 => 10 + p as u8,
                0 | 2 => 1,
                _ => 0,
            };
            assert!(
                file[p * PAGE_USIZE..(p + 1) * PAGE_USIZE]
                    .iter()
                    .all(|&b| b == want),
                "page {p}"
            );
        }
    }

    #[test]
    fn torn_plan_drops_pending_truncation() {
        let backing = vec![1u8; 3 * PAGE_USIZE];
        let mut ov = Overlay::new(backing.len() as u64);
        ov.set_size(10);
        let (plan, kept, dropped) = ov.torn_plan(|_| true);
        assert_eq!((kept, dropped), (0, 0));
        let mut file = backing.clone();
        apply_to_vec(&mut file, &plan);
        assert_eq!(
            file, backing,
            "a torn crash never applies an unsynced truncate"
        );
    }

    /// Random operations against a byte-vector model: reads always match, and the sync plan
    /// turns the backing file into exactly the logical content.
    #[test]
    fn random_operations_match_a_plain_vector() {
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let init = rng.below(6 * PAGE) as usize;
            let mut backing: Vec<u8> = (0..init).map(|i| (i as u8).wrapping_mul(31) | 1).collect();
            let mut ov = Overlay::new(backing.len() as u64);
            let mut model = backing.clone();
            for step in 0..60 {
                let what = format!("seed {seed} step {step}");
                match rng.below(10) {
                    0..=3 => {
                        let off = rng.below(8 * PAGE);
                        let len = rng.below(3 * PAGE) as usize + 1;
                        let byte = rng.below(255) as u8 + 1;
                        ov.write(off, &vec![byte; len], &backing[..]).unwrap();
                        let end = off as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].fill(byte);
                    }
                    4 => {
                        let s = rng.below(8 * PAGE);
                        ov.set_size(s);
                        model.resize(s as usize, 0);
                    }
                    5 => {
                        let off = rng.below(8 * PAGE);
                        let len = rng.below(4 * PAGE) + 1;
                        ov.zero_range(off, len, &backing[..]).unwrap();
                        let start = (off as usize).min(model.len());
                        let end = ((off + len) as usize).min(model.len());
                        model[start..end].fill(0);
                    }
                    6 => {
                        let off = rng.below(8 * PAGE);
                        let len = rng.below(2 * PAGE) + 1;
                        ov.allocate(off, len, false);
                        if model.len() < (off + len) as usize {
                            model.resize((off + len) as usize, 0);
                        }
                    }
                    7 => {
                        apply_to_vec(&mut backing, &ov.sync_plan());
                        ov.synced();
                        assert_eq!(backing, model, "{what}: backing after sync");
                    }
                    8 => {
                        // A torn crash: the result is a mix, page by page, of old and new.
                        let old = backing.clone();
                        let mut file = backing.clone();
                        let mut r = Rng(rng.next() | 1);
                        let (plan, _, _) = ov.torn_plan(|_| r.below(2) == 0);
                        apply_to_vec(&mut file, &plan);
                        for (i, chunk) in file.chunks(PAGE_USIZE).enumerate() {
                            let s = i * PAGE_USIZE;
                            let old_page =
                                old.get(s..(s + chunk.len()).min(old.len())).unwrap_or(&[]);
                            let new_page = model
                                .get(s..(s + chunk.len()).min(model.len()))
                                .unwrap_or(&[]);
                            let pad = |p: &[u8]| {
                                let mut v = p.to_vec();
                                v.resize(chunk.len(), 0);
                                v
                            };
                            // A kept last page of the file is written only up to the
                            // size; a lost truncation leaves the old bytes after it.
                            let mut mixed = pad(old_page);
                            mixed[..new_page.len()].copy_from_slice(new_page);
                            assert!(
                                chunk == &pad(old_page)[..]
                                    || chunk == &pad(new_page)[..]
                                    || chunk == &mixed[..],
                                "{what}: torn page {i} is neither old nor new"
                            );
                        }
                    }
                    _ => {}
                }
                check_equal(&ov, &backing, &model, &what);
                // SEEK_HOLE/SEEK_DATA agree with the content: data regions may hold zeroes,
                // holes never hold anything else.
                let mut at = 0;
                while let Some(d) = ov.seek_data(at, &backing[..]) {
                    assert!(
                        model[at as usize..d as usize].iter().all(|&b| b == 0),
                        "{what}: hole with data"
                    );
                    at = ov.seek_hole(d, &backing[..]).unwrap();
                    assert!(at > d);
                }
            }
        }
    }
}
