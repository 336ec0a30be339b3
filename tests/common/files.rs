//! Files for the tests that put ext4 on a volume: a set of random files to copy in, their
//! checksums to compare after a crash, and the filesystem check.

use std::path::Path;

use super::{describe, random_bytes, run, text, timed, MIB};

/// How many files, the largest size, and the seed their sizes and contents come from. Every
/// fourth file is tiny (at most 5000 bytes) and every third lives in `sub/`; sizes are
/// multiples of nothing in particular.
#[derive(Debug, Clone, Copy)]
pub struct FileSet {
    pub count: u64,
    pub max_len: u64,
    pub seed: u64,
}

impl FileSet {
    /// Writes the files under `src`; returns their names, relative to it.
    pub fn write(self, src: &Path) -> Vec<String> {
        std::fs::create_dir_all(src.join("sub")).expect("mkdir sub");
        let mut names = Vec::new();
        for i in 0..self.count {
            let bytes = random_bytes(self.seed + i, 8);
            let r = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            let len = if i % 4 == 0 {
                r % 5000 + 1
            } else {
                r % self.max_len + 1
            };
            let name = if i % 3 == 2 {
                format!("sub/file-{i:02}.bin")
            } else {
                format!("file-{i:02}.bin")
            };
            let data = random_bytes(self.seed + 1000 + i, len as usize);
            std::fs::write(src.join(&name), data).expect("write a file");
            names.push(name);
        }
        names
    }
}

/// A dozen files of up to 1 MiB.
pub const SMALL_SET: FileSet = FileSet {
    count: 12,
    max_len: MIB,
    seed: 3000,
};

/// `sha256sum NAMES` run inside `dir` (in a child process with a timeout, so a hung mount
/// cannot hang the test).
pub fn sha256s(dir: &Path, names: &[String]) -> String {
    let out = run(timed(60, "sha256sum").args(names).current_dir(dir));
    assert!(
        out.status.success(),
        "sha256sum in {}: {}",
        dir.display(),
        describe(&out)
    );
    let s = text(&out.stdout);
    assert_eq!(s.lines().count(), names.len(), "{s}");
    s
}

/// `e2fsck -fn` finds nothing to fix.
pub fn e2fsck_clean(dev: &Path) {
    let out = run(timed(120, "e2fsck").arg("-fn").arg(dev));
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck -fn found problems:\n{}",
        describe(&out)
    );
}
