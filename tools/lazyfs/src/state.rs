//! The filesystem's state: inodes, the live namespace, what of it is durable, and the
//! operations on them. No FUSE here (see `fuse.rs` for the adapter), so the rules can be
//! tested by calling these methods on a temporary backing directory.
//!
//! # Model
//!
//! * Every regular file the view knows holds an open descriptor on a *backing inode* in
//!   BACKING_DIR and an [`Overlay`] of unsynced changes. fsync/fdatasync writes the overlay
//!   into the backing inode; nothing else ever writes file data to BACKING_DIR.
//! * Every directory holds its *live* entries (what the view shows) and its *durable* entries
//!   (what BACKING_DIR holds under it). fsync of the directory makes the durable entries equal
//!   the live ones: it removes, links and renames entries in BACKING_DIR.
//! * Names and data are independent, as in a real filesystem: a file created, written and
//!   fsynced whose directory was never fsynced is lost by a crash; a name made durable for a
//!   file whose data was never fsynced comes back empty.
//! * So that a backing inode survives while no durable name refers to it (a new file, or one
//!   whose only durable name was unlinked), each one also has a hard link in the hidden
//!   BACKING_DIR/.lazyfs-staging; new directories live there until a fsync of their parent
//!   moves them into place. A crash empties the staging directory: what only it held is
//!   gone, exactly like an inode no durable directory entry points to.
//! * A crash drops every overlay (or, torn, writes a random subset of each file's dirty pages
//!   first), forgets every inode and open handle (operations on them fail with EIO from then
//!   on), empties the staging directory, and reloads the view from BACKING_DIR.
//! * Attributes (mode, owner, timestamps) go to BACKING_DIR at once; only data, sizes and
//!   names are lazy.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::overlay::{Action, Overlay};
use crate::sys;

pub const ROOT: u64 = 1;
/// The control file's inode (see `control.rs`).
pub const CONTROL_INO: u64 = 2;
pub const CONTROL_NAME: &str = ".lazyfs-control";
pub const STAGING_NAME: &str = ".lazyfs-staging";

/// An errno.
pub type Errno = i32;
pub type R<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

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
struct Meta {
    perm: u32,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

fn time_of(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

impl Meta {
    fn from_stat(st: &libc::stat) -> Meta {
        Meta {
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: time_of(st.st_atime, st.st_atime_nsec),
            mtime: time_of(st.st_mtime, st.st_mtime_nsec),
            ctime: time_of(st.st_ctime, st.st_ctime_nsec),
        }
    }

    fn new(perm: u32, uid: u32, gid: u32) -> Meta {
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

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// Where a directory's backing directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loc {
    Root,
    /// In the staging directory under this name (not reachable from BACKING_DIR's tree).
    Staging(OsString),
    /// A durable entry of this directory inode, under this name.
    In(u64, OsString),
    /// Removed from BACKING_DIR.
    Gone,
}

struct FileBody {
    fd: File,
    ov: Overlay,
}

struct DirBody {
    fd: Option<OwnedFd>,
    loc: Loc,
    /// Entries read from BACKING_DIR yet (they are read on first use).
    loaded: bool,
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, (u64, Kind)>,
    /// Where the view has this directory (`None` once removed; always `None` for the root).
    parent: Option<(u64, OsString)>,
}

enum Body {
    File(FileBody),
    Dir(DirBody),
    Symlink(PathBuf),
}

struct Inode {
    body: Body,
    /// Live names (files and symlinks).
    nlink: u32,
    /// The kernel's lookup count.
    lookups: u64,
    /// Open handles.
    open: u32,
    meta: Meta,
}

impl Inode {
    fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
            Body::Symlink(_) => Kind::Symlink,
        }
    }
}

enum HandleKind {
    File,
    Dir(Vec<(u64, Kind, OsString)>),
    Control(Vec<u8>),
}

struct Handle {
    ino: u64,
    kind: HandleKind,
}

/// What a crash did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub generation: u64,
    pub torn: bool,
    pub seed: u64,
    /// Dirty files at the crash.
    pub files: usize,
    pub kept_pages: usize,
    pub dropped_pages: usize,
    /// Directory entries whose change had not been made durable.
    pub dropped_names: usize,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "crashed generation={} torn={} seed={} dirty_files={} kept_pages={} dropped_pages={} dropped_names={}",
            self.generation, self.torn, self.seed, self.files, self.kept_pages, self.dropped_pages, self.dropped_names
        )
    }
}

/// splitmix64: small, seedable, good enough to pick pages.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

