//! Resumable rebuilds end to end, with real processes: a 1 GiB volume holding 512 MiB of
//! data, a blank replica rebuilding under a small fio write load (best-effort, so the load
//! runs while the replica is out of sync), interrupted at about half way, and restarted. The
//! rebuild resumes from the replica's durable cursor: the primary sends well under 60% of
//! the base again (its `blockrep_rebuild_sent_bytes_total`), the metrics and both logs say it
//! resumed, and the replica ends byte-identical to the primary (`blockrep export` of both).
//! Once with the replica SIGKILLed, once with the primary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::admin::{launch_admin, AdminNode};
use common::{
    blockrep_timed, create_store_sized, free_port, require, run_ok, wait_until, KillOnDrop, Node,
    MIB,
};
use serde_json::Value;

/// Base data: what the volume holds before the replica joins.
const DATA: u64 = 512 * MIB;
/// Slow enough that "half way" lasts for seconds (512 MiB take about 13 s), fast enough for
/// a test.
const RATE: &str = "40MiB";

fn require_tools() {
    for tool in ["fio", "nbdcopy", "cmp"] {
        require(tool);
    }
}

/// The primary (best-effort, replica `r1` at `r1_addr`), restartable with the same ports.
fn primary(store: &Path, r1_addr: &str) -> Node {
    let (port, metrics) = (free_port(), free_port());
    let args = vec![
        "serve".to_string(),
        store.display().to_string(),
        "--nbd".into(),
        format!("127.0.0.1:{port}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics}"),
        "--commit".into(),
        "best-effort".into(),
        "--rebuild-rate".into(),
        RATE.into(),
        "--replica".into(),
        format!("r1={r1_addr}"),
    ];
    launch_admin("p", store, port, metrics, args)
}

fn replica(store: &Path) -> Node {
    let (port, metrics) = (free_port(), free_port());
    let args = vec![
        "replica".to_string(),
        store.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics}"),
    ];
    launch_admin("r1", store, port, metrics, args)
}

/// A 1 GiB store for the primary holding 512 MiB of random data in its first half, written
/// through a single node with nbdcopy; and a blank store for the replica.
fn volume_and_blank_replica(dir: &Path) -> (PathBuf, PathBuf) {
    let p_store = create_store_sized(dir, "p", "1GiB");
    let r_store = create_store_sized(dir, "r1", "1GiB");
    let data = dir.join("data.bin");
    run_ok(
        Command::new("head")
            .arg("-c")
            .arg(DATA.to_string())
            .arg("/dev/urandom")
            .stdout(std::fs::File::create(&data).expect("data file")),
    );
    let mut alone = common::serve(&p_store, &[]);
    run_ok(common::timed(300, "nbdcopy").arg(&data).arg(alone.uri()));
    alone.stop_ok();
    std::fs::remove_file(&data).expect("remove the data file");
    (p_store, r_store)
}

/// 4 KiB random writes over the first 64 MiB at 512 KiB/s, a FLUSH every 64, until killed:
/// the WAL it writes during a rebuild stays well inside the retention budget.
fn load(dir: &Path, name: &str, uri: &str) -> KillOnDrop {
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir).args([
        &format!("--name={name}"),
        "--thread",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=4",
        "--size=64M",
        "--fsync=64",
        "--rate=512k",
        "--time_based",
        "--runtime=600",
        "--output=/dev/null",
    ]);
    KillOnDrop::spawn_group(
        &mut cmd,
        &format!("fio {name}"),
        dir.join(format!("fio-{name}.stderr")),
    )
}

