//! A replica on a full filesystem (a size-limited tmpfs, its free room held by a ballast
//! file): it stays up, says why in its log once, and refuses the entries it cannot store with
//! a typed reason (`Reject(NoSpace)`), storing nothing of them. Under sync-all the primary's
//! FLUSH fails (ENOSPC); under best-effort it succeeds and the replica is away as a lagging
//! one. A rebuild that meets the full filesystem is refused the same way and finishes once
//! space is freed. Once the ballast goes, the replica is caught up without a restart and
//! holds exactly the primary's image: no acknowledged FLUSH is lost.

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use common::admin::Scrape;
use common::client::{assert_ok, data, Data};
use common::tmpfs::{Ballast, Tmpfs};
use common::*;

const VOLUME: u64 = 64 * MIB;
/// What each write (and FLUSH) of the tests adds.
const CHUNK: u64 = 4 * MIB;
/// The replica's log line when its filesystem fills.
const FULL: &str = "the replica's filesystem is full";

/// A primary on an ordinary disk and one replica whose store is on a tmpfs with room left
/// for a little more than two chunks (the rest held by the ballast), both running.
struct Setup {
    // Fields drop in this order: the nodes stop before their filesystems go.
    replica: Node,
    primary: Node,
    ballast: Option<Ballast>,
    fs: Tmpfs,
    dir: tempfile::TempDir,
}

/// The sizes of a `Setup`, and what its primary's store holds before it starts.
struct Shape {
    volume: u64,
    tmpfs: &'static str,
    /// What the replica's filesystem has left once its store is made and the ballast in.
    room: u64,
    /// Bytes of data written through the primary's store alone before replication starts.
    before: u64,
}

/// The chunk tests' shape: an empty volume, room for two and a half chunks.
const CHUNKS: Shape = Shape {
    volume: VOLUME,
    tmpfs: "96m",
    room: 2 * CHUNK + CHUNK / 2,
    before: 0,
};

impl Setup {
    /// The chunk tests' setup, the replica in sync.
    fn start(extra: &[&str]) -> Setup {
        let s = Setup::shaped(&CHUNKS, extra);
        wait_state(&s.primary, 0, "in_sync", 30);
        s
    }

    fn shaped(shape: &Shape, extra: &[&str]) -> Setup {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let fs = Tmpfs::mount(&dir.path().join("mnt"), shape.tmpfs);
        let r_store = create_store(&fs.path, "r1", shape.volume);
        let left = fs.free().saturating_sub(shape.room);
        let ballast = Ballast::fill(&fs.path.join("ballast"), left);
        let port = free_port();
        let args: Vec<OsString> = vec![
            "replica".into(),
            r_store.clone().into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
        ];
        let replica = Node::builder("r1", &r_store, port, args)
            .log(dir.path().join("r1.log"))
            .ready(Ready::Line("listening on"))
            .start();
        let p_store = create_store(dir.path(), "p", shape.volume);
        if shape.before > 0 {
            let mut alone = serve(&p_store, &[]);
            let write = format!("write -P 0x33 0 {}", shape.before);
            let out = run_ok(
                timed(300, "qemu-io")
                    .args(["-f", "raw"])
                    .arg(alone.uri())
                    .args(["-c", &write, "-c", "flush"]),
            );
            assert!(!out.contains("failed"), "{out}");
            alone.stop_ok();
        }
        let port = free_port();
        let mut args = node::serve_args(&p_store, port, &["--barrier-timeout-ms", "1500"]);
        args.push("--replica".into());
        args.push(format!("r1={}", replica.addr()).into());
        args.extend(extra.iter().map(OsString::from));
        let metrics = free_port();
        args.push("--metrics".into());
        args.push(format!("127.0.0.1:{metrics}").into());
        let primary = Node::builder("p", &p_store, port, args)
            .log(dir.path().join("p.log"))
            .ready(Ready::Readyz(metrics))
            .start();
        Setup {
            dir,
            fs,
            ballast: Some(ballast),
            replica,
            primary,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.primary.uri(), self.dir.path(), "c")
    }

    /// Chunk `i`'s bytes.
    fn chunk(&self, i: u64) -> Data {
        data(
            self.dir.path(),
            &format!("chunk{i}"),
            100 + i,
            CHUNK as usize,
        )
    }

