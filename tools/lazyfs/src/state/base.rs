//! [`State`] itself: the inode and handle tables, the descriptors on BACKING_DIR and its
//! staging directory, and the lookups every operation goes through.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::inode::{Attr, Body, DirBody, FileBody, Handle, Inode, Kind, Loc, Meta};
use crate::sys;

pub const ROOT: u64 = 1;

/// The control file's inode (see `control.rs`).
pub const CONTROL_INO: u64 = 2;

pub const CONTROL_NAME: &str = ".lazyfs-control";

pub const STAGING_NAME: &str = ".lazyfs-staging";

/// An errno.
pub type Errno = i32;

pub type R<T> = Result<T, Errno>;

pub(super) fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

pub struct State {
    pub(super) backing: PathBuf,
    pub(super) root_fd: OwnedFd,
    pub(super) staging_fd: OwnedFd,
    pub(super) inodes: HashMap<u64, Inode>,
    pub(super) next_ino: u64,
    pub(super) handles: HashMap<u64, Handle>,
    pub(super) next_fh: u64,
    /// Crashes so far.
    pub generation: u64,
    /// Also fsync BACKING_DIR's files (only needed if BACKING_DIR must survive a real power
    /// loss; the simulated one never touches it).
    pub sync_backing: bool,
    /// Every fsync/fdatasync/directory fsync first waits this long (outside the lock), like
    /// a slow disk: a crash then often lands while a sync is on its way, with the writes it
    /// covers already made.
    pub sync_delay: Duration,
}

pub(super) fn staged_file_name(ino: u64) -> OsString {
    format!("f-{ino}").into()
}

pub(super) fn staged_dir_name(ino: u64) -> OsString {
    format!("d-{ino}").into()
}

impl State {
    /// Serves BACKING_DIR. Leftovers of an earlier run in the staging directory are removed
    /// (they are what a crash of that run would have lost).
    pub fn new(backing: &Path) -> io::Result<State> {
        let backing = backing.canonicalize()?;
        let root_fd = sys::open_dir(&backing)?;
        let staging_fd = Self::fresh_staging(&backing)?;
        let st = sys::fstat(&root_fd)?;
        let mut s = State {
            backing,
            root_fd,
            staging_fd,
            inodes: HashMap::new(),
            next_ino: CONTROL_INO + 1,
            handles: HashMap::new(),
            next_fh: 1,
            generation: 0,
            sync_backing: false,
            sync_delay: Duration::ZERO,
        };
        s.insert_root(&st)?;
        Ok(s)
    }

    pub(super) fn fresh_staging(backing: &Path) -> io::Result<OwnedFd> {
        let staging = backing.join(STAGING_NAME);
        match std::fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir(&staging)?;
        sys::open_dir(&staging)
    }

    pub(super) fn insert_root(&mut self, st: &libc::stat) -> io::Result<()> {
        let fd = sys::open_dir(&self.backing)?;
        let body = Body::Dir(DirBody::new(fd, Loc::Root, false, None));
        // The kernel holds the root without ever looking it up.
        self.inodes
            .insert(ROOT, Inode::new(body, Meta::from_stat(st), 1));
        Ok(())
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub(super) fn alloc_ino(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    pub(super) fn inode(&self, ino: u64) -> R<&Inode> {
        self.inodes.get(&ino).ok_or(libc::EIO)
    }

    pub(super) fn inode_mut(&mut self, ino: u64) -> R<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::EIO)
    }

    pub(super) fn dir(&self, ino: u64) -> R<&DirBody> {
        match &self.inode(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    pub(super) fn dir_mut(&mut self, ino: u64) -> R<&mut DirBody> {
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    pub(super) fn file_mut(&mut self, ino: u64) -> R<&mut FileBody> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::EINVAL),
        }
    }

    pub(super) fn dir_is_live(&self, ino: u64) -> bool {
        ino == ROOT || matches!(self.dir(ino), Ok(d) if d.parent.is_some())
    }

    pub fn attr(&self, ino: u64) -> R<Attr> {
        if ino == CONTROL_INO {
            let now = SystemTime::now();
            return Ok(Attr {
                ino,
                kind: Kind::File,
                size: 0,
                blocks: 0,
                perm: 0o600,
                nlink: 1,
                uid: 0,
                gid: 0,
                atime: now,
                mtime: now,
                ctime: now,
            });
        }
        let i = self.inode(ino)?;
        let (size, nlink) = match &i.body {
            Body::File(f) => (f.ov.size(), i.nlink),
            Body::Dir(d) => (
                4096,
                if d.parent.is_some() || ino == ROOT {
                    2
                } else {
                    0
                },
            ),
            Body::Symlink(t) => (t.as_os_str().len() as u64, i.nlink),
        };
        Ok(Attr {
            ino,
            kind: i.kind(),
            size,
            blocks: size.div_ceil(512),
            perm: i.meta.perm as u16,
            nlink,
            uid: i.meta.uid,
            gid: i.meta.gid,
            atime: i.meta.atime,
            mtime: i.meta.mtime,
            ctime: i.meta.ctime,
        })
    }

    pub fn statfs(&self) -> R<libc::statvfs> {
        sys::statvfs(&self.root_fd).map_err(errno)
    }
}
