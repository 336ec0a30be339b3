//! Open handles and the data path through them: open, read, write, setattr, fallocate,
//! lseek. File data changes go to the file's overlay only; the control file's handles
//! carry its command responses.

use std::ffi::OsString;
use std::time::{SystemTime, UNIX_EPOCH};

use super::base::{errno, State, CONTROL_INO, R};
use super::inode::{Attr, Body, Handle, HandleKind, Kind};
use crate::sys;

impl State {
    pub(super) fn new_handle(&mut self, ino: u64, kind: HandleKind) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, kind });
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.open += 1;
        }
        fh
    }

    pub(super) fn handle_ino(&self, fh: u64) -> R<u64> {
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

    /// Whether `fh` is a handle on the control file.
    pub fn is_control(&self, fh: u64) -> bool {
        self.handles.get(&fh).is_some_and(|h| h.ino == CONTROL_INO)
    }

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
}
