//! Hostile and malformed NBD traffic, sent by a small raw-socket client written here (libnbd
//! refuses to send most of it). Every test keeps a "witness" connection doing verified I/O in
//! the background the whole time, and checks at the end that the server process is still
//! alive and that a brand-new client works.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

// Protocol numbers, spelled out here (not imported from the server) so the test checks the
// server against the spec rather than against itself.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_OPT_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_DF: u16 = 1 << 2;

const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = 0x8001;
const REPLY_FLAG_DONE: u16 = 1;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

const VOLUME: u64 = 64 * MIB;
const IO_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// A raw NBD client.

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
    b
}

/// Connects and reads the greeting; does not answer it.
fn connect_raw(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    let g = read_n(&mut s, 18);
    assert_eq!(be_u64(&g[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be_u64(&g[8..]), IHAVEOPT, "greeting IHAVEOPT");
    let flags = be_u16(&g[16..]);
    assert!(
        flags & 1 != 0,
        "server must offer FIXED_NEWSTYLE, flags {flags:#x}"
    );
    s
}

/// Connects, reads the greeting and answers it with FIXED_NEWSTYLE | NO_ZEROES.
fn connect(port: u16) -> TcpStream {
    let mut s = connect_raw(port);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

#[derive(Debug)]
struct OptReply {
    opt: u32,
    kind: u32,
    data: Vec<u8>,
}

fn read_option_reply(s: &mut TcpStream) -> OptReply {
    let h = read_n(s, 20);
    assert_eq!(be_u64(&h), REPLY_OPT_MAGIC, "option reply magic");
    let opt = be_u32(&h[8..]);
    let kind = be_u32(&h[12..]);
    let len = be_u32(&h[16..]) as usize;
    assert!(len < 1 << 20, "option reply of {len} bytes");
    OptReply {
        opt,
        kind,
        data: read_n(s, len),
    }
}

/// The payload of INFO/GO: name, then no info requests.
fn info_payload(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// A connection in the transmission phase.
struct Nbd {
    s: TcpStream,
    size: u64,
    flags: u16,
    structured: bool,
    next_cookie: u64,
}

/// Sends GO for `name` on a greeted stream and reads the replies up to the ACK.
fn go_on(mut s: TcpStream, name: &str, structured: bool) -> Nbd {
    send_option(&mut s, OPT_GO, &info_payload(name));
    let mut export = None;
    loop {
        let r = read_option_reply(&mut s);
        assert_eq!(r.opt, OPT_GO, "reply to the wrong option: {r:?}");
        match r.kind {
            REP_ACK => break,
            REP_INFO => {
                if be_u16(&r.data) == 0 {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
                    export = Some((be_u64(&r.data[2..]), be_u16(&r.data[10..])));
                }
            }
            other => panic!("GO failed with reply type {other:#x}: {r:?}"),
        }
    }
    let (size, flags) = export.expect("GO must send NBD_INFO_EXPORT");
    Nbd {
        s,
        size,
        flags,
        structured,
        next_cookie: 1,
    }
}

/// Greeting + GO on the default export name: a ready client.
fn client(port: u16) -> Nbd {
    let n = go_on(connect(port), "blockrep", false);
    assert_eq!(n.size, VOLUME);
    assert!(n.flags & 1 != 0, "HAS_FLAGS");
    n
}

/// Greeting + STRUCTURED_REPLY (+ optionally SET_META_CONTEXT base:allocation) + GO.
fn structured_client(port: u16, base_allocation: bool) -> Nbd {
    let mut s = connect(port);
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    let r = read_option_reply(&mut s);
    assert_eq!((r.opt, r.kind), (OPT_STRUCTURED_REPLY, REP_ACK));
    if base_allocation {
        let mut d = Vec::new();
        d.extend_from_slice(&8u32.to_be_bytes());
        d.extend_from_slice(b"blockrep");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        send_option(&mut s, OPT_SET_META_CONTEXT, &d);
        let r = read_option_reply(&mut s);
        assert_eq!(r.kind, REP_META_CONTEXT, "{r:?}");
        assert_eq!(&r.data[4..], b"base:allocation");
        let r = read_option_reply(&mut s);
        assert_eq!(r.kind, REP_ACK, "{r:?}");
    }
    go_on(s, "blockrep", true)
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// A simple reply: error and cookie (the data of a successful READ follows it on the wire).
    Simple { error: u32, cookie: u64 },
    /// A structured chunk: flags, type, cookie and body.
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        body: Vec<u8>,
    },
}

impl Nbd {
    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    fn header(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn send(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Self::header(flags, cmd, cookie, offset, len);
        b.extend_from_slice(payload);
        self.s.write_all(&b).expect("sending a request");
    }

    /// Reads one reply header (a simple reply, or one structured chunk with its body).
    fn reply(&mut self) -> Reply {
        let h = read_n(&mut self.s, 4);
        match be_u32(&h) {
            SIMPLE_REPLY_MAGIC => {
                let r = read_n(&mut self.s, 12);
                Reply::Simple {
                    error: be_u32(&r),
                    cookie: be_u64(&r[4..]),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let r = read_n(&mut self.s, 16);
                let len = be_u32(&r[12..]) as usize;
                assert!(len <= (32 << 20) + 8, "chunk of {len} bytes");
                Reply::Chunk {
                    flags: be_u16(&r),
                    kind: be_u16(&r[2..]),
                    cookie: be_u64(&r[4..]),
                    body: read_n(&mut self.s, len),
                }
            }
            other => panic!("reply magic {other:#x}"),
        }
    }

    /// The error of a request answered by a single simple reply or a single error chunk
    /// (never used for a successful READ).
    fn error_of(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie, "cookie echoed");
                error
            }
            Reply::Chunk {
                flags,
                kind,
                cookie: c,
                body,
            } => {
                assert_eq!(c, cookie, "cookie echoed");
                assert_eq!(kind, REPLY_TYPE_ERROR, "expected an error chunk");
                assert!(flags & REPLY_FLAG_DONE != 0, "error chunk must be the last");
                be_u32(&body)
            }
        }
    }

    /// Sends a request and returns its error number (0 on success). Not for READ.
    fn command(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        assert_ne!(cmd, CMD_READ);
        let c = self.cookie();
        self.send(flags, cmd, c, offset, len, payload);
        self.error_of(c)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.command(0, CMD_WRITE, offset, data.len() as u32, data)
    }

    /// A READ on a connection without structured replies: data or the error number.
    fn read_with(&mut self, flags: u16, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        assert!(!self.structured);
        let c = self.cookie();
        self.send(flags, CMD_READ, c, offset, len, &[]);
        self.read_reply(c, len)
    }

    fn read_reply(&mut self, cookie: u64, len: u32) -> Result<Vec<u8>, u32> {
        match self.reply() {
            Reply::Simple {
                error: 0,
                cookie: c,
            } => {
                assert_eq!(c, cookie, "cookie echoed");
                Ok(read_n(&mut self.s, len as usize))
            }
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie, "cookie echoed");
                Err(error)
            }
            other => panic!("structured chunk without structured replies: {other:?}"),
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.read_with(0, offset, len)
    }

    /// Asserts that `[offset, offset+len)` reads back as `want`.
    fn check(&mut self, offset: u64, want: &[u8], what: &str) {
        let got = self
            .read(offset, want.len() as u32)
            .unwrap_or_else(|e| panic!("{what}: READ at {offset} failed with {e}"));
        assert!(
            got == want,
            "{what}: data at {offset} differs from what was written"
        );
    }
}

/// Waits until the server closes `s` (EOF or reset), discarding anything it still sends.
/// Panics if the connection is still open after `within`.
fn assert_closed(s: &mut TcpStream, within: Duration, what: &str) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    wait_until(
        within,
        format_args!("{what}: the server did not close the connection"),
        || match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) =>
            {
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) => panic!("{what}: unexpected read error {e}"),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The witness: another client doing verified I/O the whole time.

struct Witness {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

/// Starts a connection that writes and reads back its own 64 KiB region (at `region`) in a
/// loop; returns once the first round trip succeeded.
fn witness(port: u16, region: u64) -> Witness {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut c = client(port);
        let mut rounds = 0u64;
        loop {
            rounds += 1;
            let data = random_bytes(region ^ rounds, 64 << 10);
            let off = region + (rounds % 7) * 512;
            assert_eq!(c.write(off, &data), 0, "witness WRITE failed");
            c.check(off, &data, "witness");
            if rounds == 1 {
                let _ = tx.send(());
            }
            if stop2.load(Ordering::Relaxed) {
                return rounds;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the witness connection never completed a round trip");
    Witness {
        stop,
        handle: Some(handle),
    }
}

impl Witness {
    /// Stops the witness and fails if it ever failed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self
            .handle
            .take()
            .unwrap()
            .join()
            .expect("the witness connection failed while bad input was being sent");
        assert!(rounds >= 1);
        rounds
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers around the server.

fn start() -> (tempfile::TempDir, Served) {
    let tmp = tempfile::tempdir().unwrap();
    let store = create_store(tmp.path(), "vol", VOLUME);
    let srv = serve(&store, &[]);
    (tmp, srv)
}

fn assert_alive(srv: &mut Served) {
    if let Some(st) = srv.try_wait() {
        panic!("the server exited ({st}); its log:\n{}", srv.log());
    }
}

/// The server's resident set size in bytes.
fn rss(srv: &Served) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", srv.pid())).expect("/proc/PID/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

/// Ends a test: the server is alive, a new client can write and read, the witness never failed.
fn finish(mut srv: Served, w: Witness) {
    assert_alive(&mut srv);
    let mut c = client(srv.port);
    let data = random_bytes(0xF1F1, 12345);
    assert_eq!(c.write(3 * MIB + 17, &data), 0);
    c.check(3 * MIB + 17, &data, "fresh client after the bad input");
    w.finish();
    assert_alive(&mut srv);
}

// ---------------------------------------------------------------------------------------------
// Handshake phase.

#[test]
fn unknown_options_get_unsup_and_the_next_option_works() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    for (i, opt) in [11u32, 4, 0x1234].into_iter().enumerate() {
        let mut s = connect(srv.port);
        // With and without a payload: the server must consume it either way.
        let payload = random_bytes(i as u64, i * 100);
        send_option(&mut s, opt, &payload);
        let r = read_option_reply(&mut s);
        assert_eq!(r.opt, opt, "the reply names the option");
        assert_eq!(r.kind, REP_ERR_UNSUP, "option {opt}: {r:?}");
        // A second unknown option on the same connection, then GO still works.
        send_option(&mut s, opt, &[]);
        let r = read_option_reply(&mut s);
        assert_eq!((r.opt, r.kind), (opt, REP_ERR_UNSUP));
        let mut c = go_on(s, "blockrep", false);
        assert_eq!(c.size, VOLUME);
        let data = random_bytes(opt as u64, 4096);
        assert_eq!(c.write(i as u64 * 4096, &data), 0);
        c.check(i as u64 * 4096, &data, "after unknown options");
    }
    // The empty export name selects the default export too.
    let mut s = connect(srv.port);
    send_option(&mut s, 0x1234, b"xyz");
    assert_eq!(read_option_reply(&mut s).kind, REP_ERR_UNSUP);
    let mut c = go_on(s, "", false);
    assert_eq!(c.size, VOLUME);
    c.check(0, &random_bytes(11, 4096), "empty export name");
    finish(srv, w);
}

#[test]
fn option_errors_leave_the_handshake_usable() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut s = connect(srv.port);
    // LIST with data → INVALID.
    send_option(&mut s, OPT_LIST, b"junk");
    let r = read_option_reply(&mut s);
    assert_eq!((r.opt, r.kind), (OPT_LIST, REP_ERR_INVALID), "{r:?}");
    // STARTTLS on a server without TLS → POLICY (or UNSUP); never TLS_REQD.
    send_option(&mut s, OPT_STARTTLS, &[]);
    let r = read_option_reply(&mut s);
    assert!(
        r.kind == REP_ERR_POLICY || r.kind == REP_ERR_UNSUP,
        "STARTTLS: {r:?}"
    );
    // STRUCTURED_REPLY with data → INVALID.
    send_option(&mut s, OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(read_option_reply(&mut s).kind, REP_ERR_INVALID);
    // SET_META_CONTEXT before structured replies → INVALID.
    let mut d = info_payload("blockrep");
    d.truncate(12);
    d.extend_from_slice(&0u32.to_be_bytes());
    send_option(&mut s, OPT_SET_META_CONTEXT, &d);
    assert_eq!(read_option_reply(&mut s).kind, REP_ERR_INVALID);
    // INFO and GO on an unknown export → UNKNOWN.
    send_option(&mut s, OPT_INFO, &info_payload("no-such-export"));
    let r = read_option_reply(&mut s);
    assert_eq!((r.opt, r.kind), (OPT_INFO, REP_ERR_UNKNOWN), "{r:?}");
    send_option(&mut s, OPT_GO, &info_payload("no-such-export"));
    assert_eq!(read_option_reply(&mut s).kind, REP_ERR_UNKNOWN);
    // After all that, GO works.
    let mut c = go_on(s, "blockrep", false);
    c.check(0, &[0u8; 4096], "after option errors");
    finish(srv, w);
}

#[test]
fn huge_option_length_closes_the_connection_and_the_server_survives() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let before = rss(&srv);
    for (opt, len) in [
        (OPT_GO, 1u32 << 30),
        (0x1234, u32::MAX),
        (OPT_INFO, 1 << 30),
    ] {
        let mut s = connect(srv.port);
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[0u8; 4096]);
        s.write_all(&b).unwrap();
        assert_closed(
            &mut s,
            Duration::from_secs(5),
            &format!("option {opt} declaring {len} bytes"),
        );
    }
    let after = rss(&srv);
    assert!(
        after < 300 * MIB,
        "server RSS grew from {before} to {after} bytes after huge option lengths"
    );
    finish(srv, w);
}

#[test]
fn info_with_a_name_longer_than_the_option_is_invalid() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut s = connect(srv.port);
    for (opt, name_len) in [
        (OPT_INFO, 1000u32),
        (OPT_INFO, u32::MAX),
        (OPT_GO, 9),
        (OPT_GO, 1 << 20),
    ] {
        // Declared name length > what the option carries (8 name bytes + 2 info-count bytes).
        let mut d = Vec::new();
        d.extend_from_slice(&name_len.to_be_bytes());
        d.extend_from_slice(b"blockrep");
        d.extend_from_slice(&0u16.to_be_bytes());
        if opt == OPT_GO && name_len == 9 {
            // Off by one: the name would swallow one byte of the count.
            d.truncate(4 + 8 + 1);
        }
        send_option(&mut s, opt, &d);
        let r = read_option_reply(&mut s);
        assert_eq!(r.opt, opt);
        assert_eq!(r.kind, REP_ERR_INVALID, "name length {name_len}: {r:?}");
    }
    // An info-request count larger than the option is INVALID too.
    let mut d = info_payload("blockrep");
    let n = d.len();
    d[n - 2..].copy_from_slice(&500u16.to_be_bytes());
    send_option(&mut s, OPT_INFO, &d);
    assert_eq!(read_option_reply(&mut s).kind, REP_ERR_INVALID);
    // Truncated option: only part of the name length.
    send_option(&mut s, OPT_INFO, &[0, 0]);
    assert_eq!(read_option_reply(&mut s).kind, REP_ERR_INVALID);
    // The handshake still completes.
    let mut c = go_on(s, "blockrep", false);
    assert_eq!(c.size, VOLUME);
    c.check(0, &[0u8; 512], "after malformed INFO");
    finish(srv, w);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut s = connect_raw(srv.port);
    s.write_all(&0x8000_0004u32.to_be_bytes()).unwrap();
    assert_closed(&mut s, Duration::from_secs(5), "unknown client flags");
    finish(srv, w);
}

#[test]
fn export_name_for_an_unknown_export_closes_the_connection() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut s = connect(srv.port);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert_closed(&mut s, Duration::from_secs(5), "EXPORT_NAME nope");
    finish(srv, w);
}

