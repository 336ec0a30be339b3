//! `Tmpfs`: a size-limited tmpfs a test can fill, to put a store on a filesystem that runs
//! out of space (and `Ballast`, a file that takes the room a test wants to free later).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::run_ok;

/// A tmpfs of `size` mounted at `path`, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create the mount point");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("tmpfs")
                .arg(path),
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Bytes the filesystem has left.
    pub fn free(&self) -> u64 {
        let text = run_ok(
            Command::new("df")
                .args(["-B1", "--output=avail"])
                .arg(&self.path),
        );
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("df said: {text}"))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            // Something still holds a file there: detach it so the test leaves nothing behind.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A file of `len` bytes written in full (a tmpfs has no holes to fool it), taking that
/// much room until it is removed.
pub struct Ballast {
    pub path: PathBuf,
}

impl Ballast {
    pub fn fill(path: &Path, len: u64) -> Ballast {
        use std::io::Write;
        let mut f = std::fs::File::create(path).expect("create the ballast");
        let chunk = vec![0xbau8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).expect("write the ballast");
            left -= n as u64;
        }
        Ballast {
            path: path.to_path_buf(),
        }
    }

    /// Frees its room.
    pub fn remove(self) {
        std::fs::remove_file(&self.path).expect("remove the ballast");
    }
}
