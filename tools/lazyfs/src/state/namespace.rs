//! The live namespace: reading directories from BACKING_DIR on first use, creating,
//! linking, unlinking and renaming names, and forgetting inodes nothing reaches any more.
//! Nothing here touches a durable entry: that is the directory fsync's job
//! (`durability.rs`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::base::{
    errno, staged_dir_name, staged_file_name, State, CONTROL_INO, CONTROL_NAME, R, ROOT,
    STAGING_NAME,
};
use super::inode::{Attr, Body, DirBody, FileBody, Inode, Kind, Loc, Meta};
use crate::overlay::Overlay;
use crate::sys;

impl State {
    /// Reads a directory's entries from BACKING_DIR the first time it is used.
    pub(super) fn ensure_loaded(&mut self, dir: u64) -> R<()> {
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
                    sys::two_names_at(
                        sys::TwoNames::Link,
                        &fd,
                        &name,
                        &self.staging_fd,
                        &staged_file_name(ino),
                    )
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
                    Body::Dir(DirBody::new(
                        sys::open_dir_at(&fd, &name).map_err(errno)?,
                        Loc::In(dir, name.clone()),
                        false,
                        Some((dir, name.clone())),
                    )),
                    Kind::Dir,
                ),
                libc::S_IFLNK => (
                    Body::Symlink(sys::readlink_at(&fd, &name).map_err(errno)?),
                    Kind::Symlink,
                ),
                _ => continue, // fifos, sockets, devices: not served
            };
            entries.push((name, ino, kind));
            new_inodes.push((ino, Inode::new(body, meta, 0)));
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

    pub(super) fn check_name(parent: u64, name: &OsStr) -> R<()> {
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
    pub(super) fn maybe_drop(&mut self, ino: u64) {
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

    pub(super) fn new_entry_checks(&mut self, parent: u64, name: &OsStr) -> R<()> {
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

    pub(super) fn add_live(&mut self, parent: u64, name: &OsStr, ino: u64) -> R<()> {
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
        let body = Body::File(FileBody {
            fd: f,
            ov: Overlay::new(0),
        });
        self.add_new(parent, name, ino, body, Meta::new(mode, uid, gid))
    }

    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32, uid: u32, gid: u32) -> R<Attr> {
        self.new_entry_checks(parent, name)?;
        let ino = self.alloc_ino();
        let sname = staged_dir_name(ino);
        sys::mkdir_at(&self.staging_fd, &sname, mode & 0o7777).map_err(errno)?;
        let fd = sys::open_dir_at(&self.staging_fd, &sname).map_err(errno)?;
        let _ = sys::fchown(&fd, Some(uid), Some(gid));
        // Nothing to read from BACKING_DIR: it is new, so it counts as loaded.
        let body = Body::Dir(DirBody::new(
            fd,
            Loc::Staging(sname),
            true,
            Some((parent, name.to_os_string())),
        ));
        self.add_new(parent, name, ino, body, Meta::new(mode, uid, gid))
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
        let body = Body::Symlink(target.to_path_buf());
        self.add_new(parent, name, ino, body, Meta::new(0o777, uid, gid))
    }

    /// Enters a just-made inode as `name` in `parent`, with the kernel's first lookup taken
    /// (create, mkdir and symlink reply with its entry).
    fn add_new(&mut self, parent: u64, name: &OsStr, ino: u64, body: Body, meta: Meta) -> R<Attr> {
        self.inodes.insert(ino, Inode::new(body, meta, 1));
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
    pub(super) fn is_within(&self, mut dir: u64, ancestor: u64) -> bool {
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
}