// ---------------------------------------------------------------------------------------------
// Transmission phase.

#[test]
fn out_of_range_and_invalid_requests_get_errors_and_the_connection_keeps_working() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut c = client(srv.port);
    let head = random_bytes(1, 4096);
    assert_eq!(c.write(0, &head), 0);
    let tail = random_bytes(2, 4096);
    assert_eq!(c.write(VOLUME - 4096, &tail), 0, "WRITE of the last block");
    c.check(VOLUME - 4096, &tail, "last block");

    // (what, flags, cmd, offset, length, send a payload, expected errno)
    let cases: &[(&str, u16, u16, u64, u32, bool, u32)] = &[
        (
            "READ straddling the end",
            0,
            CMD_READ,
            VOLUME - 100,
            4096,
            false,
            EINVAL,
        ),
        ("READ at the end", 0, CMD_READ, VOLUME, 1, false, EINVAL),
        (
            "READ far past the end",
            0,
            CMD_READ,
            1 << 40,
            4096,
            false,
            EINVAL,
        ),
        (
            "READ with offset+length overflowing",
            0,
            CMD_READ,
            u64::MAX - 10,
            4096,
            false,
            EINVAL,
        ),
        (
            "WRITE straddling the end",
            0,
            CMD_WRITE,
            VOLUME - 100,
            4096,
            true,
            ENOSPC,
        ),
        ("WRITE at the end", 0, CMD_WRITE, VOLUME, 512, true, ENOSPC),
        (
            "WRITE with offset+length overflowing",
            0,
            CMD_WRITE,
            u64::MAX - 10,
            4096,
            true,
            ENOSPC,
        ),
        (
            "TRIM straddling the end",
            0,
            CMD_TRIM,
            VOLUME - 4096,
            8192,
            false,
            EINVAL,
        ),
        (
            "TRIM far past the end",
            0,
            CMD_TRIM,
            1 << 40,
            4096,
            false,
            EINVAL,
        ),
        (
            "WRITE_ZEROES straddling the end",
            0,
            CMD_WRITE_ZEROES,
            VOLUME - 4096,
            8192,
            false,
            ENOSPC,
        ),
        (
            "WRITE_ZEROES overflowing",
            0,
            CMD_WRITE_ZEROES,
            u64::MAX - 10,
            4096,
            false,
            ENOSPC,
        ),
        (
            "CACHE past the end",
            0,
            CMD_CACHE,
            VOLUME,
            4096,
            false,
            EINVAL,
        ),
        ("unknown command 99", 0, 99, 0, 4096, false, EINVAL),
        ("unknown command 0xffff", 0, 0xffff, 0, 0, false, EINVAL),
        (
            "READ with unknown flag bit 9",
            1 << 9,
            CMD_READ,
            0,
            4096,
            false,
            EINVAL,
        ),
        (
            "READ with DF but no structured replies",
            CMD_FLAG_DF,
            CMD_READ,
            0,
            4096,
            false,
            EINVAL,
        ),
        (
            "WRITE with unknown flag bit 15",
            1 << 15,
            CMD_WRITE,
            0,
            4096,
            true,
            EINVAL,
        ),
        (
            "TRIM with unknown flag bit 7",
            1 << 7,
            CMD_TRIM,
            0,
            4096,
            false,
            EINVAL,
        ),
        (
            "BLOCK_STATUS without a meta context",
            0,
            CMD_BLOCK_STATUS,
            0,
            4096,
            false,
            EINVAL,
        ),
    ];
    for &(what, flags, cmd, offset, len, with_payload, want) in cases {
        let cookie = 0xC0FFEE00 + u64::from(cmd);
        // A payload of zeroes: if the server failed to consume it, it would parse it as a
        // request with magic 0 and drop the connection.
        let payload = if with_payload {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        c.send(flags, cmd, cookie, offset, len, &payload);
        // Pipeline a READ right behind it, before reading the error.
        let rc = c.cookie();
        c.send(0, CMD_READ, rc, 0, 4096, &[]);
        let err = if cmd == CMD_READ {
            match c.read_reply(cookie, len) {
                Ok(_) => 0,
                Err(e) => e,
            }
        } else {
            c.error_of(cookie)
        };
        assert_eq!(err, want, "{what}: wrong error");
        let got = c
            .read_reply(rc, 4096)
            .unwrap_or_else(|e| panic!("{what}: the READ after it failed with {e}"));
        assert!(got == head, "{what}: the READ after it returned wrong data");
    }
    // Nothing was written by the refused requests.
    c.check(0, &head, "block 0 after refused WRITEs");
    c.check(
        VOLUME - 4096,
        &tail,
        "last block after refused WRITE/TRIM/ZERO",
    );

    // A READ larger than the maximum payload is refused (EINVAL or EOVERFLOW), not served.
    let err = c.read(0, 48 << 20).expect_err("48 MiB READ must fail");
    assert!(
        err == EINVAL || err == EOVERFLOW,
        "48 MiB READ: error {err}"
    );
    c.check(0, &head, "after the oversized READ");

    // BLOCK_STATUS with structured replies but no meta context: still EINVAL.
    let mut sc = structured_client(srv.port, false);
    let cookie = sc.cookie();
    sc.send(0, CMD_BLOCK_STATUS, cookie, 0, 4096, &[]);
    assert_eq!(
        sc.error_of(cookie),
        EINVAL,
        "BLOCK_STATUS, structured, no context"
    );
    // ...while with base:allocation selected it answers (so the check above means something).
    let mut bc = structured_client(srv.port, true);
    let cookie = bc.cookie();
    bc.send(0, CMD_BLOCK_STATUS, cookie, 0, 1 << 20, &[]);
    match bc.reply() {
        Reply::Chunk {
            flags,
            kind,
            cookie: c2,
            body,
        } => {
            assert_eq!(c2, cookie);
            assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS, "chunk type");
            assert!(flags & REPLY_FLAG_DONE != 0);
            assert!(
                body.len() >= 12 && (body.len() - 4) % 8 == 0,
                "descriptor list"
            );
            assert_eq!(be_u32(&body), 1, "context id from SET_META_CONTEXT");
            // Block 0 was written: the first extent is data (not a hole).
            assert!(be_u32(&body[4..]) > 0);
            assert_eq!(
                be_u32(&body[8..]) & 1,
                0,
                "written block reported as a hole"
            );
        }
        other => panic!("BLOCK_STATUS with base:allocation: {other:?}"),
    }
    finish(srv, w);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut a = client(srv.port);
    let mut b = client(srv.port);
    let data = random_bytes(5, 70000);
    assert_eq!(a.write(MIB, &data), 0);
    b.check(MIB, &data, "B sees A's write");

    // A sends a header with the wrong magic.
    let mut garbage = Nbd::header(0, CMD_READ, 1, 0, 4096);
    garbage[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    a.s.write_all(&garbage).unwrap();
    assert_closed(&mut a.s, Duration::from_secs(5), "bad request magic");

    // B is unaffected: write, then read back.
    let data2 = random_bytes(6, 70001);
    assert_eq!(b.write(2 * MIB + 1, &data2), 0);
    b.check(2 * MIB + 1, &data2, "B after A's garbage");
    b.check(MIB, &data, "A's acknowledged write survives A's disconnect");

    // The same with a valid WRITE immediately followed by garbage on another connection.
    let mut c = client(srv.port);
    let data3 = random_bytes(7, 4096);
    let mut wire = Nbd::header(0, CMD_WRITE, 9, 5 * MIB, 4096);
    wire.extend_from_slice(&data3);
    wire.extend_from_slice(&random_bytes(8, 1000));
    c.s.write_all(&wire).unwrap();
    assert_closed(
        &mut c.s,
        Duration::from_secs(5),
        "WRITE followed by garbage",
    );
    b.check(2 * MIB + 1, &data2, "B after C's garbage");
    finish(srv, w);
}

