//! The replication port's bounds, against a real `blockrep replica`: a peer that never reads
//! is disconnected and the replica's memory stays bounded; connections past the cap are
//! refused while a real primary goes on being served; a silent connection is closed after the
//! handshake timeout; failed accepts (EMFILE) back off instead of spinning.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use blockrep_replication::driver::replica::{HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
use blockrep_replication::wire::{self, Body, Frame};
use blockrep_storage::Epoch;
use bytes::BytesMut;
use common::client::{assert_ok, data};
use common::*;

const VOLUME: u64 = 16 * MIB;

fn replica(store: &Path, name: &str) -> Node {
    let port = free_port();
    let args: Vec<OsString> = vec![
        "replica".into(),
        store.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
    ];
    Node::builder(name, store, port, args)
        .ready(Ready::Line("listening on"))
        .stop_timeout(30)
        .start()
}

fn primary(store: &Path, replica: &Node) -> Node {
    let port = free_port();
    let args: Vec<OsString> = vec![
        "serve".into(),
        store.into(),
        "--nbd".into(),
        format!("127.0.0.1:{port}").into(),
        "--replica".into(),
        format!("{}={}", replica.name, replica.addr()).into(),
    ];
    Node::builder("p", store, port, args)
        .ready(Ready::Line("serving"))
        .stop_timeout(30)
        .start()
}

fn probe_bytes() -> Vec<u8> {
    let mut buf = BytesMut::new();
    let frame = Frame {
        epoch: Epoch(0),
        body: Body::Probe { fence: None },
    };
    wire::encode(&frame, &mut buf);
    buf.to_vec()
}

/// The replica's resident memory in KiB, from /proc/PID/status.
fn rss_kib(pid: u32) -> u64 {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Whether the replica answered a probe on `s` (false: it closed the connection instead).
fn probe_answered(s: &mut TcpStream) -> bool {
    if s.write_all(&probe_bytes()).is_err() {
        return false;
    }
    let mut header = [0u8; 24];
    match s.read_exact(&mut header) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            panic!("the replica neither answered a probe nor closed the connection")
        }
        Err(_) => false,
    }
}

#[test]
fn a_peer_that_sends_probes_and_never_reads_is_disconnected_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let r = replica(&create_store(dir.path(), "r", VOLUME), "r");
    let pid = r.pid();
    let before = rss_kib(pid);
    let mark = r.mark();

    let addr = r.addr();
    // Probes sent in bulk, never a byte read back: the replies pile up in the replica.
    let sender = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).expect("connect to the replica");
        let one = probe_bytes();
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
        let mut sent = 0u64;
        // Without a bound the replica never disconnects; this is far past the bound.
        while sent < 256 * MIB {
            match s.write_all(&batch) {
                Ok(()) => sent += batch.len() as u64,
                Err(_) => return (sent, true),
            }
        }
        (sent, false)
    });
    let mut peak = before;
    let line = wait_until(
        Duration::from_secs(120),
        "the non-reading peer disconnected",
        || {
            peak = peak.max(rss_kib(pid));
            r.lines_with(mark, &["does not read"]).into_iter().next()
        },
    );
    assert!(line.contains("127.0.0.1"), "the log names the peer: {line}");
    let (sent, cut_off) = sender.join().expect("the sender thread");
    assert!(
        cut_off,
        "the peer was never cut off ({sent} bytes of probes sent)"
    );
    peak = peak.max(rss_kib(pid));
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "the replica grew by {grown_mib} MiB for {} MiB of probes",
        sent / MIB
    );
    assert_eq!(
        r.lines_with(mark, &["does not read"]).len(),
        1,
        "the disconnect is logged once"
    );
    // The replica goes on answering others.
    let mut s = TcpStream::connect(r.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(
        probe_answered(&mut s),
        "the replica no longer answers probes"
    );
}

