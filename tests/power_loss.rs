//! Power loss, end to end: every store lives on `blockrep-lazyfs` (tools/lazyfs), a FUSE
//! filesystem that keeps unsynced file data and unsynced directory changes in memory until
//! they are fsynced, and drops them on `blockrep-lazyfs crash` (optionally torn: a random,
//! seeded subset of each file's dirty pages survives). Killing a process never loses the
//! kernel's page cache, so the kill -9 tests in crash_recovery.rs cannot tell a store that
//! fsyncs from one that does not; these tests can, and `harness_bites_*` proves it with a
//! build of the store whose fsyncs are turned off (the `no-fsync` feature).
//!
//! A power loss is `crash` while the nodes run (they meet EIO from then on, never a later
//! state), then kill -9; recovery then sees exactly what the filesystem's backing directory
//! holds.
//!
//! The contract under test: after a power loss every write covered by an acknowledged FLUSH
//! is there byte for byte (on the replicas the commit mode names), no 4 KiB write is torn,
//! the superblock is readable, and recovery cuts torn WAL tails instead of refusing to open.
//!
//! Binaries: `blockrep` is this package's (`CARGO_BIN_EXE_blockrep`); `blockrep-lazyfs` is
//! another workspace member, so the first test that needs it runs `cargo build -p
//! blockrep-lazyfs` into this test binary's own target directory (normally a no-op when
//! `cargo test --workspace` built it already) and uses that file, never one found elsewhere; the
//! no-fsync `blockrep` is built the same way into `target/no-fsync`. Cargo holds no lock on a
//! target directory while tests run, so these builds do not wait for the test run.
//!
//! Every external command runs under `timeout`; every mount is unmounted by a Drop guard
//! (`umount`, then `umount -l`, then the daemon killed), every long-lived child gets SIGKILL
//! (SIGTERM for the filesystem daemons) when the test thread that started it ends.
//! This file holds a single node's power losses and ext4 on top; a replicated volume's are
//! in power_loss_replicated.rs, and the steps both take in tests/common/power.rs.
//! Run with `cargo test --test power_loss -- --test-threads=1`.

mod common;

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::admin::Scrape;
use common::files::{sha256s, FileSet, SMALL_SET};
use common::lazyfs::{cargo_build, lazyfs_bin, LazyMount};
use common::power::*;
use common::storm::{self, log_counts, Storm};
use common::*;

/// Blocks of a storm's large writes: 320 KiB, above the size a store places in its data file.
const LARGE_WRITE_BLOCKS: u32 = 80;

// ------------------------------------------------------------------------------ helpers

/// The store built with `--features no-fsync` (WAL, data file and superblock never synced),
/// in target/no-fsync of this checkout.
fn no_fsync_blockrep() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        cargo_build(
            &[
                "--features",
                "no-fsync",
                "--target-dir",
                "target/no-fsync",
                "--bin",
                "blockrep",
            ],
            "blockrep with --features no-fsync",
        );
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/no-fsync/debug/blockrep");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// `key=N` out of a crash or stats line.
fn field(line: &str, key: &str) -> u64 {
    let k = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&k))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn compare_over_nbd(uri: &str, image: &Path, what: &str) {
    if let Err(out) = storm::compare_over_nbd(uri, image, 180) {
        panic!(
            "{what}: the restarted server does not serve what offline recovery exported:\n{out}"
        );
    }
}

// ================================================================= the harness bites

