//! Recovery, end to end: replicas that go away and come back (catch-up from the retained WAL,
//! or a rebuild from the primary's base image once the gap is gone), rebuilds interrupted by
//! SIGKILL on either side, a replica whose log is ahead of a newly promoted primary, an old
//! primary rejoining as a replica, a replica that moved to a new address, a flapping replica,
//! and a primary that keeps writing at full speed with a replica dead.
//!
//! Everything runs as real processes on loopback: `blockrep serve`, `blockrep replica`, fio
//! (its nbd engine), and libnbd clients in Python (tests/clients/). Each scenario has a writer
//! running *during* the recovery. Paths are asserted from the primary's status
//! (`/v1/status`, `blockrep status --json`), its Prometheus counters
//! (`blockrep_recovery_sessions_total{outcome=...}`) and its log; data is asserted by
//! exporting every copy after a final FLUSH and a clean stop and comparing them byte for byte
//! (and, where the write storm wrote, checking its logs against the image).
//!
//! Every child process is killed when its guard drops, and also (PR_SET_PDEATHSIG) when the
//! test thread that started it ends. Every one-shot external command runs under `timeout`.
//! Waits poll for states with generous deadlines (the machine is shared and has 2 cores).

mod common;

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::client::data;
use common::storm::{self, Storm, REGION_BLOCKS};
use common::*;

const BLOCK: u64 = 4096;
/// Every store here has a 64 MiB WAL; the primary keeps at most half of it for a replica.
const WAL: u64 = 64 * MIB;
const RETENTION: u64 = WAL / 2;

// ------------------------------------------------------------------------------ helpers

/// Every tool the recovery tests use, and the libnbd binding of the system Python.
fn require_tools() {
    for t in ["timeout", "fio", SYSTEM_PYTHON] {
        require(t);
    }
    let out = run(timed(30, SYSTEM_PYTHON).args(["-c", "import nbd"]));
    assert!(
        out.status.success(),
        "{SYSTEM_PYTHON} lacks the libnbd binding (python3-libnbd): {}",
        text(&out.stderr)
    );
}

/// `blockrep create DIR --size SIZE --wal-size 64MiB` (a blank store: as a replica it joins
/// the volume of the first primary that connects).
fn create(parent: &Path, name: &str, size: u64) -> PathBuf {
    let dir = parent.join(name);
    run_ok(
        blockrep_timed(120)
            .arg("create")
            .arg(&dir)
            .arg("--size")
            .arg(size.to_string())
            .arg("--wal-size")
            .arg(WAL.to_string()),
    );
    dir
}

fn export(store: &Path, image: &Path) {
    run_ok(blockrep_timed(300).arg("export").arg(store).arg(image));
}

fn read_range(path: &Path, off: u64, len: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Compares two images a MiB at a time (they may be 256 MiB each).
fn assert_same_files(a: &Path, b: &Path, what: &str) {
    let la = std::fs::metadata(a).unwrap().len();
    let lb = std::fs::metadata(b).unwrap().len();
    assert_eq!(la, lb, "{what}: image sizes");
    let mut fa = BufReader::new(File::open(a).unwrap());
    let mut fb = BufReader::new(File::open(b).unwrap());
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut first: Option<u64> = None;
    let mut differing = 0u64;
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n]
                .chunks(BLOCK as usize)
                .zip(bb[..n].chunks(BLOCK as usize))
                .enumerate()
            {
                if x != y {
                    differing += 1;
                    first.get_or_insert(at + i as u64 * BLOCK);
                }
            }
        }
        at += n as u64;
    }
    if let Some(first) = first {
        panic!(
            "{what}: {} and {} differ: {differing} block(s) of 4 KiB, the first at byte {first} \
             (block {})",
            a.display(),
            b.display(),
            first / BLOCK
        );
    }
}

fn assert_zero_range(image: &Path, off: u64, len: u64, what: &str) {
    let got = read_range(image, off, len);
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!(
            "{what}: byte {} of the range {off}+{len} is not zero",
            off + i as u64
        );
    }
}

fn assert_holds(image: &Path, off: u64, d: &Data, what: &str) {
    let got = read_range(image, off, d.bytes.len() as u64);
    assert_range_holds(&got, off, &d.bytes, what);
}

// -------------------------------------------------------------------------------- nodes

/// A `blockrep replica` or `blockrep serve` process (log `STORE.NAME.log`, appended across
/// restarts) with its admin endpoint (`--metrics 127.0.0.1:0`), whose address is read from
/// stdout at every start.
fn launch(name: &str, store: &Path, port: u16, args: Vec<OsString>, ready: &'static str) -> Node {
    Node::builder(name, store, port, args)
        .ready(Ready::LineAndAdmin(ready))
        .start_timeout(90)
        .start()
}

/// The node's own status report (its admin endpoint).
fn own_status(n: &Node) -> Value {
    get_json(&n.admin, "/v1/status")
}

fn replica_args(store: &Path, port: u16, size: Option<u64>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "replica".into(),
        store.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ];
    if let Some(size) = size {
        args.push("--size".into());
        args.push(size.to_string().into());
    }
    args
}

/// `blockrep replica STORE --listen 127.0.0.1:PORT` (with `--size` it creates a blank store
/// if STORE does not exist).
fn replica_on(store: &Path, name: &str, port: u16, size: Option<u64>) -> Node {
    launch(
        name,
        store,
        port,
        replica_args(store, port, size),
        "listening on",
    )
}

fn replica(store: &Path, name: &str) -> Node {
    replica_on(store, name, free_port(), None)
}

fn spec(r: &Node) -> (String, String) {
    (r.name.clone(), r.addr())
}

fn primary_args(
    store: &Path,
    port: u16,
    replicas: &[(String, String)],
    extra: &[&str],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        store.into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ];
    for (name, addr) in replicas {
        args.push("--replica".into());
        args.push(format!("{name}={addr}").into());
    }
    args.extend(extra.iter().map(OsString::from));
    args
}

fn primary(store: &Path, name: &str, replicas: &[(String, String)], extra: &[&str]) -> Node {
    let port = free_port();
    launch(
        name,
        store,
        port,
        primary_args(store, port, replicas, extra),
        "serving",
    )
}

/// Blank stores `p`, `r1`..`rN` (the replicas join the primary's volume), the replicas
/// running, the primary serving with `extra` arguments, every replica in sync.
fn cluster(dir: &Path, size: u64, replicas: usize, extra: &[&str]) -> (Node, Vec<Node>) {
    let p_store = create(dir, "p", size);
    let reps: Vec<Node> = (1..=replicas)
        .map(|i| {
            let name = format!("r{i}");
            replica(&create(dir, &name, size), &name)
        })
        .collect();
    let specs: Vec<(String, String)> = reps.iter().map(spec).collect();
    let p = primary(&p_store, "p", &specs, extra);
    wait_status(&p, 60, "every replica in sync at the start", |st| {
        peers(st).iter().all(|r| r["state"] == "in_sync")
    });
    (p, reps)
}

// ------------------------------------------------------------------------ status, metrics

/// One HTTP/1.0 GET (the admin endpoint is axum; 1.0 means no chunking, close at the end).
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let raw = text(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path} from {addr}: no header end in {raw:?}"))?;
    if !head.lines().next().unwrap_or("").contains(" 200") {
        return Err(format!("GET {path} from {addr}: {head}"));
    }
    Ok(body.to_string())
}

/// GET a JSON document, retrying for a while (the node may be busy).
fn get_json(addr: &str, path: &str) -> Value {
    wait_until(
        Duration::from_secs(30),
        format_args!("GET {path} from {addr}"),
        || {
            http_get(addr, path).and_then(|b| {
                serde_json::from_str::<Value>(&b).map_err(|e| format!("{path}: {e}: {b:?}"))
            })
        },
    )
}

/// The primary's status report (`/v1/status`, what `blockrep status --json` prints).
fn status(p: &Node) -> Value {
    get_json(&p.admin, "/v1/status")
}