#[test]
fn connections_over_the_cap_are_refused_while_the_replica_serves_its_primary() {
    let dir = tempfile::tempdir().unwrap();
    let r = replica(&create_store(dir.path(), "r1", VOLUME), "r1");
    let p = primary(&create_store(dir.path(), "p", VOLUME), &r);
    p.wait_log(0, &["replica=r1", "state=\"in_sync\""], 60);
    let mut client = Client::connect(&p.uri(), dir.path(), "c");
    let first = data(dir.path(), "first", 1, 64 << 10);
    client.write_ok(0, &first);
    assert_ok(&client.flush(), "a flush before the flood");

    let mark = r.mark();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..MAX_CONNECTIONS + 8 {
        let mut s = TcpStream::connect(r.addr()).expect("connect to the replica");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if probe_answered(&mut s) {
            held.push(s);
        } else {
            refused += 1;
        }
    }
    // The primary's session holds one of the slots.
    assert!(
        held.len() < MAX_CONNECTIONS,
        "{} probing connections admitted beside the primary's",
        held.len()
    );
    assert!(refused >= 8, "only {refused} connections refused");
    r.wait_log(mark, &["at its cap"], 10);
    assert_eq!(r.lines_with(mark, &["at its cap"]).len(), 1, "logged once");

    // The primary's writes still reach the replica (sync-all: a FLUSH needs its ack).
    let second = data(dir.path(), "second", 2, 64 << 10);
    client.write_ok(64 << 10, &second);
    assert_ok(&client.flush(), "a flush while the port is at its cap");
    client.check_equal(64 << 10, &second, "the write made during the flood");

    // Closing the held connections frees their slots.
    drop(held);
    wait_until(Duration::from_secs(30), "a slot freed", || {
        let mut s = TcpStream::connect(r.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        probe_answered(&mut s)
    });
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let r = replica(&create_store(dir.path(), "r", VOLUME), "r");
    let mark = r.mark();
    let started = Instant::now();
    let mut s = TcpStream::connect(r.addr()).unwrap();
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT * 3)).unwrap();
    let mut buf = [0u8; 16];
    // The read returns once the replica closes the connection: the condition itself.
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the replica sent {n} bytes to a silent peer"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the silent connection was not closed: {e}"),
    }
    let waited = started.elapsed();
    assert!(
        waited + Duration::from_millis(500) >= HANDSHAKE_TIMEOUT,
        "closed after {waited:?}, before the handshake timeout"
    );
    r.wait_log(mark, &["no frame within"], 10);
}

/// The replica's CPU time so far, in clock ticks (utime + stime of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = read(Path::new(&format!("/proc/{pid}/stat")));
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sets the soft limit on open files of process `pid` (the hard limit stays).
fn set_nofile(pid: u32, limit: usize) {
    run_ok(
        std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(pid.to_string())
            .arg(format!("--nofile={limit}:")),
    );
}

#[test]
fn accept_errors_back_off_instead_of_spinning_and_accepting_resumes() {
    require("prlimit");
    let dir = tempfile::tempdir().unwrap();
    let r = replica(&create_store(dir.path(), "r", VOLUME), "r");
    let pid = r.pid();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // Room for a few connections, then every accept fails with EMFILE.
    set_nofile(pid, open_fds + 3);
    let mark = r.mark();
    let waiting: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(r.addr()).expect("connect to the replica"))
        .collect();
    r.wait_log(mark, &["cannot accept"], 30);

    // The failing connection stays in the backlog: a retry loop without a pause would spin
    // a core for the whole window.
    let window = Duration::from_secs(2);
    let before = cpu_ticks(pid);
    let started = Instant::now();
    poll_until(window * 2, || (started.elapsed() >= window).then_some(()));
    let spent = cpu_ticks(pid) - before;
    let ticks_per_sec = 100;
    assert!(
        spent < ticks_per_sec * window.as_secs() / 4,
        "the replica spent {spent} ticks of CPU in {window:?} failing to accept"
    );
    assert_eq!(
        r.lines_with(mark, &["cannot accept"]).len(),
        1,
        "one log line per burst of failures"
    );

    set_nofile(pid, 4096);
    let line = r.wait_log(mark, &["accepting again after"], 30);
    let failures: u64 = line
        .split("after ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failure count in {line}"));
    assert!(failures < 100, "{failures} failed accepts: {line}");
    let mut s = TcpStream::connect(r.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(probe_answered(&mut s), "the replica answers again");
    drop(waiting);
}
