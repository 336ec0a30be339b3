//! Replication, end to end: a `blockrep serve` primary and `blockrep replica` nodes as separate
//! processes on loopback, driven by real NBD clients (libnbd's Python binding, fio, nbdfuse +
//! ext4) and by hand-built replication frames.
//!
//! The contract under test (docs/PROTOCOL.md): a WRITE reply
//! is visibility only; a FLUSH reply means every write acknowledged before it is fsynced on the
//! primary and on the replicas the commit mode requires (sync-all: every configured replica,
//! sync-quorum: a majority of copies, best-effort: the primary alone); a FLUSH that cannot meet
//! its mode fails with EIO after the barrier timeout and never silently succeeds; epochs fence
//! an old primary after a promotion; a promotion that could lose committed data is refused
//! unless forced; a replica closes connections that send garbage and refuses stale epochs.
//!
//! Every child process is killed when its guard drops, and also (PR_SET_PDEATHSIG) when the
//! test thread that started it ends, so a failing test leaves nothing behind. Every external
//! one-shot command runs under `timeout`.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::client::{assert_eio, assert_ok, data};
use common::files::{sha256s, SMALL_SET};
use common::storm::{self, log_counts, Storm};
use common::*;

const BLOCK: u64 = 4096;
const VOLUME: u64 = 32 * MIB;
/// Short barrier timeout, so failing FLUSHes fail fast.
const BARRIER_MS: u64 = 1500;
const BARRIER: [&str; 2] = ["--barrier-timeout-ms", "1500"];

// ------------------------------------------------------------------------------ helpers

/// `blockrep create DIR --size SIZE --wal-size 64MiB` (a blank store: as a replica it joins
/// the volume of the first primary that connects).
fn create(parent: &Path, name: &str, size: u64) -> PathBuf {
    let dir = parent.join(name);
    run_ok(
        blockrep_timed(60)
            .arg("create")
            .arg(&dir)
            .arg("--size")
            .arg(size.to_string())
            .arg("--wal-size")
            .arg("64MiB"),
    );
    dir
}

fn export(store: &Path, image: &Path) {
    run_ok(blockrep_timed(120).arg("export").arg(store).arg(image));
}

fn export_image(store: &Path, image: &Path) -> Vec<u8> {
    export(store, image);
    std::fs::read(image).expect("read the exported image")
}

fn assert_holds(img: &[u8], off: u64, d: &Data, what: &str) {
    let got = &img[off as usize..off as usize + d.bytes.len()];
    assert_range_holds(got, off, &d.bytes, what);
}

fn assert_zero(img: &[u8], off: u64, len: u64, what: &str) {
    let got = &img[off as usize..(off + len) as usize];
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!(
            "{what}: byte {} of the range {off}+{len} is not zero",
            off + i as u64
        );
    }
}

fn assert_same_image(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: image sizes");
    if a != b {
        let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
        let differing = a
            .chunks(BLOCK as usize)
            .zip(b.chunks(BLOCK as usize))
            .filter(|(x, y)| x != y)
            .count();
        panic!(
            "{what}: images differ first at byte {first} (block {}); {differing} block(s) differ",
            first as u64 / BLOCK
        );
    }
}

// -------------------------------------------------------------------------------- nodes

/// A `blockrep replica` or `blockrep serve` process (its log `STORE.NAME.log`), ready once
/// its first stdout line contains `ready`; on failure returns the reason.
fn launch(
    name: &str,
    store: &Path,
    port: u16,
    args: Vec<OsString>,
    ready: &'static str,
) -> Result<Node, String> {
    Node::builder(name, store, port, args)
        .ready(Ready::Line(ready))
        .stop_timeout(30)
        .try_start()
}