/// `blockrep status --admin ADDR --json`, the command line way.
fn status_cli(p: &Node) -> Value {
    let out = run_ok(
        blockrep_timed(60)
            .args(["status", "--json", "--admin"])
            .arg(&p.admin),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json printed {out:?}: {e}"))
}

fn peers(st: &Value) -> Vec<Value> {
    st["replicas"].as_array().cloned().unwrap_or_default()
}

fn peer(st: &Value, name: &str) -> Value {
    peers(st)
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no replica {name} in the status: {st:#}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// Polls the primary's status until `ok` holds; returns that status.
fn wait_status(p: &Node, secs: u64, what: &str, mut ok: impl FnMut(&Value) -> bool) -> Value {
    wait_until(
        Duration::from_secs(secs),
        format_args!(
            "{}: {what}; its log (last lines):\n{}",
            p.name,
            p.log_tail(0)
        ),
        || {
            let st = status(p);
            if ok(&st) {
                Ok(st)
            } else {
                Err(format!("status\n{st:#}"))
            }
        },
    )
}

/// Waits until the primary has sent `replica` a good part of its base image (16 MiB) but not
/// all of it: the middle of a rebuild.
fn wait_mid_rebuild(p: &Node, replica: &str) {
    wait_status(
        p,
        60,
        &format!("{replica} in the middle of its rebuild"),
        |st| {
            let r = peer(st, replica);
            let done = r["rebuild"]["bytes_done"].as_u64().unwrap_or(0);
            let total = r["rebuild"]["bytes_total"].as_u64().unwrap_or(0);
            r["state"] == "rebuilding" && done >= 16 * MIB && done < total
        },
    );
}

/// TCP connections to local `port` still open on this end (established, or closed by the
/// peer but not yet by the process that holds them), from /proc/net/tcp{,6}.
fn open_sessions(port: u16) -> usize {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&want) && ["01", "07", "08"].contains(&f[3])
                })
                .count()
        })
        .sum()
}

fn wait_peer(p: &Node, name: &str, state: &str, secs: u64) -> Value {
    wait_status(p, secs, &format!("replica {name} {state}"), |st| {
        peer(st, name)["state"] == state
    })
}

/// Every replica in sync and durable through the primary's head (lag 0).
fn wait_settled(p: &Node, secs: u64) -> Value {
    wait_status(
        p,
        secs,
        "every replica in sync and durable through the head",
        |st| {
            let head = num(st, "head_lsn");
            peers(st)
                .iter()
                .all(|r| r["state"] == "in_sync" && num(r, "durable_lsn") == head)
        },
    )
}

/// `blockrep_recovery_sessions_total` by outcome, from the primary's /metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Recoveries {
    catch_up: u64,
    truncated: u64,
    rebuild_started: u64,
    rebuild_done: u64,
}

fn recoveries(p: &Node) -> Recoveries {
    let body = wait_until(
        Duration::from_secs(30),
        format_args!("{}: /metrics", p.name),
        || http_get(&p.admin, "/metrics"),
    );
    let mut r = Recoveries::default();
    for line in body.lines() {
        if !line.starts_with("blockrep_recovery_sessions_total{") {
            continue;
        }
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric line {line:?}"));
        let v = v as u64;
        if line.contains("outcome=\"catch_up\"") {
            r.catch_up += v;
        } else if line.contains("outcome=\"truncated\"") {
            r.truncated += v;
        } else if line.contains("outcome=\"rebuild_started\"") {
            r.rebuild_started += v;
        } else if line.contains("outcome=\"rebuild_done\"") {
            r.rebuild_done += v;
        }
    }
    r
}

// ------------------------------------------------------------------------------- client

/// A libnbd client of these tests: answers may take 90 s on a loaded machine.
fn connect(uri: &str, dir: &Path, name: &str) -> Client {
    Client::connect_within(uri, dir, name, 90)
}

/// The FLUSH check of these tests.
trait FlushOk {
    fn flush_ok(&mut self, what: &str) -> f64;
}

impl FlushOk for Client {
    /// A FLUSH that must succeed, well inside the (default 5 s) barrier timeout.
    fn flush_ok(&mut self, what: &str) -> f64 {
        let v = self.op("flush");
        assert_eq!(v["ok"], true, "{what}: FLUSH failed: {v}");
        let secs = v["secs"].as_f64().unwrap();
        assert!(
            secs < 2.5,
            "{what}: FLUSH took {secs:.3}s; with the copies the mode needs in sync it must not \
             come near the barrier timeout"
        );
        secs
    }
}

// ---------------------------------------------------------------------- background writers

/// Complete lines of a storm log, and how many are W lines.
fn storm_log(log: &Path) -> (String, usize) {
    let t = std::fs::read_to_string(log).unwrap_or_default();
    let complete = match t.rfind('\n') {
        Some(i) => t[..=i].to_string(),
        None => String::new(),
    };
    let w = complete.lines().filter(|l| l.starts_with("W ")).count();
    (complete, w)
}

/// Waits until the storm has `w` acknowledged writes in its log.
fn storm_until(storm: &mut KillOnDrop, log: &Path, w: usize, secs: u64) {
    wait_until(
        Duration::from_secs(secs),
        "the write storm made too little progress",
        || {
            assert!(
                storm.running(),
                "the write storm stopped early; its stderr:\n{}",
                storm.stderr_text()
            );
            let (_, have) = storm_log(log);
            if have >= w {
                Ok(())
            } else {
                Err(format!("{have} of {w} writes"))
            }
        },
    );
}

/// Lets the storm write `more` writes past what it has now.
fn storm_more(storm: &mut KillOnDrop, log: &Path, more: usize, secs: u64) {
    let (_, have) = storm_log(log);
    storm_until(storm, log, have + more, secs);
}

/// Stops the storm (SIGKILL), then a FLUSH from `c` covers every write it had acknowledged:
/// returns a copy of its log sealed with that FLUSH (an `F` line over all its W lines).
fn seal_storm(storm: &mut KillOnDrop, log: &Path, c: &mut Client, what: &str) -> PathBuf {
    assert!(
        storm.running(),
        "{what}: the write storm stopped before its time; its stderr:\n{}",
        storm.stderr_text()
    );
    storm.kill9();
    let (complete, w) = storm_log(log);
    assert!(w > 0, "{what}: the storm wrote nothing");
    c.flush_ok(&format!("{what}: the FLUSH after the storm"));
    let sealed = log.with_extension("sealed.log");
    std::fs::write(&sealed, format!("{complete}F {w}\n")).unwrap();
    sealed
}

/// `write_storm.py verify` on the storm's region of `image` (the region is cut out first, so
/// other writers' data elsewhere in the volume does not count against it).
fn verify_storm(image: &Path, logs: &[PathBuf], what: &str) -> Value {
    let region = image.with_extension("region");
    std::fs::write(&region, read_range(image, 0, REGION_BLOCKS * BLOCK)).unwrap();
    let out = run(timed(300, SYSTEM_PYTHON)
        .arg(storm::STORM_PY)
        .arg("verify")
        .arg(&region)
        .args(logs)
        .arg("--blocks")
        .arg(REGION_BLOCKS.to_string()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: the image breaks the storm's durability contract:\n{}",
        describe(&out)
    );
    let s = text(&out.stdout);
    let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("verify printed {s:?}: {e}"));
    eprintln!("verify {what}: {v}");
    v
}

/// fio's JSON report (fio writes its messages to the same file, before the JSON).
fn fio_report(path: &Path) -> Value {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let Some(i) = t.find('{') else {
        panic!("no JSON in fio's output {}:\n{t}", path.display())
    };
    serde_json::from_str(&t[i..]).unwrap_or_else(|e| panic!("fio's JSON: {e}:\n{t}"))
}

