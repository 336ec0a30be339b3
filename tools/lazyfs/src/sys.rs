//! Thin wrappers over the `*at` system calls the filesystem uses on BACKING_DIR. Every
//! backing directory is held open, so renaming one never invalidates what refers to it.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `/proc/self/fd/N`: a path for std APIs that resolves to the open directory `fd`.
pub fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: plain syscall with a valid C string; the result is a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn open_dir_at(dir: &impl AsRawFd, name: &OsStr) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: as above.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    })?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a regular file read-write (`create`: it must not exist yet, made with `mode`).
pub fn open_file_at(dir: &impl AsRawFd, name: &OsStr, create: Option<u32>) -> io::Result<File> {
    let c = cstr(name)?;
    let mut flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    if create.is_some() {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    // SAFETY: as above.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags,
            create.unwrap_or(0) as libc::c_uint,
        )
    })?;
    // SAFETY: as above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The syscalls that take two (directory, name) pairs.
#[derive(Clone, Copy)]
pub enum TwoNames {
    /// linkat: `new` becomes another name of `old`.
    Link,
    /// renameat: `old` moves to `new`.
    Rename,
}

pub fn two_names_at(
    op: TwoNames,
    old_dir: &impl AsRawFd,
    old: &OsStr,
    new_dir: &impl AsRawFd,
    new: &OsStr,
) -> io::Result<()> {
    let (o, n) = (cstr(old)?, cstr(new)?);
    let (od, nd) = (old_dir.as_raw_fd(), new_dir.as_raw_fd());
    // SAFETY: plain syscalls with valid C strings that outlive them.
    cvt(unsafe {
        match op {
            TwoNames::Link => libc::linkat(od, o.as_ptr(), nd, n.as_ptr(), 0),
            TwoNames::Rename => libc::renameat(od, o.as_ptr(), nd, n.as_ptr()),
        }
    })
    .map(drop)
}

pub fn unlink_at(dir: &impl AsRawFd, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
}

pub fn mkdir_at(dir: &impl AsRawFd, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: as above.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn symlink_at(target: &OsStr, dir: &impl AsRawFd, name: &OsStr) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: as above.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

pub fn readlink_at(dir: &impl AsRawFd, name: &OsStr) -> io::Result<PathBuf> {
    std::fs::read_link(proc_path(dir).join(name))
}

pub fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: `st` is written by the kernel before it is read.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstat(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

pub fn lstat_at(dir: &impl AsRawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: as above.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

pub fn statvfs(fd: &impl AsRawFd) -> io::Result<libc::statvfs> {
    // SAFETY: as above.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        cvt(libc::fstatvfs(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    // A backing filesystem without holes still gets zeroes.
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

pub fn fchmod(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

pub fn fchown(fd: &impl AsRawFd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let u = uid.map_or(u32::MAX, |u| u);
    let g = gid.map_or(u32::MAX, |g| g);
    // SAFETY: plain syscall; -1 (u32::MAX) leaves that id unchanged.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), u, g) }).map(drop)
}

pub fn futimens(
    fd: &impl AsRawFd,
    atime: Option<libc::timespec>,
    mtime: Option<libc::timespec>,
) -> io::Result<()> {
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let times = [atime.unwrap_or(omit), mtime.unwrap_or(omit)];
    // SAFETY: `times` is two valid timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}