/// The harness must be able to fail. The store built without its fsyncs (`no-fsync`) passes
/// a kill -9 on lazyfs (the page cache, here lazyfs's memory, survives a killed process), but
/// after `crash` it has lost writes that acknowledged FLUSHes covered, and the verifier says
/// so. The same steps with the real build pass (`single_node_power_loss_*`).
#[test]
fn harness_bites_a_store_without_fsync_loses_flushed_writes() {
    require_tools();
    let bin = no_fsync_blockrep();
    let tmp = test_dir();
    let fs = LazyMount::start(tmp.path(), "lazy");
    let store = fs.path("vol");
    create_store_with(bin, &store, VOLUME);

    // kill -9 alone: nothing is lost, whether or not anything was synced.
    let mut node = serve_node(bin, &store, tmp.path(), "nofsync", &[]);
    let log0 = tmp.path().join("storm-0.log");
    let mut storm = Storm::new(&node.uri(), &log0)
        .seq_base(1 << 40)
        .flush_every(16)
        .spawn();
    let_storm_run(&mut storm, &log0, 1000, 20, Duration::from_millis(1500));
    node.kill9();
    storm_ends(&mut storm);
    let stats = run_ok(timed(30, lazyfs_bin()).arg("stats").arg(&fs.mnt));
    eprintln!("before the crash: {stats}");
    assert!(
        field(&stats, "dirty_pages") > 0,
        "the no-fsync store synced nothing, so lazyfs must hold dirty pages: {stats}"
    );
    let logs = vec![log0];
    let image = tmp.path().join("after-kill9.img");
    export(&store, &image);
    let summary = verify_ok(&image, &logs, "no-fsync build after kill -9 (no crash)");
    assert!(
        summary["covered_writes"].as_u64().unwrap() >= 1000,
        "{summary}"
    );

    // Another storm, then a power loss: the flushed writes are gone.
    let mut node = serve_node(bin, &store, tmp.path(), "nofsync", &[]);
    let log1 = tmp.path().join("storm-1.log");
    let mut storm = Storm::new(&node.uri(), &log1)
        .seq_base(2 << 40)
        .flush_every(16)
        .spawn();
    let_storm_run(&mut storm, &log1, 1000, 20, Duration::from_millis(1500));
    let report = fs.crash(None);
    assert!(field(&report, "dropped_pages") > 0, "{report}");
    node.kill9();
    storm_ends(&mut storm);
    let logs = vec![logs[0].clone(), log1];
    let image = tmp.path().join("after-crash.img");
    export(&store, &image);
    match verify(&image, &logs) {
        Ok(summary) => panic!(
            "the harness does not bite: a store that never fsyncs kept every flushed write \
             through a power loss: {summary}"
        ),
        Err(out) => {
            assert!(
                out.contains("was flushed") || out.contains("lost write"),
                "the verifier should report lost flushed writes:\n{out}"
            );
            eprintln!(
                "as intended, the no-fsync build lost flushed writes:\n{}",
                out.lines().take(8).collect::<Vec<_>>().join("\n")
            );
        }
    }
}

// ========================================================================= single node