fn replica(store: &Path, name: &str) -> Node {
    let port = free_port();
    let args = vec![
        "replica".into(),
        store.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    launch(name, store, port, args, "listening on").unwrap_or_else(|e| panic!("{e}"))
}

fn primary_args(store: &Path, port: u16, replicas: &[&Node], extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        store.into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    for r in replicas {
        args.push("--replica".into());
        args.push(format!("{}={}", r.name, r.addr()).into());
    }
    args.extend(extra.iter().map(OsString::from));
    args
}

fn try_primary(
    store: &Path,
    name: &str,
    replicas: &[&Node],
    extra: &[&str],
) -> Result<Node, String> {
    let port = free_port();
    let args = primary_args(store, port, replicas, extra);
    launch(name, store, port, args, "serving")
}

fn primary(store: &Path, name: &str, replicas: &[&Node], extra: &[&str]) -> Node {
    try_primary(store, name, replicas, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Blank stores `p`, `r1`..`rN` (the replicas join the primary's volume), the replicas
/// running, and the primary serving with `extra` arguments.
fn cluster(dir: &Path, size: u64, replicas: usize, extra: &[&str]) -> (Node, Vec<Node>) {
    let p_store = create(dir, "p", size);
    let reps: Vec<Node> = (1..=replicas)
        .map(|i| {
            let name = format!("r{i}");
            replica(&create(dir, &name, size), &name)
        })
        .collect();
    let refs: Vec<&Node> = reps.iter().collect();
    let p = primary(&p_store, "p", &refs, extra);
    (p, reps)
}

/// The primary's log line saying `replica` is in state `state`, past `from`.
fn wait_state(p: &Node, from: usize, replica: &str, state: &str, secs: u64) -> String {
    let r = format!("replica={replica}");
    let s = format!("state=\"{state}\"");
    p.wait_log(from, &[&r, &s], secs)
}

// ------------------------------------------------------------------------------- client

/// The FLUSH checks of these tests, against the short barrier timeout.
trait BarrierChecks {
    fn flush_fast(&mut self, what: &str);
    fn flush_times_out(&mut self, what: &str);
}

impl BarrierChecks for Client {
    /// A FLUSH that must succeed quickly: well inside the barrier timeout.
    fn flush_fast(&mut self, what: &str) {
        let v = self.flush();
        assert_ok(&v, what);
        let secs = v["secs"].as_f64().unwrap();
        assert!(
            secs < 1.0,
            "{what}: FLUSH took {secs:.3}s; with every required copy up it must not wait for \
             the {BARRIER_MS} ms barrier timeout"
        );
    }

    /// A FLUSH that must fail with EIO after the barrier timeout (not before, not much later).
    fn flush_times_out(&mut self, what: &str) {
        let v = self.flush();
        assert_eio(&v, what);
        let secs = v["secs"].as_f64().unwrap();
        let timeout = BARRIER_MS as f64 / 1000.0;
        assert!(
            secs >= timeout - 0.05 && secs < timeout + 3.0,
            "{what}: FLUSH failed after {secs:.3}s; the barrier timeout is {timeout}s"
        );
    }
}

// ------------------------------------------------------------------------- write storm

fn let_storm_run(
    storm: &mut KillOnDrop,
    log: &Path,
    min_w: usize,
    min_f: usize,
    min_time: Duration,
) {
    storm::let_storm_run(
        storm,
        log,
        (min_w, min_f),
        min_time,
        Duration::from_secs(60),
    );
}

/// `write_storm.py verify`: its JSON summary, or the failure output.
fn verify(image: &Path, logs: &[PathBuf]) -> Result<serde_json::Value, String> {
    storm::verify(image, logs, &[], 120)
}

fn verify_ok(image: &Path, logs: &[PathBuf], what: &str) -> serde_json::Value {
    let summary = verify(image, logs)
        .unwrap_or_else(|e| panic!("{what}: the image breaks the durability contract:\n{e}"));
    eprintln!("verify {what}: {summary}");
    summary
}

// =============================================================================== tests

/// Primary + 2 replicas (sync-all), a write storm with FLUSHes, SIGKILL of the primary in
/// the middle: every write an acknowledged FLUSH covered is on each replica (and on the
/// primary's own store after replay). As in crash_recovery.rs, SIGKILL keeps the page cache,
/// so this checks ordering (no FLUSH acknowledged before the replicas had the writes), not
/// fsync against power loss.
#[test]
fn every_acknowledged_flush_survives_primary_kill9_sync_all() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 2, &BARRIER);
    assert!(
        p.banner.contains("sync-all with 2 replica(s)"),
        "default mode with replicas: {}",
        p.banner
    );
    let log = tmp.path().join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(48)
        .dir(tmp.path())
        .spawn();
    let_storm_run(&mut storm, &log, 1500, 15, Duration::from_millis(2500));
    p.kill9();
    let st = storm.wait(30);
    assert!(
        st.success(),
        "the storm should exit quietly when the primary dies: {st}\n{}",
        storm.stderr_text()
    );
    eprintln!("storm: {}", storm.stderr_text().trim());
    let plog = p.log();
    assert!(
        !plog.contains("ERROR") && !plog.contains("needs_rebuild"),
        "the primary logged trouble during a healthy storm:\n{plog}"
    );
    // r1 stops cleanly; r2 is killed too, the stricter case: only what it had handed to the
    // kernel before acknowledging counts, no shutdown path helps it.
    reps[0].stop_ok();
    reps[1].kill9();
    let logs = vec![log];
    let mut images = Vec::new();
    for r in &reps {
        let image = tmp.path().join(format!("{}.img", r.name));
        export(&r.store, &image);
        let summary = verify_ok(&image, &logs, &r.name);
        assert!(
            summary["covered_writes"].as_u64().unwrap() >= 1000,
            "too few flushed writes to mean anything: {summary}"
        );
        images.push(std::fs::read(&image).unwrap());
    }
    let image = tmp.path().join("p.img");
    export(&p.store, &image);
    verify_ok(&image, &logs, "the killed primary after replay");
    // The replicas may differ in writes no FLUSH covered; report how much, for the record.
    let differing = images[0]
        .chunks(BLOCK as usize)
        .zip(images[1].chunks(BLOCK as usize))
        .filter(|(a, b)| a != b)
        .count();
    eprintln!("r1 and r2 differ in {differing} block(s) (writes no FLUSH covered)");
}

/// sync-all with a replica down: FLUSH fails with EIO after the barrier timeout, twice (no
/// silent success), the write before it stays readable; once the replica is back and caught
/// up, FLUSH succeeds and the replica holds the data.
#[test]
fn sync_all_replica_stopped_flush_fails_within_timeout() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 2, &BARRIER);
    let a = data(tmp.path(), "a", 1, 256 * 1024);
    let b = data(tmp.path(), "b", 2, 128 * 1024 + 512);
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    c.write_ok(0, &a);
    c.flush_fast("FLUSH with both replicas up");

    let mark = p.mark();
    reps[1].stop_ok();
    wait_state(&p, mark, "r2", "disconnected", 10);
    c.write_ok(MIB + 512, &b);
    c.flush_times_out("FLUSH under sync-all with r2 stopped");
    c.check_equal(MIB + 512, &b, "the write before the failed FLUSH");
    c.flush_times_out("a second FLUSH with r2 still stopped");
    c.check_equal(0, &a, "the flushed write");
    // FUA is the same promise for one write.
    let fua = data(tmp.path(), "fua", 3, 8192);
    let v = c.write_fua(3 * MIB, &fua);
    assert_eio(&v, "FUA write under sync-all with r2 stopped");
    let secs = v["secs"].as_f64().unwrap();
    assert!(
        secs >= BARRIER_MS as f64 / 1000.0 - 0.05,
        "the FUA write failed after {secs:.3}s, before the barrier timeout"
    );

    let mark = p.mark();
    reps[1].restart();
    let line = wait_state(&p, mark, "r2", "in_sync", 15);
    assert!(
        line.contains("caught up"),
        "r2 lacked the write before the failed FLUSH, so it must rejoin by catch-up: {line}"
    );
    c.flush_fast("FLUSH after r2 caught up");
    c.check_equal(MIB + 512, &b, "after the catch-up");
    let v = c.write_fua(3 * MIB, &fua);
    assert_ok(&v, "FUA write with both replicas in sync");
    assert!(v["secs"].as_f64().unwrap() < 1.0, "{v}");
    drop(c);

    // A restarted primary (new epoch) finds both replicas at zero gap and commits at once.
    p.stop_ok();
    let mark = p.mark();
    p.restart();
    assert!(p.banner.contains("epoch 2"), "{}", p.banner);
    for r in ["r1", "r2"] {
        let line = wait_state(&p, mark, r, "in_sync", 10);
        assert!(
            line.contains("zero gap"),
            "{r} after the primary's restart: {line}"
        );
    }
    let mut c = Client::connect(&p.uri(), tmp.path(), "p-again");
    c.check_equal(MIB + 512, &b, "after the primary's restart");
    let d = data(tmp.path(), "d", 4, 4096);
    c.write_ok(5 * MIB, &d);
    c.flush_fast("FLUSH after the primary's restart");
    drop(c);

    p.stop_ok();
    for r in &mut reps {
        r.stop_ok();
    }
    let pimg = export_image(&p.store, &tmp.path().join("p.img"));
    assert_holds(&pimg, 0, &a, "primary");
    assert_holds(&pimg, MIB + 512, &b, "primary");
    assert_holds(&pimg, 3 * MIB, &fua, "primary");
    assert_holds(&pimg, 5 * MIB, &d, "primary");
    for r in &reps {
        let img = export_image(&r.store, &tmp.path().join(format!("{}.img", r.name)));
        assert_holds(&img, 0, &a, &r.name);
        assert_holds(&img, MIB + 512, &b, &r.name);
        assert_holds(&img, 5 * MIB, &d, &r.name);
        assert_same_image(&img, &pimg, &format!("{} against the primary", r.name));
    }
}