pub struct State {
    backing: PathBuf,
    root_fd: OwnedFd,
    staging_fd: OwnedFd,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
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

fn staged_file_name(ino: u64) -> OsString {
    format!("f-{ino}").into()
}

fn staged_dir_name(ino: u64) -> OsString {
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

    fn fresh_staging(backing: &Path) -> io::Result<OwnedFd> {
        let staging = backing.join(STAGING_NAME);
        match std::fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir(&staging)?;
        sys::open_dir(&staging)
    }

    fn insert_root(&mut self, st: &libc::stat) -> io::Result<()> {
        let fd = sys::open_dir(&self.backing)?;
        self.inodes.insert(
            ROOT,
            Inode {
                body: Body::Dir(DirBody {
                    fd: Some(fd),
                    loc: Loc::Root,
                    loaded: false,
                    live: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: None,
                }),
                nlink: 1,
                lookups: 1,
                open: 0,
                meta: Meta::from_stat(st),
            },
        );
        Ok(())
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    fn alloc_ino(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    fn inode(&self, ino: u64) -> R<&Inode> {
        self.inodes.get(&ino).ok_or(libc::EIO)
    }

    fn inode_mut(&mut self, ino: u64) -> R<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::EIO)
    }

    fn dir(&self, ino: u64) -> R<&DirBody> {
        match &self.inode(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> R<&mut DirBody> {
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> R<&mut FileBody> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::EINVAL),
        }
    }

    fn dir_is_live(&self, ino: u64) -> bool {
        ino == ROOT || matches!(self.dir(ino), Ok(d) if d.parent.is_some())
    }

    /// Reads a directory's entries from BACKING_DIR the first time it is used.
    fn ensure_loaded(&mut self, dir: u64) -> R<()> {
        let d = self.dir(dir)?;
        if d.loaded {
            return Ok(());
        }
        let Some(fd) = d.fd.as_ref() else {
            self.dir_mut(dir)?.loaded = true;
            return Ok(());
        };
        let fd = fd.try_clone().map_err(errno)?;
        let mut entries: Vec<(OsString, u64, Kind)> = Vec::new();
        let mut new_inodes: Vec<(u64, Inode)> = Vec::new();
        for ent in std::fs::read_dir(sys::proc_path(&fd)).map_err(errno)? {
            let ent = ent.map_err(errno)?;
            let name = ent.file_name();
            if dir == ROOT && (name == STAGING_NAME || name == CONTROL_NAME) {
                continue;
            }
            let st = match sys::lstat_at(&fd, &name) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(errno(e)),
            };
            let ino = self.alloc_ino();
            let meta = Meta::from_stat(&st);
            let (body, kind) = match st.st_mode & libc::S_IFMT {
                libc::S_IFREG => {
                    let f = sys::open_file_at(&fd, &name, None).map_err(errno)?;
                    // The staging link keeps the inode if its durable names go away.
                    sys::link_at(&fd, &name, &self.staging_fd, &staged_file_name(ino))
                        .map_err(errno)?;
                    let size = f.metadata().map_err(errno)?.len();
                    (
                        Body::File(FileBody {
                            fd: f,
                            ov: Overlay::new(size),
                        }),
                        Kind::File,
                    )
                }
                libc::S_IFDIR => (
                    Body::Dir(DirBody {
                        fd: Some(sys::open_dir_at(&fd, &name).map_err(errno)?),
                        loc: Loc::In(dir, name.clone()),
                        loaded: false,
                        live: BTreeMap::new(),
                        durable: BTreeMap::new(),
                        parent: Some((dir, name.clone())),
                    }),
                    Kind::Dir,
                ),
                libc::S_IFLNK => (
                    Body::Symlink(sys::readlink_at(&fd, &name).map_err(errno)?),
                    Kind::Symlink,
                ),
                _ => continue, // fifos, sockets, devices: not served
            };
            entries.push((name, ino, kind));
            new_inodes.push((
                ino,
                Inode {
                    body,
                    nlink: 1,
                    lookups: 0,
                    open: 0,
                    meta,
                },
            ));
        }
        self.inodes.extend(new_inodes);
        let d = self.dir_mut(dir)?;
        for (name, ino, kind) in entries {
            d.live.insert(name.clone(), ino);
            d.durable.insert(name, (ino, kind));
        }
        d.loaded = true;
        Ok(())
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

    fn check_name(parent: u64, name: &OsStr) -> R<()> {
        if name.is_empty() || name == "." || name == ".." {
            return Err(libc::EINVAL);
        }
        if parent == ROOT && (name == STAGING_NAME || name == CONTROL_NAME) {
            return Err(libc::EPERM);
        }
        Ok(())
    }

    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> R<Attr> {
        if parent == ROOT && name == CONTROL_NAME {
            return self.attr(CONTROL_INO);
        }
        self.ensure_loaded(parent)?;
        let ino = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        self.inode_mut(ino)?.lookups += 1;
        self.attr(ino)
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT || ino == CONTROL_INO {
            return;
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
            self.maybe_drop(ino);
        }
    }

    /// Forgets an inode the view no longer reaches and the kernel no longer holds.
    fn maybe_drop(&mut self, ino: u64) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if ino == ROOT || i.lookups > 0 || i.open > 0 {
            return;
        }
        match &i.body {
            Body::File(_) | Body::Symlink(_) => {
                if i.nlink > 0 {
                    return;
                }
                let is_file = matches!(i.body, Body::File(_));
                self.inodes.remove(&ino);
                if is_file {
                    let _ = sys::unlink_at(&self.staging_fd, &staged_file_name(ino));
                }
            }
            Body::Dir(d) => {
                if d.parent.is_some() {
                    return;
                }
                match d.loc.clone() {
                    // Never durable: nothing of it can survive.
                    Loc::Staging(_) => {
                        let _ = self.remove_backing_dir(ino);
                        self.inodes.remove(&ino);
                    }
                    Loc::Gone => {
                        self.inodes.remove(&ino);
                    }
                    // Its parent's fsync removes it from BACKING_DIR; until then the inode
                    // stays (directories moved out of it may still be inside it there).
                    Loc::In(..) | Loc::Root => {}
                }
            }
        }
    }

    // ------------------------------------------------------------------- namespace