fn fio_cmd(dir: &Path, name: &str, uri: &str, args: &[&str]) -> (Vec<String>, PathBuf) {
    let out = dir.join(format!("fio-{name}.json"));
    let mut a: Vec<String> = vec![
        format!("--name={name}"),
        // Jobs as threads, not forked processes: killing fio then kills its job too (a forked
        // job outlives a SIGKILLed parent, and with its server gone it spins on "nothing to
        // poll for in state DEAD", filling its stderr file forever).
        "--thread".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--output-format=json".into(),
        format!("--output={}", out.display()),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    (a, out)
}

/// What one fio run did: bytes written, bandwidth, FLUSH latencies.
#[derive(Debug)]
struct FioRun {
    write_bytes: u64,
    /// Bytes per second.
    bw: f64,
    flushes: u64,
    flush_max_ms: f64,
    flush_p99_ms: f64,
}

fn fio_summary(report: &Value, what: &str) -> FioRun {
    let job = &report["jobs"][0];
    assert_eq!(
        job["error"], 0,
        "{what}: fio reported an error: {}",
        job["error"]
    );
    let w = &job["write"];
    let sync = &job["sync"];
    let lat = &sync["lat_ns"];
    FioRun {
        write_bytes: w["io_bytes"].as_u64().unwrap_or(0),
        bw: w["bw_bytes"].as_f64().unwrap_or(0.0),
        flushes: sync["total_ios"]
            .as_u64()
            .or_else(|| lat["N"].as_u64())
            .unwrap_or(0),
        flush_max_ms: lat["max"].as_f64().unwrap_or(0.0) / 1e6,
        flush_p99_ms: lat["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1e6,
    }
}

/// fio in the foreground (under `timeout`); it must succeed.
fn fio_run(dir: &Path, name: &str, uri: &str, args: &[&str], secs: u64) -> FioRun {
    let (a, out) = fio_cmd(dir, name, uri, args);
    let o = run(timed(secs, "fio").args(&a).current_dir(dir));
    assert!(
        o.status.success(),
        "fio {name} failed: {}\nits report:\n{}",
        describe(&o),
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    let r = fio_summary(&fio_report(&out), &format!("fio {name}"));
    eprintln!("fio {name}: {r:?}");
    r
}

/// fio in the background, until `stop` (SIGINT: it ends its job and writes its report).
struct Fio {
    proc: KillOnDrop,
    out: PathBuf,
    name: String,
}

fn fio_bg(dir: &Path, name: &str, uri: &str, args: &[&str]) -> Fio {
    let (a, out) = fio_cmd(dir, name, uri, args);
    let mut cmd = Command::new("fio");
    cmd.args(&a).current_dir(dir);
    Fio {
        proc: KillOnDrop::spawn_group(
            &mut cmd,
            &format!("fio {name}"),
            dir.join(format!("fio-{name}.stderr")),
        ),
        out,
        name: name.to_string(),
    }
}

impl Fio {
    fn assert_running(&mut self) {
        assert!(
            self.proc.running(),
            "fio {} stopped early; its report:\n{}\n{}",
            self.name,
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            self.proc.stderr_text()
        );
    }

    /// SIGINT, wait for it, and its summary (no errors allowed).
    fn stop(&mut self) -> FioRun {
        self.assert_running();
        self.proc.signal(libc::SIGINT);
        self.proc.wait(60);
        let r = fio_summary(&fio_report(&self.out), &format!("fio {}", self.name));
        eprintln!("fio {}: {r:?}", self.name);
        r
    }

    /// For a writer whose server was killed under it: fio's nbd engine does not give up on a
    /// dead connection in a time-based job (it spins on "nothing to poll for in state
    /// DEAD"), so it is killed.
    fn kill(&mut self) {
        self.proc.kill9();
    }
}

/// A background fio job of 4 KiB random writes over `[offset, offset+size)`, a FLUSH every
/// 64 writes, at most `rate` (fio syntax, "" for no limit), until stopped.
fn fio_writer(dir: &Path, name: &str, uri: &str, offset: &str, size: &str, rate: &str) -> Fio {
    let offset = format!("--offset={offset}");
    let size = format!("--size={size}");
    let rate_arg = format!("--rate={rate}");
    let mut args = vec![
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        offset.as_str(),
        size.as_str(),
        "--fsync=64",
        "--time_based",
        "--runtime=300",
        "--randseed=99",
    ];
    if !rate.is_empty() {
        args.push(rate_arg.as_str());
    }
    fio_bg(dir, name, uri, &args)
}

// ---------------------------------------------------------------------------- the finish

/// The end of every scenario: writers already stopped and a FLUSH done, every replica in
/// sync and durable through the head, then a clean stop of every node; the primary's image
/// and each replica's are exported and must be byte-identical. Returns the image paths
/// (primary first).
fn stop_and_compare(dir: &Path, p: &mut Node, reps: &mut [Node], what: &str) -> Vec<PathBuf> {
    let st = wait_settled(p, 90);
    eprintln!(
        "{what}: settled at head {}; replicas {:?}",
        st["head_lsn"],
        peers(&st)
            .iter()
            .map(|r| format!("{}={}", r["name"], r["durable_lsn"]))
            .collect::<Vec<_>>()
    );
    p.stop_ok();
    for r in reps.iter_mut() {
        r.stop_ok();
    }
    let pimg = dir.join(format!("{}.img", p.name));
    export(&p.store, &pimg);
    let mut images = vec![pimg.clone()];
    for r in reps.iter() {
        let img = dir.join(format!("{}.img", r.name));
        export(&r.store, &img);
        assert_same_files(
            &img,
            &pimg,
            &format!("{what}: {} against the primary {}", r.name, p.name),
        );
        images.push(img);
    }
    images
}

/// Counts lines of the primary's log since `mark` about `replica` in any rebuild state.
/// The end of a scenario with a write storm: a last FLUSH seals the storm's log, then
/// `stop_and_compare`, and every image holds every write the sealed log says was flushed.
fn finish_with_storm(
    dir: &Path,
    p: &mut Node,
    reps: &mut [Node],
    storm: &mut KillOnDrop,
    log: &Path,
    what: &str,
) {
    let mut c = connect(&p.uri(), dir, "final");
    let sealed = seal_storm(storm, log, &mut c, what);
    drop(c);
    let images = stop_and_compare(dir, p, reps, what);
    for img in &images {
        verify_storm(
            img,
            std::slice::from_ref(&sealed),
            &img.display().to_string(),
        );
    }
}

fn rebuild_lines(p: &Node, mark: usize, replica: &str) -> Vec<String> {
    let tag = format!("replica={replica}");
    p.log_since(mark)
        .lines()
        .filter(|l| {
            l.contains(&tag)
                && (l.contains("needs_rebuild")
                    || l.contains("\"rebuilding\"")
                    || l.contains("base image"))
        })
        .map(str::to_string)
        .collect()
}

fn mib_per_s(bytes: f64, secs: f64) -> f64 {
    bytes / MIB as f64 / secs.max(1e-9)
}

// =============================================================================== tests

/// Brief S4: a replica that is away briefly (a few MiB of WAL, far inside the retention
/// budget) comes back by catch-up from the retained WAL, never by a rebuild, while a writer
/// keeps writing; the copies end identical.
#[test]
fn s4_brief_outage_recovers_by_catch_up_without_rebuild() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut p, mut reps) = cluster(dir, 64 * MIB, 2, &["--commit", "sync-quorum"]);
    // A fresh sync-quorum primary's replicas catch up its epoch-start entry; nothing more.
    let start = recoveries(&p);
    assert_eq!(
        (start.rebuild_started, start.rebuild_done),
        (0, 0),
        "a fresh primary: {start:?}"
    );

    // The storm writes (and flushes) from before the outage to after the recovery.
    let log = dir.join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(64)
        .dir(dir)
        .paced(1500)
        .spawn();
    storm_until(&mut storm, &log, 500, 60);

    // r2 goes away; a few MiB more are written and flushed (P + r1 are a majority of 3).
    let mark = p.mark();
    reps[1].stop_ok();
    wait_peer(&p, "r2", "disconnected", 30);
    fio_run(
        dir,
        "away",
        &p.uri(),
        &[
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--offset=16M",
            "--size=16M",
            "--io_size=6M",
            "--fsync=8",
            "--end_fsync=1",
            "--randseed=7",
        ],
        180,
    );
    let st = status(&p);
    let r2 = peer(&st, "r2");
    let gap = num(&st, "head_lsn") - num(&r2, "durable_lsn");
    assert_eq!(
        r2["state"], "disconnected",
        "r2 is away, well inside retention: {st:#}"
    );
    assert!(
        gap >= 96 && num(&r2, "durable_lsn") > 0,
        "r2 had the first storm writes, then missed 6 MiB of 64 KiB writes: {st:#}"
    );
    let kept = num(&r2, "lag_bytes");
    assert!(
        (6 * MIB..RETENTION).contains(&kept),
        "the WAL kept for r2 ({kept} bytes) should hold its 6 MiB gap, inside the budget"
    );

    // The storm is still writing while r2 comes back.
    storm_more(&mut storm, &log, 300, 60);
    let before = recoveries(&p);
    let back = p.mark();
    reps[1].restart();
    let line = p.wait_log(back, &["replica=r2", "state=\"in_sync\""], 60);
    assert!(
        line.contains("caught up"),
        "r2 must rejoin by catch-up: {line}\nthe primary about r2 since the outage:\n{}",
        p.lines_with(mark, &["replica=r2"]).join("\n")
    );
    let catching = p.wait_log(back, &["replica=r2", "catching up from"], 5);
    eprintln!("r2: {catching}\nr2: {line}");
    // Live shipping goes on after the catch-up.
    storm_more(&mut storm, &log, 1000, 60);
    let st = status_cli(&p);
    let r2 = peer(&st, "r2");
    assert_eq!(
        (r2["state"].as_str(), r2["reason"].as_str()),
        (Some("in_sync"), Some("caught up")),
        "blockrep status --json: {st:#}"
    );
    let after = recoveries(&p);
    assert!(
        after.catch_up > before.catch_up,
        "the catch_up counter must count r2's catch-up: before {before:?}, after {after:?}"
    );
    assert_eq!(
        (after.rebuild_started, after.rebuild_done),
        (0, 0),
        "a brief outage never rebuilds: {after:?}"
    );
    let rebuilds: Vec<String> = ["r1", "r2"]
        .iter()
        .flat_map(|r| rebuild_lines(&p, mark, r))
        .collect();
    assert!(
        rebuilds.is_empty(),
        "no replica may need a rebuild:\n{}",
        rebuilds.join("\n")
    );

    finish_with_storm(dir, &mut p, &mut reps, &mut storm, &log, "S4");
}

/// A primary killed and restarted while a replica is away keeps the WAL it had kept for that
/// replica: r2 comes back after the restarted primary has written and checkpointed, and
/// rejoins by catch-up, not by a rebuild of the whole volume. (Before, a restarted primary
/// held WAL only for the replicas it had heard from, so its first checkpoint recycled what
/// r2 needed.)
#[test]
fn a_replica_away_across_a_primary_restart_catches_up_without_rebuild() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut p, mut reps) = cluster(dir, 64 * MIB, 2, &["--commit", "sync-quorum"]);
    let write = |p: &Node, name: &str, offset: &str, seed: &str| {
        let seed = format!("--randseed={seed}");
        let offset = format!("--offset={offset}");
        let args = [
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            offset.as_str(),
            "--size=16M",
            "--io_size=4M",
            "--fsync=8",
            "--end_fsync=1",
            seed.as_str(),
        ];
        fio_run(dir, name, &p.uri(), &args, 180);
    };
    write(&p, "before", "0", "1");
    wait_settled(&p, 60);

    let mark = p.mark();
    reps[1].stop_ok();
    wait_peer(&p, "r2", "disconnected", 30);
    write(&p, "away", "16M", "2");
    let r2_durable = num(&peer(&status(&p), "r2"), "durable_lsn");

    // The primary dies and comes back at a new epoch while r2 is still away; it writes
    // more, and its flusher checkpoints past everything r2 lacks. It comes back checkpointing
    // every millisecond: what it keeps for r2 must outlast every checkpoint from its start.
    p.kill9();
    p.args.extend(["--flush-interval-ms".into(), "1".into()]);
    p.restart();
    let restarted = p.mark();
    write(&p, "after", "32M", "3");
    let head = num(&status(&p), "head_lsn");
    let st = wait_status(&p, 60, "a checkpoint past the restart's writes", |st| {
        num(st, "checkpoint_lsn") >= head
    });
    assert!(
        num(&st, "checkpoint_lsn") > r2_durable,
        "the checkpoint must pass what r2 lacks (durable {r2_durable}): {st:#}"
    );
    assert_ne!(
        peer(&st, "r2")["state"],
        "needs_rebuild",
        "the restarted primary released r2 while it was away: {st:#}"
    );

    let before = recoveries(&p);
    reps[1].restart();
    let line = p.wait_log(restarted, &["replica=r2", "state=\"in_sync\""], 60);
    assert!(
        line.contains("caught up"),
        "r2 must rejoin by catch-up: {line}\nthe primary about r2 since the outage:\n{}",
        p.lines_with(mark, &["replica=r2"]).join("\n")
    );
    let after = recoveries(&p);
    assert!(after.catch_up > before.catch_up, "{before:?} -> {after:?}");
    assert_eq!(
        (after.rebuild_started, after.rebuild_done),
        (0, 0),
        "r2 was away across a restart, well inside retention: {after:?}"
    );
    let mut c = connect(&p.uri(), dir, "final");
    c.flush_ok("FLUSH with every replica back");
    drop(c);
    stop_and_compare(dir, &mut p, &mut reps, "restart");
}

