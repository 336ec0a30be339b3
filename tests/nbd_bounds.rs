//! The NBD server's bounds, end to end (issue 15), against real `blockrep serve` processes:
//! the global memory budget (clients flooding 32 MiB WRITEs and never reading a reply keep
//! the server's resident memory near the budget, and a well-behaved qemu-io is served all the
//! while), the idle timeout (an idle connection is closed, a busy one never), and SIGTERM's
//! deadline with a client that stopped reading (exit 0 within the grace, flushed data kept).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
/// The largest request the server takes (its MAX_PAYLOAD).
const BIG: u32 = 32 << 20;
/// `SHUTDOWN_GRACE` in frontend/src/connection.rs: what a connection gets after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A raw client: negotiates with EXPORT_NAME and then speaks the transmission phase by hand,
// so it can do what no well-behaved client does (never read, stop mid-payload).

struct Raw {
    s: TcpStream,
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(be_u64(&greeting), NBDMAGIC);
        assert_eq!(be_u64(&greeting[8..]), IHAVEOPT);
        // FIXED_NEWSTYLE | NO_ZEROES, then EXPORT_NAME "blockrep".
        let mut hello = 3u32.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&8u32.to_be_bytes());
        hello.extend_from_slice(b"blockrep");
        s.write_all(&hello).unwrap();
        let mut export = [0u8; 10];
        s.read_exact(&mut export).expect("export size and flags");
        Raw { s }
    }

    fn header(cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn send(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.s
            .write_all(&Raw::header(cmd, cookie, offset, len))
            .expect("sending a request");
    }

    /// A simple reply's (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("a reply");
        assert_eq!(be_u32(&h), SIMPLE_REPLY_MAGIC);
        (be_u32(&h[4..]), be_u64(&h[8..]))
    }

    fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send(CMD_WRITE, cookie, offset, data.len() as u32);
        self.s.write_all(data).expect("a WRITE payload");
        assert_eq!(self.reply(), (0, cookie), "WRITE at {offset}");
    }

    fn flush_ok(&mut self, cookie: u64) {
        self.send(CMD_FLUSH, cookie, 0, 0);
        assert_eq!(self.reply(), (0, cookie), "FLUSH");
    }

    /// Bytes the server sent that this client has not read.
    fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(self.s.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD");
        n as usize
    }

    /// Whether the server has closed the connection (reads nothing it may have sent).
    fn closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut b = [0u8; 1];
        let closed = match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => panic!("the server sent something unasked"),
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        };
        self.s
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        closed
    }
}