/// sync-quorum with 3 copies: one replica hung (SIGSTOP) or down, FLUSH still succeeds (primary + the other
/// replica); both replicas down, FLUSH fails with EIO. The surviving replica holds exactly
/// what the successful FLUSH covered.
#[test]
fn sync_quorum_one_replica_stopped_flush_succeeds() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = BARRIER.to_vec();
    extra.extend(["--commit", "sync-quorum"]);
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 2, &extra);
    assert!(
        p.banner.contains("sync-quorum with 2 replica(s)"),
        "{}",
        p.banner
    );
    let a = data(tmp.path(), "a", 11, 64 * 1024);
    let b = data(tmp.path(), "b", 12, 192 * 1024);
    let c_data = data(tmp.path(), "c", 13, 64 * 1024);
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    c.write_ok(0, &a);
    c.flush_fast("FLUSH with every copy up");

    // First a hung r2 (SIGSTOP: its connection stays open, it just never answers).
    let hung = data(tmp.path(), "hung", 14, 64 * 1024);
    let mark = p.mark();
    reps[1].signal(libc::SIGSTOP);
    c.write_ok(2 * MIB, &hung);
    c.flush_fast("FLUSH under sync-quorum with r2 hung");
    let line = wait_state(&p, mark, "r2", "disconnected", 10);
    assert!(line.contains("no barrier acknowledgement"), "{line}");
    reps[1].signal(libc::SIGCONT);
    // Back in sync: by catch-up, or at zero gap if it still read the old session's entries
    // from its socket after SIGCONT. Either way the export below must hold the write.
    wait_state(&p, mark, "r2", "in_sync", 15);

    // Then r2 really stopped.
    let mark = p.mark();
    reps[1].stop_ok();
    wait_state(&p, mark, "r2", "disconnected", 10);
    c.write_ok(4 * MIB, &b);
    c.flush_fast("FLUSH under sync-quorum with r2 stopped (2 of 3 copies)");

    let mark = p.mark();
    reps[0].stop_ok();
    wait_state(&p, mark, "r1", "disconnected", 10);
    c.write_ok(8 * MIB, &c_data);
    c.flush_times_out("FLUSH under sync-quorum with only the primary left");
    c.check_equal(8 * MIB, &c_data, "the write before the failed FLUSH");
    drop(c);
    p.stop_ok();

    let r1 = export_image(&reps[0].store, &tmp.path().join("r1.img"));
    assert_holds(&r1, 0, &a, "r1");
    assert_holds(&r1, 4 * MIB, &b, "r1 (it made the quorum for this FLUSH)");
    assert_zero(&r1, 8 * MIB, 64 * 1024, "r1 (stopped before this write)");
    let r2 = export_image(&reps[1].store, &tmp.path().join("r2.img"));
    assert_holds(&r2, 0, &a, "r2");
    assert_holds(&r2, 2 * MIB, &hung, "r2 (caught up after the hang)");
    assert_zero(&r2, 4 * MIB, 192 * 1024, "r2 (stopped before this write)");
    let pimg = export_image(&p.store, &tmp.path().join("p.img"));
    assert_holds(&pimg, 8 * MIB, &c_data, "primary");
}

