//! Crash and durability, end to end: real `blockrep serve` processes killed with SIGKILL or
//! stopped with SIGTERM, real clients (libnbd's Python binding, nbdsh, nbdcopy, nbdfuse +
//! ext4 on a loop device), and direct damage to the WAL file.
//!
//! The contract under test: a WRITE reply makes the write visible, a FLUSH reply makes every
//! write acknowledged before it durable, SIGTERM makes every acknowledged write durable and
//! exits 0, and recovery cuts a torn WAL tail but refuses to open (naming the file and the
//! offset) when it would otherwise drop a record that later records prove was durable.
//!
//! Note: SIGKILL only loses what the process had not handed to the kernel yet; the page cache
//! survives. These tests therefore check the server's ordering and replay logic (a FLUSH is
//! not acknowledged before its writes reached the WAL file, replay finds them), not fsync
//! against power loss.
//!
//! Every external command runs under `timeout`, and mounts and processes are torn down by
//! Drop guards, so a hung FUSE mount cannot hang the test run.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::files::{e2fsck_clean, sha256s, FileSet};
use common::storm::{self, let_storm_run, Storm};
use common::*;

const BLOCK: u64 = 4096;
const STORM_VOLUME: u64 = 32 * MIB;
/// Keeps the flusher from checkpointing, so what was written stays in the WAL.
const NO_CHECKPOINT: [&str; 2] = ["--flush-interval-ms", "3600000"];

// ------------------------------------------------------------------------------ helpers

/// The storm script under the system python (which has the `nbd` module).
fn storm_script(secs: u64) -> Command {
    let mut c = timed(secs, SYSTEM_PYTHON);
    c.arg(storm::STORM_PY);
    c
}

fn export(store: &Path, image: &Path, engine: Option<&str>) {
    let mut cmd = blockrep_timed(120);
    cmd.arg("export").arg(store).arg(image);
    if let Some(e) = engine {
        cmd.args(["--io-engine", e]);
    }
    run_ok(&mut cmd);
}

fn assert_closed_cleanly(store: &Path) {
    let info = inspect_json(store);
    assert_eq!(info["clean"], true, "inspect after SIGTERM: {info:#}");
    assert_eq!(info["in_use"], false, "inspect after SIGTERM: {info:#}");
    assert_eq!(
        info["wal_entries"], 0,
        "a clean close leaves nothing to replay: {info:#}"
    );
}

/// Compares two images and names the first differing block.
fn assert_same_image(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: image size");
    if let Some(first) = first_difference(got, want) {
        let differing = got
            .chunks(BLOCK as usize)
            .zip(want.chunks(BLOCK as usize))
            .filter(|(a, b)| a != b)
            .count();
        panic!(
            "{what}: images differ first at byte {first} (block {}); {differing} block(s) differ",
            first as u64 / BLOCK
        );
    }
}

/// Reads the whole device over NBD with nbdcopy.
fn nbdcopy_dump(uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run_ok(timed(60, "nbdcopy").arg(uri).arg(out));
    std::fs::read(out).expect("read the nbdcopy dump")
}