/// Brief R3: a replica away for longer than the retention budget allows (more than half of
/// the primary's 64 MiB WAL written meanwhile) is released (needs_rebuild) and, once it is
/// back, rebuilt from the primary's base image while a writer runs; the copies end identical.
#[test]
fn r3_outage_past_retention_leads_to_rebuild() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut p, mut reps) = cluster(dir, 128 * MIB, 2, &["--commit", "sync-quorum"]);
    assert_eq!(num(&status(&p), "wal_capacity_bytes"), WAL);
    let start = recoveries(&p);

    let mark = p.mark();
    reps[1].stop_ok();
    wait_peer(&p, "r2", "disconnected", 30);
    // 48 MiB (> 40 MiB, well past the 32 MiB budget), flushed on P + r1.
    fio_run(
        dir,
        "past-retention",
        &p.uri(),
        &[
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--offset=32M",
            "--size=96M",
            "--io_size=48M",
            "--fsync=8",
            "--end_fsync=1",
            "--randseed=3",
        ],
        300,
    );
    let st = wait_peer(&p, "r2", "needs_rebuild", 30);
    // The byte budget released it (the status's reason moves on to the redial attempts).
    let released = p.wait_log(
        mark,
        &[
            "replica=r2",
            "needs_rebuild",
            &format!("exceeds {RETENTION} bytes"),
        ],
        10,
    );
    eprintln!("{released}");
    assert!(num(&st, "wal_used_bytes") <= WAL, "{st:#}");
    assert_eq!(
        peer(&st, "r1")["state"],
        "in_sync",
        "r1 is up and flushed all along: {st:#}"
    );

    // A writer runs while r2 comes back, at 2 MiB/s: a rebuild holds the WAL written since
    // its base, under the same 32 MiB budget, so the writer leaves it 16 s (on this shared
    // 2-core machine a rebuild that competes with another test's has taken over 4 s).
    let mut fio = fio_writer(dir, "during-rebuild", &p.uri(), "0", "32M", "2m");
    let head = num(&status(&p), "head_lsn");
    wait_status(&p, 60, "the writer is writing", |st| {
        num(st, "head_lsn") > head + 200
    });
    let before = recoveries(&p);
    let back = p.mark();
    let t0 = Instant::now();
    reps[1].restart();
    let st = wait_status(
        &p,
        120,
        "r2, back after an outage past retention, rebuilt and in sync",
        |st| {
            let r = peer(st, "r2");
            r["state"] == "in_sync" && r["reason"] == "rebuilt"
        },
    );
    let took = t0.elapsed().as_secs_f64();
    let sent = p.wait_log(back, &["replica=r2", "base image sent"], 5);
    eprintln!("r2 rebuilt {took:.1}s after its restart; {sent}");
    for l in p.lines_with(mark, &["replica=r2"]) {
        eprintln!("r2: {l}");
    }
    p.wait_log(back, &["replica=r2", "rebuilding from our base image"], 5);
    let after = recoveries(&p);
    assert_eq!(
        (
            after.rebuild_started - before.rebuild_started,
            after.rebuild_done - before.rebuild_done
        ),
        (1, 1),
        "exactly one rebuild, of r2: before {before:?}, after {after:?}"
    );
    assert!(
        rebuild_lines(&p, mark, "r1").is_empty(),
        "r1 was never out of sync:\n{}",
        rebuild_lines(&p, mark, "r1").join("\n")
    );
    eprintln!("recoveries since the start: {start:?} -> {after:?}; status {st}");
    // Live shipping after the rebuild.
    let head = num(&st, "head_lsn");
    wait_status(&p, 60, "the writer goes on after the rebuild", |st| {
        num(st, "head_lsn") > head + 200
    });
    fio.stop();
    let mut c = connect(&p.uri(), dir, "final");
    c.flush_ok("R3: FLUSH after the writer");
    drop(c);
    stop_and_compare(dir, &mut p, &mut reps, "R3");
}

