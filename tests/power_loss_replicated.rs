//! Power loss under a replicated volume, end to end: each store on its own
//! `blockrep-lazyfs` (tools/lazyfs; see power_loss.rs for what it keeps and drops), real
//! `blockrep serve` and `replica` processes, a write storm that logs its acknowledged
//! FLUSHes. A whole rack losing power must keep every FLUSH the commit mode promises on the
//! copies it names and let the cluster settle byte-identical; the primary losing power alone
//! must leave nothing in its data file the replicas then cut.
//! Run with `cargo test --test power_loss_replicated -- --test-threads=1`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::admin::Scrape;
use common::lazyfs::{crash_all, LazyMount};
use common::power::*;
use common::storm::{self, Storm};
use common::*;

const MAJORITY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/majority.py");
const BARRIER: [&str; 2] = ["--barrier-timeout-ms", "3000"];

/// `blockrep replica STORE` named `name`, logging next to the others in `logdir`.
fn replica(name: &str, store: &Path, logdir: &Path) -> Node {
    let port = free_port();
    launch(
        real_blockrep(),
        name,
        logdir,
        port,
        vec![
            "replica".into(),
            store.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
        ],
        "listening on",
    )
}

/// `blockrep serve STORE` named `p` with `extra` and every replica of `reps`; returns once
/// each replica is in sync.
fn primary(store: &Path, logdir: &Path, reps: &[Node], mut extra: Vec<String>) -> Node {
    for r in reps {
        extra.push("--replica".into());
        extra.push(format!("{}=127.0.0.1:{}", r.name, r.port));
    }
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let p = serve_node(real_blockrep(), store, logdir, "p", &extra_refs);
    for r in reps {
        p.wait_log(
            0,
            &[&format!("replica={}", r.name), "state=\"in_sync\""],
            30,
        );
    }
    p
}

/// The replica `rep`'s exported `image` holds exactly the primary's bytes `primary`: the
/// copies converged once everything rejoined and stopped cleanly.
fn assert_same_as_primary(primary: &[u8], image: &Path, p: &Node, rep: &Node) {
    let bytes = std::fs::read(image).unwrap();
    let Some(first) = first_difference(&bytes, primary) else {
        return;
    };
    panic!(
        "{} differs from the primary after rejoining and a clean stop (first at byte {first}, \
         block {})\nthe primary's log:\n{}\n{}'s log:\n{}",
        rep.name,
        first as u64 / BLOCK,
        p.log(),
        rep.name,
        rep.log()
    );
}

/// Primary and two replicas, each store on its own lazyfs; a storm with FLUSHes; every
/// filesystem crashed (one right after the other), then every node killed: the whole rack
/// lost power. The commit mode's promise must hold in what the disks kept, and again
/// after the cluster restarts and settles.
fn rack_power_loss(commit: &str, torn: Option<u64>) {
    require_tools();
    let tmp = test_dir();
    let names = ["p", "r1", "r2"];
    let mounts: Vec<LazyMount> = names
        .iter()
        .map(|n| LazyMount::start(tmp.path(), n))
        .collect();
    let stores: Vec<PathBuf> = mounts.iter().map(|m| m.path("vol")).collect();
    for s in &stores {
        create_store_with(real_blockrep(), s, VOLUME);
    }
    for m in &mounts {
        m.set_sync_delay(2);
    }
    let mut reps = vec![
        replica(names[1], &stores[1], tmp.path()),
        replica(names[2], &stores[2], tmp.path()),
    ];
    let mut extra: Vec<String> = BARRIER.iter().map(|s| s.to_string()).collect();
    extra.extend(["--commit".to_string(), commit.to_string()]);
    let mut p = primary(&stores[0], tmp.path(), &reps, extra);

    let log = tmp.path().join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(128)
        .spawn();
    let_storm_run(&mut storm, &log, 800, 10, Duration::from_millis(2000));
    // The power loss: the three filesystems crash one right after the other (microseconds
    // apart) while the nodes run; the nodes only meet EIO after that, and are then killed.
    let refs: Vec<&LazyMount> = mounts.iter().collect();
    let reports = crash_all(&refs, torn, false);
    p.kill9();
    for r in &mut reps {
        r.kill9();
    }
    storm_ends(&mut storm);
    let logs = vec![log];

    // What the disks kept.
    let mut images = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        let info = inspect_json(s);
        assert_eq!(info["in_use"], false, "{}: {info:#}", names[i]);
        let image = tmp.path().join(format!("{}-crashed.img", names[i]));
        export(s, &image);
        images.push(image);
    }
    let what = |i: usize| {
        format!(
            "{} after the power loss ({commit}, {})",
            names[i], reports[i]
        )
    };
    // The primary fsyncs its own WAL for every FLUSH in every mode.
    let summary = verify_ok(&images[0], &logs, &what(0));
    assert!(
        summary["covered_writes"].as_u64().unwrap() >= 500,
        "too few flushed writes to mean anything: {summary}"
    );
    match commit {
        "sync-all" => {
            for (i, image) in images.iter().enumerate().skip(1) {
                verify_ok(image, &logs, &what(i));
            }
        }
        "sync-quorum" => {
            let out = run(timed(180, SYSTEM_PYTHON)
                .arg(MAJORITY)
                .args(&images)
                .arg("--logs")
                .args(&logs)
                .arg("--blocks")
                .arg(storm::REGION_BLOCKS.to_string())
                .arg("--need")
                .arg("2"));
            assert!(
                out.status.success(),
                "sync-quorum: a flushed write is not on a majority of the copies after the \
                 power loss:\n{}",
                describe(&out)
            );
            eprintln!("majority: {}", text(&out.stdout).trim());
        }
        other => panic!("unknown commit mode {other}"),
    }

    // The rack comes back: replicas first, then the primary (a new epoch); the replicas
    // rejoin (catch-up or rebuild), then everything stops cleanly.
    for r in &mut reps {
        r.restart();
    }
    let mark = p.log().len();
    p.restart();
    assert!(
        !p.log()[mark..].contains("refus"),
        "the primary refused its store after the power loss:\n{}",
        p.log()
    );
    for r in ["r1", "r2"] {
        p.wait_log(mark, &[&format!("replica={r}"), "state=\"in_sync\""], 90);
    }
    p.stop_ok();
    for r in &mut reps {
        r.stop_ok();
    }
    // A clean stop leaves nothing past the checkpoint (the log may still hold entries below
    // it that a lagging replica pinned). Entries that replay finds past it are stale records
    // of the old epoch that the power loss left intact beyond a torn tail (unsynced writes
    // persisted out of order): catch-up rewrote the hole before them with the same LSNs and
    // epoch, so they became contiguous with the log again, although the primary's history
    // no longer has them.
    for (i, s) in stores.iter().enumerate() {
        let info = inspect_json(s);
        assert!(
            info["clean"] == true && info["head_lsn"] == info["checkpoint_lsn"],
            "{}: after a clean stop the store still replays WAL entries up to LSN {}, past \
             the checkpoint the clean stop wrote: stale pre-crash records resurrected (the \
             primary's history ends at the checkpoint); {info:#}",
            names[i],
            info["head_lsn"]
        );
    }
    let pimg = tmp.path().join("p-restarted.img");
    export(&stores[0], &pimg);
    verify_ok(&pimg, &logs, "the primary after the restart");
    let pbytes = std::fs::read(&pimg).unwrap();
    for i in 1..3 {
        let img = tmp.path().join(format!("{}-restarted.img", names[i]));
        export(&stores[i], &img);
        verify_ok(&img, &logs, &format!("{} after the restart", names[i]));
        assert_same_as_primary(&pbytes, &img, &p, &reps[i - 1]);
    }
}