#[test]
fn truncated_streams_and_garbage_do_not_hurt_the_server() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);

    // Half a request header, then close.
    let mut c = client(srv.port);
    let h = Nbd::header(0, CMD_READ, 1, 0, 4096);
    c.s.write_all(&h[..14]).unwrap();
    drop(c);

    // A WRITE header promising 1 MiB, 1000 bytes of it, then close.
    let mut c = client(srv.port);
    let mut wire = Nbd::header(0, CMD_WRITE, 2, 6 * MIB, 1 << 20);
    wire.extend_from_slice(&random_bytes(9, 1000));
    c.s.write_all(&wire).unwrap();
    drop(c);

    // Half an option header, then close.
    let mut s = connect(srv.port);
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);

    // Nothing at all after the greeting, then close.
    drop(connect_raw(srv.port));

    // Random garbage right after the greeting (in place of the client flags).
    let mut s = connect_raw(srv.port);
    let g = random_bytes(0xBAD, 4096);
    assert!(
        be_u32(&g) & !3 != 0,
        "the garbage must start with unknown client flags"
    );
    let _ = s.write_all(&g);
    assert_closed(
        &mut s,
        Duration::from_secs(5),
        "garbage instead of client flags",
    );

    // Valid client flags, then garbage in place of an option.
    let mut s = connect(srv.port);
    let _ = s.write_all(&random_bytes(0xBAD2, 4096));
    assert_closed(
        &mut s,
        Duration::from_secs(5),
        "garbage instead of an option",
    );

    // Garbage after GO.
    let mut c = client(srv.port);
    let _ = c.s.write_all(&random_bytes(0xBAD3, 100_000));
    assert_closed(&mut c.s, Duration::from_secs(5), "garbage in transmission");

    // The partially sent WRITE must not have been applied.
    let mut c = client(srv.port);
    c.check(
        6 * MIB,
        &vec![0u8; 1 << 20],
        "region of the truncated WRITE",
    );
    finish(srv, w);
}