/// Brief R2: a 256 MiB volume, every block written; one replica's store is wiped (deleted,
/// and `blockrep replica --size` creates a blank one) and rebuilt while fio writes random
/// 4 KiB blocks (with a FLUSH every 64) to the primary at up to 8 MiB/s. At the end fio stops, a FLUSH, every copy in
/// sync, a clean stop: the three exports are byte-identical. Prints the rebuild's speed.
#[test]
fn r2_rebuild_of_256mib_under_fio_is_byte_identical() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 256 * MIB;
    let (mut p, mut reps) = cluster(dir, size, 2, &["--commit", "sync-quorum"]);
    let fill = fio_run(
        dir,
        "fill",
        &p.uri(),
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--size=256M",
            "--fsync=16",
            "--end_fsync=1",
        ],
        600,
    );
    assert_eq!(fill.write_bytes, size, "the fill writes every block");
    wait_settled(&p, 120);

    // Wipe r2: its store is gone, `replica --size` makes a blank one at the same address.
    reps[1].stop_ok();
    wait_peer(&p, "r2", "disconnected", 30);
    std::fs::remove_dir_all(&reps[1].store).unwrap();
    let (store, port) = (reps[1].store.clone(), reps[1].port);
    reps[1].args = replica_args(&store, port, Some(size));
    let before = recoveries(&p);
    let mark = p.mark();
    // fio at up to 8 MiB/s: the rebuild holds the WAL written since its base under the 32 MiB
    // retention budget, so a writer faster than budget / rebuild time would (by design) send
    // it back to a fresh rebuild.
    let mut fio = fio_writer(dir, "during-rebuild", &p.uri(), "0", "256M", "8m");
    let head = num(&status(&p), "head_lsn");
    wait_status(&p, 60, "fio is writing", |st| {
        num(st, "head_lsn") > head + 100
    });
    let t0 = Instant::now();
    let r2_mark = reps[1].mark();
    reps[1].restart();
    reps[1].wait_log(r2_mark, &["blank store joined volume"], 60);
    let mut peak_done = 0u64;
    let st = wait_status(&p, 300, "the wiped r2 rebuilt and in sync", |st| {
        let r = peer(st, "r2");
        if let Some(d) = r["rebuild"]["bytes_done"].as_u64() {
            peak_done = peak_done.max(d);
        }
        r["state"] == "in_sync" && r["reason"] == "rebuilt"
    });
    let took = t0.elapsed().as_secs_f64();
    fio.assert_running();
    let sent = p.wait_log(mark, &["replica=r2", "base image sent"], 10);
    let after = recoveries(&p);
    assert_eq!(
        (
            after.rebuild_started - before.rebuild_started,
            after.rebuild_done - before.rebuild_done
        ),
        (1, 1),
        "one rebuild of r2, started and finished once: before {before:?}, after {after:?}\n\
         rebuild lines:\n{}",
        rebuild_lines(&p, mark, "r2").join("\n")
    );
    assert!(
        rebuild_lines(&p, mark, "r1").is_empty(),
        "r1 stays in sync:\n{}",
        rebuild_lines(&p, mark, "r1").join("\n")
    );
    eprintln!(
        "REBUILD r2: 256 MiB volume rebuilt under fio in {took:.2}s from the replica's restart \
         to in_sync ({:.1} MiB/s of volume); primary: {sent}",
        mib_per_s(size as f64, took)
    );
    // Live shipping after the rebuild, then stop fio, FLUSH, compare.
    let head = num(&st, "head_lsn");
    wait_status(&p, 60, "fio goes on after the rebuild", |st| {
        num(st, "head_lsn") > head + 500
    });
    let w = fio.stop();
    eprintln!(
        "fio during the rebuild: {:.1} MiB/s, {} flushes, flush max {:.1} ms",
        w.bw / MIB as f64,
        w.flushes,
        w.flush_max_ms
    );
    let mut c = connect(&p.uri(), dir, "final");
    c.flush_ok("R2: FLUSH after fio");
    drop(c);
    stop_and_compare(dir, &mut p, &mut reps, "R2 (256 MiB)");
}

/// Brief R12: a rebuild slowed down by `--rebuild-rate 20MiB` is interrupted twice: first the
/// replica is killed (SIGKILL) in the middle (its store stays marked rebuilding, and the next
/// session starts a fresh rebuild that converges), then, in another rebuild, the primary is
/// killed in the middle and restarted on the same store (the next session converges). A
/// writer runs throughout (2 MiB/s: the WAL written during a 6 s rebuild stays inside the
/// retention budget); the three exports are identical.
#[test]
fn r12_kill9_replica_then_primary_mid_rebuild_converges() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 128 * MIB;
    let (mut p, mut reps) = cluster(
        dir,
        size,
        2,
        &["--commit", "sync-quorum", "--rebuild-rate", "20MiB"],
    );
    fio_run(
        dir,
        "fill",
        &p.uri(),
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--size=128M",
            "--fsync=16",
            "--end_fsync=1",
        ],
        600,
    );
    wait_settled(&p, 120);
    let (store, port) = (reps[1].store.clone(), reps[1].port);
    let wipe = |r: &mut Node| {
        r.stop_ok();
        std::fs::remove_dir_all(&store).unwrap();
        r.args = replica_args(&store, port, Some(size));
    };
    let mut fio = fio_writer(dir, "phase1", &p.uri(), "0", "128M", "2m");

    // --- 1. SIGKILL of the replica in the middle of its rebuild.
    wipe(&mut reps[1]);
    let before = recoveries(&p);
    let mark = p.mark();
    reps[1].restart();
    p.wait_log(mark, &["replica=r2", "streaming the base image"], 60);
    wait_mid_rebuild(&p, "r2");
    let own = own_status(&reps[1]);
    assert_eq!(
        own["rebuilding"], true,
        "r2's own status in the middle of its rebuild: {own:#}"
    );
    let st = status(&p);
    assert_eq!(peer(&st, "r2")["state"], "rebuilding", "{st:#}");
    reps[1].kill9();
    // Once the primary has seen the session end, a rebuild that finished would have said so.
    wait_status(&p, 30, "r2's session gone", |st| {
        peer(st, "r2")["state"] != "rebuilding"
    });
    assert!(
        p.lines_with(mark, &["replica=r2", "rebuilt"]).is_empty(),
        "the rebuild was meant to be interrupted, but it finished (20 MiB/s over 128 MiB should \
         take > 6 s):\n{}",
        p.log_since(mark)
    );
    let ins = inspect_json(&reps[1].store);
    eprintln!(
        "inspect --json of r2 killed mid-rebuild (it has no rebuilding field; the replica's \
         status has): {ins}"
    );
    let again = p.mark();
    reps[1].restart();
    let own = own_status(&reps[1]);
    assert_eq!(
        own["rebuilding"], true,
        "r2 restarted after SIGKILL mid-rebuild: its store must still say rebuilding: {own:#}"
    );
    p.wait_log(
        again,
        &["replica=r2", "its last rebuild did not finish"],
        60,
    );
    wait_status(&p, 180, "r2's fresh rebuild converges", |st| {
        let r = peer(st, "r2");
        r["state"] == "in_sync" && r["reason"] == "rebuilt"
    });
    let own = own_status(&reps[1]);
    assert_eq!(own["rebuilding"], false, "r2 after its rebuild: {own:#}");
    let after = recoveries(&p);
    let started = after.rebuild_started - before.rebuild_started;
    let history = p.lines_with(mark, &["replica=r2"]).join("\n");
    // The killed rebuild and the fresh one; on a loaded machine a session may also drop
    // and retry (a further start), but only one rebuild ever completes.
    assert!(
        started >= 2 && after.rebuild_done - before.rebuild_done == 1,
        "the killed rebuild and the fresh one started, one done: {before:?} -> {after:?}\n\
         the primary about r2:\n{history}"
    );
    if started > 2 {
        eprintln!("r12: {started} rebuilds started; the primary about r2:\n{history}");
    }
    fio.assert_running();

    // --- 2. SIGKILL of the primary in the middle of another rebuild.
    wipe(&mut reps[1]);
    let mark = p.mark();
    reps[1].restart();
    p.wait_log(mark, &["replica=r2", "streaming the base image"], 60);
    wait_mid_rebuild(&p, "r2");
    assert_eq!(own_status(&reps[1])["rebuilding"], true);
    p.kill9();
    fio.kill();
    assert!(
        p.lines_with(mark, &["replica=r2", "rebuilt"]).is_empty(),
        "the second rebuild was meant to be interrupted, but it finished:\n{}",
        p.log_since(mark)
    );
    // The replica has closed its end of the dead session: it has handled the loss.
    let r2_port = reps[1].port;
    wait_until(
        Duration::from_secs(30),
        "r2 closes the session of the killed primary",
        || open_sessions(r2_port) == 0,
    );
    let own = own_status(&reps[1]);
    assert_eq!(
        own["rebuilding"], true,
        "r2 after the primary died mid-rebuild: {own:#}"
    );
    let restart = p.mark();
    p.restart();
    assert!(
        p.banner.contains("epoch 2"),
        "the restarted primary serves a new epoch: {}",
        p.banner
    );
    let mut fio = fio_writer(dir, "phase2", &p.uri(), "0", "128M", "2m");
    p.wait_log(
        restart,
        &["replica=r2", "its last rebuild did not finish"],
        60,
    );
    let st = wait_status(&p, 180, "r2 rebuilt by the restarted primary", |st| {
        let r = peer(st, "r2");
        r["state"] == "in_sync" && r["reason"] == "rebuilt"
    });
    wait_peer(&p, "r1", "in_sync", 120);
    for l in p.lines_with(restart, &["replica=r1"]) {
        eprintln!("r1 after the primary's restart: {l}");
    }
    assert_eq!(own_status(&reps[1])["rebuilding"], false);
    let counted = recoveries(&p);
    assert!(
        counted.rebuild_done >= 1 && counted.rebuild_started == counted.rebuild_done,
        "every rebuild the restarted primary started finished: {counted:?}"
    );
    let head = num(&st, "head_lsn");
    wait_status(&p, 60, "the writer goes on", |st| {
        num(st, "head_lsn") > head + 200
    });
    fio.stop();
    let mut c = connect(&p.uri(), dir, "final");
    c.flush_ok("R12: FLUSH after the writer");
    drop(c);
    stop_and_compare(dir, &mut p, &mut reps, "R12");
}