#[test]
fn replicated_sync_all_rack_power_loss() {
    rack_power_loss("sync-all", None);
    rack_power_loss("sync-all", Some(21));
}

#[test]
fn replicated_sync_quorum_rack_power_loss() {
    rack_power_loss("sync-quorum", Some(31));
    rack_power_loss("sync-quorum", Some(41));
}

/// Invariant (*a replicated store's data file holds no entry its WAL could lose*): a
/// replicated store's checkpoint makes its WAL durable through its target before it writes a
/// block. Without FLUSHes nothing else syncs a primary's WAL; a power loss of the primary
/// alone must still leave its log reaching every entry its data file holds, or the replicas
/// (which keep those entries only past their commit, in their WALs) cut them when it comes
/// back and the copies differ on their blocks.
#[test]
fn a_replicated_store_s_data_file_holds_no_entry_its_wal_could_lose() {
    require_tools();
    let tmp = test_dir();
    let fs = LazyMount::start(tmp.path(), "p");
    let stores = [
        fs.path("vol"),
        tmp.path().join("r1-vol"),
        tmp.path().join("r2-vol"),
    ];
    for s in &stores {
        create_store_with(real_blockrep(), s, VOLUME);
    }
    let mut reps: Vec<Node> = (1..3)
        .map(|i| replica(&format!("r{i}"), &stores[i], tmp.path()))
        .collect();
    let metrics = free_port();
    let extra: Vec<String> = vec![
        "--commit".into(),
        "sync-all".into(),
        "--flush-interval-ms".into(),
        "50".into(),
        "--metrics".into(),
        format!("127.0.0.1:{metrics}"),
    ];
    let mut p = primary(&stores[0], tmp.path(), &reps, extra);

    let log = tmp.path().join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(0)
        .spawn();
    let_storm_run(&mut storm, &log, 400, 0, Duration::from_millis(500));
    wait_until(
        Duration::from_secs(60),
        "the primary never checkpointed under the storm",
        || {
            let lsn = Scrape::of(metrics).get("blockrep_lsn", &[("kind", "checkpoint")]);
            if lsn > 0.0 {
                Ok(())
            } else {
                Err(format!("checkpoint LSN {lsn}"))
            }
        },
    );
    let_storm_run(&mut storm, &log, 800, 0, Duration::from_millis(500));
    let report = fs.crash_when_dirty(None);
    p.kill9();
    storm_ends(&mut storm);
    let info = inspect_json(&stores[0]);
    eprintln!("p after the power loss ({report}): {info:#}");
    let lsn = |key: &str| {
        info[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key}: {info:#}"))
    };
    assert!(
        lsn("data_through") <= lsn("head_lsn"),
        "the primary's data file holds entries past the end of the log the power loss left \
         it: {info:#}"
    );

    let mark = p.log().len();
    p.restart();
    for r in ["r1", "r2"] {
        p.wait_log(mark, &[&format!("replica={r}"), "state=\"in_sync\""], 90);
    }
    p.stop_ok();
    for r in &mut reps {
        r.stop_ok();
    }
    let images: Vec<PathBuf> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let image = tmp.path().join(format!("{i}.img"));
            export(s, &image);
            image
        })
        .collect();
    let pbytes = std::fs::read(&images[0]).unwrap();
    for i in 1..3 {
        assert_same_as_primary(&pbytes, &images[i], &p, &reps[i - 1]);
    }
}
