//! PostgreSQL on ext4 on a blockrep volume, for the tests that kill its primary: the server
//! (as the `postgres` user, on a unix socket), an insert client that logs each acknowledged
//! COMMIT, a checkpoint loop beside it, and the checks a recovered cluster must pass.
//!
//! Needs these Debian 12 packages (scripts/test installs them): postgresql-15 (postgres,
//! initdb, pg_isready, pg_checksums, amcheck; it pulls in postgresql-client-15 for psql and
//! postgresql-common, which creates the `postgres` user), libnbd-bin (nbdfuse), fuse3,
//! e2fsprogs (mkfs.ext4, e2fsck), mount (mount, umount, losetup), coreutils (timeout,
//! stdbuf).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fuse::FuseMount;
use super::process::{require, run, run_ok, signal_pid, timed, KillOnDrop};
use super::wait::{poll_until, wait_until};
use super::{describe, tail, text};

/// The client must have this many acknowledged commits, and have run this long, before the
/// primary is killed.
pub const MIN_ACKS_BEFORE_KILL: usize = 200;
pub const MIN_RUN_BEFORE_KILL: Duration = Duration::from_secs(3);

// ------------------------------------------------------------------------------ helpers

pub fn read_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A log file's text, read only when a failed wait renders it.
pub struct LogText<'a>(&'a Path);

impl std::fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&read_text(self.0))
    }
}

/// The newest PostgreSQL server installed the Debian way (/usr/lib/postgresql/VERSION/bin).
pub fn postgres_bindir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["postgres", "initdb", "pg_isready", "pg_checksums", "psql"]
                .iter()
                .all(|t| bin.join(t).exists())
                .then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "the PostgreSQL server is not installed (no /usr/lib/postgresql/*/bin/postgres with \
             initdb, pg_isready, pg_checksums, psql); run ./scripts/test (it installs the \
             Debian package postgresql-15)"
        )
    })
}

/// uid and gid of the `postgres` user (PostgreSQL refuses to run as root).
pub fn postgres_user() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the fields are copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "there is no `postgres` user (the Debian postgresql packages create it); run \
         ./scripts/test"
    );
    // SAFETY: pw is non-null and points to libc's static passwd entry.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