/// Writes all of `buf` unless `stop` is set first (a full socket is retried until then).
fn send_unless_stopped(s: &mut TcpStream, mut buf: &[u8], stop: &AtomicBool) -> bool {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return false,
            Ok(n) => buf = &buf[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn store(tmp: &Path, size: u64) -> std::path::PathBuf {
    let dir = tmp.join("vol");
    run_ok(blockrep().arg("create").arg(&dir).args([
        "--size",
        &size.to_string(),
        "--wal-size",
        "64MiB",
    ]));
    dir
}

// ---------------------------------------------------------------------------------------------
// (a) The global memory budget.

const FLOODERS: u64 = 8;
const FLOOD_BUDGET: u64 = 64 * MIB;
/// What the server may use on top of its resident size at rest and the budget: the store's
/// own copies of what it has not checkpointed (about twice its 64 MiB WAL at the peak:
/// docs/BENCHMARKS.md, "How cost grows"; writes over 16 MiB, a quarter of this WAL, are split,
/// so the WAL holds several at once), one 256 KiB read-ahead window per connection, the WAL
/// writer's 4 MiB aligned buffer, and the allocator's slack (a loaded CI run peaked 18 MiB
/// over the two WALs' worth). Without a global budget, 8 flooders hold 8 x (64 MiB + a
/// 32 MiB payload being read) = 768 MiB.
const RSS_MARGIN: u64 = 2 * 64 * MIB + 64 * MIB;

/// qemu-io writes `pattern` at `offset` and reads it back.
fn qemu_io_roundtrip(port: u16, offset: u64, pattern: u8) -> Result<(), String> {
    let out = run(timed(120, "qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("write -P {pattern} {offset} 1M"),
        "-c",
        &format!("read -P {pattern} {offset} 1M"),
        &format!("nbd://127.0.0.1:{port}/blockrep"),
    ]));
    let text = describe(&out);
    if out.status.success() && !text.contains("failed") && text.contains("read 1048576/1048576") {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn flooding_clients_that_never_read_stay_within_the_global_budget() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let vol = store(tmp.path(), 192 * MIB);
    let budget = format!("{}MiB", FLOOD_BUDGET / MIB);
    let mut srv = serve(&vol, &["--nbd-memory-budget", &budget]);
    let pid = srv.pid();
    let at_rest = rss(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let payload: Arc<Vec<u8>> = Arc::new(random_bytes(7, BIG as usize));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|k| {
            let (stop, sent, payload) = (stop.clone(), sent.clone(), payload.clone());
            let mut c = Raw::connect(srv.port);
            std::thread::spawn(move || {
                c.s.set_write_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                // Bounded: at most 64 WRITEs each, and it stops when told to.
                for i in 0..64u64 {
                    // All at one offset: the store keeps one copy of what it has not yet
                    // checkpointed, so its share of the memory stays one payload.
                    let header = Raw::header(CMD_WRITE, k << 32 | i, 0, BIG);
                    if !send_unless_stopped(&mut c.s, &header, &stop)
                        || !send_unless_stopped(&mut c.s, &payload, &stop)
                    {
                        return;
                    }
                    sent.fetch_add(u64::from(BIG), Ordering::Relaxed);
                }
            })
        })
        .collect();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The flood runs until it has sent more than the server could ever hold without the
    // budget, with a well-behaved client served in the middle of it.
    let mut served = 0;
    wait_until(
        Duration::from_secs(300),
        "the flood and two qemu-io round trips",
        || {
            assert!(srv.running(), "the server died: {}", srv.log());
            if served < 2 {
                let pattern = 0x5a + served as u8;
                qemu_io_roundtrip(srv.port, 160 * MIB, pattern)
                    .unwrap_or_else(|e| panic!("qemu-io during the flood: {e}"));
                served += 1;
            }
            let n = sent.load(Ordering::Relaxed);
            (served == 2 && n >= 2 << 30).then_some(()).ok_or(n)
        },
    );
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().expect("flooder");
    }
    sampler.join().expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "VmRSS: {} MiB at rest, peak {} MiB",
        at_rest / MIB,
        peak / MIB
    );
    assert!(
        peak <= at_rest + FLOOD_BUDGET + RSS_MARGIN,
        "VmRSS peaked at {} MiB with a {} MiB budget ({} MiB at rest)",
        peak / MIB,
        FLOOD_BUDGET / MIB,
        at_rest / MIB
    );
    srv.stop_ok();
}

// ---------------------------------------------------------------------------------------------
// (b) The idle timeout.

const IDLE_SECS: u64 = 2;

