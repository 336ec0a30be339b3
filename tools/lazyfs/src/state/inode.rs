//! What the view holds per inode and per open handle: plain data, no operations on
//! BACKING_DIR.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::overlay::Overlay;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// What `getattr` and friends report.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) perm: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) atime: SystemTime,
    pub(super) mtime: SystemTime,
    pub(super) ctime: SystemTime,
}

pub(super) fn time_of(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

impl Meta {
    pub(super) fn from_stat(st: &libc::stat) -> Meta {
        Meta {
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: time_of(st.st_atime, st.st_atime_nsec),
            mtime: time_of(st.st_mtime, st.st_mtime_nsec),
            ctime: time_of(st.st_ctime, st.st_ctime_nsec),
        }
    }

    pub(super) fn new(perm: u32, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm: perm & 0o7777,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    pub(super) fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// Where a directory's backing directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Loc {
    Root,
    /// In the staging directory under this name (not reachable from BACKING_DIR's tree).
    Staging(OsString),
    /// A durable entry of this directory inode, under this name.
    In(u64, OsString),
    /// Removed from BACKING_DIR.
    Gone,
}

pub(super) struct FileBody {
    pub(super) fd: File,
    pub(super) ov: Overlay,
}

pub(super) struct DirBody {
    pub(super) fd: Option<OwnedFd>,
    pub(super) loc: Loc,
    /// Entries read from BACKING_DIR yet (they are read on first use).
    pub(super) loaded: bool,
    pub(super) live: BTreeMap<OsString, u64>,
    pub(super) durable: BTreeMap<OsString, (u64, Kind)>,
    /// Where the view has this directory (`None` once removed; always `None` for the root).
    pub(super) parent: Option<(u64, OsString)>,
}

pub(super) enum Body {
    File(FileBody),
    Dir(DirBody),
    Symlink(PathBuf),
}

pub(super) struct Inode {
    pub(super) body: Body,
    /// Live names (files and symlinks).
    pub(super) nlink: u32,
    /// The kernel's lookup count.
    pub(super) lookups: u64,
    /// Open handles.
    pub(super) open: u32,
    pub(super) meta: Meta,
}

impl DirBody {
    /// A directory backed at `loc`, no entries known yet; `loaded` says there are none to
    /// read from BACKING_DIR either.
    pub(super) fn new(
        fd: OwnedFd,
        loc: Loc,
        loaded: bool,
        parent: Option<(u64, OsString)>,
    ) -> DirBody {
        DirBody {
            fd: Some(fd),
            loc,
            loaded,
            live: BTreeMap::new(),
            durable: BTreeMap::new(),
            parent,
        }
    }
}

impl Inode {
    /// An inode with one name, `lookups` references held by the kernel and no open handles.
    pub(super) fn new(body: Body, meta: Meta, lookups: u64) -> Inode {
        Inode {
            body,
            nlink: 1,
            lookups,
            open: 0,
            meta,
        }
    }

    pub(super) fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
            Body::Symlink(_) => Kind::Symlink,
        }
    }
}

pub(super) enum HandleKind {
    File,
    Dir(Vec<(u64, Kind, OsString)>),
    Control(Vec<u8>),
}

pub(super) struct Handle {
    pub(super) ino: u64,
    pub(super) kind: HandleKind,
}