/// best-effort: a stopped replica does not hold FLUSH up, and the primary says it is gone.
#[test]
fn best_effort_flush_succeeds_and_replica_is_marked() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = BARRIER.to_vec();
    let admin = format!("127.0.0.1:{}", free_port());
    extra.extend(["--commit", "best-effort", "--metrics", &admin]);
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 1, &extra);
    assert!(
        p.banner.contains("best-effort with 1 replica(s)"),
        "{}",
        p.banner
    );
    wait_state(&p, 0, "r1", "in_sync", 10);
    let a = data(tmp.path(), "a", 21, 64 * 1024);
    let b = data(tmp.path(), "b", 22, 64 * 1024);
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    c.write_ok(0, &a);
    c.flush_fast("FLUSH with the replica up");
    // Best-effort answers the FLUSH on the local fsync alone: r1 follows as it can, so wait
    // until it reports the write durable before stopping it.
    wait_until(
        Duration::from_secs(10),
        format_args!("r1 to report the primary's durable LSN"),
        || {
            let status: serde_json::Value =
                serde_json::from_str(&common::admin::get_ok(&format!("http://{admin}/v1/status")))
                    .expect("status JSON");
            let head = status["durable_lsn"].as_u64().unwrap_or(u64::MAX);
            let r1 = status["replicas"][0]["durable_lsn"].as_u64().unwrap_or(0);
            if r1 >= head {
                Ok(())
            } else {
                Err(format!("r1 at {r1}, primary durable at {head}"))
            }
        },
    );

    let mark = p.mark();
    reps[0].stop_ok();
    let line = wait_state(&p, mark, "r1", "disconnected", 10);
    eprintln!("marked: {line}");
    // It keeps trying to reach the replica, and says so.
    let addr = reps[0].addr();
    p.wait_log(
        mark,
        &["replica=r1", &format!("cannot connect to {addr}")],
        10,
    );
    c.write_ok(MIB, &b);
    c.flush_fast("best-effort FLUSH with the replica stopped");
    c.flush_fast("a second best-effort FLUSH");
    c.check_equal(MIB, &b, "after the FLUSH");
    drop(c);
    let log = p.log();
    assert!(!log.contains("fenced"), "{log}");
    p.stop_ok();
    let pimg = export_image(&p.store, &tmp.path().join("p.img"));
    assert_holds(&pimg, 0, &a, "primary");
    assert_holds(&pimg, MIB, &b, "primary");
    let r1 = export_image(&reps[0].store, &tmp.path().join("r1.img"));
    assert_holds(&r1, 0, &a, "r1 (up for this FLUSH)");
}

/// Brief S3: a client keeps writing through primary P while r1 is promoted. r2 adopts the
/// new epoch, P is fenced: its FLUSH fails, it logs "fenced", later writes fail, and nothing
/// written through P after the promotion reaches r1 or r2.
#[test]
fn zombie_primary_is_fenced_after_promotion() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 2, &BARRIER);
    assert!(p.banner.contains("epoch 1"), "{}", p.banner);
    // Writes never stop (no FLUSH of its own); FLUSHes come from another connection.
    let log = tmp.path().join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(0)
        .dir(tmp.path())
        .spawn();
    let_storm_run(&mut storm, &log, 400, 0, Duration::from_millis(800));
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    // A FLUSH covers every write acknowledged before it was sent, on any connection: the
    // W lines already in the log.
    let covered = log_counts(&log).0;
    c.flush_fast("FLUSH during the storm, every copy up");

    // Manual failover: stop r1's replica process and promote its store.
    reps[0].stop_ok();
    let r2_mark = reps[1].mark();
    let mut r1p = primary(&reps[0].store, "r1p", &[&reps[1]], &BARRIER);
    assert!(
        r1p.banner.contains("epoch 2"),
        "the promotion must serve above every epoch seen: {}",
        r1p.banner
    );
    reps[1].wait_log(r2_mark, &["at epoch 2"], 10);

    // The zombie: a distinctive pattern through P, then FLUSH.
    let zombie = data(tmp.path(), "zombie", 31, 256 * 1024);
    let zombie_off = 16 * MIB;
    let v = c.write(zombie_off, &zombie);
    eprintln!("write through the old primary after the promotion: {v}");
    let v = c.flush();
    assert_eio(&v, "FLUSH through the old primary after the promotion");
    let fenced = p.wait_log(0, &["fenced"], 10);
    assert!(fenced.contains("epoch 2"), "{fenced}");
    let v = c.write(zombie_off + 4 * BLOCK, &zombie);
    assert_eio(&v, "a write through the fenced primary");
    let v = c.flush();
    assert_eio(&v, "a FLUSH through the fenced primary");
    // The storm's writes fail too, so it stops.
    let st = storm.wait(15);
    assert!(st.success(), "{st}: {}", storm.stderr_text());
    let storm_said = storm.stderr_text();
    assert!(
        storm_said.contains("server gone") && storm_said.contains("EIO"),
        "the storm should have been stopped by EIO from the fenced primary: {storm_said}"
    );
    assert!(
        p.running(),
        "a fenced primary keeps running (reads may continue)"
    );
    drop(c);

    // The new primary does not show the zombie's write.
    let mut c2 = Client::connect(&r1p.uri(), tmp.path(), "r1p");
    c2.check_zero(
        zombie_off,
        &zombie,
        "the new primary, where the zombie wrote",
    );
    drop(c2);
    // For the record: r2 received entries from P that r1 never had, so the new primary sees
    // it ahead of its own log (truncating such a tail is not built yet: NeedsRebuild).
    for l in r1p.log().lines().filter(|l| l.contains("replica=r2")) {
        eprintln!("new primary about r2: {l}");
    }

    let st = p.stop();
    assert!(
        st.success(),
        "the fenced primary on SIGTERM: {st}\n{}",
        p.log()
    );
    r1p.stop_ok();
    reps[1].stop_ok();
    assert_eq!(
        inspect_json(&reps[1].store)["epoch"],
        2,
        "r2 adopted epoch 2"
    );
    assert_eq!(
        inspect_json(&reps[0].store)["epoch"],
        2,
        "r1 served at epoch 2"
    );

    // Every write the FLUSH covered is on both; the zombie's pattern on neither.
    let text = std::fs::read_to_string(&log).unwrap();
    let flushed_log = tmp.path().join("storm-flushed.log");
    std::fs::write(&flushed_log, format!("{text}F {covered}\n")).unwrap();
    let logs = vec![flushed_log];
    for (name, store) in [("r1", &reps[0].store), ("r2", &reps[1].store)] {
        let image = tmp.path().join(format!("{name}.img"));
        let img = export_image(store, &image);
        assert_zero(
            &img,
            zombie_off,
            zombie.bytes.len() as u64,
            &format!("{name}: the zombie's writes after the promotion"),
        );
        let summary = verify_ok(&image, &logs, name);
        assert!(
            summary["covered_writes"].as_u64().unwrap() >= 300,
            "{summary}"
        );
    }
}