/// Brief S20: r1 is frozen (SIGSTOP) while writes without a FLUSH go through the primary, so
/// r2 holds entries r1 never got. The primary and r1 are killed, r1 is promoted
/// (`serve r1 --replica r2=...`): r2's log is ahead of the new primary's. Those entries were
/// never committed, so r2 kept them in its WAL only (its checkpoints wait for the commit
/// point): r2's log is cut back to r1's in place, never merged and with no rebuild, and r2
/// catches up. A writer runs on the new primary meanwhile; a FLUSH through it succeeds once
/// r2 is back; the writes only r2 had are gone from every copy.
#[test]
fn s20_replica_ahead_after_failover_is_cut_back_never_merged() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut p, mut reps) = cluster(dir, 32 * MIB, 2, &[]);
    assert!(p.banner.contains("sync-all"), "{}", p.banner);

    // History every copy has: a storm with FLUSHes, sealed by a final FLUSH, and a marker.
    let log_a = dir.join("storm-a.log");
    let mut storm = Storm::new(&p.uri(), &log_a)
        .seq_base(1 << 40)
        .flush_every(32)
        .dir(dir)
        .paced(1500)
        .spawn();
    storm_until(&mut storm, &log_a, 1500, 60);
    let mut c = connect(&p.uri(), dir, "p");
    let sealed_a = seal_storm(&mut storm, &log_a, &mut c, "S20 before the freeze");
    let common = data(dir, "common", 1, 256 * 1024);
    c.write_ok(12 * MIB, &common);
    c.flush_ok("S20: FLUSH with every copy up");
    wait_settled(&p, 60);

    // r1 freezes; what follows is written without a FLUSH and reaches r2 only.
    reps[0].signal(libc::SIGSTOP);
    let only_r2 = data(dir, "only-r2", 2, 256 * 1024);
    let only_r2_off = 16 * MIB;
    c.write_ok(only_r2_off, &only_r2);
    let log_z = dir.join("storm-z.log");
    let mut zstorm = Storm::new(&p.uri(), &log_z)
        .seq_base(2 << 40)
        .flush_every(0)
        .dir(dir)
        .paced(1500)
        .spawn();
    storm_until(&mut zstorm, &log_z, 1000, 60);
    zstorm.kill9();
    drop(c);
    // r2 makes it durable (the primary asks in-sync replicas for progress on its own).
    let st = wait_status(&p, 30, "r2 durable through the head", |st| {
        num(&peer(st, "r2"), "durable_lsn") == num(st, "head_lsn")
    });
    let p_head = num(&st, "head_lsn");
    let r1_known = num(&peer(&st, "r1"), "durable_lsn");
    assert!(r1_known < p_head, "r1 is frozen behind: {st:#}");
    p.kill9();
    reps[0].kill9();
    let r1_head = inspect_json(&reps[0].store)["head_lsn"]
        .as_u64()
        .expect("r1's head");
    let r2_head = num(&own_status(&reps[1]), "head_lsn");
    eprintln!("old primary's head {p_head}, r1 {r1_head}, r2 {r2_head}");
    assert!(
        r2_head > r1_head && r2_head == p_head,
        "r2 must hold entries r1 never got: r1 {r1_head}, r2 {r2_head}, old primary {p_head}"
    );

    // Promotion of r1; r2 is ahead of it.
    let mut r1p = primary(&reps[0].store, "r1p", &[spec(&reps[1])], &[]);
    assert!(r1p.banner.contains("epoch 2"), "{}", r1p.banner);
    let log_b = dir.join("storm-b.log");
    let mut storm = Storm::new(&r1p.uri(), &log_b)
        .seq_base(3 << 40)
        .flush_every(0)
        .dir(dir)
        .paced(1500)
        .spawn();
    let ahead = r1p.wait_log(0, &["replica=r2", "is ahead of ours"], 60);
    assert!(
        ahead.contains(&format!("its log ({r2_head}) is ahead of ours ({r1_head})")),
        "{ahead}"
    );
    r1p.wait_log(
        0,
        &[
            "replica=r2",
            &format!("asking it to cut its log after {r1_head}"),
        ],
        30,
    );
    storm_more(&mut storm, &log_b, 300, 60);
    wait_status(&r1p, 120, "r2 back in sync with the new primary", |st| {
        peer(st, "r2")["state"] == "in_sync"
    });
    let counted = recoveries(&r1p);
    assert_eq!(
        (counted.truncated, counted.rebuild_started),
        (1, 0),
        "r2's log cut in place, no rebuild: {counted:?}"
    );
    let mut c = connect(&r1p.uri(), dir, "r1p");
    c.flush_ok("S20: FLUSH through the new primary once r2 is back");
    storm_more(&mut storm, &log_b, 500, 60);
    let sealed_b = seal_storm(&mut storm, &log_b, &mut c, "S20 on the new primary");
    drop(c);

    let images = stop_and_compare(dir, &mut r1p, &mut reps[1..], "S20");
    for img in &images {
        let what = img.display().to_string();
        assert_zero_range(
            img,
            only_r2_off,
            only_r2.bytes.len() as u64,
            &format!("{what}: the write only r2 had (never merged)"),
        );
        assert_holds(img, 12 * MIB, &common, &what);
        // The Z storm's writes were issued but are in neither log: a block holding one fails.
        verify_storm(img, &[sealed_a.clone(), sealed_b.clone()], &what);
    }
    // The old primary did hold that write (it was real, and it is gone from the volume).
    let old = dir.join("old-p.img");
    export(&p.store, &old);
    assert_holds(
        &old,
        only_r2_off,
        &only_r2,
        "the killed old primary's store",
    );
}

