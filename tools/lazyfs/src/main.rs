//! `blockrep-lazyfs`: mount a lazy view of a directory, or tell a mounted one to crash.
//!
//! ```text
//! blockrep-lazyfs BACKING_DIR MOUNTPOINT [--threads N] [--sync-delay-ms MS] [--sync-backing]
//! blockrep-lazyfs crash MOUNTPOINT... [--torn] [--seed N] [--when-dirty]
//! blockrep-lazyfs stats MOUNTPOINT
//! blockrep-lazyfs sync MOUNTPOINT
//! blockrep-lazyfs control MOUNTPOINT COMMAND...   (any control-file command, see `control`)
//! ```
//!
//! Mounting runs in the foreground and prints one line (`blockrep-lazyfs: mounted ...`) once
//! the filesystem answers. It ends when the mount point is unmounted (`umount MOUNTPOINT`) or
//! on SIGTERM/SIGINT (which unmounts); either way, like a clean unmount of a real filesystem,
//! everything is made durable in BACKING_DIR first. SIGKILL loses what was not synced.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use blockrep_lazyfs::{control, fuse::LazyFs, state::State};

const USAGE: &str = "usage:
  blockrep-lazyfs BACKING_DIR MOUNTPOINT [--threads N] [--sync-delay-ms MS] [--sync-backing]
  blockrep-lazyfs crash MOUNTPOINT... [--torn] [--seed N] [--when-dirty]
  blockrep-lazyfs stats MOUNTPOINT
  blockrep-lazyfs sync MOUNTPOINT
  blockrep-lazyfs control MOUNTPOINT COMMAND...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("crash") => crash(&args[1..]),
        Some(cmd @ ("stats" | "sync")) => match &args[1..] {
            [mnt] => control::send(Path::new(mnt), cmd)
                .map(|r| println!("{r}"))
                .map_err(|e| format!("{mnt}: {e}")),
            _ => Err(format!("{cmd} takes one mount point\n{USAGE}")),
        },
        Some("control") => match &args[1..] {
            [mnt, words @ ..] if !words.is_empty() => {
                control::send(Path::new(mnt), &words.join(" "))
                    .map(|r| println!("{r}"))
                    .map_err(|e| format!("{mnt}: {e}"))
            }
            _ => Err(format!(
                "control takes a mount point and a command\n{USAGE}"
            )),
        },
        _ => mount(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("blockrep-lazyfs: {msg}");
            ExitCode::from(if msg.contains("usage:") { 2 } else { 1 })
        }
    }
}

fn crash(args: &[String]) -> Result<(), String> {
    let mut torn = false;
    let mut when_dirty = false;
    let mut seed = None;
    let mut mounts = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--torn" => torn = true,
            "--when-dirty" => when_dirty = true,
            "--seed" => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("--seed needs a value\n{USAGE}"))?;
                seed = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("bad seed {v:?}\n{USAGE}"))?,
                );
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            m => mounts.push(PathBuf::from(m)),
        }
    }
    if mounts.is_empty() {
        return Err(format!("crash needs a mount point\n{USAGE}"));
    }
    if seed.is_some() && !torn {
        return Err(format!("--seed only means something with --torn\n{USAGE}"));
    }
    // Several mount points (the whole rack) crash one right after the other.
    for (i, m) in mounts.iter().enumerate() {
        let mut cmd = String::from("crash");
        if torn {
            cmd.push_str(" torn");
        }
        if let Some(s) = seed {
            // Distinct but repeatable per mount point.
            cmd.push_str(&format!(" seed={}", s.wrapping_add(i as u64)));
        }
        if when_dirty {
            cmd.push_str(" when-dirty");
        }
        let resp = control::send(m, &cmd).map_err(|e| format!("{}: {e}", m.display()))?;
        println!("{}: {resp}", m.display());
    }
    Ok(())
}

fn mount(args: &[String]) -> Result<(), String> {
    let mut threads = 4usize;
    let mut sync_backing = false;
    let mut sync_delay = std::time::Duration::ZERO;
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("--threads needs a value\n{USAGE}"))?;
                threads = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("bad --threads {v:?}\n{USAGE}"))?;
            }
            "--sync-backing" => sync_backing = true,
            "--sync-delay-ms" => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("--sync-delay-ms needs a value\n{USAGE}"))?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("bad --sync-delay-ms {v:?}\n{USAGE}"))?;
                sync_delay = std::time::Duration::from_millis(ms);
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            p => pos.push(PathBuf::from(p)),
        }
    }
    let [backing, mnt] = pos.as_slice() else {
        return Err(format!("expected BACKING_DIR MOUNTPOINT\n{USAGE}"));
    };
    if !backing.is_dir() {
        return Err(format!("{}: not a directory", backing.display()));
    }
    if !mnt.is_dir() {
        return Err(format!("{}: not a directory", mnt.display()));
    }
    let mut state = State::new(backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    state.sync_backing = sync_backing;
    state.sync_delay = sync_delay;

    // SIGTERM/SIGINT/SIGHUP are taken by one thread (blocked everywhere else, before any
    // thread starts), which unmounts; the session then ends and `destroy` makes it durable.
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the calling thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("blockrep-lazyfs:{}", backing.display())),
        fuser::MountOption::Subtype("lazyfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
    ];
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let mut session = fuser::Session::new(LazyFs::new(state), mnt, &config)
        .map_err(|e| format!("mounting on {}: {e}", mnt.display()))?;
    let mut unmounter = session.unmount_callable();
    let mnt_for_signal = mnt.canonicalize().unwrap_or_else(|_| mnt.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            unsafe { libc::sigwait(&set, &mut sig) };
            if unmounter.unmount().is_err() {
                // Busy: detach it; the session ends when the last user lets go.
                if let Ok(c) = std::ffi::CString::new(mnt_for_signal.as_os_str().as_encoded_bytes())
                {
                    // SAFETY: plain syscall with a valid C string.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        })
        .map_err(|e| e.to_string())?;
    println!(
        "blockrep-lazyfs: mounted {} on {} (pid {})",
        backing.display(),
        mnt.display(),
        std::process::id()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    session
        .run()
        .map_err(|e| format!("session on {}: {e}", mnt.display()))
}
