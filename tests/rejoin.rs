//! An old primary rejoining after a failover, end to end, in the case that used to need a
//! rebuild (docs/PROTOCOL.md, "Rejoining after a failover"): the new primary's data file had
//! passed the old primary's log end before it was promoted, so the entries the old primary
//! lacks were only still in its WAL because, as a replica, it kept the WAL after the
//! committed LSN. The old primary must be caught up, not rebuilt, and end byte-identical.
//!
//! The old primary's store lives on `blockrep-lazyfs` so that a power loss takes the entries
//! it had shipped but not fsynced (a killed process keeps them in the page cache): that is
//! what leaves its log shorter than its replica's. Real processes on loopback throughout.
//! Run with `cargo test --test rejoin`.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use common::admin::{get_ok, http_get, parse_exposition, Scrape};
use common::client::{assert_ok, data};
use common::lazyfs::LazyMount;
use common::*;

const VOLUME: u64 = 32 * MIB;
const BLOCK: u64 = 4096;

fn create_store(store: &Path) {
    run_ok(
        blockrep_timed(120)
            .arg("create")
            .arg(store)
            .arg("--size")
            .arg(VOLUME.to_string())
            .arg("--wal-size")
            .arg("64MiB"),
    );
}

fn inspect(store: &Path) -> Value {
    let out = run_ok(blockrep_timed(60).arg("inspect").arg(store).arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect --json printed {out:?}: {e}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v:#}"))
}

/// `blockrep ARGS` as node `name`, logging to `LOGDIR/NAME.log` (never on the lazyfs
/// mount), ready once its first stdout line contains `ready` and its admin endpoint is up.
fn launch(name: &str, logdir: &Path, port: u16, args: Vec<OsString>, ready: &'static str) -> Node {
    Node::builder(name, logdir, port, args)
        .log(logdir.join(format!("{name}.log")))
        .ready(Ready::LineAndAdmin(ready))
        .start_timeout(90)
        .start()
}

fn replica(store: &Path, name: &str, logdir: &Path, port: u16) -> Node {
    let args: Vec<OsString> = vec![
        "replica".into(),
        store.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ];
    launch(name, logdir, port, args, "listening on")
}

/// `blockrep serve STORE` under sync-all with one replica, `peer` at `addr`.
fn primary(store: &Path, name: &str, logdir: &Path, peer: &str, addr: &str) -> Node {
    let port = free_port();
    let args: Vec<OsString> = vec![
        "serve".into(),
        store.into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
        "--commit".into(),
        "sync-all".into(),
        "--replica".into(),
        format!("{peer}={addr}").into(),
    ];
    launch(name, logdir, port, args, "serving")
}

fn status(n: &Node) -> Value {
    wait_until(
        Duration::from_secs(30),
        format_args!("{}: /v1/status", n.name),
        || {
            let url = format!("http://{}/v1/status", n.admin);
            match http_get(&url)? {
                (200, b) => serde_json::from_str::<Value>(&b).map_err(|e| format!("{e}: {b:?}")),
                (code, b) => Err(format!("{code}: {b}")),
            }
        },
    )
}

fn peer(st: &Value, name: &str) -> Value {
    st["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no replica {name} in the status: {st:#}"))
}

/// Waits until primary `p` counts replica `name` in sync; returns its status entry.
fn wait_in_sync(p: &Node, name: &str, secs: u64) -> Value {
    wait_until(
        Duration::from_secs(secs),
        format_args!("{}: {name} in sync; its log:\n{}", p.name, p.log_tail(0)),
        || {
            let r = peer(&status(p), name);
            if r["state"] == "in_sync" {
                Ok(r)
            } else {
                Err(format!("{r:#}"))
            }
        },
    )
}

/// `count` blocks of fresh data from block `first` on.
fn write_blocks(c: &mut Client, dir: &Path, tag: &str, first: u64, count: u64) -> Vec<(u64, Data)> {
    (first..first + count)
        .map(|b| {
            let d = data(
                dir,
                &format!("{tag}-{b}"),
                b ^ (tag.len() as u64) << 32,
                BLOCK as usize,
            );
            c.write_ok(b * BLOCK, &d);
            (b, d)
        })
        .collect()
}

fn export(store: &Path, image: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(image);
    run_ok(blockrep_timed(180).arg("export").arg(store).arg(image));
    std::fs::read(image).expect("exported image")
}