/// Brief R10: the primary P is killed (SIGKILL, in the middle of a write storm) and r1 is
/// promoted with P's address among its replicas; then `blockrep replica P_DIR` runs and P
/// rejoins its volume as a replica while a writer runs on the new primary: by a catch-up
/// (after its own tail, if r1 never got it, is cut in place) when r1 still has the WAL P
/// lacks, else by a rebuild. Under sync-all a FLUSH succeeds only once P is in sync; every
/// copy ends identical.
#[test]
fn r10_old_primary_rejoins_as_replica() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut p, mut reps) = cluster(dir, 32 * MIB, 2, &[]);
    let log_a = dir.join("storm-a.log");
    let mut storm = Storm::new(&p.uri(), &log_a)
        .seq_base(1 << 40)
        .flush_every(32)
        .dir(dir)
        .paced(1500)
        .spawn();
    storm_until(&mut storm, &log_a, 2000, 60);
    p.kill9();
    let st = storm.wait(60);
    assert!(st.success(), "{st}: {}", storm.stderr_text());
    let p_port = free_port();
    let p_addr = format!("127.0.0.1:{p_port}");

    reps[0].stop_ok();
    let mut r1p = primary(
        &reps[0].store,
        "r1p",
        &[spec(&reps[1]), ("p".to_string(), p_addr.clone())],
        &[],
    );
    assert!(
        r1p.banner.contains("epoch 2") && r1p.banner.contains("sync-all with 2 replica(s)"),
        "{}",
        r1p.banner
    );
    wait_peer(&r1p, "r2", "in_sync", 120);
    let st = status(&r1p);
    assert_ne!(peer(&st, "p")["state"], "in_sync", "{st:#}");
    let log_b = dir.join("storm-b.log");
    let mut storm = Storm::new(&r1p.uri(), &log_b)
        .seq_base(2 << 40)
        .flush_every(0)
        .dir(dir)
        .paced(1500)
        .spawn();
    storm_until(&mut storm, &log_b, 300, 60);

    // The old primary's store, as a replica at the address the new primary knows.
    let mark = r1p.mark();
    let old = replica_on(&p.store, "p-as-replica", p_port, None);
    let st = wait_status(&r1p, 180, "the old primary in sync as a replica", |st| {
        peer(st, "p")["state"] == "in_sync"
    });
    let reason = peer(&st, "p")["reason"].as_str().unwrap_or("").to_string();
    let path: Vec<String> = r1p.lines_with(mark, &["replica=p"]);
    eprintln!("the old primary rejoined by: {reason}\n{}", path.join("\n"));
    assert!(
        ["caught up", "rebuilt"].contains(&reason.as_str()),
        "the old primary missed the new primary's writes: it rejoins by catch-up or rebuild, \
         not {reason:?}"
    );
    let counted = recoveries(&r1p);
    match reason.as_str() {
        "rebuilt" => assert!(counted.rebuild_done >= 1, "{counted:?}"),
        _ => assert!(counted.catch_up >= 1, "{counted:?}"),
    }
    eprintln!("recoveries on the new primary: {counted:?}");
    let own = own_status(&old);
    assert_eq!(own["role"], "replica", "{own:#}");
    assert_eq!(own["epoch"], 2, "{own:#}");
    storm_more(&mut storm, &log_b, 500, 60);
    let mut c = connect(&r1p.uri(), dir, "r1p");
    // sync-all: this FLUSH needs the old primary durable too.
    let sealed_b = seal_storm(&mut storm, &log_b, &mut c, "R10 on the new primary");
    drop(c);
    let mut others = vec![reps.remove(1), old];
    let images = stop_and_compare(dir, &mut r1p, &mut others, "R10");
    for img in &images {
        verify_storm(
            img,
            &[log_a.clone(), sealed_b.clone()],
            &img.display().to_string(),
        );
    }
}

/// A token file for `--admin-token-file`, readable by its owner only.
fn write_token(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, "a10-admin-token-0123456789\n").expect("token file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Brief A10: a replica restarts on a new port. The primary keeps trying the old address and
/// does not reach it until `blockrep set-address` points it there; then it catches up (its
/// identity and progress kept, no rebuild) while the writer runs; the copies end identical.
#[test]
fn a10_changed_address_restart_recovers_after_address_update() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // set-address needs the primary's admin token.
    let token = dir.join("admin.token");
    write_token(&token);
    let token_arg = token.to_str().expect("a UTF-8 path");
    let (mut p, mut reps) = cluster(
        dir,
        32 * MIB,
        2,
        &["--commit", "sync-quorum", "--admin-token-file", token_arg],
    );
    let log = dir.join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(64)
        .dir(dir)
        .paced(800)
        .spawn();
    storm_until(&mut storm, &log, 500, 60);
    let start = recoveries(&p);

    let old_addr = reps[1].addr();
    let mark = p.mark();
    reps[1].stop_ok();
    wait_peer(&p, "r2", "disconnected", 30);
    let new_port = free_port();
    reps[1].set_listen_port(new_port);
    let new_addr = reps[1].addr();
    reps[1].restart();
    p.wait_log(
        mark,
        &["replica=r2", &format!("cannot connect to {old_addr}")],
        30,
    );
    // For 3 s (several reconnect rounds) the primary does not find r2. The time is the point:
    // nothing may change during it, so this polls for its whole length.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let st = status(&p);
        let r2 = peer(&st, "r2");
        assert!(
            ["disconnected", "connecting"].contains(&r2["state"].as_str().unwrap_or("")),
            "r2 moved; the primary cannot have reached it at its old address: {st:#}"
        );
        assert_eq!(r2["address"], old_addr.as_str(), "{st:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let own = own_status(&reps[1]);
    let head = num(&status(&p), "head_lsn");
    assert!(
        num(&own, "head_lsn") < head,
        "r2, unreachable, lacks the newer writes: its head {} vs the primary's {head}",
        own["head_lsn"]
    );
    storm_more(&mut storm, &log, 300, 60);

    // An unknown name is refused; the real update is accepted.
    let out = run(blockrep_timed(30)
        .args(["set-address", "r9=127.0.0.1:1", "--admin"])
        .arg(&p.admin)
        .arg("--admin-token-file")
        .arg(&token));
    assert!(
        !out.status.success(),
        "set-address for a replica the primary does not have must fail: {}",
        describe(&out)
    );
    let out = run_ok(
        blockrep_timed(30)
            .arg("set-address")
            .arg(format!("r2={new_addr}"))
            .arg("--admin")
            .arg(&p.admin)
            .arg("--admin-token-file")
            .arg(&token),
    );
    eprintln!("set-address: {}", out.trim());
    p.wait_log(mark, &["replica=r2", "replica address updated"], 10);
    let line = p.wait_log(mark, &["replica=r2", "state=\"in_sync\""], 60);
    assert!(
        line.contains("caught up"),
        "r2 rejoins by catch-up: {line}\nthe primary about r2 since the outage:\n{}",
        p.lines_with(mark, &["replica=r2"]).join("\n")
    );
    p.wait_log(mark, &["replica=r2", "catching up from"], 5);
    let st = status_cli(&p);
    let r2 = peer(&st, "r2");
    assert_eq!(r2["address"], new_addr.as_str(), "{st:#}");
    assert_eq!(r2["state"], "in_sync", "{st:#}");
    let end = recoveries(&p);
    assert!(end.catch_up > start.catch_up, "{start:?} -> {end:?}");
    assert_eq!(
        (end.rebuild_started, end.rebuild_done),
        (0, 0),
        "a moved replica keeps its progress: no rebuild"
    );
    assert!(rebuild_lines(&p, mark, "r2").is_empty());
    storm_more(&mut storm, &log, 500, 60);
    finish_with_storm(dir, &mut p, &mut reps, &mut storm, &log, "A10");
}

/// Brief S5: a replica flaps (5 quick cycles of stop, writes, restart; SIGKILL on two of
/// them), each time well inside the retention budget: every return is a catch-up, never a
/// rebuild, and it ends in sync with identical copies.
#[test]
fn s5_flapping_replica_never_rebuilds() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut p, mut reps) = cluster(dir, 32 * MIB, 2, &["--commit", "sync-quorum"]);
    let log = dir.join("storm.log");
    let mut storm = Storm::new(&p.uri(), &log)
        .seq_base(1 << 40)
        .flush_every(64)
        .dir(dir)
        .paced(1500)
        .spawn();
    storm_until(&mut storm, &log, 500, 60);
    let start = recoveries(&p);
    let first = p.mark();
    for cycle in 1..=5 {
        let mark = p.mark();
        if cycle % 2 == 0 {
            reps[1].kill9();
        } else {
            reps[1].stop_ok();
        }
        wait_status(&p, 30, &format!("cycle {cycle}: r2 gone"), |st| {
            peer(st, "r2")["state"] == "disconnected"
        });
        storm_more(&mut storm, &log, 600, 60);
        let st = status(&p);
        let r2 = peer(&st, "r2");
        assert_eq!(r2["state"], "disconnected", "cycle {cycle}: {st:#}");
        assert!(num(&r2, "lag_bytes") < RETENTION, "cycle {cycle}: {st:#}");
        reps[1].restart();
        let line = p.wait_log(mark, &["replica=r2", "state=\"in_sync\""], 60);
        assert!(
            line.contains("caught up"),
            "cycle {cycle}: r2 must return by catch-up: {line}\nthe primary about r2 since the \
             outage:\n{}\nr2's log:\n{}",
            p.lines_with(mark, &["replica=r2"]).join("\n"),
            tail(&reps[1].log(), 12)
        );
        eprintln!("cycle {cycle}: {line}");
        // "caught up" means everything up to the head is on its way to r2; before the next
        // cycle it must also have been applied and reported durable, or the next outage
        // starts from the old position (and the retained WAL adds up across cycles).
        let head = num(&status(&p), "head_lsn");
        wait_status(
            &p,
            60,
            &format!("cycle {cycle}: r2 durable through {head}"),
            |st| {
                let r = peer(st, "r2");
                r["state"] == "in_sync" && num(&r, "durable_lsn") >= head
            },
        );
    }
    let st = wait_peer(&p, "r2", "in_sync", 30);
    let end = recoveries(&p);
    assert!(
        end.catch_up - start.catch_up >= 5,
        "five returns, five catch-ups: {start:?} -> {end:?}"
    );
    assert_eq!(
        (end.rebuild_started, end.rebuild_done),
        (0, 0),
        "a flapping replica inside retention is never rebuilt: {end:?}; the primary about r2:\n{}",
        p.lines_with(first, &["replica=r2"]).join("\n")
    );
    let rebuilds = rebuild_lines(&p, first, "r2");
    assert!(rebuilds.is_empty(), "{}", rebuilds.join("\n"));
    assert_eq!(peer(&st, "r1")["state"], "in_sync");
    storm_more(&mut storm, &log, 300, 60);
    finish_with_storm(dir, &mut p, &mut reps, &mut storm, &log, "S5");
}