/// sync-quorum, r2 stopped, writes committed on P + r1, P stopped, r1 still running as a
/// replica. Returns (r1 running, r2 stopped, data written while r2 was up, data it lacks).
fn ineligible_setup(dir: &Path) -> (Node, Node, Node, Data, Data) {
    let mut extra = BARRIER.to_vec();
    extra.extend(["--commit", "sync-quorum"]);
    let (mut p, mut reps) = cluster(dir, VOLUME, 2, &extra);
    let a = data(dir, "a", 41, 64 * 1024);
    let b = data(dir, "b", 42, 64 * 1024);
    let c_data = data(dir, "c", 43, 4096);
    let mut c = Client::connect(&p.uri(), dir, "p");
    c.write_ok(0, &a);
    c.flush_fast("FLUSH with every copy up");
    let mark = p.mark();
    reps[1].stop_ok();
    wait_state(&p, mark, "r2", "disconnected", 10);
    c.write_ok(MIB, &b);
    c.flush_fast("FLUSH on P + r1");
    // One more round, so r1 also learns that B is committed (the committed LSN travels with
    // the primary's later frames).
    c.write_ok(2 * MIB, &c_data);
    c.flush_fast("FLUSH on P + r1");
    drop(c);
    p.stop_ok();
    let r2 = reps.pop().unwrap();
    let r1 = reps.pop().unwrap();
    (p, r1, r2, a, b)
}

#[test]
fn promotion_refuses_an_ineligible_replica() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let (_p, mut r1, r2, _a, _b) = ineligible_setup(tmp.path());
    let before = inspect_json(&r2.store);
    assert_eq!(before["epoch"], 1, "{before:#}");

    let port = free_port();
    let t = Instant::now();
    let out = run(blockrep_timed(30).env("NO_COLOR", "1").args(primary_args(
        &r2.store,
        port,
        &[&r1],
        &BARRIER,
    )));
    eprintln!("promotion of r2: {}", describe(&out));
    assert_eq!(
        out.status.code(),
        Some(1),
        "promoting r2, which lacks committed writes r1 knows of, must fail: {}",
        describe(&out)
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(!text(&out.stdout).contains("serving"), "{}", describe(&out));
    let stderr = strip_ansi(&text(&out.stderr));
    assert!(
        stderr.contains("refusing to promote") && stderr.contains("r1"),
        "the refusal should say so and name the member that knows more: {stderr}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing may serve NBD after a refused promotion"
    );
    let after = inspect_json(&r2.store);
    assert_eq!(
        after, before,
        "a refused promotion must leave the store as it was"
    );
    assert!(r1.running(), "r1 must be unaffected by the probe");
    r1.stop_ok();
    assert_eq!(
        inspect_json(&r1.store)["epoch"],
        1,
        "a probe must not change r1's epoch"
    );
}

#[test]
fn forced_promotion_is_explicit_and_logged() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let (_p, mut r1, r2, a, b) = ineligible_setup(tmp.path());
    let mut r2p = primary(
        &r2.store,
        "r2p",
        &[&r1],
        &["--force", "--barrier-timeout-ms", "1500"],
    );
    assert!(r2p.banner.contains("epoch 2"), "{}", r2p.banner);
    let line = r2p.wait_log(0, &["FORCED promotion"], 5);
    assert!(
        line.contains("WARN"),
        "a forced promotion is logged loudly: {line}"
    );
    // r1 holds entries r2 never had: it cannot follow the forced primary without a rebuild.
    wait_state(&r2p, 0, "r1", "needs_rebuild", 10);
    let mut c = Client::connect(&r2p.uri(), tmp.path(), "r2p");
    c.check_equal(0, &a, "what r2 had");
    c.check_zero(
        MIB,
        &b,
        "the committed write r2 lacked (lost by --force, as documented)",
    );
    drop(c);
    r2p.stop_ok();
    r1.stop_ok();
    assert_eq!(inspect_json(&r2.store)["epoch"], 2);
}

// --------------------------------------------------------------------- raw replication

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One frame as replication/src/wire.rs lays it out.
fn frame(kind: u8, epoch: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(24 + body.len());
    f.extend_from_slice(b"BRRP");
    // The wire version: 2 since HelloOk carries the rebuild cursor (docs/PROTOCOL.md).
    f.push(WIRE_VERSION);
    f.push(kind);
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&epoch.to_le_bytes());
    let mut covered = f[0..12].to_vec();
    covered.extend_from_slice(&f[16..24]);
    covered.extend_from_slice(body);
    let crc = crc32c(&covered);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(body);
    f
}

const K_HELLO: u8 = 1;
const K_ENTRIES: u8 = 3;
const K_BARRIER: u8 = 4;
const K_REJECT: u8 = 6;
const K_PROBE: u8 = 7;
const K_PROBE_REPLY: u8 = 8;
/// The frame header's version byte, written out here as the spec says, not taken from the
/// crate: these frames are a second, independent encoder.
const WIRE_VERSION: u8 = 2;

/// An Entries frame with one write of `payload` at `offset` as entry `lsn`.
fn entries_body(lsn: u64, epoch: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0u64.to_le_bytes()); // committed
    b.extend_from_slice(&1u32.to_le_bytes()); // one record
    b.extend_from_slice(&lsn.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.push(1); // write
    b.push(0);
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32c(payload).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the replica");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

struct RawFrame {
    kind: u8,
    epoch: u64,
    body: Vec<u8>,
}

/// Reads one frame; None at EOF. Panics on a timeout or a frame that does not check out.
fn read_frame(s: &mut TcpStream, what: &str) -> Option<RawFrame> {
    let mut h = [0u8; 24];
    let mut got = 0;
    while got < 24 {
        match s.read(&mut h[got..]) {
            Ok(0) if got == 0 => return None,
            Ok(0) => panic!("{what}: connection closed inside a frame header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && got == 0 => return None,
            Err(e) => panic!("{what}: reading a frame: {e}"),
        }
    }
    assert_eq!(&h[0..4], b"BRRP", "{what}: magic");
    assert_eq!(h[4], WIRE_VERSION, "{what}: version");
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    assert!(len < 1 << 20, "{what}: body of {len} bytes");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .unwrap_or_else(|e| panic!("{what}: reading a frame body: {e}"));
    let mut covered = h[0..12].to_vec();
    covered.extend_from_slice(&h[16..24]);
    covered.extend_from_slice(&body);
    assert_eq!(
        crc32c(&covered),
        u32::from_le_bytes(h[12..16].try_into().unwrap()),
        "{what}: frame checksum"
    );
    Some(RawFrame {
        kind: h[5],
        epoch: u64::from_le_bytes(h[16..24].try_into().unwrap()),
        body,
    })
}

/// The replica must close the connection (EOF or reset, within the read timeout) without
/// sending anything.
fn expect_closed_silently(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: the replica answered {n} bytes instead of closing"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the replica did not close the connection: {e}"),
    }
}