    fn new_entry_checks(&mut self, parent: u64, name: &OsStr) -> R<()> {
        Self::check_name(parent, name)?;
        self.ensure_loaded(parent)?;
        if !self.dir_is_live(parent) {
            return Err(libc::ENOENT);
        }
        if self.dir(parent)?.live.contains_key(name) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    fn add_live(&mut self, parent: u64, name: &OsStr, ino: u64) -> R<()> {
        let p = self.inode_mut(parent)?;
        p.meta.touch();
        match &mut p.body {
            Body::Dir(d) => {
                d.live.insert(name.to_os_string(), ino);
                Ok(())
            }
            _ => Err(libc::ENOTDIR),
        }
    }

    /// create/mknod of a regular file. Returns its attributes (lookup count taken).
    pub fn create_file(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> R<Attr> {
        self.new_entry_checks(parent, name)?;
        let ino = self.alloc_ino();
        let f = sys::open_file_at(
            &self.staging_fd,
            &staged_file_name(ino),
            Some(mode & 0o7777),
        )
        .map_err(errno)?;
        let _ = sys::fchown(&f, Some(uid), Some(gid));
        self.inodes.insert(
            ino,
            Inode {
                body: Body::File(FileBody {
                    fd: f,
                    ov: Overlay::new(0),
                }),
                nlink: 1,
                lookups: 1,
                open: 0,
                meta: Meta::new(mode, uid, gid),
            },
        );
        self.add_live(parent, name, ino)?;
        self.attr(ino)
    }

    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32, uid: u32, gid: u32) -> R<Attr> {
        self.new_entry_checks(parent, name)?;
        let ino = self.alloc_ino();
        let sname = staged_dir_name(ino);
        sys::mkdir_at(&self.staging_fd, &sname, mode & 0o7777).map_err(errno)?;
        let fd = sys::open_dir_at(&self.staging_fd, &sname).map_err(errno)?;
        let _ = sys::fchown(&fd, Some(uid), Some(gid));
        self.inodes.insert(
            ino,
            Inode {
                body: Body::Dir(DirBody {
                    fd: Some(fd),
                    loc: Loc::Staging(sname),
                    loaded: true,
                    live: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: Some((parent, name.to_os_string())),
                }),
                nlink: 1,
                lookups: 1,
                open: 0,
                meta: Meta::new(mode, uid, gid),
            },
        );
        self.add_live(parent, name, ino)?;
        self.attr(ino)
    }

    pub fn symlink(
        &mut self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> R<Attr> {
        self.new_entry_checks(parent, name)?;
        let ino = self.alloc_ino();
        self.inodes.insert(
            ino,
            Inode {
                body: Body::Symlink(target.to_path_buf()),
                nlink: 1,
                lookups: 1,
                open: 0,
                meta: Meta::new(0o777, uid, gid),
            },
        );
        self.add_live(parent, name, ino)?;
        self.attr(ino)
    }

    pub fn readlink(&self, ino: u64) -> R<PathBuf> {
        match &self.inode(ino)?.body {
            Body::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> R<Attr> {
        if matches!(self.inode(ino)?.body, Body::Dir(_)) {
            return Err(libc::EPERM);
        }
        self.new_entry_checks(parent, name)?;
        let i = self.inode_mut(ino)?;
        i.nlink += 1;
        i.lookups += 1;
        i.meta.ctime = SystemTime::now();
        self.add_live(parent, name, ino)?;
        self.attr(ino)
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> R<()> {
        self.ensure_loaded(parent)?;
        let ino = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        if matches!(self.inode(ino)?.body, Body::Dir(_)) {
            return Err(libc::EISDIR);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.inode_mut(parent)?.meta.touch();
        let i = self.inode_mut(ino)?;
        i.nlink = i.nlink.saturating_sub(1);
        i.meta.ctime = SystemTime::now();
        self.maybe_drop(ino);
        Ok(())
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> R<()> {
        self.ensure_loaded(parent)?;
        let ino = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        self.ensure_loaded(ino)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.inode_mut(parent)?.meta.touch();
        self.dir_mut(ino)?.parent = None;
        self.maybe_drop(ino);
        Ok(())
    }

    /// Whether `dir` is `ancestor` or inside it, in the view.
    fn is_within(&self, mut dir: u64, ancestor: u64) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            match self.dir(dir).ok().and_then(|d| d.parent.clone()) {
                Some((p, _)) => dir = p,
                None => return false,
            }
        }
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> R<()> {
        Self::check_name(newparent, newname)?;
        self.ensure_loaded(parent)?;
        self.ensure_loaded(newparent)?;
        let src = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        let dst = self.dir(newparent)?.live.get(newname).copied();
        let src_dir = matches!(self.inode(src)?.body, Body::Dir(_));
        if src_dir && self.is_within(newparent, src) {
            return Err(libc::EINVAL);
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(libc::ENOENT)?;
            if matches!(self.inode(dst)?.body, Body::Dir(_)) && self.is_within(parent, dst) {
                return Err(libc::EINVAL);
            }
            self.dir_mut(parent)?.live.insert(name.to_os_string(), dst);
            self.dir_mut(newparent)?
                .live
                .insert(newname.to_os_string(), src);
            if let Ok(d) = self.dir_mut(src) {
                d.parent = Some((newparent, newname.to_os_string()));
            }
            if let Ok(d) = self.dir_mut(dst) {
                d.parent = Some((parent, name.to_os_string()));
            }
            self.inode_mut(parent)?.meta.touch();
            self.inode_mut(newparent)?.meta.touch();
            return Ok(());
        }
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            if d == src {
                return Ok(());
            }
            let dst_dir = matches!(self.inode(d)?.body, Body::Dir(_));
            if src_dir && !dst_dir {
                return Err(libc::ENOTDIR);
            }
            if !src_dir && dst_dir {
                return Err(libc::EISDIR);
            }
            if dst_dir {
                self.ensure_loaded(d)?;
                if !self.dir(d)?.live.is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
            }
        }
        self.dir_mut(parent)?.live.remove(name);
        self.dir_mut(newparent)?
            .live
            .insert(newname.to_os_string(), src);
        if let Ok(d) = self.dir_mut(src) {
            d.parent = Some((newparent, newname.to_os_string()));
        }
        self.inode_mut(src)?.meta.ctime = SystemTime::now();
        self.inode_mut(parent)?.meta.touch();
        self.inode_mut(newparent)?.meta.touch();
        if let Some(d) = dst {
            match &mut self.inode_mut(d)?.body {
                Body::Dir(db) => db.parent = None,
                _ => {
                    let i = self.inode_mut(d)?;
                    i.nlink = i.nlink.saturating_sub(1);
                }
            }
            self.maybe_drop(d);
        }
        Ok(())
    }

    // ------------------------------------------------------------------- handles

    fn new_handle(&mut self, ino: u64, kind: HandleKind) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, kind });
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.open += 1;
        }
        fh
    }

    fn handle_ino(&self, fh: u64) -> R<u64> {
        // A handle from before a crash is gone: EIO, as from a disk that lost power.
        self.handles.get(&fh).map(|h| h.ino).ok_or(libc::EIO)
    }

    pub fn open(&mut self, ino: u64) -> R<u64> {
        if ino == CONTROL_INO {
            return Ok(self.new_handle(ino, HandleKind::Control(Vec::new())));
        }
        match self.inode(ino)?.body {
            Body::File(_) => Ok(self.new_handle(ino, HandleKind::File)),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::ELOOP),
        }
    }