/// Rounds on one store on lazyfs: serve, a write storm with FLUSHes, power loss in the middle
/// (`crash`, plain or torn with a seed), kill -9; then the superblock must read, offline
/// recovery (export) must hold every flushed write intact (checked against every storm log
/// so far), and the restarted server must serve exactly that.
/// A round: torn seed (None: plain crash), FLUSH every N writes, sync delay (ms), extra
/// arguments for `serve`.
type Round<'a> = (Option<u64>, u32, u64, &'a [&'a str]);

/// Whether a torn crash leaves a torn WAL record is chance: the first unsynced page must be
/// kept and a later one of the same record dropped (about one torn crash in three here).
/// When the planned rounds met none, up to this many more torn rounds run (each one as
/// checked as the others) before the suite says the torn mode never exercised the cut.
const EXTRA_TORN_ROUNDS: u64 = 12;
/// The extra rounds' shape: rare FLUSHes, so many records are unsynced at the crash.
const EXTRA_TORN_ROUND: Round<'static> = (None, 2048, 1, &[]);

fn single_node_rounds(rounds: &[Round<'_>]) {
    require_tools();
    let tmp = test_dir();
    let fs = LazyMount::start(tmp.path(), "lazy");
    let store = fs.path("vol");
    create_store_with(real_blockrep(), &store, VOLUME);
    // `create` alone is durable: the store was built in a temporary directory, synced,
    // renamed into place and its parent synced.
    let report = fs.crash(None);
    assert_eq!(field(&report, "dropped_names"), 0, "{report}");
    let info = inspect_json(&store);
    assert_eq!(
        info["clean"], true,
        "a new store after a power loss: {info:#}"
    );
    let mut logs: Vec<PathBuf> = Vec::new();
    let mut torn_cuts = 0;
    let mut torn_rounds = 0;
    let mut kept_and_dropped = 0;
    let started = Instant::now();
    let mut plan: Vec<Round<'_>> = rounds.to_vec();
    let planned_torn = rounds.iter().filter(|r| r.0.is_some()).count();
    let mut extra_rounds = 0;
    let mut round = 0;
    while let Some(&(torn, flush_every, delay, extra)) = plan.get(round) {
        fs.set_sync_delay(delay);
        let name = format!("serve-{round}");
        let metrics = free_port();
        let metrics_addr = format!("127.0.0.1:{metrics}");
        let args: Vec<&str> = extra
            .iter()
            .copied()
            .chain(["--metrics", metrics_addr.as_str()])
            .collect();
        let mut node = serve_node(real_blockrep(), &store, tmp.path(), &name, &args);
        // The store's own I/O path reaches lazyfs through io_uring (the kernel turns its
        // requests into FUSE ones) unless the round asks for plain threads.
        let engine = if extra.contains(&"plain") {
            "I/O plain"
        } else {
            "I/O io_uring"
        };
        assert!(
            node.banner.contains(engine),
            "round {round}: {}",
            node.banner
        );
        if round > 0 {
            // The previous round's power loss was recovered from; note how.
            let log = node.log();
            assert!(
                !log.contains("refus"),
                "round {round}: recovery refused the store:\n{log}"
            );
            if log.contains("cut a torn record") {
                torn_cuts += 1;
            }
            compare_over_nbd(
                &node.uri(),
                &tmp.path().join(format!("image-{}.img", round - 1)),
                &format!("round {round}"),
            );
        }
        let log = tmp.path().join(format!("storm-{round}.log"));
        let mut storm = Storm::new(&node.uri(), &log)
            .seq_base((round as u64 + 1) << 40)
            .flush_every(flush_every);
        if round % 2 == 1 {
            // Large writes among the small ones: the store places those in its data file
            // (one synced write, then a record in the WAL), so the crash lands in that path too.
            storm = storm.large_every(8, LARGE_WRITE_BLOCKS);
        }
        let mut storm = storm.spawn();
        let_storm_run(&mut storm, &log, 600, 8, Duration::from_millis(1200));
        if round % 2 == 1 {
            let placed = Scrape::of(metrics).get("blockrep_placed_written_bytes_total", &[]);
            assert!(
                placed > 0.0,
                "round {round}: no write was placed in the data file, so the crash cannot land in that path"
            );
        }
        let report = fs.crash_when_dirty(torn);
        if torn.is_some() {
            torn_rounds += 1;
            if field(&report, "kept_pages") > 0 && field(&report, "dropped_pages") > 0 {
                kept_and_dropped += 1;
            }
        }
        node.kill9();
        storm_ends(&mut storm);
        logs.push(log);

        let info = inspect_json(&store);
        assert_eq!(info["in_use"], false, "round {round}: {info:#}");
        let image = tmp.path().join(format!("image-{round}.img"));
        export(&store, &image);
        let summary = verify_ok(&image, &logs, &format!("round {round} ({report})"));
        assert!(
            summary["covered_writes"].as_u64().unwrap() >= 300 * (round as u64 + 1),
            "too few flushed writes to mean anything: {summary}"
        );
        // This round's own cut shows in the next one's log, so one more round may run than
        // was needed.
        if round + 1 == plan.len()
            && planned_torn >= 4
            && torn_cuts == 0
            && extra_rounds < EXTRA_TORN_ROUNDS
        {
            extra_rounds += 1;
            let (_, flush_every, delay, extra) = EXTRA_TORN_ROUND;
            plan.push((Some(1000 + extra_rounds), flush_every, delay, extra));
        }
        round += 1;
    }
    // The last round's recovery, by the server itself.
    let mut node = serve_node(real_blockrep(), &store, tmp.path(), "final", &[]);
    if node.log().contains("cut a torn record") {
        torn_cuts += 1;
    }
    compare_over_nbd(
        &node.uri(),
        &tmp.path().join(format!("image-{}.img", plan.len() - 1)),
        "after the last round",
    );
    node.stop_ok();
    eprintln!(
        "{} rounds ({extra_rounds} of them added) in {:.1?}: {torn_rounds} torn crashes \
         ({kept_and_dropped} kept some pages and dropped others), {torn_cuts} recoveries cut a \
         torn WAL tail",
        plan.len(),
        started.elapsed()
    );
    if torn_rounds >= 4 {
        assert!(
            kept_and_dropped > 0,
            "no torn crash both kept and dropped pages: torn mode is not tearing anything"
        );
        assert!(
            torn_cuts > 0,
            "no recovery after {torn_rounds} torn crashes ({extra_rounds} added) met a torn WAL \
             tail: the torn mode never exercised the cut"
        );
    }
    // A clean unmount makes the view durable: BACKING_DIR alone now holds the store.
    drop(node);
    let backing_store = fs.backing.join("vol");
    let mut fs = fs;
    fs.unmount();
    let image = tmp.path().join("from-backing.img");
    export(&backing_store, &image);
    verify_ok(
        &image,
        &logs,
        "the store read from BACKING_DIR after unmounting lazyfs",
    );
}

const FAST_CHECKPOINTS: [&str; 2] = ["--flush-interval-ms", "150"];
const PLAIN_IO: [&str; 2] = ["--io-engine", "plain"];

/// A plain power loss (every unsynced page dropped), then torn ones with seeds 1..=4. FLUSH
/// intervals vary: with rare FLUSHes many WAL batches are written but not yet synced when the
/// power fails (the WAL writer writes every 2 ms and syncs only for a FLUSH).
#[test]
fn single_node_power_loss_plain_and_torn() {
    single_node_rounds(&[
        (None, 256, 0, &[]),
        (Some(1), 512, 2, &[]),
        (Some(2), 16, 0, &FAST_CHECKPOINTS),
        (Some(3), 2048, 1, &[]),
        (Some(4), 128, 3, &PLAIN_IO),
    ]);
}

/// More torn seeds (5..=10), with frequent checkpoints (so data file and superblock updates
/// are in flight at the crash) and both I/O engines.
#[test]
fn single_node_power_loss_torn_seeds() {
    single_node_rounds(&[
        (Some(5), 1024, 2, &FAST_CHECKPOINTS),
        (Some(6), 64, 0, &[]),
        (Some(7), 512, 1, &PLAIN_IO),
        (Some(8), 256, 3, &FAST_CHECKPOINTS),
        (Some(9), 4096, 0, &PLAIN_IO),
        (Some(10), 8, 2, &FAST_CHECKPOINTS),
    ]);
}

/// `blockrep up` creates its data directory, then the stores in it, then serves. Every
/// FLUSH it acknowledges must survive a power loss, which needs the data directory itself to
/// be durable: its entry in its parent must have been fsynced.
#[test]
fn blockrep_up_makes_its_data_directory_durable() {
    require_tools();
    let tmp = test_dir();
    let fs = LazyMount::start(tmp.path(), "lazy");
    let data = fs.path("blockrep-data");
    let port = free_port();
    let args: Vec<OsString> = vec![
        "up".into(),
        "--dir".into(),
        data.clone().into(),
        "--size".into(),
        "32MiB".into(),
        "--replicas".into(),
        "0".into(),
        "--commit".into(),
        "best-effort".into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    let mut node = launch(
        real_blockrep(),
        "up",
        tmp.path(),
        port,
        args,
        "created volume",
    );
    wait_for_port(port);
    let log = tmp.path().join("storm.log");
    let mut storm = Storm::new(&node.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(64)
        .spawn();
    let_storm_run(&mut storm, &log, 500, 5, Duration::from_millis(1000));
    let report = fs.crash(None);
    node.kill9();
    storm_ends(&mut storm);
    let (_, flushes) = log_counts(&log);
    let store = data.join("primary");
    assert!(
        store.join("superblock").exists(),
        "{flushes} acknowledged FLUSHes, and after the power loss ({report}) the whole store \
         is gone: {} does not exist. `blockrep up` creates its data directory with \
         create_dir_all (src/node.rs) and never fsyncs the directory that holds it, and \
         Store::create (storage/src/store/mod.rs) fsyncs only the store's immediate parent, \
         not ancestors its create_dir_all made; a restart would silently create a new, empty \
         volume there",
        store.display()
    );
    let image = tmp.path().join("up.img");
    export(&store, &image);
    verify_ok(&image, &[log], "blockrep up's store after the power loss");
}

// ============================================================================ ext4 on top

/// ext4 on the volume (nbdfuse + loop), files written and `sync`ed; then, while a writer
/// keeps creating files and syncing them, the power fails under the store (torn). After a
/// restart the journal replays, the synced files are intact and e2fsck finds nothing.
#[test]
fn ext4_on_the_volume_survives_a_power_loss_under_the_store() {
    require_tools();
    for t in [
        "nbdfuse",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "losetup",
        "sha256sum",
        "cp",
        "sync",
        "sh",
        "head",
    ] {
        require(t);
    }
    let tmp = test_dir();
    let fs = LazyMount::start(tmp.path(), "lazy");
    let store = fs.path("vol");
    create_store_with(real_blockrep(), &store, 256 * MIB);
    let src = tmp.path().join("src");
    let names = FileSet {
        count: 16,
        ..SMALL_SET
    }
    .write(&src);
    let want = sha256s(&src, &names);

    let mut node = serve_node(real_blockrep(), &store, tmp.path(), "serve", &[]);
    let mut nf = FuseMount::start(&node.uri(), tmp.path(), "nbd-0");
    run_ok(timed(180, "mkfs.ext4").args(["-q", "-F"]).arg(nf.dev()));
    nf.mount_loop();
    run_ok(timed(120, "cp").arg("-r").arg(src.join(".")).arg(&nf.mnt));
    assert_eq!(
        sha256s(&nf.mnt, &names),
        want,
        "files right after writing them"
    );
    run_ok(&mut timed(120, "sync"));
    // A slow disk: syncs take a while, so crashes often land while one is on its way.
    fs.set_sync_delay(3);

    for round in 0..3u64 {
        // Filesystem traffic at the instant of the power loss: files created and synced in
        // a loop, so the store holds WAL writes not yet covered by a FLUSH.
        let busy = tmp.path().join(format!("busy-{round}.log"));
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", "120", "sh", "-c"])
            .arg(
                "i=0; while [ $i -lt 3000 ]; do \
                 head -c $((4096 * (i % 37 + 1))) /dev/urandom > \"$1/late-$2-$i\" || exit 0; \
                 [ $((i % 5)) -eq 4 ] && sync; i=$((i+1)); done",
            )
            .arg("sh")
            .arg(&nf.mnt)
            .arg(round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&busy).unwrap());
        die_with_test(&mut cmd);
        let mut writer = KillOnDrop::new(
            cmd.spawn().expect("spawn the writer"),
            "the ext4 writer",
            Some(busy),
        );
        // The crash must meet a busy filesystem: the writer has created files and synced a
        // few times already.
        let mnt = nf.mnt.clone();
        let prefix = format!("late-{round}-");
        wait_until(Duration::from_secs(60), "the ext4 writer at work", || {
            assert!(
                writer.running(),
                "the writer stopped early: {}",
                writer.stderr_text()
            );
            let made = std::fs::read_dir(&mnt)
                .map(|d| {
                    d.filter(|e| {
                        e.as_ref()
                            .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    })
                    .count()
                })
                .unwrap_or(0);
            if made >= 25 {
                Ok(())
            } else {
                Err(format!("{made} files"))
            }
        });
        // The power fails under the store while ext4 is mounted and busy.
        let report = fs.crash_when_dirty(Some(51 + round));
        node.kill9();
        let _ = writer.child.kill();
        let t = Instant::now();
        nf.teardown();
        drop(nf);
        let _ = writer.wait(60);
        eprintln!(
            "round {round}: {report}; tearing down the dead mounts took {:.1?}",
            t.elapsed()
        );

        node = serve_node(real_blockrep(), &store, tmp.path(), "serve", &[]);
        nf = FuseMount::start(&node.uri(), tmp.path(), &format!("nbd-{}", round + 1));
        nf.mount_loop(); // replays the journal
        assert_eq!(
            sha256s(&nf.mnt, &names),
            want,
            "round {round}: synced files after the power loss"
        );
        let late = std::fs::read_dir(&nf.mnt)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("late-")
            })
            .count();
        eprintln!("round {round}: {late} files written during the storms of syncs are there");
        nf.unmount_loop();
        let out = run(timed(180, "e2fsck").arg("-fn").arg(nf.dev()));
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: e2fsck -fn after the power loss:\n{}",
            describe(&out)
        );
        nf.mount_loop();
    }
    nf.unmount_loop();
    drop(nf);
    node.stop_ok();
}