    /// Writes chunks (each followed by a FLUSH) until a FLUSH fails; returns the chunks
    /// written and that FLUSH's answer.
    fn write_until_a_flush_fails(&self, c: &mut Client) -> (Vec<Data>, serde_json::Value) {
        let mut written = Vec::new();
        loop {
            let i = written.len() as u64;
            assert!(
                i * CHUNK < VOLUME,
                "every FLUSH succeeded with the replica's filesystem full"
            );
            let d = self.chunk(i);
            c.write_ok(i * CHUNK, &d);
            written.push(d);
            let v = c.flush();
            if v["ok"] != true {
                return (written, v);
            }
        }
    }

    /// How often the replica has said its filesystem is full.
    fn full_lines(&self) -> usize {
        self.replica.lines_with(0, &[FULL]).len()
    }

    /// Removes the ballast: the replica's filesystem has room again.
    fn free_space(&mut self) {
        if let Some(b) = self.ballast.take() {
            b.remove();
        }
    }

    /// Stops both nodes and checks the replica holds exactly the primary's image, which
    /// holds every chunk written.
    fn stop_and_compare(mut self, written: &[Data]) {
        self.primary.stop_ok();
        self.replica.stop_ok();
        let image = |store: &Path, name: &str| {
            let path = self.dir.path().join(format!("{name}.img"));
            run_ok(blockrep_timed(120).arg("export").arg(store).arg(&path));
            std::fs::read(&path).expect("read the exported image")
        };
        let p = image(&self.primary.store, "p");
        let r = image(&self.replica.store, "r1");
        for (i, d) in written.iter().enumerate() {
            let at = i * CHUNK as usize;
            assert!(
                p[at..at + d.bytes.len()] == d.bytes[..],
                "chunk {i} is not on the primary"
            );
        }
        assert!(p == r, "the replica's image is not the primary's");
        drop(self.fs);
    }
}

/// How often the primary's log said that r1 refused for a full filesystem.
fn primary_full_lines(p: &Node) -> usize {
    p.log()
        .lines()
        .filter(|l| l.contains("replica=r1") && l.contains("NoSpace"))
        .count()
}

/// Waits for the primary's log to say r1 entered `state`, past `from`.
fn wait_state(p: &Node, from: usize, state: &str, secs: u64) -> String {
    let s = format!("state=\"{state}\"");
    p.wait_log(from, &["replica=r1", &s], secs)
}