pub fn require_tools() -> PathBuf {
    for t in [
        "nbdfuse",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "losetup",
        "timeout",
        "stdbuf",
    ] {
        require(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (FUSE is needed)"
    );
    postgres_bindir()
}

// ----------------------------------------------------------------------- processes

/// `/proc/PID/stat`: (state, ppid).
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

pub fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every descendant of `root` (not `root` itself).
pub fn descendants(root: i32) -> Vec<i32> {
    let parent: Vec<(i32, i32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, proc_stat(p)?.1)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// Processes whose working directory is under `dir` (every postgres process chdirs to its
/// data directory). Reading the link does not touch the filesystem behind it.
pub fn cwd_under(dir: &Path) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

pub fn describe_pids(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| {
            let cmd = read_text(Path::new(&format!("/proc/{p}/cmdline"))).replace('\0', " ");
            let wchan = read_text(Path::new(&format!("/proc/{p}/wchan")));
            format!("  pid {p} {:?} wchan {wchan} {cmd}", proc_stat(*p))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ----------------------------------------------------------------------------- postgres

/// A postmaster running as the `postgres` user on a unix socket only.
pub struct Postgres {
    /// The psql of the same PostgreSQL version.
    psql: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    log: PathBuf,
    postmaster: Option<Child>,
    /// Processes SIGKILLed by `kill9` that may not have exited yet.
    killed: Vec<i32>,
}

impl Postgres {
    /// Starts postgres on `data` and waits (bounded) until it accepts connections, crash
    /// recovery included.
    pub fn start(bin: &Path, data: &Path, sock: &Path, port: u16, log: &Path) -> Postgres {
        let (uid, gid) = postgres_user();
        let logf = File::create(log).expect("postgres log");
        let child = Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(sock)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "full_page_writes=on",
                "-c",
                "wal_sync_method=fdatasync",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "log_checkpoints=on",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn postgres");
        let mut pg = Postgres {
            psql: bin.join("psql"),
            data: data.to_path_buf(),
            sock: sock.to_path_buf(),
            port,
            log: log.to_path_buf(),
            postmaster: Some(child),
            killed: Vec::new(),
        };
        let postmaster = &mut pg.postmaster;
        let log = &pg.log;
        wait_until(
            Duration::from_secs(90),
            format_args!(
                "postgres did not accept connections within 90s; its log:\n{}",
                LogText(log)
            ),
            || {
                if let Some(st) = postmaster
                    .as_mut()
                    .and_then(|c| c.try_wait().expect("try_wait"))
                {
                    panic!(
                        "postgres exited with {st} while starting; its log:\n{}",
                        read_text(log)
                    );
                }
                Command::new("timeout")
                    .args(["-k", "2", "10"])
                    .arg(bin.join("pg_isready"))
                    .arg("-q")
                    .arg("-h")
                    .arg(sock)
                    .arg("-p")
                    .arg(port.to_string())
                    .args(["-U", "postgres", "-d", "postgres"])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
        pg
    }

    pub fn log_text(&self) -> String {
        read_text(&self.log)
    }

    pub fn pid(&self) -> i32 {
        self.postmaster.as_ref().expect("postmaster").id() as i32
    }

    pub fn psql_cmd(&self, secs: u64) -> Command {
        let mut c = timed(secs, &self.psql);
        c.arg("-X")
            .arg("-q")
            .arg("-At")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres"])
            .env("PGCONNECT_TIMEOUT", "10");
        c
    }

    /// Runs SQL (several statements allowed) and returns the output; panics on any error.
    pub fn psql(&self, sql: &str) -> String {
        let out = run(self.psql_cmd(120).arg("-c").arg(sql));
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed:\n{}\npostgres log (tail):\n{}",
            describe(&out),
            tail(&self.log_text(), 30)
        );
        text(&out.stdout)
    }

    /// SIGKILL for the postmaster and every process of this cluster, without waiting for
    /// them (one stuck on the dead device exits only once the mounts are torn down). The
    /// postmaster is stopped first so it cannot fork while its children are collected
    /// (they call setsid(), so a process group kill would miss them).
    pub fn kill9(&mut self) {
        let Some(pm) = self.postmaster.as_ref().map(|c| c.id() as i32) else {
            return;
        };
        signal_pid(pm, libc::SIGSTOP);
        // Stopped (or gone) within 2 s, or the kill goes ahead regardless.
        let _ = poll_until(Duration::from_secs(2), || {
            matches!(proc_stat(pm), Some(('T', _)) | Some(('Z', _)) | None).then_some(())
        });
        let mut pids = descendants(pm);
        for p in cwd_under(&self.data) {
            if p != pm && !pids.contains(&p) {
                pids.push(p);
            }
        }
        for &p in &pids {
            signal_pid(p, libc::SIGKILL);
        }
        signal_pid(pm, libc::SIGKILL);
        pids.push(pm);
        self.killed.extend(pids);
    }

    /// After `kill9` (and the teardown that unblocks processes stuck on the dead device):
    /// waits until every killed process is gone.
    pub fn wait_gone(&mut self, secs: u64) {
        wait_until(
            Duration::from_secs(secs),
            "postgres processes still alive after SIGKILL",
            || {
                if let Some(c) = self.postmaster.as_mut() {
                    if c.try_wait().expect("try_wait").is_some() {
                        self.postmaster = None;
                    }
                }
                self.killed.retain(|&p| alive(p));
                if self.postmaster.is_none() && self.killed.is_empty() {
                    Ok(())
                } else {
                    Err(describe_pids(&self.killed))
                }
            },
        );
    }

    /// Fast shutdown (SIGINT): a shutdown checkpoint, then exit 0.
    pub fn stop(&mut self) {
        let pm = self.pid();
        signal_pid(pm, libc::SIGINT);
        let postmaster = self.postmaster.as_mut().expect("postmaster");
        let st = wait_until(
            Duration::from_secs(60),
            format_args!(
                "postgres did not shut down within 60s; its log:\n{}",
                LogText(&self.log)
            ),
            || postmaster.try_wait().expect("try_wait"),
        );
        self.postmaster = None;
        assert!(
            st.success() && self.log_text().contains("database system is shut down"),
            "postgres fast shutdown: {st}; its log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.postmaster.is_some() {
            self.kill9();
            // Never block here: a process stuck on a dead device is released by the mount
            // teardown that follows (the FuseMount guard is dropped after this one).
            let exited = poll_until(Duration::from_secs(3), || {
                let c = self.postmaster.as_mut()?;
                (!matches!(c.try_wait(), Ok(None))).then_some(())
            });
            if exited.is_some() {
                self.postmaster = None;
            }
        }
    }
}

// ------------------------------------------------------------------------------ clients

/// One psql session fed autocommit inserts through a pipe, one statement at a time. For row
/// n it runs `INSERT ... VALUES (n, md5('n')) RETURNING id \gset` and then `\echo ACK n :id`;
/// with ON_ERROR_STOP psql stops at the first failed statement (a failed commit included),
/// so an ACK line is printed only after its COMMIT succeeded. stdout is line-buffered
/// (stdbuf) into `acks`, so an ACK is in the file as soon as psql has printed it.
pub struct InsertClient {
    pub proc: KillOnDrop,
    acks: PathBuf,
}

impl InsertClient {
    pub fn spawn(pg: &Postgres, acks: &Path, stderr: &Path) -> InsertClient {
        let mut cmd = Command::new("stdbuf");
        cmd.arg("-oL")
            .arg(&pg.psql)
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&pg.sock)
            .arg("-p")
            .arg(pg.port.to_string())
            .args(["-U", "postgres", "-d", "postgres"])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(File::create(acks).expect("ack log"))
            .stderr(File::create(stderr).expect("client stderr"));
        let mut child = cmd.spawn().expect("spawn psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        // Feeds statements until psql goes away (the write fails: it exited or was killed).
        std::thread::spawn(move || {
            let mut n: u64 = 1;
            let mut buf = String::new();
            loop {
                buf.clear();
                for _ in 0..16 {
                    buf.push_str(&format!(
                        "INSERT INTO acked (n, payload) VALUES ({n}, md5('{n}')) \
                         RETURNING id \\gset\n\\echo ACK {n} :id\n"
                    ));
                    n += 1;
                }
                if stdin.write_all(buf.as_bytes()).is_err() {
                    return;
                }
            }
        });
        InsertClient {
            proc: KillOnDrop::new(
                child,
                "the insert client (psql)",
                Some(stderr.to_path_buf()),
            ),
            acks: acks.to_path_buf(),
        }
    }

    /// The (n, id) pairs psql acknowledged, in order. Only complete lines count.
    pub fn acked(&self) -> Vec<(u64, u64)> {
        let s = read_text(&self.acks);
        let complete = match s.rfind('\n') {
            Some(i) => &s[..=i],
            None => "",
        };
        complete
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    ["ACK", n, id] => (
                        n.parse().unwrap_or_else(|_| panic!("bad ack line {l:?}")),
                        id.parse().unwrap_or_else(|_| panic!("bad ack line {l:?}")),
                    ),
                    _ => panic!("unexpected line in the client's output: {l:?}"),
                }
            })
            .collect()
    }
}

/// A second session: CHECKPOINT in a loop, so data files are written and fsynced (and the
/// next change to each page logs a full-page image) while the primary dies.
pub fn spawn_checkpointer(pg: &Postgres, dir: &Path) -> KillOnDrop {
    let script = dir.join("checkpoints.sql");
    let sql = "CHECKPOINT;\nSELECT pg_sleep(0.3);\n".repeat(2000);
    std::fs::write(&script, sql).unwrap();
    let stderr = dir.join("checkpoints.stderr");
    let child = Command::new(&pg.psql)
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&pg.sock)
        .arg("-p")
        .arg(pg.port.to_string())
        .args(["-U", "postgres", "-d", "postgres", "-f"])
        .arg(&script)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn psql (checkpoints)");
    KillOnDrop::new(child, "the checkpoint loop (psql)", Some(stderr))
}

// --------------------------------------------------------------------------------- test

// --------------------------------------------------------------------------- the flow

/// Where a test's PostgreSQL runs: its binaries, the `postgres` user, a socket directory
/// and a port of its own.
pub struct PgSite {
    pub bin: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub sock: PathBuf,
    pub port: u16,
    pub base: PathBuf,
}

impl PgSite {
    /// Checks the tools, and makes `base` (a test's temporary directory) reachable by the
    /// `postgres` user, with the socket directory in it.
    pub fn new(base: &Path) -> PgSite {
        let bin = require_tools();
        let (uid, gid) = postgres_user();
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the test directory");
        let sock = base.join("sock");
        std::fs::create_dir(&sock).expect("socket directory");
        std::os::unix::fs::chown(&sock, Some(uid), Some(gid)).expect("chown the socket dir");
        PgSite {
            bin,
            uid,
            gid,
            sock,
            port: super::free_port(),
            base: base.to_path_buf(),
        }
    }

    /// ext4 on the mount's device, a fresh cluster on it (data checksums on), postgres
    /// started, and the `acked` table with amcheck.
    pub fn init_on(&self, fuse: &mut FuseMount) -> Postgres {
        run_ok(timed(120, "mkfs.ext4").args(["-q", "-F"]).arg(fuse.dev()));
        fuse.mount_loop();
        let data = fuse.mnt.join("pgdata");
        std::fs::create_dir(&data).expect("pgdata");
        std::os::unix::fs::chown(&data, Some(self.uid), Some(self.gid)).expect("chown pgdata");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .expect("chmod pgdata");
        run_ok(
            timed(180, self.bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
                .arg("--data-checksums")
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("LC_ALL", "C")
                .uid(self.uid)
                .gid(self.gid),
        );
        let pg = self.start_on(fuse, "postgres-1.log");
        pg.psql(
            "CREATE TABLE acked (id bigserial PRIMARY KEY, n bigint NOT NULL UNIQUE, \
             payload text NOT NULL); CREATE EXTENSION amcheck; CHECKPOINT;",
        );
        pg
    }

    /// postgres on the cluster a mount already holds (after a failover: crash recovery).
    pub fn start_on(&self, fuse: &FuseMount, log: &str) -> Postgres {
        let data = fuse.mnt.join("pgdata");
        Postgres::start(
            &self.bin,
            &data,
            &self.sock,
            self.port,
            &self.base.join(log),
        )
    }

    /// The insert client and the checkpoint loop, run until enough commits are
    /// acknowledged; `context` says what the volume logged, for a failure.
    pub fn load(&self, pg: &Postgres, context: &dyn Fn() -> String) -> Load {
        let mut checkpointer = spawn_checkpointer(pg, &self.base);
        let mut client = InsertClient::spawn(
            pg,
            &self.base.join("acks.log"),
            &self.base.join("client.stderr"),
        );
        let run_started = Instant::now();
        wait_until(
            Duration::from_secs(90),
            "enough acknowledged commits",
            || {
                assert!(
                    client.proc.running(),
                    "the insert client stopped before the primary was killed; its stderr:\n{}\n\
                 postgres log (tail):\n{}",
                    client.proc.stderr_text(),
                    tail(&pg.log_text(), 30)
                );
                assert!(
                    checkpointer.running(),
                    "the checkpoint loop stopped early:\n{}",
                    checkpointer.stderr_text()
                );
                let n = client.acked().len();
                if n >= MIN_ACKS_BEFORE_KILL && run_started.elapsed() >= MIN_RUN_BEFORE_KILL {
                    Ok(())
                } else {
                    Err(format!(
                        "only {n} commits acknowledged; client stderr:\n{}\nvolume:\n{}",
                        client.proc.stderr_text(),
                        tail(&context(), 30)
                    ))
                }
            },
        );
        Load {
            client,
            checkpointer,
            run_started,
        }
    }

    /// Every acknowledged commit is in the recovered cluster, nothing the client never saw
    /// beyond the one in flight, the table and its indexes are consistent, postgres ran crash
    /// recovery without complaint and takes new commits, and every page passes its checksum.
    /// Stops `pg`.
    pub fn verify_recovered(&self, mut pg: Postgres, acked: &[(u64, u64)]) -> usize {
        let rows = acknowledged_rows_present(&pg, acked);
        tables_consistent(&pg, rows);
        pg.psql("INSERT INTO acked (n, payload) VALUES (-1, 'after failover'); CHECKPOINT;");
        let recovery_log = pg.log_text();
        assert!(
            recovery_log.contains("database system was not properly shut down; automatic recovery"),
            "postgres should have run crash recovery:\n{recovery_log}"
        );
        for bad in ["PANIC", "ERROR", "invalid page", "checksum", "corrupt"] {
            assert!(
                !recovery_log.contains(bad),
                "the postgres log after failover mentions {bad:?}:\n{recovery_log}"
            );
        }
        let data = pg.data.clone();
        pg.stop();
        drop(pg);
        // Every page of every relation against its checksum, offline.
        let out = run(timed(120, self.bin.join("pg_checksums"))
            .arg("--check")
            .arg("-D")
            .arg(&data)
            .env_clear()
            .env("LC_ALL", "C")
            .uid(self.uid)
            .gid(self.gid));
        assert!(
            out.status.success(),
            "pg_checksums --check:\n{}",
            describe(&out)
        );
        rows
    }
}

/// The insert client and checkpoint loop of [`PgSite::load`].
pub struct Load {
    pub client: InsertClient,
    pub checkpointer: KillOnDrop,
    pub run_started: Instant,
}

impl Load {
    /// Called right after the primary was killed: waits for the clients to stop (they
    /// fail, or hang and are killed) and returns the acknowledged (n, id) pairs, which
    /// must be the client's own sequence 1, 2, 3, ... with no gap and no fewer than
    /// `acks_before_kill`.
    pub fn finish(mut self, acks_before_kill: usize) -> Vec<(u64, u64)> {
        let killed_at = Instant::now();
        let (client_status, client_killed) = self.client.proc.finish(30);
        let (_, ckpt_killed) = self.checkpointer.finish(10);
        let acked = self.client.acked();
        eprintln!(
            "primary killed after {:?} of inserts with {acks_before_kill} commits \
             acknowledged; the client {} ({client_status}) after {:?} with {} acknowledged; \
             its stderr:\n{}",
            self.run_started.elapsed(),
            if client_killed {
                "hung and was killed"
            } else {
                "stopped by itself"
            },
            killed_at.elapsed(),
            acked.len(),
            self.client.proc.stderr_text().trim()
        );
        if ckpt_killed {
            eprintln!("the checkpoint loop hung and was killed");
        }
        assert!(acked.len() >= acks_before_kill);
        for (i, (n, _)) in acked.iter().enumerate() {
            assert_eq!(*n, i as u64 + 1, "the ack log is not sequential: {acked:?}");
        }
        acked
    }
}

/// Postgres may hang on the dead device: SIGKILL, then the mounts torn down lazily (which
/// fails its pending I/O), then every process waited for.
pub fn abandon(mut pg: Postgres, mut fuse: FuseMount) {
    pg.kill9();
    let t = Instant::now();
    fuse.teardown();
    pg.wait_gone(60);
    drop(pg);
    drop(fuse);
    eprintln!(
        "tearing down postgres and the dead mounts took {:?}",
        t.elapsed()
    );
}

/// Every acknowledged commit is there with its id and payload, and at most the one in
/// flight is there without having been acknowledged. Returns the table's row count.
fn acknowledged_rows_present(pg: &Postgres, acked: &[(u64, u64)]) -> usize {
    let rows_out = pg.psql("SELECT n, id, payload = md5(n::text) FROM acked ORDER BY n");
    let mut rows: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    for l in rows_out.lines() {
        let f: Vec<&str> = l.split('|').collect();
        let [n, id, ok] = f.as_slice() else {
            panic!("unexpected row {l:?}")
        };
        let parsed = (n.parse(), id.parse());
        let (Ok(n), Ok(id)) = parsed else {
            panic!("unexpected row {l:?}")
        };
        rows.insert(n, (id, *ok == "t"));
    }
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for &(n, id) in acked {
        match rows.get(&n) {
            None => missing.push((n, id)),
            Some(&(got, ok)) if got != id || !ok => wrong.push((n, id, got, ok)),
            Some(_) => {}
        }
    }
    assert!(
        missing.is_empty() && wrong.is_empty(),
        "{} of {} acknowledged commits are missing after the failover (first: {:?}), {} are \
         wrong (n, acked id, id found, payload ok: {:?}); the table holds {} rows\n\
         postgres recovery log:\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)],
        wrong.len(),
        &wrong[..wrong.len().min(20)],
        rows.len(),
        pg.log_text()
    );
    // One client, one statement at a time: at most the one in flight was committed without
    // being acknowledged.
    let acked_ns: BTreeSet<u64> = acked.iter().map(|a| a.0).collect();
    let extra: Vec<u64> = rows
        .keys()
        .filter(|n| !acked_ns.contains(n))
        .copied()
        .collect();
    assert!(
        extra.len() <= 1 && extra.iter().all(|&n| n == acked.len() as u64 + 1),
        "rows the client never saw acknowledged, beyond the one in flight: {extra:?}"
    );
    rows.len()
}

/// The table and its indexes agree with each other and with `rows`.
fn tables_consistent(pg: &Postgres, rows: usize) {
    let count = pg.psql("SELECT count(*) FROM acked");
    assert_eq!(count.trim(), rows.to_string(), "count(*)");
    let heap = pg.psql("SELECT count(*) FROM verify_heapam('acked')");
    assert_eq!(heap.trim(), "0", "verify_heapam reports corruption");
    pg.psql(
        "SELECT bt_index_parent_check('acked_pkey', true, true); \
         SELECT bt_index_parent_check('acked_n_key', true, true);",
    );
    let via_index = pg.psql(
        "SET enable_seqscan = off; SET enable_bitmapscan = off; \
         SELECT count(*) FROM acked WHERE n > 0",
    );
    assert_eq!(
        via_index.trim(),
        rows.to_string(),
        "count through the index on n"
    );
}