/// PATH with /usr/bin first: nbdsh runs `python3 -m nbd`, and only the system python3 has
/// the binding (a pyenv python3 may come first on the inherited PATH).
fn system_path() -> String {
    format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs Python code in nbdsh connected to `uri`, expecting success.
fn nbdsh(uri: &str, code: &str) -> String {
    run_ok(
        timed(60, "nbdsh")
            .env("PATH", system_path())
            .args(["-u", uri, "-c", code]),
    )
}

/// Python code for nbdsh: write `writes` (volume offset, length, offset in `data`) from the
/// file `data`, each followed by a FLUSH when `flush` is set.
fn nbdsh_writes(data: &Path, writes: &[(u64, u64, u64)], flush: bool) -> String {
    let list: Vec<String> = writes
        .iter()
        .map(|(off, len, src)| format!("({off}, {len}, {src})"))
        .collect();
    format!(
        "d = open({:?}, 'rb').read()\n\
         for off, n, src in [{}]:\n    \
             h.pwrite(d[src:src + n], off)\n    \
             if {}: h.flush()\n",
        data.display().to_string(),
        list.join(", "),
        if flush { "True" } else { "False" }
    )
}

/// The volume image `writes` produce on a zeroed volume of `size` bytes.
fn apply_writes(size: u64, data: &[u8], writes: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    for &(off, len, src) in writes {
        img[off as usize..(off + len) as usize]
            .copy_from_slice(&data[src as usize..(src + len) as usize]);
    }
    img
}

// ------------------------------------------------------------------------- write storm

/// Runs the verifier; returns its JSON summary or its failure output.
fn verify(image: &Path, logs: &[PathBuf], all_acked: bool) -> Result<serde_json::Value, String> {
    let extra: &[&str] = if all_acked { &["--all-acked"] } else { &[] };
    storm::verify(image, logs, extra, 120)
}

fn verify_ok(image: &Path, logs: &[PathBuf], all_acked: bool) -> serde_json::Value {
    let summary = verify(image, logs, all_acked)
        .unwrap_or_else(|e| panic!("the exported image breaks the durability contract:\n{e}"));
    eprintln!("verify {}: {summary}", image.display());
    summary
}

/// The verifier must reject images with each kind of defect it exists to find.
fn verifier_rejects_tampered_images(dir: &Path, image: &Path, logs: &[PathBuf]) {
    let cases = [
        ("zero-covered", "zeroes, but write seq"),
        ("torn", "torn or corrupt payload"),
        ("swap", "meant for block"),
        ("rollback", "older than the flushed write"),
        ("unissued", "never issued"),
        ("outside", "past the region is not zero"),
    ];
    for (mode, expect) in cases {
        let bad = dir.join(format!("tampered-{mode}.img"));
        run_ok(
            storm_script(120)
                .arg("tamper")
                .arg(image)
                .arg(&bad)
                .arg(mode)
                .args(logs)
                .arg("--blocks")
                .arg(storm::REGION_BLOCKS.to_string()),
        );
        match verify(&bad, logs, false) {
            Ok(summary) => {
                panic!("the verifier accepted an image tampered with ({mode}): {summary}")
            }
            Err(out) => assert!(
                out.contains("status exit status: 1") && out.contains(expect),
                "verifying the {mode} image should fail with {expect:?}:\n{out}"
            ),
        }
        std::fs::remove_file(&bad).ok();
    }
}

fn compare_over_nbd(uri: &str, image: &Path) {
    if let Err(out) = storm::compare_over_nbd(uri, image, 120) {
        panic!("after recovery the server does not serve what offline replay exported:\n{out}");
    }
}

/// `rounds` rounds on one store: serve, storm with FLUSHes, SIGKILL mid-storm, export and
/// verify against every log so far, restart and read the whole volume back over NBD.
fn storm_kill9_rounds(engine: Option<&str>, rounds: u64) {
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", STORM_VOLUME);
    let extra: Vec<&str> = match engine {
        Some(e) => vec!["--io-engine", e],
        None => vec![],
    };
    let mut logs: Vec<PathBuf> = Vec::new();
    let mut server = serve(&store, &extra);
    let mut last_image = None;
    for round in 0..rounds {
        let log = tmp.path().join(format!("storm-{round}.log"));
        let mut storm = Storm::new(&server.uri(), &log)
            .seq_base((round + 1) << 40)
            .flush_every(48)
            .dir(tmp.path())
            .spawn();
        // Long enough for the 64 MiB WAL to wrap and checkpoints to run during the storm.
        let_storm_run(
            &mut storm,
            &log,
            (2000, 20),
            Duration::from_millis(2500),
            Duration::from_secs(60),
        );
        server.kill9();
        let st = storm.wait(30);
        assert!(
            st.success(),
            "the storm client should exit quietly when the server dies: {st}\n{}",
            storm.stderr_text()
        );
        eprintln!("round {round}: {}", storm.stderr_text().trim());
        logs.push(log);

        let image = tmp.path().join(format!("image-{round}.img"));
        export(&store, &image, engine);
        let summary = verify_ok(&image, &logs, false);
        assert!(
            summary["covered_writes"].as_u64().unwrap() >= 1000,
            "too few flushed writes to mean anything: {summary}"
        );
        if round == 0 {
            verifier_rejects_tampered_images(tmp.path(), &image, &logs);
        }

        // Recovery by the server must agree with the offline replay, block for block.
        server = serve(&store, &extra);
        assert!(
            !server.log().contains("ERROR"),
            "restart logged an error:\n{}",
            server.log()
        );
        compare_over_nbd(&server.uri(), &image);
        last_image = Some(image);
    }
    let st = server.terminate();
    assert!(
        st.success(),
        "SIGTERM exit status {st}; log:\n{}",
        server.log()
    );
    assert_closed_cleanly(&store);
    let image = tmp.path().join("final.img");
    export(&store, &image, engine);
    assert_same_image(
        &std::fs::read(&image).unwrap(),
        &std::fs::read(last_image.unwrap()).unwrap(),
        "after an idle serve and SIGTERM",
    );
}

#[test]
fn kill9_during_write_storm_loses_no_flushed_write() {
    storm_kill9_rounds(None, 3);
}

#[test]
fn kill9_during_write_storm_loses_no_flushed_write_plain_io_engine() {
    storm_kill9_rounds(Some("plain"), 2);
}

// ----------------------------------------------------------------------------- SIGTERM

#[test]
fn sigterm_makes_acknowledged_writes_durable() {
    require("nbdsh");
    require_python_nbd();
    let tmp = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let store = create_store(tmp.path(), "vol", size);
    // No checkpoints: only the shutdown path can make these writes durable in the data file.
    let mut server = serve(&store, &NO_CHECKPOINT);

    // Part 1: known writes (aligned, unaligned, sub-block), no FLUSH, the client still
    // connected when SIGTERM arrives (so no disconnect-time flush helps).
    let data_path = tmp.path().join("data.bin");
    let data = random_bytes(11, 3 * MIB as usize);
    std::fs::write(&data_path, &data).unwrap();
    let writes: Vec<(u64, u64, u64)> = vec![
        (0, MIB, 0),
        (5 * BLOCK + 100, 70_000, MIB),
        (8 * MIB, 2 * MIB, 0),
        (12 * MIB - 17, 1000, 2 * MIB),
        (7 * BLOCK + 512, 512, 2 * MIB + 5000),
        (16 * MIB - BLOCK, BLOCK, 3 * MIB - BLOCK),
    ];
    let code = format!(
        "{}print('written', flush=True)\nimport time\ntime.sleep(120)\n",
        nbdsh_writes(&data_path, &writes, false)
    );
    let mut holder = KillOnDrop::new(
        Command::new("nbdsh")
            .env("PATH", system_path())
            .args(["-u", &server.uri(), "-c", &code])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdsh"),
        "nbdsh",
        None,
    );
    let stdout = holder.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let _ = tx.send(first);
    });
    let line = rx.recv_timeout(Duration::from_secs(60));
    assert!(
        matches!(&line, Ok(l) if l.trim() == "written"),
        "nbdsh did not finish its writes: {line:?}"
    );
    assert!(holder.running(), "the client must still be connected");

    // While the server holds the store, offline export must refuse.
    let out = run(blockrep_timed(30)
        .arg("export")
        .arg(&store)
        .arg(tmp.path().join("never.img")));
    assert_eq!(
        out.status.code(),
        Some(1),
        "export while served: {}",
        describe(&out)
    );
    assert!(text(&out.stderr).contains("in use"), "{}", describe(&out));

    let st = server.terminate();
    assert!(
        st.success(),
        "SIGTERM exit status {st}; log:\n{}",
        server.log()
    );
    drop(holder);
    assert_closed_cleanly(&store);
    let image = tmp.path().join("after-sigterm.img");
    export(&store, &image, None);
    assert_same_image(
        &std::fs::read(&image).unwrap(),
        &apply_writes(size, &data, &writes),
        "writes acknowledged before SIGTERM",
    );

    // Part 2: SIGTERM in the middle of a storm that never flushes: every write that got a
    // reply must be durable.
    let store2 = create_store(tmp.path(), "vol2", STORM_VOLUME);
    let mut server = serve(&store2, &NO_CHECKPOINT);
    let log = tmp.path().join("noflush.log");
    let mut storm = Storm::new(&server.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(0)
        .dir(tmp.path())
        .spawn();
    let_storm_run(
        &mut storm,
        &log,
        (3000, 0),
        Duration::from_millis(1500),
        Duration::from_secs(60),
    );
    let st = server.terminate();
    assert!(
        st.success(),
        "SIGTERM exit status {st}; log:\n{}",
        server.log()
    );
    let st = storm.wait(30);
    assert!(st.success(), "storm: {st}\n{}", storm.stderr_text());
    eprintln!("storm: {}", storm.stderr_text().trim());
    assert_closed_cleanly(&store2);
    let image = tmp.path().join("noflush.img");
    export(&store2, &image, None);
    let summary = verify_ok(&image, std::slice::from_ref(&log), true);
    assert_eq!(summary["flushes"], 0, "{summary}");
    assert!(
        summary["covered_writes"].as_u64().unwrap() >= 3000,
        "{summary}"
    );
}