#[test]
fn a_full_replica_under_sync_all_fails_flushes_with_enospc_and_is_caught_up_once_space_is_freed() {
    require_python_nbd();
    let mut s = Setup::start(&[]);
    let mut c = s.client();
    let (mut written, failed) = s.write_until_a_flush_fails(&mut c);
    assert_eq!(
        failed["errno"], "ENOSPC",
        "the FLUSH the replica could not take: {failed}"
    );
    assert!(
        written.len() >= 2,
        "no FLUSH succeeded before the filesystem filled"
    );
    assert!(s.replica.running(), "the replica died: {}", s.replica.log());
    // The primary heard why, as a typed reason.
    s.primary.wait_log(0, &["replica=r1", "NoSpace"], 10);
    // Still full: the primary redials (a catch-up each time) and the replica refuses again;
    // each of them says so once, not at every retry.
    let catch_ups = || {
        Scrape::of(s.primary.metrics_port()).get(
            "blockrep_recovery_sessions_total",
            &[("outcome", "catch_up")],
        )
    };
    let before = catch_ups();
    wait_until(
        Duration::from_secs(30),
        "two more catch-ups of the full replica",
        || {
            let now = catch_ups();
            if now >= before + 2.0 {
                Ok(())
            } else {
                Err(format!("{now} catch-ups, {before} before"))
            }
        },
    );
    assert_eq!(primary_full_lines(&s.primary), 1, "{}", s.primary.log());
    let v = c.flush();
    assert_eq!(
        v["errno"], "ENOSPC",
        "a FLUSH with the replica still full: {v}"
    );
    assert_eq!(s.full_lines(), 1, "{}", s.replica.log());
    for (i, d) in written.iter().enumerate() {
        c.check_equal(
            i as u64 * CHUNK,
            d,
            "a chunk written while the replica was full",
        );
    }

    s.free_space();
    wait_until(
        Duration::from_secs(30),
        "a FLUSH once the replica has room",
        || {
            let v = c.flush();
            if v["ok"] == true {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    s.replica.wait_log(0, &["the store has space again"], 10);
    s.primary
        .wait_log(0, &["replica=r1", "it stores entries again"], 10);
    // And it keeps taking writes.
    let i = written.len() as u64;
    let d = s.chunk(i);
    c.write_ok(i * CHUNK, &d);
    assert_ok(&c.flush(), "a FLUSH after the catch-up");
    written.push(d);
    assert!(s.replica.running());
    assert_eq!(s.full_lines(), 1, "{}", s.replica.log());
    assert_eq!(primary_full_lines(&s.primary), 1, "{}", s.primary.log());
    drop(c);
    s.stop_and_compare(&written);
}

#[test]
fn a_full_replica_under_best_effort_lags_without_failing_flushes_and_catches_up_once_space_is_freed(
) {
    require_python_nbd();
    let mut s = Setup::start(&["--commit", "best-effort"]);
    let admin = format!("127.0.0.1:{}", s.primary.metrics_port());
    let mut c = s.client();
    // Best-effort FLUSHes never wait for the replica: four chunks are more than its room.
    let mut written = Vec::new();
    for i in 0..4 {
        let d = s.chunk(i);
        c.write_ok(i * CHUNK, &d);
        assert_ok(&c.flush(), "a best-effort FLUSH");
        written.push(d);
    }
    s.replica.wait_log(0, &[FULL], 30);
    // It left the in-sync set as a lagging replica does, and FLUSHes go on succeeding.
    let line = s.primary.wait_log(0, &["replica=r1", "NoSpace"], 10);
    assert!(line.contains("state=\"disconnected\""), "{line}");
    assert!(s.replica.running(), "the replica died: {}", s.replica.log());
    let d = s.chunk(4);
    c.write_ok(4 * CHUNK, &d);
    assert_ok(&c.flush(), "a best-effort FLUSH with the replica full");
    written.push(d);

    s.free_space();
    s.replica.wait_log(0, &["the store has space again"], 30);
    // (The primary's log may have said in_sync already while it was full: a catch-up that
    // reaches our head hands over before the replica answers.)
    wait_until(
        Duration::from_secs(30),
        "the replica in sync and durable through the primary's log",
        || {
            let url = format!("http://{admin}/v1/status");
            let status: serde_json::Value =
                serde_json::from_str(&common::admin::get_ok(&url)).expect("status JSON");
            let head = status["durable_lsn"].as_u64().unwrap_or(u64::MAX);
            let r1 = &status["replicas"][0];
            let durable = r1["durable_lsn"].as_u64().unwrap_or(0);
            if r1["state"] == "in_sync" && durable >= head {
                Ok(())
            } else {
                Err(format!("r1 {r1}, the primary durable at {head}"))
            }
        },
    );
    assert_eq!(s.full_lines(), 1, "{}", s.replica.log());
    drop(c);
    s.stop_and_compare(&written);
}

#[test]
fn a_full_replica_refuses_base_data_during_its_rebuild_and_finishes_it_once_space_is_freed() {
    require("qemu-io");
    // More data than the primary's 64 MiB WAL holds, so the blank replica is rebuilt; room
    // on its filesystem for a fifth of it.
    let shape = Shape {
        volume: 128 * MIB,
        tmpfs: "224m",
        room: 16 * MIB,
        before: 80 * MIB,
    };
    let mut s = Setup::shaped(&shape, &["--commit", "best-effort"]);
    s.replica.wait_log(0, &[FULL, "base data"], 60);
    s.primary.wait_log(0, &["replica=r1", "NoSpace"], 10);
    assert!(s.replica.running(), "the replica died: {}", s.replica.log());

    let mark = s.primary.mark();
    s.free_space();
    s.replica.wait_log(0, &["the store has space again"], 60);
    s.primary.wait_log(mark, &["replica=r1", "rebuild"], 60);
    s.replica.wait_log(0, &["rebuild finished"], 120);
    let log = s.replica.log();
    assert_eq!(s.full_lines(), 1, "{log}");
    assert!(
        !log.contains("accepts no more writes"),
        "the store failed: {log}"
    );
    // Its image is the primary's once both stop (a clean stop makes it durable).
    let p = s.primary.log();
    assert!(!p.contains("fenced"), "{p}");
    s.stop_and_compare(&[]);
}