/// The replica must answer with a Reject carrying its epoch and `reason`, then close.
fn expect_reject(s: &mut TcpStream, epoch: u64, reason: u16, what: &str) -> String {
    let f = read_frame(s, what).unwrap_or_else(|| panic!("{what}: closed without a Reject"));
    assert_eq!(f.kind, K_REJECT, "{what}: expected a Reject frame");
    assert_eq!(
        f.epoch, epoch,
        "{what}: the Reject carries the replica's epoch"
    );
    let code = u16::from_le_bytes(f.body[0..2].try_into().unwrap());
    let n = u16::from_le_bytes(f.body[2..4].try_into().unwrap()) as usize;
    let msg = text(&f.body[4..4 + n]);
    assert_eq!(code, reason, "{what}: reject reason ({msg})");
    assert!(
        read_frame(s, what).is_none(),
        "{what}: the replica must close the connection after rejecting"
    );
    msg
}

#[test]
fn replica_rejects_garbage_truncated_and_stale_epoch_frames() {
    require_python_nbd();
    assert_eq!(crc32c(b"123456789"), 0xE306_9283, "the test's CRC32C");
    let tmp = tempfile::tempdir().unwrap();
    // Epoch 7, so 6 is a stale epoch a real old primary could have had.
    let mut extra = BARRIER.to_vec();
    extra.extend(["--epoch", "7"]);
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 1, &extra);
    assert!(p.banner.contains("epoch 7"), "{}", p.banner);
    let a = data(tmp.path(), "a", 51, 64 * 1024);
    let b = data(tmp.path(), "b", 52, 64 * 1024);
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    c.write_ok(0, &a);
    c.flush_fast("FLUSH before the garbage");
    let p_mark = p.mark();
    let addr = reps[0].addr();
    let evil = random_bytes(53, 4096);
    let evil_off = 4 * MIB;

    // A partial frame header left hanging for the whole test must not block anything.
    let mut stalled = raw(&addr);
    stalled.write_all(&frame(K_PROBE, 7, &[])[..9]).unwrap();

    // 1. Garbage.
    let mut s = raw(&addr);
    s.write_all(&random_bytes(54, 300)).unwrap();
    expect_closed_silently(&mut s, "garbage");
    // 2. A truncated header, then end of stream.
    let mut s = raw(&addr);
    s.write_all(&frame(K_BARRIER, 7, &[0u8; 16])[..10]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    expect_closed_silently(&mut s, "truncated header");
    // 3. A whole header whose body is cut short, then end of stream.
    let mut s = raw(&addr);
    let f = frame(K_BARRIER, 7, &[0u8; 16]);
    s.write_all(&f[..f.len() - 5]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    expect_closed_silently(&mut s, "truncated body");
    // 4. A header announcing a 4 GiB body (no half-close: the length alone must do).
    let mut s = raw(&addr);
    let mut f = frame(K_BARRIER, 7, &[]);
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&f).unwrap();
    expect_closed_silently(&mut s, "oversized body length");
    // 5. A bad checksum, on a frame at the replica's own epoch.
    let mut s = raw(&addr);
    let mut f = frame(K_ENTRIES, 7, &entries_body(1000, 7, evil_off, &evil));
    f[12] ^= 0x40;
    s.write_all(&f).unwrap();
    expect_closed_silently(&mut s, "bad frame checksum");
    // 6. An unknown kind.
    let mut s = raw(&addr);
    s.write_all(&frame(99, 7, &[1, 2, 3])).unwrap();
    expect_closed_silently(&mut s, "unknown frame kind");
    assert!(
        reps[0].running(),
        "the replica died after the malformed frames:\n{}",
        reps[0].log()
    );

    // What the replica holds (a plain probe, without a fence, is answered at any epoch).
    let mut s = raw(&addr);
    s.write_all(&frame(K_PROBE, 0, &[0])).unwrap();
    let reply = read_frame(&mut s, "probe").expect("a probe reply");
    assert_eq!(reply.kind, K_PROBE_REPLY);
    assert_eq!(reply.epoch, 7, "the replica follows epoch 7");
    let volume_id: [u8; 16] = reply.body[0..16].try_into().unwrap();
    let head = u64::from_le_bytes(reply.body[34..42].try_into().unwrap());
    assert!(head >= 1, "the replica holds the first write: head {head}");
    drop(s);

    // 7. Entries at a stale epoch that would be the very next entry: refused, not applied.
    let mut s = raw(&addr);
    s.write_all(&frame(
        K_ENTRIES,
        6,
        &entries_body(head + 1, 6, evil_off, &evil),
    ))
    .unwrap();
    let msg = expect_reject(&mut s, 7, 1, "entries at stale epoch 6");
    eprintln!("stale entries rejected: {msg}");
    // 8. A hello from a stale primary of the right volume.
    let mut hello = Vec::new();
    hello.extend_from_slice(&volume_id);
    hello.extend_from_slice(&VOLUME.to_le_bytes());
    hello.extend_from_slice(&[0x5a; 16]); // some primary store
    hello.extend_from_slice(&(head + 100).to_le_bytes());
    hello.extend_from_slice(&(head + 100).to_le_bytes());
    let mut s = raw(&addr);
    s.write_all(&frame(K_HELLO, 6, &hello)).unwrap();
    let msg = expect_reject(&mut s, 7, 1, "hello at stale epoch 6");
    eprintln!("stale hello rejected: {msg}");
    // 9. Entries at the current epoch, but without a session (no hello): refused too.
    let mut s = raw(&addr);
    s.write_all(&frame(
        K_ENTRIES,
        7,
        &entries_body(head + 1, 7, evil_off, &evil),
    ))
    .unwrap();
    let msg = expect_reject(&mut s, 7, 6, "entries without a session");
    eprintln!("sessionless entries rejected: {msg}");

    assert!(reps[0].running(), "the replica died:\n{}", reps[0].log());
    // The real primary's session was never disturbed, and replication still works.
    let plog = p.log();
    let since = &plog[p_mark.min(plog.len())..];
    assert!(
        !since.contains("replica=r1"),
        "the primary's session with r1 changed state while strangers talked to r1:\n{since}"
    );
    c.write_ok(MIB, &b);
    c.flush_fast("FLUSH after the garbage (sync-all: r1 must acknowledge)");
    drop(c);
    drop(stalled);
    p.stop_ok();
    reps[0].stop_ok();
    let img = export_image(&reps[0].store, &tmp.path().join("r1.img"));
    assert_holds(&img, 0, &a, "r1");
    assert_holds(&img, MIB, &b, "r1");
    assert_zero(
        &img,
        evil_off,
        evil.len() as u64,
        "r1: the rejected entries",
    );
}