// --------------------------------------------------------------------- ext4 on nbdfuse

/// ~20 files of random sizes, some up to 1.5 MiB.
const FILES: FileSet = FileSet {
    count: 20,
    max_len: 3 * MIB / 2,
    seed: 1000,
};

fn require_ext4_tools() {
    for t in [
        "nbdfuse",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "losetup",
        "sha256sum",
        "timeout",
        "cp",
        "sync",
    ] {
        require(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (FUSE is needed)"
    );
}

/// nbdfuse, mkfs.ext4, loop mount, copy the files, `sync` (the last step, so a caller can
/// kill the server right after it). Returns the expected checksums and the mount (still
/// mounted).
fn ext4_with_files(
    server: &Served,
    tmp: &Path,
    names: &[String],
    src: &Path,
) -> (String, FuseMount) {
    let mut fuse = FuseMount::start(&server.uri(), tmp, "first");
    run_ok(timed(120, "mkfs.ext4").args(["-q", "-F"]).arg(fuse.dev()));
    fuse.mount_loop();
    run_ok(timed(120, "cp").arg("-r").arg(src.join(".")).arg(&fuse.mnt));
    let want = sha256s(src, names);
    assert_eq!(
        sha256s(&fuse.mnt, names),
        want,
        "files right after writing them"
    );
    run_ok(&mut timed(60, "sync"));
    (want, fuse)
}

#[test]
fn ext4_on_nbdfuse_survives_kill9() {
    require_ext4_tools();
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", 512 * MIB);
    let src = tmp.path().join("src");
    let names = FILES.write(&src);
    let mut server = serve(&store, &[]);
    let (want, mut fuse) = ext4_with_files(&server, tmp.path(), &names, &src);
    fuse.unmount_loop();
    fuse.unmount_fuse();
    drop(fuse);
    server.kill9();

    let mut server = serve(&store, &[]);
    let mut fuse = FuseMount::start(&server.uri(), tmp.path(), "second");
    e2fsck_clean(&fuse.dev());
    fuse.mount_loop();
    assert_eq!(
        sha256s(&fuse.mnt, &names),
        want,
        "files after kill -9 and restart"
    );
    fuse.unmount_loop();
    e2fsck_clean(&fuse.dev());
    fuse.unmount_fuse();
    drop(fuse);
    let st = server.terminate();
    assert!(
        st.success(),
        "SIGTERM exit status {st}; log:\n{}",
        server.log()
    );
}

/// Only `sync`, then SIGKILL with ext4 still mounted: the FLUSHes `sync` sent are all that
/// makes the data durable (no disconnect-time flush helps). The dead mount is torn down
/// lazily afterwards; the journal is replayed by the next mount.
#[test]
fn ext4_on_nbdfuse_survives_kill9_without_unmount() {
    require_ext4_tools();
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", 512 * MIB);
    let src = tmp.path().join("src");
    let names = FILES.write(&src);
    let mut server = serve(&store, &[]);
    let (want, mut fuse) = ext4_with_files(&server, tmp.path(), &names, &src);
    server.kill9();
    let t = Instant::now();
    fuse.teardown();
    drop(fuse);
    eprintln!("tearing down the dead mounts took {:?}", t.elapsed());

    let mut server = serve(&store, &[]);
    let mut fuse = FuseMount::start(&server.uri(), tmp.path(), "second");
    fuse.mount_loop(); // replays the ext4 journal
    assert_eq!(
        sha256s(&fuse.mnt, &names),
        want,
        "files after kill -9 and restart"
    );
    fuse.unmount_loop();
    e2fsck_clean(&fuse.dev());
    fuse.unmount_fuse();
    drop(fuse);
    let st = server.terminate();
    assert!(
        st.success(),
        "SIGTERM exit status {st}; log:\n{}",
        server.log()
    );
}

// ------------------------------------------------------------------------ WAL damage

const WAL_HEADER_LEN: u64 = 4096;
const RECORD_HEADER_LEN: u64 = 64;

#[derive(Debug, Clone)]
struct WalRec {
    /// File offset of the record header.
    at: u64,
    lsn: u64,
    kind: u8,
    payload_len: u64,
    offset: u64,
    durable_hint: u64,
}

/// Walks the ring from its start (a fresh store's tail) while records carry the magic.
fn wal_records(wal: &[u8]) -> Vec<WalRec> {
    let u32_at = |i: usize| u32::from_le_bytes(wal[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(wal[i..i + 8].try_into().unwrap());
    let mut out = Vec::new();
    let mut at = WAL_HEADER_LEN as usize;
    while at + RECORD_HEADER_LEN as usize <= wal.len() && &wal[at..at + 4] == b"WALR" {
        let rec = WalRec {
            at: at as u64,
            lsn: u64_at(at + 8),
            kind: wal[at + 24],
            payload_len: u64::from(u32_at(at + 28)),
            offset: u64_at(at + 32),
            durable_hint: u64_at(at + 48),
        };
        at += (RECORD_HEADER_LEN + rec.payload_len).next_multiple_of(64) as usize;
        out.push(rec);
    }
    out
}

fn flip_byte(path: &Path, at: u64) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// Serves a fresh store without checkpoints, writes one block per entry of `writes`
/// (block index, source offset in `data`) with a FLUSH after each, then SIGKILLs the server.
/// Returns the WAL records, which must be exactly those writes.
fn store_with_flushed_writes(
    tmp: &Path,
    size: u64,
    data_path: &Path,
    writes: &[(u64, u64, u64)],
) -> (PathBuf, Vec<WalRec>) {
    let store = create_store(tmp, "vol", size);
    let mut server = serve(&store, &NO_CHECKPOINT);
    nbdsh(&server.uri(), &nbdsh_writes(data_path, writes, true));
    server.kill9();
    let recs = wal_records(&std::fs::read(store.join("wal")).unwrap());
    assert_eq!(
        recs.len(),
        writes.len(),
        "one WAL record per write: {recs:#?}"
    );
    for (i, (r, w)) in recs.iter().zip(writes).enumerate() {
        assert_eq!(
            (r.kind, r.offset, r.payload_len),
            (1, w.0, w.1),
            "record {i}: {r:?}"
        );
        if i > 0 {
            assert_eq!(r.lsn, recs[i - 1].lsn + 1, "record {i}: {r:?}");
            // The previous write was flushed before this one was sent.
            assert!(
                r.durable_hint >= recs[i - 1].lsn,
                "record {i} was written after a FLUSH covering LSN {}, but its durable_hint \
                 is {}: {r:?}",
                recs[i - 1].lsn,
                r.durable_hint
            );
        }
    }
    (store, recs)
}

#[test]
fn torn_wal_tail_is_cut_and_store_opens() {
    require("nbdsh");
    require("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let data_path = tmp.path().join("data.bin");
    let data = random_bytes(21, 64 * BLOCK as usize);
    std::fs::write(&data_path, &data).unwrap();
    // Eight blocks, then block 3 overwritten: the last record is the overwrite.
    let mut writes: Vec<(u64, u64, u64)> = (0..8).map(|i| (i * BLOCK, BLOCK, i * BLOCK)).collect();
    writes.push((3 * BLOCK, BLOCK, 40 * BLOCK));
    let (store, recs) = store_with_flushed_writes(tmp.path(), size, &data_path, &writes);

    // Tear the last record: damage its payload.
    let last = recs.last().unwrap().clone();
    flip_byte(&store.join("wal"), last.at + RECORD_HEADER_LEN + 1000);

    let mut server = serve(&store, &[]);
    let wal_path = store.join("wal");
    let warning = format!(
        "{}: cut a torn record at file offset {}",
        wal_path.display(),
        last.at
    );
    assert!(
        server.log().contains(&warning),
        "expected the warning {warning:?} in the log:\n{}",
        server.log()
    );
    let got = nbdcopy_dump(&server.uri(), &tmp.path().join("after-cut.img"));
    let kept = &writes[..writes.len() - 1];
    assert_same_image(
        &got,
        &apply_writes(size, &data, kept),
        "after cutting the torn tail",
    );

    // The store keeps working from the cut: a new flushed write survives another SIGKILL.
    let more = [(9 * BLOCK, 2 * BLOCK, 50 * BLOCK)];
    nbdsh(&server.uri(), &nbdsh_writes(&data_path, &more, true));
    server.kill9();
    let mut server = serve(&store, &[]);
    let got = nbdcopy_dump(&server.uri(), &tmp.path().join("after-more.img"));
    let mut all = kept.to_vec();
    all.extend_from_slice(&more);
    assert_same_image(
        &got,
        &apply_writes(size, &data, &all),
        "after a write past the cut",
    );
    let st = server.terminate();
    assert!(
        st.success(),
        "SIGTERM exit status {st}; log:\n{}",
        server.log()
    );
    assert_closed_cleanly(&store);
}

fn store_files(store: &Path) -> Vec<(String, Vec<u8>)> {
    ["superblock", "wal", "data", "lock"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(store.join(n)).unwrap()))
        .collect()
}

fn assert_refuses(out: &Output, what: &str, wal: &Path, offset: u64) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} on a corrupt WAL: {}",
        describe(out)
    );
    assert!(
        !text(&out.stdout).contains("serving"),
        "{what} must not start: {}",
        describe(out)
    );
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one error line:\n{stderr}");
    let line = lines[0];
    eprintln!("{what} refused: {line}");
    let at = format!("file offset {offset}");
    assert!(
        line.contains(&wal.display().to_string()) && line.contains(&at),
        "{what}: the error should name {} and {at:?}:\n{line}",
        wal.display()
    );
}