    pub fn opendir(&mut self, ino: u64) -> R<u64> {
        self.ensure_loaded(ino)?;
        let d = self.dir(ino)?;
        let parent = d.parent.as_ref().map_or(ino, |(p, _)| *p);
        let mut list = vec![
            (ino, Kind::Dir, OsString::from(".")),
            (parent, Kind::Dir, OsString::from("..")),
        ];
        for (name, &child) in &d.live {
            if let Some(i) = self.inodes.get(&child) {
                list.push((child, i.kind(), name.clone()));
            }
        }
        Ok(self.new_handle(ino, HandleKind::Dir(list)))
    }

    /// Directory entries from `offset` on: (inode, next offset, kind, name).
    pub fn readdir(&self, fh: u64, offset: u64) -> R<Vec<(u64, u64, Kind, OsString)>> {
        match &self.handles.get(&fh).ok_or(libc::EIO)?.kind {
            HandleKind::Dir(list) => Ok(list
                .iter()
                .enumerate()
                .skip(offset as usize)
                .map(|(i, (ino, k, n))| (*ino, i as u64 + 1, *k, n.clone()))
                .collect()),
            _ => Err(libc::ENOTDIR),
        }
    }

    pub fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            if let Some(i) = self.inodes.get_mut(&h.ino) {
                i.open = i.open.saturating_sub(1);
            }
            self.maybe_drop(h.ino);
        }
    }

    // ------------------------------------------------------------------- data

    pub fn read(&mut self, fh: u64, offset: u64, size: u32) -> R<Vec<u8>> {
        let ino = self.handle_ino(fh)?;
        if ino == CONTROL_INO {
            return match &self.handles[&fh].kind {
                HandleKind::Control(resp) => {
                    let s = (offset as usize).min(resp.len());
                    let e = (s + size as usize).min(resp.len());
                    Ok(resp[s..e].to_vec())
                }
                _ => Err(libc::EIO),
            };
        }
        let f = self.file_mut(ino)?;
        f.ov.read(offset, size as usize, &f.fd).map_err(errno)
    }

    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> R<u32> {
        let ino = self.handle_ino(fh)?;
        if ino == CONTROL_INO {
            let resp = self.control(data);
            let ok = resp.is_ok();
            let text = match resp {
                Ok(t) => format!("{t}\n"),
                Err(t) => format!("error: {t}\n"),
            };
            if let Some(Handle {
                kind: HandleKind::Control(r),
                ..
            }) = self.handles.get_mut(&fh)
            {
                *r = text.into_bytes();
            }
            return if ok {
                Ok(data.len() as u32)
            } else {
                Err(libc::EINVAL)
            };
        }
        let f = self.file_mut(ino)?;
        f.ov.write(offset, data, &f.fd).map_err(errno)?;
        self.inode_mut(ino)?.meta.touch();
        Ok(data.len() as u32)
    }

    /// setattr. Size changes are lazy; mode, owner and times go to BACKING_DIR at once.
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> R<Attr> {
        if ino == CONTROL_INO {
            return self.attr(ino);
        }
        if let Some(size) = size {
            let f = self.file_mut(ino)?;
            f.ov.set_size(size);
            self.inode_mut(ino)?.meta.touch();
        }
        let ts = |t: SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        };
        {
            let i = self.inode(ino)?;
            use std::os::fd::AsRawFd;
            let fd: Option<std::os::fd::RawFd> = match &i.body {
                Body::File(f) => Some(f.fd.as_raw_fd()),
                Body::Dir(d) => d.fd.as_ref().map(|f| f.as_raw_fd()),
                Body::Symlink(_) => None,
            };
            if let Some(b) = fd {
                if let Some(m) = mode {
                    sys::fchmod(&b, m & 0o7777).map_err(errno)?;
                }
                if uid.is_some() || gid.is_some() {
                    sys::fchown(&b, uid, gid).map_err(errno)?;
                }
                if atime.is_some() || mtime.is_some() {
                    sys::futimens(&b, atime.map(ts), mtime.map(ts)).map_err(errno)?;
                }
            }
        }
        let i = self.inode_mut(ino)?;
        if let Some(m) = mode {
            i.meta.perm = m & 0o7777;
        }
        if let Some(u) = uid {
            i.meta.uid = u;
        }
        if let Some(g) = gid {
            i.meta.gid = g;
        }
        if let Some(t) = atime {
            i.meta.atime = t;
        }
        if let Some(t) = mtime {
            i.meta.mtime = t;
        }
        i.meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    pub fn fallocate(&mut self, fh: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        let ino = self.handle_ino(fh)?;
        let f = self.file_mut(ino)?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
        if rest == 0 {
            f.ov.allocate(offset, len, keep);
        } else if rest == libc::FALLOC_FL_PUNCH_HOLE {
            if !keep {
                return Err(libc::EINVAL);
            }
            f.ov.zero_range(offset, len, &f.fd).map_err(errno)?;
        } else if rest == libc::FALLOC_FL_ZERO_RANGE {
            f.ov.allocate(offset, len, keep);
            f.ov.zero_range(offset, len, &f.fd).map_err(errno)?;
        } else {
            return Err(libc::EOPNOTSUPP);
        }
        self.inode_mut(ino)?.meta.touch();
        Ok(())
    }

    pub fn lseek(&mut self, fh: u64, offset: i64, whence: i32) -> R<i64> {
        let ino = self.handle_ino(fh)?;
        let f = self.file_mut(ino)?;
        if offset < 0 {
            return Err(libc::ENXIO);
        }
        let r = match whence {
            libc::SEEK_DATA => f.ov.seek_data(offset as u64, &f.fd),
            libc::SEEK_HOLE => f.ov.seek_hole(offset as u64, &f.fd),
            libc::SEEK_SET => return Ok(offset),
            libc::SEEK_END => return Ok(f.ov.size() as i64 + offset),
            _ => return Err(libc::EINVAL),
        };
        r.map(|o| o as i64).ok_or(libc::ENXIO)
    }

    fn run_actions(file: &File, actions: &[Action]) -> io::Result<()> {
        for a in actions {
            match a {
                Action::SetLen(n) => file.set_len(*n)?,
                Action::Write(at, bytes) => file.write_all_at(bytes, *at)?,
                Action::Punch(at, len) => sys::punch_hole(file, *at, *len)?,
            }
        }
        Ok(())
    }

    /// fsync/fdatasync of a file: its data and size become durable (names do not).
    pub fn fsync_file(&mut self, ino: u64) -> R<()> {
        let sync = self.sync_backing;
        let f = self.file_mut(ino)?;
        if f.ov.is_dirty() {
            Self::run_actions(&f.fd, &f.ov.sync_plan()).map_err(errno)?;
            f.ov.synced();
        }
        if sync {
            f.fd.sync_all().map_err(errno)?;
        }
        Ok(())
    }

    pub fn fsync_handle(&mut self, fh: u64) -> R<()> {
        let ino = self.handle_ino(fh)?;
        if ino == CONTROL_INO {
            return Ok(());
        }
        self.fsync_file(ino)
    }

    /// The durable entries of `dir` that differ from the live ones.
    fn pending_names(&self, dir: u64) -> Vec<OsString> {
        let Ok(d) = self.dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<OsString> = Vec::new();
        for (n, (ino, _)) in &d.durable {
            if d.live.get(n) != Some(ino) {
                names.push(n.clone());
            }
        }
        for n in d.live.keys() {
            if !d.durable.contains_key(n) {
                names.push(n.clone());
            }
        }
        names
    }

    fn dir_fd(&self, dir: u64) -> R<&OwnedFd> {
        self.dir(dir)?.fd.as_ref().ok_or(libc::ENOENT)
    }

    /// fsync of a directory: BACKING_DIR's entries under it become the live ones.
    pub fn fsync_dir(&mut self, dir: u64) -> R<()> {
        if !self.dir(dir)?.loaded || self.dir(dir)?.fd.is_none() {
            return Ok(()); // never read: nothing changed; or removed: nothing to keep
        }
        let names = self.pending_names(dir);
        // Removals (and the old side of replacements) first, then additions: a name can only
        // be linked once its old entry is gone.
        for n in &names {
            let Some((old, kind)) = self.dir(dir)?.durable.get(n).cloned() else {
                continue;
            };
            match kind {
                Kind::File | Kind::Symlink => {
                    let fd = self.dir_fd(dir)?;
                    match sys::unlink_at(fd, n) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(errno(e)),
                    }
                }
                Kind::Dir => {
                    if self.dir_is_live(old) && self.inodes.contains_key(&old) {
                        // Moved elsewhere in the view: park it until its new parent is synced.
                        let sname = staged_dir_name(old);
                        sys::rename_at(self.dir_fd(dir)?, n, &self.staging_fd, &sname)
                            .map_err(errno)?;
                        self.dir_mut(old)?.loc = Loc::Staging(sname);
                    } else if self.inodes.contains_key(&old) {
                        self.remove_backing_dir(old)?;
                        self.maybe_drop(old);
                    } else {
                        let path = sys::proc_path(self.dir_fd(dir)?).join(n);
                        std::fs::remove_dir_all(path).map_err(errno)?;
                    }
                }
            }
            self.dir_mut(dir)?.durable.remove(n);
        }
        for n in &names {
            let Some(new) = self.dir(dir)?.live.get(n).copied() else {
                continue;
            };
            let kind = self.inode(new)?.kind();
            match kind {
                Kind::File => {
                    sys::link_at(
                        &self.staging_fd,
                        &staged_file_name(new),
                        self.dir_fd(dir)?,
                        n,
                    )
                    .map_err(errno)?;
                }
                Kind::Symlink => {
                    let target = self.readlink(new)?;
                    sys::symlink_at(target.as_os_str(), self.dir_fd(dir)?, n).map_err(errno)?;
                }
                Kind::Dir => {
                    let loc = self.dir(new)?.loc.clone();
                    let (from_fd, from_name) = match &loc {
                        Loc::Staging(s) => (&self.staging_fd, s.clone()),
                        Loc::In(p, s) => (self.dir_fd(*p)?, s.clone()),
                        Loc::Root | Loc::Gone => return Err(libc::EIO),
                    };
                    sys::rename_at(from_fd, &from_name, self.dir_fd(dir)?, n).map_err(errno)?;
                    if let Loc::In(p, s) = loc {
                        // A directory is in one place only: its old durable entry went with
                        // it (as a real rename commits both sides at once).
                        self.dir_mut(p)?.durable.remove(&s);
                    }
                    self.dir_mut(new)?.loc = Loc::In(dir, n.clone());
                }
            }
            self.dir_mut(dir)?.durable.insert(n.clone(), (new, kind));
        }
        if self.sync_backing {
            let fd = self.dir_fd(dir)?;
            File::from(fd.try_clone().map_err(errno)?)
                .sync_all()
                .map_err(errno)?;
        }
        Ok(())
    }

    /// Deletes a directory the view no longer has from BACKING_DIR (or staging). Directories
    /// still live elsewhere in the view whose backing is inside it are parked in staging
    /// first; files need nothing (their staging links keep them).
    fn remove_backing_dir(&mut self, ino: u64) -> R<()> {
        let children: Vec<u64> = self
            .inodes
            .iter()
            .filter(|(_, i)| matches!(&i.body, Body::Dir(d) if matches!(&d.loc, Loc::In(p, _) if *p == ino)))
            .map(|(c, _)| *c)
            .collect();
        for c in children {
            if self.dir_is_live(c) {
                let Loc::In(_, name) = self.dir(c)?.loc.clone() else {
                    continue;
                };
                let sname = staged_dir_name(c);
                sys::rename_at(self.dir_fd(ino)?, &name, &self.staging_fd, &sname)
                    .map_err(errno)?;
                self.dir_mut(c)?.loc = Loc::Staging(sname);
            } else {
                self.remove_backing_dir(c)?;
            }
        }
        let loc = self.dir(ino)?.loc.clone();
        let path = match &loc {
            Loc::Staging(s) => sys::proc_path(&self.staging_fd).join(s),
            Loc::In(p, s) => sys::proc_path(self.dir_fd(*p)?).join(s),
            Loc::Root | Loc::Gone => return Ok(()),
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(errno(e)),
        }
        if let Loc::In(p, s) = loc {
            if let Ok(pd) = self.dir_mut(p) {
                pd.durable.remove(&s);
            }
        }
        let d = self.dir_mut(ino)?;
        d.loc = Loc::Gone;
        d.fd = None;
        d.durable.clear();
        Ok(())
    }

    /// Makes everything durable (a clean unmount): every file's data, then every directory
    /// from the root down.
    pub fn sync_all(&mut self) -> R<()> {
        let files: Vec<u64> = self
            .inodes
            .iter()
            .filter(|(_, i)| matches!(i.body, Body::File(_)))
            .map(|(n, _)| *n)
            .collect();
        for f in files {
            self.fsync_file(f)?;
        }
        let mut queue = vec![ROOT];
        while let Some(d) = queue.pop() {
            self.fsync_dir(d)?;
            if let Ok(db) = self.dir(d) {
                for &c in db.live.values() {
                    if matches!(self.inodes.get(&c).map(|i| &i.body), Some(Body::Dir(_))) {
                        queue.push(c);
                    }
                }
            }
        }
        Ok(())
    }

    /// A clean unmount: everything durable, the staging directory removed.
    pub fn shutdown(&mut self) -> R<()> {
        self.sync_all()?;
        self.inodes.clear();
        self.handles.clear();
        std::fs::remove_dir_all(self.backing.join(STAGING_NAME)).map_err(errno)
    }

    /// Dirty pages over all files.
    pub fn dirty_pages(&self) -> usize {
        self.inodes
            .values()
            .map(|i| match &i.body {
                Body::File(f) => f.ov.dirty_pages(),
                _ => 0,
            })
            .sum()
    }

    /// Whether `fh` is a handle on the control file.
    pub fn is_control(&self, fh: u64) -> bool {
        self.handles.get(&fh).is_some_and(|h| h.ino == CONTROL_INO)
    }

    /// Counts of what a crash would lose now.
    pub fn stats(&self) -> String {
        let mut files = 0;
        let mut pages = 0;
        let mut memory = 0;
        let mut names = 0;
        for (&ino, i) in &self.inodes {
            match &i.body {
                Body::File(f) if f.ov.is_dirty() => {
                    files += 1;
                    pages += f.ov.dirty_pages();
                    memory += f.ov.memory();
                }
                Body::Dir(d) if d.loaded => names += self.pending_names(ino).len(),
                _ => {}
            }
        }
        format!(
            "generation={} inodes={} handles={} dirty_files={files} dirty_pages={pages} dirty_bytes={memory} pending_names={names}",
            self.generation,
            self.inodes.len(),
            self.handles.len()
        )
    }

    /// Simulated power loss. `torn`: a seed; each dirty page of each file then reaches
    /// BACKING_DIR with probability 1/2 (in no particular order: the result is the same).
    pub fn crash(&mut self, torn: Option<u64>) -> io::Result<CrashReport> {
        let mut report = CrashReport {
            torn: torn.is_some(),
            seed: torn.unwrap_or(0),
            ..Default::default()
        };
        let mut rng = SplitMix(torn.unwrap_or(0));
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let pending = self.pending_names(ino).len();
            report.dropped_names += pending;
            let Some(Inode {
                body: Body::File(f),
                ..
            }) = self.inodes.get(&ino)
            else {
                continue;
            };
            if !f.ov.is_dirty() {
                continue;
            }
            report.files += 1;
            if torn.is_some() {
                let (plan, kept, dropped) = f.ov.torn_plan(|_| rng.next_u64() & 1 == 0);
                Self::run_actions(&f.fd, &plan)?;
                report.kept_pages += kept;
                report.dropped_pages += dropped;
            } else {
                report.dropped_pages += f.ov.dirty_pages();
            }
        }
        // Everything in memory goes; so does whatever only the staging directory held.
        self.inodes.clear();
        self.handles.retain(|_, h| h.ino == CONTROL_INO);
        self.generation += 1;
        report.generation = self.generation;
        self.staging_fd = Self::fresh_staging(&self.backing)?;
        let st = sys::fstat(&self.root_fd)?;
        self.insert_root(&st)?;
        Ok(report)
    }

    /// A command written to the control file. Returns the response line.
    fn control(&mut self, data: &[u8]) -> Result<String, String> {
        let text = String::from_utf8_lossy(data);
        let mut words = text.split_whitespace();
        match words.next() {
            Some("crash") => {
                let mut torn = false;
                let mut seed = None;
                for w in words {
                    if w == "when-dirty" {
                        // Handled by the caller (it waits for dirty pages first).
                    } else if w == "torn" {
                        torn = true;
                    } else if let Some(s) = w.strip_prefix("seed=") {
                        seed = Some(s.parse::<u64>().map_err(|_| format!("bad seed {s:?}"))?);
                    } else {
                        return Err(format!("unknown crash option {w:?}"));
                    }
                }
                let seed = seed.unwrap_or_else(|| {
                    let t = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    t.as_nanos() as u64 ^ u64::from(std::process::id())
                });
                self.crash(torn.then_some(seed))
                    .map(|r| r.to_string())
                    .map_err(|e| format!("crash failed: {e}"))
            }
            Some("stats") => Ok(self.stats()),
            Some("sync-delay") => {
                let ms = words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .ok_or("sync-delay needs milliseconds")?;
                self.sync_delay = Duration::from_millis(ms);
                Ok(format!("sync-delay {ms} ms"))
            }
            Some("sync") => self
                .sync_all()
                .map(|_| "synced".to_string())
                .map_err(|e| format!("sync failed: {}", io::Error::from_raw_os_error(e))),
            other => Err(format!(
                "unknown command {other:?} (crash [torn] [seed=N], stats, sync)"
            )),
        }
    }

    pub fn statfs(&self) -> R<libc::statvfs> {
        sys::statvfs(&self.root_fd).map_err(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn setup() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let s = State::new(dir.path()).unwrap();
        (dir, s)
    }

    fn write_file(s: &mut State, parent: u64, n: &str, data: &[u8]) -> (u64, u64) {
        let a = s.create_file(parent, name(n), 0o644, 0, 0).unwrap();
        let fh = s.open(a.ino).unwrap();
        s.write(fh, 0, data).unwrap();
        (a.ino, fh)
    }

    fn read_all(s: &mut State, parent: u64, n: &str) -> Option<Vec<u8>> {
        let a = s.lookup(parent, name(n)).ok()?;
        let fh = s.open(a.ino).unwrap();
        let d = s.read(fh, 0, 1 << 20).unwrap();
        s.release(fh);
        Some(d)
    }

    #[test]
    fn unsynced_file_vanishes_synced_file_without_dir_sync_vanishes_too() {
        let (dir, mut s) = setup();
        let (ino, _) = write_file(&mut s, ROOT, "a", b"hello");
        s.fsync_file(ino).unwrap();
        write_file(&mut s, ROOT, "b", b"world");
        assert_eq!(read_all(&mut s, ROOT, "a").unwrap(), b"hello");
        assert!(
            !dir.path().join("a").exists(),
            "no name before the directory is synced"
        );
        s.crash(None).unwrap();
        assert!(read_all(&mut s, ROOT, "a").is_none());
        assert!(read_all(&mut s, ROOT, "b").is_none());
    }

    #[test]
    fn dir_sync_makes_names_durable_and_file_sync_the_data() {
        let (dir, mut s) = setup();
        let (a, _) = write_file(&mut s, ROOT, "a", b"hello");
        write_file(&mut s, ROOT, "b", b"world");
        s.fsync_file(a).unwrap();
        s.fsync_dir(ROOT).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read(dir.path().join("b")).unwrap(),
            b"",
            "b's data was never synced"
        );
        let r = s.crash(None).unwrap();
        assert_eq!(r.dropped_pages, 1);
        assert_eq!(read_all(&mut s, ROOT, "a").unwrap(), b"hello");
        assert_eq!(read_all(&mut s, ROOT, "b").unwrap(), b"");
    }

    #[test]
    fn rename_is_durable_only_after_the_directory_sync() {
        let (dir, mut s) = setup();
        let (a, _) = write_file(&mut s, ROOT, "old", b"x");
        s.fsync_file(a).unwrap();
        s.fsync_dir(ROOT).unwrap();
        s.rename(ROOT, name("old"), ROOT, name("new"), 0).unwrap();
        assert!(read_all(&mut s, ROOT, "new").is_some());
        s.crash(None).unwrap();
        assert!(read_all(&mut s, ROOT, "new").is_none());
        assert_eq!(read_all(&mut s, ROOT, "old").unwrap(), b"x");
        s.rename(ROOT, name("old"), ROOT, name("new"), 0).unwrap();
        s.fsync_dir(ROOT).unwrap();
        assert!(dir.path().join("new").exists() && !dir.path().join("old").exists());
        s.crash(None).unwrap();
        assert_eq!(read_all(&mut s, ROOT, "new").unwrap(), b"x");
    }

    #[test]
    fn unlinked_open_file_keeps_its_data_until_the_crash() {
        let (_dir, mut s) = setup();
        let (a, fh) = write_file(&mut s, ROOT, "f", b"data");
        s.fsync_file(a).unwrap();
        s.fsync_dir(ROOT).unwrap();
        s.unlink(ROOT, name("f")).unwrap();
        s.fsync_dir(ROOT).unwrap();
        // The handle still works: the staging link keeps the inode.
        assert_eq!(s.read(fh, 0, 100).unwrap(), b"data");
        s.write(fh, 4, b"more").unwrap();
        s.fsync_file(a).unwrap();
        s.crash(None).unwrap();
        assert!(read_all(&mut s, ROOT, "f").is_none());
        assert_eq!(
            s.read(fh, 0, 10),
            Err(libc::EIO),
            "handles do not survive a crash"
        );
    }

    /// The store's create: build in a temporary directory, sync its files and the directory,
    /// rename it into place, sync the parent.
    #[test]
    fn store_create_pattern_survives_only_with_both_directory_syncs() {
        for sync_parent in [false, true] {
            let (dir, mut s) = setup();
            let tmp = s
                .mkdir(ROOT, name(".vol.creating"), 0o755, 0, 0)
                .unwrap()
                .ino;
            for f in ["superblock", "wal", "data", "lock"] {
                let (ino, fh) = write_file(&mut s, tmp, f, f.as_bytes());
                s.fsync_file(ino).unwrap();
                s.release(fh);
            }
            s.fsync_dir(tmp).unwrap();
            s.rename(ROOT, name(".vol.creating"), ROOT, name("vol"), 0)
                .unwrap();
            if sync_parent {
                s.fsync_dir(ROOT).unwrap();
            }
            s.crash(Some(7)).unwrap();
            let left: Vec<_> = std::fs::read_dir(dir.path().join(STAGING_NAME))
                .unwrap()
                .collect();
            assert!(left.is_empty(), "a crash empties the staging directory");
            let vol = s.lookup(ROOT, name("vol"));
            if sync_parent {
                let vol = vol.unwrap().ino;
                for f in ["superblock", "wal", "data", "lock"] {
                    assert_eq!(read_all(&mut s, vol, f).unwrap(), f.as_bytes());
                }
                assert!(dir.path().join("vol/wal").exists());
            } else {
                assert_eq!(vol.unwrap_err(), libc::ENOENT);
                assert!(
                    s.lookup(ROOT, name(".vol.creating")).is_err(),
                    "never durable either"
                );
            }
        }
    }

    #[test]
    fn directory_moved_out_of_a_removed_directory_survives_its_new_parents_sync() {
        let (_dir, mut s) = setup();
        let a = s.mkdir(ROOT, name("a"), 0o755, 0, 0).unwrap().ino;
        let sub = s.mkdir(a, name("sub"), 0o755, 0, 0).unwrap().ino;
        let (f, _) = write_file(&mut s, sub, "f", b"keep");
        s.fsync_file(f).unwrap();
        s.fsync_dir(sub).unwrap();
        s.fsync_dir(a).unwrap();
        s.fsync_dir(ROOT).unwrap();
        let b = s.mkdir(ROOT, name("b"), 0o755, 0, 0).unwrap().ino;
        s.rename(a, name("sub"), b, name("sub"), 0).unwrap();
        s.rmdir(ROOT, name("a")).unwrap();
        s.fsync_dir(ROOT).unwrap(); // a goes; b arrives (empty in BACKING_DIR so far)
        s.fsync_dir(b).unwrap(); // sub arrives, from wherever its backing was parked
        s.crash(None).unwrap();
        assert!(s.lookup(ROOT, name("a")).is_err());
        let b = s.lookup(ROOT, name("b")).unwrap().ino;
        let sub = s.lookup(b, name("sub")).unwrap().ino;
        assert_eq!(read_all(&mut s, sub, "f").unwrap(), b"keep");
    }

    #[test]
    fn torn_crash_keeps_some_pages_and_is_repeatable() {
        let run = |seed| {
            let (dir, mut s) = setup();
            let (a, _) = write_file(&mut s, ROOT, "f", &[1u8; 64 * 4096]);
            s.fsync_file(a).unwrap();
            s.fsync_dir(ROOT).unwrap();
            let fh = s.open(a).unwrap();
            s.write(fh, 0, &[2u8; 64 * 4096]).unwrap();
            let r = s.crash(Some(seed)).unwrap();
            assert_eq!(r.kept_pages + r.dropped_pages, 64);
            assert!(r.kept_pages > 0 && r.dropped_pages > 0, "{r:?}");
            let data = std::fs::read(dir.path().join("f")).unwrap();
            let pages: Vec<u8> = data
                .chunks(4096)
                .map(|c| {
                    assert!(c.iter().all(|&b| b == c[0]), "a page is all old or all new");
                    c[0]
                })
                .collect();
            pages
        };
        assert_eq!(run(5), run(5), "the same seed keeps the same pages");
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn shutdown_makes_everything_durable() {
        let (dir, mut s) = setup();
        let d = s.mkdir(ROOT, name("d"), 0o755, 0, 0).unwrap().ino;
        write_file(&mut s, d, "f", b"content");
        s.symlink(ROOT, name("l"), Path::new("d/f"), 0, 0).unwrap();
        s.shutdown().unwrap();
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"content");
        assert_eq!(
            std::fs::read_link(dir.path().join("l")).unwrap(),
            Path::new("d/f")
        );
        assert!(!dir.path().join(STAGING_NAME).exists());
    }
}