// -------------------------------------------------------------- fio and ext4 (replicated)

/// The fio job: 4 KiB random writes over 200M..232M (past the 192 MiB file system), each
/// block verified by CRC32C, flushed at the end.
fn fio_args(verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=repl",
        "--rw=randwrite",
        "--bs=4k",
        "--offset=200M",
        "--size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randseed=4242",
        "--minimal",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if verify_only {
        a.push("--verify_only".into());
    } else {
        a.extend(["--do_verify=1".into(), "--end_fsync=1".into()]);
    }
    a
}

fn fio_ok(cmd: &mut Command) {
    let out = run(cmd);
    let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{t}",
        out.status
    );
    let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("3;")).collect();
    assert!(!lines.is_empty(), "no terse output from fio:\n{t}");
    for l in lines {
        let f: Vec<&str> = l.split(';').collect();
        assert_eq!(f[4], "0", "fio job {} reported error {}:\n{t}", f[2], f[4]);
    }
}

#[test]
fn replicated_volume_passes_fio_verify_and_ext4_fsck() {
    for t in [
        "fio",
        "nbdfuse",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
        "mount",
        "umount",
        "losetup",
        "sha256sum",
        "cp",
        "sync",
        "timeout",
    ] {
        require(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (FUSE is needed)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let (mut p, mut reps) = cluster(tmp.path(), size, 2, &BARRIER);

    // fio through the replicated primary: every block it wrote reads back intact.
    let mut fio = timed(180, "fio");
    fio.current_dir(tmp.path())
        .args(["--ioengine=nbd", "--iodepth=16"])
        .arg(format!("--uri={}", p.uri()))
        .args(fio_args(false));
    fio_ok(&mut fio);

    // ext4 (192 MiB, below fio's range) through nbdfuse and a loop mount.
    let src = tmp.path().join("src");
    let names = SMALL_SET.write(&src);
    let want = sha256s(&src, &names);
    let mut fuse = FuseMount::start(&p.uri(), tmp.path(), "p");
    run_ok(
        timed(120, "mkfs.ext4")
            .args(["-q", "-F"])
            .arg(fuse.dev())
            .arg("192M"),
    );
    fuse.mount_loop();
    run_ok(timed(120, "cp").arg("-r").arg(src.join(".")).arg(&fuse.mnt));
    assert_eq!(
        sha256s(&fuse.mnt, &names),
        want,
        "files right after writing them"
    );
    run_ok(&mut timed(60, "sync"));
    fuse.unmount_loop();
    fuse.unmount_fuse();
    drop(fuse);

    p.stop_ok();
    for r in &mut reps {
        r.stop_ok();
    }
    let mut images = Vec::new();
    for r in &reps {
        let image = tmp.path().join(format!("{}.img", r.name));
        export(&r.store, &image);
        let out = run(timed(120, "e2fsck").arg("-fn").arg(&image));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: e2fsck -fn on the replica's image found problems:\n{}",
            r.name,
            describe(&out)
        );
        let dump = tmp.path().join(format!("{}-files", r.name));
        std::fs::create_dir_all(&dump).unwrap();
        run_ok(
            timed(120, "debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", dump.display()))
                .arg(&image),
        );
        assert_eq!(
            sha256s(&dump, &names),
            want,
            "{}: files read from the replica's image",
            r.name
        );
        let mut fio = timed(180, "fio");
        fio.current_dir(tmp.path())
            .arg("--ioengine=psync")
            .arg(format!("--filename={}", image.display()))
            .args(fio_args(true));
        fio_ok(&mut fio);
        images.push(image);
    }
    // Everything was flushed under sync-all: both replicas hold the same image.
    let a = std::fs::read(&images[0]).unwrap();
    let b = std::fs::read(&images[1]).unwrap();
    assert_same_image(&a, &b, "r1 and r2 after a clean stop");
}