#[test]
fn absurd_write_lengths_close_the_connection_without_allocating() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    for len in [u32::MAX, 0x8000_0000, (32 << 20) + 1] {
        let mut c = client(srv.port);
        let h = Nbd::header(0, CMD_WRITE, 3, 0, len);
        c.s.write_all(&h).unwrap();
        // A little payload, nowhere near what the header claims.
        let _ = c.s.write_all(&[0x55u8; 8192]);
        assert_closed(
            &mut c.s,
            Duration::from_secs(5),
            &format!("WRITE header claiming {len} bytes"),
        );
        let rss = rss(&srv);
        assert!(
            rss < 300 * MIB,
            "server RSS is {rss} bytes after a WRITE header claiming {len} bytes"
        );
    }
    // The advertised maximum itself (32 MiB) is accepted and reads back.
    let mut c = client(srv.port);
    let big = random_bytes(0xB16, 32 << 20);
    assert_eq!(c.write(8 * MIB, &big), 0, "32 MiB WRITE");
    c.check(8 * MIB, &big, "32 MiB WRITE");
    drop(c);
    let rss = rss(&srv);
    assert!(rss < 300 * MIB, "server RSS is {rss} bytes");
    finish(srv, w);
}

#[test]
fn replayed_writes_are_harmless() {
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let data = random_bytes(0x5EED, 3 * 4096 + 123);
    let off = 7 * MIB + 1000;
    let mut wire = Nbd::header(0, CMD_WRITE, 0x77, off, data.len() as u32);
    wire.extend_from_slice(&data);

    // The same WRITE (same cookie) twice back to back on one connection.
    let mut a = client(srv.port);
    a.s.write_all(&wire).unwrap();
    a.s.write_all(&wire).unwrap();
    for _ in 0..2 {
        assert_eq!(
            a.reply(),
            Reply::Simple {
                error: 0,
                cookie: 0x77
            }
        );
    }
    a.check(off, &data, "after a doubled WRITE");

    // Replayed concurrently on two connections, many times.
    let port = srv.port;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let wire = wire.clone();
            std::thread::spawn(move || {
                let mut c = client(port);
                for _ in 0..50 {
                    c.s.write_all(&wire).unwrap();
                }
                for _ in 0..50 {
                    assert_eq!(
                        c.reply(),
                        Reply::Simple {
                            error: 0,
                            cookie: 0x77
                        }
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("replaying connection failed");
    }
    // A fresh connection sees exactly the data, and the neighbours are untouched.
    let mut c = client(srv.port);
    c.check(off, &data, "after replays on two connections");
    c.check(off - 1000, &[0u8; 1000], "bytes before the replayed WRITE");
    c.check(
        off + data.len() as u64,
        &[0u8; 4096],
        "bytes after the replayed WRITE",
    );

    // A replay after a reconnect, following a newer write elsewhere, is still harmless.
    let other = random_bytes(0xABC, 4096);
    assert_eq!(c.write(9 * MIB, &other), 0);
    drop(c);
    let mut d = client(srv.port);
    d.s.write_all(&wire).unwrap();
    assert_eq!(
        d.reply(),
        Reply::Simple {
            error: 0,
            cookie: 0x77
        }
    );
    d.check(off, &data, "after a replay on a new connection");
    d.check(9 * MIB, &other, "unrelated write");
    a.check(off, &data, "first connection still sees it");
    finish(srv, w);
}

#[test]
fn half_closed_client_with_requests_in_flight_gets_its_replies() {
    // The client sends a batch of requests and shuts down its sending side: the server must
    // still answer every request it read, then close.
    let (_tmp, srv) = start();
    let w = witness(srv.port, 40 * MIB);
    let mut c = client(srv.port);
    let data = random_bytes(0x4A1F, 4096);
    let mut wire = Vec::new();
    for i in 0..32u64 {
        wire.extend_from_slice(&Nbd::header(
            0,
            CMD_WRITE,
            100 + i,
            10 * MIB + i * 4096,
            4096,
        ));
        wire.extend_from_slice(&data);
    }
    c.s.write_all(&wire).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    let mut seen = Vec::new();
    for _ in 0..32 {
        match c.reply() {
            Reply::Simple { error: 0, cookie } => seen.push(cookie),
            other => panic!("reply {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, (100..132).collect::<Vec<u64>>());
    assert_closed(&mut c.s, Duration::from_secs(5), "after EOF");
    let mut d = client(srv.port);
    for i in 0..32u64 {
        d.check(
            10 * MIB + i * 4096,
            &data,
            "writes sent before a half-close",
        );
    }
    finish(srv, w);
}

// ---------------------------------------------------------------------------------------------
// Shutdown while clients are connected.

const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
const ESHUTDOWN: u32 = 108;

fn signal_term(srv: &Served) {
    srv.signal(libc::SIGTERM);
}

/// SIGTERM, and waits until the server has taken it (its log says so): from then on it is
/// shutting down.
fn signal_term_taken(srv: &Served) {
    let mark = srv.mark();
    signal_term(srv);
    srv.wait_log(mark, &["SIGTERM: stopping"], 10);
}

/// Waits up to `limit` for the server to exit; returns how long it took, or `None`.
fn wait_exit(srv: &mut Served, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let st = poll_until(limit, || srv.try_wait())?;
    assert!(
        st.success(),
        "server exited with {st} after SIGTERM:\n{}",
        srv.log()
    );
    Some(t0.elapsed())
}

#[test]
fn sigterm_is_not_held_up_by_a_client_idle_in_the_handshake() {
    let (_tmp, mut srv) = start();
    // One client connected and idle in transmission, one that read the greeting (so the
    // server has accepted it) and went quiet (a port scanner, a hung client). SIGTERM means
    // a clean stop from the serving line on, which `start` waited for (see
    // cli.rs::sigterm_right_after_the_serving_line_is_a_clean_stop).
    let mut active = client(srv.port);
    assert_eq!(active.write(0, &[1u8; 4096]), 0);
    let _idle = connect_raw(srv.port);
    signal_term(&srv);
    let took = wait_exit(&mut srv, Duration::from_secs(10));
    assert!(
        took.is_some(),
        "blockrep serve was still running 10 s after SIGTERM, waiting for a client that never \
         finished its handshake (log:\n{})",
        srv.log()
    );
    assert_closed(
        &mut active.s,
        Duration::from_secs(5),
        "transmission client at shutdown",
    );
}

#[test]
fn options_sent_after_sigterm_are_refused_with_err_shutdown() {
    let (_tmp, mut srv) = start();
    let mut s = connect(srv.port);
    send_option(&mut s, OPT_INFO, &info_payload("blockrep"));
    loop {
        let r = read_option_reply(&mut s);
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_INFO, "{r:?}");
    }
    signal_term_taken(&srv);
    // The server is shutting down: GO must not start a new session. NBD_REP_ERR_SHUTDOWN is
    // the polite answer; closing the connection is acceptable too.
    send_option(&mut s, OPT_GO, &info_payload("blockrep"));
    let mut h = [0u8; 20];
    match s.read_exact(&mut h) {
        Err(_) => {} // closed: fine
        Ok(()) => {
            assert_eq!(be_u64(&h), REPLY_OPT_MAGIC);
            let kind = be_u32(&h[12..]);
            assert_eq!(
                kind, REP_ERR_SHUTDOWN,
                "GO sent after SIGTERM was answered with reply type {kind:#x} instead of \
                 NBD_REP_ERR_SHUTDOWN"
            );
        }
    }
    drop(s);
    assert!(
        wait_exit(&mut srv, Duration::from_secs(40)).is_some(),
        "server did not exit"
    );
}

#[test]
fn sigterm_with_writers_connected_keeps_every_acknowledged_write() {
    let (tmp, mut srv) = start();
    let port = srv.port;
    // Two connections writing distinct 4 KiB blocks as fast as they can, one at a time each,
    // recording which writes were acknowledged.
    let acks = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|k| {
            let acks = acks.clone();
            std::thread::spawn(move || {
                let mut c = client(port);
                let mut acked = Vec::new();
                for i in 0..4000u64 {
                    let block = k * 4000 + i;
                    let data = random_bytes(block, 4096);
                    let cookie = c.cookie();
                    let mut wire = Nbd::header(0, CMD_WRITE, cookie, block * 4096, 4096);
                    wire.extend_from_slice(&data);
                    if c.s.write_all(&wire).is_err() {
                        break;
                    }
                    let mut h = [0u8; 16];
                    if c.s.read_exact(&mut h).is_err() {
                        break; // closed by the shutdown
                    }
                    assert_eq!(be_u32(&h), SIMPLE_REPLY_MAGIC);
                    assert_eq!(be_u64(&h[8..]), cookie);
                    match be_u32(&h[4..]) {
                        0 => {
                            acked.push(block);
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        ESHUTDOWN => {}
                        e => panic!("WRITE failed with {e} during shutdown"),
                    }
                }
                acked
            })
        })
        .collect();
    // SIGTERM meets writers in full swing.
    wait_until(Duration::from_secs(30), "the writers under way", || {
        acks.load(Ordering::Relaxed) >= 100
    });
    signal_term(&srv);
    let took = wait_exit(&mut srv, Duration::from_secs(20));
    assert!(took.is_some(), "server did not exit within 20 s of SIGTERM");
    let acked: Vec<u64> = writers
        .into_iter()
        .flat_map(|t| t.join().expect("writer thread"))
        .collect();
    assert!(
        acked.len() > 10,
        "the writers barely ran ({} writes)",
        acked.len()
    );
    // Every acknowledged write is in the store.
    let image = tmp.path().join("after-sigterm.img");
    run_ok(blockrep().arg("export").arg(&srv.store).arg(&image));
    let img = std::fs::read(&image).unwrap();
    for b in &acked {
        let at = (*b * 4096) as usize;
        assert!(
            img[at..at + 4096] == random_bytes(*b, 4096)[..],
            "acknowledged write to block {b} is missing after a clean shutdown"
        );
    }
}