#[test]
fn the_idle_timeout_closes_idle_connections_and_never_busy_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = store(tmp.path(), 64 * MIB);
    let srv = serve(&vol, &["--nbd-idle-timeout", &IDLE_SECS.to_string()]);
    let mark = srv.mark();
    // Busy: a 32 MiB READ whose reply it does not read yet (far more than the sockets hold),
    // and a WRITE sent up to half its payload.
    let mut reading = Raw::connect(srv.port);
    reading.send(CMD_READ, 1, 0, BIG);
    let mut writing = Raw::connect(srv.port);
    let data = random_bytes(3, 1 << 20);
    writing.send(CMD_WRITE, 2, 0, data.len() as u32);
    writing.s.write_all(&data[..data.len() / 2]).unwrap();
    wait_until(Duration::from_secs(30), "the READ reply under way", || {
        reading.unread() > 0
    });
    // Idle: one that never sent a request, one whose last request was answered; both
    // connected after the busy ones went quiet.
    let started = Instant::now();
    let mut never = Raw::connect(srv.port);
    let mut answered = Raw::connect(srv.port);
    answered.flush_ok(3);
    wait_until(
        Duration::from_secs(30),
        "the idle connections closed",
        || never.closed() && answered.closed(),
    );
    assert!(
        started.elapsed() >= Duration::from_millis(IDLE_SECS * 1000 - 100),
        "closed after {:?}, before the {IDLE_SECS} s timeout",
        started.elapsed()
    );
    srv.wait_log(mark, &["closing idle connection"], 10);
    // The busy ones were quiet for longer than the timeout too, and are still served.
    writing.s.write_all(&data[data.len() / 2..]).unwrap();
    assert_eq!(
        writing.reply(),
        (0, 2),
        "the WRITE finished after the pause"
    );
    assert_eq!(reading.reply(), (0, 1), "the READ reply");
    let mut body = vec![0u8; BIG as usize];
    reading.s.read_exact(&mut body).expect("the READ data");
    // Answered, they are idle in their turn.
    wait_until(
        Duration::from_secs(30),
        "the formerly busy connections closed once idle",
        || reading.closed() && writing.closed(),
    );
}

// ---------------------------------------------------------------------------------------------
// (c) SIGTERM with a client that stopped reading.

#[test]
fn sigterm_exits_within_the_grace_with_a_client_that_stopped_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = store(tmp.path(), 64 * MIB);
    let mut srv = serve(&vol, &[]);
    let data = random_bytes(11, 1 << 20);
    let mut c = Raw::connect(srv.port);
    c.write_ok(1, 4 * MIB, &data);
    c.flush_ok(2);
    // Then it asks for 128 MiB and reads none of it; another stops in the middle of a WRITE.
    for cookie in 10..14 {
        c.send(CMD_READ, cookie, 0, BIG);
    }
    let mut half = Raw::connect(srv.port);
    half.send(CMD_WRITE, 20, 0, BIG);
    half.s.write_all(&data).unwrap();
    // (A socket nobody reads stays at its initial size, far below 128 MiB.)
    wait_until(
        Duration::from_secs(30),
        "the replies piling up unread",
        || c.unread() >= 16 << 10,
    );
    let mark = srv.mark();
    srv.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let limit = SHUTDOWN_GRACE + Duration::from_secs(5);
    let status = poll_until(limit, || srv.try_wait());
    let took = t0.elapsed();
    eprintln!("exited {took:?} after SIGTERM");
    let status = status.unwrap_or_else(|| {
        panic!(
            "blockrep serve still running {limit:?} after SIGTERM; log:\n{}",
            srv.log_tail(mark)
        )
    });
    assert!(status.success(), "exit status {status} after SIGTERM");
    assert!(took <= limit, "took {took:?}");
    drop((c, half));
    // The FLUSHed write survived (and nothing of the half-sent WRITE landed).
    let image = tmp.path().join("after.img");
    run_ok(blockrep().arg("export").arg(&vol).arg(&image));
    let img = std::fs::read(&image).unwrap();
    let at = (4 * MIB) as usize;
    assert!(
        img[at..at + data.len()] == data[..],
        "the flushed write is missing"
    );
    assert!(
        img[..data.len()].iter().all(|b| *b == 0),
        "part of an unfinished WRITE landed"
    );
}

#[test]
fn a_memory_budget_below_one_mib_is_refused_before_the_store_is_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-store-here");
    let out = run(blockrep_timed(30).arg("serve").arg(&missing).args([
        "--nbd",
        "127.0.0.1:0",
        "--nbd-memory-budget",
        "64KiB",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("--nbd-memory-budget") && err.contains("at least 1MiB"),
        "{err}"
    );
}