fn mid_log_corruption_case(damage_header: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let data_path = tmp.path().join("data.bin");
    let data = random_bytes(31, 16 * BLOCK as usize);
    std::fs::write(&data_path, &data).unwrap();
    let writes: Vec<(u64, u64, u64)> = (0..10).map(|i| (i * BLOCK, BLOCK, i * BLOCK)).collect();
    let (store, recs) = store_with_flushed_writes(tmp.path(), size, &data_path, &writes);

    let victim = recs[4].clone();
    let wal = store.join("wal");
    if damage_header {
        flip_byte(&wal, victim.at + 32); // the offset field
    } else {
        flip_byte(&wal, victim.at + RECORD_HEADER_LEN + 2000);
    }
    let before = store_files(&store);

    // If it wrongly starts serving, `timeout` stops it after 20s (and the status is not 1).
    let out = run(blockrep_timed(20)
        .arg("serve")
        .arg(&store)
        .arg("--nbd")
        .arg(format!("127.0.0.1:{}", free_port())));
    assert_refuses(&out, "serve", &wal, victim.at);
    assert!(
        store_files(&store) == before,
        "serve changed the store files"
    );

    let image = tmp.path().join("never.img");
    let out = run(blockrep_timed(30).arg("export").arg(&store).arg(&image));
    assert_refuses(&out, "export", &wal, victim.at);
    assert!(
        store_files(&store) == before,
        "export changed the store files"
    );
}

#[test]
fn mid_log_corruption_refuses_to_open() {
    require("nbdsh");
    mid_log_corruption_case(false);
}

#[test]
fn mid_log_header_corruption_refuses_to_open() {
    require("nbdsh");
    mid_log_corruption_case(true);
}