/// One mode of `primary_writes_never_stall_on_a_dead_replica...`: a healthy fio run, then the
/// same run with r2 dead (`sig`: SIGKILL, or SIGSTOP for a hung replica whose connection
/// stays open). The dead run writes 48 MiB, past the 32 MiB retention budget.
fn never_stall(dir: &Path, mode: &str, sig: i32) {
    let sub = dir.join(mode);
    std::fs::create_dir_all(&sub).unwrap();
    let dir = sub.as_path();
    let (mut p, mut reps) = cluster(dir, 64 * MIB, 2, &["--commit", mode]);
    let job = [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--io_size=48M",
        "--fsync=64",
        "--randseed=5",
    ];
    let healthy = fio_run(dir, "healthy", &p.uri(), &job, 300);
    let st = wait_settled(&p, 60);
    assert!(
        rebuild_lines(&p, 0, "r1").is_empty() && rebuild_lines(&p, 0, "r2").is_empty(),
        "{mode}: no replica may fall out of sync in the healthy run: {st:#}\n{}",
        p.log()
    );

    let mark = p.mark();
    let sig_name = if sig == libc::SIGKILL {
        reps[1].kill9();
        "SIGKILL"
    } else {
        reps[1].signal(sig);
        "SIGSTOP"
    };
    if sig == libc::SIGKILL {
        wait_peer(&p, "r2", "disconnected", 30);
    }
    let dead = fio_run(dir, "dead", &p.uri(), &job, 300);
    eprintln!(
        "{mode}, r2 {sig_name}: healthy {:.1} MiB/s (flush max {:.1} ms, p99 {:.1} ms), dead \
         replica {:.1} MiB/s (flush max {:.1} ms, p99 {:.1} ms, {} flushes)",
        healthy.bw / MIB as f64,
        healthy.flush_max_ms,
        healthy.flush_p99_ms,
        dead.bw / MIB as f64,
        dead.flush_max_ms,
        dead.flush_p99_ms,
        dead.flushes
    );
    assert_eq!(
        dead.write_bytes,
        48 * MIB,
        "{mode}: every write of the dead run"
    );
    assert!(
        dead.flushes >= 700,
        "{mode}: fio's FLUSHes ({}) every 64 writes",
        dead.flushes
    );
    assert!(
        dead.flush_max_ms < 1000.0,
        "{mode}, r2 {sig_name}: a FLUSH took {:.0} ms (p99 {:.0} ms); with a dead replica it \
         must not wait for it (the barrier timeout is 5 s)",
        dead.flush_max_ms,
        dead.flush_p99_ms
    );
    assert!(
        dead.bw >= 0.25 * healthy.bw,
        "{mode}, r2 {sig_name}: writes slowed from {:.1} to {:.1} MiB/s with a dead replica",
        healthy.bw / MIB as f64,
        dead.bw / MIB as f64
    );
    // Past the budget the dead replica is released, and so is the WAL it held.
    let released = p.wait_log(
        mark,
        &[
            "replica=r2",
            "needs_rebuild",
            &format!("exceeds {RETENTION} bytes"),
        ],
        30,
    );
    eprintln!("{mode}: {released}");
    let st = wait_status(&p, 60, "the WAL held for r2 released", |st| {
        num(st, "wal_used_bytes") < RETENTION
            && peer(st, "r2")["state"] != "in_sync"
            && peer(st, "r2")["state"] != "catching_up"
    });
    assert_eq!(
        peer(&st, "r1")["state"],
        "in_sync",
        "{mode}: r1 stays in sync: {st:#}"
    );
    assert!(
        rebuild_lines(&p, mark, "r1").is_empty(),
        "{mode}: the healthy replica is never released or rebuilt:\n{}",
        rebuild_lines(&p, mark, "r1").join("\n")
    );
    // Still writing and flushing normally, with r2 dead.
    let after = fio_run(
        dir,
        "after",
        &p.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=8M",
            "--fsync=64",
            "--randseed=6",
        ],
        120,
    );
    assert!(after.flush_max_ms < 1000.0, "{mode}: {after:?}");
    let mut c = connect(&p.uri(), dir, "final");
    c.flush_ok(&format!("{mode}: FLUSH with r2 dead"));
    drop(c);
    // The primary and r1 end identical.
    wait_status(&p, 60, "r1 durable through the head", |st| {
        num(&peer(st, "r1"), "durable_lsn") == num(st, "head_lsn")
    });
    p.stop_ok();
    reps[0].stop_ok();
    reps[1].kill9();
    let pimg = dir.join("p.img");
    let r1img = dir.join("r1.img");
    export(&p.store, &pimg);
    export(&reps[0].store, &r1img);
    assert_same_files(&r1img, &pimg, &format!("{mode}: r1 against the primary"));
}

/// With a replica dead, a primary writes and flushes at full speed under best-effort (the
/// replica hung: SIGSTOP) and under sync-quorum with 3 copies (the replica killed): fio's
/// throughput stays within a fair fraction of the healthy run's, no FLUSH comes near the
/// barrier timeout, and writing past the retention budget releases the dead replica
/// (needs_rebuild) and the WAL it held instead of stalling.
#[test]
fn primary_writes_never_stall_on_a_dead_replica_best_effort_and_sync_quorum() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    never_stall(tmp.path(), "best-effort", libc::SIGSTOP);
    never_stall(tmp.path(), "sync-quorum", libc::SIGKILL);
}