/// Replica r1 as the primary's status report shows it.
fn r1(p: &Node) -> Value {
    p.status()["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "r1").cloned())
        .unwrap_or(Value::Null)
}

fn metric(p: &Node, name: &str, labels: &[(&str, &str)]) -> u64 {
    p.scrape().find(name, labels).unwrap_or(0.0) as u64
}

/// Waits until the replica's durable cursor covers at least half of the base data.
fn wait_half_way(r: &Node) -> u64 {
    wait_until(
        Duration::from_secs(120),
        format_args!("r1's rebuild cursor to pass {} MiB", DATA / 2 / MIB),
        || match r.status()["rebuild_cursor_bytes"].as_u64() {
            Some(at) if at >= DATA / 2 => Ok(at),
            other => Err(format!("{other:?}")),
        },
    )
}

/// Waits until r1 is in sync again after its (resumed) rebuild.
fn wait_rebuilt(p: &Node) -> Value {
    wait_until(
        Duration::from_secs(180),
        format_args!("r1 in sync after its rebuild"),
        || {
            let r = r1(p);
            if r["state"] == "in_sync" && r["reason"] == "rebuilt" {
                Ok(r)
            } else {
                Err(r.to_string())
            }
        },
    )
}

/// With the load stopped: r1 durable through the primary's head, both nodes stopped, and
/// their exports identical.
fn stop_and_compare(dir: &Path, p: &mut Node, r: &mut Node) {
    wait_until(
        Duration::from_secs(60),
        format_args!("r1 durable through the primary's head"),
        || {
            let st = p.status();
            let head = st["head_lsn"].as_u64().unwrap_or(0);
            let durable = r1(p)["durable_lsn"].as_u64().unwrap_or(0);
            if durable >= head {
                Ok(())
            } else {
                Err(format!("head {head}, r1 durable {durable}"))
            }
        },
    );
    p.stop_ok();
    r.stop_ok();
    let (pimg, rimg) = (dir.join("p.img"), dir.join("r1.img"));
    for (store, img) in [(&p.store, &pimg), (&r.store, &rimg)] {
        run_ok(blockrep_timed(300).arg("export").arg(store).arg(img));
    }
    run_ok(Command::new("cmp").arg(&pimg).arg(&rimg));
}

/// What the resumed attempt sent, from the primary's metric: the total once r1 is in sync,
/// less the total when the interrupted attempt was over.
fn assert_resumed(p: &Node, r: &Node, sent_before: u64, p_mark: usize, r_mark: usize) {
    let done = wait_rebuilt(p);
    let sent = metric(p, "blockrep_rebuild_sent_bytes_total", &[]) - sent_before;
    eprintln!(
        "resumed rebuild sent {} MiB of {} MiB of base; r1: {done}",
        sent >> 20,
        DATA >> 20
    );
    assert!(
        sent < DATA * 6 / 10,
        "the resumed rebuild sent {sent} bytes, not under 60% of the {DATA}-byte base; the \
         primary about r1:\n{}\nr1:\n{}",
        p.lines_with(p_mark, &["r1"]).join("\n"),
        r.log_since(r_mark)
    );
    assert_eq!(metric(p, "blockrep_rebuild_resumed_total", &[]), 1);
    for reason in [
        "no-cursor",
        "lineage-changed",
        "wal-recycled",
        "older-image",
    ] {
        assert_eq!(
            metric(p, "blockrep_rebuild_restarted_total", &[("reason", reason)]),
            0,
            "{reason}"
        );
    }
    p.wait_log(
        p_mark,
        &["replica=r1", "resuming the rebuild from byte"],
        30,
    );
    r.wait_log(
        r_mark,
        &["resuming the rebuild from the primary's base"],
        30,
    );
    let last = &done["last_rebuild"];
    assert_eq!(last["resumes"], 1, "{done}");
    assert!(
        last["seconds_to_in_sync"].as_f64().is_some_and(|s| s > 0.0),
        "{done}"
    );
}

#[test]
fn a_replica_killed_half_way_through_its_rebuild_resumes_it() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (p_store, r_store) = volume_and_blank_replica(dir);
    let mut r = replica(&r_store);
    let mut p = primary(&p_store, &r.addr());
    let mut fio = load(dir, "load", &p.uri());
    let at = wait_half_way(&r);
    r.kill9();
    wait_until(
        Duration::from_secs(30),
        format_args!("the primary to see r1's session end"),
        || match r1(&p)["state"].as_str() {
            Some("rebuilding") | None => Err("still rebuilding".to_string()),
            Some(s) => Ok(s.to_string()),
        },
    );
    let sent_before = metric(&p, "blockrep_rebuild_sent_bytes_total", &[]);
    eprintln!("r1 killed with {} MiB of the base durable", at >> 20);
    let (p_mark, r_mark) = (p.mark(), r.mark());
    r.restart();
    assert_resumed(&p, &r, sent_before, p_mark, r_mark);
    fio.kill9();
    stop_and_compare(dir, &mut p, &mut r);
}

#[test]
fn a_rebuild_resumes_after_the_primary_is_killed_half_way() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (p_store, r_store) = volume_and_blank_replica(dir);
    let mut r = replica(&r_store);
    let mut p = primary(&p_store, &r.addr());
    let mut fio = load(dir, "load", &p.uri());
    let half = wait_half_way(&r);
    // The load goes first (its server is about to vanish under it), and r1 writes one more
    // cursor after it: a primary killed with entries it had shipped but not yet written to
    // its WAL could not vouch for a cursor whose proof is one of them (it starts over,
    // `lineage-changed`, which is right but not what this test is about).
    fio.kill9();
    wait_until(
        Duration::from_secs(60),
        format_args!("r1 to write a cursor after the load stopped"),
        || match r.status()["rebuild_cursor_bytes"].as_u64() {
            Some(at) if at > half => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    p.kill9();
    let (p_mark, r_mark) = (p.mark(), r.mark());
    p.restart();
    // A new process: its counters start at zero, so all it sends is the resumed attempt's.
    let mut fio = load(dir, "load-after", &p.uri());
    assert_resumed(&p, &r, 0, p_mark, r_mark);
    fio.kill9();
    stop_and_compare(dir, &mut p, &mut r);
}
