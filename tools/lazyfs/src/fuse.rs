//! The FUSE adapter: each request locks the [`State`], runs one operation and replies.
//!
//! Every file is opened with `FOPEN_DIRECT_IO`, so the kernel keeps no page cache for it:
//! each read and write (including io_uring's, which the kernel turns into ordinary FUSE
//! requests, and O_DIRECT ones) reaches the overlay, and nothing stale survives a crash in
//! the kernel. Entry and attribute timeouts are zero for the same reason: after a crash the
//! kernel asks again and sees BACKING_DIR's view. flock is left to the kernel (FUSE's local
//! locks work across processes on one mount, which is all the store needs).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};

use crate::state::{Attr, Kind, State, R};

const TTL: Duration = Duration::ZERO;

pub struct LazyFs {
    state: Mutex<State>,
}

impl LazyFs {
    pub fn new(state: State) -> LazyFs {
        LazyFs {
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configured delay before a sync, slept without holding the lock.
    fn sync_delay(&self) {
        let d = self.lock().sync_delay;
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Sends what a state operation returned as its FUSE reply: the value, or the errno.
trait Answer<T> {
    fn answer(self, result: R<T>);
}

impl Answer<Attr> for ReplyEntry {
    fn answer(self, result: R<Attr>) {
        match result {
            Ok(a) => self.entry(&TTL, &to_fuse(&a), Generation(0)),
            Err(e) => self.error(err(e)),
        }
    }
}

impl Answer<Attr> for ReplyAttr {
    fn answer(self, result: R<Attr>) {
        match result {
            Ok(a) => self.attr(&TTL, &to_fuse(&a)),
            Err(e) => self.error(err(e)),
        }
    }
}

impl Answer<()> for ReplyEmpty {
    fn answer(self, result: R<()>) {
        match result {
            Ok(()) => self.ok(),
            Err(e) => self.error(err(e)),
        }
    }
}

impl Answer<Vec<u8>> for ReplyData {
    fn answer(self, result: R<Vec<u8>>) {
        match result {
            Ok(d) => self.data(&d),
            Err(e) => self.error(err(e)),
        }
    }
}

impl Answer<u32> for ReplyWrite {
    fn answer(self, result: R<u32>) {
        match result {
            Ok(n) => self.written(n),
            Err(e) => self.error(err(e)),
        }
    }
}

impl Answer<i64> for ReplyLseek {
    fn answer(self, result: R<i64>) {
        match result {
            Ok(o) => self.offset(o),
            Err(e) => self.error(err(e)),
        }
    }
}

/// An opened handle and the open flags to reply with.
impl Answer<(u64, FopenFlags)> for ReplyOpen {
    fn answer(self, result: R<(u64, FopenFlags)>) {
        match result {
            Ok((fh, flags)) => self.opened(FileHandle(fh), flags),
            Err(e) => self.error(err(e)),
        }
    }
}

const OPEN_FLAGS: FopenFlags =
    FopenFlags::FOPEN_DIRECT_IO.union(FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        Ok(())
    }

    fn destroy(&mut self) {
        let mut s = self.lock();
        if let Err(e) = s.shutdown() {
            eprintln!(
                "blockrep-lazyfs: making everything durable at unmount failed: {}",
                std::io::Error::from_raw_os_error(e)
            );
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply.answer(self.lock().lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.lock().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.answer(self.lock().attr(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.answer(self.lock().setattr(
            ino.0,
            mode,
            uid,
            gid,
            size,
            atime.map(time),
            mtime.map(time),
        ));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        use std::os::unix::ffi::OsStringExt;
        reply.answer(
            self.lock()
                .readlink(ino.0)
                .map(|t| t.into_os_string().into_vec()),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        reply.answer(
            self.lock()
                .create_file(parent.0, name, mode & !umask, req.uid(), req.gid()),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply.answer(
            self.lock()
                .mkdir(parent.0, name, mode & !umask, req.uid(), req.gid()),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.answer(self.lock().unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.answer(self.lock().rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply.answer(
            self.lock()
                .symlink(parent.0, link_name, target, req.uid(), req.gid()),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        reply.answer(
            self.lock()
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.answer(self.lock().link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.answer(self.lock().open(ino.0).map(|fh| (fh, OPEN_FLAGS)));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply.answer(self.lock().read(fh.0, offset, size));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        // `crash ... when-dirty`: wait (up to 10 s) until some file has unsynced pages, then
        // crash at once, under the same lock, so the power loss meets writes in flight.
        if s.is_control(fh.0) && data.windows(10).any(|w| w == b"when-dirty") {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while s.dirty_pages() == 0 && std::time::Instant::now() < deadline {
                drop(s);
                std::thread::sleep(Duration::from_micros(200));
                s = self.lock();
            }
        }
        reply.answer(s.write(fh.0, offset, data));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a sync.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fsync and fdatasync are the same here: data and size, never names.
        self.sync_delay();
        reply.answer(self.lock().fsync_handle(fh.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.answer(
            self.lock()
                .opendir(ino.0)
                .map(|fh| (fh, FopenFlags::empty())),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.lock().readdir(fh.0, offset) {
            Ok(entries) => {
                for (ino, next, kind, name) in entries {
                    if reply.add(INodeNo(ino), next, file_type(kind), &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.answer(self.lock().fsync_dir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.lock().statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let created = s
            .create_file(parent.0, name, mode & !umask, req.uid(), req.gid())
            .and_then(|a| s.open(a.ino).map(|fh| (a, fh)));
        match created {
            Ok((a, fh)) => reply.created(
                &TTL,
                &to_fuse(&a),
                Generation(0),
                FileHandle(fh),
                OPEN_FLAGS,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.answer(self.lock().fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        reply.answer(self.lock().lseek(fh.0, offset, whence));
    }
}