#[test]
fn an_old_primary_behind_the_new_primarys_data_file_is_caught_up_not_rebuilt() {
    require_python_nbd();
    require("umount");
    assert!(
        Path::new("/dev/fuse").exists(),
        "blockrep-lazyfs needs FUSE"
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mount = LazyMount::start(dir, "a");
    let a_store = mount.path("vol");
    let b_store: PathBuf = dir.join("b-vol");
    create_store(&a_store);
    create_store(&b_store);

    // a serves, b follows it in sync.
    let b_port = free_port();
    let mut b = replica(&b_store, "b", dir, b_port);
    let mut a = primary(&a_store, "a", dir, "b", &format!("127.0.0.1:{b_port}"));
    wait_in_sync(&a, "b", 60);
    let mut c = Client::connect(&a.uri(), dir, "a-client");
    let flushed = write_blocks(&mut c, dir, "flushed", 0, 64);
    assert_ok(&c.flush(), "FLUSH on a");
    // Written, shipped, never flushed: b holds them, a only in its page cache. a's own
    // syncs (a progress ask makes one) now take 3 s, so the power loss lands before any.
    mount.set_sync_delay(3000);
    let unflushed = write_blocks(&mut c, dir, "unflushed", 64, 64);
    let a_head = num(&status(&a), "head_lsn");
    wait_until(
        Duration::from_secs(30),
        "b to receive every entry a wrote",
        || {
            let h = num(&status(&b), "head_lsn");
            if h >= a_head {
                Ok(())
            } else {
                Err(format!("b at {h}, a at {a_head}"))
            }
        },
    );
    // b says what it keeps for a's rejoin: its WAL after the committed LSN it learned.
    let hold = &status(&b)["wal_hold"];
    assert_eq!(hold["reason"], "after-committed", "b's status: {hold:#}");
    let from = hold["from_lsn"].as_u64().expect("from_lsn");
    assert!(
        from > 0 && from <= a_head,
        "held from {from}, a's head {a_head}"
    );
    // Power loss under a: its unsynced WAL is gone.
    mount.crash(None);
    a.kill9();
    drop(c);
    let a_end = num(&inspect(&a_store), "head_lsn");
    assert!(
        a_end < a_head,
        "the power loss took none of a's unsynced entries (head {a_end}, was {a_head})"
    );

    // b is promoted after a clean stop, which writes all it holds to its data file.
    b.stop_ok();
    let b_info = inspect(&b_store);
    let (b_checkpoint, b_head) = (num(&b_info, "checkpoint_lsn"), num(&b_info, "head_lsn"));
    let b_wal_from = b_head + 1 - num(&b_info, "wal_entries");
    assert!(
        b_checkpoint > a_end,
        "b's data file ({b_checkpoint}) must be past a's log end ({a_end}): {b_info:#}"
    );
    assert!(
        b_wal_from <= a_end + 1,
        "b's WAL must still hold what a lacks (from {}), it holds from {b_wal_from}: {b_info:#}",
        a_end + 1
    );
    let a_port = free_port();
    let mut bp = primary(
        &b_store,
        "b-primary",
        dir,
        "a",
        &format!("127.0.0.1:{a_port}"),
    );
    assert!(bp.banner.contains("epoch 2"), "{}", bp.banner);
    let mut c = Client::connect(&bp.uri(), dir, "b-client");
    let after = write_blocks(&mut c, dir, "after", 200, 64);

    // The old primary comes back as b's replica.
    let mut ar = replica(&a_store, "a-replica", dir, a_port);
    let entry = wait_in_sync(&bp, "a", 120);
    assert_eq!(entry["reason"], "caught up", "{entry:#}");
    assert_ok(
        &c.flush(),
        "FLUSH on b, which sync-all answers only with a durable too",
    );
    let m = Scrape(parse_exposition(&get_ok(&format!(
        "http://{}/metrics",
        bp.admin
    ))));
    let outcome = |o: &str| {
        m.find("blockrep_recovery_sessions_total", &[("outcome", o)])
            .unwrap_or(0.0)
    };
    assert!(outcome("catch_up") >= 1.0, "no catch-up counted");
    assert_eq!(
        outcome("rebuild_started"),
        0.0,
        "the old primary was rebuilt"
    );
    assert_eq!(
        m.find("blockrep_rebuild_sent_bytes_total", &[])
            .unwrap_or(0.0),
        0.0
    );
    let log = bp.log();
    assert!(
        !log.contains("rebuilding from our base image"),
        "b's log says it rebuilt a:\n{log}"
    );
    for (what, blocks) in [
        ("flushed", &flushed),
        ("unflushed", &unflushed),
        ("after", &after),
    ] {
        for (b, d) in blocks.iter() {
            c.check_equal(b * BLOCK, d, &format!("{what} block {b} on b"));
        }
    }
    drop(c);

    ar.stop_ok();
    bp.stop_ok();
    let a_image = export(&a_store, &dir.join("a.img"));
    let b_image = export(&b_store, &dir.join("b.img"));
    assert!(
        a_image == b_image,
        "the old primary is not byte-identical to the new primary"
    );
}