/// Brief S4: a replica that was down rejoins from the primary's retained WAL (catch-up, not
/// rebuild); once caught up it counts toward the mode again; all copies end up identical.
#[test]
fn restarted_replica_catches_up_without_rebuild() {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = BARRIER.to_vec();
    extra.extend(["--commit", "sync-quorum"]);
    let (mut p, mut reps) = cluster(tmp.path(), VOLUME, 2, &extra);
    let first = data(tmp.path(), "first", 61, 64 * 1024);
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    c.write_ok(0, &first);
    c.flush_fast("FLUSH with every copy up");

    let mark = p.mark();
    reps[1].stop_ok();
    wait_state(&p, mark, "r2", "disconnected", 10);
    // ~4 MiB while r2 is away, committed on P + r1.
    let chunks: Vec<Data> = (0..4)
        .map(|i| data(tmp.path(), &format!("away-{i}"), 70 + i, MIB as usize))
        .collect();
    for (i, d) in chunks.iter().enumerate() {
        c.write_ok(MIB + i as u64 * MIB, d);
    }
    c.flush_fast("FLUSH on P + r1 with r2 away");

    let mark = p.mark();
    reps[1].restart();
    let line = wait_state(&p, mark, "r2", "in_sync", 15);
    assert!(line.contains("caught up"), "{line}");
    let since = p.log()[mark..].to_string();
    assert!(
        since.contains("catching up") && !since.contains("needs_rebuild"),
        "r2 must rejoin by catch-up, never by rebuild:\n{since}"
    );

    // r2 counts again: with r1 stopped, a FLUSH can only meet the quorum through r2.
    let mark = p.mark();
    reps[0].stop_ok();
    wait_state(&p, mark, "r1", "disconnected", 10);
    let last = data(tmp.path(), "last", 80, 64 * 1024);
    c.write_ok(6 * MIB, &last);
    c.flush_fast("FLUSH on P + the caught-up r2");

    // r1 rejoins the same way, then every copy is equal.
    let mark = p.mark();
    reps[0].restart();
    let line = wait_state(&p, mark, "r1", "in_sync", 15);
    assert!(line.contains("caught up"), "{line}");
    let more = data(tmp.path(), "more", 81, 4096);
    c.write_ok(7 * MIB, &more);
    c.flush_fast("FLUSH with every copy back");
    drop(c);

    p.stop_ok();
    for r in &mut reps {
        r.stop_ok();
    }
    let pimg = export_image(&p.store, &tmp.path().join("p.img"));
    assert_holds(&pimg, 0, &first, "primary");
    for (i, d) in chunks.iter().enumerate() {
        assert_holds(&pimg, MIB + i as u64 * MIB, d, "primary");
    }
    assert_holds(&pimg, 6 * MIB, &last, "primary");
    assert_holds(&pimg, 7 * MIB, &more, "primary");
    for r in &reps {
        let img = export_image(&r.store, &tmp.path().join(format!("{}.img", r.name)));
        assert_same_image(&img, &pimg, &format!("{} against the primary", r.name));
    }
}

// ------------------------------------------------------------------------- a slow replica

/// A TCP relay to `upstream` that passes at most `rate` bytes per second towards it (and
/// everything back at once): a replica behind it is a slow replica.
fn throttled_relay(upstream: String, rate: u64) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut sent = 0u64;
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        // Pacing is what the relay is for: the replica behind it is slow.
                        std::thread::sleep(wait);
                    }
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Under sync-all a replica slower than the primary is one every FLUSH waits for anyway: it
/// paces the writers (the WAL it holds fills, and writers wait for space) and stays in sync,
/// instead of being thrown into a full rebuild once it lags by the retention budget.
#[test]
fn a_slow_replica_under_sync_all_paces_writes_and_is_never_rebuilt() {
    require_python_nbd();
    require("nbdcopy");
    const SIZE: u64 = 320 * MIB;
    // Four times the WAL: the writers are paced for ~6 s, longer than the barrier timeout
    // (4 s), while every ask is answered within ~2 s (a WAL's worth at the relay's rate).
    const WRITTEN: u64 = 256 * MIB;
    const RATE: u64 = 32 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let p_store = create(tmp.path(), "p", SIZE);
    let r1 = replica(&create(tmp.path(), "r1", SIZE), "r1");
    let r2 = replica(&create(tmp.path(), "r2", SIZE), "r2");
    let relay = throttled_relay(r2.addr(), RATE);
    let port = free_port();
    let extra = ["--commit", "sync-all", "--barrier-timeout-ms", "4000"];
    let mut args = primary_args(&p_store, port, &[&r1], &extra);
    args.extend(["--replica".into(), format!("r2={relay}").into()]);
    let mut p = launch("p", &p_store, port, args, "serving").unwrap_or_else(|e| panic!("{e}"));
    wait_state(&p, 0, "r1", "in_sync", 15);
    wait_state(&p, 0, "r2", "in_sync", 15);

    let src = tmp.path().join("src.img");
    let mut bytes = vec![0u8; WRITTEN as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&src, &bytes).unwrap();
    let mark = p.mark();
    let started = Instant::now();
    run_ok(
        Command::new("timeout")
            .arg("120")
            .arg("nbdcopy")
            .arg(&src)
            .arg(p.uri()),
    );
    let took = started.elapsed();
    let mut c = Client::connect(&p.uri(), tmp.path(), "p");
    let v = c.flush();
    assert_ok(&v, "FLUSH after the copy, with the slow replica in sync");
    drop(c);
    let since = p.log()[mark..].to_string();
    assert!(
        !since.contains("needs_rebuild") && !since.contains("rebuild"),
        "the slow replica must never be sent to a rebuild:\n{since}"
    );
    // More than the WAL went through a replica that takes 32 MiB/s: the writers waited for it.
    let floor = (WRITTEN - 64 * MIB) as f64 / RATE as f64 * 0.8;
    assert!(
        took.as_secs_f64() >= floor,
        "{WRITTEN} bytes were accepted in {took:?}, faster than the slow replica could take \
         them: it was not pacing the writers"
    );

    p.stop_ok();
    let pimg = export_image(&p.store, &tmp.path().join("p.img"));
    assert_same_image(
        &pimg[..WRITTEN as usize],
        &bytes,
        "primary against the source",
    );
    for mut r in [r1, r2] {
        r.stop_ok();
        let img = export_image(&r.store, &tmp.path().join(format!("{}.img", r.name)));
        assert_same_image(&img, &pimg, &format!("{} against the primary", r.name));
    }
}
