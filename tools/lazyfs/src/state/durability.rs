//! What makes changes durable: a file's fsync writes its overlay into the backing inode, a
//! directory's fsync makes BACKING_DIR's entries under it equal the live ones, and a clean
//! unmount does both for everything.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use super::base::{
    errno, staged_dir_name, staged_file_name, State, CONTROL_INO, R, ROOT, STAGING_NAME,
};
use super::inode::{Body, Kind, Loc};
use crate::overlay::Action;
use crate::sys;

impl State {
    pub(super) fn run_actions(file: &File, actions: &[Action]) -> io::Result<()> {
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
    pub(super) fn pending_names(&self, dir: u64) -> Vec<OsString> {
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

    pub(super) fn dir_fd(&self, dir: u64) -> R<&OwnedFd> {
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
                        sys::two_names_at(
                            sys::TwoNames::Rename,
                            self.dir_fd(dir)?,
                            n,
                            &self.staging_fd,
                            &sname,
                        )
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
                    sys::two_names_at(
                        sys::TwoNames::Link,
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
                    sys::two_names_at(
                        sys::TwoNames::Rename,
                        from_fd,
                        &from_name,
                        self.dir_fd(dir)?,
                        n,
                    )
                    .map_err(errno)?;
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
    pub(super) fn remove_backing_dir(&mut self, ino: u64) -> R<()> {
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
                sys::two_names_at(
                    sys::TwoNames::Rename,
                    self.dir_fd(ino)?,
                    &name,
                    &self.staging_fd,
                    &sname,
                )
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
}
